"""Logging as the Go EPP does it: `--zap-encoder json` gives one JSON object a line in zap's field
names; console stays text; ignored Go flags are warned about once each."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epp.logsetup import configure, encode_time
from epp.settings import LogSettings, parse_settings

ZAP_ORDER = ["level", "ts", "logger", "caller", "msg"]
CONFIG_WITH_A_WARNING = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [dataLayer]
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


def run_epp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", *args], capture_output=True, text=True, timeout=timeout
    )


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line, each of which must be one JSON object with zap's fields first."""
    records = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr ---\n{stderr}") from None
        assert isinstance(record, dict), line
        assert list(record)[: len(ZAP_ORDER)] == ZAP_ORDER, line
        records.append(record)
    return records


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    sys.excepthook = hook
    logging.captureWarnings(False)


# -- a real `python -m epp` -------------------------------------------------------------------------


def test_check_config_with_json_logs_and_ignored_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_WITH_A_WARNING)
    result = run_epp(
        "--zap-encoder",
        "json",
        "--check-config",
        "--config-file",
        str(config),
        "--enable-pprof",
        "--allow-experimental-plugins=false",
        "--refresh-prometheus-metrics-interval=5s",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config is valid\n"
    records = json_lines(result.stderr)
    ignored = [r["msg"] for r in records if r["msg"].startswith("flag --")]
    assert sorted(ignored) == sorted(
        [
            "flag --enable-pprof is accepted for the Go EPP and has no effect: "
            "no pprof in a Python process (use py-spy)",
            "flag --allow-experimental-plugins is accepted for the Go EPP and has no effect: "
            "epp has no experimental-only plugins",
            "flag --refresh-prometheus-metrics-interval is accepted for the Go EPP and has no effect: "
            "epp's pool gauges refresh every second and on change",
        ]
    )
    for r in records:
        assert isinstance(r["ts"], float) and abs(r["ts"] - time.time()) < 120  # epoch seconds, Go's
        assert r["level"] in ("info", "warn") and r["logger"].startswith("epp")
        assert re.fullmatch(r"[\w.]+/\w+\.py:\d+", r["caller"]), r["caller"]
    assert {r["level"] for r in records if r["msg"].startswith("flag --")} == {"warn"}
    # The config's own warning is a log record too, not a bare line.
    assert any("dataLayer" in r["msg"] and r["level"] == "warn" for r in records), records


def test_invalid_config_in_json_is_an_error_record_with_a_stacktrace(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG_WITH_A_WARNING.replace("queue-scorer\n- type", "nope\n- type", 1))
    result = run_epp("--zap-encoder=json", "--check-config", "--config-file", str(config))
    assert result.returncode == 1
    [record] = [r for r in json_lines(result.stderr) if r["level"] == "error"]
    assert record["msg"] == "invalid config"
    assert str(config) in record["error"] and "nope" in record["error"]
    assert "cli.py" in record["stacktrace"]  # errors carry the call stack (--zap-stacktrace-level error)


@pytest.mark.parametrize(
    ("encoding", "pattern"),
    [
        ("iso8601", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d{4})"),
        ("rfc3339", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)"),
        ("rfc3339nano", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"),
    ],
)
def test_time_encodings_in_a_real_run(encoding: str, pattern: str) -> None:
    result = run_epp(
        "--zap-encoder", "json", f"--zap-time-encoding={encoding}", "--check-config", "--enable-pprof"
    )
    assert result.returncode == 0, result.stderr
    [record] = json_lines(result.stderr)
    assert re.fullmatch(pattern, record["ts"]), record["ts"]


def test_a_serving_epp_writes_only_json_lines() -> None:
    """A short-lived real run: start, serve, SIGTERM, drain; stderr is JSON throughout."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epp",
            "--zap-encoder=json",
            "--zap-log-level=debug",
            "--endpoints=127.0.0.1:9",  # nothing listens: scrape failures get logged too
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--bind-address=127.0.0.1",
            "--secure-serving=false",
            "--tracing=false",
            "--drain-timeout=1s",
            "--enable-pprof=false",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "epp serving" in line:
                break
        assert any("epp serving" in line for line in lines), "".join(lines)
        time.sleep(0.5)  # a moment of serving (and of failed scrapes, logged) before the signal
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    stderr = "".join(lines) + rest
    records = json_lines(stderr)
    assert proc.returncode == 0, stderr
    assert [r["msg"] for r in records if r["msg"].startswith("flag --")] == [
        "flag --enable-pprof is accepted for the Go EPP and has no effect: "
        "no pprof in a Python process (use py-spy)"
    ]
    assert any(r["msg"].startswith("epp serving") and r["level"] == "info" for r in records)
    assert {"debug", "info", "warn"} <= {r["level"] for r in records}
    # Other libraries' records are JSON too (gRPC's; asyncio's own on its loop, none on uvloop).
    assert any(r["logger"] != "epp" and not r["logger"].startswith("epp.") for r in records)
    assert any(r["msg"].startswith("shutting down") for r in records)


def test_console_stays_text_and_warns_once_per_ignored_flag() -> None:
    result = run_epp("--check-config", "--enable-pprof", "--enable-pprof=false")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        r"\S+ \S+ WARNING epp: flag --enable-pprof is accepted for the Go EPP and has no effect: .+", lines[0]
    ), lines[0]


# -- the formatter -----------------------------------------------------------------------------------


def test_zap_fields_extras_errors_and_stacktrace_levels(restore_logging: None) -> None:
    out = io.StringIO()
    configure(LogSettings(level="debug", encoder="json", stacktrace_level="error", time_encoding="nano"), out)
    log = logging.getLogger("epp.test")
    log.debug("picked %s", "10.0.0.1:8000", extra={"endpoint": "10.0.0.1:8000", "score": 0.5, "n": 2})
    log.info("odd value", extra={"when": datetime.date(2025, 1, 2), "msg_id": 7})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("scrape failed")
    log.error("no exception")
    logging.getLogger("epp.quiet").warning("careful")
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    records = json_lines(out.getvalue())
    debug, info, exc, plain, warn, pywarn = records
    assert (
        debug["level"] == "debug" and debug["logger"] == "epp.test" and debug["msg"] == "picked 10.0.0.1:8000"
    )
    assert (debug["endpoint"], debug["score"], debug["n"]) == ("10.0.0.1:8000", 0.5, 2)
    assert isinstance(debug["ts"], int) and abs(debug["ts"] / 1e9 - time.time()) < 60
    assert debug["caller"].startswith("tests/test_logging.py:")
    assert "stacktrace" not in debug and "error" not in debug
    assert info["when"] == "2025-01-02" and info["msg_id"] == 7  # not JSON-native: its text
    assert exc["level"] == "error" and exc["error"] == "boom"
    assert "ValueError: boom" in exc["stacktrace"] and "Traceback" in exc["stacktrace"]
    assert plain["level"] == "error" and "error" not in plain
    assert "test_zap_fields_extras_errors_and_stacktrace_levels" in plain["stacktrace"]  # the call's stack
    assert "logging/__init__.py" not in plain["stacktrace"]
    assert warn["level"] == "warn" and "stacktrace" not in warn
    assert pywarn["logger"] == "py.warnings" and "deprecated thing" in pywarn["msg"]

    # --zap-stacktrace-level info: every record at info or above carries its stack; panic: none do.
    for level, expect in (("info", True), ("panic", False)):
        out = io.StringIO()
        configure(LogSettings(encoder="json", stacktrace_level=level), out)
        log.info("hello")
        log.error("bad")
        info_rec, error_rec = json_lines(out.getvalue())
        assert ("stacktrace" in info_rec, "stacktrace" in error_rec) == (expect, expect)

    # The level filters; console encodes the same record as text, fields appended.
    out = io.StringIO()
    configure(LogSettings(level="warning", encoder="console"), out)
    log.info("hidden")
    log.warning("shown", extra={"pool": "p"})
    [line] = out.getvalue().splitlines()
    assert line.endswith(' WARNING epp.test: shown {"pool":"p"}')


def test_time_encodings() -> None:
    moment = datetime.datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=datetime.UTC).timestamp()
    assert encode_time(moment, "epoch") == moment
    assert encode_time(moment, "millis") == pytest.approx(moment * 1000)
    assert encode_time(moment, "nano") == pytest.approx(int(moment * 1e9), abs=1000)
    local = datetime.datetime.fromtimestamp(moment).astimezone()
    base = local.strftime("%Y-%m-%dT%H:%M:%S")
    iso, rfc, nano = (encode_time(moment, e) for e in ("iso8601", "rfc3339", "rfc3339nano"))
    assert isinstance(iso, str) and iso.startswith(base + ".891")
    assert isinstance(rfc, str) and rfc.startswith(base) and not rfc.startswith(base + ".")
    assert isinstance(nano, str) and nano.startswith(base + ".891234")
    if local.utcoffset() == datetime.timedelta(0):  # Go writes UTC as Z
        assert (iso, rfc, nano) == (base + ".891Z", base + "Z", base + ".891234Z")
    whole = datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.UTC).timestamp()
    assert "." not in str(encode_time(whole, "rfc3339nano"))  # trailing zeros trimmed, as Go does


def test_logging_settings_from_the_zap_flags() -> None:
    s = parse_settings(["--check-config"])
    assert s.logging == LogSettings(level="info", encoder="console", time_encoding="epoch")
    s = parse_settings(
        ["--check-config", "--zap-encoder=json", "--zap-log-level=debug", "--zap-time-encoding=rfc3339"]
    )
    assert (s.logging.encoder, s.logging.level, s.logging.time_encoding) == ("json", "debug", "rfc3339")
    assert parse_settings(["--check-config", "--v=4"]).logging.level == "debug"

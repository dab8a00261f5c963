"""`--event-loop`: epp runs on uvloop by default and on asyncio's own loop when asked; either way
it serves and stops cleanly on SIGTERM (the subprocess is the real `epp` command)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


def serve_and_stop(*flags: str) -> str:
    """Start epp, wait for its "epp serving" line, SIGTERM it; its stderr."""
    args = [sys.executable, "-m", "epp", "--endpoints", "127.0.0.1:9", "--secure-serving=false"]
    args += ["--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0"]
    args += ["--bind-address", "127.0.0.1", "--log-level", "info", *flags]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
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
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    return "".join(lines) + rest


@pytest.mark.timeout(90)
def test_epp_serves_on_uvloop_by_default() -> None:
    pytest.importorskip("uvloop")
    out = serve_and_stop()
    assert "uvloop event loop" in out, out


@pytest.mark.timeout(90)
def test_epp_serves_on_asyncio_when_asked() -> None:
    out = serve_and_stop("--event-loop", "asyncio")
    assert "asyncio event loop" in out, out


def test_an_unknown_event_loop_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--endpoints", "a:1", "--event-loop", "trio"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--event-loop" in result.stderr and "invalid choice" in result.stderr

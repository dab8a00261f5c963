"""`epp --check-config` reports what starting epp would refuse, not only config errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def check(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", *flags], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-min-version", "1.3"), "--tls-min-version 1.3: cannot be enforced"),
        (("--total-queued-requests-metric", "bad{{"), "not a valid metric specification"),
        (("--cert-path", "/nonexistent"), "cannot read tls.crt"),
        (("--tls-cipher-suites", "TLS_NOPE"), "unknown cipher suite 'TLS_NOPE'"),
    ],
)
def test_start_time_checks_fail_check_config_with_one_line(flags: tuple[str, ...], message: str) -> None:
    result = check(*flags)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_plaintext_skips_the_tls_checks_and_the_default_is_valid() -> None:
    assert check("--secure-serving=false", "--tls-min-version", "1.3").returncode == 0
    result = check()
    assert result.returncode == 0 and result.stdout.strip() == "config is valid"


def test_check_config_is_a_boolean_like_every_other() -> None:
    """`--check-config=true` as pflag spells a boolean; `=false` means serve, which needs endpoints."""
    from epp.settings import parse_settings

    assert parse_settings(["--check-config=true"]).check_config
    assert parse_settings(["--check-config"]).check_config
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--check-config=false"])  # no discovery mode: the usual error
    assert exit_info.value.code == 2

"""ext_proc over TLS, as the Go EPP serves it: self-signed by default, --cert-path, reloads, and
what grpcio allows of --tls-min-version and --tls-cipher-suites."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.app import App
from epp.settings import parse_settings
from epp.tls import (
    CIPHER_SUITES_ENV,
    SELF_SIGNED_ORGANIZATION,
    TlsConfigError,
    check_min_version,
    cipher_suites,
    load_key_pair,
)
from tests.serving.support import (
    REPO_ROOT,
    client_context,
    epp_command,
    handshake,
    make_ca,
    secret_volume,
    serial,
    write_pair,
)
from tests.support.epp_app import running_epp
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm

BODY = orjson.dumps({"model": "m", "prompt": "hello"})
DEST = "x-gateway-destination-endpoint"


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


async def routed_to(stub: pb_grpc.ExternalProcessorStub) -> str:
    replies = await one_request(stub, request_headers(), BODY)
    mutation = replies[0].request_headers.response.header_mutation
    return str(next(h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == DEST))


async def route_over(port: int, root_pem: bytes) -> str:
    """An ext_proc request on a fresh TLS channel that trusts `root_pem` (and checks the name)."""
    creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return await routed_to(pb_grpc.ExternalProcessorStub(channel))


def test_secure_serving_is_the_default() -> None:
    assert parse_settings(["--endpoints", "a:1"]).secure_serving is True


async def test_self_signed_certificate_when_no_cert_path(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address, "--secure-serving") as epp:
        cert, version, _ = await handshake(epp.grpc_port)
        assert cert.issuer == cert.subject  # self-signed
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        assert org == SELF_SIGNED_ORGANIZATION
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
        assert version in ("TLSv1.2", "TLSv1.3")
        # A client that trusts the certificate the port presents routes through it, the name checked.
        served = cert.public_bytes(Encoding.PEM)
        assert await route_over(epp.grpc_port, served) == fake.address
        assert await routed_to(epp.stub) == fake.address  # running_epp's own TLS channel
        # A plaintext client gets nowhere.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await one_request(pb_grpc.ExternalProcessorStub(plain), request_headers(), BODY)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_each_start_makes_a_new_self_signed_certificate(fake: FakeVllm) -> None:
    serials = set()
    for _ in range(2):
        async with running_epp("--endpoints", fake.address, "--secure-serving") as epp:
            serials.add((await handshake(epp.grpc_port))[0].serial_number)
    assert len(serials) == 2


async def test_cert_path_serves_that_certificate(fake: FakeVllm, tmp_path: Path) -> None:
    ca = make_ca()
    cert_pem, key_pem = ca.issue()
    certs = write_pair(tmp_path / "certs", cert_pem, key_pem)
    flags = ("--endpoints", fake.address, "--secure-serving", "--cert-path", str(certs))
    async with running_epp(*flags, ca_pem=ca.pem) as epp:
        assert (await handshake(epp.grpc_port))[0].serial_number == serial(cert_pem)
        assert await routed_to(epp.stub) == fake.address
        # A client trusting another CA refuses the server.
        with pytest.raises(grpc.aio.AioRpcError):
            await route_over(epp.grpc_port, make_ca("other").pem)


async def test_cert_reload_picks_up_a_rotated_secret(fake: FakeVllm, tmp_path: Path) -> None:
    first_ca, second_ca = make_ca("first"), make_ca("second")
    first = first_ca.issue()
    volume = secret_volume(tmp_path / "tls", *first)
    flags = (
        "--endpoints",
        fake.address,
        "--secure-serving",
        "--cert-path",
        str(volume),
        "--enable-cert-reload",
    )
    async with running_epp(*flags, ca_pem=first_ca.pem) as epp:
        assert await routed_to(epp.stub) == fake.address  # a connection made with the first pair
        second = second_ca.issue()
        secret_volume(volume, *second)  # the kubelet swaps ..data
        # New connections get the new certificate, without a restart.
        assert (await handshake(epp.grpc_port))[0].serial_number == serial(second[0])
        assert await route_over(epp.grpc_port, second_ca.pem) == fake.address
        with pytest.raises(grpc.aio.AioRpcError):
            await route_over(epp.grpc_port, first_ca.pem)
        # The connection opened before the rotation keeps working.
        assert await routed_to(epp.stub) == fake.address
        assert epp.app.tls is not None and epp.app.tls.certificate_pem == second[0]


async def test_a_half_written_pair_keeps_the_previous_certificate(
    fake: FakeVllm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = make_ca()
    first, second = ca.issue(), ca.issue()
    certs = write_pair(tmp_path / "certs", *first)
    flags = (
        "--endpoints",
        fake.address,
        "--secure-serving",
        "--cert-path",
        str(certs),
        "--enable-cert-reload",
    )
    async with running_epp(*flags, ca_pem=ca.pem) as epp:
        (certs / "tls.crt").write_bytes(second[0])  # the certificate first, the key not yet
        with caplog.at_level(logging.ERROR, logger="epp.tls"):
            assert (await handshake(epp.grpc_port))[0].serial_number == serial(first[0])
            assert await route_over(epp.grpc_port, ca.pem) == fake.address
        assert "keeping the previous certificate" in caplog.text
        assert "does not belong" in caplog.text
        (certs / "tls.key").write_bytes(second[1])  # now whole
        assert (await handshake(epp.grpc_port))[0].serial_number == serial(second[0])


async def test_without_cert_reload_the_certificate_is_read_once(fake: FakeVllm, tmp_path: Path) -> None:
    ca = make_ca()
    first = ca.issue()
    certs = secret_volume(tmp_path / "tls", *first)
    async with running_epp(
        "--endpoints", fake.address, "--secure-serving", "--cert-path", str(certs), ca_pem=ca.pem
    ) as epp:
        secret_volume(certs, *ca.issue())
        assert (await handshake(epp.grpc_port))[0].serial_number == serial(first[0])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "cannot read tls.crt"),
        ("no_key", "cannot read tls.key"),
        ("not_pem", "tls.crt holds no PEM certificate"),
        ("bad_key", "tls.key is not an unencrypted PEM private key"),
        ("mismatch", "tls.key does not belong to the first certificate in tls.crt"),
    ],
)
def test_unusable_cert_path_is_a_clear_error(tmp_path: Path, setup: str, message: str) -> None:
    ca = make_ca()
    cert_pem, key_pem = ca.issue()
    certs = tmp_path / "certs"
    if setup != "missing":
        certs.mkdir()
        (certs / "tls.crt").write_bytes(b"hello" if setup == "not_pem" else cert_pem)
        if setup != "no_key":
            other_key = ca.issue()[1]
            (certs / "tls.key").write_bytes(
                {"bad_key": b"-----BEGIN PRIVATE KEY-----\nxx\n", "mismatch": other_key}.get(setup, key_pem)
            )
    with pytest.raises(TlsConfigError) as err:
        load_key_pair(certs)
    assert str(err.value).startswith(f"--cert-path {certs}: {message}")


def test_the_epp_command_refuses_a_missing_certificate_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--endpoints", "127.0.0.1:1", "--cert-path", "/nonexistent/certs"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "epp: error: --cert-path /nonexistent/certs: cannot read tls.crt: No such file or directory"
    )


# -- --tls-min-version ------------------------------------------------------------------------------


async def test_tls_min_version_12_is_what_grpc_serves(fake: FakeVllm) -> None:
    async with running_epp(
        "--endpoints", fake.address, "--secure-serving", "--tls-min-version", "1.2"
    ) as epp:
        _, version, _ = await handshake(epp.grpc_port, client_context(max_tls12=True))
        assert version == "TLSv1.2"
        _, version, _ = await handshake(epp.grpc_port, client_context(min_tls13=True))
        assert version == "TLSv1.3"


def test_tls_min_version_13_cannot_be_enforced_and_refuses_to_start() -> None:
    settings = parse_settings(["--endpoints", "127.0.0.1:1", "--tls-min-version", "1.3"])
    with pytest.raises(TlsConfigError, match=r"--tls-min-version 1\.3: cannot be enforced"):
        App(settings)


async def test_tls_min_version_in_go_spelling_from_the_command_line(fake: FakeVllm) -> None:
    async with running_epp(
        "--endpoints", fake.address, "--secure-serving", "--tls-min-version=VersionTLS12"
    ) as epp:
        assert epp.app.tls is not None
    with pytest.raises(TlsConfigError, match="cannot be enforced"):
        App(parse_settings(["--endpoints", "127.0.0.1:1", "--tls-min-version", "VersionTLS13"]))


def test_tls_min_version_in_go_spelling() -> None:
    assert check_min_version("VersionTLS12") == []
    assert check_min_version("") == []
    assert check_min_version("VersionTLS10") == [
        "--tls-min-version VersionTLS10: gRPC never negotiates below TLS 1.2, so the minimum is TLS 1.2"
    ]
    with pytest.raises(TlsConfigError, match="cannot be enforced"):
        check_min_version("VersionTLS13")
    with pytest.raises(TlsConfigError, match="use one of"):
        check_min_version("TLS1.2")


# -- --tls-cipher-suites ---------------------------------------------------------------------------


def test_go_cipher_suite_names_are_translated() -> None:
    suites = cipher_suites(["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"])
    assert suites.value == "ECDHE-RSA-AES128-GCM-SHA256"
    assert suites.warnings == (
        "--tls-cipher-suites: TLS_AES_128_GCM_SHA256: TLS 1.3 suites are not configurable (as in Go); "
        "the list applies to TLS 1.2",
    )
    with pytest.raises(TlsConfigError, match="unknown cipher suite 'ECDHE-RSA-AES128-GCM-SHA256'"):
        cipher_suites(["ECDHE-RSA-AES128-GCM-SHA256"])  # an OpenSSL name, not Go's
    with pytest.raises(
        TlsConfigError, match="TLS_RSA_WITH_RC4_128_SHA is not available in gRPC's TLS library"
    ):
        cipher_suites(["TLS_RSA_WITH_RC4_128_SHA"])


async def test_cipher_suites_restrict_tls12_in_the_epp_command(fake: FakeVllm, tmp_path: Path) -> None:
    async with epp_command(
        tmp_path, "--endpoints", fake.address, "--tls-cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    ) as epp:
        await epp.wait_serving()
        _, version, cipher = await handshake(epp.grpc_port, client_context(max_tls12=True))
        assert (version, cipher) == ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(
                epp.grpc_port, client_context(max_tls12=True, ciphers="ECDHE-RSA-AES256-GCM-SHA384")
            )
        _, version, _ = await handshake(epp.grpc_port, client_context(min_tls13=True))
        assert version == "TLSv1.3"  # TLS 1.3 suites are not configurable, as in Go


async def test_without_cipher_suites_grpcs_defaults_apply(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address, "--secure-serving") as epp:
        ctx = client_context(max_tls12=True, ciphers="ECDHE-RSA-AES256-GCM-SHA384")
        assert (await handshake(epp.grpc_port, ctx))[2] == "ECDHE-RSA-AES256-GCM-SHA384"


def test_cipher_suites_cannot_apply_once_grpc_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CIPHER_SUITES_ENV, raising=False)
    settings = parse_settings(
        ["--endpoints", "127.0.0.1:1", "--tls-cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]
    )
    with pytest.raises(TlsConfigError, match=f"{CIPHER_SUITES_ENV}=ECDHE-RSA-AES128-GCM-SHA256"):
        App(settings)


def test_the_epp_command_refuses_an_unknown_cipher_suite() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--endpoints", "127.0.0.1:1", "--tls-cipher-suites", "TLS_NOPE"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert "epp: error: --tls-cipher-suites: unknown cipher suite 'TLS_NOPE'" in result.stderr


def test_importing_epp_tls_does_not_import_grpc() -> None:
    code = "import sys, epp.tls; print('grpc' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "False", out.stderr


async def test_tls_flags_without_secure_serving_are_warned_about(
    fake: FakeVllm, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="epp.app"):
        async with running_epp(
            "--endpoints", fake.address, "--cert-path", "/x", "--enable-cert-reload"
        ) as epp:
            assert epp.app.tls is None
    assert "--cert-path, --enable-cert-reload: no effect with --secure-serving=false" in caplog.text


async def test_cert_reload_without_cert_path_is_warned_about(
    fake: FakeVllm, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="epp.app"):
        async with running_epp("--endpoints", fake.address, "--secure-serving", "--enable-cert-reload"):
            pass
    assert "--enable-cert-reload has no effect without --cert-path" in caplog.text

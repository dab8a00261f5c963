"""Certificates made for the tests, what a server presents, and `python -m epp` as a subprocess."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Ca:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        *,
        client: bool = False,
        ecdsa: bool = False,
        common_name: str = "epp",
    ) -> tuple[bytes, bytes]:
        """A leaf signed by this CA: (chain PEM, key PEM)."""
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if ecdsa else rsa.generate_private_key(65537, 2048)
        )
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = _builder(common_name, self.cert.subject, key).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _builder(
    common_name: str, issuer: x509.Name, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str = "test-ca") -> Ca:
    key = rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key)


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert_pem)
    (directory / "tls.key").write_bytes(key_pem)
    return directory


def secret_volume(directory: Path, cert_pem: bytes, key_pem: bytes) -> Path:
    """Write the pair as the kubelet writes a Secret volume: files in a timestamped directory, an
    atomically swapped `..data` symlink to it, and `tls.crt` / `tls.key` symlinks through `..data`."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.time_ns()}"
    write_pair(version, cert_pem, key_pem)
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")  # the atomic swap
    for name in ("tls.crt", "tls.key"):
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    return directory


def serial(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


def client_context(
    *,
    max_tls12: bool = False,
    min_tls13: bool = False,
    ciphers: str | None = None,
    ca_pem: bytes | None = None,
    client_pair: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """A TLS client offering h2, verifying against `ca_pem` when given (else not at all)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode())
    if max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if min_tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if client_pair is not None:
        ctx.load_cert_chain(client_pair[0], client_pair[1])
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext | None = None) -> tuple[x509.Certificate, str, str]:
    """A TLS handshake with 127.0.0.1:port: the certificate presented, the version and the cipher.
    Raises ssl.SSLError / ConnectionError when the server refuses."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx or client_context()), 10
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der), tls.version(), tls.cipher()[0]
    finally:
        writer.transport.abort()  # no TLS close_notify exchange: the server may not answer one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def health_status(port: int, service: str = "readiness") -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


@dataclass
class EppCommand:
    """`python -m epp` running as a subprocess (its stderr collected in `log`)."""

    proc: asyncio.subprocess.Process
    grpc_port: int
    health_port: int
    metrics_port: int
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"epp exited with {self.proc.returncode}:\n{self.log}")
            try:
                if await health_status(self.health_port, "readiness") == "SERVING":
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"epp not serving after {timeout}s:\n{self.log}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


@asynccontextmanager
async def epp_command(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> AsyncIterator[EppCommand]:
    """Start `python -m epp` on free loopback ports with `flags`; killed on the way out if still running."""
    ports = [free_port() for _ in range(3)]
    log_path = tmp_path / f"epp-{ports[0]}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "epp",
            "--grpc-port",
            str(ports[0]),
            "--grpc-health-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--bind-address",
            "127.0.0.1",
            *flags,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            env={**os.environ, **(env or {})},
        )
    running = EppCommand(proc, ports[0], ports[1], ports[2], log_path)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

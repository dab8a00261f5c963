"""TLS for the ext_proc server, as the Go EPP serves it, within what grpcio's Python API allows.

- `--secure-serving` (default true): without `--cert-path` a self-signed certificate is made at
  start (the Go EPP does the same: it is for encryption, not identity; gateways that talk to
  the EPP skip verification). epp's is RSA 2048 (Go's is RSA 4096, which takes about a second
  to generate in Python), valid for ten years, organisation "Inference Ext", and, unlike Go's,
  it names localhost, this host and the loopback addresses, so a local client can verify it.
- `--cert-path DIR`: DIR/tls.crt (the chain, leaf first) and DIR/tls.key, checked at start (a
  missing file, a bad PEM or a key that does not match the certificate is an error).
- `--enable-cert-reload`: gRPC asks for the certificate at every TLS handshake (its dynamic
  credentials); epp re-reads the files when their inode, size or mtime changed, which covers a
  Kubernetes Secret volume's atomic symlink swap. A pair that does not load (say the key is
  written after the certificate) is logged and the previous one stays in use until the files
  change again. Connections already open keep the certificate they were made with.
- `--tls-cipher-suites` (Go names): mapped to gRPC's TLS library (BoringSSL) names and handed to
  gRPC through `GRPC_SSL_CIPHER_SUITES`, which gRPC reads once, when `grpc` is first imported.
  The `epp` command sets it before importing gRPC (`export_cipher_suites`); an `App` built in a
  process where gRPC was imported first cannot apply the flag and refuses to start. As in Go,
  the list governs TLS 1.2 only (TLS 1.3 suites are not configurable); Go names gRPC's library
  lacks (RC4, 3DES with ECDHE, CBC-SHA256 without ECDHE) are an error. The variable also applies
  to gRPC clients in the same process.
- `--tls-min-version`: grpcio's Python API has no minimum-version setting for servers (gRPC
  negotiates TLS 1.2 and 1.3). A minimum of 1.2 or lower is therefore what epp serves anyway
  (gRPC never speaks TLS 1.0 or 1.1); a minimum of TLS 1.3 cannot be enforced and is an error
  at start rather than a silently weaker server.

This module does not import grpc at load time, so `export_cipher_suites` can run before it.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epp.errors import ConfigError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

CIPHER_SUITES_ENV = "GRPC_SSL_CIPHER_SUITES"
SELF_SIGNED_ORGANIZATION = "Inference Ext"  # the Go EPP's
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)


class TlsConfigError(ConfigError):
    """TLS settings or certificate files that cannot be used; the message names which and why."""


# -- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate chain (leaf first) and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _default_hosts() -> list[str]:
    hosts = ["localhost", "127.0.0.1", "::1"]
    name = socket.gethostname()
    if name and name not in hosts:
        hosts.append(name)
    return hosts


def self_signed(hosts: Iterable[str] = ()) -> KeyPair:
    """A fresh self-signed server certificate and key, as the Go EPP makes when no --cert-path is
    given. `hosts` (DNS names or IP addresses) go into its subjectAltName, after localhost, the
    loopback addresses and this host's name."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*_default_hosts(), *hosts]:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ORGANIZATION)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a client's clock skew
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_key_pair(cert_dir: Path, flag: str = "--cert-path") -> KeyPair:
    """DIR/tls.crt and DIR/tls.key, checked: readable, PEM, and the key belongs to the certificate."""
    cert_file, key_file = cert_dir / "tls.crt", cert_dir / "tls.key"
    blobs: dict[Path, bytes] = {}
    for path in (cert_file, key_file):
        try:
            blobs[path] = path.read_bytes()
        except OSError as exc:
            raise TlsConfigError(
                f"{flag} {cert_dir}: cannot read {path.name}: {exc.strerror or exc}"
            ) from None
    try:
        certs = x509.load_pem_x509_certificates(blobs[cert_file])
    except ValueError:
        raise TlsConfigError(f"{flag} {cert_dir}: tls.crt holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(blobs[key_file], password=None)
    except (ValueError, TypeError) as exc:
        raise TlsConfigError(
            f"{flag} {cert_dir}: tls.key is not an unencrypted PEM private key ({exc})"
        ) from None
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise TlsConfigError(
            f"{flag} {cert_dir}: tls.key does not belong to the first certificate in tls.crt"
        )
    return KeyPair(blobs[cert_file], blobs[key_file])


def _files_stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int], ...] | None:
    """What changes when a file is rewritten or swapped (symlinks followed); None if one is missing."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class CertReloader:
    """The certificate of --cert-path, re-read when its files change. `fetch` is gRPC's
    certificate_configuration_fetcher: gRPC calls it on one of its own threads at every TLS
    handshake; it returns a new configuration after a change, None to keep the current one."""

    def __init__(self, cert_dir: Path, initial: KeyPair) -> None:
        self.cert_dir = cert_dir
        self._paths = (cert_dir / "tls.crt", cert_dir / "tls.key")
        self._lock = threading.Lock()
        self._stamp = _files_stamp(self._paths)
        self._failed_stamp: object = None
        self.current = initial
        self.reloads = 0

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        import grpc

        stamp = _files_stamp(self._paths)
        if stamp is None or stamp == self._stamp or stamp == self._failed_stamp:
            return None
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                pair = load_key_pair(self.cert_dir)
            except TlsConfigError as exc:
                self._failed_stamp = stamp  # logged once per change, retried when the files change again
                log.error("certificate reload failed, keeping the previous certificate: %s", exc)
                return None
            self._stamp, self.current = stamp, pair
            self.reloads += 1
        log.info(
            "reloaded the TLS certificate from %s (serial %x)", self.cert_dir, pair.certificate.serial_number
        )
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])


# -- TLS versions and cipher suites ---------------------------------------------------------------

# --tls-min-version as epp's flag spells it ("1.2") and as the Go EPP's does ("VersionTLS12").
_TLS_VERSIONS = {
    "1.0": (1, 0),
    "1.1": (1, 1),
    "1.2": (1, 2),
    "1.3": (1, 3),
    "VersionTLS10": (1, 0),
    "VersionTLS11": (1, 1),
    "VersionTLS12": (1, 2),
    "VersionTLS13": (1, 3),
}


def check_min_version(text: str) -> list[str]:
    """Warnings for a --tls-min-version that gRPC serves anyway; TlsConfigError for one it cannot
    enforce (TLS 1.3: grpcio's Python server credentials take no version bounds)."""
    if not text:
        return []
    version = _TLS_VERSIONS.get(text)
    if version is None:
        raise TlsConfigError(
            f"--tls-min-version {text!r}: use one of 1.2, 1.3 (or Go's VersionTLS12, VersionTLS13)"
        )
    if version >= (1, 3):
        raise TlsConfigError(
            f"--tls-min-version {text}: cannot be enforced: grpcio's Python API sets no minimum TLS "
            "version for servers, and gRPC accepts TLS 1.2 and 1.3; drop the flag (TLS 1.2 is the "
            "minimum epp serves) or terminate TLS in front of epp"
        )
    if version < (1, 2):
        return [f"--tls-min-version {text}: gRPC never negotiates below TLS 1.2, so the minimum is TLS 1.2"]
    return []


# Go crypto/tls suite names -> BoringSSL's names (what GRPC_SSL_CIPHER_SUITES takes). None: a TLS
# 1.3 suite, always enabled and not configurable (in Go too). Absent from the BoringSSL build in
# grpcio, so refused: RC4 suites, ECDHE with 3DES, and TLS_RSA_WITH_AES_128_CBC_SHA256.
GO_CIPHER_SUITES: Mapping[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",  # Go's older alias
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
}
_GO_ONLY_CIPHER_SUITES = frozenset(
    {
        "TLS_RSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA256",
    }
)


@dataclass(frozen=True)
class CipherSuites:
    """--tls-cipher-suites, translated: the GRPC_SSL_CIPHER_SUITES value (None: leave gRPC's
    defaults) and warnings about names that have no effect."""

    value: str | None
    warnings: tuple[str, ...] = ()


def cipher_suites(names: Sequence[str]) -> CipherSuites:
    """TlsConfigError names the first unknown or unsupported suite."""
    chosen: list[str] = []
    tls13: list[str] = []
    for name in names:
        if name in _GO_ONLY_CIPHER_SUITES:
            raise TlsConfigError(
                f"--tls-cipher-suites: {name} is not available in gRPC's TLS library (BoringSSL)"
            )
        if name not in GO_CIPHER_SUITES:
            raise TlsConfigError(
                f"--tls-cipher-suites: unknown cipher suite {name!r} (use Go crypto/tls names, "
                "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
            )
        boring = GO_CIPHER_SUITES[name]
        if boring is None:
            tls13.append(name)
        elif boring not in chosen:
            chosen.append(boring)
    warnings = []
    if tls13:
        warnings.append(
            f"--tls-cipher-suites: {', '.join(tls13)}: TLS 1.3 suites are not configurable (as in Go); "
            "the list applies to TLS 1.2"
        )
    if names and not chosen:
        warnings.append(
            "--tls-cipher-suites names no TLS 1.2 suite: gRPC's default TLS 1.2 suites stay in use"
        )
    return CipherSuites(":".join(chosen) or None, tuple(warnings))


@dataclass
class _Export:
    value: str | None = None
    too_late: bool = False
    done: bool = field(default=False)


_export = _Export()


def export_cipher_suites(
    names: Sequence[str], enabled: bool = True, environ: MutableMapping[str, str] | None = None
) -> None:
    """Set GRPC_SSL_CIPHER_SUITES for --tls-cipher-suites. gRPC reads it once, when `grpc` is first
    imported: call this before that (the `epp` command does). Invalid names are left for the App
    to report (it calls `cipher_suites_in_effect`)."""
    env = os.environ if environ is None else environ
    if not enabled or not names:
        return
    try:
        value = cipher_suites(names).value
    except TlsConfigError:
        return
    if value is None:
        return
    previous = env.get(CIPHER_SUITES_ENV)
    if previous and previous != value:
        log.warning("--tls-cipher-suites overrides %s=%s", CIPHER_SUITES_ENV, previous)
    env[CIPHER_SUITES_ENV] = value
    _export.value, _export.too_late, _export.done = value, "grpc" in sys.modules, True


def cipher_suites_in_effect(names: Sequence[str], environ: Mapping[str, str] | None = None) -> CipherSuites:
    """The translated --tls-cipher-suites, after checking that gRPC picked them up; TlsConfigError
    when it cannot have (gRPC was imported before GRPC_SSL_CIPHER_SUITES was set)."""
    env = os.environ if environ is None else environ
    suites = cipher_suites(names)
    if suites.value is None:
        return suites
    late = _export.done and _export.value == suites.value and _export.too_late
    if env.get(CIPHER_SUITES_ENV) != suites.value or late:
        raise TlsConfigError(
            "--tls-cipher-suites cannot take effect: gRPC reads its cipher list once, when it is "
            "first imported, and this process imported gRPC before the list was set. The epp "
            "command sets it in time; a program that embeds epp must set "
            f"{CIPHER_SUITES_ENV}={suites.value} in the environment before importing grpc"
        )
    return suites


# -- the ext_proc server's credentials -------------------------------------------------------------


@dataclass
class ServingTls:
    """What the ext_proc server presents: its credentials, the certificate it starts with, and
    the reloader when --enable-cert-reload watches --cert-path."""

    credentials: grpc.ServerCredentials
    key_pair: KeyPair
    self_signed: bool
    reloader: CertReloader | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def certificate_pem(self) -> bytes:
        """The certificate served now (after any reload)."""
        return (self.reloader.current if self.reloader else self.key_pair).cert_pem


def serving_tls(
    cert_path: Path | None,
    *,
    enable_cert_reload: bool = False,
    min_version: str = "",
    cipher_suite_names: Sequence[str] = (),
    hosts: Iterable[str] = (),
) -> ServingTls:
    """The ext_proc server's TLS from the Go EPP's flags. TlsConfigError for what cannot be served;
    `warnings` lists what is accepted but has no effect (each to be logged at start)."""
    import grpc

    warnings = check_min_version(min_version)
    warnings += cipher_suites_in_effect(cipher_suite_names).warnings
    if cert_path is None:
        pair = self_signed(hosts)
        if enable_cert_reload:
            warnings.append(
                "--enable-cert-reload has no effect without --cert-path "
                "(the self-signed certificate never changes)"
            )
        creds = grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)])
        return ServingTls(creds, pair, True, None, warnings)
    pair = load_key_pair(cert_path)
    if not enable_cert_reload:
        return ServingTls(
            grpc.ssl_server_credentials([(pair.key_pem, pair.cert_pem)]), pair, False, None, warnings
        )
    reloader = CertReloader(cert_path, pair)
    creds = grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)]), reloader.fetch
    )
    return ServingTls(creds, pair, False, reloader, warnings)

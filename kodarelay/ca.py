"""The inspection CA: one certificate authority per run, and a leaf per inspected host.

Minting needs ``cryptography``, which the base install does not bring (this package sits in
other people's runtimes): ``pip install 'kodarelay[inspect]'``. Without it, asking for
inspection fails with one line naming that extra (``InspectionUnavailable``).

Choices where the SPEC is silent:

* the CA and its leaves are ECDSA P-256 (cheap to mint, accepted by every TLS client); one
  leaf key serves every host of a CA, so a new host costs one signature, not a key;
* a leaf is valid from an hour before it is minted (clock skew) until at most the CA's own
  end, and never longer than 90 days; leaves are cached per host (1,024, least recently
  used first out);
* the CA's key is kept in memory; it reaches a disk only when the user names a directory
  (``in_dir``: ``ca.pem`` 0644, ``ca-key.pem`` 0600, made on first use);
* leaves are loaded into OpenSSL through an anonymous memory file (``memfd``), never a
  file on disk.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cabundle import system_bundle

log = logging.getLogger(__name__)

EXTRA = "kodarelay[inspect]"
LEAF_CACHE = 1024
LEAF_DAYS = 90


class InspectionUnavailable(RuntimeError):
    """Inspection was asked for, but what minting needs is not installed."""


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise InspectionUnavailable(
            f"TLS inspection needs the 'cryptography' package: pip install '{EXTRA}'") from None
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: Any) -> bytes:
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes) -> None:
    """Load a PEM (certificates then key) into ``ctx`` without writing it to a disk."""
    fd = os.memfd_create("kodarelay-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class CertificateAuthority:
    """A CA that signs a leaf for each host a run inspects (see the module docstring)."""

    def __init__(self, cert: Any, key: Any) -> None:
        x509, hashes, serialization, ec, NameOID, _ = _crypto()
        self._cert = cert
        self._key = key
        self._cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = _pem_key(self._leaf_key)
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._engine_leaves: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.name!r} until {self.not_after.isoformat()}>"

    # ── making one ──────────────────────────────────────────────────────────

    @classmethod
    def generate(cls, name: str = "kodarelay", days: int = 365) -> CertificateAuthority:
        """A new CA (ECDSA P-256) named ``name``, valid ``days`` from now; its key stays in memory."""
        x509, hashes, _, ec, NameOID, _ = _crypto()
        if days < 1:
            raise ValueError(f"days must be >= 1, not {days!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kodarelay inspection CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> CertificateAuthority:
        """The CA in ``cert_path`` (PEM) with its key in ``key_path`` (PEM, unencrypted)."""
        x509, _, serialization, _, _, _ = _crypto()
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        return cls(cert, key)

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str], name: str = "kodarelay",
               days: int = 365) -> CertificateAuthority:
        """The CA kept in ``directory`` (``ca.pem`` + ``ca-key.pem``), made there on first use."""
        d = Path(directory)
        cert_path, key_path = d / "ca.pem", d / "ca-key.pem"
        if cert_path.exists() and key_path.exists():
            return cls.load(cert_path, key_path)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = cls.generate(name, days)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(_pem_key(ca._key))
        cert_path.write_bytes(ca.cert_pem)
        cert_path.chmod(0o644)
        log.info("made an inspection CA in %s", d)
        return ca

    # ── what clients trust ──────────────────────────────────────────────────

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    @property
    def name(self) -> str:
        _, _, _, _, NameOID, _ = _crypto()
        attrs = self._cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    @property
    def not_after(self) -> datetime.datetime:
        return self._cert.not_valid_after_utc  # type: ignore[no-any-return]

    def write_bundle(self, path: str | os.PathLike[str], extra: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """Write one PEM file every client can trust: the system's roots, ``extra``, then
        this CA (mode 0644; the key is never written)."""
        parts: list[bytes] = []
        base = system_bundle()
        for p in ([base] if base else []) + [os.fspath(e) for e in extra]:
            data = Path(p).read_bytes()
            parts.append(data if data.endswith(b"\n") else data + b"\n")
        parts.append(self._cert_pem)
        out = Path(path)
        out.write_bytes(b"".join(parts))
        out.chmod(0o644)
        return out

    # ── leaves ──────────────────────────────────────────────────────────────

    def leaf_pem(self, host: str) -> bytes:
        """A leaf certificate for ``host`` (SAN: its DNS name or IP address), PEM."""
        x509, hashes, serialization, _, NameOID, ExtendedKeyUsageOID = _crypto()
        try:
            san: Any = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            san = x509.DNSName(host)
        now = _now()
        until = min(now + datetime.timedelta(days=LEAF_DAYS), self.not_after)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64] or "-")]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def engine_context(self, host: str) -> Any:
        """``leaf_context`` for the engine's inspected tunnels: an OpenSSL context of the
        compiled engine's own (the key is handed over in memory, never a file), cached."""
        from . import _relay  # type: ignore[attr-defined]

        host = host.lower()
        with self._lock:
            ctx = self._engine_leaves.get(host)
            if ctx is not None:
                self._engine_leaves.move_to_end(host)
                return ctx
        ctx = _relay.tls_server_context(self.leaf_pem(host) + self._cert_pem + self._leaf_key_pem)
        with self._lock:
            self._engine_leaves[host] = ctx
            while len(self._engine_leaves) > LEAF_CACHE:
                self._engine_leaves.popitem(last=False)
        return ctx

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting ``host``'s leaf (ALPN ``http/1.1`` only), minted
        once and cached."""
        host = host.lower()
        with self._lock:
            ctx = self._leaves.get(host)
            if ctx is not None:
                self._leaves.move_to_end(host)
                return ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        _load_chain(ctx, self.leaf_pem(host) + self._cert_pem + self._leaf_key_pem)
        with self._lock:
            self._leaves[host] = ctx
            while len(self._leaves) > LEAF_CACHE:
                self._leaves.popitem(last=False)
        return ctx


def origin_context(upstream_ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """How inspected origins are verified: chain and name, against ``upstream_ca`` when
    given, else the system's store; ALPN ``http/1.1``."""
    ctx = ssl.create_default_context(cafile=os.fspath(upstream_ca) if upstream_ca is not None else None)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


__all__ = ["CertificateAuthority", "InspectionUnavailable", "origin_context"]

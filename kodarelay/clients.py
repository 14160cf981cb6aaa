"""Many sandboxes, one proxy: named clients with their own rules and limits.

A client is named by the ``Proxy-Authorization: Basic`` user (SOCKS5: the RFC 1929 user).
When its ``ClientPolicy`` has ``token_sha256``, the password's SHA-256 (hex) must match it
(compared in constant time; the policy holds no secret), else the request is refused
``unauthenticated`` (``407`` with ``Proxy-Authenticate``, SOCKS5 auth status 0x01). With
``require_auth`` a request that names no known client is refused the same way; without it,
it gets the global rules. A client's ``allow`` / ``deny`` add to the global filter: global
denies and the address guard still apply.

Limits, per client (``429`` / SOCKS5 REP 0x02, other clients unaffected):

* ``max_tunnels``: open tunnels plus forwarded requests in flight (``too_many_tunnels``);
* ``rate`` / ``burst``: new tunnels and requests per second, a token bucket holding at most
  ``burst`` (default: ``rate``, at least 1) (``rate_limited``);
* ``upload_bytes`` per ``upload_period``: client-to-origin bytes, charged as each tunnel or
  request ends; once past it, new tunnels are refused (``upload_budget``) until the period
  that began with the first byte charged is over, and the client's open tunnels are closed.

Choices where the SPEC is silent: a client's name is its Basic user exactly (case kept); an
empty user names no client; the period is a window that starts with its first charge.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .filter import Filter

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def token_sha256(token: str) -> str:
    """The hex SHA-256 a ``ClientPolicy`` names for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ClientPolicy:
    """One client's rules (added to the global ones), credential hash and limits."""

    name: str
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    token_sha256: str | None = None
    max_tunnels: int | None = None
    rate: float | None = None
    burst: float | None = None
    upload_bytes: int | None = None
    upload_period: float = 3600.0
    filter: Filter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (not isinstance(self.name, str) or not 1 <= len(self.name) <= 100 or ":" in self.name
                or any(not "!" <= c <= "~" for c in self.name)):
            raise ValueError(f"a client's name is 1-100 visible ASCII characters without ':', not {self.name!r}")
        if isinstance(self.allow, str) or isinstance(self.deny, str):
            raise TypeError("allow and deny take an iterable of patterns, not a single str")
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))
        object.__setattr__(self, "filter", Filter(self.allow, self.deny))     # PatternError names a bad one
        if self.token_sha256 is not None:
            digest = self.token_sha256.lower().removeprefix("sha256:")
            if not _HEX64.match(digest):
                raise ValueError(f"client {self.name}: token_sha256 is 64 hex digits (sha256 of the token)")
            object.__setattr__(self, "token_sha256", digest)
        for what in ("max_tunnels", "upload_bytes"):
            v = getattr(self, what)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"client {self.name}: {what} is a count >= 0, not {v!r}")
        for what in ("rate", "burst"):
            v = getattr(self, what)
            if v is not None and not v > 0:
                raise ValueError(f"client {self.name}: {what} must be > 0, not {v!r}")
        if not self.upload_period > 0:
            raise ValueError(f"client {self.name}: upload_period must be > 0")


class ClientRefused(Exception):
    """A client's request refused before any rule: ``unauthenticated`` or a limit."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


#: ``Target.token`` of a SOCKS5 handshake whose RFC 1929 credentials the engine checked already
VERIFIED = "verified-by-the-engine"


class _Client:
    """The running state of one known client (thread-safe: engine and loop threads). While
    the engine's front-end serves (``ClientBook.native``), its counters are the engine's
    (``_clients.pxi``, this logic's C twin): one set for the tunnels either side serves."""

    def __init__(self, policy: ClientPolicy, book: ClientBook | None = None) -> None:
        self.book = book
        self.policy = policy
        self.lock = threading.Lock()
        self.open = 0
        self.tokens = float(self.burst)
        self.refilled = time.monotonic()
        self.window_start: float | None = None
        self.uploaded = 0
        #: closers of the open tunnels (called when the upload budget is spent)
        self.closers: dict[int, Callable[[], None]] = {}

    @property
    def burst(self) -> float:
        p = self.policy
        if p.burst is not None:
            return p.burst
        return max(1.0, p.rate or 1.0)

    def take(self, now: float) -> None:
        """Admit one new tunnel or request (``ClientRefused`` for a limit)."""
        p = self.policy
        native = self.book.native if self.book is not None else None
        if native is not None:
            reason = native.client_take(p.name.encode("ascii"))
            if reason is not None:
                raise ClientRefused(reason, _LIMIT_TEXT[reason].format(p=p))
            return
        with self.lock:
            if p.upload_bytes is not None and self._over_budget(now):
                raise ClientRefused("upload_budget", f"client {p.name} spent its upload budget "
                                    f"({p.upload_bytes} bytes per {p.upload_period:g}s)")
            if p.max_tunnels is not None and self.open >= p.max_tunnels:
                raise ClientRefused("too_many_tunnels", f"client {p.name} has {self.open} open "
                                    f"(at most {p.max_tunnels})")
            if p.rate is not None:
                self.tokens = min(self.burst, self.tokens + (now - self.refilled) * p.rate)
                self.refilled = now
                if self.tokens < 1.0:
                    raise ClientRefused("rate_limited", f"client {p.name} is over {p.rate:g} per second")
                self.tokens -= 1.0
            self.open += 1

    def _over_budget(self, now: float) -> bool:
        p = self.policy
        assert p.upload_bytes is not None
        if self.window_start is not None and now - self.window_start >= p.upload_period:
            self.window_start, self.uploaded = None, 0
        return self.uploaded > p.upload_bytes or (p.upload_bytes == 0 and self.window_start is not None)

    def charge(self, up: int, now: float) -> bool:
        """Count ``up`` client-to-origin bytes; True when that spent the budget."""
        p = self.policy
        if p.upload_bytes is None or up <= 0:
            return False
        with self.lock:
            if self.window_start is None or now - self.window_start >= p.upload_period:
                self.window_start, self.uploaded = now, 0
            self.uploaded += up
            return self.uploaded > p.upload_bytes

    def release(self) -> None:
        with self.lock:
            if self.open > 0:
                self.open -= 1

    def finish(self, up: int, now: float) -> bool:
        """A tunnel or request ended having sent ``up`` bytes to its origin: its slot back,
        the bytes charged; True when that spent the upload budget."""
        native = self.book.native if self.book is not None else None
        if native is not None:
            return bool(native.client_release(self.policy.name.encode("ascii"), max(0, up)))
        self.release()
        return self.charge(up, now)


_LIMIT_TEXT = {
    "upload_budget": "client {p.name} spent its upload budget ({p.upload_bytes} bytes per {p.upload_period:g}s)",
    "too_many_tunnels": "client {p.name} has its {p.max_tunnels} tunnels open",
    "rate_limited": "client {p.name} is over {p.rate:g} per second",
}


class ClientBook:
    """The clients of one server: who is who, their filters and their limits."""

    def __init__(self, clients: Iterable[ClientPolicy] = (), require_auth: bool = False) -> None:
        self.require_auth = bool(require_auth)
        self._clients: dict[str, _Client] = {}
        #: the engine's front-end while it serves (its client table counts for both sides)
        self.native: Any = None
        self.set(clients)

    def set(self, clients: Iterable[ClientPolicy]) -> None:
        """Replace the policies (live); running counts of clients that stay are kept."""
        new: dict[str, _Client] = {}
        for p in clients:
            if not isinstance(p, ClientPolicy):
                raise TypeError(f"clients takes kodarelay.ClientPolicy objects, not {type(p).__name__}")
            if p.name in new:
                raise ValueError(f"two clients named {p.name!r}")
            old = self._clients.get(p.name)
            if old is not None:
                old.policy = p
                new[p.name] = old
            else:
                new[p.name] = _Client(p, self)
        self._clients = new
        self.push()

    def attach(self, native: Any) -> None:
        """The engine's front-end serves from now on (None: it stopped)."""
        self.native = native
        self.push()

    def push(self) -> None:
        """Hand the policies to the engine's client table (see ``_clients.pxi``)."""
        if self.native is None:
            return
        self.native.set_clients([(
            c.policy.name.encode("ascii"),
            bytes.fromhex(c.policy.token_sha256) if c.policy.token_sha256 is not None else None,
            c.policy.max_tunnels if c.policy.max_tunnels is not None else -1,
            c.policy.rate if c.policy.rate is not None else 0.0,
            c.burst,
            c.policy.upload_bytes if c.policy.upload_bytes is not None else -1,
            c.policy.upload_period,
        ) for c in self._clients.values()], self.require_auth)

    @property
    def policies(self) -> Sequence[ClientPolicy]:
        return [c.policy for c in self._clients.values()]

    def get(self, name: str | None) -> _Client | None:
        return self._clients.get(name) if name is not None else None

    def authenticate(self, name: str | None, token_hash: str | None) -> _Client | None:
        """The known client a request names (None: the global rules), or ``ClientRefused``."""
        c = self.get(name)
        if c is None:
            if self.require_auth:
                who = f"client {name!r} is not known" if name else "no client named (Proxy-Authorization)"
                raise ClientRefused("unauthenticated", f"{who}; this proxy requires authentication")
            return None
        want = c.policy.token_sha256
        if token_hash == VERIFIED:
            return c                    # (the engine checked this SOCKS5 password itself)
        if want is not None and (token_hash is None or not hmac.compare_digest(want, token_hash)):
            raise ClientRefused("unauthenticated", f"client {name!r}: wrong or missing token")
        return c

    def filter_for(self, c: _Client | None, base: Filter) -> Filter:
        """The filter a client's requests are judged by: the global rules plus its own."""
        if c is None or (not c.policy.allow and not c.policy.deny):
            return base
        return Filter((*base.allow_patterns, *c.policy.allow), (*base.deny_patterns, *c.policy.deny))


def credentials(value: bytes) -> tuple[str | None, str | None]:
    """``(user, sha256 hex of the password)`` of a ``Basic`` credential, else ``(None, None)``;
    the password itself goes no further."""
    import base64
    import binascii

    scheme, _, tok = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None, None
    try:
        decoded = base64.b64decode(tok.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, sep, password = decoded.partition(":")
    return (user or None), (token_sha256(password) if sep else None)


def parse_size(text: str) -> int:
    """``100M`` / ``1G`` (powers of ten), ``100Mi`` / ``1Gi`` (powers of two), plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?)?[bB]?\s*", text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 100M, 1G, 512Mi)")
    n = float(m.group(1))
    unit = m.group(2) or ""
    power = {"": 0, "k": 1, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1]]
    base = 1024 if unit.endswith("i") else 1000
    return int(n * base ** power)


def parse_period(text: str) -> float:
    """``30s``, ``30m``, ``1h``, ``1d`` (a bare number is seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"not a period: {text!r} (e.g. 30s, 30m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


__all__ = ["ClientBook", "ClientPolicy", "ClientRefused", "credentials", "parse_period", "parse_size",
           "token_sha256"]

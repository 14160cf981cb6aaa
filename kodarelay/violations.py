"""Refusal records: what the proxy refused, when, and why.

Each server keeps the last ``capacity`` records in a ring, readable through
``ProxyHandle.violations()``, and hands each one to an optional ``on_violation`` callback
before the refusal reaches the client. Every refusal is also one ``logging`` line; the host
and port are logged, never a query string or credentials (a CONNECT target has neither).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

#: Reasons a refusal can carry. ``resolve_failed`` (a name that does not resolve: the proxy
#: fails closed) is kodarelay's addition to SPEC's list. Failures to *reach* an allowed
#: target (refused, unreachable, upstream said no) are errors, not refusals, and are not
#: recorded here.
REASONS = (
    "not_allowed",
    "denied",
    "bad_host",
    "resolved_address",
    "bad_request",
    "method_not_allowed",
    "address_type",
    "command",
    "resolve_failed",
    "decider_denied",
    "decider_timeout",
    "decider_error",
    "upstream_refused",
    "needs_inspection",
    "request_not_allowed",
    "request_denied",
    "bad_path",
)


@dataclass(frozen=True)
class Violation:
    """One refused request. ``time`` is epoch seconds; ``protocol`` is "http" or "socks5"."""

    time: float
    protocol: str
    host: str
    port: Optional[int]
    reason: str
    #: who asked (``Proxy-Authorization`` user or SOCKS5 username), None when absent
    client: Optional[str] = None
    #: more about the reason (e.g. "upstream refused (403)"), never a path or query
    detail: Optional[str] = None
    #: the refused request's method and path (never its query), for request rules
    method: Optional[str] = None
    path: Optional[str] = None


OnViolation = Callable[[Violation], None]


class ViolationLog:
    """A bounded, thread-safe ring of ``Violation`` records."""

    def __init__(self, capacity: int = 1024, on_violation: OnViolation | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"violation_capacity must be >= 0, not {capacity!r}")
        self._ring: collections.deque[Violation] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._on_violation = on_violation
        #: every refusal counted, the ones whose details were lost (``count_unrecorded``) too
        self.total = 0

    def record(self, protocol: str, host: str, port: int | None, reason: str, client: str | None = None,
               detail: str | None = None, when: float | None = None, method: str | None = None,
               path: str | None = None) -> Violation:
        """Store, log and announce one refusal; returns the record. ``when``: the refusal's
        own time when it is recorded later (the engine's batches), else now."""
        v = Violation(time.time() if when is None else when, protocol, _printable(host), port, reason,
                      None if client is None else _printable(client, 100), detail, method,
                      None if path is None else _printable(path, 300))
        with self._lock:
            self._ring.append(v)
            self.total += 1
        log.info("refused %s %s:%s (%s)%s", protocol, v.host, port if port is not None else "-",
                 f"{reason}: {detail}" if detail else reason,
                 f" for {v.client}" if v.client is not None else "")
        if self._on_violation is not None:
            try:
                self._on_violation(v)
            except Exception:
                log.exception("on_violation callback failed")
        return v

    def count_unrecorded(self, n: int) -> None:
        """``n`` refusals happened whose details were lost (they came faster than they could be
        recorded): never in the ring, but always in ``total``, so no summary undercounts."""
        if n > 0:
            with self._lock:
                self.total += n

    def snapshot(self) -> list[Violation]:
        with self._lock:
            return list(self._ring)

    def __len__(self) -> int:
        return len(self._ring)


def _escaped(c: str) -> str:
    if c.isascii() and c.isprintable() and c != " ":
        return c
    return f"\\x{ord(c):02x}" if ord(c) <= 0xFF else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def _printable(host: str, limit: int = 300) -> str:
    """A host as a client sent it, made safe for logs and summaries: control bytes, whitespace
    and anything beyond printable ASCII escaped (``\\x20``), so a "name" of spaces and text
    cannot pass for a line of the summary; length capped."""
    if host.isascii() and host.isprintable() and " " not in host:
        text = host
    else:
        text = "".join(_escaped(c) for c in host)
    return text if len(text) <= limit else text[:limit] + "..."

"""The addresses of this host's own interfaces, for the resolved-address guard.

A service listening on the host's public address is as much "the host" as one on loopback:
with ``--learn`` or ``--allow 0.0.0.0/0`` it answered a sandboxed client. The guard refuses
these addresses unless an IP / CIDR rule names them. They are read from ``/proc/net``
(``fib_trie``'s LOCAL entries for IPv4, ``if_inet6`` for IPv6) of the proxy's own network
namespace, and re-read at most every ``REFRESH`` seconds, so an address added at run time is
guarded within that. Where ``/proc`` cannot be read the set is empty (the other ranges of the
guard still apply).
"""

from __future__ import annotations

import ipaddress
import threading
import time

REFRESH = 2.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_lock = threading.Lock()
_cached: tuple[float, frozenset[IPAddress]] = (float("-inf"), frozenset())


def _ipv4_local(text: str) -> set[IPAddress]:
    """``fib_trie``: a ``|-- a.b.c.d`` line followed by ``/32 host LOCAL`` is an own address."""
    out: set[IPAddress] = set()
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            last = stripped[4:]
        elif last is not None and stripped.startswith("/32") and stripped.endswith("LOCAL"):
            try:
                out.add(ipaddress.IPv4Address(last))
            except ValueError:
                pass
    return out


def _ipv6_local(text: str) -> set[IPAddress]:
    out: set[IPAddress] = set()
    for line in text.splitlines():
        field = line.split(" ", 1)[0]
        if len(field) == 32:
            try:
                out.add(ipaddress.IPv6Address(int(field, 16)))
            except ValueError:
                pass
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def own_addresses() -> frozenset[IPAddress]:
    """Every address of this host's interfaces (loopback included), as of the last
    ``REFRESH`` seconds."""
    global _cached
    now = time.monotonic()
    at, addrs = _cached
    if now - at < REFRESH:
        return addrs
    with _lock:
        at, addrs = _cached
        if now - at < REFRESH:
            return addrs
        addrs = frozenset(_ipv4_local(_read("/proc/net/fib_trie")) | _ipv6_local(_read("/proc/net/if_inet6")))
        _cached = (now, addrs)
        return addrs


__all__ = ["own_addresses"]

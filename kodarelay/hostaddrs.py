"""The addresses of this host's own interfaces, for the resolved-address guard.

A service listening on the host's public address is as much "the host" as one on loopback:
with ``--learn`` or ``--allow 0.0.0.0/0`` it answered a sandboxed client. The guard refuses
these addresses unless an IP / CIDR rule names them. They are read from ``/proc/net`` of the
proxy's own network namespace: ``fib_trie``'s LOCAL entries for IPv4, ``ipv6_route``'s local
routes and ``if_inet6`` for IPv6. A LOCAL entry wider than one address (``ip route add local
10.9.0.0/16 dev lo``, "AnyIP": the host answers on every address in it) counts whole. The
set is re-read at most every ``REFRESH`` seconds, so an address added at run time is guarded
within that. Where ``/proc`` cannot be read the set is empty (the other ranges of the guard
still apply).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Iterable

REFRESH = 2.0
#: ``ipv6_route`` flags: a route of type local (RTF_LOCAL)
_RTF_LOCAL = 0x80000000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HostAddresses:
    """This host's own addresses, and its local ranges wider than one address: ``addr in it``."""

    __slots__ = ("addresses", "ranges")

    def __init__(self, addresses: Iterable[IPAddress] = (), ranges: Iterable[IPNetwork] = ()) -> None:
        self.addresses = frozenset(addresses)
        self.ranges = tuple(ranges)

    def __contains__(self, addr: object) -> bool:
        if addr in self.addresses:
            return True
        if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        return any(n.version == addr.version and addr in n for n in self.ranges)

    def __repr__(self) -> str:
        return f"HostAddresses({sorted(map(str, self.addresses))}, {[str(n) for n in self.ranges]})"


def _local_entries(text: str, split: bool) -> tuple[set[IPAddress], set[IPNetwork]]:
    """(addresses, ranges) from local entries: ``fib_trie`` (``|-- a.b.c.d`` followed by
    ``/N host LOCAL``) when ``split`` is False, else ``ipv6_route`` lines."""
    addrs: set[IPAddress] = set()
    nets: set[IPNetwork] = set()
    if split:
        for line in text.splitlines():
            f = line.split()
            if len(f) < 9 or len(f[0]) != 32:
                continue
            try:
                if not int(f[8], 16) & _RTF_LOCAL:
                    continue
                net = ipaddress.IPv6Network((int(f[0], 16), int(f[1], 16)), strict=False)
            except ValueError:
                continue
            if net.prefixlen == 128:
                addrs.add(net.network_address)
            else:
                nets.add(net)
        return addrs, nets
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            last = stripped[4:]
        elif last is not None and stripped.startswith("/") and stripped.endswith("host LOCAL"):
            try:
                net4 = ipaddress.IPv4Network(f"{last}{stripped.split()[0]}", strict=False)
            except ValueError:
                continue
            if net4.prefixlen == 32:
                addrs.add(net4.network_address)
            else:
                nets.add(net4)
    return addrs, nets


def _ipv6_interfaces(text: str) -> set[IPAddress]:
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


def read_host_addresses() -> HostAddresses:
    """This host's own addresses and local ranges, read now."""
    a4, n4 = _local_entries(_read("/proc/net/fib_trie"), split=False)
    a6, n6 = _local_entries(_read("/proc/net/ipv6_route"), split=True)
    return HostAddresses(a4 | a6 | _ipv6_interfaces(_read("/proc/net/if_inet6")), n4 | n6)


_lock = threading.Lock()
_cached: tuple[float, HostAddresses] = (float("-inf"), HostAddresses())


def own_addresses() -> HostAddresses:
    """Every address of this host's interfaces (loopback included) and its local ranges, as of
    the last ``REFRESH`` seconds."""
    global _cached
    now = time.monotonic()
    at, addrs = _cached
    if now - at < REFRESH:
        return addrs
    with _lock:
        at, addrs = _cached
        if now - at < REFRESH:
            return addrs
        addrs = read_host_addresses()
        _cached = (now, addrs)
        return addrs


__all__ = ["HostAddresses", "own_addresses", "read_host_addresses"]

"""What ``kodarelay run --learn`` writes: rules that replay exactly what CMD reached.

A name the guard would refuse (it resolves to loopback or a private address) was admitted
during the learning run only because an IP / CIDR rule on the command line covered its
address. Learning the name alone would not replay: the guard refuses it again. So each such
name is learned with the address it resolves to, at its port (``site.test:8080`` and
``127.0.0.1:8080``), never the wider range that happened to admit it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from .filter import Filter, PatternError

Resolve = Callable[[str, int], list[str]]


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def system_resolve(host: str, port: int) -> list[str]:
    """Every TCP address of ``host`` (as the proxy's default resolver finds them)."""
    seen: dict[str, None] = {}
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP):
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def learned_targets(seen: Iterable[tuple[str, int]], *, deny_private: bool,
                    resolve: Resolve = system_resolve) -> list[str]:
    """``host:port`` targets, sorted, that admit exactly what was reached: each destination,
    plus, for a name whose addresses the guard refuses, each such address at that port."""
    out: set[tuple[str, int]] = set()
    for host, port in seen:
        target = _target(host, port)
        out.add((host, port))
        if _is_literal(host):
            continue
        try:
            addresses = resolve(host, port)
            alone = Filter([target])
        except (OSError, PatternError):
            continue
        for address in addresses:
            if not alone.check_resolved(host, port, [address], deny_private=deny_private).allowed:
                out.add((address, port))
    return [_target(h, p) for h, p in sorted(out)]


__all__ = ["learned_targets", "system_resolve"]

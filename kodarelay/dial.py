"""From an allowed ``host:port`` to a connected socket: upstream chaining or a guarded direct dial.

A direct dial resolves the name once, judges every address with the filter's
resolved-address guard, and connects only to addresses it judged: there is no second
lookup, so a name cannot rebind between the check and the connect. A chained dial sends
the name to the upstream proxy, which resolves it (the guard does not apply there).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import Awaitable, Callable, List

from .filter import Filter, canonical_host
from .upstream import UpstreamConfig, UpstreamError, bypasses_proxy, connect_upstream, open_tcp

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[List[str]]]

# SOCKS5 reply codes (RFC 1928 §6).
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05


class Refusal(Exception):
    """A tunnel that will not be opened, with the reply each protocol gives for it.

    ``reason`` is set for policy refusals (recorded as violations); it is None for a target
    that was allowed but could not be reached.
    """

    def __init__(self, message: str, *, http_status: int, socks_rep: int, reason: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.socks_rep = socks_rep
        self.reason = reason


async def default_resolver(host: str, port: int) -> list[str]:
    """The event loop's ``getaddrinfo``: every TCP address of ``host``, in its order, once each."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def _socks_rep_for(exc: BaseException) -> int:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return REP_HOST_UNREACHABLE
    code = getattr(exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return REP_CONNECTION_REFUSED
    if code == errno.ENETUNREACH:
        return REP_NETWORK_UNREACHABLE
    if code in (errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN):
        return REP_HOST_UNREACHABLE
    return REP_GENERAL_FAILURE


class Dialer:
    """Opens tunnels for one server: its filter, upstream, resolver and timeouts."""

    def __init__(
        self,
        filter: Filter,
        upstream: UpstreamConfig,
        resolver: Resolver | None,
        connect_timeout: float,
        deny_private: bool,
    ) -> None:
        self.filter = filter
        self.upstream = upstream
        self.resolver: Resolver = resolver or default_resolver
        self.connect_timeout = connect_timeout
        self.deny_private = deny_private

    async def dial(self, host: str, port: int) -> tuple[socket.socket, bytes]:
        """Connect to an allowed ``host:port``; returns the socket and bytes already received.

        Raises ``Refusal`` for anything that stops the tunnel.
        """
        canon = canonical_host(host)
        ip = canon if isinstance(canon, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else None
        name = str(canon)
        if not self.upstream.is_direct and not bypasses_proxy(name, self.upstream.no_proxy):
            return await self._dial_upstream(name, port)
        if ip is not None:
            addresses = [name]
        else:
            addresses = await self.resolve(name, port)
        decision = self.filter.check_resolved(canon, port, addresses, deny_private=self.deny_private)
        if not decision.allowed:
            raise Refusal(
                f"{name} resolves to a refused address",
                http_status=403,
                socks_rep=REP_NOT_ALLOWED,
                reason=decision.reason,
            )
        return await self._connect_any(name, addresses, port), b""

    async def resolve(self, name: str, port: int) -> list[str]:
        try:
            addresses = await asyncio.wait_for(self.resolver(name, port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError, UnicodeError, ValueError) as e:
            raise Refusal(
                f"cannot resolve {name}: {e}", http_status=502, socks_rep=REP_HOST_UNREACHABLE, reason="resolve_failed"
            ) from None
        if not addresses:
            raise Refusal(
                f"{name} has no address", http_status=502, socks_rep=REP_HOST_UNREACHABLE, reason="resolve_failed"
            )
        return [str(a) for a in addresses]

    async def _connect_any(self, name: str, addresses: list[str], port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        last: BaseException | None = None
        for addr in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await open_tcp(addr, port, remaining)
            except (OSError, asyncio.TimeoutError) as e:
                last = e
                log.debug("connect %s (%s):%d failed: %s", name, addr, port, e)
        exc = last or TimeoutError(f"connect to {name}:{port} timed out")
        raise Refusal(f"cannot connect to {name}:{port}: {exc}", http_status=502, socks_rep=_socks_rep_for(exc))

    async def _dial_upstream(self, name: str, port: int) -> tuple[socket.socket, bytes]:
        try:
            return await connect_upstream(self.upstream, name, port, connect_timeout=self.connect_timeout)
        except UpstreamError as e:
            raise Refusal(str(e), http_status=502, socks_rep=REP_CONNECTION_REFUSED) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise Refusal(
                f"cannot reach upstream proxy {self.upstream}: {e}", http_status=502, socks_rep=_socks_rep_for(e)
            ) from None

"""Capture, the fence's side: clients that ignore the proxy variables reach the proxy anyway.

Set up by the fence's helper (``kodarelay.isolate``) in the fence's own network namespace,
before CMD is started, with no privilege beyond the namespace's own:

* **Routes**: ``local 0.0.0.0/0`` and ``local ::/0`` in the ``local`` table
  (``kodarelay.netlink``), so every address is the namespace's own and a listener on the
  wildcard address accepts a connection to any of them; ``getsockname()`` on the accepted
  socket is where CMD meant to go.
* **Listeners** on ``0.0.0.0`` and ``::`` for port 80, 443, every port an ``--allow`` rule
  names (when the run starts: a policy reload adds none) and each ``--capture-port``.
* **DNS** (``kodarelay.fencedns``) at every nameserver address of ``/etc/resolv.conf``, each
  added to ``lo`` (one that is not loopback too); ``198.18.0.0/32`` on ``lo`` so that
  IPv4-only lookups (``AI_ADDRCONFIG``) work.

Each captured connection goes to the proxy's capture socket (``kodarelay.captured``) with
the name behind its synthetic address (or the literal address) and port; the proxy judges
it and the helper relays the bytes both ways. CMD has no ``CAP_NET_ADMIN``, so it cannot
remove the routes (``EPERM``). The cost: CMD cannot listen on a captured port on the
wildcard address (``EADDRINUSE``); ``--no-capture`` is the way out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from . import netlink
from .fencedns import FENCE_ADDRESS, DnsServer, NameTable, nameservers
from .relay import DEFAULT_IDLE_TIMEOUT, DEFAULT_TOTAL_TIMEOUT, relay_with_timeouts

log = logging.getLogger(__name__)

#: Always captured: the web's two ports.
DEFAULT_PORTS = (80, 443)
RESOLV_CONF = "/etc/resolv.conf"


def capture_ports(flt: Any, extra: Iterable[int] = ()) -> list[int]:
    """80, 443, each port an allow rule of ``flt`` names, and ``extra``: sorted, once each."""
    ports = set(DEFAULT_PORTS) | {int(p) for p in extra}
    for rule in getattr(getattr(flt, "_allow", None), "rules", ()):
        port = getattr(rule, "port", None)
        if isinstance(port, int) and 0 < port < 65536:
            ports.add(port)
    return sorted(ports)


def _preamble(host: str, port: int) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return f"CONNECT {shown}:{port} HTTP/1.1\r\n\r\n".encode("ascii")


class Capture:
    """The fence's capture: routes, addresses, listeners and DNS, bound at construction
    (before the helper forks CMD), served on a thread of their own once ``start()`` runs.

    ``OSError`` when the routes cannot be made (capture is then off and the fence holds as
    before); a port that cannot be listened on is only logged.
    """

    def __init__(self, capture_path: str, ports: Sequence[int], *, resolv_conf: str = RESOLV_CONF,
                 table: NameTable | None = None, dns_port: int = 53) -> None:
        self.capture_path = capture_path
        self.table = table if table is not None else NameTable()
        netlink.add_local_route("0.0.0.0/0")
        try:
            netlink.add_local_route("::/0")
            self.ipv6 = True
        except OSError as e:                # no IPv6 in this kernel: IPv4 capture still works
            log.info("capture: no IPv6 local route (%s); IPv6 connections are not captured", e)
            self.ipv6 = False
        self._listeners: list[socket.socket] = []
        self.ports: list[int] = []
        self.dns: DnsServer | None = None
        try:
            try:
                with open(resolv_conf, encoding="utf-8", errors="replace") as f:
                    servers = nameservers(f.read())
            except OSError:
                servers = nameservers("")
            netlink.add_address(FENCE_ADDRESS)
            self.nameservers = [a for a in servers if self.ipv6 or ":" not in a]
            for addr in self.nameservers:
                netlink.add_address(addr)
            self.dns = DnsServer(self.table, self.nameservers, dns_port)
            for port in ports:
                if self._listen(port):
                    self.ports.append(port)
        except BaseException:
            self.close()
            self._remove_routes()       # no half capture: connections get no route again
            raise
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="kodarelay-capture", daemon=True)

    def _listen(self, port: int) -> bool:
        made: list[socket.socket] = []
        families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if self.ipv6 else [])
        for family, wildcard in families:
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((wildcard, port))
                s.listen(1024)
                s.setblocking(False)
            except OSError as e:
                s.close()
                log.warning("capture: cannot listen on port %d (%s); connections to it are not captured",
                            port, e.strerror or e)
                for m in made:
                    m.close()
                return False
            made.append(s)
        self._listeners += made
        return True

    def close(self) -> None:
        for s in self._listeners:
            s.close()
        if self.dns is not None:
            self.dns.close()

    def _remove_routes(self) -> None:
        for network in ("0.0.0.0/0", "::/0") if self.ipv6 else ("0.0.0.0/0",):
            try:
                netlink.delete_local_route(network)
            except OSError as e:
                log.warning("capture: cannot remove the local route %s: %s", network, e.strerror or e)

    def start(self) -> Capture:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from ._aio import accept_forever

        loop = asyncio.get_running_loop()

        def accepted(conn: socket.socket) -> None:
            task = loop.create_task(self._pipe(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        assert self.dns is not None
        await asyncio.gather(
            self.dns.serve(),
            *(accept_forever(s, accepted, what="capture", log=log, backoff=0.1, closed=lambda: False)
              for s in self._listeners),
        )

    async def _pipe(self, conn: socket.socket) -> None:
        """One captured connection: to the proxy's capture socket, then relayed."""
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            address, port = conn.getsockname()[:2]
        except OSError:
            conn.close()
            return
        name = self.table.opened(address) if self.table.is_synthetic(address) else None
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await loop.sock_connect(up, self.capture_path)
            await loop.sock_sendall(up, _preamble(name or address, port))
            await relay_with_timeouts(conn, up, DEFAULT_IDLE_TIMEOUT, DEFAULT_TOTAL_TIMEOUT)
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("capture: cannot reach the proxy at %s: %s", self.capture_path, e)
            log.debug("capture: %s:%d ended: %s", name or address, port, e)
        finally:
            conn.close()
            up.close()
            if name is not None:
                self.table.closed(address)


__all__ = ["Capture", "DEFAULT_PORTS", "capture_ports"]

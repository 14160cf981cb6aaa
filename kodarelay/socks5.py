"""The built-in SOCKS5 proxy server (RFC 1928 subset, loopback only).

No authentication (method 0x00 only, else ``05 FF``), CONNECT only (else REP 0x07), domain
names only (IPv4 / IPv6 literals get REP 0x08: clients must send the name, which is why the
bouquet says ``socks5h://``). Empty or non-UTF-8 name → 0x01, not allowed → 0x02, refused
→ 0x05, network unreachable → 0x03, host unreachable or timeout → 0x04, success → 0x00 and
the relay. An unknown address type or a non-SOCKS5 version closes the connection.

The handshake timeout covers the handshake only; the tunnel then has the same idle and
total caps as HTTP CONNECT, and chains through the same upstream layer.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from . import relay
from .dial import REP_GENERAL_FAILURE, Refusal
from .serving import Handoff, HandshakeTimeout, ProxyServer

log = logging.getLogger(__name__)

Socks5Error = relay.parsers.Socks5Error

REP_SUCCEEDED = 0x00
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08
CMD_CONNECT = 0x01
ATYP_DOMAIN = 0x03
METHOD_NO_AUTH = 0x00
MAX_HANDSHAKE = 600  # greeting (≤ 257) + request (≤ 262)


def reply_bytes(rep: int) -> bytes:
    """A SOCKS5 reply with an all-zero IPv4 bound address (clients ignore it for CONNECT)."""
    return bytes((5, rep, 0, 1, 0, 0, 0, 0, 0, 0))


class Socks5Server(ProxyServer):
    """SOCKS5 proxy on ``127.0.0.1``. Create with ``await Socks5Server.bind(...)``."""

    protocol = "socks5"

    front_mode = "socks5"

    async def _session(self, conn: socket.socket) -> Handoff | None:
        deadline = self._loop.time() + self.handshake_timeout
        return await socks5_session(self, conn, b"", deadline)

    def _decide(self, h: Any) -> None:
        socks5_decide(self, h)

    def _fast_target(self, h: Any) -> tuple[str, str, int, bytes, bytes] | None:
        return socks5_fast_target(h)


async def _read_until(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float, parse):  # type: ignore[no-untyped-def]
    while True:
        parsed = parse(buf)
        if parsed is not None:
            return parsed, buf
        if len(buf) > MAX_HANDSHAKE:
            raise Socks5Error(None, "handshake too long")
        chunk = await srv.recv_some(conn, deadline, MAX_HANDSHAKE)
        if not chunk:
            raise Socks5Error(None, "client closed during handshake")
        buf += chunk


async def socks5_session(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float) -> Handoff | None:
    """Serve one SOCKS5 session whose first bytes (possibly none yet) are ``buf``."""
    parsers = relay.parsers

    async def reply(rep: int) -> None:
        try:
            await srv.send(conn, reply_bytes(rep))
        except OSError:
            pass

    try:
        (used, methods), buf = await _read_until(srv, conn, buf, deadline, parsers.parse_socks5_greeting)
        buf = buf[used:]
        if METHOD_NO_AUTH not in methods:
            await srv.send(conn, b"\x05\xff")
            return None
        await srv.send(conn, b"\x05\x00")
        (used, cmd, atyp, host, port), buf = await _read_until(srv, conn, buf, deadline, parsers.parse_socks5_request)
    except HandshakeTimeout:
        return None
    except Socks5Error as e:
        if e.rep is not None:
            srv.record("socks5", "", None, "bad_host")
            await reply(e.rep)
        else:
            log.debug("closing SOCKS5 connection: %s", e)
        return None
    early = buf[used:]
    if cmd != CMD_CONNECT:
        srv.record("socks5", host, port, "command")
        await reply(REP_COMMAND_NOT_SUPPORTED)
        return None
    if atyp != ATYP_DOMAIN:
        srv.record("socks5", host, port, "address_type")
        await reply(REP_ADDRESS_TYPE_NOT_SUPPORTED)
        return None
    try:
        upstream, from_upstream = await srv.open_tunnel("socks5", host, port)
    except Refusal as r:
        await reply(r.socks_rep or REP_GENERAL_FAILURE)
        return None
    try:
        await srv.send(conn, reply_bytes(REP_SUCCEEDED))
    except BaseException:
        upstream.close()
        raise
    return upstream, early, from_upstream


def socks5_decide(srv: ProxyServer, h: Any) -> None:
    """``socks5_session`` after the greeting, for a request the engine read (it answered the
    greeting itself): the same checks, violations and replies."""
    data = h.data
    try:
        parsed = relay.parsers.parse_socks5_request(data)
    except Socks5Error as e:
        if e.rep is not None:
            srv.record("socks5", "", None, "bad_host")
            h.reply_and_close(reply_bytes(e.rep))
        else:
            log.debug("closing SOCKS5 connection: %s", e)
            h.close()
        return
    if parsed is None:          # (the engine delivers complete requests only)
        h.close()
        return
    used, cmd, atyp, host, port = parsed
    early = data[used:]
    if cmd != CMD_CONNECT:
        srv.record("socks5", host, port, "command")
        h.reply_and_close(reply_bytes(REP_COMMAND_NOT_SUPPORTED))
        return
    if atyp != ATYP_DOMAIN:
        srv.record("socks5", host, port, "address_type")
        h.reply_and_close(reply_bytes(REP_ADDRESS_TYPE_NOT_SUPPORTED))
        return
    srv.native_open("socks5", h, host, port, early, reply_bytes(REP_SUCCEEDED))


SOCKS_OK = reply_bytes(REP_SUCCEEDED)


def socks5_fast_target(h: Any) -> tuple[str, str, int, bytes, bytes] | None:
    """A well-formed SOCKS5 CONNECT to a name in a native handshake, else None."""
    data = h.data
    try:
        parsed = relay.parsers.parse_socks5_request(data)
    except Socks5Error:
        return None
    if parsed is None:
        return None
    used, cmd, atyp, host, port = parsed
    if cmd != CMD_CONNECT or atyp != ATYP_DOMAIN:
        return None
    return "socks5", host, port, data[used:], SOCKS_OK

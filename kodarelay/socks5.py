"""The built-in SOCKS5 proxy server (RFC 1928 subset, loopback only).

Methods: no authentication (0x00) and RFC 1929 username/password (0x02, preferred when a
client offers both: the username attributes the request, the password is ignored); neither
offered → ``05 FF``. CONNECT only (else REP 0x07). Names are judged like a CONNECT to them;
an IPv4 / IPv6 literal is judged like a CONNECT to that literal, and refused with REP 0x08
(``address_type``: send the name, ``socks5h://``) unless an IP / CIDR rule admits it. Empty,
non-UTF-8 or port-carrying name → 0x01, not allowed → 0x02, refused → 0x05, network
unreachable → 0x03, host unreachable or timeout → 0x04, success → 0x00 and the relay. An
unknown address type or a non-SOCKS5 version closes the connection.

The handshake timeout covers the handshake only; the tunnel then has the same idle and
total caps as HTTP CONNECT, and chains through the same upstream layer.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from typing import Any, Callable, TypeVar

from . import relay
from .dial import REP_GENERAL_FAILURE, Refusal
from .serving import Handoff, HandshakeTimeout, Parsed, Protocol, ProxyServer, Reject, Target
from .violations import _printable

log = logging.getLogger(__name__)

Socks5Error = relay.parsers.Socks5Error

REP_SUCCEEDED = 0x00
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08
CMD_CONNECT = 0x01
ATYP_DOMAIN = 0x03
METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
MAX_HANDSHAKE = 600  # greeting (≤ 257) + auth (≤ 513) + request (≤ 262), each read on its own

T = TypeVar("T")


def reply_bytes(rep: int) -> bytes:
    """A SOCKS5 reply with an all-zero IPv4 bound address (clients ignore it for CONNECT)."""
    return bytes((5, rep, 0, 1, 0, 0, 0, 0, 0, 0))


SOCKS_OK = reply_bytes(REP_SUCCEEDED)


class Socks5Protocol(Protocol):
    """SOCKS5 after its greeting: a complete request in, a target (or a refusal) out."""

    name = "socks5"
    ok_reply = SOCKS_OK

    def parse(self, data: bytes, client: str | None = None) -> Parsed:
        try:
            parsed = relay.parsers.parse_socks5_request(data)
        except Socks5Error as e:
            if e.rep is not None:
                return Reject(reply_bytes(e.rep), "bad_host", client=client)
            log.debug("closing SOCKS5 connection: %s", e)
            return Reject(None, None)
        if parsed is None:          # (the engine delivers complete requests only)
            return Reject(None, None)
        used, cmd, atyp, host, port = parsed
        if cmd != CMD_CONNECT:
            return Reject(reply_bytes(REP_COMMAND_NOT_SUPPORTED), "command", host, port, client)
        if atyp == ATYP_DOMAIN and ":" in host:
            return Reject(reply_bytes(REP_GENERAL_FAILURE), "bad_host", host, port, client)
        return Target(host, port, data[used:], "CONNECT", client, atyp != ATYP_DOMAIN)

    def parse_handshake(self, h: Any) -> Parsed:
        user = getattr(h, "user", None)
        client = _printable(user.decode("utf-8", "backslashreplace"), 100) if user else None
        parsed = self.parse(h.data, client)
        if user is not None and isinstance(parsed, Target):
            from .clients import VERIFIED

            parsed = parsed._replace(token=VERIFIED)     # the engine judged its password already
        return parsed

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        return reply_bytes(r.socks_rep or REP_GENERAL_FAILURE)


SOCKS5 = Socks5Protocol()


class Socks5Server(ProxyServer):
    """SOCKS5 proxy on ``127.0.0.1``. Create with ``await Socks5Server.bind(...)``."""

    protocol = "socks5"

    front_mode = "socks5"

    async def _session(self, conn: socket.socket) -> Handoff | None:
        deadline = self._loop.time() + self.handshake_timeout
        return await socks5_session(self, conn, b"", deadline)

    def protocol_for(self, h: Any) -> Protocol:
        return SOCKS5


async def _read_until(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float,
                      parse: Callable[[bytes], T | None]) -> tuple[T, bytes]:
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


def parse_userpass(buf: bytes) -> tuple[int, str, str] | None:
    """``(consumed, username, sha256 hex of the password)`` from an RFC 1929 request, or None
    if more bytes are needed (the password itself goes no further)."""
    if len(buf) < 2:
        return None
    if buf[0] != 1:
        raise Socks5Error(None, f"unsupported username/password version {buf[0]}")
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    user = bytes(buf[2:2 + ulen]).decode("utf-8", "backslashreplace")
    return end, user, hashlib.sha256(bytes(buf[3 + ulen:end])).hexdigest()


async def socks5_session(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float) -> Handoff | None:
    """Serve one SOCKS5 session whose first bytes (possibly none yet) are ``buf``."""
    parsers = relay.parsers
    client: str | None = None
    token: str | None = None
    book = srv.clients
    try:
        (used, methods), buf = await _read_until(srv, conn, buf, deadline, parsers.parse_socks5_greeting)
        buf = buf[used:]
        if METHOD_USERPASS in methods:
            await srv.send(conn, b"\x05\x02")
            (used, user, token), buf = await _read_until(srv, conn, buf, deadline, parse_userpass)
            buf = buf[used:]
            client = _printable(user, 100) if user else None
            if book is not None:
                from .clients import ClientRefused

                try:
                    book.authenticate(client, token)
                except ClientRefused as e:     # RFC 1929: a non-zero status, then the close
                    srv.record("socks5", "", None, e.reason, client, e.detail)
                    await srv.send_quietly(conn, b"\x01\x01")
                    return None
            await srv.send(conn, b"\x01\x00")       # without clients: attribution, not access
        elif METHOD_NO_AUTH in methods and book is not None and book.require_auth:
            srv.record("socks5", "", None, "unauthenticated", None, "no credentials offered; this proxy requires them")
            await srv.send_quietly(conn, b"\x05\xff")
            return None
        elif METHOD_NO_AUTH in methods:
            await srv.send(conn, b"\x05\x00")
        else:
            await srv.send_quietly(conn, b"\x05\xff")
            return None

        def complete(b: bytes) -> bytes | None:
            try:
                return b if parsers.parse_socks5_request(b) is not None else None
            except Socks5Error as e:
                if e.rep is None:
                    raise
                return b                # complete enough: parse() gives its reply

        _, buf = await _read_until(srv, conn, buf, deadline, complete)
    except HandshakeTimeout:
        return None
    except Socks5Error as e:
        log.debug("closing SOCKS5 connection: %s", e)
        return None
    parsed = SOCKS5.parse(buf, client)
    if isinstance(parsed, Target) and token is not None:
        parsed = parsed._replace(token=token)
    return await srv.serve_parsed(conn, SOCKS5, parsed)

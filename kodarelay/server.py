"""The built-in HTTP CONNECT proxy server (loopback only).

One request per connection: ``CONNECT host:port HTTP/1.x``, judged by the filter, dialled
(directly, guarded, or through the upstream proxy), answered ``200 Connection
Established`` and relayed. Every refusal gets its status line and the connection closes:

* head over 8 KiB → 431, head not complete within ``handshake_timeout`` → 408;
* malformed request line or target → 400; another method → 405;
* host not allowed, denied, malformed, or resolving to a guarded address → 403 with
  ``X-Proxy-Error: <reason>``; unresolvable name or unreachable target / upstream → 502.

Bytes the client sent after its request head (an eager TLS ClientHello) are forwarded to
the target, never dropped.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from . import relay
from .dial import Refusal
from .serving import Handoff, HandshakeTimeout, ProxyServer

log = logging.getLogger(__name__)

HeadError = relay.parsers.HeadError
MAX_HEAD = 8192

REASONS = {
    200: "Connection Established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}


def status_line(code: int, proxy_error: str | None = None) -> bytes:
    """``HTTP/1.1 <code> <reason>`` plus an optional ``X-Proxy-Error`` header, then the blank line."""
    head = f"HTTP/1.1 {code} {REASONS[code]}\r\n"
    if proxy_error is not None:
        head += f"X-Proxy-Error: {proxy_error}\r\n"
    return (head + "\r\n").encode("ascii")


OK_REPLY = status_line(200)


class Server(ProxyServer):
    """HTTP CONNECT proxy on ``127.0.0.1``. Create with ``await Server.bind(...)``.

    With ``socks5=True`` (used by ``BuiltInProxy(..., socks5=True)``) the same port also
    speaks SOCKS5: a connection whose first byte is 0x05 is served as SOCKS5, anything else
    as HTTP. No HTTP request line starts with that byte, so the two cannot be confused.
    """

    protocol = "http"

    def __init__(self, *args: object, socks5: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.socks5 = socks5
        self.front_mode = "mux" if socks5 else "http"

    def _fast_target(self, h: Any) -> tuple[str, str, int, bytes, bytes] | None:
        if h.proto == 1:
            from .socks5 import socks5_fast_target

            return socks5_fast_target(h)
        return http_fast_target(h)

    def _decide(self, h: Any) -> None:
        if h.proto == 1:
            from .socks5 import socks5_decide

            socks5_decide(self, h)
        else:
            http_decide(self, h)

    async def _session(self, conn: socket.socket) -> Handoff | None:
        deadline = self._loop.time() + self.handshake_timeout
        try:
            first = await self.recv_some(conn, deadline, MAX_HEAD)
        except HandshakeTimeout:
            await reply(self, conn, 408)
            return None
        if not first:
            return None
        if self.socks5 and first[0] == 0x05:
            from .socks5 import socks5_session

            return await socks5_session(self, conn, first, deadline)
        return await http_session(self, conn, first, deadline)


async def reply(srv: ProxyServer, conn: socket.socket, code: int, proxy_error: str | None = None) -> None:
    """Send a status reply; a client that already left is not an error."""
    try:
        await srv.send(conn, status_line(code, proxy_error))
    except OSError:
        pass


async def http_session(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float) -> Handoff | None:
    """Serve one HTTP CONNECT request whose first bytes are ``buf``."""
    parsers = relay.parsers

    try:
        while (end := parsers.http_head_end(buf, MAX_HEAD)) < 0:
            chunk = await srv.recv_some(conn, deadline, MAX_HEAD)
            if not chunk:
                return None
            buf += chunk
    except HandshakeTimeout:
        await reply(srv, conn, 408)
        return None
    except HeadError as e:
        srv.record("http", "", None, "bad_request")
        await reply(srv, conn, e.status)
        return None
    head, early = buf[:end], buf[end:]
    try:
        method, target, _version = parsers.parse_request_line(head)
    except HeadError as e:
        srv.record("http", "", None, "bad_request")
        await reply(srv, conn, e.status)
        return None
    if method != "CONNECT":
        srv.record("http", target, None, "method_not_allowed")
        await reply(srv, conn, 405)
        return None
    try:
        host, port = parsers.split_host_port(target)
    except HeadError as e:
        srv.record("http", target, None, "bad_request")
        await reply(srv, conn, e.status)
        return None
    try:
        upstream, from_upstream = await srv.open_tunnel("http", host, port)
    except Refusal as r:
        await reply(srv, conn, r.http_status, r.reason if r.http_status == 403 else None)
        return None
    try:
        await srv.send(conn, status_line(200))
    except BaseException:
        upstream.close()
        raise
    return upstream, early, from_upstream


def http_decide(srv: ProxyServer, h: Any) -> None:
    """``http_session`` for a head the engine read: the same checks, violations and replies."""
    parsers = relay.parsers
    buf = h.data
    try:
        end = parsers.http_head_end(buf, MAX_HEAD)
    except HeadError as e:
        srv.record("http", "", None, "bad_request")
        h.reply_and_close(status_line(e.status))
        return
    head, early = buf[:end], buf[end:]
    try:
        method, target, _version = parsers.parse_request_line(head)
    except HeadError as e:
        srv.record("http", "", None, "bad_request")
        h.reply_and_close(status_line(e.status))
        return
    if method != "CONNECT":
        srv.record("http", target, None, "method_not_allowed")
        h.reply_and_close(status_line(405))
        return
    try:
        host, port = parsers.split_host_port(target)
    except HeadError as e:
        srv.record("http", target, None, "bad_request")
        h.reply_and_close(status_line(e.status))
        return
    srv.native_open("http", h, host, port, early, status_line(200))


def http_fast_target(h: Any) -> tuple[str, str, int, bytes, bytes] | None:
    """A well-formed CONNECT in a native handshake, else None (``http_decide`` answers it)."""
    parsers = relay.parsers
    buf = h.data
    try:
        end = parsers.http_head_end(buf, MAX_HEAD)
        method, target, _version = parsers.parse_request_line(buf[:end])
        if method != "CONNECT":
            return None
        host, port = parsers.split_host_port(target)
    except HeadError:
        return None
    return "http", host, port, buf[end:], OK_REPLY

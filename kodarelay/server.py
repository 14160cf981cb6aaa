"""The built-in HTTP CONNECT proxy server (loopback only).

One request per connection: ``CONNECT host:port HTTP/1.x``, judged by the filter, dialled
(directly, guarded, or through the upstream proxy), answered ``200 Connection
Established`` and relayed. Every refusal gets its status line and the connection closes:

* head over 8 KiB → 431, head not complete within ``handshake_timeout`` → 408;
* malformed request line or target → 400; another method → 405 (saying how to turn
  forwarding on), or with ``forward_http=True`` plain-HTTP forwarding (``forward.py``);
* host not allowed, denied, malformed, or resolving to a guarded address → 403 with
  ``X-Proxy-Error: <reason>`` and a one-line ``text/plain`` body naming host, port, reason
  and what would admit it; unresolvable name or unreachable target / upstream → 502.

Bytes the client sent after its request head (an eager TLS ClientHello) are forwarded to
the target, never dropped.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from . import forward
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

#: What would admit a request refused for each reason (the body of a 403).
_ADMIT = {
    "not_allowed": "allow it with --allow {target}",
    "denied": "a deny rule matches it; only removing that --deny rule admits it",
    "resolved_address": "it resolves to a loopback, link-local, private or reserved address; "
                        "an IP or CIDR --allow rule naming that address admits it",
    "bad_host": "the host name is malformed; no rule admits it",
}


def refusal_reply(code: int, reason: str | None = None, host: str = "", port: int | None = None,
                  method: str = "CONNECT", detail: str = "") -> bytes:
    """A refusal written for the reader: the 403 names host, port, reason and what admits it.

    Used by the CONNECT path on both front-ends (so their bytes are identical) and by
    forwarding. A 405 says how to turn forwarding on. Other codes carry ``detail`` as a
    one-line body when given, else they are the bare status line (the crate's replies).
    Host and port only: never a path, query or userinfo.
    """
    target = f"{host}:{port}" if port is not None else host
    if code == 403:
        admit = _ADMIT.get(reason or "", "ask whoever runs the proxy to allow it").format(target=target)
        text = f"kodarelay: {method} to {target} refused ({reason}); {admit}"
    elif code == 405:
        what = f"{method} to {target}" if host else f"{method}"
        text = (f"kodarelay: {what} refused (method_not_allowed): this proxy only tunnels CONNECT; "
                "plain-HTTP forwarding is off (forward_http=True, or kodarelay without --no-forward-http)")
    elif detail:
        text = f"kodarelay: {method + ' to ' + target + ': ' if host else ''}{detail}"
    else:
        return status_line(code, reason if code == 403 else None)
    body = (text + "\n").encode("ascii", "replace")
    head = f"HTTP/1.1 {code} {REASONS[code]}\r\n"
    if code == 403 and reason is not None:
        head += f"X-Proxy-Error: {reason}\r\n"
    head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + body


class Server(ProxyServer):
    """HTTP CONNECT proxy on ``127.0.0.1``. Create with ``await Server.bind(...)``.

    With ``socks5=True`` (used by ``BuiltInProxy(..., socks5=True)``) the same port also
    speaks SOCKS5: a connection whose first byte is 0x05 is served as SOCKS5, anything else
    as HTTP. No HTTP request line starts with that byte, so the two cannot be confused.

    With ``forward_http=True`` absolute-form plain-HTTP requests are forwarded through the
    same policy (``kodarelay.forward``); the default keeps the crate's 405.
    """

    protocol = "http"

    def __init__(self, *args: object, socks5: bool = False, forward_http: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.socks5 = socks5
        #: forward absolute-form plain-HTTP requests (``forward.py``) instead of answering 405
        self.forward_http = forward_http
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
        if getattr(srv, "forward_http", False):
            return await forward.forward_session(srv, conn, buf, deadline)
        host, port = _host_port_of(target)
        srv.record("http", host, port, "method_not_allowed")
        await _send_quietly(srv, conn, refusal_reply(405, None, host, port, method))
        return None
    return await connect_request_tail(srv, conn, target, early)


async def connect_request_tail(srv: ProxyServer, conn: socket.socket, target: str, early: bytes) -> Handoff | None:
    """The CONNECT part of a session: judge ``target``, dial it, answer 200 (or refuse)."""
    try:
        host, port = relay.parsers.split_host_port(target)
    except HeadError as e:
        srv.record("http", _authority_only(target), None, "bad_request")
        await reply(srv, conn, e.status)
        return None
    try:
        upstream, from_upstream = await srv.open_tunnel("http", host, port)
    except Refusal as r:
        await _send_quietly(srv, conn, srv.refusal_bytes("http", r, host, port))
        return None
    try:
        await srv.send(conn, status_line(200))
    except BaseException:
        upstream.close()
        raise
    return upstream, early, from_upstream


async def _send_quietly(srv: ProxyServer, conn: socket.socket, data: bytes) -> None:
    try:
        await srv.send(conn, data)
    except OSError:
        pass


def _authority_only(target: str) -> str:
    """A malformed CONNECT target as recorded: kept when it cannot hold a path, query or
    userinfo, else dropped."""
    return "" if any(c in target for c in "/?#@") else target


def _host_port_of(target: str) -> tuple[str, int | None]:
    """Host and port of a request target for a violation record: never its path or query."""
    try:
        host, port, _authority, _origin = relay.parsers.parse_absolute_target(target)
        return host, port
    except HeadError:
        return "", None


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
        if getattr(srv, "forward_http", False):
            _forward_detached(srv, h, buf)
            return
        host, port = _host_port_of(target)
        srv.record("http", host, port, "method_not_allowed")
        h.reply_and_close(refusal_reply(405, None, host, port, method))
        return
    try:
        host, port = parsers.split_host_port(target)
    except HeadError as e:
        srv.record("http", _authority_only(target), None, "bad_request")
        h.reply_and_close(status_line(e.status))
        return
    srv.native_open("http", h, host, port, early, status_line(200))


def _forward_detached(srv: ProxyServer, h: Any, buf: bytes) -> None:
    """Move a native handshake holding a plain-HTTP request onto the asyncio path."""
    conn = socket.socket(fileno=h.detach())
    conn.setblocking(False)
    deadline = srv._loop.time() + srv.handshake_timeout

    async def session(c: socket.socket) -> Handoff | None:
        return await forward.forward_session(srv, c, buf, deadline)

    srv._track(srv._loop.create_task(srv._run(conn, session)))


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

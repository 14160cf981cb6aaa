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

from . import relay
from .dial import Refusal
from .serving import Handoff, HandshakeTimeout, Handover, Parsed, Protocol, ProxyServer, Reject, Target

log = logging.getLogger(__name__)

HeadError = relay.parsers.HeadError
MAX_HEAD = 8192

# The replies live in ``replies.py`` (forwarding writes them too); imported here for the
# names this module has always offered.
from .replies import (  # noqa: E402,F401
    _ADMIT, OK_REPLY, REASONS, _is_literal, admit_resolved, basic_user, refusal_reply, status_line,
)


def proxy_user(head: bytes) -> str | None:
    """The user of a request head's ``Proxy-Authorization: Basic`` header, if any."""
    return proxy_credentials(head)[0]


def proxy_credentials(head: bytes) -> tuple[str | None, str | None]:
    """The user of a request head's ``Proxy-Authorization: Basic`` header (shown escaped) and
    the SHA-256 of its password (``kodarelay.clients``), if any."""
    from .clients import credentials

    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"proxy-authorization":
            user, token = credentials(value)
            return (basic_user(value), token) if user is not None else (None, None)
    return None, None


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


class HttpProtocol(Protocol):
    """HTTP CONNECT: a complete head in, a target (or a refusal) out; its replies. With
    ``forward``, any other method is handed over to plain-HTTP forwarding (``forward.py``)."""

    name = "http"
    ok_reply = OK_REPLY

    def __init__(self, forward: bool = False) -> None:
        self.forward = forward

    def parse(self, data: bytes) -> Parsed:
        parsers = relay.parsers
        try:
            end = parsers.http_head_end(data, MAX_HEAD)
            if end < 0:
                raise HeadError(400, "incomplete request head")
            head, early = data[:end], data[end:]
            method, target, _version = parsers.parse_request_line(head)
        except HeadError as e:
            return Reject(status_line(e.status), "bad_request")
        client, token = proxy_credentials(head)
        if method != "CONNECT":
            if self.forward:
                return Handover(data)
            host, port = _host_port_of(target)
            return Reject(refusal_reply(405, None, host, port, method), "method_not_allowed", host, port, client)
        return connect_target(target, early, client, token)

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        return refusal_reply(r.http_status, r.reason, host, port, detail=r.detail or "", address=r.address,
                             private=r.private)


def connect_target(target: str, early: bytes, client: str | None = None, token: str | None = None) -> Parsed:
    """The parse of a CONNECT request's target (``token``: the SHA-256 of the client's password)."""
    try:
        host, port = relay.parsers.split_host_port(target)
    except HeadError as e:
        return Reject(status_line(e.status), "bad_request", _authority_only(target), None, client)
    return Target(host, port, early, "CONNECT", client, token=token)


async def connect_request_tail(srv: ProxyServer, conn: socket.socket, target: str, early: bytes,
                               client: str | None = None, token: str | None = None) -> Handoff | None:
    """A CONNECT after forwarded requests on one connection: served like any other."""
    return await srv.serve_parsed(conn, HTTP, connect_target(target, early, client, token))


HTTP = HttpProtocol()


class Server(ProxyServer):
    """HTTP CONNECT proxy on ``127.0.0.1``. Create with ``await Server.bind(...)``.

    With ``socks5=True`` (used by ``BuiltInProxy(..., socks5=True)``) the same port also
    speaks SOCKS5: a connection whose first byte is 0x05 is served as SOCKS5, anything else
    as HTTP. No HTTP request line starts with that byte, so the two cannot be confused.
    """

    protocol = "http"

    def __init__(self, *args: object, socks5: bool = False, forward_http: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.socks5 = socks5
        self.front_mode = "mux" if socks5 else "http"
        self._http = HttpProtocol(forward_http)

    @property
    def forward_http(self) -> bool:
        """Forward absolute-form plain-HTTP requests (``forward.py``) instead of answering 405."""
        return self._http.forward

    def protocol_for(self, h: Any) -> Protocol:
        if h.proto == 1:
            from .socks5 import SOCKS5

            return SOCKS5
        return self._http

    async def connect_after_forward(self, conn: socket.socket, target: str, early: bytes,
                                    client: str | None, token: str | None = None) -> Handoff | None:
        """A CONNECT that follows forwarded requests on one connection (``forward.py`` hands
        it back here, so that forwarding never imports the CONNECT server)."""
        return await connect_request_tail(self, conn, target, early, client, token)

    async def handover(self, conn: socket.socket, parsed: Handover) -> Handoff | None:
        from . import forward

        deadline = self._loop.time() + self.handshake_timeout
        return await forward.forward_session(self, conn, parsed.data, deadline)

    async def _session(self, conn: socket.socket) -> Handoff | None:
        deadline = self._loop.time() + self.handshake_timeout
        try:
            first = await self.recv_some(conn, deadline, MAX_HEAD)
        except HandshakeTimeout:
            await self.send_quietly(conn, status_line(408))
            return None
        if not first:
            return None
        if self.socks5 and first[0] == 0x05:
            from .socks5 import socks5_session

            return await socks5_session(self, conn, first, deadline)
        return await http_session(self, conn, first, deadline)


async def http_session(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float) -> Handoff | None:
    """Read one HTTP request head whose first bytes are ``buf``, then serve it."""
    parsers = relay.parsers
    try:
        while parsers.http_head_end(buf, MAX_HEAD) < 0:
            chunk = await srv.recv_some(conn, deadline, MAX_HEAD)
            if not chunk:
                return None
            buf += chunk
    except HandshakeTimeout:
        await srv.send_quietly(conn, status_line(408))
        return None
    except HeadError:
        pass                    # parse() gives the reply and the violation
    proto = srv._http if isinstance(srv, Server) else HTTP
    return await srv.serve_parsed(conn, proto, proto.parse(buf))

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

import base64
import binascii
import logging
import socket
from typing import Any

from . import relay
from .dial import Refusal, admit_hint
from .serving import Handoff, HandshakeTimeout, Parsed, Protocol, ProxyServer, Reject, Target
from .violations import _printable

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


def text_reply(code: int, body: str, proxy_error: str | None = None) -> bytes:
    """A complete reply with a one-line ``text/plain`` body (``Connection: close``)."""
    data = (body.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    head = f"HTTP/1.1 {code} {REASONS[code]}\r\n"
    if proxy_error is not None:
        head += f"X-Proxy-Error: {proxy_error}\r\n"
    head += f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + data


def refusal_403(reason: str, host: str, port: int | None, rule: str | None = None) -> bytes:
    """The 403 every refusal gets: ``X-Proxy-Error``, and a body naming host, port, reason and
    what would admit it, so whoever reads it knows it was the proxy, not the site."""
    shown = _printable(host, 255)
    shown = f"[{shown}]" if ":" in shown else shown
    target = f"{shown}:{port}" if port is not None else shown
    body = f"kodarelay refused {target or 'the request'}: {reason}; {admit_hint(reason, shown, port, rule)}"
    return text_reply(403, body, reason)


OK_REPLY = status_line(200)
METHOD_NOT_ALLOWED = text_reply(
    405, "kodarelay forwards only CONNECT tunnels here: plain-HTTP forwarding is off "
    "(turn it on with forward_http=True, or drop --no-forward-http)", "method_not_allowed")


def proxy_user(head: bytes) -> str | None:
    """The user of a ``Proxy-Authorization: Basic`` header (attribution; the password is ignored)."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep or name.strip().lower() != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user = decoded.partition(":")[0]
        return _printable(user, 100) if user else None
    return None


def _authority(target: str) -> tuple[str, int | None]:
    """Host and port of an absolute-form target, for a violation (never its path or query)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(target)
        host = parts.hostname or ""
        port = parts.port or ({"http": 80, "https": 443}.get(parts.scheme.lower()) if host else None)
    except ValueError:
        return "", None
    return host, port


class HttpProtocol(Protocol):
    """HTTP CONNECT: a complete head in, a target (or a refusal) out; its replies."""

    name = "http"
    ok_reply = OK_REPLY

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
        client = proxy_user(head)
        if method != "CONNECT":
            host, port = _authority(target)
            return Reject(METHOD_NOT_ALLOWED, "method_not_allowed", host, port, client)
        try:
            host, port = parsers.split_host_port(target)
        except HeadError as e:
            return Reject(status_line(e.status), "bad_request", target, None, client)
        return Target(host, port, early, "CONNECT", client)

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        if r.http_status == 403:
            return refusal_403(r.reason or "refused", host, port, r.rule)
        return status_line(r.http_status)


HTTP = HttpProtocol()


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

    def protocol_for(self, h: Any) -> Protocol:
        if h.proto == 1:
            from .socks5 import SOCKS5

            return SOCKS5
        return HTTP

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
    return await srv.serve_parsed(conn, HTTP, HTTP.parse(buf))

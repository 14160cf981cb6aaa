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

import base64
import binascii
import logging
import socket
from typing import Any

from . import relay
from .dial import Refusal
from .serving import Handoff, HandshakeTimeout, Handover, Parsed, Protocol, ProxyServer, Reject, Target
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


#: What would admit a request refused for each reason (the body of a 403).
_ADMIT = {
    "not_allowed": "allow it with --allow {target}",
    "denied": "a deny rule matches it; only removing that --deny rule admits it",
    "resolved_address": "it resolves to a loopback, link-local, private or reserved address; "
                        "an IP or CIDR --allow rule naming that address admits it "
                        "(a private one also --allow-private)",
    "bad_host": "the host name is malformed; no rule admits it",
    "decider_denied": "the approval hook said no; --allow {target} admits it without asking",
    "decider_timeout": "the approval hook did not answer in time; --allow {target} admits it without asking",
    "decider_error": "the approval hook failed; --allow {target} admits it without asking",
    "address_type": "send the host name instead (socks5h://), or allow the address with --allow {target}",
    "needs_inspection": "request rules name this host, and a tunnel's requests cannot be read; "
                        "tunnel it with a host rule (--allow {target}), or use plain http:// to have each request judged",
}


def admit_resolved(host: str, port: int | None, address: str, private: bool, literal: bool) -> str:
    """What admits a target the guard refused, naming the address: the exact ``--allow``."""
    shown_addr = f"[{address}]" if ":" in address else address
    where = f"{shown_addr}:{port}" if port is not None else shown_addr
    flag = f"--allow {where}" if literal else f"--allow {host},{where}"
    return f"{flag} admits it" + (" (or --allow-private, for every private address)" if private else "")


def refusal_reply(code: int, reason: str | None = None, host: str = "", port: int | None = None,
                  method: str = "CONNECT", detail: str = "", address: str | None = None,
                  private: bool = False) -> bytes:
    """A refusal written for the reader: the 403 names host, port, reason and what admits it.

    Used by the CONNECT path on both front-ends (so their bytes are identical) and by
    forwarding. A 405 says how to turn forwarding on. Other codes carry ``detail`` as a
    one-line body when given, else they are the bare status line (the crate's replies).
    Host and port only: never a path, query or userinfo.
    """
    shown = _printable(host, 255)
    shown = f"[{shown}]" if ":" in shown else shown
    target = f"{shown}:{port}" if port is not None else shown
    if code == 403 and reason == "resolved_address" and address:
        literal = _is_literal(host)
        what = f"it is a {detail[3:]} address" if literal and detail.startswith("is ") else \
            f"{shown} {detail}" if detail else f"{shown} resolves to {address}"
        text = (f"kodarelay: {method} to {target} refused ({reason}): {what}; "
                f"{admit_resolved(shown, port, address, private, literal)}")
    elif code == 403:
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


def _is_literal(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


OK_REPLY = status_line(200)


def basic_user(value: bytes) -> str | None:
    """The user of a ``Basic`` credential (attribution; the password is ignored)."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = decoded.partition(":")[0]
    return _printable(user, 100) if user else None


def proxy_user(head: bytes) -> str | None:
    """The user of a request head's ``Proxy-Authorization: Basic`` header, if any."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"proxy-authorization":
            return basic_user(value)
    return None


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
        client = proxy_user(head)
        if method != "CONNECT":
            if self.forward:
                return Handover(data)
            host, port = _host_port_of(target)
            return Reject(refusal_reply(405, None, host, port, method), "method_not_allowed", host, port, client)
        return connect_target(target, early, client)

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        return refusal_reply(r.http_status, r.reason, host, port, detail=r.detail or "", address=r.address,
                             private=r.private)


def connect_target(target: str, early: bytes, client: str | None = None) -> Parsed:
    """The parse of a CONNECT request's target."""
    try:
        host, port = relay.parsers.split_host_port(target)
    except HeadError as e:
        return Reject(status_line(e.status), "bad_request", _authority_only(target), None, client)
    return Target(host, port, early, "CONNECT", client)


async def connect_request_tail(srv: ProxyServer, conn: socket.socket, target: str, early: bytes,
                               client: str | None = None) -> Handoff | None:
    """A CONNECT after forwarded requests on one connection: served like any other."""
    return await srv.serve_parsed(conn, HTTP, connect_target(target, early, client))


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

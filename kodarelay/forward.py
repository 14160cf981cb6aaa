"""Plain-HTTP forwarding: ``GET http://host[:port]/path`` judged like a CONNECT, then forwarded.

Each request on a client connection is judged on its own, by the same filter, guard and
violation log as a CONNECT to its ``host:port`` (``_open_upstream`` is the one place that
asks the policy). The request is rebuilt, not passed through: origin-form request line,
``Host`` from the URI, hop-by-hop headers dropped. Heads shaped for request smuggling get
``400`` before a byte goes upstream, among them a ``Connection`` header naming a framing
field (``Content-Length``, ``Transfer-Encoding``, ``Host``: the next hop would drop it while
the body still goes out, and read that body as a second, unjudged request); a response head
doing the same is a ``502``. A response with ``Transfer-Encoding`` never carries its
``Content-Length`` on. Trailer lines are checked (an obs-fold, a bare CR / LF or a malformed
field ends the exchange) and fields a trailer may not carry (framing, routing,
authentication, cookies) are dropped. Bodies stream both ways through one bounded buffer;
the response keeps its framing. A ``101 Switching Protocols`` answer to a WebSocket
upgrade hands both sockets to the relay as a tunnel.

Choices where the SPEC is silent (a user of such a proxy would expect these):

* the request keeps the client's HTTP version (an HTTP/1.0 client gets a response it can
  read without de-chunking); HTTP/1.0 clients get one request per connection;
* a refused or failed request ends the client connection (``Connection: close``): its
  body, if any, is never read;
* a keep-alive client connection waits ``idle_timeout`` for its next request, then the
  head must arrive within ``handshake_timeout`` (else 408), as for the first one;
* userinfo in the URI (``http://user:pw@host/``) is a 400, never forwarded nor logged;
  the fragment is dropped;
* an upstream connection is reused only for the next request to the same checked
  (host, port), and only after a cleanly framed response;
* ``Expect: 100-continue`` is forwarded: the origin's ``100 Continue`` reaches the client;
* a response head over 64 KiB, or a malformed one, is a 502;
* ``idle_timeout`` covers the whole connection (no byte either way), ``total_timeout``
  each request / response exchange (a ``101`` tunnel then gets the relay's own caps).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from . import relay
from ._aio import wait_ready
from ._relay_py import _TOKEN_CHARS
from .events import Event
from .replies import basic_user, refusal_reply
from .requestrules import shown_path
from .dial import CHAIN, DIRECT as DIRECT_PLAN, REP_CONNECTION_REFUSED, Plan, Refusal
from .secrets import Leak
from .serving import HandshakeTimeout, Target, Ticket
from .upstream import UpstreamConfig, _open_proxy, proxy_authorization
from .violations import _printable

if TYPE_CHECKING:
    from .serving import Handoff, ProxyServer

log = logging.getLogger(__name__)

HeadError = relay.parsers.HeadError
MAX_HEAD = 8192
MAX_RESPONSE_HEAD = 65536
MAX_LINE = 4096          # a chunk-size line or a trailer line
CHUNK = 256 * 1024       # the one copy buffer of a session: bodies never sit in memory

#: Never forwarded (RFC 9110 §7.6.1), plus the proxy's own credentials. ``Upgrade`` is kept
#: for a WebSocket upgrade; ``Transfer-Encoding`` is kept because the body is relayed with
#: its chunked framing intact.
HOP_BY_HOP = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"te", b"trailer", b"upgrade",
                        b"proxy-authorization"})
#: Dropped from the request because the proxy writes its own.
REWRITTEN = frozenset({b"host"})
#: Never a hop-by-hop name: ``Connection: Content-Length`` would make the next hop drop the
#: framing of a body that is still sent, so it reads the body as a request (smuggling).
#: A head naming one of these in ``Connection`` is refused (400 / a 502 for a response).
NOT_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
#: Fields a trailer may not carry (RFC 9110 §6.5.1: framing, routing, authentication,
#: control): dropped from forwarded trailers, never acted on.
NOT_IN_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"keep-alive",
                             b"te", b"trailer", b"upgrade", b"proxy-connection", b"proxy-authorization",
                             b"proxy-authenticate", b"authorization", b"www-authenticate", b"set-cookie",
                             b"cookie", b"content-encoding", b"content-type", b"content-range", b"expect",
                             b"max-forwards", b"cache-control", b"age", b"expires", b"date", b"location",
                             b"retry-after", b"vary", b"warning"})
MAX_TRAILERS = 64


class _BadRequest(Exception):
    """A head the proxy refuses with 400 before anything goes upstream."""


class _BadUpstream(Exception):
    """The upstream answered something that is not HTTP/1.x framing we can relay."""


class _Idle:
    """One idle clock per client connection: no byte moved either way for ``idle`` s ends it,
    and so does one request / response exchange lasting over ``total`` s (the tunnels' cap)."""

    def __init__(self, idle: float, total: float) -> None:
        self.idle = idle
        self.total = total
        self.last = time.monotonic()
        self.until = self.last + total

    def touch(self) -> None:
        self.last = time.monotonic()

    def start_exchange(self) -> None:
        self.until = time.monotonic() + self.total

    async def wait(self, sock: socket.socket, write: bool) -> None:
        """Wait until ``sock`` is ready; ``TimeoutError`` once the connection is idle or the
        exchange is over its total cap."""
        while True:
            now = time.monotonic()
            if now >= self.until:
                raise TimeoutError(f"forwarded exchange exceeded total timeout of {self.total}s")
            remaining = min(self.last + self.idle, self.until) - now
            if remaining <= 0:
                raise TimeoutError(f"forwarding idle for {self.idle}s")
            try:
                await wait_ready(sock, write, remaining)
                return
            except TimeoutError:
                continue        # the other direction may have moved meanwhile


class _Stream:
    """A non-blocking socket with a read-ahead buffer (bounded by the callers)."""

    #: bytes on the socket are the bytes of the stream (splice and ``recv_into`` may be used);
    #: False for TLS (``kodarelay.tlsstream``), which is read and written through its methods
    raw = True

    def __init__(self, sock: socket.socket, clock: _Idle) -> None:
        self.sock = sock
        self.clock = clock
        self.buf = b""
        self.sent = 0           # bytes written to the peer (spliced ones included): end events count them

    async def _recv_raw(self) -> bytes:
        """The next bytes on the socket (b"" at EOF), waiting for them on the idle clock."""
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                await self.clock.wait(self.sock, False)
                continue
            if data:
                self.clock.touch()
            return data

    async def _send_raw(self, data: bytes | memoryview, counted: bool) -> None:
        """All of ``data`` onto the socket; ``counted``: the bytes are the stream's (``sent``)."""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self.clock.wait(self.sock, True)
                continue
            self.clock.touch()
            if counted:
                self.sent += n
            view = view[n:]

    async def fill(self) -> bool:
        """Read more into ``buf``; False at EOF."""
        data = await self._recv_raw()
        if not data:
            return False
        self.buf += data
        return True

    async def readline(self) -> bytes:
        """One CRLF-terminated line (CRLF included), at most ``MAX_LINE`` bytes."""
        while True:
            i = self.buf.find(b"\r\n", 0, MAX_LINE)
            if i >= 0:
                line, self.buf = self.buf[: i + 2], self.buf[i + 2 :]
                return line
            if len(self.buf) >= MAX_LINE:
                raise _BadUpstream("line too long in chunked body")
            if not await self.fill():
                raise ConnectionResetError("peer closed in the middle of a chunked body")

    async def send(self, data: bytes | memoryview) -> None:
        await self._send_raw(data, True)


async def _copy(src: _Stream, dst: _Stream, n: int | None, scratch: bytearray) -> int:
    """Copy ``n`` bytes (``None``: until EOF) from ``src`` to ``dst`` through ``scratch``."""
    moved = 0
    if src.buf:
        take = len(src.buf) if n is None else min(n, len(src.buf))
        head, src.buf = src.buf[:take], src.buf[take:]
        await dst.send(head)
        moved += take
    if not src.raw:
        while n is None or moved < n:
            if not await src.fill():
                if n is None:
                    return moved
                raise ConnectionResetError(f"peer closed after {moved} of {n} body bytes")
            take = len(src.buf) if n is None else min(n - moved, len(src.buf))
            head, src.buf = src.buf[:take], src.buf[take:]
            await dst.send(head)
            moved += take
        return moved
    view = memoryview(scratch)
    sock = src.sock
    while n is None or moved < n:
        want = CHUNK if n is None else min(CHUNK, n - moved)
        try:
            got = sock.recv_into(scratch, want)
        except (BlockingIOError, InterruptedError):
            await src.clock.wait(sock, False)
            continue
        if got == 0:
            if n is None:
                return moved
            raise ConnectionResetError(f"peer closed after {moved} of {n} body bytes")
        src.clock.touch()
        await dst.send(view[:got])
        moved += got
    return moved


async def _pipe(a: _Stream, b: _Stream, scratch: bytearray) -> None:
    """Copy both ways until either side ends (a WebSocket inside a decrypted tunnel)."""
    a.clock.until = float("inf")         # a tunnel now: the idle clock alone ends it
    tasks = [asyncio.ensure_future(_copy(a, b, None, scratch)), asyncio.ensure_future(_copy(b, a, None, bytearray(CHUNK)))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_SPLICE_MIN = 256 * 1024      # bodies at least this long move socket -> pipe -> socket
_PIPE_SIZE = 1 << 20
_splice_ok = hasattr(os, "splice")


async def _copy_body(src: _Stream, dst: _Stream, n: int, scratch: bytearray) -> None:
    """``n`` body bytes from ``src`` to ``dst``: spliced in the kernel when the body is long
    (no copy through Python), copied through ``scratch`` otherwise or where splice is refused."""
    global _splice_ok
    if n < _SPLICE_MIN or not _splice_ok or not (src.raw and dst.raw):
        await _copy(src, dst, n, scratch)
        return
    if src.buf:
        take = min(n, len(src.buf))
        head, src.buf = src.buf[:take], src.buf[take:]
        await dst.send(head)
        n -= take
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, 1031, _PIPE_SIZE)       # F_SETPIPE_SZ; the default 64 KiB also works
        except OSError:
            pass
        sfd, dfd = src.sock.fileno(), dst.sock.fileno()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        moved = in_pipe = 0
        while moved < n:
            if in_pipe == 0:
                try:
                    k = os.splice(sfd, w, min(n - moved, _PIPE_SIZE), flags=flags)
                except (BlockingIOError, InterruptedError):
                    await src.clock.wait(src.sock, False)
                    continue
                except OSError as e:
                    if moved or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    _splice_ok = False              # refused here: copy from now on
                    await _copy(src, dst, n, scratch)
                    return
                if k == 0:
                    raise ConnectionResetError(f"peer closed after {moved} of {n} body bytes")
                src.clock.touch()
                in_pipe = k
            try:
                k = os.splice(r, dfd, in_pipe, flags=flags)
            except (BlockingIOError, InterruptedError):
                await dst.clock.wait(dst.sock, True)
                continue
            dst.clock.touch()
            dst.sent += k
            in_pipe -= k
            moved += k
    finally:
        os.close(r)
        os.close(w)


def _trailer_field(line: bytes) -> tuple[bytes, bytes]:
    """One trailer line (CRLF included) as (name, value); ``_BadRequest`` unless it is a plain
    ``token: value`` field (no obs-fold, no control byte, no space before the colon)."""
    body = line[:-2]
    name, colon, value = body.partition(b":")
    if not colon or not name or any(c not in _TOKEN_CHARS for c in name):
        raise _BadRequest("malformed trailer field")
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
        raise _BadRequest("control byte in a trailer field")
    return name, value.strip(b" \t")


async def _copy_trailers(src: _Stream, dst: _Stream) -> None:
    """Trailer fields, then the final CRLF: each line checked (an obs-fold continuation, a bare
    CR / LF or a malformed field ends the exchange); fields a trailer may not carry are
    dropped, the rest forwarded. At most ``MAX_TRAILERS`` lines."""
    kept: list[bytes] = []
    for _ in range(MAX_TRAILERS + 1):
        line = await src.readline()
        if line == b"\r\n":
            await dst.send(b"".join(kept) + b"\r\n")
            return
        if b"\n" in line[:-2] or b"\r" in line[:-2] or line[:1] in (b" ", b"\t"):
            raise _BadRequest("malformed trailer (obs-fold or bare CR / LF)")
        field = _trailer_field(line)
        if field[0].lower() not in NOT_IN_TRAILERS:
            kept.append(field[0] + b": " + field[1] + b"\r\n")
    raise _BadRequest("too many trailer fields")


async def _copy_chunked(src: _Stream, dst: _Stream, scratch: bytearray) -> None:
    """Relay a chunked body with its framing, checking every size line and CRLF strictly."""
    while True:
        line = await src.readline()
        size_s = line[:-2].split(b";", 1)[0]
        if not size_s or len(size_s) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_s):
            raise _BadRequest("malformed chunk size")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in line[:-2]):
            raise _BadRequest("control byte in chunk extension")
        await dst.send(line)
        size = int(size_s, 16)
        if size == 0:
            await _copy_trailers(src, dst)
            return
        await _copy(src, dst, size, scratch)
        if await src.readline() != b"\r\n":
            raise _BadRequest("chunk data not followed by CRLF")
        await dst.send(b"\r\n")


def _head_only(data: bytes) -> bytes:
    return data[: data.find(b"\r\n\r\n") + 4]


def _field_map(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        out.setdefault(name.lower(), []).append(value)
    return out


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")]


def _content_length(values: list[bytes]) -> int:
    """The one length all ``Content-Length`` values (and list items) agree on, else ValueError."""
    items = [t.strip(b" \t") for v in values for t in v.split(b",")]
    if not items or any(not t or len(t) > 18 or not t.isdigit() for t in items) or len(set(items)) != 1:
        raise ValueError("malformed or unequal Content-Length")
    return int(items[0])


def _body_framing(fields: dict[bytes, list[bytes]]) -> int | None:
    """Request body length, -1 for chunked, ``None`` for none; smuggling shapes raise ``_BadRequest``."""
    te = fields.get(b"transfer-encoding")
    cl = fields.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise _BadRequest("both Content-Length and Transfer-Encoding")
        codings = _tokens(te)
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise _BadRequest("Transfer-Encoding does not end in chunked")
        return -1
    if cl is not None:
        try:
            return _content_length(cl)
        except ValueError:
            raise _BadRequest("malformed or unequal Content-Length") from None
    return None


def _proxy_credentials(values: list[bytes]) -> tuple[str | None, str | None]:
    """The client a request names (shown escaped) and the SHA-256 of its password."""
    from .clients import credentials

    if not values:
        return None, None
    user, token = credentials(values[0])
    return (basic_user(values[0]), token) if user is not None else (None, None)


def _is_websocket_upgrade(fields: dict[bytes, list[bytes]]) -> bool:
    return b"websocket" in _tokens(fields.get(b"upgrade", [])) and b"upgrade" in _tokens(fields.get(b"connection", []))


def _connection_names_framing(fields: dict[bytes, list[bytes]]) -> bytes | None:
    """The framing / routing field a ``Connection`` header names, if any (see ``NOT_HOP_BY_HOP``)."""
    for name in _tokens(fields.get(b"connection", [])):
        if name in NOT_HOP_BY_HOP:
            return name
    return None


def _drop_set(fields: dict[bytes, list[bytes]], keep_upgrade: bool) -> set[bytes]:
    drop = set(HOP_BY_HOP) | set(_tokens(fields.get(b"connection", [])))
    if keep_upgrade:
        drop.discard(b"upgrade")
    return drop


class _Exchange:
    """One client connection's requests, forwarded one after another."""

    def __init__(self, srv: ProxyServer, conn: socket.socket, proto: str = "http",
                 origin: tuple[str, int] | None = None) -> None:
        self.srv = srv
        self.proto = proto          # what events and violations name ("capture" for a captured port 80)
        self.origin = origin        # a captured connection's host and port: every request goes there
        self.clock = _Idle(srv.idle_timeout, srv.total_timeout)
        self.client = _Stream(conn, self.clock)
        self.upstream: _Stream | None = None
        self.upstream_key: tuple[str, int] | None = None
        self.via_proxy: UpstreamConfig | None = None    # the upstream proxy the connection goes to
        self.ticket: Ticket | None = None               # the request being served (its end event)
        self._marks: tuple[_Stream, int, int] | None = None   # its upstream, and both counts at its start
        self._scratch: bytearray | None = None
        self.sent_any = False       # part of the current response already reached the client
        #: the inspected tunnel these requests came in (their events share its id), if any
        self.tunnel: Ticket | None = None
        #: the client's requests arrive decrypted from TLS (secrets are swapped only then)
        self.over_tls = False
        self.tunnel_token: str | None = None    # the SHA-256 of the tunnel's client's password

    @property
    def scratch(self) -> bytearray:
        if self._scratch is None:
            self._scratch = bytearray(CHUNK)
        return self._scratch

    def end_request(self) -> None:
        """The end event of the request served last, with its bytes: up, what went to the
        origin (request head and body); down, what went back to the client."""
        if self.ticket is not None:
            moved = None
            if self._marks is not None:
                up, up0, down0 = self._marks
                moved = (up.sent - up0, self.client.sent - down0)
            self.srv._ended(self.ticket, moved)
            self.ticket = None
            self._marks = None

    def drop_upstream(self) -> None:
        self.end_request()
        if self.upstream is not None:
            self.upstream.sock.close()
            self.upstream = None
            self.upstream_key = None

    async def reply(self, data: bytes) -> None:
        try:
            await self.client.send(data)
        except OSError:
            pass

    async def reply_to(self, method: str, data: bytes) -> None:
        """A reply of the proxy's own to a request: a ``HEAD`` gets its head only (a body
        would be read as the start of the next response)."""
        await self.reply(_head_only(data) if method == "HEAD" else data)

    async def refuse(self, code: int, what: str, method: str = "", host: str = "", port: int | None = None,
                     reason: str | None = None, address: str | None = None, private: bool = False) -> None:
        await self.reply_to(method, refusal_reply(code, reason, host, port, method, what, address, private))

    # ── the request loop ────────────────────────────────────────────────────

    async def run(self, deadline: float) -> Handoff | None:
        srv = self.srv
        loop = asyncio.get_running_loop()
        first = True
        while True:
            if not first:
                if not self.client.buf:
                    try:
                        if not await self.client.fill():
                            return None
                    except TimeoutError:
                        return None             # an idle keep-alive connection just ends
                deadline = loop.time() + srv.handshake_timeout
            first = False
            head = await self._read_head(deadline)
            if head is None:
                return None
            try:
                method, target, version, fields = relay.parsers.parse_http_head(head)
            except HeadError as e:
                srv.record(self.proto, "", None, "bad_request")
                await self.refuse(e.status, str(e))
                return None
            if self.origin is not None:
                admitted = await self._captured_target(method, target, version, fields)
                if not isinstance(admitted, str):
                    if admitted:
                        continue
                    return None
                target = admitted
            elif method == "CONNECT":
                self.drop_upstream()
                client, token = _proxy_credentials(_field_map(fields).get(b"proxy-authorization", []))
                return await srv.connect_after_forward(self.client.sock, target, self.client.buf, client, token)
            self.clock.start_exchange()
            outcome = await self._forward_one(method, target, version, fields)
            if outcome is None:
                return None
            if isinstance(outcome, tuple):
                return outcome

    async def _captured_target(self, method: str, target: str, version: str,
                               fields: list[tuple[bytes, bytes]]) -> str | bool:
        """A captured request's absolute-form target (``kodarelay.captured``: it always goes to
        the captured host, whose name its ``Host`` must give); else it was refused: True when
        the connection goes on (no body), False when it ends."""
        from .captured import host_header_names, refuse

        host, port = self.origin  # type: ignore[misc]
        shown = f"[{host}]" if ":" in host else host
        origin = target
        if not target.startswith("/"):
            try:
                named, _port, _authority, origin = relay.parsers.parse_absolute_target(target)
            except HeadError:
                named = ""
            if method == "CONNECT" or not host_header_names(named.encode("ascii", "replace"), host):
                self.srv.record(self.proto, host, port, "bad_request")
                await self.refuse(400, "a captured connection takes origin-form requests to its own host", method,
                                  host, port)
                return False
        fmap = _field_map(fields)
        wrong = [v for v in fmap.get(b"host", []) if not host_header_names(v, host)]
        if wrong:
            named = _printable(wrong[0].decode("latin-1"))
            refuse(self.srv, host, port, "host_mismatch", f"Host names {named}", method, protocol=self.proto)
            try:
                keep = not _body_framing(fmap)     # no body (none, or Content-Length: 0)
            except _BadRequest:
                keep = False
            keep = keep and version != "HTTP/1.0" and b"close" not in _tokens(fmap.get(b"connection", []))
            body = (f"kodarelay: {method} refused (host_mismatch): this connection was made to {shown}, "
                    f"its Host names {named}\n").encode("ascii", "replace")
            await self.reply_to(method, (f"HTTP/1.1 421 Misdirected Request\r\nX-Proxy-Error: host_mismatch\r\n"
                              f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                              f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode("ascii") + body)
            return keep
        return f"http://{shown}{'' if port == 80 else f':{port}'}{origin}"

    async def _read_head(self, deadline: float) -> bytes | None:
        srv = self.srv
        client = self.client
        while True:
            try:
                end = relay.parsers.http_head_end(client.buf, MAX_HEAD)
            except HeadError as e:
                srv.record(self.proto, "", None, "bad_request")
                await self.refuse(e.status, "request head too large")
                return None
            if end >= 0:
                head, client.buf = client.buf[:end], client.buf[end:]
                return head
            if not client.raw:
                try:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0 or not await asyncio.wait_for(client.fill(), left):
                        return None
                except (asyncio.TimeoutError, TimeoutError):
                    await self.refuse(408, "request head not received in time")
                    return None
                continue
            try:
                chunk = await srv.recv_some(client.sock, deadline, MAX_HEAD)
            except HandshakeTimeout:
                await self.refuse(408, "request head not received in time")
                return None
            if not chunk:
                return None
            self.clock.touch()
            client.buf += chunk

    async def _forward_one(self, method: str, target: str, version: str,
                           fields: list[tuple[bytes, bytes]]) -> bool | Handoff | None:
        """Forward one request; True to read the next one, a handoff for a tunnel, None to close."""
        srv = self.srv
        try:
            host, port, authority, origin = relay.parsers.parse_absolute_target(target)
        except HeadError as e:
            srv.record(self.proto, "", None, "bad_request")
            await self.refuse(400, str(e), method)
            return None
        fmap = _field_map(fields)
        try:
            body = _body_framing(fmap)
            if len(fmap.get(b"host", [])) > 1:
                raise _BadRequest("more than one Host")
            named = _connection_names_framing(fmap)
            if named is not None:
                raise _BadRequest(f"Connection names {named.decode('ascii', 'replace')}, which is not hop-by-hop")
        except _BadRequest as e:
            srv.record(self.proto, host, port, "bad_request")
            await self.refuse(400, str(e), method, host, port)
            return None
        upgrade = _is_websocket_upgrade(fmap)
        key = (host, port)
        # (a captured request names no client: its Proxy-Authorization was meant for no proxy;
        # inside an inspected tunnel the tunnel's client is every request's)
        if self.tunnel is not None:
            client, token = self.tunnel.client, self.tunnel_token
        elif self.origin is None:
            client, token = _proxy_credentials(fmap.get(b"proxy-authorization", []))
        else:
            client, token = None, None
        # The path is part of the record only where a rule judges it (a host with request
        # rules); elsewhere events and violations keep host and port only, as a path may carry
        # a token. Never the query.
        inspected = self.tunnel is not None
        judged = inspected or srv.dialer_for(client).policy.filter.has_request_rules(host, port)
        shown = shown_path(origin) if srv.secrets is None else srv.secrets.redact(shown_path(origin))
        path = shown if judged else None
        self.end_request()
        refused = self._request_refusal(method, host, port, origin, client) if judged else None
        if refused is not None and refused[0] == "request_not_allowed" and srv.dialer.policy.decider is not None:
            from .events import Request

            verdict = await srv.dialer.ask_request(Request(self.proto, method, host, port, client, shown))
            refused = None if verdict == "allow" else (verdict, None, None)
        swapped: tuple[str, ...] = ()
        if refused is None and srv.secrets is not None:
            outcome = srv.secrets.check(host, port, origin, fields, self.over_tls)
            if isinstance(outcome, Leak):
                refused = (outcome.reason, f"secret {outcome.name}", ",".join(outcome.hosts))
            elif outcome is not None:
                origin, fields, swapped = outcome
        if refused is not None:
            reason, detail, rule = refused
            srv.record(self.proto, host, port, reason, client, detail, method=method, path=shown)
            srv.emit(Event(time.time(), "refuse", self.proto, method, host, port, client, reason, rule, "rule",
                           self.tunnel.id if self.tunnel is not None else None, detail=detail, path=shown,
                           inspected=inspected))
            keep = not body and version != "HTTP/1.0" and b"close" not in _tokens(fmap.get(b"connection", []))
            await self.reply_to(method, request_refusal(reason, method, host, port, shown, detail, rule, keep))
            return True if keep else None
        try:
            plan, ticket = await _judge(srv, method, host, port, client, path, self.proto, self.tunnel, swapped, token)
            if self.upstream is None or self.upstream_key != key:
                self.drop_upstream()
                self.upstream = await self._connect(plan, ticket, method, client)
                self.upstream_key = key
            self.ticket = ticket
            assert self.upstream is not None
            self._marks = (self.upstream, self.upstream.sent, self.client.sent)
        except Refusal as r:
            self.drop_upstream()
            await self.refuse(r.http_status, (r.detail or "") if r.address else str(r), method, host, port, r.reason,
                              r.address, r.private)
            return None
        assert self.upstream is not None
        up = self.upstream
        client_close = version == "HTTP/1.0" or b"close" in _tokens(fmap.get(b"connection", []))
        request = self._rebuild(method, version, origin, authority, fields, fmap, upgrade)
        log.debug("forwarding %s to %s:%d", method, host, port)
        try:
            await up.send(request)
        except OSError as e:
            self.drop_upstream()
            log.info("http forward to %s:%d failed: %s", host, port, e)
            await self.refuse(502, "the upstream connection failed", method, host, port)
            return None
        upload: asyncio.Task[None] | None = None
        failed: list[BaseException] = []
        me = asyncio.current_task()
        assert me is not None

        def upload_done(t: asyncio.Task[None]) -> None:
            # A request body that breaks (bad chunk, client gone, idle) ends the exchange even
            # while the response side is waiting on an upstream that waits for that body.
            if not t.cancelled() and t.exception() is not None:
                failed.append(t.exception())  # type: ignore[arg-type]
                me.cancel()

        if body:
            upload = asyncio.ensure_future(self._upload(body))
            upload.add_done_callback(upload_done)
        self.sent_any = False
        try:
            return await self._respond(method, host, port, up, upload, client_close, upgrade)
        except asyncio.CancelledError:
            if not failed:
                raise
            if hasattr(me, "uncancel"):
                me.uncancel()
            self.drop_upstream()
            log.info("http forward to %s:%d: request body failed: %s", host, port, failed[0])
            if isinstance(failed[0], _BadRequest) and not self.sent_any:
                srv.record(self.proto, host, port, "bad_request")
                await self.refuse(400, str(failed[0]), method, host, port)
            return None
        finally:
            if upload is not None:
                upload.remove_done_callback(upload_done)
                if not upload.done():
                    upload.cancel()
                    try:
                        await upload
                    except BaseException:
                        pass

    async def _connect(self, plan: Plan, ticket: Ticket, method: str, client: str | None) -> _Stream:
        """The upstream of an allowed request: the origin, or the upstream proxy itself
        (which then gets the absolute-form request); a refusal is raised."""
        sock = await _open_upstream(self.srv, plan, ticket, method, client, self.proto)
        sock.setblocking(False)
        self.via_proxy = plan.upstream if plan.kind == CHAIN else None
        return _Stream(sock, self.clock)

    def _request_refusal(self, method: str, host: str, port: int, origin: str,
                         client: str | None = None) -> tuple[str, str | None, str | None] | None:
        """``(reason, detail, rule)`` when request rules refuse this request (its host is
        admitted by them, the request itself is not), else None: host-level refusals are the
        plan's to make, with the decider and the guard."""
        flt = self.srv.dialer_for(client).policy.filter
        if not flt.has_request_rules(host, port):
            return None
        decision = flt.explain_request(host, port, method, origin)
        if decision.reason in ("request_not_allowed", "request_denied", "bad_path"):
            return decision.reason, decision.detail or None, decision.rule
        return None

    def _rebuild(self, method: str, version: str, origin: str, authority: str,
                 fields: list[tuple[bytes, bytes]], fmap: dict[bytes, list[bytes]], upgrade: bool) -> bytes:
        drop = _drop_set(fmap, upgrade) | REWRITTEN
        # through an upstream proxy the absolute form again, rebuilt (no userinfo, no fragment)
        line = f"{method} {'http://' + authority + origin if self.via_proxy is not None else origin} {version}\r\n"
        out = [line.encode("ascii"), b"Host: ", authority.encode("ascii"), b"\r\n"]
        for name, value in fields:
            if name.lower() not in drop:
                out += [name, b": ", value, b"\r\n"]
        if upgrade:
            out.append(b"Connection: Upgrade\r\n")
        auth = proxy_authorization(self.via_proxy) if self.via_proxy is not None else None
        if auth is not None:
            out.append(f"{auth}\r\n".encode("ascii"))
        out.append(b"\r\n")
        return b"".join(out)

    async def _upload(self, body: int) -> None:
        assert self.upstream is not None
        if body == -1:
            await _copy_chunked(self.client, self.upstream, bytearray(CHUNK))
        else:
            await _copy_body(self.client, self.upstream, body, bytearray(min(CHUNK, max(body, 1))))

    async def _respond(self, method: str, host: str, port: int, up: _Stream, upload: asyncio.Task[None] | None,
                       client_close: bool, upgrade: bool) -> bool | Handoff | None:
        try:
            while True:
                head = await self._read_response_head(up, upload)
                status, fields = relay.parsers.parse_response_head(head)
                if self.over_tls and self.srv.secrets is not None:
                    fields = self.srv.secrets.unswap(host, port, fields)
                fmap = _field_map(fields)
                if status == 101:
                    if not upgrade:
                        raise _BadUpstream("101 without an upgrade request")
                    await self.client.send(self._response_head(head, fields, fmap, True, False))
                    if self.ticket is not None:
                        self.ticket.status = 101
                    if not (up.raw and self.client.raw):
                        await _pipe(self.client, up, self.scratch)    # a decrypted WebSocket: copied here
                        self.drop_upstream()
                        return None
                    sock = up.sock
                    self.upstream = None
                    self.upstream_key = None
                    ticket, self.ticket = self.ticket, None
                    assert ticket is not None
                    return sock, self.client.buf, up.buf, ticket
                if 100 <= status < 200:
                    await self.client.send(self._response_head(head, fields, fmap, False, False))
                    self.sent_any = True
                    continue
                break
            if self.ticket is not None:
                self.ticket.status = status
            named = _connection_names_framing(fmap)
            if named is not None:
                raise _BadUpstream(f"response Connection names {named.decode('ascii', 'replace')}")
            no_body = method == "HEAD" or status in (204, 304)
            length: int | None = 0
            if not no_body:
                te = fmap.get(b"transfer-encoding")
                if te is not None:
                    length = -1 if _tokens(te)[-1:] == [b"chunked"] else None
                elif b"content-length" in fmap:
                    try:
                        length = _content_length(fmap[b"content-length"])
                    except ValueError:
                        raise _BadUpstream("malformed Content-Length from upstream") from None
                else:
                    length = None           # close-delimited
            upload_done = upload is None or upload.done()
            reusable = (
                length is not None
                and not head.startswith(b"HTTP/1.0")
                and b"close" not in _tokens(fmap.get(b"connection", []))
            )
            # an inspected tunnel holds one origin connection: when it cannot go on, neither can
            # the tunnel (the engine's machine does the same)
            close = client_close or length is None or (self.tunnel is not None and not reusable)
            # with Transfer-Encoding, a Content-Length is never forwarded (RFC 9112 §6.3)
            await self.client.send(self._response_head(head, fields, fmap, False, close or not upload_done,
                                                       drop_length=b"transfer-encoding" in fmap))
            self.sent_any = True
            if length == -1:
                await _copy_chunked(up, self.client, self.scratch)
            elif length is None:
                await _copy(up, self.client, None, self.scratch)
            elif length:
                await _copy_body(up, self.client, length, self.scratch)
        except (_BadUpstream, _BadRequest, HeadError) as e:
            self.drop_upstream()
            log.info("http forward to %s:%d failed: %s", host, port, e)
            if not self.sent_any:
                await self.refuse(502, "the upstream answered with malformed HTTP", method, host, port)
            return None
        except ConnectionError as e:
            self.drop_upstream()
            log.info("http forward to %s:%d failed: %s", host, port, e)
            if not self.sent_any:
                await self.refuse(502, "the upstream closed the connection", method, host, port)
            return None
        if upload is not None:
            if not upload.done():
                self.drop_upstream()
                return None         # the body is still coming: this connection cannot go on
            if upload.exception() is not None:
                self.drop_upstream()
                return None
        if not reusable or up.buf:
            self.drop_upstream()
        return None if close else True

    async def _read_response_head(self, up: _Stream, upload: asyncio.Task[None] | None) -> bytes:
        while True:
            try:
                end = relay.parsers.http_head_end(up.buf, MAX_RESPONSE_HEAD)
            except HeadError:
                raise _BadUpstream("response head too large") from None
            if end >= 0:
                head, up.buf = up.buf[:end], up.buf[end:]
                return head
            if upload is not None and upload.done() and upload.exception() is not None:
                exc = upload.exception()
                if isinstance(exc, _BadRequest):
                    raise exc
                raise ConnectionResetError(f"request body failed: {exc}")
            if not await up.fill():
                raise ConnectionResetError("upstream closed before its response head")

    def _response_head(self, head: bytes, fields: list[tuple[bytes, bytes]], fmap: dict[bytes, list[bytes]],
                       upgrade: bool, close: bool, drop_length: bool = False) -> bytes:
        drop = _drop_set(fmap, upgrade)
        if drop_length:
            drop.add(b"content-length")
        out = [head[: head.find(b"\r\n") + 2]]
        for name, value in fields:
            if name.lower() not in drop:
                out += [name, b": ", value, b"\r\n"]
        if upgrade:
            out.append(b"Connection: Upgrade\r\n")
        elif close:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        return b"".join(out)


async def forward_session(srv: ProxyServer, conn: socket.socket, buf: bytes, deadline: float) -> Handoff | None:
    """Serve the absolute-form requests of one client connection whose first bytes are ``buf``.

    Returns a handoff when the connection becomes a tunnel (a WebSocket ``101``, or a
    CONNECT after forwarded requests); None when it is done. Upstream sockets it opened are
    closed on every exit path.
    """
    ex = _Exchange(srv, conn)
    ex.client.buf = buf
    try:
        return await ex.run(deadline)
    finally:
        ex.drop_upstream()


async def captured_session(srv: ProxyServer, conn: socket.socket, host: str, port: int, buf: bytes,
                           deadline: float) -> Handoff | None:
    """Serve the requests of a captured plain-HTTP connection to ``host:port`` (``kodarelay.captured``):
    each one judged and forwarded as above, recorded with protocol ``"capture"``."""
    from .captured import PROTOCOL

    ex = _Exchange(srv, conn, PROTOCOL, (host, port))
    ex.client.buf = buf
    try:
        return await ex.run(deadline)
    finally:
        ex.drop_upstream()


def engine_forwarding(srv: ProxyServer, data: bytes) -> tuple[Target, Plan, tuple[Any, ...]] | None:
    """Whether the engine can serve a forwarded connection whose first bytes are ``data``
    (``kodarelay/_inspect.c`` in forwarding mode): its first request parses, names no proxy
    user, and its host's plan is known now and direct; the server takes no events or
    metrics and has no decider or named clients. Returns the request's target and plan and
    what ``_Handshake.dial(inspect=…)`` takes, else None (the asyncio path serves it). A
    later request the engine does not serve (another host, a proxy user, an error reply it
    does not write) hands the connection back to ``forward_session``.
    ``KODARELAY_NO_ENGINE_FORWARD=1`` keeps forwarding on the asyncio path."""
    rules_type = getattr(relay.impl, "RequestRules", None)
    if rules_type is None or relay.env_flag("KODARELAY_NO_ENGINE_FORWARD"):
        return None
    if srv._closed or not srv._engine_takes_requests():
        return None
    parsers = relay.parsers
    try:
        end = parsers.http_head_end(data, MAX_HEAD)
        if end < 0:
            return None
        method, target, _version, fields = parsers.parse_http_head(data[:end])
        host, port, _authority, _origin = parsers.parse_absolute_target(target)
    except HeadError:
        return None
    if method == "CONNECT" or host.startswith("[") or any(k.lower() == b"proxy-authorization" for k, _ in fields):
        return None
    first = Target(host, port, b"", method, None)
    plan = srv._plan_now(first)
    if plan is None or plan.kind != DIRECT_PLAN:
        return None
    judged, rules = srv.dialer.policy.filter.request_program(plan.host, plan.port)
    table = srv.secrets.engine_table(plan.host, plan.port) if srv.secrets else None
    return first, plan, (None, None, rules_type(judged, rules), plan.host, None, table, True)


def request_refusal(reason: str, method: str, host: str, port: int, path: str, detail: str | None,
                    rule: str | None, keep_alive: bool) -> bytes:
    """A request refused by request rules, written for the reader: ``403`` (``400`` for
    ``bad_path``) with ``X-Proxy-Error``, one line naming method, host, path and what would
    admit it; the connection stays open when the refused request had no body."""
    shown = f"[{host}]" if ":" in host else host
    where = f"{shown}:{port}{path}"
    if reason == "request_denied":
        why = f"a deny rule matches it ({rule})"
    elif reason == "secret_leak":
        why = f"it carries the phantom of {detail}, which goes only to {rule}"
    elif reason == "secret_plaintext":
        why = f"the phantom of {detail} is swapped for its value only over HTTPS; use https://"
    elif reason == "bad_path":
        why = f"{detail}; paths must be plain on hosts with request rules"
    else:
        at = shown if port in (80, 443) else f"{shown}:{port}"
        why = f"allow it with --allow '{method} {at}{path}'"
    body = f"kodarelay: {method} {where} refused ({reason}); {why}\n".encode("ascii", "replace")
    code, text = (400, "Bad Request") if reason == "bad_path" else (403, "Forbidden")
    head = (f"HTTP/1.1 {code} {text}\r\nX-Proxy-Error: {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("ascii") + body


# ── the policy: the one place forwarding asks it ─────────────────────────────


async def _judge(srv: ProxyServer, method: str, host: str, port: int, client: str | None,
                 path: str | None = None, proto: str = "http", tunnel: Ticket | None = None,
                 secrets: tuple[str, ...] = (), token: str | None = None) -> tuple[Plan, Ticket]:
    """The server's one plan for ``host:port`` (filter, decider, guard, upstream), recorded
    like a CONNECT's (violation and refuse event, or allow event, with the request's method
    and ``path``); a refusal is raised."""
    target = Target(host, port, b"", method, client, token=token)
    plan = await srv._plan(proto, target)
    ticket = srv._judged(proto, target, plan, path, tunnel, tunnel is not None, secrets)
    if ticket is None:
        assert plan.refusal is not None
        raise plan.refusal
    return plan, ticket


async def _open_upstream(srv: ProxyServer, plan: Plan, ticket: Ticket, method: str,
                         client: str | None, proto: str = "http") -> socket.socket:
    """Execute an allowed plan: connect to the checked addresses, or to the upstream proxy
    itself (which then gets the absolute-form request with its Basic credentials)."""
    target = Target(plan.host, plan.port, b"", method, client)
    if plan.kind == CHAIN:
        assert plan.upstream is not None
        try:
            return await _open_proxy(plan.upstream, srv.dialer.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            r = Refusal(f"cannot reach upstream proxy {plan.upstream}: {e}", http_status=502,
                        socks_rep=REP_CONNECTION_REFUSED)
            srv._unreachable(proto, target, plan, r, ticket)
            raise r from None
    try:
        sock, _ = await srv.dialer.connect(plan)
    except Refusal as r:
        srv._unreachable(proto, target, plan, r, ticket)
        raise
    return sock


__all__ = ["captured_session", "forward_session"]

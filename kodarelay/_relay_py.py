"""Pure-Python relay engine and protocol parsers: the readable specification.

``kodarelay._relay`` (Cython) is a drop-in for this module: same functions, same results,
same exception types. ``kodarelay.relay`` picks one of the two at import.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from ._errors import HeadError, Socks5Error

__all__ = [
    "HeadError",
    "Socks5Error",
    "http_head_end",
    "parse_request_line",
    "split_host_port",
    "parse_http_head",
    "parse_response_head",
    "parse_absolute_target",
    "parse_socks5_greeting",
    "parse_socks5_request",
    "relay_with_timeouts",
]

MAX_HEAD = 8192
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


# ── HTTP CONNECT head ────────────────────────────────────────────────────────


def http_head_end(buf: bytes, max_size: int = MAX_HEAD) -> int:
    """Offset just past the blank line ending the head in ``buf``, or -1 if not there yet.

    Raises ``HeadError(431)`` once ``max_size`` bytes hold no complete head: the limit
    applies to the head itself, bytes after it (an early TLS ClientHello) do not count.
    """
    end = buf.find(b"\r\n\r\n", 0, max_size)
    if end >= 0:
        return end + 4
    if len(buf) >= max_size:
        raise HeadError(431, f"request head exceeds {max_size} bytes")
    return -1


def parse_request_line(head: bytes) -> tuple[str, str, str]:
    """``(method, target, version)`` from the first line of a request head.

    The line must be exactly ``METHOD SP TARGET SP HTTP/d.d``: a token method, a target of
    visible ASCII, single spaces. Anything else is ``HeadError(400)``.
    """
    eol = head.find(b"\r\n")
    line = head if eol < 0 else head[:eol]
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HeadError(400, "malformed request line")
    method, target, version = parts
    if not method or any(c not in _TOKEN_CHARS for c in method):
        raise HeadError(400, "malformed method")
    if not target or any(c <= 0x20 or c >= 0x7F for c in target):
        raise HeadError(400, "malformed request target")
    if (
        len(version) != 8
        or not version.startswith(b"HTTP/")
        or not (0x30 <= version[5] <= 0x39)
        or version[6] != 0x2E
        or not (0x30 <= version[7] <= 0x39)
    ):
        raise HeadError(400, "malformed HTTP version")
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def split_host_port(authority: str) -> tuple[str, int]:
    """Split a CONNECT authority ``host:port`` / ``[v6]:port`` into ``(host, port)``.

    The port is required and must be 1-65535 written in plain decimal digits (no sign, no
    spaces). The host is returned exactly as written, brackets included, so the filter can
    refuse ``[github.com]`` rather than see ``github.com``; judging the host is its job.
    Anything else is ``HeadError(400)``.
    """
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1 : close + 2] != ":":
            raise HeadError(400, "malformed bracketed host")
        host = authority[: close + 1]
        port_s = authority[close + 2 :]
        if close == 1:
            raise HeadError(400, "empty host")
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep or not host or ":" in host or "[" in host or "]" in host:
            raise HeadError(400, "target must be host:port")
    if not port_s or len(port_s) > 5 or not all("0" <= c <= "9" for c in port_s):
        raise HeadError(400, "malformed port")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise HeadError(400, "port out of range")
    return host, port


# ── HTTP/1.1 heads for plain-HTTP forwarding ─────────────────────────────────
#
# Strict on purpose: a proxy that reads a head differently from the server behind it is how
# requests get smuggled, so anything RFC 9112 lets a recipient "tolerate" is refused here.

_VALUE_BAD = frozenset(set(range(0x00, 0x20)) - {0x09} | {0x7F})


def _parse_fields(head: bytes, start: int) -> list[tuple[bytes, bytes]]:
    """Header fields from ``head[start:]`` (which ends with the blank line), as written.

    Every line ends CRLF; a NUL, a bare CR or LF, an obs-fold continuation line, a name that
    is not a token (whitespace before the colon included) or a control byte in a value is
    ``HeadError(400)``. Values lose their leading and trailing SP / HTAB.
    """
    fields: list[tuple[bytes, bytes]] = []
    n = len(head)
    pos = start
    while True:
        eol = head.find(b"\r\n", pos)
        if eol < 0:
            raise HeadError(400, "head does not end with CRLF CRLF")
        if eol == pos:
            if eol + 2 != n:
                raise HeadError(400, "bytes after the blank line")
            return fields
        line = head[pos:eol]
        if line[0] in (0x20, 0x09):
            raise HeadError(400, "obs-fold in header")
        colon = line.find(b":")
        if colon <= 0:
            raise HeadError(400, "malformed header line")
        name = line[:colon]
        if any(c not in _TOKEN_CHARS for c in name):
            raise HeadError(400, "malformed header name")
        value = line[colon + 1 :].strip(b" \t")
        if any(c in _VALUE_BAD for c in value):
            raise HeadError(400, "control byte in header value")
        fields.append((name, value))
        pos = eol + 2


def _check_line_ends(head: bytes) -> None:
    if b"\x00" in head:
        raise HeadError(400, "NUL in head")
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        raise HeadError(400, "bare CR or LF in head")


def parse_http_head(head: bytes) -> tuple[str, str, str, list[tuple[bytes, bytes]]]:
    """``(method, target, version, fields)`` from a complete request head (ending CRLF CRLF).

    The request line follows ``parse_request_line``; ``fields`` are ``(name, value)`` byte
    pairs in order, names as written. NUL, bare CR / LF, obs-fold, a malformed name or a
    control byte in a value: ``HeadError(400)``.
    """
    _check_line_ends(head)
    method, target, version = parse_request_line(head)
    return method, target, version, _parse_fields(head, head.find(b"\r\n") + 2)


def parse_response_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """``(status, fields)`` from a complete response head (ending CRLF CRLF).

    The status line is ``HTTP/d.d SP 3DIGIT [SP reason]``; fields as in ``parse_http_head``.
    Anything else is ``HeadError(502)``: the upstream, not the client, sent it.
    """
    try:
        _check_line_ends(head)
        eol = head.find(b"\r\n")
        line = head[:eol]
        if (
            eol < 12
            or not line.startswith(b"HTTP/")
            or not (0x30 <= line[5] <= 0x39)
            or line[6] != 0x2E
            or not (0x30 <= line[7] <= 0x39)
            or line[8] != 0x20
            or not all(0x30 <= c <= 0x39 for c in line[9:12])
            or (len(line) > 12 and line[12] != 0x20)
            or any(c in _VALUE_BAD for c in line[12:])
        ):
            raise HeadError(400, "malformed status line")
        return int(line[9:12]), _parse_fields(head, eol + 2)
    except HeadError as e:
        raise HeadError(502, f"upstream sent {e}") from None


def parse_absolute_target(target: str) -> tuple[str, int, str, str]:
    """``(host, port, authority, origin)`` from an absolute-form ``http://`` request target.

    ``host`` is as written (brackets kept, for the filter to judge), ``port`` defaults to 80,
    ``authority`` is what the URI named (the forwarded ``Host``), ``origin`` the path and
    query (``/`` when empty; the fragment dropped). An origin-form or authority-form target,
    another scheme (``https://`` goes through CONNECT), userinfo, an empty host or a bad
    port is ``HeadError(400)``.
    """
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HeadError(400, "request target is not in absolute form")
    scheme = scheme.lower()
    if scheme != "http":
        raise HeadError(400, "only http:// is forwarded (use CONNECT for https)")
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise HeadError(400, "userinfo in request target")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise HeadError(400, "malformed bracketed host")
        host, after = authority[: close + 1], authority[close + 1 :]
        if close == 1:
            raise HeadError(400, "empty host")
        if after and after[0] != ":":
            raise HeadError(400, "malformed bracketed host")
        port_s = after[1:] if after else None
    else:
        host, sep, port_s_ = authority.partition(":")
        port_s = port_s_ if sep else None
        if "[" in host or "]" in host:
            raise HeadError(400, "malformed host")
    if not host:
        raise HeadError(400, "empty host")
    port = 80
    if port_s is not None:
        if not port_s or len(port_s) > 5 or not all("0" <= c <= "9" for c in port_s):
            raise HeadError(400, "malformed port")
        port = int(port_s)
        if not 1 <= port <= 65535:
            raise HeadError(400, "port out of range")
    hash_at = tail.find("#")
    if hash_at >= 0:
        tail = tail[:hash_at]
    if not tail.startswith("/"):
        tail = "/" + tail
    return host, port, authority, tail


# ── SOCKS5 (RFC 1928 subset) ─────────────────────────────────────────────────


def parse_socks5_greeting(buf: bytes) -> tuple[int, bytes] | None:
    """``(consumed, methods)`` from a client greeting, or None if more bytes are needed.

    A version other than 5 is ``Socks5Error(None)``: not SOCKS5, close without a reply.
    """
    if len(buf) < 1:
        return None
    if buf[0] != 5:
        raise Socks5Error(None, f"unsupported SOCKS version {buf[0]}")
    if len(buf) < 2:
        return None
    n = buf[1]
    if len(buf) < 2 + n:
        return None
    return 2 + n, bytes(buf[2 : 2 + n])


def parse_socks5_request(buf: bytes) -> tuple[int, int, int, str, int] | None:
    """``(consumed, cmd, atyp, host, port)`` from a request, or None if more bytes are needed.

    ``host`` is the domain for ATYP 3 and the address text for IPv4 / IPv6 literals (the
    server refuses those, but logs what was asked). Version other than 5 or an unknown
    ATYP: ``Socks5Error(None)`` (close). Empty or non-UTF-8 domain: ``Socks5Error(1)``.
    """
    if len(buf) < 1:
        return None
    if buf[0] != 5:
        raise Socks5Error(None, f"unsupported SOCKS version {buf[0]}")
    if len(buf) < 4:
        return None
    cmd = buf[1]
    atyp = buf[3]
    if atyp == 1:
        end = 4 + 4
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(buf[4:end]))
    elif atyp == 4:
        end = 4 + 16
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET6, bytes(buf[4:end]))
    elif atyp == 3:
        if len(buf) < 5:
            return None
        n = buf[4]
        end = 5 + n
        if len(buf) < end + 2:
            return None
        if n == 0:
            raise Socks5Error(1, "empty domain name")
        try:
            host = bytes(buf[5:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise Socks5Error(1, "domain name is not UTF-8") from None
    else:
        raise Socks5Error(None, f"unknown address type {atyp}")
    port = (buf[end] << 8) | buf[end + 1]
    return end + 2, cmd, atyp, host, port


# ── Relay ────────────────────────────────────────────────────────────────────

_CHUNK = 256 * 1024
# One copy buffer per thread, shared by every tunnel of that thread's event loop: a tunnel
# reads into it and sends from it with no await in between, so it is never shared in
# flight. An idle tunnel therefore holds no buffer at all; only the unsent tail of a
# partial send is copied out (and kept until the slow reader takes it).
_buffers = threading.local()


def _copy_buffer() -> tuple[bytearray, memoryview]:
    pair = getattr(_buffers, "pair", None)
    if pair is None:
        buf = bytearray(_CHUNK)
        pair = _buffers.pair = (buf, memoryview(buf))
    return pair


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable) without holding a buffer."""
    fut = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def relay_with_timeouts(
    a: socket.socket, b: socket.socket, idle: float = 300.0, total: float = 3600.0
) -> tuple[int, int]:
    """Copy bytes both ways between ``a`` and ``b`` until both directions reach EOF.

    Returns ``(a_to_b, b_to_a)`` byte counts. EOF on one side half-closes the other and the
    reverse direction keeps flowing. ``TimeoutError`` when ``total`` seconds pass, or when no
    byte moved in *either* direction for ``idle`` seconds (a long download whose client is
    silent is not idle). The relay owns both sockets and closes them on every exit path.
    """
    loop = asyncio.get_running_loop()
    try:
        a.setblocking(False)
        b.setblocking(False)
    except BaseException:
        # the relay owns both sockets on every exit path, this one too (e.g. one already closed)
        a.close()
        b.close()
        raise
    last = [time.monotonic()]

    async def pump(src: socket.socket, dst: socket.socket) -> int:
        moved = 0
        while True:
            buf, view = _copy_buffer()
            try:
                n = src.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                await _ready(loop, src, write=False)
                continue
            if n == 0:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return moved
            last[0] = time.monotonic()
            try:
                sent = dst.send(view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            rest = bytes(view[sent:n]) if sent < n else b""  # the shared buffer is reused once we await
            while rest:
                await _ready(loop, dst, write=True)
                try:
                    rest = rest[dst.send(rest) :]
                except (BlockingIOError, InterruptedError):
                    continue
                last[0] = time.monotonic()  # a slow reader taking bytes is not idle
            last[0] = time.monotonic()
            moved += n

    start = time.monotonic()
    ab = asyncio.ensure_future(pump(a, b))
    ba = asyncio.ensure_future(pump(b, a))
    tasks = {ab, ba}
    try:
        pending = tasks
        while pending:
            now = time.monotonic()
            wake = min(start + total, last[0] + idle)
            if now >= wake:
                if now >= start + total:
                    raise TimeoutError(f"relay exceeded total timeout of {total}s")
                raise TimeoutError(f"relay idle for {idle}s")
            done, pending = await asyncio.wait(pending, timeout=wake - now, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise OSError from a direction
        return ab.result(), ba.result()
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:
            if not t.done():
                try:
                    await t
                except BaseException:
                    pass
        for t in tasks:
            if not t.cancelled():
                t.exception()   # both directions may fail at once: the second error is seen too
        a.close()
        b.close()

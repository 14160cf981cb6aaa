# cython: language_level=3
"""The compiled relay: the protocol parsers' twin and the GIL-free relay engine.

What this module holds:

* Parsers (this file): the same signatures, results and exception types as the pure-Python
  twin ``kodarelay._relay_py``, which is the readable specification;
  ``tests/test_parsers_differential.py`` holds the two to that.
* ``relay_with_timeouts`` and the engine controls (``set_engine_threads``, ``set_splice_enabled``,
  ``set_pipe_size``, ``engine_stats``, ``shutdown_engine``).
* The native handshake front-end: ``native_listen`` serves a listening socket's accepts and
  handshakes in the engine (``_NativeListener``, ``_Handshake``, ``DialError``).

Declarations (system calls, constants, structs) are in ``_relay.pxd``, small C helpers in
``_engine.h``; the engine is one ``.pxi`` per concept, included at the end of this file:
``_helpers`` (shared helpers, global switches), ``_pools`` (pipes and buffers), ``_timers``
(deadline heap, run queue), ``_splice`` (moving bytes), ``_frontend`` (accept, handshakes),
``_plans`` (cached tunnel plans), ``_dialer`` (native connect, chaining), ``_completer`` (delivery to Python), ``_worker`` (the epoll loop),
``_engine_py`` (the engine's Python side) and ``_listener_py`` (the front-end's Python side).

Engine design
-------------
* ``relay_with_timeouts`` detaches the two sockets' fds from their Python objects (so no
  Python-side close can race with the engine; from then on the engine alone owns them),
  wraps them in a ``Tunnel`` (a malloc'd C struct) and hands it to one engine worker.
* A worker is a thread that runs an epoll loop entirely inside ``with nogil``. Both fds are
  registered edge-triggered (IN|OUT|RDHUP); an event on fd X services the direction reading
  X (readable) and/or the direction writing X (writable), each until EAGAIN or a budget.
* Data moves with splice(2) socket -> pipe -> socket, Go's ``internal/poll/splice_linux.go``
  discipline: "drain" (socket -> pipe) only starts when the pipe is empty, "pump"
  (pipe -> socket) empties it; a partial pump leaves the bytes in the pipe until the
  destination is writable again. Pipes come from a per-worker pool only while bytes are in
  flight, so an idle tunnel holds no pipe. Where the kernel refuses splice (EINVAL/ENOSYS)
  the direction falls back to recv/send through a pooled buffer; ``set_splice_enabled``
  (or ``KODARELAY_NO_SPLICE``) forces the copy path globally.
* Idle / total deadlines live in a per-worker binary heap keyed by a lower bound of each
  tunnel's deadline; activity only moves a deadline later, so the heap is fixed lazily when
  its top expires. epoll_wait sleeps until the nearest key.
* Completion: the worker closes the fds and, once per loop iteration, hands the batch of
  finished tunnels to the engine's completer thread (mutex + condvar), which takes the GIL
  and calls ``loop.call_soon_threadsafe`` for each. Workers never wait for the GIL, so a
  busy event loop cannot stall other tunnels' bytes. Cancellation: the awaiting task flags
  the tunnel and wakes the worker through its eventfd; the worker closes the fds at once.
* Locking: each worker has one mutex guarding its submission / cancel lists, the
  ``finished`` flag, the waiter pointer, tunnel refcounts and eventfd writes. Nothing holds
  a worker or completer mutex while taking the GIL.
"""

import asyncio as _asyncio
import atexit as _atexit
import os as _os
import socket as _socket
import threading as _threading

from ._errors import HeadError, Socks5Error

cdef inline bint _tchar(unsigned char c) noexcept nogil:
    """An RFC 9110 token character (the engine's head reader and the parsers share it; the
    twin's table is ``_relay_py._TOKEN_CHARS``)."""
    if (c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5A) or (c >= 0x61 and c <= 0x7A):
        return True
    return (c == 0x21 or c == 0x23 or c == 0x24 or c == 0x25 or c == 0x26 or c == 0x27 or c == 0x2A
            or c == 0x2B or c == 0x2D or c == 0x2E or c == 0x5E or c == 0x5F or c == 0x60 or c == 0x7C
            or c == 0x7E)


def http_head_end(const unsigned char[:] buf, Py_ssize_t max_size=MAX_HEAD_DEFAULT):
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t limit = n if n < max_size else max_size
    cdef Py_ssize_t i
    for i in range(limit - 3):
        if buf[i] == 13 and buf[i + 1] == 10 and buf[i + 2] == 13 and buf[i + 3] == 10:
            return i + 4
    if n >= max_size:
        raise HeadError(431, f"request head exceeds {max_size} bytes")
    return -1


def parse_request_line(bytes head):
    cdef const unsigned char* p = head
    cdef Py_ssize_t n = len(head)
    cdef Py_ssize_t eol = head.find(b"\r\n")
    cdef Py_ssize_t end = n if eol < 0 else eol
    cdef Py_ssize_t s1 = -1, s2 = -1, i, spaces = 0
    for i in range(end):
        if p[i] == 32:
            spaces += 1
            if s1 < 0:
                s1 = i
            elif s2 < 0:
                s2 = i
    if spaces != 2:
        raise HeadError(400, "malformed request line")
    if s1 == 0:
        raise HeadError(400, "malformed method")
    for i in range(s1):
        if not _tchar(p[i]):
            raise HeadError(400, "malformed method")
    if s2 == s1 + 1:
        raise HeadError(400, "malformed request target")
    for i in range(s1 + 1, s2):
        if p[i] <= 0x20 or p[i] >= 0x7F:
            raise HeadError(400, "malformed request target")
    cdef const unsigned char* v = p + s2 + 1
    if (
        end - s2 - 1 != 8
        or memcmp(v, b"HTTP/", 5) != 0
        or not (v[5] >= 0x30 and v[5] <= 0x39)
        or v[6] != 0x2E
        or not (v[7] >= 0x30 and v[7] <= 0x39)
    ):
        raise HeadError(400, "malformed HTTP version")
    return (
        head[:s1].decode("ascii"),
        head[s1 + 1:s2].decode("ascii"),
        head[s2 + 1:end].decode("ascii"),
    )


def split_host_port(str authority):
    cdef Py_ssize_t close, i
    cdef str host, port_s, sep
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1:close + 2] != ":":
            raise HeadError(400, "malformed bracketed host")
        host = authority[:close + 1]
        port_s = authority[close + 2:]
        if close == 1:
            raise HeadError(400, "empty host")
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep or not host or ":" in host or "[" in host or "]" in host:
            raise HeadError(400, "target must be host:port")
    if not port_s or len(port_s) > 5:
        raise HeadError(400, "malformed port")
    cdef long port = 0
    cdef Py_UCS4 ch
    for ch in port_s:
        if ch < u"0" or ch > u"9":
            raise HeadError(400, "malformed port")
        port = port * 10 + (<long>ch - 48)
    if port < 1 or port > 65535:
        raise HeadError(400, "port out of range")
    return host, port


def parse_socks5_greeting(const unsigned char[:] buf):
    cdef Py_ssize_t n = buf.shape[0]
    if n < 1:
        return None
    if buf[0] != 5:
        raise Socks5Error(None, f"unsupported SOCKS version {buf[0]}")
    if n < 2:
        return None
    cdef Py_ssize_t m = buf[1]
    if n < 2 + m:
        return None
    return 2 + m, bytes(buf[2:2 + m])


def parse_socks5_request(const unsigned char[:] buf):
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t end, dn
    cdef int cmd, atyp
    if n < 1:
        return None
    if buf[0] != 5:
        raise Socks5Error(None, f"unsupported SOCKS version {buf[0]}")
    if n < 4:
        return None
    cmd = buf[1]
    atyp = buf[3]
    if atyp == 1:
        end = 8
        if n < end + 2:
            return None
        host = _socket.inet_ntop(_socket.AF_INET, bytes(buf[4:end]))
    elif atyp == 4:
        end = 20
        if n < end + 2:
            return None
        host = _socket.inet_ntop(_socket.AF_INET6, bytes(buf[4:end]))
    elif atyp == 3:
        if n < 5:
            return None
        dn = buf[4]
        end = 5 + dn
        if n < end + 2:
            return None
        if dn == 0:
            raise Socks5Error(1, "empty domain name")
        try:
            host = bytes(buf[5:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise Socks5Error(1, "domain name is not UTF-8") from None
    else:
        raise Socks5Error(None, f"unknown address type {atyp}")
    cdef int port = (buf[end] << 8) | buf[end + 1]
    return end + 2, cmd, atyp, host, port


include "_http1.pxi"
include "_helpers.pxi"
include "_pools.pxi"
include "_timers.pxi"
include "_splice.pxi"
include "_frontend.pxi"
include "_plans.pxi"
include "_clients.pxi"
include "_dialer.pxi"
include "_completer.pxi"
include "_inspect.pxi"
include "_worker.pxi"
include "_engine_py.pxi"
include "_listener_py.pxi"

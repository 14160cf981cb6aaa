# cython: language_level=3
"""Compiled twin of ``kodarelay._relay_py``: protocol parsers (and, once it lands, the relay engine).

Every function here has the same signature, results and exception types as its pure-Python
twin, which is the readable specification; ``tests/test_parsers_differential.py`` holds the
two to that.
"""

from libc.string cimport memcmp

import socket as _socket

from ._errors import HeadError, Socks5Error

DEF MAX_HEAD_DEFAULT = 8192


cdef inline bint _is_tchar(unsigned char c) noexcept:
    if (c >= 0x30 and c <= 0x39) or (c >= 0x41 and c <= 0x5A) or (c >= 0x61 and c <= 0x7A):
        return True
    return c in b"!#$%&'*+-.^_`|~"


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
        if not _is_tchar(p[i]):
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
include "_engine.pxi"

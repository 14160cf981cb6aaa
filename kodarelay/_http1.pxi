# HTTP/1.1 heads for plain-HTTP forwarding: the compiled twins of parse_http_head,
# parse_response_head and parse_absolute_target in _relay_py.py (the specification).
# Included by _relay.pyx; tests/test_forward_parsers.py holds the pair together.


cdef inline bint _value_bad(unsigned char c) noexcept:
    return (c < 0x20 and c != 0x09) or c == 0x7F


cdef int _check_line_ends(const unsigned char *p, Py_ssize_t n) except -1:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] == 0:
            raise HeadError(400, "NUL in head")
    for i in range(n):
        if p[i] == 13:
            if i + 1 >= n or p[i + 1] != 10:
                raise HeadError(400, "bare CR or LF in head")
        elif p[i] == 10:
            if i == 0 or p[i - 1] != 13:
                raise HeadError(400, "bare CR or LF in head")
    return 0


cdef list _parse_fields(bytes head, Py_ssize_t start):
    cdef const unsigned char *p = head
    cdef Py_ssize_t n = len(head)
    cdef Py_ssize_t pos = start, eol, colon, i, vs, ve
    cdef list fields = []
    while True:
        eol = head.find(b"\r\n", pos)
        if eol < 0:
            raise HeadError(400, "head does not end with CRLF CRLF")
        if eol == pos:
            if eol + 2 != n:
                raise HeadError(400, "bytes after the blank line")
            return fields
        if p[pos] == 0x20 or p[pos] == 0x09:
            raise HeadError(400, "obs-fold in header")
        colon = -1
        for i in range(pos, eol):
            if p[i] == 0x3A:
                colon = i
                break
        if colon <= pos:
            raise HeadError(400, "malformed header line")
        for i in range(pos, colon):
            if not _tchar(p[i]):
                raise HeadError(400, "malformed header name")
        vs = colon + 1
        ve = eol
        while vs < ve and (p[vs] == 0x20 or p[vs] == 0x09):
            vs += 1
        while ve > vs and (p[ve - 1] == 0x20 or p[ve - 1] == 0x09):
            ve -= 1
        for i in range(vs, ve):
            if _value_bad(p[i]):
                raise HeadError(400, "control byte in header value")
        fields.append((head[pos:colon], head[vs:ve]))
        pos = eol + 2


def parse_http_head(bytes head):
    _check_line_ends(head, len(head))
    method, target, version = parse_request_line(head)
    return method, target, version, _parse_fields(head, head.find(b"\r\n") + 2)


def parse_response_head(bytes head):
    cdef const unsigned char *p = head
    cdef Py_ssize_t eol, i
    try:
        _check_line_ends(p, len(head))
        eol = head.find(b"\r\n")
        if (
            eol < 12
            or memcmp(p, b"HTTP/", 5) != 0
            or not (p[5] >= 0x30 and p[5] <= 0x39)
            or p[6] != 0x2E
            or not (p[7] >= 0x30 and p[7] <= 0x39)
            or p[8] != 0x20
        ):
            raise HeadError(400, "malformed status line")
        for i in range(9, 12):
            if p[i] < 0x30 or p[i] > 0x39:
                raise HeadError(400, "malformed status line")
        if eol > 12 and p[12] != 0x20:
            raise HeadError(400, "malformed status line")
        for i in range(12, eol):
            if _value_bad(p[i]):
                raise HeadError(400, "malformed status line")
        return (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48), _parse_fields(head, eol + 2)
    except HeadError as e:
        raise HeadError(502, f"upstream sent {e}") from None


def parse_absolute_target(str target):
    cdef Py_ssize_t end, i, close
    cdef str scheme, sep, rest, authority, tail, host, after
    cdef object port_s
    cdef long port
    cdef Py_UCS4 ch
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HeadError(400, "request target is not in absolute form")
    if scheme.lower() != "http":
        raise HeadError(400, "only http:// is forwarded (use CONNECT for https)")
    end = len(rest)
    for i in range(len(rest)):
        ch = rest[i]
        if ch == u"/" or ch == u"?" or ch == u"#":
            end = i
            break
    authority = rest[:end]
    tail = rest[end:]
    if "@" in authority:
        raise HeadError(400, "userinfo in request target")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise HeadError(400, "malformed bracketed host")
        host = authority[:close + 1]
        after = authority[close + 1:]
        if close == 1:
            raise HeadError(400, "empty host")
        if after and after[0] != u":":
            raise HeadError(400, "malformed bracketed host")
        port_s = after[1:] if after else None
    else:
        host, sep, rest = authority.partition(":")
        port_s = rest if sep else None
        if "[" in host or "]" in host:
            raise HeadError(400, "malformed host")
    if not host:
        raise HeadError(400, "empty host")
    port = 80
    if port_s is not None:
        if not port_s or len(port_s) > 5:
            raise HeadError(400, "malformed port")
        port = 0
        for ch in <str>port_s:
            if ch < u"0" or ch > u"9":
                raise HeadError(400, "malformed port")
            port = port * 10 + (<long>ch - 48)
        if port < 1 or port > 65535:
            raise HeadError(400, "port out of range")
    i = tail.find("#")
    if i >= 0:
        tail = tail[:i]
    if not tail.startswith("/"):
        tail = "/" + tail
    return host, port, authority, tail

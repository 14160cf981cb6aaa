"""CONNECT and SOCKS5 parsers: each test runs against the compiled module and its twin."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kodarelay import _relay_py
from kodarelay._errors import HeadError, Socks5Error
from kodarelay.relay import env_flag


def test_compiled_parsers_loaded():
    """Guard: unless told otherwise, the servers really use the compiled parsers."""
    import kodarelay.relay as r

    if env_flag("KODARELAY_NO_EXTENSIONS"):
        assert r.PARSERS == "python"
    else:
        import kodarelay._relay

        assert r.PARSERS == "cython"
        assert r.parsers is kodarelay._relay


def test_head_end(impl):
    assert impl.http_head_end(b"CONNECT a:1 HTTP/1.1\r\n\r\nrest") == 24
    assert impl.http_head_end(b"CONNECT a:1 HTTP/1.1\r\n") == -1
    assert impl.http_head_end(b"") == -1
    assert impl.http_head_end(b"\n\n") == -1  # only CRLF CRLF ends a request head
    with pytest.raises(HeadError) as e:
        impl.http_head_end(b"a" * 8192)
    assert e.value.status == 431
    # the 8 KiB limit is on the head, not on early bytes after it
    assert impl.http_head_end(b"CONNECT a:1 HTTP/1.1\r\n\r\n" + b"x" * 10000) == 24


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"CONNECT github.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", ("CONNECT", "github.com:443", "HTTP/1.1")),
        (b"GET / HTTP/1.0\r\n\r\n", ("GET", "/", "HTTP/1.0")),
        (b"CONNECT [::1]:443 HTTP/1.1", ("CONNECT", "[::1]:443", "HTTP/1.1")),
    ],
)
def test_request_line(impl, line, expected):
    assert impl.parse_request_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT github.com:443\r\n\r\n",
        b"CONNECT  github.com:443 HTTP/1.1\r\n",
        b"CONNECT github.com:443 HTTP/1.1 \r\n",
        b" CONNECT github.com:443 HTTP/1.1\r\n",
        b"CONNECT github.com:443 HTTP/11\r\n",
        b"CONNECT github.com:443 http/1.1\r\n",
        b"CONNECT github.com:443 HTTP/1.12\r\n",
        b"CON(NECT github.com:443 HTTP/1.1\r\n",
        b"CONNECT git\x00hub.com:443 HTTP/1.1\r\n",
        b"CONNECT git\x7fhub.com:443 HTTP/1.1\r\n",
        b"CONNECT gith\xc3\xbcb.com:443 HTTP/1.1\r\n",
        b"CONNECT github.com:443\tHTTP/1.1\r\n",
        b"",
        b"\r\n",
    ],
)
def test_malformed_request_lines(impl, line):
    with pytest.raises(HeadError) as e:
        impl.parse_request_line(line)
    assert e.value.status == 400


@pytest.mark.parametrize(
    "authority, expected",
    [
        ("github.com:443", ("github.com", 443)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[github.com]:443", ("[github.com]", 443)),
        ("a:1", ("a", 1)),
        ("a:65535", ("a", 65535)),
    ],
)
def test_split_host_port(impl, authority, expected):
    assert impl.split_host_port(authority) == expected


@pytest.mark.parametrize(
    "authority",
    ["github.com", "github.com:", ":443", "github.com:0", "github.com:65536", "github.com:+443", "github.com:-1",
     "github.com:44 3", "github.com:0x1bb", "::1:443", "[::1]", "[::1]443", "[]:443", "[::1:443", "a]:443",
     "github.com:٤٤٣", "github.com:000443"],
)
def test_split_host_port_rejects(impl, authority):
    with pytest.raises(HeadError) as e:
        impl.split_host_port(authority)
    assert e.value.status == 400


def test_socks5_greeting(impl):
    assert impl.parse_socks5_greeting(b"") is None
    assert impl.parse_socks5_greeting(b"\x05") is None
    assert impl.parse_socks5_greeting(b"\x05\x02\x00") is None
    assert impl.parse_socks5_greeting(b"\x05\x02\x00\x02rest") == (4, b"\x00\x02")
    assert impl.parse_socks5_greeting(b"\x05\x00") == (2, b"")
    with pytest.raises(Socks5Error) as e:
        impl.parse_socks5_greeting(b"\x04\x01\x00")
    assert e.value.rep is None


def test_socks5_request(impl):
    req = b"\x05\x01\x00\x03\x0agithub.com\x01\xbb"
    for i in range(len(req)):
        assert impl.parse_socks5_request(req[:i]) is None
    assert impl.parse_socks5_request(req + b"tail") == (len(req), 1, 3, "github.com", 443)
    assert impl.parse_socks5_request(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50") == (10, 1, 1, "127.0.0.1", 80)
    v6 = b"\x05\x02\x00\x04" + bytes(15) + b"\x01" + b"\x00\x16"
    assert impl.parse_socks5_request(v6) == (22, 2, 4, "::1", 22)


@pytest.mark.parametrize(
    "data, rep",
    [
        (b"\x04\x01\x00\x03\x01a\x00\x50", None),
        (b"\x05\x01\x00\x09\x00\x00", None),
        (b"\x05\x01\x00\x03\x00\x00\x50", 1),
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", 1),
    ],
)
def test_socks5_request_errors(impl, data, rep):
    with pytest.raises(Socks5Error) as e:
        impl.parse_socks5_request(data)
    assert e.value.rep == rep


# ── differential: both implementations agree on every input ────────────────

if env_flag("KODARELAY_NO_EXTENSIONS"):
    _compiled = None
else:
    from kodarelay import _relay as _compiled


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except (HeadError, Socks5Error) as e:
        return (type(e).__name__, getattr(e, "status", None), getattr(e, "rep", None), str(e))


needs_compiled = pytest.mark.skipif(_compiled is None, reason="compiled module disabled")
fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_tokens = st.sampled_from([b"CONNECT", b"GET", b" ", b"  ", b":", b"[", b"]", b"::1", b"443", b"0", b"65536",
                           b"HTTP/1.1", b"HTTP/", b"\r\n", b"\r\n\r\n", b"\n", b"\x00", b"\x7f", b"\xff",
                           b"github.com", b"+", b"\t"])
_heads = st.one_of(st.binary(max_size=64), st.lists(_tokens, max_size=12).map(b"".join))


@needs_compiled
@fuzz
@given(_heads, st.integers(min_value=1, max_value=80))
def test_differential_head(data, limit):
    assert _outcome(_compiled.http_head_end, data, limit) == _outcome(_relay_py.http_head_end, data, limit)
    assert _outcome(_compiled.parse_request_line, data) == _outcome(_relay_py.parse_request_line, data)


@needs_compiled
@fuzz
@given(st.one_of(st.text(max_size=24), st.lists(st.sampled_from(["[", "]", ":", "::1", "a", "443", "0", "+", "٣", " "]), max_size=8).map("".join)))
def test_differential_split_host_port(authority):
    assert _outcome(_compiled.split_host_port, authority) == _outcome(_relay_py.split_host_port, authority)


_socks = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.sampled_from([4, 5]), st.integers(0, 4), st.sampled_from([1, 3, 4, 9]), st.binary(max_size=30)).map(
        lambda t: bytes([t[0], t[1], 0, t[2]]) + t[3]
    ),
)


@needs_compiled
@fuzz
@given(_socks)
def test_differential_socks5(data):
    # every prefix too: a fragmented stream must give the same answers at each step
    for i in range(len(data) + 1):
        chunk = data[:i]
        assert _outcome(_compiled.parse_socks5_greeting, chunk) == _outcome(_relay_py.parse_socks5_greeting, chunk)
        assert _outcome(_compiled.parse_socks5_request, chunk) == _outcome(_relay_py.parse_socks5_request, chunk)

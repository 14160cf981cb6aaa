"""The forwarding parsers (request / response heads, absolute-form targets): each test runs
against the compiled module and its twin, and hypothesis holds the two together."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kodarelay import _relay_py
from kodarelay._errors import HeadError
from kodarelay.relay import env_flag


def test_compiled_forward_parsers_loaded():
    """Guard: unless told otherwise, forwarding uses the compiled head parser."""
    import kodarelay.relay as r

    if not env_flag("KODARELAY_NO_EXTENSIONS"):
        import kodarelay._relay

        assert r.parsers.parse_http_head is kodarelay._relay.parse_http_head


def test_head_fields(impl):
    head = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nX-Y:  v  w \t\r\nE:\r\nObs: caf\xc3\xa9\r\n\r\n"
    assert impl.parse_http_head(head) == (
        "GET", "http://a.test/x", "HTTP/1.1", [(b"Host", b"a.test"), (b"X-Y", b"v  w"), (b"E", b""), (b"Obs", b"caf\xc3\xa9")]
    )
    assert impl.parse_http_head(b"GET http://a/ HTTP/1.0\r\n\r\n") == ("GET", "http://a/", "HTTP/1.0", [])


@pytest.mark.parametrize(
    "head",
    [
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",       # obs-fold
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",             # bare LF
        b"GET http://a/ HTTP/1.1\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",             # bare CR
        b"GET http://a/ HTTP/1.1\r\nHost: a\x00\r\n\r\n",               # NUL
        b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n",                  # space before the colon
        b"GET http://a/ HTTP/1.1\r\n: a\r\n\r\n",                       # empty name
        b"GET http://a/ HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\x01b\r\n\r\n",                 # control byte in a value
        b"GET http://a/ HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\r\n",                          # no blank line
        b"GET http://a/ HTTP/1.1\r\n\r\nX",                             # bytes after the blank line
        b"GET  http://a/ HTTP/1.1\r\n\r\n",
    ],
)
def test_head_smuggling_shapes_are_400(impl, head):
    with pytest.raises(HeadError) as e:
        impl.parse_http_head(head)
    assert e.value.status == 400


def test_response_head(impl):
    assert impl.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n") == (200, [(b"Content-Length", b"3")])
    assert impl.parse_response_head(b"HTTP/1.0 204\r\n\r\n") == (204, [])
    assert impl.parse_response_head(b"HTTP/1.1 404 \r\n\r\n") == (404, [])
    for bad in (b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/1.1 200OK\r\n\r\n", b"ICY 200 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\nX: y\r\n\r\n", b"HTTP/1.1 200 OK\r\n folded\r\n\r\n"):
        with pytest.raises(HeadError) as e:
            impl.parse_response_head(bad)
        assert e.value.status == 502


@pytest.mark.parametrize(
    "target, expected",
    [
        ("http://a.test/x?y=1", ("a.test", 80, "a.test", "/x?y=1")),
        ("HTTP://A.test:8080", ("A.test", 8080, "A.test:8080", "/")),
        ("http://a.test?q", ("a.test", 80, "a.test", "/?q")),
        ("http://a.test/p#frag", ("a.test", 80, "a.test", "/p")),
        ("http://[::1]:81/", ("[::1]", 81, "[::1]:81", "/")),
        ("http://[::1]/", ("[::1]", 80, "[::1]", "/")),
        ("http://127.0.0.1:00080/", ("127.0.0.1", 80, "127.0.0.1:00080", "/")),
    ],
)
def test_absolute_target(impl, target, expected):
    assert impl.parse_absolute_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "/path",                        # origin form: not for a proxy
        "a.test:80",                    # authority form
        "https://a.test/",              # use CONNECT
        "ftp://a.test/",
        "http://user:pw@a.test/",       # userinfo
        "http:///path",                 # empty host
        "http://a.test:/",
        "http://a.test:0/",
        "http://a.test:65536/",
        "http://a.test:8o/",
        "http://a.test:80:80/",
        "http://[::1/",
        "http://[]:80/",
        "http://[::1]x/",
        "http://a]b/",
    ],
)
def test_absolute_target_errors(impl, target):
    with pytest.raises(HeadError) as e:
        impl.parse_absolute_target(target)
    assert e.value.status == 400


# ── differential: both implementations agree on every input ────────────────

if env_flag("KODARELAY_NO_EXTENSIONS"):
    _compiled = None
else:
    from kodarelay import _relay as _compiled


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except HeadError as e:
        return (type(e).__name__, e.status, str(e))


needs_compiled = pytest.mark.skipif(_compiled is None, reason="compiled module disabled")
fuzz = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_tokens = st.sampled_from([
    b"GET", b"POST", b" ", b"http://a/", b"HTTP/1.1", b"HTTP/1.0 200 OK", b"\r\n", b"\r\n\r\n", b"\n", b"\r",
    b"\x00", b"\x7f", b"\xff", b"\t", b":", b" :", b"Host", b"Content-Length: 5", b"Transfer-Encoding",
    b"chunked", b"X", b"1", b"HTTP/", b"200",
])
_heads = st.one_of(
    st.binary(max_size=80),
    st.lists(_tokens, max_size=16).map(b"".join),
    st.lists(_tokens, max_size=16).map(lambda t: b"".join(t) + b"\r\n\r\n"),
)


@needs_compiled
@fuzz
@given(_heads)
def test_differential_heads(data):
    assert _outcome(_compiled.parse_http_head, data) == _outcome(_relay_py.parse_http_head, data)
    assert _outcome(_compiled.parse_response_head, data) == _outcome(_relay_py.parse_response_head, data)
    # a request line welded onto random fields, so the field parser is reached often
    data = b"GET http://a/ HTTP/1.1\r\n" + data
    assert _outcome(_compiled.parse_http_head, data) == _outcome(_relay_py.parse_http_head, data)
    data = b"HTTP/1.1 200 OK\r\n" + data[24:]
    assert _outcome(_compiled.parse_response_head, data) == _outcome(_relay_py.parse_response_head, data)


_url_parts = st.sampled_from(["http://", "HTTP://", "https://", "://", "[", "]", ":", "::1", "a.test", "@", "/",
                              "?", "#", "80", "0", "65536", "x", "٣", " ", "%"])


@needs_compiled
@fuzz
@given(st.one_of(st.text(max_size=30), st.lists(_url_parts, max_size=10).map("".join)))
def test_differential_absolute_target(target):
    assert _outcome(_compiled.parse_absolute_target, target) == _outcome(_relay_py.parse_absolute_target, target)

"""Upstream chaining: parsing, NO_PROXY, and real tunnels through tinyproxy."""

from __future__ import annotations


import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig
from kodarelay.upstream import bypasses_proxy, connect_request, parse_no_proxy, parse_proxy_url

from peers import CannedProxy, dead_port, http_connect, require_tool, recv_exact, socks5_connect, status_of, tinyproxy


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://proxy:8080", ("proxy", 8080)),
        ("https://proxy:8080/", ("proxy", 8080)),
        ("proxy:3128", ("proxy", 3128)),
        ("http://u:p@proxy:3128", ("proxy", 3128)),
        ("http://[::1]:3128", ("::1", 3128)),
        ("http://proxy", None),
        ("http://proxy:0", None),
        ("http://proxy:abc", None),
        ("http://proxy:99999", None),
        ("http://pro xy:80", None),
        ("http://proxy:80/path", None),
        ("socks5://proxy:1080", None),
        ("", None),
        ("http://[::1:80", None),
    ],
)
def test_parse_proxy_url(url, expected):
    assert parse_proxy_url(url) == expected


def test_from_env_precedence_and_fallbacks():
    assert UpstreamConfig.from_env({}) == UpstreamConfig.direct()
    assert UpstreamConfig.from_env({"HTTPS_PROXY": "   "}).is_direct
    assert UpstreamConfig.from_env({"HTTPS_PROXY": "nonsense"}).is_direct
    cfg = UpstreamConfig.from_env({"HTTPS_PROXY": "http://a:1", "https_proxy": "http://b:2", "NO_PROXY": ".x.com, y"})
    assert (cfg.host, cfg.port, cfg.no_proxy) == ("a", 1, ("x.com", "y"))
    assert UpstreamConfig.from_env({"https_proxy": "http://b:2"}) == UpstreamConfig.http_proxy("b", 2)


def test_credentials_are_decoded_and_never_shown():
    cfg = UpstreamConfig.from_url("http://alice:s%40cret%21@corp:3128")
    assert (cfg.username, cfg.password) == ("alice", "s@cret!")
    assert "s@cret" not in repr(cfg) and "s@cret" not in str(cfg) and "alice" not in repr(cfg)
    req = connect_request(cfg, "github.com", 443)
    assert b"Proxy-Authorization: Basic YWxpY2U6c0BjcmV0IQ==\r\n" in req
    assert req.startswith(b"CONNECT github.com:443 HTTP/1.1\r\nHost: github.com:443\r\nProxy-Connection: keep-alive\r\n")


def test_parse_no_proxy():
    assert parse_no_proxy({"NO_PROXY": " .a.com, ,b.org,", "no_proxy": "ignored"}) == ("a.com", "b.org")
    assert parse_no_proxy({"no_proxy": "c"}) == ("c",)
    assert parse_no_proxy({}) == ()


@pytest.mark.parametrize(
    "host, entries, expected",
    [
        ("a.b.walmart.com", ["walmart.com"], True),
        ("walmart.com", ["walmart.com"], True),
        ("evilwalmart.com", ["walmart.com"], False),
        ("anything", ["*"], True),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("::1", ["::1"], True),
        ("[::1]", ["::1"], True),
        ("10.0.0.0.evil.com", ["10.0.0.0/8"], False),
        ("localhost", ["localhost", "127.0.0.1"], True),
        ("github.com", [], False),
    ],
)
def test_bypasses_proxy(host, entries, expected):
    assert bypasses_proxy(host, entries) is expected



@pytest.fixture
def tiny(tmp_path):
    require_tool("tinyproxy")
    with tinyproxy(tmp_path) as port:
        yield port


def test_http_connect_chains_through_tinyproxy(tiny, echo):
    cfg = UpstreamConfig.http_proxy("127.0.0.1", tiny)
    with BuiltInProxy(Filter(["localhost"]), upstream=cfg).start() as h:
        s, head = http_connect(h.port, f"localhost:{echo.port}")
        assert status_of(head) == 200
        s.sendall(b"via tinyproxy")
        assert recv_exact(s, 13) == b"via tinyproxy"


def test_socks5_chains_through_tinyproxy(tiny, echo):
    """fix: the crate's SOCKS5 dialled directly, ignoring the upstream."""
    cfg = UpstreamConfig.http_proxy("127.0.0.1", tiny)
    with BuiltInSocks5Proxy(Filter(["localhost"]), upstream=cfg).start() as h:
        s, rep = socks5_connect(h.port, b"localhost", echo.port)
        assert rep[:2] == b"\x05\x00"
        s.sendall(b"socks via tiny")
        assert recv_exact(s, 14) == b"socks via tiny"


def test_no_proxy_bypasses_upstream(echo):
    # An upstream that does not exist: only a bypass can succeed.
    dead = dead_port()
    cfg = UpstreamConfig.http_proxy("127.0.0.1", dead, no_proxy=("localhost",))
    with BuiltInProxy(Filter(["localhost", "other.test"]), upstream=cfg).start() as h:
        s, head = http_connect(h.port, f"localhost:{echo.port}")
        assert status_of(head) == 200
        s2, head2 = http_connect(h.port, "other.test:443")
        assert status_of(head2) == 502


def test_tinyproxy_basic_auth(tmp_path, echo):
    require_tool("tinyproxy")
    with tinyproxy(tmp_path, basic_auth=("agent", "pa.ss-1")) as port:
        good = UpstreamConfig.from_url(f"http://agent:pa%2Ess-1@127.0.0.1:{port}")
        bad = UpstreamConfig.from_url(f"http://agent:wrong@127.0.0.1:{port}")
        with BuiltInProxy(Filter(["localhost"]), upstream=good).start() as h:
            s, head = http_connect(h.port, f"localhost:{echo.port}")
            assert status_of(head) == 200
            s.sendall(b"authed")
            assert recv_exact(s, 6) == b"authed"
        with BuiltInProxy(Filter(["localhost"]), upstream=bad).start() as h:
            s, head = http_connect(h.port, f"localhost:{echo.port}")
            assert status_of(head) == 502


@pytest.mark.parametrize("sep", [b"\r\n\r\n", b"\n\n"])
def test_bytes_after_upstream_head_reach_the_client(sep):
    up = CannedProxy(b"HTTP/1.1 200 Connection established" + sep + b"SERVER-FIRST")
    try:
        cfg = UpstreamConfig.http_proxy("127.0.0.1", up.port)
        with BuiltInProxy(Filter(["banner.test"]), upstream=cfg).start() as h:
            s, head = http_connect(h.port, "banner.test:22")
            assert status_of(head) == 200
            assert recv_exact(s, 12) == b"SERVER-FIRST"
            s.sendall(b"echo")
            assert recv_exact(s, 4) == b"echo"
        assert up.requests[0].startswith(b"CONNECT banner.test:22 HTTP/1.1\r\nHost: banner.test:22\r\n")
    finally:
        up.close()


@pytest.mark.parametrize("answer", [b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", b"HTTP/1.1 403 Forbidden\r\n\r\n", b"garbage\r\n\r\n"])
def test_upstream_refusal_is_502_and_socks_05(answer):
    up = CannedProxy(answer)
    try:
        cfg = UpstreamConfig.http_proxy("127.0.0.1", up.port)
        with BuiltInProxy(Filter(["x.test"]), upstream=cfg).start() as h:
            s, head = http_connect(h.port, "x.test:443")
            assert status_of(head) == 502
        with BuiltInSocks5Proxy(Filter(["x.test"]), upstream=cfg).start() as h:
            s, rep = socks5_connect(h.port, b"x.test", 443)
            assert rep[:2] == b"\x05\x05"
    finally:
        up.close()


def test_credentials_never_reach_the_logs(caplog, monkeypatch):
    up = CannedProxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    try:
        caplog.set_level("DEBUG", logger="kodarelay")
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:hunter2-secret@127.0.0.1:{up.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cfg = UpstreamConfig.from_env()
        with BuiltInProxy(Filter(["x.test"])).start() as h:
            s, head = http_connect(h.port, "x.test:443")
            assert status_of(head) == 502
        assert up.requests and b"Proxy-Authorization: Basic" in up.requests[0]
        monkeypatch.setenv("HTTPS_PROXY", "http://alice:hunter2-secret@bad host:1")
        assert UpstreamConfig.from_env().is_direct
        assert "hunter2" not in caplog.text and "hunter2" not in repr(cfg) and "hunter2" not in str(cfg)
        assert "x.test" in caplog.text  # the refusal itself was logged
    finally:
        up.close()

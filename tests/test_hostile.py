"""Hostile targets through Filter, the HTTP proxy and the SOCKS5 proxy: none may reach a peer.

The names below resolve (through an injected resolver) to loopback or metadata addresses,
and the allowlist names ``allowed.test`` and ``localhost`` only, so the one way a target
could reach the echo server is a bug in canonicalisation, matching or the guard.
"""

from __future__ import annotations


import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig

from peers import EchoServer, connect, recv_exact, recv_until, status_of

ALLOW = ["allowed.test", "*.wild.test", "github.com:443"]

# (host as the client writes it, port or None when the host carries it)
HOSTILE = [
    "allowed.test",  # resolves to 127.0.0.1: the guard refuses
    "allowed.test.",  # trailing dot, same name, same refusal
    "ALLOWED.TEST",
    "x.wild.test",  # resolves to 169.254.169.254
    "y.wild.test",  # resolves to ::ffff:127.0.0.1
    "z.wild.test",  # resolves to 64:ff9b::7f00:1 (NAT64 of loopback)
    "v.wild.test",  # resolves to one public and one loopback address
    "allowed.test..",
    "allowed.test@evil.test",
    "evil.test#allowed.test",
    "allowed.test\x00.evil.test",
    "allowed.test\r\nX-Injected: 1",
    "allowed.test\t",
    " allowed.test",
    "allowed%2etest",
    "allowed.test\\evil.test",
    "allowed.test/evil",
    "a..wild.test",
    ".allowed.test",
    "a.b.wild.test",
    "wild.test",
    "evil.wild.test.attacker.test",
    "allowed.test.attacker.test",
    "xn--allowed-test",
    "аllowed.test",  # Cyrillic а
    "allowed.tеst",  # Cyrillic е
    "a" * 64 + ".wild.test",
    ("a" * 63 + ".") * 4 + "wild.test",
    "127.0.0.1",
    "2130706433",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "0x7f000001",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "169.254.169.254",
    "[fd00:ec2::254]",
    "100.100.100.200",
    "0.0.0.0",
    "[::]",
    "1.2.3.4.5",
    "999.1.1.1",
    "[allowed.test]",
    "[127.0.0.1]",
    "github.com",  # allowed on 443 only
    "*.wild.test",
    "localhost",
    "localhost.",
]
PORTS_BAD = ["0", "65536", "+443", "-1", "0x1bb", " 443", "443 ", "4 43"]

RESOLVE = {
    "allowed.test": ["127.0.0.1"],
    "x.wild.test": ["169.254.169.254"],
    "y.wild.test": ["::ffff:127.0.0.1"],
    "z.wild.test": ["64:ff9b::7f00:1"],
    "v.wild.test": ["93.184.216.34", "127.0.0.1"],
}


async def resolver(host: str, port: int) -> list[str]:
    if host in RESOLVE:
        return RESOLVE[host]
    raise OSError(f"unexpected lookup of {host!r}")


def test_table_is_big_enough():
    assert len(HOSTILE) + len(PORTS_BAD) >= 40


@pytest.mark.parametrize("host", HOSTILE)
def test_filter_or_guard_refuses(host):
    f = Filter(ALLOW)
    d = f.explain(host, 8443)
    if d.allowed:
        addresses = RESOLVE.get(d.host or "", [d.host])
        assert not f.check_resolved(host, 8443, addresses).allowed


@pytest.fixture(scope="module")
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxies(echo):
    opts = dict(upstream=UpstreamConfig.direct(), resolver=resolver)
    http = BuiltInProxy(Filter(ALLOW), **opts).start()
    socks = BuiltInSocks5Proxy(Filter(ALLOW), **opts).start()
    yield http, socks
    http.shutdown()
    socks.shutdown()


def _http_try(port: int, target: bytes) -> bytes:
    s = connect(port)
    try:
        s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        return recv_until(s, b"\r\n\r\n")
    finally:
        s.close()


def _socks_try(port: int, host: bytes, dport: int) -> bytes:
    s = connect(port)
    try:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(bytes([5, 1, 0, 3, len(host)]) + host + dport.to_bytes(2, "big"))
        return s.recv(10)
    finally:
        s.close()


def _target(host: str, port: int) -> bytes:
    return f"{host}:{port}".encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("host", HOSTILE)
def test_http_proxy_refuses(proxies, echo, host):
    before = echo.accepted
    head = _http_try(proxies[0].port, _target(host, echo.port))
    assert status_of(head) in (400, 403), head
    assert echo.accepted == before


@pytest.mark.parametrize("port_text", PORTS_BAD)
def test_http_proxy_refuses_bad_ports(proxies, echo, port_text):
    before = echo.accepted
    head = _http_try(proxies[0].port, b"allowed.test:" + port_text.encode())
    assert status_of(head) == 400, head
    assert echo.accepted == before


@pytest.mark.parametrize("host", [h for h in HOSTILE if len(h.encode()) <= 255])
def test_socks5_proxy_refuses(proxies, echo, host):
    before = echo.accepted
    reply = _socks_try(proxies[1].port, host.encode(), echo.port)
    assert reply[:1] == b"\x05" and reply[1] != 0, reply
    assert echo.accepted == before


def test_socks5_port_zero_refused(proxies, echo):
    before = echo.accepted
    reply = _socks_try(proxies[1].port, b"allowed.test", 0)
    assert reply[1] != 0
    assert echo.accepted == before


def test_every_refusal_is_recorded_with_its_reason(echo):
    opts = dict(upstream=UpstreamConfig.direct(), resolver=resolver)
    with BuiltInProxy(Filter(ALLOW), **opts).start() as http, BuiltInSocks5Proxy(Filter(ALLOW), **opts).start() as socks:
        for host in ("allowed.test", "evil.test", "127.1"):
            _http_try(http.port, _target(host, echo.port))
            _socks_try(socks.port, host.encode(), echo.port)
        _http_try(http.port, b"allowed.test:+1")
        assert [(v.host, v.reason) for v in http.violations()] == [
            ("allowed.test", "resolved_address"),
            ("evil.test", "not_allowed"),
            ("127.0.0.1", "not_allowed"),          # recorded canonical, as events and deciders see it
            ("allowed.test:+1", "bad_request"),
        ]
        assert [v.reason for v in socks.violations()] == ["resolved_address", "not_allowed", "not_allowed"]

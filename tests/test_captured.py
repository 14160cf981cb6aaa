"""The proxy's door for captured connections (``kodarelay.captured``, issue 20): the capture
socket of a real ``BuiltInProxy``, reached as the fence's helper reaches it, and the TLS SNI
reader fed real ClientHellos from the ``ssl`` module."""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay import BuiltInProxy, Filter
from kodarelay.captured import client_hello_sni, host_header_names
from kodarelay.upstream import UpstreamConfig
from peers import DEADLINE, WebServer, wait_until


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real TLS client."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello():
    hello = client_hello("Example.Test")
    assert client_hello_sni(hello) == (True, "Example.Test")      # as sent; compared case-insensitively
    for cut in range(1, len(hello)):
        assert client_hello_sni(hello[:cut]) == (False, None)     # more could still complete it
    assert client_hello_sni(hello + b"\x17\x03\x03\x00\x01x") == (True, "Example.Test")


def test_a_hello_over_two_records_is_put_together():
    hello = client_hello("split.test")
    body = hello[5:]
    half = len(body) // 2
    records = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part for part in (body[:half], body[half:]))
    assert client_hello_sni(records) == (True, "split.test")
    assert client_hello_sni(records[:-1]) == (False, None)


def test_no_sni_or_no_tls():
    assert client_hello_sni(client_hello(None)) == (True, None)
    assert client_hello_sni(b"GET / HTTP/1.1\r\n") == (True, None)
    assert client_hello_sni(b"") == (False, None)
    assert client_hello_sni(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") == (True, None)   # not a ClientHello


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_never_raise(data):
    complete, sni = client_hello_sni(b"\x16\x03\x01" + data)
    assert isinstance(complete, bool) and (sni is None or isinstance(sni, str))


def test_host_header_names():
    assert host_header_names(b"Example.test.", "example.test")
    assert host_header_names(b"example.test:8080", "example.test")
    assert host_header_names(b"[2001:db8::1]:80", "2001:db8::1")
    assert not host_header_names(b"evil.test", "example.test")
    assert not host_header_names(b"example.test.evil", "example.test")


# ── the capture socket of a running proxy ────────────────────────────────────


@pytest.fixture
def site() -> Iterator[WebServer]:
    s = WebServer()
    yield s
    s.close()


@pytest.fixture
def proxy(site):  # type: ignore[no-untyped-def]
    seen: list[object] = []
    handle = BuiltInProxy(Filter([f"127.0.0.1:{site.port}"]), upstream=UpstreamConfig.direct(), socks5=True,
                          capture=True, on_violation=seen.append).start()
    yield handle, seen
    handle.shutdown()


def captured(path: str, target: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect(path)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode() + data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_an_allowed_capture_is_relayed_with_no_reply_of_the_proxys(proxy, site):
    handle, seen = proxy
    assert handle.capture_path is not None and oct(os.stat(handle.capture_path).st_mode)[-3:] == "600"
    got = captured(handle.capture_path, f"127.0.0.1:{site.port}", b"GET /cap HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"hello from /cap\n")
    assert seen == []


def test_refusals_close_the_connection_and_are_recorded_as_capture(proxy, site):
    handle, seen = proxy
    assert captured(handle.capture_path, f"refused.test:{site.port}", b"hello") == b""
    assert captured(handle.capture_path, "198.18.3.3:5000", b"") == b""
    wait_until(lambda: len(handle.violations()) == 2, what="two violations")
    got = [(v.protocol, v.host, v.reason) for v in handle.violations()]
    assert got == [("capture", "refused.test", "not_allowed"), ("capture", "198.18.3.3", "unknown_address")]


def test_a_bad_preamble_is_dropped_and_the_socket_goes_on(proxy, site):
    handle, _seen = proxy
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"CONNECT nope HTTP/1.1\r\n\r\n", b"x" * 5000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(DEADLINE)
            s.connect(handle.capture_path)
            try:
                s.sendall(junk)
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    got = captured(handle.capture_path, f"127.0.0.1:{site.port}", b"GET /still HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.endswith(b"hello from /still\n")


def test_no_capture_socket_unless_asked():
    handle = BuiltInProxy(Filter(), upstream=UpstreamConfig.direct()).start()
    try:
        assert handle.capture_path is None
    finally:
        handle.shutdown()


def test_the_capture_socket_goes_with_the_proxy(site):
    handle = BuiltInProxy(Filter(), upstream=UpstreamConfig.direct(), capture=True).start()
    path = handle.capture_path
    assert path is not None and os.path.exists(path)
    handle.shutdown()
    assert not os.path.exists(path)


def test_captures_that_never_send_are_bounded_like_handshakes(site):
    """A capture on 443 waits for the ClientHello; at ``max_handshakes`` the oldest such wait
    is shed, and a new capture is still served."""
    handle = BuiltInProxy(Filter([f"127.0.0.1:{site.port}"]), upstream=UpstreamConfig.direct(), capture=True,
                          max_handshakes=2).start()
    try:
        server = handle._servers[0]
        waiting = []
        for n in range(1, 4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            s.connect(handle.capture_path)
            s.sendall(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n")
            waiting.append(s)
            if n < 3:
                wait_until(lambda: len(server._handshaking) == n, what=f"{n} captures waiting")
        assert waiting[0].recv(10) == b""            # the oldest was shed at the third
        assert len(server._handshaking) == 2
        got = captured(handle.capture_path, f"127.0.0.1:{site.port}",
                       b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got.endswith(b"hello from /after\n")
        for s in waiting:
            s.close()
    finally:
        handle.shutdown()


def test_an_sni_naming_another_host_is_refused_and_shown_escaped(proxy):
    handle, _seen = proxy
    hello = client_hello("evil.test")
    forged = hello.replace(b"evil.test", b"evil\x1b[31m")     # same length: every length field holds
    assert captured(handle.capture_path, "good.test:443", forged) == b""
    assert captured(handle.capture_path, "good.test:443", client_hello("GOOD.test")) == b""   # judged: no rule
    wait_until(lambda: len(handle.violations()) == 2, what="two violations")
    first, second = handle.violations()
    assert (first.protocol, first.host, first.port, first.reason) == ("capture", "good.test", 443, "sni_mismatch")
    assert first.detail == "the TLS SNI names evil\\x1b[31m"
    assert (second.reason, second.host) == ("not_allowed", "good.test")

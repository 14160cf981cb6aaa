"""The built-in HTTP CONNECT proxy against real loopback sockets."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading

import pytest


from peers import EchoServer, connect, dead_port, http_connect, pinned, recv_exact, recv_until, status_of, wait_until



def test_allowed_host_is_tunnelled(start_proxy, echo):
    h = start_proxy()
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    s.sendall(b"ping")
    assert recv_exact(s, 4) == b"ping"
    s.close()


def test_refused_host_gets_403_and_never_a_byte(start_proxy, echo):
    h = start_proxy(["github.com"], resolver=pinned({"evil.test": ["127.0.0.1"]}))
    s, head = http_connect(h.port, f"evil.test:{echo.port}")
    assert status_of(head) == 403
    assert b"X-Proxy-Error: not_allowed\r\n" in head
    assert b"Content-Type: text/plain\r\n" in head
    # a refusal written for the reader: host, port, reason and what would admit it, then EOF
    body = f"kodarelay: CONNECT to evil.test:{echo.port} refused (not_allowed); allow it with --allow evil.test:{echo.port}\n"
    assert f"Content-Length: {len(body)}\r\n".encode() in head
    assert recv_exact(s, len(body)) == body.encode()
    assert s.recv(1) == b""
    assert echo.accepted == 0
    [v] = h.violations()
    assert (v.protocol, v.host, v.port, v.reason) == ("http", "evil.test", echo.port, "not_allowed")


def test_early_bytes_after_head_are_forwarded(start_proxy, echo):
    """fix: an eager client's bytes after the CONNECT head (a TLS ClientHello) reach the target."""
    h = start_proxy()
    s, head = http_connect(h.port, f"localhost:{echo.port}", extra=b"early-hello")
    assert status_of(head) == 200
    assert recv_exact(s, 11) == b"early-hello"
    s.close()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\n\r\n", 405),
        (b"CONNECT\r\n\r\n", 400),
        (b"CONNECT localhost HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT localhost:99999 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT localhost:0 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT localhost:+80 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT  localhost:80 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT localhost:80 HTTP/1.1 extra\r\n\r\n", 400),
        (b"CONNECT localhost:80 FTP/1.0\r\n\r\n", 400),
        (b"CONNECT local\x00host:80 HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\r\n\r\n", 400),
        (b"CONNECT [::1 HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_their_status(start_proxy, echo, request_bytes, status):
    h = start_proxy()
    s = connect(h.port)
    s.sendall(request_bytes)
    head = recv_until(s, b"\r\n\r\n")
    assert status_of(head) == status, head
    assert s.recv(1) == b""
    assert echo.accepted == 0


def test_oversized_head_gets_431(start_proxy):
    h = start_proxy()
    s = connect(h.port)
    try:
        s.sendall(b"CONNECT localhost:80 HTTP/1.1\r\nX-Pad: " + b"a" * 9000)
    except OSError:
        pass
    assert status_of(recv_until(s, b"\r\n\r\n")) == 431


def test_slow_head_gets_408_and_others_are_served(start_proxy, echo):
    h = start_proxy(handshake_timeout=0.5)
    slow = connect(h.port)
    slow.sendall(b"CONNECT localhost:")
    # While the slow client dawdles, another client is served at once.
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 200
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    assert status_of(recv_until(slow, b"\r\n\r\n")) == 408
    assert slow.recv(1) == b""


def test_unreachable_target_gets_502(start_proxy):
    dead = dead_port()
    h = start_proxy(["127.0.0.1"])
    s, head = http_connect(h.port, f"127.0.0.1:{dead}")
    assert status_of(head) == 502


def test_unresolvable_name_is_refused_with_502(start_proxy, echo):
    h = start_proxy(["nowhere.test"], resolver=pinned({}))
    s, head = http_connect(h.port, f"nowhere.test:{echo.port}")
    assert status_of(head) == 502
    assert [v.reason for v in h.violations()] == ["resolve_failed"]


def test_name_resolving_to_loopback_is_refused_by_the_guard(start_proxy, echo):
    h = start_proxy(["rebind.test"], resolver=pinned({"rebind.test": ["127.0.0.1"]}))
    s, head = http_connect(h.port, f"rebind.test:{echo.port}")
    assert status_of(head) == 403
    assert b"X-Proxy-Error: resolved_address" in head
    assert echo.accepted == 0


def test_ip_rule_admits_the_resolved_loopback_address(start_proxy, echo):
    h = start_proxy(["app.test", "127.0.0.1"], resolver=pinned({"app.test": ["127.0.0.1"]}))
    s, head = http_connect(h.port, f"app.test:{echo.port}")
    assert status_of(head) == 200
    s.sendall(b"ok")
    assert recv_exact(s, 2) == b"ok"


def test_ipv6_literal_target(start_proxy):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        echo6 = EchoServer(socket.AF_INET6)
    except OSError:
        pytest.skip("no ::1")
    try:
        h = start_proxy(["[::1]"])
        s, head = http_connect(h.port, f"[::1]:{echo6.port}")
        assert status_of(head) == 200
        s.sendall(b"v6")
        assert recv_exact(s, 2) == b"v6"
    finally:
        echo6.close()


def test_half_close_keeps_the_other_direction(start_proxy, echo):
    h = start_proxy()
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 200
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    assert recv_until(s, b"never") == b"last words"


def test_idle_tunnel_is_closed(start_proxy, echo):
    h = start_proxy(idle_timeout=0.3)
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 200
    assert s.recv(1) == b""  # the proxy ends the silent tunnel (socket timeout is 10 s)


def test_violation_callback_and_ring_capacity(start_proxy, echo):
    seen = []
    h = start_proxy(["localhost"], on_violation=seen.append, violation_capacity=2)
    for name in ("a.test", "b.test", "c.test"):
        s, head = http_connect(h.port, f"{name}:443")
        assert status_of(head) == 403
        s.close()
    assert [v.host for v in seen] == ["a.test", "b.test", "c.test"]
    assert [v.host for v in h.violations()] == ["b.test", "c.test"]


def test_hundred_concurrent_tunnels_checksummed(start_proxy, echo):
    h = start_proxy()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            payload = random.Random(i).randbytes(random.Random(i).randint(1, 300_000))
            s, head = http_connect(h.port, f"localhost:{echo.port}")
            assert status_of(head) == 200
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_until(s, b"\x00never\x00", limit=1 << 30)
            sender.join()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            s.close()
        except BaseException as e:  # collected, the main thread fails
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def test_shutdown_closes_listener_and_live_tunnels(start_proxy, echo):
    h = start_proxy()
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 200
    port = h.port
    h.shutdown()
    assert s.recv(1) == b""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    h.shutdown()  # idempotent


def test_listens_on_loopback_only(start_proxy):
    h = start_proxy()
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == h.port]
    assert listening == [f"0100007F:{h.port:04X}"]


def test_no_fd_leak_after_many_refusals_and_tunnels(start_proxy, echo):
    h = start_proxy()
    for _ in range(5):  # warm up lazily created fds (engine, pipes)
        s, _head = http_connect(h.port, f"localhost:{echo.port}")
        s.close()
    wait_until(lambda: True)
    before = None

    def settled() -> bool:
        nonlocal before
        now = len(os.listdir("/proc/self/fd"))
        ok = before == now
        before = now
        return ok

    for i in range(200):
        s, head = http_connect(h.port, f"localhost:{echo.port}" if i % 2 else f"denied.test:{echo.port}")
        s.close()
    wait_until(settled, what="fd count to settle")
    baseline = before
    for i in range(200):
        s, head = http_connect(h.port, f"localhost:{echo.port}" if i % 2 else f"denied.test:{echo.port}")
        s.close()
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= baseline, what="fds to be released")


@pytest.mark.parametrize("target", ["[github.com]:443", "[127.0.0.1]:443", "[::ffff:github.com]:443"])
def test_bracketed_non_ipv6_never_matches_a_name_rule(start_proxy, target):
    h = start_proxy(["github.com", "127.0.0.1"])
    s, head = http_connect(h.port, target)
    assert status_of(head) in (400, 403)
    if status_of(head) == 403:
        assert b"X-Proxy-Error: bad_host" in head

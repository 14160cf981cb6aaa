"""Plain-HTTP forwarding (``forward_http=True``): real clients and raw heads on loopback.

Runs against both implementations (``KODARELAY_NO_EXTENSIONS``) and both front-ends
(``KODARELAY_NO_NATIVE_FRONTEND``), like the other server tests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import time

import pytest

from forward_peers import Origin, read_response, send_raw
from peers import connect, fd_count, pinned, recv_exact, recv_until, require_tool, status_of, wait_until


@pytest.fixture
def origin():  # type: ignore[no-untyped-def]
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def fwd(start_proxy):  # type: ignore[no-untyped-def]
    """A forwarding proxy allowing ``localhost`` (on the mux port: SOCKS5 too)."""

    def start(patterns=("localhost",), **options):  # type: ignore[no-untyped-def]
        options.setdefault("forward_http", True)
        options.setdefault("socks5", True)
        return start_proxy(patterns, **options)

    return start


def _get(port: int, url: str, extra: bytes = b"") -> bytes:
    return f"GET {url} HTTP/1.1\r\nHost: ignored.test\r\n".encode() + extra + b"\r\n"


# ── the basics, with raw heads ──────────────────────────────────────────────


def test_get_is_forwarded_in_origin_form_with_host_from_the_uri(fwd, origin):
    h = fwd()
    s = send_raw(h.port, _get(h.port, origin.url("/a/b?q=1#frag"),
                              b"Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
                              b"Connection: X-Private, keep-alive\r\nX-Private: 1\r\nKeep-Alive: 5\r\n"
                              b"TE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n"))
    head, body = read_response(s)
    assert status_of(head) == 200
    assert body == b"hello from /a/b?q=1\n"
    [(method, path, version, headers, names)] = origin.seen
    assert (method, path, version) == ("GET", "/a/b?q=1", "HTTP/1.1")
    assert headers["Host"] == f"localhost:{origin.port}"
    assert headers["X-Kept"] == "yes"
    for hop in ("proxy-authorization", "proxy-connection", "connection", "x-private", "keep-alive", "te", "upgrade"):
        assert hop not in names
    s.close()


def test_refused_host_gets_a_readable_403_and_never_reaches_anyone(fwd, origin):
    h = fwd(resolver=pinned({"evil.test": ["127.0.0.1"], "localhost": ["127.0.0.1"]}))
    s = send_raw(h.port, _get(h.port, f"http://evil.test:{origin.port}/x"))
    head, body = read_response(s)
    assert status_of(head) == 403
    assert b"X-Proxy-Error: not_allowed\r\n" in head and b"Content-Type: text/plain\r\n" in head
    assert body == (f"kodarelay: GET to evil.test:{origin.port} refused (not_allowed); "
                    f"allow it with --allow evil.test:{origin.port}\n").encode()
    assert s.recv(1) == b""
    assert origin.connections == 0
    [v] = h.violations()
    assert (v.protocol, v.host, v.port, v.reason) == ("http", "evil.test", origin.port, "not_allowed")


def test_default_port_is_80(fwd):
    h = fwd(["localhost:8080"])
    s = send_raw(h.port, _get(h.port, "http://elsewhere.test/"))
    head, _ = read_response(s)
    assert status_of(head) == 403
    [v] = h.violations()
    assert (v.host, v.port) == ("elsewhere.test", 80)


def test_guard_applies_to_forwarded_requests(fwd, origin):
    """A name resolving to loopback is refused like a CONNECT to it (reason resolved_address)."""
    h = fwd(["sneaky.test"], resolver=pinned({"sneaky.test": ["127.0.0.1"]}))
    s = send_raw(h.port, _get(h.port, f"http://sneaky.test:{origin.port}/"))
    head, _ = read_response(s)
    assert status_of(head) == 403 and b"X-Proxy-Error: resolved_address" in head
    assert origin.connections == 0


def test_forwarding_off_is_a_405_that_says_why_and_records_no_path(start_proxy, origin):
    h = start_proxy()
    s = send_raw(h.port, _get(h.port, origin.url("/secret/path?token=abc123")))
    head, body = read_response(s)
    assert status_of(head) == 405
    assert b"forward_http=True" in body and b"--no-forward-http" in body
    assert b"secret" not in head + body and b"abc123" not in head + body
    [v] = h.violations()
    assert (v.host, v.port, v.reason) == ("localhost", origin.port, "method_not_allowed")
    assert origin.connections == 0


def test_keep_alive_second_request_is_judged_on_its_own(fwd, origin):
    """First request answered, second (another host) refused with 403; the origin never sees it."""
    h = fwd(resolver=pinned({"evil.test": ["127.0.0.1"], "localhost": ["127.0.0.1"]}))
    s = connect(h.port)
    s.sendall(_get(h.port, origin.url("/first")))
    head, body = read_response(s)
    assert status_of(head) == 200 and body == b"hello from /first\n"
    s.sendall(_get(h.port, f"http://evil.test:{origin.port}/second"))
    head, _ = read_response(s)
    assert status_of(head) == 403
    assert [p for _, p, *_ in origin.seen] == ["/first"]
    assert s.recv(1) == b""


def test_keep_alive_reuses_the_upstream_connection_for_the_same_host(fwd, origin):
    h = fwd()
    s = connect(h.port)
    for i in range(3):
        s.sendall(_get(h.port, origin.url(f"/{i}")))
        head, body = read_response(s)
        assert status_of(head) == 200 and body == f"hello from /{i}\n".encode()
    assert origin.connections == 1
    s.close()


def test_pipelined_requests_are_answered_in_order(fwd, origin):
    h = fwd()
    s = connect(h.port)
    s.sendall(b"".join(_get(h.port, origin.url(f"/p{i}")) for i in range(3)))
    for i in range(3):
        head, body = read_response(s)
        assert body == f"hello from /p{i}\n".encode()
    s.close()


@pytest.mark.parametrize("path, expect", [
    ("/chunked", b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\nX-Sum: 3\r\n\r\n"),
    ("/204", b""),
    ("/304", b""),
])
def test_response_framing_is_kept_and_the_connection_goes_on(fwd, origin, path, expect):
    h = fwd()
    s = connect(h.port)
    s.sendall(_get(h.port, origin.url(path)))
    head = recv_until(s, b"\r\n\r\n")
    head, rest = head.split(b"\r\n\r\n", 1)
    assert rest + recv_exact(s, len(expect) - len(rest)) == expect
    s.sendall(_get(h.port, origin.url("/after")))
    _, body = read_response(s)
    assert body == b"hello from /after\n"
    s.close()


def test_head_response_has_no_body(fwd, origin):
    h = fwd()
    s = connect(h.port)
    s.sendall(f"HEAD {origin.url('/h')} HTTP/1.1\r\n\r\n".encode())
    head = recv_until(s, b"\r\n\r\n")
    assert b"Content-Length: 14" in head and head.endswith(b"\r\n\r\n")
    s.sendall(_get(h.port, origin.url("/after")))
    _, body = read_response(s)
    assert body == b"hello from /after\n"
    s.close()


def test_close_delimited_response_ends_the_client_connection(fwd, origin):
    h = fwd()
    s = send_raw(h.port, _get(h.port, origin.url("/close")))
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert status_of(head) == 200 and b"Connection: close" in head
    assert body == b"until the end"


def test_chunked_upload_and_content_length_upload(fwd, origin):
    h = fwd()
    payload = os.urandom(300_000)
    s = connect(h.port)
    s.sendall(f"POST {origin.url('/sha')} HTTP/1.1\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    _, body = read_response(s)
    assert body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (payload[:1000], payload[1000:])) + b"0\r\n\r\n"
    s.sendall(f"POST {origin.url('/sha')} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks)
    _, body = read_response(s)
    assert body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    s.close()


def test_websocket_upgrade_becomes_a_tunnel(fwd):
    """A real WebSocket server (``websockets``) and its sans-I/O client, through the proxy."""
    import asyncio
    import threading

    websockets = pytest.importorskip("websockets")
    from websockets.asyncio.server import serve
    from websockets.client import ClientProtocol
    from websockets.frames import Frame, Opcode
    from websockets.uri import parse_uri

    ready = threading.Event()
    state: dict[str, object] = {}

    async def echo(ws):  # type: ignore[no-untyped-def]
        async for msg in ws:
            await ws.send("echo:" + msg)

    def run_server() -> None:
        async def main() -> None:
            async with serve(echo, "127.0.0.1", 0) as server:
                state["port"] = server.sockets[0].getsockname()[1]
                state["loop"] = asyncio.get_running_loop()
                stop = asyncio.get_running_loop().create_future()
                state["stop"] = stop
                ready.set()
                await stop
        asyncio.run(main())

    t = threading.Thread(target=run_server, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        h = fwd()
        proto = ClientProtocol(parse_uri(f"ws://localhost:{state['port']}/chat"))
        request = proto.connect()
        proto.send_request(request)
        wire = b"".join(proto.data_to_send())
        line, rest = wire.split(b"\r\n", 1)
        assert line == b"GET /chat HTTP/1.1"
        s = connect(h.port)
        s.sendall(f"GET http://localhost:{state['port']}/chat HTTP/1.1\r\n".encode() + rest)
        events: list[object] = []
        deadline = time.monotonic() + 10
        sent = False
        while not any(isinstance(e, Frame) for e in events):
            assert time.monotonic() < deadline
            data = s.recv(65536)
            assert data, "proxy closed the WebSocket"
            proto.receive_data(data)
            events += proto.events_received()
            if not sent and proto.handshake_exc is None and proto.state.name == "OPEN":
                proto.send_text(b"hi")
                s.sendall(b"".join(proto.data_to_send()))
                sent = True
            assert proto.handshake_exc is None, proto.handshake_exc
        [frame] = [e for e in events if isinstance(e, Frame)]
        assert frame.opcode == Opcode.TEXT and frame.data == b"echo:hi"
        s.close()
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set_result, None)  # type: ignore[attr-defined]
        t.join(10)


# ── hostile heads ───────────────────────────────────────────────────────────

SMUGGLING = [
    b"POST {u} HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST {u} HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"POST {u} HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST {u} HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST {u} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST {u} HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"POST {u} HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
    b"POST {u} HTTP/1.1\r\nContent-Length: 0x5\r\n\r\nhello",
    b"POST {u} HTTP/1.1\r\nContent-Length:\r\n\r\n",
    b"GET {u} HTTP/1.1\r\nX: a\r\n b\r\n\r\n",                   # obs-fold
    b"GET {u} HTTP/1.1\r\nX: a\nY: b\r\n\r\n",                   # bare LF
    b"GET {u} HTTP/1.1\r\nX: a\x00b\r\n\r\n",                    # NUL
    b"GET {u} HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",  # space before the colon
    b"GET {u} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /path HTTP/1.1\r\nHost: localhost\r\n\r\n",            # origin form to a proxy
    b"GET https://localhost/ HTTP/1.1\r\n\r\n",                  # https in absolute form
    b"GET ftp://localhost/ HTTP/1.1\r\n\r\n",
    b"GET http://user:pw@localhost/ HTTP/1.1\r\n\r\n",           # userinfo
    # Connection naming a framing field: the next hop would drop it and read the body as a
    # second, unjudged request (here for evil.test)
    b"POST {u} HTTP/1.1\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 37\r\n\r\n"
    b"GET /evil HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    b"POST {u} HTTP/1.1\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"25\r\nGET /evil HTTP/1.1\r\nHost: evil.test\r\n\r\n\r\n0\r\n\r\n",
    b"GET {u} HTTP/1.1\r\nConnection: close\r\nConnection: host\r\n\r\n",
]


@pytest.mark.parametrize("raw", SMUGGLING, ids=range(len(SMUGGLING)))
def test_smuggling_shapes_get_400_before_anything_goes_upstream(fwd, origin, raw):
    h = fwd()
    s = send_raw(h.port, raw.replace(b"{u}", origin.url("/x").encode()))
    head, body = read_response(s)
    assert status_of(head) == 400, head
    assert body.startswith(b"kodarelay: ") or not body
    assert origin.connections == 0
    assert [v.reason for v in h.violations()] == ["bad_request"]


def test_malformed_chunk_in_a_body_ends_both_connections(fwd, origin):
    h = fwd()
    s = send_raw(h.port, f"POST {origin.url('/sha')} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + b"5\r\nhello\r\nzz\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert status_of(data) == 400
    assert origin.seen == [] or origin.seen[0][1] == "/sha"


def test_oversized_head_is_431(fwd):
    h = fwd()
    s = send_raw(h.port, b"GET http://localhost/ HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
    head = recv_until(s, b"\r\n\r\n")
    assert status_of(head) == 431


def test_oversized_second_head_is_431(fwd, origin):
    h = fwd()
    s = connect(h.port)
    s.sendall(_get(h.port, origin.url("/1")))
    read_response(s)
    s.sendall(b"GET http://localhost/ HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
    assert status_of(recv_until(s, b"\r\n\r\n")) == 431


def test_slow_head_is_408(fwd):
    h = fwd(handshake_timeout=0.3)
    s = send_raw(h.port, b"GET http://localhost/ HTTP/1.1\r\nX: slow")
    assert status_of(recv_until(s, b"\r\n\r\n")) == 408


def test_slow_second_head_is_408(fwd, origin):
    h = fwd(handshake_timeout=0.3)
    s = connect(h.port)
    s.sendall(_get(h.port, origin.url("/1")))
    read_response(s)
    s.sendall(b"GET http://localhost/ HTTP/1.1\r\nX: slow")
    assert status_of(recv_until(s, b"\r\n\r\n")) == 408


def test_a_body_that_never_ends_meets_the_idle_timeout(fwd, origin):
    h = fwd(idle_timeout=0.5)
    s = send_raw(h.port, f"POST {origin.url('/sha')} HTTP/1.1\r\nContent-Length: 1000\r\n\r\nonly some".encode())
    s.settimeout(10)
    start = time.monotonic()
    assert s.recv(65536) == b""
    assert time.monotonic() - start < 8


def test_a_response_that_never_ends_meets_the_idle_timeout(fwd, origin):
    h = fwd(idle_timeout=0.5)
    s = send_raw(h.port, _get(h.port, origin.url("/forever")))
    s.settimeout(10)
    data = b""
    start = time.monotonic()
    while chunk := s.recv(65536):
        data += chunk
    assert data.endswith(b"start")
    assert time.monotonic() - start < 8


def test_idle_keep_alive_connection_is_closed_quietly(fwd, origin):
    h = fwd(idle_timeout=0.3)
    s = connect(h.port)
    s.sendall(_get(h.port, origin.url("/1")))
    read_response(s)
    s.settimeout(10)
    assert s.recv(1) == b""


def test_upstream_that_dies_gives_502(fwd):
    from peers import dead_port

    h = fwd()
    s = send_raw(h.port, _get(h.port, f"http://localhost:{dead_port()}/"))
    head, body = read_response(s)
    assert status_of(head) == 502


def test_no_fd_leak_across_many_forwarded_requests(fwd, origin):
    h = fwd()
    for i in range(5):
        s = connect(h.port)
        s.sendall(_get(h.port, origin.url("/warm")))
        read_response(s)
        s.close()
    before = fd_count()
    for i in range(40):
        s = connect(h.port)
        s.sendall(_get(h.port, origin.url(f"/{i}")) if i % 2 else b"GET /bad HTTP/1.1\r\n\r\n")
        read_response(s)
        s.close()
    wait_until(lambda: fd_count() <= before + 2, what="fds to settle")


# ── secrets never leave the request line (issue 13 item 2) ──────────────────

SECRET_TARGETS = [
    "http://evil.test/p-SECRET1/x?token=SECRET2#SECRET3",
    "http://SECRET4:SECRET5@evil.test/",
]


@pytest.mark.parametrize("forward_http", [True, False])
def test_secrets_in_the_request_line_reach_no_violation_or_log(fwd, caplog, forward_http):
    caplog.set_level(logging.DEBUG)
    seen: list[object] = []
    h = fwd(["localhost"], forward_http=forward_http, on_violation=seen.append)
    for target in SECRET_TARGETS:
        s = send_raw(h.port, f"GET {target} HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode())
        head, body = read_response(s)
        assert status_of(head) in (400, 403, 405)
        assert b"SECRET" not in head + body
        s.close()
    wait_until(lambda: len(h.violations()) == 2, what="two violations")
    text = repr(h.violations()) + repr(seen) + "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET" not in text
    assert "evil.test" in repr(h.violations())


# ── Python clients ──────────────────────────────────────────────────────────


def test_requests_get_and_large_post(fwd, origin):
    requests = pytest.importorskip("requests")
    h = fwd()
    proxies = {"http": f"http://127.0.0.1:{h.port}"}
    with requests.Session() as session:
        session.trust_env = False
        r = session.get(origin.url("/req?x=1"), proxies=proxies, timeout=10)
        assert r.status_code == 200 and r.text == "hello from /req?x=1\n"
        payload = os.urandom(4 << 20)
        r = session.post(origin.url("/sha"), data=payload, proxies=proxies, timeout=20)
        assert r.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        r = session.get("http://evil.test/", proxies=proxies, timeout=10)
        assert r.status_code == 403 and r.headers["X-Proxy-Error"] == "not_allowed"
        assert "allow it with --allow evil.test:80" in r.text


def test_httpx_streams_both_ways(fwd, origin):
    httpx = pytest.importorskip("httpx")
    h = fwd()
    payload = os.urandom(3 << 20)

    def gen():  # type: ignore[no-untyped-def]
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    with httpx.Client(proxy=f"http://127.0.0.1:{h.port}", trust_env=False, timeout=20) as client:
        r = client.post(origin.url("/sha"), content=gen())          # chunked upload
        assert r.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        n = 0
        with client.stream("GET", origin.url(f"/bytes/{16 << 20}")) as resp:
            for part in resp.iter_bytes():
                n += len(part)
        assert n == 16 << 20
        assert client.get(origin.url("/chunked")).text == "one,two,three"
        assert client.get("http://evil.test/").status_code == 403


# ── curl ────────────────────────────────────────────────────────────────────


def _curl(h, *args: str) -> subprocess.CompletedProcess[bytes]:  # type: ignore[no-untyped-def]
    exe = require_tool("curl")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([exe, "-sS", "-x", f"http://127.0.0.1:{h.port}", *args], capture_output=True, timeout=30,
                          env=env)


def test_curl_get_and_refusal_exit_code(fwd, origin):
    h = fwd()
    out = _curl(h, "-f", origin.url("/curl"))
    assert out.returncode == 0 and out.stdout == b"hello from /curl\n"
    out = _curl(h, "-f", "http://evil.test/x")
    assert out.returncode == 22
    assert b"403" in out.stderr
    out = _curl(h, "http://evil.test/x")        # without -f the reader sees why
    assert b"refused (not_allowed); allow it with --allow evil.test:80" in out.stdout


def test_curl_expect_100_continue_upload(fwd, origin, tmp_path):
    h = fwd()
    payload = os.urandom(2 << 20)
    f = tmp_path / "up.bin"
    f.write_bytes(payload)
    out = _curl(h, "-f", "-H", "Expect: 100-continue", "--data-binary", f"@{f}", origin.url("/sha"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()


def test_curl_keeps_one_connection_for_many_urls(fwd, origin):
    h = fwd()
    out = _curl(h, "-f", origin.url("/1"), origin.url("/2"), origin.url("/chunked"), origin.url("/3"))
    assert out.returncode == 0
    assert out.stdout == b"hello from /1\nhello from /2\none,two,threehello from /3\n"
    assert origin.connections == 1


def test_mux_port_still_speaks_socks5(fwd, origin):
    h = fwd()
    out = subprocess.run([require_tool("curl"), "-sS", "-f", "--socks5-hostname", f"127.0.0.1:{h.port}",
                          origin.url("/socks")], capture_output=True, timeout=30)
    assert out.stdout == b"hello from /socks\n"


@pytest.mark.parametrize("splice", [True, False])
def test_large_bodies_both_ways_spliced_or_copied(fwd, origin, monkeypatch, splice):
    """Long bodies go socket -> pipe -> socket; where splice is unavailable they are copied."""
    from kodarelay import forward

    monkeypatch.setattr(forward, "_splice_ok", splice and forward._splice_ok)
    h = fwd()
    payload = os.urandom(5 << 20)
    s = connect(h.port)
    s.sendall(f"PUT {origin.url('/sha')} HTTP/1.1\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    _, body = read_response(s)
    assert body == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    s.sendall(_get(h.port, origin.url(f"/bytes/{9 << 20}")))
    head, body = read_response(s)
    assert status_of(head) == 200 and body == b"x" * (9 << 20)
    s.close()


def test_a_response_that_trickles_forever_meets_the_total_timeout(fwd, origin):
    """Bytes keep moving (never idle), but one exchange may not outlast ``total_timeout``."""
    import threading

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = lst.accept()
        with conn:
            recv_until(conn, b"\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            while not stop.wait(0.05):
                try:
                    conn.sendall(b".")
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        h = fwd(idle_timeout=5.0, total_timeout=0.8)
        s = send_raw(h.port, _get(h.port, f"http://localhost:{lst.getsockname()[1]}/"))
        s.settimeout(10)
        start = time.monotonic()
        while s.recv(65536):
            pass
        assert 0.5 < time.monotonic() - start < 5
    finally:
        stop.set()
        lst.close()
        t.join(5)


@pytest.mark.parametrize("field", [b"Content-Length", b"Transfer-Encoding"])
def test_connection_naming_framing_never_reaches_a_keep_alive_upstream(start_proxy, field):
    """Through a keep-alive upstream proxy the dropped framing field made the body a second
    request that went out unjudged (no violation recorded): now a 400, and nothing goes out."""
    from kodarelay import UpstreamConfig

    from peers import CannedProxy

    corporate = CannedProxy(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    try:
        h = start_proxy(["localhost", "allowed.test"], forward_http=True,
                        upstream=UpstreamConfig.from_url(f"http://127.0.0.1:{corporate.port}"))
        smuggled = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
        if field == b"Content-Length":
            body = smuggled
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
            framing = b"Transfer-Encoding: chunked\r\n"
        s = send_raw(h.port, b"POST http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nConnection: keep-alive, "
                     + field + b"\r\n" + framing + b"\r\n" + body)
        head, _ = read_response(s)
        assert status_of(head) == 400, head
        assert corporate.accepted == 0 and corporate.requests == []
        assert [v.reason for v in h.violations()] == ["bad_request"]
    finally:
        corporate.close()


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("name", ["connection-content-length", "connection-transfer-encoding"])
def test_response_connection_naming_framing_is_a_502(fwd, origin, name):
    """The response side of the same smuggling: a response head whose ``Connection`` names its
    own framing is never relayed."""
    h = fwd()
    s = send_raw(h.port, _get(origin.port, origin.url(f"/raw/{name}")))
    head, body = read_response(s)
    assert status_of(head) == 502, head
    assert b"hello" not in body


def test_response_with_both_framings_loses_its_content_length(fwd, origin):
    h = fwd()
    s = send_raw(h.port, _get(origin.port, origin.url("/raw/te-and-length"), b"Connection: close\r\n"))
    data = _read_all(s)
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert status_of(data) == 200 and b"content-length" not in head and b"transfer-encoding: chunked" in head
    assert data.endswith(b"5\r\nhello\r\n0\r\n\r\n")


def test_trailer_with_obs_fold_ends_the_response_unrelayed(fwd, origin):
    h = fwd()
    s = send_raw(h.port, _get(origin.port, origin.url("/raw/trailer-obs-fold"), b"Connection: close\r\n"))
    data = _read_all(s)
    assert status_of(data) == 200            # the head went out before the trailer arrived
    assert b"folded" not in data and b"X-A" not in data
    assert not data.endswith(b"0\r\n\r\n")   # the chunked body is left unterminated: the client sees an error


def test_trailers_keep_plain_fields_and_drop_framing_ones(fwd, origin):
    h = fwd()
    s = send_raw(h.port, _get(origin.port, origin.url("/raw/trailer-framing"), b"Connection: close\r\n"))
    data = _read_all(s)
    assert data.endswith(b"0\r\nX-Sum: 5\r\n\r\n"), data
    assert b"Set-Cookie" not in data and b"Content-Length: 9" not in data


def test_request_trailers_checked_too(fwd, origin):
    """A chunked upload's trailer with obs-fold is a 400 (nothing answered yet)."""
    h = fwd()
    s = send_raw(h.port, f"POST {origin.url('/sha')} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + b"5\r\nhello\r\n0\r\nX-A: 1\r\n folded\r\n\r\n")
    data = _read_all(s)
    assert status_of(data) == 400, data


def test_end_events_of_forwarded_requests_carry_their_bytes(fwd, origin):
    """The end event of each forwarded request had no byte counts."""
    events: list = []
    h = fwd(on_event=events.append)
    body = b"x" * 1000
    s = send_raw(h.port, f"POST {origin.url('/sha')} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head, answer = read_response(s)
    assert status_of(head) == 200
    s.sendall(_get(origin.port, origin.url("/bytes/5000"), b"Connection: close\r\n"))
    rest = b""
    while chunk := s.recv(65536):
        rest += chunk
    wait_until(lambda: len([e for e in events if e.kind == "end"]) == 2, what="two end events")
    first, second = [e for e in events if e.kind == "end"]
    assert first.bytes_up > len(body) and first.bytes_down == len(head) + len(answer)
    assert second.bytes_down == len(rest) and second.bytes_down > 5000 and second.bytes_up > 0

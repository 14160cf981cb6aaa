"""The engine's inspected tunnels (``kodarelay/_inspect.c``) against their specification, the
asyncio path (``kodarelay.forward`` / ``kodarelay.inspection``): the same raw requests through
both give the client the same bytes, the origin the same bytes, and the log the same
violations. Real TLS on both sides, a raw origin that records every byte it is sent."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay import relay
from peers import DEADLINE, http_connect, read_head, status_of, wait_until

pytestmark = pytest.mark.skipif(getattr(relay.impl, "tls_engine", lambda: None)() is None,
                                reason="this build has no TLS engine (no OpenSSL headers when it was built)")


def test_the_engine_loaded_when_it_should_have():
    import os

    if os.environ.get("KODARELAY_REQUIRE_EXTENSION") == "1" and not os.environ.get("KODARELAY_NO_TLS_ENGINE"):
        assert relay.impl.tls_engine().startswith("OpenSSL")


# ── a raw HTTPS origin ───────────────────────────────────────────────────────

RESPONSES = {
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                b"5;ext=1\r\nhello\r\n0\r\nX-Sum: 5\r\nSet-Cookie: no\r\n\r\n",
    "/both": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "/204": b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n",
    "/hop": b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 2\r\n\r\nok",
    "/close": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    "/origin-closes": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
    "/continue": b"HTTP/1.1 100 Continue\r\nX-C: 3\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk",
    "/bad": b"HTTP/1.1 2x0 Nope\r\n\r\n",
    "/ntlm": b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n",
}


def _read_request(f) -> bytes | None:  # type: ignore[no-untyped-def]
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = f.read(1)
        if not c:
            return None
        head += c
    lower = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            line = f.readline()
            body += line
            n = int(line.split(b";")[0], 16)
            if n == 0:
                while True:
                    t = f.readline()
                    body += t
                    if t == b"\r\n":
                        break
                break
            body += f.read(n + 2)
    elif b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = f.read(n)
    return head + body


class RawOrigin:
    """(``ctx`` None: plain HTTP, for forwarding)"""

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []       # per connection, everything it was sent
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with self.lock:
            idx = len(self.received)
            self.received.append(b"")
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True) if self.ctx is not None else conn
            f = tls.makefile("rb")
            while True:
                req = _read_request(f)
                if req is None:
                    return
                with self.lock:
                    self.received[idx] += req
                path = req.split(b" ")[1].decode().split("?")[0]
                if path == "/echo":             # what it was sent in Authorization, in a header
                    auth = [ln.split(b":", 1)[1].strip() for ln in req.split(b"\r\n") if ln.lower().startswith(b"authorization:")]
                    tls.sendall(b"HTTP/1.1 200 OK\r\nX-Seen: " + (auth[0] if auth else b"-") + b"\r\nContent-Length: 0\r\n\r\n")
                    continue
                if req.startswith(b"HEAD "):
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
                    continue
                tls.sendall(RESPONSES.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"))
                if path in ("/close", "/origin-closes", "/bad"):
                    tls.close()
                    return
        except (OSError, ssl.SSLError, ValueError):
            return                          # (ValueError: the proxy ended the body it found malformed)
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _read_response(s, method: str) -> bytes:  # type: ignore[no-untyped-def]
    """One whole response (interim ones included), by its framing."""
    out = b""
    while True:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            c = s.recv(1)
            if not c:
                return out + head
            head += c
        out += head
        status = int(head.split(b" ")[1])
        lower = head.lower()
        if 100 <= status < 200:
            continue
        if method == "HEAD" or status in (204, 304):
            return out
        if b"transfer-encoding: chunked" in lower:
            while not out.endswith(b"0\r\n\r\n") and not (b"\r\n0\r\n" in out[len(head):] and out.endswith(b"\r\n\r\n")):
                c = s.recv(1)
                if not c:
                    return out
                out += c
            return out
        if b"content-length:" in lower:
            n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            while n:
                c = s.recv(n)
                if not c:
                    return out
                out += c
                n -= len(c)
            return out
        while True:
            c = s.recv(65536)
            if not c:
                return out
            out += c


CASES = {
    "allowed and refused on one connection": [
        "GET /a?token=SECRET#frag HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "DELETE /a HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /a/%2e%2e/b HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /a HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        "HEAD /a HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /204 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /chunked HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /both HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /hop HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive, X-Mine\r\nX-Mine: 1\r\nKeep-Alive: 5\r\n"
        "TE: trailers\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: yes\r\n\r\n",
        "GET /continue HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET /close HTTP/1.1\r\nHost: {host}\r\n\r\n",
    ],
    "bodies": [
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 11\r\n\r\nhello world",
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Sum: 11\r\nSet-Cookie: dropped\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n",
        "GET /origin-closes HTTP/1.1\r\nHost: {host}\r\n\r\n",
    ],
    "smuggling: both framings": ["POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n"
                                 "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    "smuggling: chunked not last": ["POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"],
    "smuggling: unequal lengths": ["POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n"
                                   "Content-Length: 4\r\n\r\nabcd"],
    "smuggling: Connection names a framing field": ["GET /a HTTP/1.1\r\nHost: {host}\r\nConnection: Content-Length\r\n"
                                                    "Content-Length: 0\r\n\r\n"],
    "smuggling: two Hosts": ["GET /a HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n"],
    "a bad chunk size": ["POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    "a malformed request line": ["GET  /a HTTP/1.1\r\nHost: {host}\r\n\r\n"],
    "a bare LF": ["GET /a HTTP/1.1\r\nHost: {host}\nX: y\r\n\r\n"],
    "obs-fold": ["GET /a HTTP/1.1\r\nHost: {host}\r\nX: y\r\n z\r\n\r\n"],
    "absolute form": ["GET http://evil.test/ HTTP/1.1\r\nHost: {host}\r\n\r\n"],
    "HTTP/1.0 ends the connection": ["GET /a HTTP/1.0\r\nHost: {host}\r\n\r\n", "GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"],
    "a malformed response": ["GET /bad HTTP/1.1\r\nHost: {host}\r\n\r\n"],
}


SECRET_CASES = {
    "swapped in headers, Basic and the query; unswapped in the response": [
        "GET /echo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {phantom}\r\nX-Api-Key: k-{phantom}\r\n\r\n",
        "GET /echo?token={phantom} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {basic}\r\n\r\n",
        "GET /a/{phantom} HTTP/1.1\r\nHost: {host}\r\n\r\n",
    ],
    "another secret's phantom is a leak": [
        "GET /echo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {other}\r\n\r\n",
        "GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n",
    ],
    "a leak in the path is redacted": ["GET /x/{other}?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n"],
    "a refused request's path is redacted": ["DELETE /x/{phantom} HTTP/1.1\r\nHost: {host}\r\n\r\n"],
}


@pytest.mark.parametrize("case", list(SECRET_CASES))
def test_engine_and_asyncio_path_agree_on_secrets(case, ca, run_ca, bundle):
    import base64

    from kodarelay import BuiltInProxy, Filter, Secret, UpstreamConfig

    origin = RawOrigin(ca[1])
    mine = Secret("API_TOKEN", "sk-real-value-0123456789", ["localhost"])
    other = Secret("OTHER_TOKEN", "gh-other-value-0123456789", ["other.test"])
    basic = base64.b64encode(f"user:{mine.phantom}".encode()).decode()
    requests = [r.replace("{phantom}", mine.phantom).replace("{other}", other.phantom).replace("{basic}", basic)
                for r in SECRET_CASES[case]]
    try:
        results = []
        for engine in (False, True):
            h = BuiltInProxy(Filter([f"GET localhost:{origin.port}/*", "other.test"], deny=[f"DELETE localhost:{origin.port}/*"]),
                             upstream=UpstreamConfig.direct(), inspect=run_ca, upstream_ca=str(ca[0]),
                             secrets=[mine, other]).start()
            try:
                server = h._servers[0]
                if not engine:
                    server.inspection._engine = False
                inspected = _count_engine_tunnels(server)
                before = len(origin.received)
                client = _run(h.port, origin.port, bundle, requests)
                assert (inspected == [1]) == engine       # the engine served it (or, asked not to, did not)
                if engine:
                    want = len(results[0][2])
                    wait_until(lambda: len(h.violations()) >= want, what="the engine's violations")
                got = {(v.reason, v.method, v.path, v.detail) for v in h.violations()}
                results.append((client, b"".join(origin.received[before:]), got))
            finally:
                h.shutdown()
        (c2, o2, v2), (c1, o1, v1) = results
        assert c1 == c2
        assert o1 == o2
        assert v1 == v2
        # the origin has the value, never a phantom; the client the phantom, never the value
        assert mine.phantom.encode() not in o1 and other.phantom.encode() not in o1
        assert b"sk-real-value" not in c1
        if "swapped" in case:
            assert o1.count(b"sk-real-value-0123456789") == 4 and mine.phantom.encode() in c1
        assert not any(mine.phantom in str(v) or other.phantom in str(v) for v in v1)
    finally:
        origin.close()


def _count_engine_tunnels(server) -> list[int]:  # type: ignore[no-untyped-def]
    """How many tunnels the server hands to the engine as inspected ones (from now on)."""
    seen = [0]
    dial = server._dial_native

    def counting(h, proto, target, plan, inspect=None):  # type: ignore[no-untyped-def]
        if inspect is not None:
            seen[0] += 1
        return dial(h, proto, target, plan, inspect)

    server._dial_native = counting
    return seen


def _run(proxy_port: int, origin_port: int, bundle: str, requests: list[str], tolerant: bool = False) -> bytes:
    s, rest = http_connect(proxy_port, f"localhost:{origin_port}")
    status = status_of(read_head(s) if not rest else rest)
    if tolerant and status != 200:
        s.close()
        return b"<closed>"                  # (the tunnel ended before its answer)
    assert status == 200
    ctx = ssl.create_default_context(cafile=bundle)
    tls = ctx.wrap_socket(s, server_hostname="localhost")
    tls.settimeout(DEADLINE)
    got = b""
    try:
        for r in requests:
            tls.sendall(r.format(host=f"localhost:{origin_port}").encode())
            answer = _read_response(tls, r.split(" ")[0])
            got += answer + b"|"
            if not answer or b"\r\nConnection: close\r\n" in answer:
                break                       # (a client sends nothing more on a connection that ends)
    except (OSError, ssl.SSLError):
        got += b"<closed>"
    finally:
        tls.close()
    return got


@pytest.mark.parametrize("case", list(CASES))
def test_engine_and_asyncio_path_agree(case, start_proxy, ca, run_ca, bundle):
    origin = RawOrigin(ca[1])
    try:
        rules = [f"GET,HEAD localhost:{origin.port}/*", f"POST localhost:{origin.port}/upload"]
        deny = [f"DELETE localhost:{origin.port}/*"]
        results = []
        for engine in (False, True):
            from kodarelay import BuiltInProxy, Filter, UpstreamConfig

            h = BuiltInProxy(Filter(rules, deny=deny), upstream=UpstreamConfig.direct(), inspect=run_ca,
                             upstream_ca=str(ca[0])).start()
            try:
                server = h._servers[0]
                if not engine:
                    server.inspection._engine = False
                inspected = _count_engine_tunnels(server)
                before = len(origin.received)
                client = _run(h.port, origin.port, bundle, CASES[case])
                assert (inspected == [1]) == engine       # the engine served it (or, asked not to, did not)
                if engine:
                    # (the engine's records arrive from its completer thread)
                    want = len(results[0][2])
                    wait_until(lambda: len(h.violations()) >= want, what="the engine's violations")
                expected = {(v.reason, v.method, v.path) for v in h.violations()}
                results.append((client, b"".join(origin.received[before:]), expected))
            finally:
                h.shutdown()
        (c2, o2, v2), (c1, o1, v1) = results
        assert c1 == c2
        assert o1 == o2
        assert v1 == v2
        assert b"SECRET" not in c1 and not any("SECRET" in str(v) for v in v1)
    finally:
        origin.close()


def test_inspected_tunnels_are_served_by_the_engine(start_proxy, ca, run_ca, bundle):
    """The engine holds the tunnel (the asyncio path never sees it) and a busy interpreter does
    not slow its requests down to the switch interval."""
    origin = RawOrigin(ca[1])
    h = start_proxy([f"GET localhost:{origin.port}/*"], inspect=run_ca, upstream_ca=str(ca[0]))
    try:
        server = h._servers[0]
        s, rest = http_connect(h.port, f"localhost:{origin.port}")
        assert status_of(read_head(s) if not rest else rest) == 200
        tls = ssl.create_default_context(cafile=bundle).wrap_socket(s, server_hostname="localhost")
        tls.settimeout(DEADLINE)
        tls.sendall(f"GET /a HTTP/1.1\r\nHost: localhost:{origin.port}\r\n\r\n".encode())
        assert _read_response(tls, "GET").endswith(b"hi")
        assert len(server._native) == 1 and not server._handshaking
        tls.close()
        wait_until(lambda: not server._native, what="the tunnel's end")
    finally:
        origin.close()


def test_later_tunnels_come_from_the_engines_plan_cache(start_proxy, ca, run_ca, bundle):
    """The first CONNECT is planned by Python; the next ones to the same host are answered,
    dialled and inspected by the engine alone, and their refusals still reach the log."""
    origin = RawOrigin(ca[1])
    h = start_proxy([f"GET localhost:{origin.port}/*"], inspect=run_ca, upstream_ca=str(ca[0]))
    try:
        for i in range(3):
            s, rest = http_connect(h.port, f"localhost:{origin.port}")
            assert status_of(read_head(s) if not rest else rest) == 200
            tls = ssl.create_default_context(cafile=bundle).wrap_socket(s, server_hostname="localhost")
            tls.settimeout(DEADLINE)
            tls.sendall(f"GET /a HTTP/1.1\r\nHost: localhost:{origin.port}\r\n\r\n".encode())
            assert _read_response(tls, "GET").endswith(b"hi")
            tls.sendall(f"POST /n{i} HTTP/1.1\r\nHost: localhost:{origin.port}\r\n\r\n".encode())
            assert b"request_not_allowed" in _read_response(tls, "POST")
            tls.close()
        front = h._servers[0]._front
        if front is None:
            pytest.skip("the asyncio front-end (KODARELAY_NO_NATIVE_FRONTEND)")
        assert front.plan_stats()["hits"] >= 2
        wait_until(lambda: sorted(v.path for v in h.violations()) == ["/n0", "/n1", "/n2"], what="three violations")
        wait_until(lambda: front.plan_stats()["live"] == 0, what="the tunnels' ends")
    finally:
        origin.close()


def test_a_phantom_sent_to_another_inspected_host_is_refused(start_proxy, ca, run_ca, bundle):
    """With secrets, every inspected request is searched for every phantom (here: a host
    with request rules that is not the secret's)."""
    from kodarelay import Secret

    origin = RawOrigin(ca[1])
    gh = Secret("GH_TOKEN", "real-value-123", ["secret-owner.test"])
    h = start_proxy([f"GET localhost:{origin.port}/*", "secret-owner.test"], inspect=run_ca,
                    upstream_ca=str(ca[0]), secrets=[gh])
    try:
        s, rest = http_connect(h.port, f"localhost:{origin.port}")
        assert status_of(read_head(s) if not rest else rest) == 200
        tls = ssl.create_default_context(cafile=bundle).wrap_socket(s, server_hostname="localhost")
        tls.settimeout(DEADLINE)
        tls.sendall(f"GET /a HTTP/1.1\r\nHost: localhost:{origin.port}\r\nAuthorization: Bearer {gh.phantom}\r\n\r\n"
                    .encode())
        assert b"secret_leak" in _read_response(tls, "GET")
        tls.close()
        assert not any(gh.phantom.encode() in r for r in origin.received)
    finally:
        origin.close()


# ── plain-HTTP forwarding in the engine (the same machine, absolute-form requests) ───

FORWARD_CASES = {
    "allowed and refused on one connection": [
        "GET http://{host}/a?token=SECRET#frag HTTP/1.1\r\nHost: ignored.test\r\n\r\n",
        "POST http://{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "DELETE http://{host}/a HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "GET http://{host}/a/%2e%2e/b HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "HEAD http://{host}/a HTTP/1.1\r\n\r\n",
        "GET http://{host}/chunked HTTP/1.1\r\n\r\n",
        "GET http://{host}/hop HTTP/1.1\r\nConnection: keep-alive, X-Mine\r\nX-Mine: 1\r\nKeep-Alive: 5\r\n"
        "TE: trailers\r\nX-Kept: yes\r\n\r\n",
        "GET http://{host}/continue HTTP/1.1\r\n\r\n",
        "GET http://{host}/close HTTP/1.1\r\n\r\n",
    ],
    "bodies, and an origin that closes (Python dials again)": [
        "POST http://{host}/upload HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
        "POST http://{host}/upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Sum: 5\r\nSet-Cookie: dropped\r\n\r\n",
        "GET http://{host}/origin-closes HTTP/1.1\r\n\r\n",
        "GET http://{host}/a HTTP/1.1\r\n\r\n",
    ],
    "another host, then back (handed back to Python)": [
        "GET http://{host}/a HTTP/1.1\r\n\r\n",
        "GET http://blocked.test/ HTTP/1.1\r\n\r\n",
    ],
    "a proxy user (handed back)": [
        "GET http://{host}/a HTTP/1.1\r\n\r\n",
        "GET http://{host}/a HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwdw==\r\n\r\n",
        "GET http://{host}/a HTTP/1.1\r\n\r\n",
    ],
    "smuggling": ["POST http://{host}/upload HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    "userinfo (handed back)": ["GET http://{host}/a HTTP/1.1\r\n\r\n", "GET http://u:p@{host}/a HTTP/1.1\r\n\r\n"],
    "HTTP/1.0": ["GET http://{host}/a HTTP/1.0\r\n\r\n"],
    "a malformed response": ["GET http://{host}/bad HTTP/1.1\r\n\r\n"],
}


def _run_plain(proxy_port: int, origin_port: int, requests: list[str]) -> bytes:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=DEADLINE)
    got = b""
    try:
        for r in requests:
            s.sendall(r.format(host=f"127.0.0.1:{origin_port}").encode())
            got += _read_response(s, r.split(" ")[0]) + b"|"
    except OSError:
        got += b"<closed>"
    finally:
        s.close()
    return got


def _count_engine_forwards(server) -> list[int]:  # type: ignore[no-untyped-def]
    seen = [0]
    forward = server._forward_native

    def counting(h, proto, parsed):  # type: ignore[no-untyped-def]
        took = forward(h, proto, parsed)
        seen[0] += took
        return took

    server._forward_native = counting
    return seen


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forwarding_engine_and_asyncio_path_agree(case, monkeypatch):
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    origin = RawOrigin(None)
    try:
        rules = [f"GET,HEAD 127.0.0.1:{origin.port}/*", f"POST 127.0.0.1:{origin.port}/upload"]
        results = []
        for engine in (False, True):
            if engine:
                monkeypatch.delenv("KODARELAY_NO_ENGINE_FORWARD", raising=False)
            else:
                monkeypatch.setenv("KODARELAY_NO_ENGINE_FORWARD", "1")
            h = BuiltInProxy(Filter(rules, deny=[f"DELETE 127.0.0.1:{origin.port}/*"]), upstream=UpstreamConfig.direct(),
                             forward_http=True).start()
            try:
                server = h._servers[0]
                took = _count_engine_forwards(server)
                before = len(origin.received)
                client = _run_plain(h.port, origin.port, FORWARD_CASES[case])
                if server._front is not None:
                    assert (took[0] >= 1) == engine     # the engine served it (or, asked not to, did not)
                if engine:
                    want = len(results[0][2])
                    wait_until(lambda: len(h.violations()) >= want, what="the engine's violations")
                got = {(v.reason, v.method, v.path) for v in h.violations()}
                results.append((client, b"".join(origin.received[before:]), got))
            finally:
                h.shutdown()
        (c2, o2, v2), (c1, o1, v1) = results
        assert c1 == c2
        assert o1 == o2
        assert v1 == v2
        assert b"SECRET" not in c1 and not any("SECRET" in str(v) for v in v1)
    finally:
        origin.close()


def test_later_forwarded_connections_come_from_the_engines_plan_cache():
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    origin = RawOrigin(None)
    h = BuiltInProxy(Filter([f"GET 127.0.0.1:{origin.port}/*"]), upstream=UpstreamConfig.direct(), forward_http=True).start()
    try:
        for i in range(3):
            got = _run_plain(h.port, origin.port, [f"GET http://{{host}}/a HTTP/1.1\r\n\r\n",
                                                   f"POST http://{{host}}/n{i} HTTP/1.1\r\n\r\n"])
            assert got.count(b"HTTP/1.1 200") == 1 and b"request_not_allowed" in got
        front = h._servers[0]._front
        if front is None:
            pytest.skip("the asyncio front-end (KODARELAY_NO_NATIVE_FRONTEND)")
        assert front.plan_stats()["hits"] >= 2
        wait_until(lambda: sorted(v.path for v in h.violations()) == ["/n0", "/n1", "/n2"], what="three violations")
        assert len(origin.received) == 3 and all(r.startswith(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1:") for r in origin.received)
    finally:
        h.shutdown()
        origin.close()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 9])
def test_an_allocation_that_fails_ends_only_its_tunnel(n, start_proxy, ca, run_ca, bundle):
    """Fault injection: the Nth allocation of the machine fails (ENOMEM) somewhere in a
    request's path; that tunnel ends (or its request is refused), nothing crashes, no fd is
    left behind, and the next tunnel is served."""
    from peers import fd_count

    origin = RawOrigin(ca[1])
    h = start_proxy([f"GET localhost:{origin.port}/*"], inspect=run_ca, upstream_ca=str(ca[0]))
    try:
        assert b"hi" in _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"])
        wait_until(lambda: not h._servers[0]._native, what="the first tunnel's end")
        before = fd_count()
        relay.impl._inspect_fail_after(n)
        try:
            got = _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"] * 3, tolerant=True)
        finally:
            relay.impl._inspect_fail_after(0)
        # every request answered, or the connection ended (no answer, or a reset)
        assert got.count(b"hi") == 3 or got.endswith(b"<closed>") or got.endswith(b"||") or got == b"|"
        assert b"hi" in _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"])
        wait_until(lambda: not h._servers[0]._native and fd_count() <= before, what="no fd left behind")
    finally:
        origin.close()


def test_an_idle_origin_connection_serves_the_next_tunnel(start_proxy, ca, run_ca, bundle):
    """After a clean exchange the engine keeps the origin's TLS connection for the next
    tunnel to that origin (one handshake per tunnel, as haproxy's reuse); a response the
    origin ends (``Connection: close``) is never kept."""
    origin = RawOrigin(ca[1])
    h = start_proxy([f"GET localhost:{origin.port}/*"], inspect=run_ca, upstream_ca=str(ca[0]))
    try:
        for _ in range(3):
            assert _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"]).endswith(b"hi|")
            wait_until(lambda: not h._servers[0]._native and (h._servers[0]._front is None
                                                             or h._servers[0]._front.plan_stats()["live"] == 0),
                       what="the tunnel's end")
        served = [r for r in origin.received if r]
        assert len(served) == 1 and served[0].count(b"GET /a ") == 3       # one origin connection, reused
        got = _run(h.port, origin.port, bundle, ["GET /origin-closes HTTP/1.1\r\nHost: {host}\r\n\r\n"])
        assert got.endswith(b"bye|")
        assert _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"]).endswith(b"hi|")
        served = [r for r in origin.received if r]
        assert len(served) == 2 and served[1] == b"GET /a HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % origin.port
        # a login bound to the connection (NTLM): the connection is never another tunnel's
        assert b" 401 " in _run(h.port, origin.port, bundle, ["GET /ntlm HTTP/1.1\r\nHost: {host}\r\n\r\n"])
        wait_until(lambda: not h._servers[0]._native, what="the tunnel's end")
        assert _run(h.port, origin.port, bundle, ["GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"]).endswith(b"hi|")
        served = [r for r in origin.received if r]
        assert len(served) == 3 and served[2] == b"GET /a HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % origin.port
    finally:
        origin.close()


@st.composite
def request_heads(draw):  # type: ignore[no-untyped-def]
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS", "get", "GE T"]))
    path = "/" + draw(st.text(alphabet="ab/.%2e5c?=&#", max_size=10))
    fields = draw(st.lists(st.sampled_from([
        "Host: {host}", "Host: other.test", "Content-Length: 0", "Content-Length: 3", "Content-Length: 0, 0",
        "Transfer-Encoding: chunked", "Transfer-Encoding: gzip", "Connection: close", "Connection: x-a",
        "X-A: 1", "Connection: keep-alive", "Upgrade: websocket", "Keep-Alive: 1", "TE: trailers",
        "Expect: 100-continue", "X-Sp:  spaced  ", " folded", "Bad Name: 1", "X-Ctl: a\x01b",
    ]), max_size=5))
    body = draw(st.sampled_from(["", "abc", "0\r\n\r\n", "3\r\nabc\r\n0\r\n\r\n"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    return f"{method} {path} {version}\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n" + body


def test_random_requests_get_the_same_answers_from_both_paths(ca, run_ca, bundle):
    """Hypothesis: any sequence of (often malformed) requests gets the same bytes back, sends
    the origin the same bytes, and records the same violations on both paths."""
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    origin = RawOrigin(ca[1])
    proxies = []
    try:
        for engine in (False, True):
            h = BuiltInProxy(Filter([f"GET,HEAD localhost:{origin.port}/a*", f"POST localhost:{origin.port}/*"],
                                    deny=[f"DELETE localhost:{origin.port}/*"]),
                             upstream=UpstreamConfig.direct(), inspect=run_ca, upstream_ca=str(ca[0])).start()
            if not engine:
                h._servers[0].inspection._engine = False
            proxies.append(h)

        @settings(max_examples=40, deadline=None)
        @given(st.lists(request_heads(), min_size=1, max_size=3))
        def check(requests: list[str]) -> None:
            results = []
            for h in proxies:
                before = [len(r) for r in origin.received]     # (the engine may reuse an origin connection)
                v0 = len(h.violations())
                client = _run(h.port, origin.port, bundle, requests)
                sent = b"".join(r[before[i]:] if i < len(before) else r for i, r in enumerate(origin.received))
                results.append((h, client, sent, v0))
            (hp, c_py, py_sent, v_py), (he, c_en, en_sent, v_en) = results
            want = len(hp.violations()) - v_py
            wait_until(lambda: len(he.violations()) - v_en >= want, what="the engine's violations")
            assert c_en == c_py
            assert en_sent == py_sent
            assert [(v.reason, v.method, v.path) for v in he.violations()[v_en:]] == \
                   [(v.reason, v.method, v.path) for v in hp.violations()[v_py:]]

        check()
    finally:
        for h in proxies:
            h.shutdown()
        origin.close()

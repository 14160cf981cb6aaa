"""The compiled engine's plan cache: handshakes whose (protocol, host, port) has a cached plan
are answered, dialled, chained or refused in the engine, without Python; everything else is
a miss that reaches Python as before.

These drive ``native_listen`` directly, with a small Python side standing in for the
servers; ``test_engine_policy.py`` covers the servers on top of it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay import _relay_py, relay
from kodarelay._errors import HeadError, Socks5Error

from peers import CannedProxy, EchoServer, connect, dead_port, fd_count, recv_exact, wait_until

pytestmark = pytest.mark.skipif(not hasattr(relay.impl, "native_listen"), reason="needs the compiled engine")

OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
SOCKS_OK = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nX-Proxy-Error: not_allowed\r\n\r\n"
INF = float("inf")


class Front:
    """A native listener on a loop thread of its own; misses go to ``decide(handshake)``."""

    def __init__(self, mode: str = "http", **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(512)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.misses: list[Any] = []
        self.refused: list[tuple[Any, ...]] = []
        self.dropped = 0
        self.decide: Callable[[Any], None] = lambda h: h.close()
        self.tunnels: list[Any] = []
        self.refused_gate: threading.Event | None = None

        def on_refused(records: list[tuple[Any, ...]], dropped: int) -> None:
            if self.refused_gate is not None:
                self.refused_gate.wait(10)
            self.refused.extend(records)
            self.dropped += dropped

        async def make() -> Any:
            return relay.impl.native_listen(  # type: ignore[attr-defined]
                self.lsock, mode, 5.0, self.loop, self._batch, None, on_refused, **options
            )

        self.nl = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)

    def _batch(self, items: list[Any], err: int) -> None:
        for h in items:
            self.misses.append(h)
            self.decide(h)

    def dial(self, h: Any, addresses: list[str], port: int, ok: bytes) -> None:
        """What the servers do with a miss: dial in the engine (``early``: after the request)."""
        if h.proto == 0:
            end = h.data.index(b"\r\n\r\n") + 4
        else:
            end = _relay_py.parse_socks5_request(h.data)[0]
        self.tunnels.append(h.dial(addresses, port, ok, h.data[end:], 5.0, 60.0, 60.0, h.proto == 1,
                                   self.loop, lambda e, h: None))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.nl.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.lsock.close()
        self.loop.close()


@pytest.fixture
def front():  # type: ignore[no-untyped-def]
    fronts: list[Front] = []

    def make(mode: str = "http", **options: Any) -> Front:
        f = Front(mode, **options)
        fronts.append(f)
        return f

    yield make
    for f in fronts:
        f.close()


def http_tunnel(port: int, target: bytes, early: bytes = b"") -> tuple[socket.socket, bytes]:
    s = connect(port)
    s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n" + early)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            break
        head += b
    return s, head


def socks_tunnel(port: int, host: bytes, dport: int, early: bytes = b"") -> tuple[socket.socket, bytes]:
    s = connect(port)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(bytes([5, 1, 0, 3, len(host)]) + host + dport.to_bytes(2, "big") + early)
    return s, recv_exact(s, 10)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def open_tunnel(f: Front, proto: int, host: bytes, port: int, early: bytes = b"") -> tuple[socket.socket, bytes]:
    if proto == 0:
        return http_tunnel(f.port, host + b":" + str(port).encode(), early)
    return socks_tunnel(f.port, host, port, early)


@pytest.mark.parametrize("proto", [0, 1], ids=["http", "socks5"])
def test_direct_plan_is_served_in_the_engine(front, echo: EchoServer, proto: int) -> None:
    f = front("http" if proto == 0 else "socks5")
    ok = OK if proto == 0 else SOCKS_OK

    def decide(h: Any) -> None:
        f.nl.set_plan(proto, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], ok), 30.0)
        f.dial(h, ["127.0.0.1"], echo.port, ok)

    f.decide = decide
    for i in range(4):
        s, head = open_tunnel(f, proto, b"pinned.test", echo.port, early=b"early%d" % i)
        assert head == ok
        assert recv_exact(s, 6) == b"early%d" % i
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""
        s.close()
    assert len(f.misses) == 1                  # only the first request reached Python
    stats = f.nl.plan_stats()
    assert stats["hits"] == 3 and stats["plans"] == 1
    wait_until(lambda: f.nl.plan_stats()["live"] == 0, what="tunnels opened from plans to end")


def test_other_keys_miss(front, echo: EchoServer) -> None:
    """The key is (protocol, host exactly as sent, port): another port, case or protocol misses."""
    f = front("mux")
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), 30.0)
    for target in [b"pinned.test:%d" % (echo.port + 1), b"Pinned.test:%d" % echo.port]:
        s, head = http_tunnel(f.port, target)
        assert head == b""                      # Python's stand-in closes misses
        s.close()
    s, rep = socks_tunnel(f.port, b"pinned.test", echo.port)
    assert rep == b""
    s.close()
    wait_until(lambda: len(f.misses) == 3, what="three misses")
    assert f.nl.plan_stats()["hits"] == 0


def test_clear_plans_takes_effect_for_the_next_request(front, echo: EchoServer) -> None:
    f = front()
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), INF)
    s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
    assert head == OK
    s.close()
    f.nl.clear_plans()
    assert f.nl.plan_stats()["plans"] == 0
    s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
    assert head == b""
    s.close()
    wait_until(lambda: len(f.misses) == 1, what="the miss")


def test_plan_decided_before_a_clear_is_not_stored(front, echo: EchoServer) -> None:
    f = front()
    gen = f.nl.plan_generation
    f.nl.clear_plans()                           # the policy changed while Python decided
    assert not f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), 30.0, gen)
    assert f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), 30.0,
                         f.nl.plan_generation)
    assert not f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), 0.0)
    assert not f.nl.set_plan(0, b"x" * 256, echo.port, ("direct", ["127.0.0.1"], OK), 30.0)


def test_plan_expires_after_its_ttl(front, echo: EchoServer) -> None:
    f = front()
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), 0.3)
    s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
    assert head == OK
    s.close()
    # the expiry is a deadline on the clock: wait it out, then the next request misses
    threading.Event().wait(0.35)
    s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
    assert head == b""
    s.close()
    wait_until(lambda: len(f.misses) == 1, what="the miss")


def test_plans_are_bounded(front) -> None:
    f = front()
    for i in range(5000):
        f.nl.set_plan(0, b"h%d.test" % i, 443, ("direct", ["127.0.0.1"], OK), INF)
    stats = f.nl.plan_stats()
    assert stats["plans"] == 4096 and stats["evicted"] == 5000 - 4096


@pytest.mark.parametrize("proto", [0, 1], ids=["http", "socks5"])
def test_refusal_plan_replies_and_queues_a_violation(front, proto: int) -> None:
    f = front("mux")
    reply = FORBIDDEN if proto == 0 else b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    f.nl.set_plan(proto, b"evil.test", 443, ("refuse", reply, "not_allowed"), INF)
    s, head = open_tunnel(f, proto, b"evil.test", 443)
    assert head == reply
    assert read_all(s) == b""
    s.close()
    wait_until(lambda: f.refused, what="the refusal record")
    (when, p, host, port, reason, status, client), = f.refused
    assert (p, host, port, reason, status) == (proto, b"evil.test", 443, "not_allowed", 0) and when > 1e9 and client is None
    assert f.misses == [] and f.dropped == 0


def test_refusal_flood_is_bounded_and_in_order(front, echo: EchoServer) -> None:
    """While Python is slow to take refusals, the engine keeps the newest 1024 and counts the
    rest; allowed tunnels from plans keep being served meanwhile."""
    f = front()
    f.refused_gate = threading.Event()
    n = 1500
    for i in range(n):
        f.nl.set_plan(0, b"E%d.test" % i, 443, ("refuse", FORBIDDEN, "denied"), INF, record_host="e%d.test" % i)
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), INF)
    for i in range(n):
        s, head = http_tunnel(f.port, b"E%d.test:443" % i)
        assert head == FORBIDDEN
        s.close()
        if i == n // 2:
            s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
            assert head == OK
            s.sendall(b"x")
            assert recv_exact(s, 1) == b"x"
            s.close()
    f.refused_gate.set()
    wait_until(lambda: len(f.refused) + f.dropped == n, what="every refusal to be delivered or counted")
    hosts = [int(r[2][1:-5]) for r in f.refused]
    assert hosts == sorted(hosts) and hosts[-1] == n - 1
    assert f.dropped >= n - 1024 - 64      # (the first batch went out before the gate closed)


@pytest.mark.parametrize("proto", [0, 1], ids=["http", "socks5"])
def test_chain_plan_goes_through_the_upstream(front, proto: int) -> None:
    up = CannedProxy(b"HTTP/1.1 200 Connection established\r\nVia: fake\r\n\r\nHELLO")
    try:
        f = front("mux")
        request = b"CONNECT far.test:443 HTTP/1.1\r\nHost: far.test:443\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
        ok = OK if proto == 0 else SOCKS_OK
        f.nl.set_plan(proto, b"far.test", 443, ("chain", "127.0.0.1", up.port, request, ok), INF)
        s, head = open_tunnel(f, proto, b"far.test", 443, early=b"early")
        assert head == ok
        assert recv_exact(s, 5) == b"HELLO"        # sent by the upstream after its reply head
        assert recv_exact(s, 5) == b"early"
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        s.close()
        assert up.requests == [request]
        assert f.misses == []
    finally:
        up.close()


@pytest.mark.parametrize("reply", [b"HTTP/1.1 403 Forbidden\r\n\r\n", b"HTTP/1.1 407 Auth\n\n", b"garbage\r\n\r\n", b""])
@pytest.mark.parametrize("proto", [0, 1], ids=["http", "socks5"])
def test_chain_plan_upstream_refusal_is_502_or_rep_5(front, proto: int, reply: bytes) -> None:
    up = CannedProxy(reply)
    try:
        f = front("mux")
        ok = OK if proto == 0 else SOCKS_OK
        port = up.port if reply else dead_port()    # (b"": nothing listens, the connect is refused)
        f.nl.set_plan(proto, b"far.test", 443, ("chain", "127.0.0.1", port, b"CONNECT far.test:443 HTTP/1.1\r\n\r\n", ok), INF)
        s, head = open_tunnel(f, proto, b"far.test", 443)
        if proto == 0:
            assert head == b"HTTP/1.1 502 Bad Gateway\r\n\r\n"
        else:
            assert head[:2] == b"\x05\x05"
        assert read_all(s) == b""
        s.close()
        if reply.startswith(b"HTTP/1.1 4"):    # the upstream's refusal is a violation, as in Python
            wait_until(lambda: f.refused, what="the refusal record")
            assert [r[1:] for r in f.refused] == [(proto, b"far.test", 443, "upstream_refused", int(reply[9:12]), None)]
        else:
            assert f.refused == []
    finally:
        up.close()


def test_closing_the_listener_ends_tunnels_opened_from_plans(front, echo: EchoServer) -> None:
    f = front()
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), INF)
    s, head = http_tunnel(f.port, b"pinned.test:%d" % echo.port)
    assert head == OK
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    f.loop.call_soon_threadsafe(f.nl.close)
    assert read_all(s) == b""
    s.close()


def test_plan_path_leaks_no_fds(front, echo: EchoServer) -> None:
    f = front()
    f.nl.set_plan(0, b"pinned.test", echo.port, ("direct", ["127.0.0.1"], OK), INF)
    f.nl.set_plan(0, b"evil.test", 443, ("refuse", FORBIDDEN, "denied"), INF)
    f.nl.set_plan(0, b"dead.test", 9, ("direct", ["127.0.0.1"], OK), INF)

    def round_trip() -> None:
        for target in [b"pinned.test:%d" % echo.port, b"evil.test:443", b"dead.test:9"]:
            s, _head = http_tunnel(f.port, target)
            s.close()
        wait_until(lambda: f.nl.plan_stats()["live"] == 0, what="tunnels to end")

    round_trip()
    before = fd_count()
    for _ in range(20):
        round_trip()
    wait_until(lambda: fd_count() <= before, what="fds to return to their count")


# ── the engine's view of a head agrees with the Python parsers ───────────────────────────

def python_key(proto: int, data: bytes) -> tuple[bytes, int, int] | None:
    """What the Python side makes of ``data``: (host as bytes, port, head length) of a CONNECT."""
    try:
        if proto == 0:
            end = _relay_py.http_head_end(data, 8192)
            if end < 0:
                return None
            method, target, _v = _relay_py.parse_request_line(data[:end])
            if method != "CONNECT":
                return None
            host, port = _relay_py.split_host_port(target)
            return host.encode("ascii"), port, end
        parsed = _relay_py.parse_socks5_request(data)
        if parsed is None:
            return None
        used, cmd, atyp, host, port = parsed
        if cmd != 1 or atyp != 3:
            return None
        return host.encode("utf-8"), port, used
    except (HeadError, Socks5Error):
        return None


AUTHORITIES = st.one_of(
    st.sampled_from(["example.com:443", "[::1]:8443", "a:1", "x:65535", "x:65536", "x:0", "x:01", "a:b:1",
                     "[::1]443", "[]:1", "h:", ":80", "h:123456", "[::1]:x", "Ex.Am.Ple:80", "h]:1", "[h:1"]),
    st.text(st.sampled_from("ab.-:[]019 \t\x7f\xe9"), max_size=12),
)
HEADERS = st.lists(
    st.one_of(
        st.sampled_from(["Host: x", "Proxy-Authorization: Basic dTpw", "proxy-authorization: x", "User-Agent: curl",
                         " folded", "NoColon", ": empty", "Bad Name: v", "X: a\tb", "X: \x01"]),
        st.text(st.sampled_from("aX-: \t\r\n\x00\x80"), max_size=10),
    ),
    max_size=4,
)


@settings(max_examples=1500, deadline=None)
@given(
    method=st.sampled_from(["CONNECT", "connect", "GET", "CONNECT ", " CONNECT"]),
    authority=AUTHORITIES,
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/1.x"]),
    headers=HEADERS,
    eol=st.sampled_from(["\r\n", "\n", "\r\n"]),
    early=st.binary(max_size=8),
)
def test_engine_http_key_is_one_python_parses_the_same(method: str, authority: str, version: str,
                                                       headers: list[str], eol: str, early: bytes) -> None:
    head = (f"{method} {authority} {version}{eol}" + "".join(h + eol for h in headers) + "\r\n").encode("latin-1")
    data = head + early
    engine = relay.impl._plan_key(0, data)  # type: ignore[attr-defined]
    if engine is not None:
        assert python_key(0, data) == engine


@settings(max_examples=1500, deadline=None)
@given(data=st.binary(max_size=24), prefix=st.sampled_from([b"", b"\x05\x01\x00\x03", b"\x05\x02\x00\x03",
                                                            b"\x05\x01\x00\x01"]))
def test_engine_socks5_key_is_one_python_parses_the_same(data: bytes, prefix: bytes) -> None:
    data = prefix + data
    engine = relay.impl._plan_key(1, data)  # type: ignore[attr-defined]
    if engine is None:
        return
    ours = python_key(1, data)
    if ours is None:
        # only a name Python cannot decode: then no plan can be stored under it
        with pytest.raises(Socks5Error):
            _relay_py.parse_socks5_request(data)
    else:
        assert ours == engine


def test_engine_key_accepts_the_common_heads() -> None:
    """The differential tests above would pass for a lookup that never hits: not this one."""
    key = relay.impl._plan_key  # type: ignore[attr-defined]
    head = b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\nUser-Agent: curl/8\r\n\r\n"
    assert key(0, head + b"early") == (b"pypi.org", 443, len(head))
    assert key(0, b"CONNECT [::1]:443 HTTP/1.0\r\n\r\nx") == (b"[::1]", 443, 30)
    assert key(1, b"\x05\x01\x00\x03\x08pypi.org\x01\xbb") == (b"pypi.org", 443, 15)


def test_plans_carry_the_policys_generation_which_only_moves_forward(front, echo: EchoServer) -> None:
    """Issue 17 item 17: a new listener's cache started at generation 0, so after an engine
    restart a plan decided under an old policy (whose generation happened to match) could be
    stored. The server now stores plans under its policy's own generation."""
    f = front()
    f.nl.clear_plans(7)
    assert f.nl.plan_generation == 7
    plan = ("direct", ["127.0.0.1"], OK)
    assert not f.nl.set_plan(0, b"pinned.test", echo.port, plan, 30.0, 0)     # a fresh cache's old number
    assert not f.nl.set_plan(0, b"pinned.test", echo.port, plan, 30.0, 6)
    f.nl.clear_plans(5)                          # two changes whose calls crossed: the newer stays
    assert f.nl.plan_generation == 7
    assert f.nl.set_plan(0, b"pinned.test", echo.port, plan, 30.0, 7)


def test_a_server_after_an_engine_restart_stores_plans_under_its_policy_generation(start_proxy, echo: EchoServer) -> None:
    from kodarelay import Filter
    from kodarelay import _relay

    h = start_proxy(["localhost"])
    server = h._servers[0]
    for n in range(3):
        h.set_filter(Filter(["localhost", f"n{n}.test"]))
    if os.environ.get("KODARELAY_NO_NATIVE_FRONTEND") or relay.IMPLEMENTATION != "cython":
        pytest.skip("the native front-end is off")
    wait_until(lambda: server._front is not None, what="the front-end")
    front = server._front
    assert front.plan_generation == server.dialer.policy.generation == 3
    _relay.shutdown_engine()                     # the listener's next cache is new
    h2 = start_proxy(["localhost"])
    h2.set_filter(Filter(["localhost"]))
    h2.set_filter(Filter(["localhost"]))
    server2 = h2._servers[0]
    wait_until(lambda: server2._front is not None, what="the new listener's front-end")
    assert server2._front.plan_generation == server2.dialer.policy.generation == 2


def test_engine_refusals_keep_their_own_time_and_no_count_is_lost(start_proxy) -> None:
    """Issue 17 item 16: refusals the engine served from cached plans were recorded with the
    time of their delivery, and those beyond the ring's 1,024 were dropped from every count.
    Here a batch arrives as the completer hands it over (``_engine_refused``): a record made
    100 s earlier keeps its time, and 7 lost ones still count."""
    import time as _time

    h = start_proxy(["localhost"])
    server = h._servers[0]
    then = _time.time() - 100.0
    server._engine_refused([(then, 0, b"refused.test", 443, "not_allowed", 0, None)], 7)
    (v,) = h.violations()
    assert v.time == then and v.host == "refused.test" and v.reason == "not_allowed"
    assert h.refused_total == 8


def test_a_refusal_flood_served_from_the_cache_keeps_every_count_and_its_own_time(start_proxy) -> None:
    """Issue 17 item 16, end to end through a server: while the completer is held up (here in
    ``on_violation``), refusals served from a cached plan pile up beyond the engine's ring of
    1,024. Every one is counted (``refused_total``, the summary's first line), and each record
    carries the time it was refused at, not the time Python got round to it."""
    import time as _time

    from kodarelay.cli import summarize

    if os.environ.get("KODARELAY_NO_NATIVE_FRONTEND"):
        pytest.skip("the native front-end is off")
    armed = threading.Event()
    release = threading.Event()
    blocked = threading.Event()

    def on_violation(v: Any) -> None:
        if armed.is_set() and not release.is_set():
            blocked.set()
            release.wait(30)

    h = start_proxy(["localhost"], on_violation=on_violation)
    server = h._servers[0]
    s, head = http_tunnel(h.port, b"refused.test:443")            # decided in Python, then cached
    assert b" 403 " in head
    s.close()
    wait_until(lambda: server._front is not None and server._front.plan_stats()["plans"] >= 1,
               what="the refusal plan in the engine")
    armed.set()
    n = 1500
    try:
        for i in range(n):
            s, head = http_tunnel(h.port, b"refused.test:443")
            assert b" 403 " in head, (i, head)
            s.close()
        refused_by = _time.time()
        assert server._front.plan_stats()["refused"] >= n - 1   # served by the engine itself
        assert blocked.wait(10)
    finally:
        release.set()
    wait_until(lambda: h.refused_total == n + 1, what="every refusal to be counted")
    records = h.violations()
    assert 1024 <= len(records) <= n + 1
    late = [v.time for v in records if v.time > refused_by]
    assert not late, f"{len(late)} records carry their delivery time"
    lines = summarize(records, h.refused_total)
    assert lines[0] == f"refused {n + 1} connections:"

"""One plan per request: cached decisions, policy changes, resolution that never queues,
the guard on chained literals — through real proxies on loopback, on whichever front-end
the run selects (CI runs this file with and without ``KODARELAY_NO_NATIVE_FRONTEND``)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig

from peers import DEADLINE, CannedProxy, connect, http_connect, pinned, recv_exact, socks5_connect, status_of, wait_until


class CountingResolver:
    """An injected resolver that counts its calls (per name) and can be held."""

    def __init__(self, mapping: dict[str, list[str]]) -> None:
        self.mapping = mapping
        self.calls: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.lock = threading.Lock()

    async def __call__(self, host: str, port: int) -> list[str]:
        with self.lock:
            self.calls[host] = self.calls.get(host, 0) + 1
        if self.gate is not None:
            await self.gate.wait()
        if host not in self.mapping:
            raise OSError(f"no such name {host}")
        return list(self.mapping[host])


def _tunnel_ok(port: int, target: str) -> socket.socket:
    s, head = http_connect(port, target)
    assert status_of(head) == 200, head
    return s


def test_a_name_is_resolved_once_within_dns_ttl(start_proxy, echo):
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    h = start_proxy(["app.test", "127.0.0.1"], resolver=r, dns_ttl=30.0)
    for _ in range(3):
        s = _tunnel_ok(h.port, f"app.test:{echo.port}")
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
        s.close()
    assert r.calls == {"app.test": 1}


def test_dns_ttl_zero_resolves_every_time(start_proxy, echo):
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    h = start_proxy(["app.test", "127.0.0.1"], resolver=r, dns_ttl=0)
    for _ in range(3):
        _tunnel_ok(h.port, f"app.test:{echo.port}").close()
    assert r.calls == {"app.test": 3}


def test_concurrent_first_requests_share_one_lookup(echo):
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    async def gate_resolver(host: str, port: int) -> list[str]:
        loop_holder.setdefault("loop", asyncio.get_running_loop())
        if r.gate is None:
            r.gate = asyncio.Event()
        return await r(host, port)

    with BuiltInProxy(Filter(["app.test", "127.0.0.1"]), upstream=UpstreamConfig.direct(), resolver=gate_resolver).start() as h:
        socks = []
        for _ in range(5):
            s = connect(h.port)
            s.sendall(f"CONNECT app.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
            socks.append(s)
        wait_until(lambda: r.calls.get("app.test", 0) >= 1, what="the lookup to start")
        loop = loop_holder["loop"]
        gate = r.gate
        assert gate is not None
        loop.call_soon_threadsafe(gate.set)
        for s in socks:
            assert recv_exact(s, 12) == b"HTTP/1.1 200"
            s.close()
    assert r.calls == {"app.test": 1}


def test_a_name_that_never_answers_delays_only_its_own_clients(monkeypatch, start_proxy, echo):
    """issue 10.4: lookups of never-answering names used to fill asyncio's default executor
    (6 threads here) and stall every other name. The system resolver is held for ``*.hang``."""
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(host).endswith(".hang"):
            release.wait(DEADLINE)
            raise socket.gaierror(socket.EAI_NONAME, "never answered")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    h = start_proxy(["*.hang", "localhost"], connect_timeout=30.0)
    try:
        hung = []
        for i in range(12):
            s = connect(h.port)
            s.sendall(f"CONNECT n{i}.hang:443 HTTP/1.1\r\n\r\n".encode())
            hung.append(s)
        t0 = time.monotonic()
        s = _tunnel_ok(h.port, f"localhost:{echo.port}")
        assert time.monotonic() - t0 < 5.0
        s.close()
    finally:
        release.set()
    for s in hung:
        s.settimeout(DEADLINE)
        assert recv_exact(s, 12) == b"HTTP/1.1 502"
        s.close()


@pytest.fixture
def fake_upstream():  # type: ignore[no-untyped-def]
    up = CannedProxy()
    yield up
    up.close()


@pytest.mark.parametrize("target", ["169.254.169.254:80", "127.0.0.1:9001", "[::1]:9001", "2130706433:80"])
def test_a_chained_ip_literal_is_guarded_before_chaining(start_proxy, fake_upstream, target):
    """issue 10.3: with an upstream and a broad rule, guarded literals went to the upstream."""
    h = start_proxy(["0.0.0.0/0", "::/0"], upstream=UpstreamConfig.http_proxy("127.0.0.1", fake_upstream.port))
    s, head = http_connect(h.port, target)
    assert status_of(head) == 403
    assert b"X-Proxy-Error: resolved_address" in head
    assert fake_upstream.accepted == 0
    assert [v.reason for v in h.violations()] == ["resolved_address"]


def test_a_chained_socks_literal_is_guarded_too(start_proxy, fake_upstream):
    h = start_proxy(["0.0.0.0/0"], cls=BuiltInSocks5Proxy,
                    upstream=UpstreamConfig.http_proxy("127.0.0.1", fake_upstream.port))
    s, rep = socks5_connect(h.port, socket.inet_aton("169.254.169.254"), 80, atyp=1)
    assert rep[:2] == b"\x05\x02"
    assert fake_upstream.accepted == 0


def test_names_still_go_to_the_upstream(start_proxy, fake_upstream):
    h = start_proxy(["*.test"], upstream=UpstreamConfig.http_proxy("127.0.0.1", fake_upstream.port))
    s, head = http_connect(h.port, "pkg.test:443")
    assert status_of(head) == 200
    wait_until(lambda: fake_upstream.requests, what="the upstream to see the CONNECT")
    assert [r.split(b"\r\n", 1)[0] for r in fake_upstream.requests] == [b"CONNECT pkg.test:443 HTTP/1.1"]


# ── the cache never widens the policy ─────────────────────────────────────────


def test_set_filter_takes_effect_for_the_next_request_and_spares_live_tunnels(start_proxy, echo):
    h = start_proxy(["localhost"])
    live = _tunnel_ok(h.port, f"localhost:{echo.port}")      # its plan is now cached
    _tunnel_ok(h.port, f"localhost:{echo.port}").close()
    h.set_filter(Filter(["other.test"]))
    assert h.filter.allow_patterns == ("other.test",)
    s, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 403
    live.sendall(b"still")
    assert recv_exact(live, 5) == b"still"
    h.set_filter(Filter(["localhost"]))
    _tunnel_ok(h.port, f"localhost:{echo.port}").close()


def test_set_filter_drops_cached_refusals(start_proxy, echo):
    h = start_proxy(["other.test"])
    for _ in range(2):
        s, head = http_connect(h.port, f"localhost:{echo.port}")
        assert status_of(head) == 403
    h.set_filter(Filter(["localhost"]))
    _tunnel_ok(h.port, f"localhost:{echo.port}").close()


def test_set_filter_drops_cached_name_plans(start_proxy, echo):
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    h = start_proxy(["app.test", "127.0.0.1"], resolver=r)
    _tunnel_ok(h.port, f"app.test:{echo.port}").close()
    h.set_filter(Filter(["app.test", "127.0.0.1"], deny=["127.0.0.0/8"]))
    s, head = http_connect(h.port, f"app.test:{echo.port}")
    assert status_of(head) == 403
    assert b"X-Proxy-Error: denied" in head
    assert r.calls == {"app.test": 2}


def test_set_filter_racing_traffic_never_mixes_policies(start_proxy, echo):
    """Two filters alternate from another thread while clients connect: every answer is one
    that one of the two filters gives (both allow localhost; neither allows evil.test)."""
    a = Filter(["localhost"], deny=["evil.test"])
    b = Filter(["localhost", "*.test"], deny=["evil.test"])
    h = start_proxy(["localhost"])
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            h.set_filter(a)
            h.set_filter(b)

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(30):
            _tunnel_ok(h.port, f"localhost:{echo.port}").close()
            s, head = http_connect(h.port, f"evil.test:{echo.port}")
            assert status_of(head) == 403 and b"X-Proxy-Error: denied" in head
    finally:
        stop.set()
        t.join(DEADLINE)
    wait_until(lambda: echo.accepted == 30, what="30 tunnels at the echo server")


async def test_changing_upstream_drops_cached_plans(echo, fake_upstream):
    from kodarelay import Server

    srv = await Server.bind(None, Filter(["localhost"]), upstream=UpstreamConfig.direct())
    serve = asyncio.get_running_loop().create_task(srv.serve())
    loop = asyncio.get_running_loop()
    try:
        async def status(target: str) -> int:
            s, head = await loop.run_in_executor(None, http_connect, srv.port, target)
            s.close()
            return status_of(head)

        assert await status(f"localhost:{echo.port}") == 200
        assert await status(f"localhost:{echo.port}") == 200
        srv.with_upstream(UpstreamConfig.http_proxy("127.0.0.1", fake_upstream.port))
        assert await status(f"localhost:{echo.port}") == 200
        wait_until(lambda: fake_upstream.accepted == 1, what="the upstream to be used")
        wait_until(lambda: echo.accepted == 2, what="the two direct tunnels")   # and no third
    finally:
        await srv.aclose()
        serve.cancel()


async def test_changing_the_guard_or_decider_drops_cached_plans():
    from kodarelay.dial import Dialer
    from kodarelay.events import Request

    r = CountingResolver({"app.test": ["10.1.2.3"]})
    d = Dialer(Filter(["app.test"]), UpstreamConfig.direct(), r, 5.0, False)
    req = Request("http", "CONNECT", "app.test", 443)
    plan = await d.plan(req)
    assert (plan.kind, plan.addresses) == ("direct", ("10.1.2.3",))
    assert d.plan_now("app.test", 443) is plan                  # cached
    d.deny_private = True
    assert d.plan_now("app.test", 443) is None                  # dropped: must look again
    plan = await d.plan(req)
    assert (plan.kind, plan.refusal.reason) == ("refuse", "resolved_address")

    asked = []

    async def decider(request):  # type: ignore[no-untyped-def]
        asked.append(request)
        return "allow_always"

    d.deny_private = False
    other = Request("http", "CONNECT", "new.test", 443)
    r.mapping["new.test"] = ["93.184.216.34"]
    assert (await d.plan(other)).refusal.reason == "not_allowed"     # no decider yet: cached refusal
    d.decider = decider
    assert (await d.plan(other)).kind == "direct"
    assert (await d.plan(other)).kind == "direct"
    assert len(asked) == 1                                          # "always" is remembered
    d.filter = Filter(["app.test"])
    assert (await d.plan(other)).kind == "direct"
    assert len(asked) == 2                                          # ... until the filter is replaced


def test_an_address_spelled_oddly_by_the_resolver_is_still_served(start_proxy, echo):
    """issue 10.8: ``0x7f.0.0.1`` from an injected resolver could not be taken by the engine,
    and the fallback closed the client before answering it."""
    h = start_proxy(["app.test", "127.0.0.1"], resolver=pinned({"app.test": ["0x7f.0.0.1"]}))
    s = _tunnel_ok(h.port, f"app.test:{echo.port}")
    s.sendall(b"odd")
    assert recv_exact(s, 3) == b"odd"


async def test_a_request_between_a_lookup_and_its_plan_reuses_the_answer():
    """A lookup has finished but its plan is not stored yet (its waiter has not resumed): a
    request arriving now reuses the answer instead of resolving again."""
    from kodarelay.dial import Dialer
    from kodarelay.events import Request

    r = CountingResolver({"app.test": ["93.184.216.34"]})
    d = Dialer(Filter(["app.test"]), UpstreamConfig.direct(), r, 5.0, False)
    assert await d._lookup("app.test", 443) == ["93.184.216.34"]      # the first request's lookup
    plan = await d.plan(Request("http", "CONNECT", "app.test", 443))  # the second request
    assert (plan.kind, plan.addresses) == ("direct", ("93.184.216.34",))
    assert r.calls == {"app.test": 1}
    d.filter = Filter(["app.test"])                                   # a policy change forgets it
    await d.plan(Request("http", "CONNECT", "app.test", 443))
    assert r.calls == {"app.test": 2}

"""The servers on top of the engine's plan cache: repeated requests are served from cached
plans (names resolved once per ``dns_ttl``), refusals served there are still violations,
chaining runs there too, and every way the policy can change empties it before the next
request. Runs on whichever front-end the run selects (CI runs it with and without
``KODARELAY_NO_NATIVE_FRONTEND``): the answers must be the same; on the native front-end
the engine must also really have served the repeats.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig

from peers import (
    CannedProxy,
    EchoServer, http_connect, recv_exact, recv_until, require_tool, socks5_connect, status_of, tinyproxy,
    wait_until,
)
from test_policy import CountingResolver


def front(h: Any) -> Any:
    """The engine's listener behind a proxy handle, None on the asyncio front-end."""
    return h._servers[0]._front


def engine_stats(h: Any) -> dict[str, int] | None:
    f = front(h)
    return None if f is None else f.plan_stats()


def tunnel(h: Any, proto: str, host: str, port: int) -> tuple[socket.socket, bool, bytes]:
    """(socket, allowed, reply) for one CONNECT through ``h``."""
    if proto == "http":
        s, head = http_connect(h.port, f"{host}:{port}")
        return s, status_of(head) == 200, head
    s, rep = socks5_connect(h.port, host.encode(), port)
    return s, rep[:2] == b"\x05\x00", rep


PROXIES = {"http": BuiltInProxy, "socks5": BuiltInSocks5Proxy}


@pytest.mark.parametrize("proto", ["http", "socks5"])
def test_a_repeated_name_is_resolved_once_and_served_by_the_engine(start_proxy, echo: EchoServer, proto: str) -> None:
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    h = start_proxy(["app.test", "127.0.0.1"], cls=PROXIES[proto], resolver=r, dns_ttl=30.0)
    for i in range(5):
        s, ok, _ = tunnel(h, proto, "app.test", echo.port)
        assert ok
        s.sendall(b"%d" % i)
        assert recv_exact(s, 1) == b"%d" % i
        s.close()
    assert r.calls == {"app.test": 1}
    stats = engine_stats(h)
    if stats is not None:
        assert stats["hits"] == 4               # every repeat was the engine's alone
        wait_until(lambda: h._servers[0].tunnel_count == 0, what="the tunnels to end")


def test_an_expired_plan_resolves_again(start_proxy, echo: EchoServer) -> None:
    r = CountingResolver({"app.test": ["127.0.0.1"]})
    h = start_proxy(["app.test", "127.0.0.1"], resolver=r, dns_ttl=0.3)
    for _ in range(2):
        s, ok, _ = tunnel(h, "http", "app.test", echo.port)
        assert ok
        s.close()
    assert r.calls == {"app.test": 1}
    threading.Event().wait(0.35)                # dns_ttl is a deadline on the clock: wait it out
    s, ok, _ = tunnel(h, "http", "app.test", echo.port)
    assert ok
    s.close()
    assert r.calls == {"app.test": 2}


@pytest.mark.parametrize("proto", ["http", "socks5"])
def test_refusals_served_by_the_engine_are_violations(start_proxy, proto: str) -> None:
    seen: list[Any] = []
    h = start_proxy(["app.test"], cls=PROXIES[proto], on_violation=seen.append)
    n = 6
    for _ in range(n):
        s, ok, reply = tunnel(h, proto, "EVIL.test", 443)
        assert not ok
        if proto == "http":
            assert status_of(reply) == 403 and b"X-Proxy-Error: not_allowed" in reply
            assert b"kodarelay: CONNECT to evil.test:443 refused (not_allowed)" in recv_until(s, b"\n")
        else:
            assert reply[:2] == b"\x05\x02"
        s.close()
    wait_until(lambda: len(h.violations()) == n, what="every refusal to be recorded")
    assert {(v.protocol, v.host, v.port, v.reason, v.client) for v in h.violations()} == \
        {(proto, "evil.test", 443, "not_allowed", None)}
    wait_until(lambda: len(seen) == n, what="on_violation for each")
    stats = engine_stats(h)
    if stats is not None:
        assert stats["refused"] == n - 1


def test_with_on_event_every_request_stays_in_python(start_proxy, echo: EchoServer) -> None:
    """Events are per request (allow, refuse, end): the engine caches nothing then."""
    events: list[Any] = []
    h = start_proxy(["localhost"], on_event=events.append)
    for _ in range(3):
        s, ok, _ = tunnel(h, "http", "localhost", echo.port)
        assert ok
        s.close()
    wait_until(lambda: [e.kind for e in events].count("end") == 3, what="three end events")
    assert [e.kind for e in events].count("allow") == 3
    stats = engine_stats(h)
    if stats is not None:
        assert stats["hits"] == 0 and stats["plans"] == 0





@pytest.mark.parametrize("proto", ["http", "socks5"])
def test_an_upstream_refusal_is_502_or_rep_5_every_time(start_proxy, proto: str) -> None:
    up = CannedProxy(b"HTTP/1.1 403 Forbidden\r\n\r\n")
    try:
        h = start_proxy(["far.test"], cls=PROXIES[proto], upstream=UpstreamConfig.http_proxy("127.0.0.1", up.port))
        for _ in range(3):
            s, ok, reply = tunnel(h, proto, "far.test", 443)
            assert not ok
            if proto == "http":
                assert status_of(reply) == 502
            else:
                assert reply[:2] == b"\x05\x05"
            s.close()
        assert up.accepted == 3
        wait_until(lambda: len(h.violations()) == 3, what="three upstream refusals recorded")
        assert {(v.host, v.port, v.reason, v.detail) for v in h.violations()} == \
            {("far.test", 443, "upstream_refused", "upstream refused (403)")}
        stats = engine_stats(h)
        if stats is not None:
            assert stats["hits"] == 2
    finally:
        up.close()


@pytest.mark.parametrize("proto", ["http", "socks5"])
def test_chaining_through_tinyproxy_from_cached_plans(tmp_path, start_proxy, echo: EchoServer, proto: str) -> None:
    require_tool("tinyproxy")
    with tinyproxy(tmp_path, basic_auth=("agent", "pa.ss-1")) as port:
        cfg = UpstreamConfig.from_url(f"http://agent:pa%2Ess-1@127.0.0.1:{port}")
        h = start_proxy(["localhost"], cls=PROXIES[proto], upstream=cfg)
        for i in range(4):
            s, ok, _ = tunnel(h, proto, "localhost", echo.port)
            assert ok
            s.sendall(b"via tinyproxy %d" % i)
            assert recv_exact(s, 15) == b"via tinyproxy %d" % i
            s.close()
        stats = engine_stats(h)
        if stats is not None:
            assert stats["hits"] == 3
        assert h.violations() == []


@pytest.mark.parametrize("way", ["filter", "upstream", "guard", "decider"])
def test_every_policy_change_empties_the_engine_cache(start_proxy, echo: EchoServer, way: str) -> None:
    """A plan the engine holds is never used after the policy it came from is replaced."""
    up = CannedProxy(b"HTTP/1.1 200 OK\r\n\r\n")
    try:
        h = start_proxy(["localhost"])
        server = h._servers[0]
        for _ in range(2):
            s, ok, _ = tunnel(h, "http", "localhost", echo.port)
            assert ok
            s.close()
        before = engine_stats(h)
        if before is not None:
            assert before["plans"] == 1 and before["hits"] == 1
        if way == "filter":
            h.set_filter(Filter(["other.test"]))
        elif way == "upstream":
            server.with_upstream(UpstreamConfig.http_proxy("127.0.0.1", up.port))
        elif way == "guard":
            server.dialer.deny_private = True
        else:
            async def decider(request: Any) -> str:
                return "deny"

            server.dialer.decider = decider
        after = engine_stats(h)
        if after is not None:
            assert after["plans"] == 0
        s, ok, reply = tunnel(h, "http", "localhost", echo.port)
        s.close()
        if way == "filter":
            assert not ok and b"X-Proxy-Error: not_allowed" in reply
        else:
            assert ok
        expected = 2 if way in ("filter", "upstream") else 3
        wait_until(lambda: echo.accepted >= expected, what="the target's accepts")
        assert echo.accepted == expected
        assert up.accepted == (1 if way == "upstream" else 0)
        if after is not None:
            assert engine_stats(h)["hits"] == 1    # type: ignore[index]   (the request after went to Python)
    finally:
        up.close()

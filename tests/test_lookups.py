"""Lookups never queue behind lookups that hang (issue 17 item 8): more than 64 names whose
DNS never answered filled the resolver pool, and a name in /etc/hosts then waited 10 s and
got a 502. The pool gives each lookup a thread, each zone a share, and fresh zones the next
free thread (``kodarelay.lookups``)."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
import time
from typing import Any, Callable

from kodarelay.dial import resolver_pool
from kodarelay.lookups import PER_ZONE, LookupPool, lookup_zone, zone_of

from peers import connect, http_connect, status_of, wait_until


def test_a_quick_task_never_waits_behind_hung_ones():
    pool = LookupPool(idle_exit=0.2)
    release = threading.Event()
    hung = [pool.submit(release.wait, 30) for _ in range(200)]
    t0 = time.monotonic()
    assert pool.submit(lambda: "quick").result(timeout=10) == "quick"
    assert time.monotonic() - t0 < 2.0
    release.set()
    for f in hung:
        assert f.result(timeout=10) is True
    wait_until(lambda: pool.threads == 0, what="idle lookup threads to exit")


def test_idle_threads_are_reused_not_multiplied():
    pool = LookupPool(idle_exit=5.0)
    for _ in range(50):
        assert pool.submit(lambda: 1).result(timeout=10) == 1
    assert pool.threads <= 2
    pool.shutdown()
    wait_until(lambda: pool.threads == 0, what="the threads to end at shutdown")


def test_beyond_the_cap_lookups_queue_and_still_complete():
    pool = LookupPool(max_threads=4, idle_exit=0.2)
    release = threading.Event()
    futures = [pool.submit(release.wait, 30) for _ in range(4)]
    late = pool.submit(lambda: "late")
    assert not late.done()
    release.set()
    assert late.result(timeout=10) == "late"
    assert all(f.result(timeout=10) for f in futures)


def _in_zone(pool: LookupPool, zone: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``pool.submit`` as a lookup of ``zone`` makes it (the Dialer sets the zone around its resolver)."""
    ctx = contextvars.copy_context()
    ctx.run(lookup_zone.set, zone)
    return ctx.run(pool.submit, fn, *args)


def test_zones_are_what_one_party_registers():
    assert zone_of("a.b.hang.test") == "hang.test"
    assert zone_of("Files.PythonHosted.org.") == "pythonhosted.org"
    assert zone_of("www.example.co.uk") == "example.co.uk"
    assert zone_of("localhost") == "localhost"


def test_a_zone_flood_holds_its_share_and_no_more():
    pool = LookupPool(idle_exit=0.2, per_zone=4)
    release = threading.Event()
    hung = [_in_zone(pool, "hang.test", release.wait, 30) for _ in range(100)]
    wait_until(lambda: pool.running_in("hang.test") == 4, what="the zone's share to be running")
    t0 = time.monotonic()
    assert _in_zone(pool, "good.test", lambda: "quick").result(timeout=10) == "quick"
    assert time.monotonic() - t0 < 2.0
    assert pool.running_in("hang.test") == 4 and pool.threads <= 6
    release.set()
    assert all(f.result(timeout=10) for f in hung)
    wait_until(lambda: pool.threads == 0, what="idle lookup threads to exit")


def test_when_every_thread_is_taken_the_next_goes_to_a_quiet_zone():
    """At the thread cap the first thread to come free serves the zone with the fewest
    lookups running (a fresh name), not the flood's backlog."""
    pool = LookupPool(max_threads=4, idle_exit=0.2, per_zone=4)
    gates = [threading.Event() for _ in range(4)]
    started: list[str] = []
    lock = threading.Lock()

    def hang(i: int) -> int:
        with lock:
            started.append(f"flood{i}")
        gates[min(i, 3)].wait(30)
        return i

    flood = [_in_zone(pool, "hang.test", hang, i) for i in range(12)]
    wait_until(lambda: len(started) == 4, what="the cap to be reached")
    quiet = _in_zone(pool, "good.test", lambda: started.append("good") or "quick")
    assert not quiet.done()
    gates[0].set()                                 # one thread comes free
    assert quiet.result(timeout=10) == "quick"
    assert started[4] == "good"
    for g in gates:
        g.set()
    assert [f.result(timeout=10) for f in flood] == list(range(12))


def test_a_queued_lookup_whose_caller_gave_up_never_runs():
    pool = LookupPool(idle_exit=0.2, per_zone=1)
    release = threading.Event()
    ran: list[int] = []
    first = _in_zone(pool, "hang.test", release.wait, 30)
    queued = _in_zone(pool, "hang.test", ran.append, 1)
    assert queued.cancel()
    after = _in_zone(pool, "hang.test", ran.append, 2)
    release.set()
    assert first.result(timeout=10) is True
    after.result(timeout=10)
    assert ran == [2]


class FloodResolver:
    """Resolves ``good.test`` at once and never answers ``hung*`` names (until released),
    each lookup a blocking call on kodarelay's own lookup threads, as getaddrinfo is."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def _blocking(self, host: str) -> list[str]:
        if host.startswith("hung"):
            self.release.wait(60)
            raise socket.gaierror("timed out")
        return ["127.0.0.1"]

    async def __call__(self, host: str, port: int) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(resolver_pool(), self._blocking, host)


def test_a_flood_of_never_answering_names_delays_no_name_that_resolves(start_proxy, echo):
    resolve = FloodResolver()
    h = start_proxy(["*.test", "good.test", "127.0.0.1"], resolver=resolve, connect_timeout=30.0)
    flood = []
    try:
        for i in range(150):
            s = connect(h.port)
            s.sendall(f"CONNECT hung{i}.test:443 HTTP/1.1\r\n\r\n".encode())
            flood.append(s)
        wait_until(lambda: resolver_pool().threads >= 100, what="the flood to occupy lookup threads")
        t0 = time.monotonic()
        s, head = http_connect(h.port, f"good.test:{echo.port}")
        assert status_of(head) == 200, head
        assert time.monotonic() - t0 < 2.0
        s.close()
    finally:
        resolve.release.set()
        for s in flood:
            s.close()


def test_a_flood_of_hung_names_in_one_zone_holds_its_share_through_the_proxy(start_proxy, echo):
    """The flood as an attacker with one zone of never-answering name servers makes it
    (``resolver=`` hook on kodarelay's lookup threads): it holds the zone's share of threads,
    the rest of its lookups wait in that zone's queue, and a name of another zone resolves at
    once."""
    resolve = FloodResolver()
    h = start_proxy(["*.test", "*.flood.test", "127.0.0.1"], resolver=resolve, connect_timeout=30.0)
    flood = []
    try:
        for i in range(200):
            s = connect(h.port)
            s.sendall(f"CONNECT hung{i}.flood.test:443 HTTP/1.1\r\n\r\n".encode())
            flood.append(s)
        wait_until(lambda: resolver_pool().running_in("flood.test") == PER_ZONE,
                   what="the flood to take its zone's share")
        t0 = time.monotonic()
        s, head = http_connect(h.port, f"good.test:{echo.port}")
        assert status_of(head) == 200, head
        assert time.monotonic() - t0 < 2.0
        s.close()
        assert resolver_pool().running_in("flood.test") == PER_ZONE
    finally:
        resolve.release.set()
        for s in flood:
            s.close()

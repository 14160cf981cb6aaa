"""Lookups never queue behind lookups that hang (issue 17 item 8): more than 64 names whose
DNS never answered filled the resolver pool, and a name in /etc/hosts then waited 10 s and
got a 502."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from kodarelay.dial import resolver_pool
from kodarelay.lookups import LookupPool

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

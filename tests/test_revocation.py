"""Revocation in flight: a policy change made while a request waits (its lookup, its decider)
applies to that request. ``set_filter(deny X)`` returned while X's answer was pending, and X
was then admitted."""

from __future__ import annotations

import asyncio
import threading

from kodarelay import Filter

from peers import connect, recv_until, status_of, wait_until
from test_hooks import Decider


class GatedResolver:
    """Resolves every name to 127.0.0.1, but only once ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        return ["127.0.0.1"]


def _pending_connect(port: int, target: str):  # type: ignore[no-untyped-def]
    s = connect(port)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    return s


def test_deny_set_during_the_lookup_refuses_the_waiting_request(start_proxy, echo):
    resolve = GatedResolver()
    h = start_proxy(["app.test", "127.0.0.1"], resolver=resolve)
    s = _pending_connect(h.port, f"app.test:{echo.port}")
    wait_until(lambda: resolve.asked, what="the lookup to start")
    h.set_filter(Filter(["app.test", "127.0.0.1"], ["app.test"]))      # returns while the lookup waits
    resolve.gate.set()
    head = recv_until(s, b"\r\n\r\n")
    assert status_of(head) == 403 and b"X-Proxy-Error: denied" in head, head
    assert [v.reason for v in h.violations()] == ["denied"]
    assert echo.accepted == 0


def test_deny_set_while_the_decider_thinks_refuses_its_allow(start_proxy, echo):
    gate = threading.Event()
    d = Decider({"app.test": "allow"}, gate=gate)
    resolve = GatedResolver()
    resolve.gate.set()
    h = start_proxy(["127.0.0.1"], resolver=resolve, decider=d)
    s = _pending_connect(h.port, f"app.test:{echo.port}")
    wait_until(lambda: d.asked, what="the decider to be asked")
    h.set_filter(Filter(["127.0.0.1"], ["app.test"]))
    gate.set()
    head = recv_until(s, b"\r\n\r\n")
    assert status_of(head) == 403 and b"X-Proxy-Error: denied" in head, head


def test_allow_set_during_the_lookup_still_admits(start_proxy, echo):
    """The other way round: a request that waited keeps working when the new policy admits it."""
    resolve = GatedResolver()
    h = start_proxy(["app.test", "127.0.0.1"], resolver=resolve)
    s = _pending_connect(h.port, f"app.test:{echo.port}")
    wait_until(lambda: resolve.asked, what="the lookup to start")
    h.set_filter(Filter(["app.test", "127.0.0.1", "other.test"]))
    resolve.gate.set()
    head = recv_until(s, b"\r\n\r\n")
    assert status_of(head) == 200, head

"""pick_ephemeral_port and wait_for_bind against real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kodarelay.ports import backoff_delays, pick_ephemeral_port, sleep_backoff_until, wait_for_bind


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_pick_ephemeral_port_is_bindable() -> None:
    port = pick_ephemeral_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_backoff_doubles_to_cap() -> None:
    it = backoff_delays()
    got = [round(next(it), 3) for _ in range(7)]
    assert got == [0.02, 0.04, 0.08, 0.16, 0.2, 0.2, 0.2]


async def test_wait_for_bind_success_immediately() -> None:
    with _listener() as s:
        start = time.monotonic()
        await wait_for_bind(s.getsockname()[1], 2.0)
        assert time.monotonic() - start < 1.0


async def test_wait_for_bind_sees_a_late_listener() -> None:
    port = pick_ephemeral_port()
    late = socket.socket()

    def bind_now() -> None:
        late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        late.bind(("127.0.0.1", port))
        late.listen(8)

    asyncio.get_running_loop().call_later(0.1, bind_now)
    try:
        await wait_for_bind(port, 5.0)
    finally:
        late.close()


async def test_wait_for_bind_timeout_names_port() -> None:
    port = pick_ephemeral_port()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=str(port)):
        await wait_for_bind(port, 0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 1.5


async def test_wait_for_bind_check_aborts_early() -> None:
    port = pick_ephemeral_port()
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError("gave up")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="gave up"):
        await wait_for_bind(port, 10.0, check=check)
    assert time.monotonic() - start < 1.0


async def test_wait_for_bind_rejects_bad_port() -> None:
    with pytest.raises(ValueError, match="70000"):
        await wait_for_bind(70000, 1.0)


def test_sleep_backoff_until() -> None:
    deadline = time.monotonic() + 0.05
    assert sleep_backoff_until(lambda: time.monotonic() >= deadline, 2.0)
    assert not sleep_backoff_until(lambda: False, 0.05)

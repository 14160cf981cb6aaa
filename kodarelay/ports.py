"""Loopback port helpers: pick a free port, and wait until something accepts on one.

Every spawn path needs the same two steps: choose a port to hand a proxy, then confirm the
proxy really bound it before its address goes into a sandboxed program's environment.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)

#: First pause between readiness probes, in seconds.
BACKOFF_INITIAL = 0.02
#: Longest pause between readiness probes, so the loopback stack is not hammered.
BACKOFF_CAP = 0.2


def pick_ephemeral_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind port 0, read it, close).

    There is a window in which another process can take the port before the proxy binds
    it; the caller's readiness check (``wait_for_bind``) is what catches that. Code that
    binds the port itself should bind port 0 directly instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backoff_delays(initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP) -> Iterator[float]:
    """Endless pauses ``initial, 2*initial, ...`` capped at ``cap`` (20 ms doubling to 200 ms)."""
    delay = initial
    while True:
        yield delay
        delay = min(delay * 2, cap)


async def _try_connect(port: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), max(timeout, 0.001))
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        sock.close()


async def wait_for_bind(
    port: int,
    timeout: float,
    *,
    check: Callable[[], None] | None = None,
) -> None:
    """Return once a TCP connect to ``127.0.0.1:port`` succeeds; ``TimeoutError`` after ``timeout`` s.

    Probes back off from 20 ms doubling to a 200 ms cap, and the last probe happens at the
    deadline, so a proxy that binds just in time is still seen. ``check`` (optional) runs
    before every probe and after the successful one; it raises to abort the wait early,
    e.g. when the process expected to bind has already exited.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, not {port!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for delay in backoff_delays():
        if check is not None:
            check()
        if await _try_connect(port, deadline - loop.time()):
            if check is not None:
                check()  # a process that died right after binding is no proxy
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"nothing accepted a connection on 127.0.0.1:{port} within {timeout}s")
        await asyncio.sleep(min(delay, remaining))
    raise AssertionError("unreachable")  # pragma: no cover


def sleep_backoff_until(
    done: Callable[[], bool], timeout: float, initial: float = 0.001, cap: float = 0.02
) -> bool:
    """Blocking poll of ``done()`` with backoff until it is true or ``timeout`` s pass; its last value.

    For code that must not depend on an event loop (stopping a child from any thread).
    """
    deadline = time.monotonic() + timeout
    for delay in backoff_delays(initial, cap):
        if done():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return done()
        time.sleep(min(delay, remaining))
    raise AssertionError("unreachable")  # pragma: no cover

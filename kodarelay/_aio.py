"""Waits on non-blocking sockets with a deadline, without a task per wait; and the one accept
loop every listener of kodarelay's runs (``accept_forever``).

``asyncio.wait_for(loop.sock_recv(...))`` wraps every read in a new task on Python 3.10 and
3.11; the handshake path does several such waits per tunnel, so these helpers use one future
and one timer instead. They also try the syscall first: a request head or a loopback
connect is usually ready before anything needs to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable


async def wait_ready(sock: socket.socket, write: bool, timeout: float) -> None:
    """Wait until ``sock`` is readable (or writable); ``TimeoutError`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    def expire() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError(f"socket not ready within {timeout}s"))

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    timer = loop.call_later(timeout, expire)
    try:
        await fut
    finally:
        timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def recv_within(sock: socket.socket, n: int, timeout: float) -> bytes:
    """``sock.recv(n)`` on a non-blocking socket, waiting at most ``timeout`` s for data."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        await wait_ready(sock, False, max(0.0, deadline - loop.time()))


async def connect_within(sock: socket.socket, address: tuple[str, int], timeout: float) -> None:
    """Connect the non-blocking ``sock`` to an IP ``address``; ``TimeoutError`` after ``timeout`` s."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY, errno.EINTR):
        await wait_ready(sock, True, timeout)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"{os.strerror(err)}: {address[0]}:{address[1]}")


#: Errors of the one connection being accepted: accept again at once.
PER_CONNECTION_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
#: Errors a loaded machine gives (out of fds, buffers, memory): a warning, never an error.
EXPECTED_ACCEPT_ERRNOS = PER_CONNECTION_ERRNOS | {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Throttle:
    """Lets a repeated log message through at most once per ``interval`` seconds, counting
    the ones it held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            return True
        self.suppressed += 1
        return False


def log_accept_error(log: logging.Logger, throttle: Throttle, what: str, e: OSError) -> None:
    """One line a second at most: a warning for what load causes, an error for anything else."""
    if throttle.ready():
        level = logging.WARNING if e.errno in EXPECTED_ACCEPT_ERRNOS else logging.ERROR
        log.log(level, "%s: accept failed (%s); backing off and still accepting (%d similar suppressed)",
                what, e, throttle.suppressed)
        throttle.suppressed = 0


def has_pending(lsock: socket.socket) -> bool:
    """A connection waits in ``lsock``'s accept queue (``poll`` needs no fd of its own)."""
    p = select.poll()
    p.register(lsock.fileno(), select.POLLIN)
    return bool(p.poll(0))


async def accept_forever(lsock: socket.socket, on_conn: Callable[[socket.socket], None], *, what: str,
                         log: logging.Logger, backoff: float, closed: Callable[[], bool],
                         shed: Callable[[], bool] | None = None) -> None:
    """Accept on ``lsock`` and hand each connection to ``on_conn`` until ``closed()`` or the
    listener is gone (EBADF / EINVAL). An accept error never ends it: a connection's own
    error is retried at once; out of fds, ``shed()`` (the oldest handshake, say) makes room
    and accept is retried at once; anything else waits ``backoff`` s. Logged at most once a
    second (``log_accept_error``)."""
    loop = asyncio.get_running_loop()
    throttle = Throttle()
    while not closed():
        try:
            conn, _ = await loop.sock_accept(lsock)
        except OSError as e:
            if closed() or e.errno in (errno.EBADF, errno.EINVAL):
                return
            if e.errno in (errno.EMFILE, errno.ENFILE) and not has_pending(lsock):
                # accept4 takes an fd before it looks at the queue: out of fds, an empty queue
                # fails too. Nobody waits, so shed nobody; wait for someone (or a while)
                with contextlib.suppress(TimeoutError):
                    await wait_ready(lsock, False, 1.0)
                continue
            if e.errno in (errno.EMFILE, errno.ENFILE) and shed is not None and shed():
                await asyncio.sleep(0)          # let the shed connection close, then retry
                continue
            log_accept_error(log, throttle, what, e)
            if e.errno not in PER_CONNECTION_ERRNOS:
                await asyncio.sleep(backoff)
            continue
        if closed():
            conn.close()
            return
        on_conn(conn)

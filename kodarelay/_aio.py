"""Waits on non-blocking sockets with a deadline, without a task per wait.

``asyncio.wait_for(loop.sock_recv(...))`` wraps every read in a new task on Python 3.10 and
3.11; the handshake path does several such waits per tunnel, so these helpers use one future
and one timer instead. They also try the syscall first: a request head or a loopback
connect is usually ready before anything needs to wait.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket


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

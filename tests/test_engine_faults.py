"""Issue 14: the compiled engine under faults (bad settings, thread limits, fd pressure, fork,
errors on its completer thread). Engine-only: skipped with KODARELAY_NO_EXTENSIONS."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kodarelay.relay import env_flag

DEADLINE = 20.0

pytestmark = pytest.mark.skipif(env_flag("KODARELAY_NO_EXTENSIONS"), reason="compiled engine only")


@pytest.fixture
def engine():  # type: ignore[no-untyped-def]
    from kodarelay import _relay

    yield _relay
    _relay._test_fail_thread_start(-1)


def engine_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kodarelay-engine"))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(pred, what: str, timeout: float = DEADLINE) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling a condition, bounded by the deadline


# ── KODARELAY_PIPE_SIZE ──────────────────────────────────────────────────────


@pytest.mark.parametrize("raw", ["\u00b2", "99999999999999999999", "2147483648", "-5", "64k", "1_024"])
def test_bad_pipe_size_never_breaks_the_import(raw):
    """fix: a value over INT_MAX raised OverflowError at import, "²" passed isdigit()."""
    code = "import kodarelay._relay as r; print(r.engine_stats()['pipe_size'])"
    env = dict(os.environ, KODARELAY_PIPE_SIZE=raw)
    p = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True,
                       timeout=DEADLINE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(256 * 1024)
    assert "KODARELAY_PIPE_SIZE" in p.stderr and "RuntimeWarning" in p.stderr


def test_good_pipe_size_is_used():
    code = "import kodarelay._relay as r; print(r.engine_stats()['pipe_size'])"
    env = dict(os.environ, KODARELAY_PIPE_SIZE=" 65536 ")
    p = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                       timeout=DEADLINE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "65536"


# ── thread start failing ─────────────────────────────────────────────────────


async def _one_tunnel(impl) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    c, a = socket.socketpair()
    s, b = socket.socketpair()
    try:
        c.sendall(b"ping")
        c.shutdown(socket.SHUT_WR)
        s.shutdown(socket.SHUT_WR)
        return await asyncio.wait_for(impl.relay_with_timeouts(a, b), DEADLINE)
    finally:
        c.close()
        s.close()


@pytest.mark.parametrize("fail_at", [0, 1, 3])
async def test_thread_start_failure_stops_what_it_started(engine, fail_at):
    """fix: a start failing partway left the completer and the workers started so far running
    for good, and every later relay leaked more. Now: one clear error, no thread or fd left,
    and the next call starts the engine cleanly."""
    engine.shutdown_engine()
    engine.set_engine_threads(4)
    try:
        before_fds = fds()
        assert engine_threads() == []
        engine._test_fail_thread_start(fail_at)
        for _ in range(3):                    # every retry fails the same clean way
            with pytest.raises(RuntimeError, match="could not start its threads") as info:
                await _one_tunnel(engine)
            assert "can't start new thread" in str(info.value.__cause__)
            assert engine_threads() == []
            assert not engine.engine_stats()["running"]
            assert fds() == before_fds       # the sockets it was given are closed too
        engine._test_fail_thread_start(-1)
        assert await _one_tunnel(engine) == (4, 0)
        assert len(engine_threads()) == 5
    finally:
        engine._test_fail_thread_start(-1)
        engine.shutdown_engine()
        engine.set_engine_threads(1)
    assert engine_threads() == []


# ── errors on the completer thread ───────────────────────────────────────────


async def test_completer_reports_hook_errors(engine, caplog):
    """fix: an exception in a hook the completer thread runs was swallowed (``except
    BaseException: pass``); now it is logged, and the batch still reaches ``cb``."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[list[object]] = loop.create_future()

    def direct(items):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("hook bug")

    def cb(items, err):  # type: ignore[no-untyped-def]
        if not got.done():
            got.set_result(items)

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    caplog.set_level(logging.ERROR, logger="kodarelay._relay")
    front = engine.native_listen(lsock, "http", 5.0, loop, cb, direct)
    c = socket.create_connection(lsock.getsockname())
    try:
        c.sendall(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
        [h] = await asyncio.wait_for(got, DEADLINE)
        h.reply_and_close(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        assert [r for r in caplog.records if "direct hook" in r.getMessage()
                and r.exc_info and r.exc_info[0] is ZeroDivisionError]
    finally:
        c.close()
        front.close()
        lsock.close()


def test_completer_is_silent_for_a_closed_loop(engine, caplog):
    """The one case that stays silent: the waiting loop is closed (nobody is waiting)."""
    caplog.set_level(logging.ERROR, logger="kodarelay._relay")
    engine.shutdown_engine()
    c, a = socket.socketpair()
    s, b = socket.socketpair()
    other = asyncio.new_event_loop()
    task = other.create_task(engine.relay_with_timeouts(a, b, 30.0, 30.0))
    other.run_until_complete(asyncio.sleep(0))     # the task's first step submits the tunnel
    wait_for(lambda: engine.engine_stats()["tunnels"] == 1, "the tunnel to start")
    other.close()                                   # ... and its loop goes away
    c.close()
    s.close()                                       # the tunnel ends; its delivery finds the loop closed
    wait_for(lambda: engine.engine_stats()["tunnels"] == 0, "the tunnel to end")
    engine.shutdown_engine()                        # joins the completer: the delivery is done
    assert not [r for r in caplog.records if r.name == "kodarelay._relay"]
    del task

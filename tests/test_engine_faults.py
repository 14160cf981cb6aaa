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

from test_relay import tcp_pair

DEADLINE = 20.0

compiled = pytest.mark.skipif(env_flag("KODARELAY_NO_EXTENSIONS"), reason="compiled engine only")


@pytest.fixture
def engine():  # type: ignore[no-untyped-def]
    if env_flag("KODARELAY_NO_EXTENSIONS"):
        pytest.skip("compiled engine only (KODARELAY_NO_EXTENSIONS is set)")
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


@compiled
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


@compiled
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
            assert fds() <= before_fds       # the sockets it was given are closed too, no engine fd left
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


# ── RLIMIT_NOFILE ────────────────────────────────────────────────────────────


def test_command_raises_the_open_files_limit_and_the_library_does_not():
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "import kodarelay, kodarelay.relay, kodarelay.server\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "from kodarelay.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[0] == "256"                      # importing the library changes nothing
    soft, hard = lines[-2].split()
    assert soft == hard


def test_raise_open_files_limit_is_offered():
    from kodarelay import raise_open_files_limit

    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from kodarelay import raise_open_files_limit\n"
        "print(*raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE)
    assert p.returncode == 0, p.stderr
    a, b, c, d = p.stdout.split()
    assert a == b == c == d
    assert callable(raise_open_files_limit)


# ── fd pressure ──────────────────────────────────────────────────────────────

PROXY_CHILD = r"""
import json, sys
from kodarelay import BuiltInProxy, Filter, UpstreamConfig
from kodarelay import _relay
handle = BuiltInProxy(Filter(["127.0.0.1"]), upstream=UpstreamConfig.direct()).start()
print(handle.port, flush=True)
for line in sys.stdin:
    if line.strip() == "stats":
        print(json.dumps(_relay.engine_stats()), flush=True)
    else:
        break
handle.shutdown()
"""


def pump_all(socks: list[socket.socket], payload: bytes, sent: list[int] | None = None,
             timeout: float = DEADLINE * 2) -> list[str]:
    """Send ``payload`` through every tunnel at once (to an echo server; ``sent``: bytes of it
    already sent) and read it back; returns what went wrong per tunnel ("" when the echo
    came back whole)."""
    import selectors

    sel = selectors.DefaultSelector()
    n = len(payload)
    view = memoryview(payload)
    sent = list(sent) if sent is not None else [0] * len(socks)
    got = [0] * len(socks)
    errors = [""] * len(socks)
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if sent[i] < n else 0), i)
    left = len(socks)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for key, ev in sel.select(0.5):
            i = key.data
            s = socks[i]
            try:
                if ev & selectors.EVENT_WRITE and sent[i] < n:
                    sent[i] += s.send(view[sent[i]:sent[i] + 65536])
                    if sent[i] == n:
                        sel.modify(s, selectors.EVENT_READ, i)
                if ev & selectors.EVENT_READ:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("EOF")
                    if data != view[got[i]:got[i] + len(data)]:
                        raise AssertionError("corrupted")
                    got[i] += len(data)
            except BlockingIOError:
                continue
            except (OSError, AssertionError) as e:
                errors[i] = repr(e)
                sel.unregister(s)
                left -= 1
                continue
            if got[i] == n:
                sel.unregister(s)
                left -= 1
    for i in range(len(socks)):
        if not errors[i] and got[i] != n:
            errors[i] = f"timed out at {got[i]}/{n}"
        socks[i].setblocking(True)
    sel.close()
    return errors


def fill(s: socket.socket) -> int:
    """Send zeros through ``s`` until nothing more goes for 0.5 s (the path is full); how many."""
    import select

    s.setblocking(False)
    chunk = bytes(65536)
    total = 0
    while True:
        try:
            total += s.send(chunk)
        except BlockingIOError:
            if not select.select([], [s], [], 0.5)[1]:
                return total


def open_tunnel(port: int, target: str) -> socket.socket:
    """A CONNECT tunnel through the proxy whose client reads slowly (a small receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(DEADLINE)
    s.connect(("127.0.0.1", port))
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


TUNNELS = 200      # the issue asks for 500: 200 keep this 2-core test within seconds


@compiled
def test_fd_pressure_never_kills_a_live_tunnel():
    """fix: when pipe creation failed with EMFILE for an established tunnel the engine ended
    it. Now: RLIMIT_NOFILE lowered (to no new fd at all) in a running proxy while TUNNELS
    tunnels move bytes at once: every one of them keeps going (copying with recv/send), a new
    client waits (or gets a clean refusal), and everything recovers when fds come back."""
    import json
    import resource

    from peers import EchoServer, http_connect, status_of

    echo = EchoServer()
    echo.sock.listen(1024)
    child = subprocess.Popen([sys.executable, "-c", PROXY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    tunnels: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        target = f"127.0.0.1:{echo.port}"
        for _ in range(TUNNELS):
            tunnels.append(open_tunnel(port, target))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # no new fd at all from here on (fds 0-2 are taken): no pipe, no accept, no dial
        resource.prlimit(child.pid, resource.RLIMIT_NOFILE, (3, hard))
        try:
            # a client that does not read: its whole path fills up and the engine holds its
            # pipe with bytes in flight, so every other direction needs a pipe of its own
            hog = tunnels[0]
            hogged = fill(hog)
            payload = os.urandom(256 * 1024)
            sent = []
            for s in tunnels:
                s.setblocking(False)
                try:
                    sent.append(s.send(payload[:128 * 1024]))
                except BlockingIOError:
                    sent.append(0)

            def stats() -> dict[str, int]:
                child.stdin.write("stats\n")
                child.stdin.flush()
                return json.loads(child.stdout.readline())   # type: ignore[no-any-return]

            wait_for(lambda: stats()["pipe_fallbacks"] > 0, "the engine to run out of fds for pipes")
            errors = pump_all(tunnels[1:], payload, sent[1:])
            assert [e for e in errors if e] == [], errors[:5]
            hog.settimeout(DEADLINE)
            left = hogged
            while left:
                data = hog.recv(min(left, 1 << 20))
                assert data and data.count(0) == len(data)
                left -= len(data)
            errors = pump_all(tunnels[:1], payload, sent[:1])   # (what it sent of payload comes after)
            late = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)   # the kernel's backlog takes it
            late.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        finally:
            resource.prlimit(child.pid, resource.RLIMIT_NOFILE, (soft, hard))
        # fds are back: the client that waited is served, new ones too, old ones still move
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = late.recv(1)
            assert chunk, head
            head += chunk
        assert status_of(head) in (200, 502, 503), head
        late.close()
        s, head = http_connect(port, target)
        assert status_of(head) == 200
        tunnels.append(s)
        assert [e for e in pump_all(tunnels, payload[:65536]) if e] == []
    finally:
        for s in tunnels:
            s.close()
        if child.poll() is None:
            child.stdin.write("quit\n")
            child.stdin.flush()
        try:
            child.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        echo.close()
    err = child.stderr.read()
    assert child.returncode == 0, err
    assert "Traceback" not in err, err


async def test_pipe_pool_is_trimmed_while_tunnels_live(engine):
    """fix: the pool kept a pipe (2 fds, 256 KiB of pipe pages) per live tunnel, idle ones
    included, and shrank only when a tunnel finished. Now it is bounded by the pipes in use
    and trimmed on a timer: once the burst is over the idle tunnels leave POOL_SPARE (8)."""
    engine.shutdown_engine()
    n = 40
    pairs = []
    tasks = []
    for _ in range(n):
        c, a = socket.socketpair()
        s, b = socket.socketpair()
        pairs.append((c, s))
        tasks.append(asyncio.ensure_future(engine.relay_with_timeouts(a, b, 60.0, 60.0)))
    try:
        chunk = os.urandom(512 * 1024)       # more than the server's socket holds: the rest waits in a pipe
        senders = [threading.Thread(target=c.sendall, args=(chunk,), daemon=True) for c, _ in pairs]
        for th in senders:
            th.start()
        await asyncio.to_thread(wait_for, lambda: engine.engine_stats().get("pipes_in_use") == n, "a pipe per tunnel")

        def drain() -> None:
            for _, s in pairs:
                s.settimeout(DEADLINE)
                got = 0
                while got < len(chunk):
                    got += len(s.recv(1 << 20))

        await asyncio.to_thread(drain)
        for th in senders:
            th.join(DEADLINE)
        stats = engine.engine_stats()
        assert stats["pipes_in_use"] == 0 and stats["tunnels"] == n
        await asyncio.to_thread(wait_for, lambda: engine.engine_stats()["pooled_pipes"] <= 8, "the pool trim",
                                5.0)
        # and the tunnels still work
        c, s = pairs[0]
        c.sendall(b"still")
        assert s.recv(5) == b"still"
    finally:
        for c, s in pairs:
            c.close()
            s.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE)
        engine.shutdown_engine()


# ── fork without exec ────────────────────────────────────────────────────────


async def test_forked_child_does_not_hold_the_parents_tunnels(engine):
    """fix: a child forked without exec kept every tunnel socket (and the listener, pooled
    pipes, the epoll fd): while it lived, the parent's close sent no FIN. Now the child
    closes what the engine owned, and the parent's clients see EOF when the parent ends
    their tunnels, with the child still alive."""
    engine.shutdown_engine()
    peers_ = []
    tasks = []
    for _ in range(8):
        c, a = socket.socketpair()
        s, b = socket.socketpair()
        peers_ += [c, s]
        tasks.append(asyncio.ensure_future(engine.relay_with_timeouts(a, b, 60.0, 60.0)))
    c0, s0 = peers_[0], peers_[1]
    c0.sendall(b"live")                           # the tunnels are up and moving bytes
    s0.settimeout(DEADLINE)
    assert await asyncio.to_thread(s0.recv, 4) == b"live"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: report, then wait for the parent's word
        try:
            os.close(ready_r)
            os.close(go_w)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert await asyncio.to_thread(os.read, ready_r, 1) == b"1"
        c0.sendall(b"more")                       # the parent's engine still runs after the fork
        assert await asyncio.to_thread(s0.recv, 4) == b"more"
        for t in tasks:
            t.cancel()                            # the parent ends its tunnels: the engine closes a and b
        await asyncio.gather(*tasks, return_exceptions=True)

        def eof_everywhere() -> None:
            for p in peers_:
                p.settimeout(5.0)
                assert p.recv(16) == b""          # a timeout here: someone still holds the far end

        await asyncio.to_thread(eof_everywhere)
    finally:
        os.write(go_w, b"1")
        os.close(go_w)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
        for p in peers_:
            p.close()
    assert os.waitstatus_to_exitcode(status) == 0


async def test_engine_works_in_parent_and_child_after_many_forks(engine):
    """Parking the workers for each fork costs the parent nothing it can see: its tunnels keep
    moving through 20 forks, and each child can start an engine of its own."""
    c, a = socket.socketpair()
    s, b = socket.socketpair()
    task = asyncio.ensure_future(engine.relay_with_timeouts(a, b, 60.0, 60.0))
    s.settimeout(DEADLINE)
    try:
        for i in range(20):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    async def child() -> tuple[int, int]:
                        x, y = socket.socketpair()
                        u, v = socket.socketpair()
                        x.sendall(b"abc")
                        x.shutdown(socket.SHUT_WR)
                        u.shutdown(socket.SHUT_WR)
                        return await asyncio.wait_for(engine.relay_with_timeouts(y, v), 10)

                    code = 0 if asyncio.run(child()) == (3, 0) else 2
                finally:
                    os._exit(code)
            c.sendall(b"%02d" % i)
            assert await asyncio.to_thread(s.recv, 2) == b"%02d" % i
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        c.close()
        s.close()
        await asyncio.wait_for(task, DEADLINE)


# ── error paths ──────────────────────────────────────────────────────────────


async def test_dial_failing_before_the_engine_leaves_the_handshake_answerable(engine):
    """fix: ``dial`` took the client's fd before making the future; when ``create_future``
    raised, the fd was closed with no reply and the handshake could not be answered. Handles
    and futures are now made first: the caller still owns the connection."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[list[object]] = loop.create_future()

    def cb(items, err):  # type: ignore[no-untyped-def]
        if not got.done():
            got.set_result(items)

    class NoFutures:
        def create_future(self):  # type: ignore[no-untyped-def]
            raise MemoryError("injected")

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    front = engine.native_listen(lsock, "http", 5.0, loop, cb)
    c = socket.create_connection(lsock.getsockname())
    try:
        c.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        [h] = await asyncio.wait_for(got, DEADLINE)
        with pytest.raises(MemoryError):
            h.dial(["127.0.0.1"], 9, b"HTTP/1.1 200 OK\r\n\r\n", b"", 5.0, 60.0, 60.0, False, NoFutures())
        h.reply_and_close(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        c.settimeout(DEADLINE)
        assert await asyncio.to_thread(c.recv, 100) == b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
    finally:
        c.close()
        front.close()
        lsock.close()


async def test_many_tunnels_leave_no_fd(engine):
    """Scaled from the issue's 100,000 to 10,000 tunnels (a few seconds on this shared 2-core
    machine, the suite's budget) in waves of 500, a third of them reset mid-transfer:
    /proc/self/fd is back to its start once the engine is stopped (its epoll fd, eventfd and
    pooled pipes are not leaks)."""
    import struct

    engine.shutdown_engine()
    start = fds()
    linger0 = struct.pack("ii", 1, 0)
    for wave in range(20):
        tasks = []
        ends = []
        for i in range(500):
            c, a = socket.socketpair()
            s, b = socket.socketpair() if i % 3 else tcp_pair()
            ends.append((i, c, s))
            tasks.append(asyncio.ensure_future(engine.relay_with_timeouts(a, b, 30.0, 30.0)))
        await asyncio.sleep(0)

        def traffic() -> None:
            for i, c, s in ends:
                c.sendall(b"x" * 70000)
                if i % 3 == 0:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
                    s.close()                       # a reset while bytes are in flight
                else:
                    c.shutdown(socket.SHUT_WR)
                    s.shutdown(socket.SHUT_WR)

        await asyncio.to_thread(traffic)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE)
        for (i, c, s), r in zip(ends, results):
            assert isinstance(r, OSError) if i % 3 == 0 else r[1] == 0, (i, r)
            c.close()
            s.close()
    engine.shutdown_engine()
    assert fds() <= start       # (another test's objects collected meanwhile may close fds of theirs)




async def test_early_bytes_are_counted(engine):
    """Nit of the issue: the bytes a client sent after its head reach the target and count in
    the tunnel's byte count (a -> b), as on the asyncio path."""
    from peers import EchoServer

    echo = EchoServer()
    loop = asyncio.get_running_loop()
    got: asyncio.Future[list[object]] = loop.create_future()
    ended: asyncio.Future[tuple[int, int]] = loop.create_future()

    def cb(items, err):  # type: ignore[no-untyped-def]
        if not got.done():
            got.set_result(items)

    def done(exc, tunnel):  # type: ignore[no-untyped-def]
        loop.call_soon_threadsafe(ended.set_result, tunnel.moved)

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    front = engine.native_listen(lsock, "http", 5.0, loop, cb)
    c = socket.create_connection(lsock.getsockname())
    try:
        head = f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode()
        c.sendall(head + b"early!")
        [h] = await asyncio.wait_for(got, DEADLINE)
        h.dial(["127.0.0.1"], echo.port, b"HTTP/1.1 200 OK\r\n\r\n", h.data[len(head):], 5.0, 60.0, 60.0, False,
               loop, done)
        c.settimeout(DEADLINE)
        reply = b""
        while not reply.endswith(b"early!"):
            chunk = await asyncio.to_thread(c.recv, 100)
            assert chunk, reply
            reply += chunk
        assert reply == b"HTTP/1.1 200 OK\r\n\r\nearly!"
        c.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(ended, DEADLINE) == (6, 6)
    finally:
        c.close()
        front.close()
        lsock.close()
        echo.close()

"""The compiled engine's handshake front-end: same replies and violations as the asyncio
path, batched delivery, handle lifecycle, no fd leaks."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import pytest

from kodarelay import Filter, relay
from kodarelay.server import Server
from kodarelay.serving import native_frontend_available
from kodarelay.socks5 import Socks5Server

from peers import EchoServer, dead_port, fd_count

pytestmark = pytest.mark.skipif(not hasattr(relay.impl, "native_listen"), reason="needs the compiled engine")


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the proxy closes (or ``timeout``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if data:
            s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _greet(req: bytes) -> bytes:
    return b"\x05\x01\x00" + req


DEAD = dead_port()
CASES = [
    b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT foo HTTP/1.1\r\n\r\n",
    b"CONNECT a b c\r\n\r\n",
    b"CONNECT [::1]:x HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n",
    b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT 10.1.2.3:443 HTTP/1.1\r\n\r\n",
    b"X" * 9000,
    b"CONNECT 127.0.0.1:" + str(DEAD).encode() + b" HTTP/1.1\r\n\r\n",
    b"CONNECT x",                                   # timeout: 408
    b"",                                            # timeout before a byte: 408
    b"\x05\x01\x02",                                # no acceptable method: 05 FF
    b"\x05\x00",                                    # no method at all
    _greet(b"\x05\x02\x00\x03\x09localhost\x00\x50"),       # BIND: 07
    _greet(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),    # IPv4 literal: 08
    _greet(b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x50"),  # IPv6 literal: 08
    _greet(b"\x05\x01\x00\x09\x00\x00"),                    # unknown ATYP: close
    _greet(b"\x05\x01\x00\x03\x00\x00\x50"),                # empty name: 01, bad_host
    _greet(b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50"),        # not UTF-8: 01, bad_host
    _greet(b"\x05\x01\x00\x03\x09evil.test\x01\xbb"),       # not allowed: 02
    _greet(b"\x05\x01\x00\x03\x09127.0.0.1" + DEAD.to_bytes(2, "big")),  # refused: 05
    _greet(b"\x04\x01\x00\x03"),                            # wrong request version: close
    b"\x05\x01\x00\x05\x01\x00\x03\x09loc",                # timeout mid-request: close
    b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",                # SOCKS4 to the mux: HTTP 400
]


def _run_cases(monkeypatch: pytest.MonkeyPatch, native: bool, cls: type, cases: list[bytes], **kw: object):
    if native:
        monkeypatch.delenv("KODARELAY_NO_NATIVE_FRONTEND", raising=False)
    else:
        monkeypatch.setenv("KODARELAY_NO_NATIVE_FRONTEND", "1")

    async def main():  # type: ignore[no-untyped-def]
        srv = await cls.bind(None, Filter(["127.0.0.1", "localhost"]), handshake_timeout=0.3, **kw)
        task = asyncio.create_task(srv.serve())
        await asyncio.sleep(0)
        assert (srv._front is not None) == native
        loop = asyncio.get_running_loop()
        replies = [await loop.run_in_executor(None, _exchange, srv.port, c) for c in cases]
        await asyncio.sleep(0.05)
        violations = [(v.protocol, v.host, v.port, v.reason) for v in srv.violations()]
        await srv.aclose()
        await task
        return replies, violations

    return asyncio.run(main())


@pytest.mark.parametrize("cls,kw", [(Server, {"socks5": True}), (Server, {}), (Socks5Server, {})],
                         ids=["mux", "http", "socks5"])
def test_replies_and_violations_match_the_asyncio_path(monkeypatch, cls, kw):
    native = _run_cases(monkeypatch, True, cls, CASES, **kw)
    python = _run_cases(monkeypatch, False, cls, CASES, **kw)
    for case, a, b in zip(CASES, native[0], python[0]):
        assert a == b, case
    assert native[1] == python[1]
    assert native[1]                      # the cases do record violations


def test_front_end_is_on_by_default():
    assert native_frontend_available()


def test_tunnels_work_and_batches_gather_under_a_busy_thread():
    echo = EchoServer()
    batches: list[int] = []

    async def main():  # type: ignore[no-untyped-def]
        srv = await Server.bind(None, Filter(["127.0.0.1"]))
        orig = srv._on_batch_direct

        def spy(items):  # type: ignore[no-untyped-def]
            batches.append(len(items))
            return orig(items)

        srv._on_batch_direct = spy  # type: ignore[method-assign]
        task = asyncio.create_task(srv.serve())
        await asyncio.sleep(0)
        n = 40
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                pass

        def clients() -> list[bytes]:
            socks = []
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\nping".encode())
                socks.append(s)
            out = []
            for s in socks:
                buf = b""
                while len(buf) < 43:
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    buf += chunk
                out.append(buf)
                s.close()
            return out

        old = sys.getswitchinterval()
        sys.setswitchinterval(0.02)
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, clients)
        finally:
            stop.set()
            spinner.join()
            sys.setswitchinterval(old)
        assert out == [b"HTTP/1.1 200 Connection Established\r\n\r\nping"] * n
        hits.append(srv._front.plan_stats()["hits"])
        await srv.aclose()
        await task

    hits: list[int] = []
    try:
        asyncio.run(main())
    finally:
        echo.close()
    # each request reached Python in a batch, or was served from the engine's plan cache
    # (without the GIL at all) once the first one had decided the plan
    assert sum(batches) + hits[0] == 40
    assert len(batches) < 40, batches


def test_handle_is_answered_once():
    got: list[object] = []

    async def main():  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        ready = loop.create_future()

        def cb(items, err):  # type: ignore[no-untyped-def]
            got.extend(items)
            if not ready.done():
                ready.set_result(None)

        front = relay.impl.native_listen(lsock, "http", 5.0, loop, cb)  # type: ignore[attr-defined]
        c = socket.create_connection(lsock.getsockname())
        c.sendall(b"CONNECT a:1 HTTP/1.1\r\n\r\nearly")
        await asyncio.wait_for(ready, 5)
        [h] = got
        assert (h.proto, h.overflow, h.data) == (0, False, b"CONNECT a:1 HTTP/1.1\r\n\r\nearly")
        fd = h.detach()
        with pytest.raises(ValueError):
            h.reply_and_close(b"x")
        with pytest.raises(ValueError):
            h.detach()
        h.close()                         # a no-op once answered
        s = socket.socket(fileno=fd)
        s.sendall(b"mine")
        assert c.recv(10) == b"mine"
        s.close()
        c.close()
        front.close()
        lsock.close()

    asyncio.run(main())


def test_no_fd_leak_after_many_connections():
    echo = EchoServer()

    async def main():  # type: ignore[no-untyped-def]
        srv = await Server.bind(None, Filter(["127.0.0.1"]), socks5=True)
        task = asyncio.create_task(srv.serve())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        cases = [
            f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode(),
            b"CONNECT evil.test:1 HTTP/1.1\r\n\r\n",
            f"CONNECT 127.0.0.1:{DEAD} HTTP/1.1\r\n\r\n".encode(),
            b"X" * 9000,
            _greet(b"\x05\x01\x00\x03\x09evil.test\x01\xbb"),
            b"\x05\x01\x02",
        ]

        def burst() -> None:
            for c in cases:
                _exchange(srv.port, c, timeout=0.5)
            for _ in range(20):  # clients that leave mid-handshake
                s = socket.create_connection(("127.0.0.1", srv.port))
                s.sendall(b"CONNECT 127")
                s.close()

        await loop.run_in_executor(None, burst)         # warm up (executor thread, engine)
        await asyncio.sleep(0.2)
        before = fd_count()
        for _ in range(15):
            await loop.run_in_executor(None, burst)
        deadline = time.monotonic() + 5
        while (now := fd_count()) > before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert now <= before              # (a later count can catch a transient fd of the peers)
        assert srv.tunnel_count == 0
        await srv.aclose()
        await task

    try:
        asyncio.run(main())
    finally:
        echo.close()


def test_server_keeps_accepting_after_the_engine_is_shut_down():
    echo = EchoServer()

    async def main():  # type: ignore[no-untyped-def]
        srv = await Server.bind(None, Filter(["127.0.0.1"]))
        task = asyncio.create_task(srv.serve())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        req = f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode()
        assert (await loop.run_in_executor(None, _exchange, srv.port, req, 0.5)).startswith(b"HTTP/1.1 200")
        await loop.run_in_executor(None, relay.impl.shutdown_engine)  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)          # the server hears of it and serves on a fresh engine
        assert (await loop.run_in_executor(None, _exchange, srv.port, req, 0.5)).startswith(b"HTTP/1.1 200")
        await srv.aclose()
        await task

    try:
        asyncio.run(main())
    finally:
        echo.close()

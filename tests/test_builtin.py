"""BuiltInProxy / BuiltInSocks5Proxy lifecycles: spawn on a loop, start in a thread, stop anywhere."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import threading

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig

from peers import EchoServer, dead_port, http_connect, port_is_closed, recv_exact, status_of


async def _aconnect(port: int, target: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


async def test_spawn_serves_on_the_running_loop():
    echo = EchoServer()
    try:
        async with await BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).spawn() as h:
            assert h.kind == "builtin" and h.ca_bundle is None
            head = await _aconnect(h.port, f"localhost:{echo.port}")
            assert head.startswith(b"HTTP/1.1 200 ")
            port = h.port
        assert port_is_closed(port)
    finally:
        echo.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDS bridge is Linux-only")
def test_http_proxy_attaches_uds_bridge_and_removes_it():
    echo = EchoServer()
    try:
        h = BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start()
        assert h.uds_path is not None and os.path.exists(h.uds_path)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.settimeout(10)
        u.connect(h.uds_path)
        u.sendall(f"CONNECT localhost:{echo.port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += u.recv(1)
        assert status_of(head) == 200
        u.sendall(b"uds")
        assert recv_exact(u, 3) == b"uds"
        path = h.uds_path
        h.shutdown()
        assert not os.path.exists(path)
    finally:
        echo.close()


def test_socks5_proxy_has_no_bridge():
    with BuiltInSocks5Proxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start() as h:
        assert h.uds_path is None


def test_shutdown_from_another_thread_and_idempotent():
    h = BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start()
    t = threading.Thread(target=h.shutdown)
    t.start()
    t.join(10)
    assert not h.alive and port_is_closed(h.port)
    h.shutdown()


def test_spawned_proxy_stops_after_its_loop_is_gone():
    async def make():
        return await BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).spawn()

    h = asyncio.run(make())
    h.shutdown()  # no running loop now
    assert port_is_closed(h.port)
    if h.uds_path:
        assert not os.path.exists(h.uds_path)


async def test_shutdown_from_another_thread_while_loop_runs():
    h = await BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).spawn()
    await asyncio.to_thread(h.shutdown)
    assert port_is_closed(h.port)


def test_garbage_collected_handle_stops_the_proxy():
    h = BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start()
    port = h.port
    del h
    gc.collect()
    assert port_is_closed(port)


def test_upstream_none_reads_the_environment(monkeypatch):
    dead = dead_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with BuiltInProxy(Filter(["example.test"])).start() as h:
        s, head = http_connect(h.port, "example.test:443")
        assert status_of(head) == 502  # it tried the (dead) upstream from the environment


def test_explicit_port_and_port_in_use():
    with BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start() as h:
        with pytest.raises(OSError):
            BuiltInProxy(Filter(["localhost"]), port=h.port, upstream=UpstreamConfig.direct()).start()

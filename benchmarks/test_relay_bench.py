"""Relay and parser benchmarks, compiled vs pure-Python in one run.

    pytest --benchmark-only benchmarks/

Bulk throughput (MB/s in ``extra_info``), 64-byte round-trip latency through a live tunnel,
and CONNECT head parsing. The relay runs on an event loop in a background thread; the
peers are blocking sockets in this thread (bulk: one sender thread, one receiver thread).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("pytest_benchmark")

BULK_BYTES = 256 << 20
CHUNK = 1 << 20


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
    for x in (c, s):
        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


class _LoopThread:
    """An asyncio loop in a daemon thread, to run relays while this thread drives peers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[_LoopThread]:
    lt = _LoopThread()
    yield lt
    lt.close()


def _bulk_round(impl, lt: _LoopThread) -> None:  # type: ignore[no-untyped-def]
    client, a = _tcp_pair()
    b, server = _tcp_pair()
    fut = lt.submit(impl.relay_with_timeouts(a, b, idle=60.0, total=600.0))
    received = [0]

    def receive() -> None:
        buf = bytearray(CHUNK)
        n = 0
        while True:
            k = server.recv_into(buf)
            if not k:
                break
            n += k
        received[0] = n
        server.shutdown(socket.SHUT_WR)

    rx = threading.Thread(target=receive)
    rx.start()
    block = b"\xa5" * CHUNK
    for _ in range(BULK_BYTES // CHUNK):
        client.sendall(block)
    client.shutdown(socket.SHUT_WR)
    rx.join()
    assert fut.result(60) == (BULK_BYTES, 0)
    assert received[0] == BULK_BYTES
    client.close()
    server.close()


def test_bench_bulk_throughput(benchmark, impl, loop_thread) -> None:  # type: ignore[no-untyped-def]
    """256 MiB one way through one loopback TCP tunnel, per round."""
    benchmark.group = "relay-bulk-256MiB"
    benchmark.pedantic(_bulk_round, args=(impl, loop_thread), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["MB/s"] = round(BULK_BYTES / benchmark.stats.stats.median / 1e6, 1)


def test_bench_small_message_latency(benchmark, impl, loop_thread) -> None:  # type: ignore[no-untyped-def]
    """One 64-byte request and its 64-byte echo through a live tunnel (a round trip)."""
    benchmark.group = "relay-latency-64B-rtt"
    client, a = _tcp_pair()
    b, server = _tcp_pair()
    fut = loop_thread.submit(impl.relay_with_timeouts(a, b, idle=60.0, total=600.0))
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            d = server.recv(64)
            if not d:
                break
            server.sendall(d)
        server.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=echo)
    th.start()
    msg = b"x" * 64

    def rtt() -> None:
        client.sendall(msg)
        got = 0
        while got < 64:
            got += len(client.recv(64 - got))

    rtt()  # warm the path
    benchmark(rtt)
    stop.set()
    client.shutdown(socket.SHUT_WR)
    th.join()
    fut.result(10)
    client.close()
    server.close()


HEAD = (
    b"CONNECT registry.npmjs.org:443 HTTP/1.1\r\n"
    b"Host: registry.npmjs.org:443\r\n"
    b"User-Agent: npm/10.2.4 node/v20.11.0 linux x64 workspaces/false\r\n"
    b"Proxy-Connection: keep-alive\r\n\r\n"
)


def test_bench_parse_connect_head(benchmark, impl) -> None:  # type: ignore[no-untyped-def]
    """Find the end of a CONNECT head, parse its request line, split the authority."""
    benchmark.group = "parse-connect-head"

    def parse() -> tuple[str, int]:
        end = impl.http_head_end(HEAD)
        method, target, _ = impl.parse_request_line(HEAD[:end])
        assert method == "CONNECT"
        return impl.split_host_port(target)

    assert benchmark(parse) == ("registry.npmjs.org", 443)


SOCKS_REQ = b"\x05\x01\x00\x03\x12registry.npmjs.org\x01\xbb"


def test_bench_parse_socks5_request(benchmark, impl) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "parse-socks5-request"
    assert benchmark(impl.parse_socks5_request, SOCKS_REQ) == (len(SOCKS_REQ), 1, 3, "registry.npmjs.org", 443)

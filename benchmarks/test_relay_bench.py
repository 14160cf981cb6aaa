"""Relay and parser benchmarks, compiled vs pure-Python in one run.

    pytest --benchmark-only benchmarks/

Bulk throughput (MB/s and relay CPU-seconds per GiB in ``extra_info``) for the compiled
relay, the pure-Python relay and, when ``../shared/bench`` has built it, the C splice relay,
all in one run; the run ends with a table of ratios. Also 64-byte round-trip latency through
a live tunnel and CONNECT / SOCKS5 parsing. The relay runs on an event loop in a background
thread; bulk peers run in a child process so they never contend for the relay's GIL.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kodarelay import _relay_py

pytest.importorskip("pytest_benchmark")

BULK_BYTES = 512 << 20
#: name -> (MB/s, relay CPU-s per GiB), for the ratio table printed at the end of the run
BULK_RESULTS: dict[str, tuple[float, float]] = {}


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


# The peers (sender and receiver) run in a child process so they never compete with the
# relay for this process's GIL; CPU is measured for the relay side only.
PEERS = r"""
import socket, sys, threading, time
n = int(sys.argv[1])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
print(lst.getsockname()[1], flush=True)
port = int(sys.stdin.readline())
got = [0]
def receive():
    conn, _ = lst.accept()
    buf = bytearray(1 << 20)
    while k := conn.recv_into(buf):
        got[0] += k
rx = threading.Thread(target=receive); rx.start()
out = socket.create_connection(("127.0.0.1", port))
block = b"\xa5" * (1 << 20)
t0 = time.perf_counter()
for _ in range(n >> 20):
    out.sendall(block)
out.shutdown(socket.SHUT_WR)
rx.join()
print(got[0], time.perf_counter() - t0, flush=True)
"""


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _cpu_pid(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_peers() -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    peers = subprocess.Popen([sys.executable, "-c", PEERS, str(BULK_BYTES)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    return peers, int(peers.stdout.readline())  # type: ignore[union-attr]


def _finish_peers(peers: subprocess.Popen, relay_port: int) -> float:  # type: ignore[type-arg]
    peers.stdin.write(f"{relay_port}\n")  # type: ignore[union-attr]
    peers.stdin.flush()  # type: ignore[union-attr]
    got, secs = peers.stdout.readline().split()  # type: ignore[union-attr]
    assert peers.wait(60) == 0 and int(got) == BULK_BYTES
    return float(secs)


def _bulk_round_inprocess(impl, lt: _LoopThread, cpu: list[float]) -> None:  # type: ignore[no-untyped-def]
    peers, receiver_port = _start_peers()
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        b = socket.create_connection(("127.0.0.1", receiver_port))
        c0 = _cpu_self()
        peers.stdin.write(f"{lst.getsockname()[1]}\n")  # type: ignore[union-attr]
        peers.stdin.flush()  # type: ignore[union-attr]
        a, _ = lst.accept()
    fut = lt.submit(impl.relay_with_timeouts(a, b, idle=60.0, total=600.0))
    got, _secs = peers.stdout.readline().split()  # type: ignore[union-attr]
    assert fut.result(60) == (BULK_BYTES, 0) and int(got) == BULK_BYTES
    cpu.append(_cpu_self() - c0)
    assert peers.wait(60) == 0


def _record(benchmark, name: str, cpu: list[float]) -> None:  # type: ignore[no-untyped-def]
    median = benchmark.stats.stats.median
    cpu_per_gib = sorted(cpu)[len(cpu) // 2] * (1 << 30) / BULK_BYTES
    benchmark.extra_info["MB/s"] = round(BULK_BYTES / median / 1e6, 1)
    benchmark.extra_info["relay CPU-s/GiB"] = round(cpu_per_gib, 3)
    BULK_RESULTS[name] = (BULK_BYTES / median / 1e6, cpu_per_gib)


def test_bench_bulk_throughput(benchmark, impl, loop_thread) -> None:  # type: ignore[no-untyped-def]
    """512 MiB one way through one loopback TCP tunnel, per round; peers in a child process."""
    benchmark.group = "relay-bulk-512MiB"
    cpu: list[float] = []
    benchmark.pedantic(_bulk_round_inprocess, args=(impl, loop_thread, cpu), rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "cython" if impl is not _relay_py else "python", cpu[1:])


def _c_splice_relay() -> str | None:
    """The C splice relay of the shared benchmark harness, if it has been built here."""
    candidates = [os.environ.get("KODARELAY_BENCH_SPLICE_RELAY", "")]
    here = Path(__file__).resolve().parent.parent
    for work in (os.environ.get("BENCH_WORK", ""), "/tmp/kodarelay-bench", str(here.parent / "shared" / "bench")):
        if work:
            candidates.append(os.path.join(work, "build", "splice_relay"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    """Poll /proc/net/tcp for a listener on ``port``: a probe connection would be relayed."""
    needle = f":{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/tcp") as f:
            if needle in f.read():
                return
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.005)


def test_bench_bulk_throughput_c_splice_reference(benchmark) -> None:  # type: ignore[no-untyped-def]
    """The same transfer through the C splice relay (../shared/bench), the best-achievable anchor."""
    exe = _c_splice_relay()
    if exe is None:
        pytest.skip("C splice relay not built (run ../shared/bench/setup.sh or set KODARELAY_BENCH_SPLICE_RELAY)")
    benchmark.group = "relay-bulk-512MiB"
    cpu: list[float] = []

    def round_() -> None:
        peers, receiver_port = _start_peers()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        relay = subprocess.Popen([exe, "--port", str(port), "--proto", "raw", "--target-port", str(receiver_port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port)
            c0 = _cpu_pid(relay.pid)
            _finish_peers(peers, port)
            cpu.append(_cpu_pid(relay.pid) - c0)
        finally:
            relay.terminate()
            relay.wait(10)

    benchmark.pedantic(round_, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "c-splice", cpu[1:])


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

"""Relay and parser benchmarks, compiled vs pure-Python in one run.

    pytest --benchmark-only benchmarks/

Bulk throughput (MB/s and relay CPU-seconds per GiB in ``extra_info``) for the compiled
relay, the pure-Python relay and, when ``../shared/bench`` has built it, the C splice relay,
all in one run; 64-byte round-trip latency through a live tunnel; tunnel setup to a name
through the built-in proxy (CONNECT, resolver pinned, 200, close); CONNECT / SOCKS5 parsing.

Bulk, latency and tunnel setup also run *busy*: a CPU-bound Python thread shares the
benchmark's interpreter, as in an agent runtime that hosts the proxy. That is what the
compiled engine is for: the twin needs the GIL for every chunk, the engine never does. The
run ends with a table of ratios (compiled / twin, quiet and busy). The relay runs on an
event loop in a background thread; bulk peers run in a child process so they never contend
for the relay's GIL.
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
#: (measure, "quiet" / "busy", implementation) -> figure (MB/s, µs per round trip, tunnels/s)
RATIO_RESULTS: dict[tuple[str, str, str], float] = {}


class BusyInterpreter:
    """A CPU-bound Python thread in this process while active: the agent runtime's load."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="busy-interpreter", daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(10000):
                x += i * i

    def __enter__(self) -> "BusyInterpreter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(params=["quiet", "busy"])
def load(request: pytest.FixtureRequest) -> Iterator[str]:
    """Quiet, or with a CPU-bound Python thread beside the relay for the whole benchmark."""
    if request.param == "busy":
        with BusyInterpreter():
            yield "busy"
    else:
        yield "quiet"


def _name(impl) -> str:  # type: ignore[no-untyped-def]
    return "cython" if impl is not _relay_py else "python"


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


def test_bench_bulk_throughput(benchmark, impl, loop_thread, load) -> None:  # type: ignore[no-untyped-def]
    """512 MiB one way through one loopback TCP tunnel, per round; peers in a child process.
    (Busy: relay CPU includes the busy thread's, so only MB/s is compared.)"""
    benchmark.group = f"relay-bulk-512MiB-{load}"
    cpu: list[float] = []
    rounds = 3 if load == "quiet" else 1
    benchmark.pedantic(_bulk_round_inprocess, args=(impl, loop_thread, cpu), rounds=rounds, iterations=1,
                       warmup_rounds=1)
    if load == "quiet":
        _record(benchmark, _name(impl), cpu[1:])
    RATIO_RESULTS[("bulk MB/s", load, _name(impl))] = BULK_BYTES / benchmark.stats.stats.median / 1e6


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


# Peers of the latency and tunnel-setup benchmarks (client and server) run in a child
# process, like the bulk peers: in this process they would queue for the busy thread's GIL
# themselves. The child prints its server's port, reads the relay's port, runs, and prints
# the median and total seconds per operation.
PEER = r"""
import socket, statistics, sys, threading, time
mode, n = sys.argv[1], int(sys.argv[2])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(4096)
def serve():
    while True:
        conn, _ = lst.accept()
        if mode == "rtt":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while d := conn.recv(64):
                conn.sendall(d)
        conn.close()
threading.Thread(target=serve, daemon=True).start()
print(lst.getsockname()[1], flush=True)
port = int(sys.stdin.readline())
times = []
if mode == "rtt":
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    for i in range(n + 50):
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < 64:
            got += len(s.recv(64 - got))
        if i >= 50:
            times.append(time.perf_counter() - t0)
    s.close()
else:
    target = lst.getsockname()[1]
    request = f"CONNECT bench.test:{target} HTTP/1.1\r\nHost: bench.test:{target}\r\n\r\n".encode()
    for i in range(n + 1):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                assert chunk, "proxy closed before answering"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
        if i >= 1:                   # the first request decides the plan
            times.append(time.perf_counter() - t0)
print(statistics.median(times), sum(times), flush=True)
"""


class _Peer:
    """The child process: ``.port`` is its server; ``run(relay_port)`` -> (median s, total s)."""

    def __init__(self, mode: str, n: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PEER, mode, str(n)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())  # type: ignore[union-attr]

    def start(self, relay_port: int) -> None:
        self.proc.stdin.write(f"{relay_port}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def result(self) -> tuple[float, float]:
        median, total = self.proc.stdout.readline().split()  # type: ignore[union-attr]
        assert self.proc.wait(60) == 0
        return float(median), float(total)


def test_bench_small_message_latency(benchmark, impl, loop_thread, load) -> None:  # type: ignore[no-untyped-def]
    """2,000 64-byte requests and their echoes through a live tunnel, one at a time."""
    benchmark.group = f"relay-latency-64B-rtt-{load}"
    peer = _Peer("rtt", 2000)
    results: list[tuple[float, float]] = []

    def round_() -> None:
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            b = socket.create_connection(("127.0.0.1", peer.port))
            peer.start(lst.getsockname()[1])
            a, _ = lst.accept()
        fut = loop_thread.submit(impl.relay_with_timeouts(a, b, idle=60.0, total=600.0))
        results.append(peer.result())
        fut.result(30)

    benchmark.pedantic(round_, rounds=1, iterations=1)
    median, total = results[0]
    mean_us = total / 2000 * 1e6
    benchmark.extra_info["median µs per round trip"] = round(median * 1e6, 1)
    benchmark.extra_info["mean µs per round trip"] = round(mean_us, 1)
    # the mean: with a busy interpreter most round trips are quick and some wait a whole GIL
    # switch interval (5 ms), which is what a request-response client sees
    RATIO_RESULTS[("latency µs (64 B round trip, median)", load, _name(impl))] = median * 1e6
    RATIO_RESULTS[("latency µs (64 B round trip, mean)", load, _name(impl))] = mean_us


def test_bench_tunnel_setup_to_a_name(benchmark, impl, load, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """CONNECT to a name through ``BuiltInProxy`` (resolver pinned, so no DNS), read the 200,
    close, one after another. The compiled engine serves repeated names from its plan cache;
    the twin decides each on the event loop."""
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig
    from kodarelay import relay as relay_mod

    benchmark.group = f"tunnel-setup-to-a-name-{load}"
    monkeypatch.setenv("KODARELAY_NO_NATIVE_FRONTEND", "1" if impl is _relay_py else "")
    monkeypatch.setattr(relay_mod, "impl", impl)
    monkeypatch.setattr(relay_mod, "relay_with_timeouts", impl.relay_with_timeouts)

    async def pinned(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    n = 2000
    peer = _Peer("setup", n)
    proxy = BuiltInProxy(Filter(["bench.test", "127.0.0.1"]), upstream=UpstreamConfig.direct(),
                         resolver=pinned).start()
    results: list[tuple[float, float]] = []
    try:
        peer.start(proxy.port)
        benchmark.pedantic(lambda: results.append(peer.result()), rounds=1, iterations=1)
    finally:
        proxy.shutdown()
    median, total = results[0]
    benchmark.extra_info["median µs per tunnel"] = round(median * 1e6, 1)
    benchmark.extra_info["tunnels/s"] = round(n / total)
    RATIO_RESULTS[("tunnel setup to a name, tunnels/s", load, _name(impl))] = n / total


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

"""Plain-HTTP forwarding against a CONNECT tunnel: one 512 MiB download each, in the same run.

    pytest --benchmark-only benchmarks/test_forward_bench.py -s

The proxy (``BuiltInProxy(forward_http=True)``) runs in this process; the origin and the
client run in child processes, so CPU measured here is the proxy's alone. The origin
answers one ``GET`` with a ``Content-Length`` body of ``FORWARD_BYTES``; the client asks
for it either as an absolute-form request (forwarded) or inside a CONNECT tunnel. Rounds
alternate the order; the ratio reported is the median of per-round ratios (the box is
shared and drifts). The target is forwarded >= 0.8x the tunnel.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark")

FORWARD_BYTES = int(os.environ.get("KODARELAY_BENCH_FORWARD_MIB", "512")) << 20
ROUNDS = int(os.environ.get("KODARELAY_BENCH_FORWARD_ROUNDS", "3"))

# The origin and the client are two child processes (neither competes with the proxy, nor
# with each other, for a GIL); CPU is measured for the proxy side only.
ORIGIN = r"""
import socket, sys
n = int(sys.argv[1])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
print(lst.getsockname()[1], flush=True)
conn, _ = lst.accept()
head = b""
while b"\r\n\r\n" not in head:
    head += conn.recv(4096)
conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
block = b"\xa5" * (4 << 20)
left = n
while left:
    k = min(left, len(block))
    conn.sendall(block[:k])
    left -= k
conn.close()
"""

CLIENT = r"""
import socket, sys, time
n, mode, proxy, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection(("127.0.0.1", proxy))
t0 = time.perf_counter()
if mode == "tunnel":
    c.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % port)
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(1)
    c.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
else:
    c.sendall(b"GET http://127.0.0.1:%d/big HTTP/1.1\r\nHost: x\r\n\r\n" % port)
buf = bytearray(4 << 20)
got = 0
head = b""
while b"\r\n\r\n" not in head:
    head += c.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
while got < n:
    k = c.recv_into(buf)
    assert k, f"EOF after {got}"
    got += k
print(got, time.perf_counter() - t0, flush=True)
"""


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _one(port: int, mode: str) -> tuple[float, float]:
    """(MB/s, proxy CPU-s per GiB) of one download through the proxy."""
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(FORWARD_BYTES)], stdout=subprocess.PIPE, text=True)
    try:
        origin_port = int(origin.stdout.readline())  # type: ignore[union-attr]
        cpu0 = _cpu_self()
        out = subprocess.run([sys.executable, "-c", CLIENT, str(FORWARD_BYTES), mode, str(port), str(origin_port)],
                             capture_output=True, text=True, timeout=300)
        cpu = _cpu_self() - cpu0
        assert out.returncode == 0, out.stderr
        assert origin.wait(60) == 0
    finally:
        if origin.poll() is None:
            origin.kill()
            origin.wait()
    got, secs = out.stdout.split()
    assert int(got) == FORWARD_BYTES
    return FORWARD_BYTES / float(secs) / 1e6, cpu / (FORWARD_BYTES / (1 << 30))


def test_forward_vs_tunnel_download(benchmark):  # type: ignore[no-untyped-def]
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig, relay

    handle = BuiltInProxy(Filter(["127.0.0.1"]), upstream=UpstreamConfig.direct(), forward_http=True).start()
    results: dict[str, list[tuple[float, float]]] = {"forward": [], "tunnel": []}
    try:
        def rounds() -> None:
            for i in range(ROUNDS):
                order = ("forward", "tunnel") if i % 2 == 0 else ("tunnel", "forward")
                for mode in order:
                    results[mode].append(_one(handle.port, mode))

        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        handle.shutdown()
    ratios = [f[0] / t[0] for f, t in zip(results["forward"], results["tunnel"])]
    summary = {
        mode: {"MB/s": statistics.median(r[0] for r in rs), "CPU-s/GiB": statistics.median(r[1] for r in rs)}
        for mode, rs in results.items()
    }
    benchmark.extra_info.update(summary=summary, ratio=statistics.median(ratios), relay=relay.IMPLEMENTATION)
    print(f"\nforwarded vs tunnel ({relay.IMPLEMENTATION} relay, {FORWARD_BYTES >> 20} MiB, {ROUNDS} rounds):")
    for mode, s in summary.items():
        print(f"  {mode:<8} {s['MB/s']:8.0f} MB/s  {s['CPU-s/GiB']:.3f} CPU-s/GiB")
    print(f"  median per-round ratio forwarded/tunnel: {statistics.median(ratios):.2f}x")

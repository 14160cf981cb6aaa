"""A captured request against the same request through the proxy variables (issue 20).

    pytest --benchmark-only benchmarks/test_capture_bench.py -s

One ``kodarelay run`` fences a client (a child process) that makes small HTTP requests to
an origin on the host's loopback, each on a new connection, two ways in alternating
rounds: *captured* (it resolves the name with the fence's DNS and connects to the synthetic
address, as a program that ignores the proxy variables does) and *proxied* (``CONNECT``
through the port the proxy variables name, as curl does for https). Both are judged by the
same rule and relayed to the same origin. *busy*: two more processes in the fence make the
same kind of requests without pause meanwhile. The figure is the median of per-round
ratios of mean request time (the box is shared and drifts); the target is captured <= 1.10x
proxied (<= 10 % added time).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark")

REQUESTS = int(os.environ.get("KODARELAY_BENCH_CAPTURE_REQUESTS", "200"))
ROUNDS = int(os.environ.get("KODARELAY_BENCH_CAPTURE_ROUNDS", "6"))
#: (load, implementation) -> median captured / proxied ratio
CAPTURE_RESULTS: dict[tuple[str, str], float] = {}

ORIGIN = r"""
import socket, threading
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 0)); lst.listen(1024)
print(lst.getsockname()[1], flush=True)
body = b"x" * 512
reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
def serve(c):
    with c:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(4096)
            if not chunk:
                return
            head += chunk
        c.sendall(reply)
while True:
    c, _ = lst.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, os, socket, sys, time, multiprocessing
name, port, n, rounds, busy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "busy"
proxy = int(os.environ["HTTP_PROXY"].rstrip("/").rsplit(":", 1)[1])
request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name.encode()

def one(mode):
    if mode == "captured":
        s = socket.create_connection((name, port), timeout=10)
    else:
        s = socket.create_connection(("127.0.0.1", proxy), timeout=10)
        s.sendall(b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (name.encode(), port))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
    s.sendall(request)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200") and len(data) > 512, data[:100]

def hog(mode, stop):
    while not stop.is_set():
        one(mode)

out = {"captured": [], "proxied": []}
for i in range(rounds):
    for mode in (("captured", "proxied") if i % 2 == 0 else ("proxied", "captured")):
        stop = multiprocessing.Event()
        hogs = [multiprocessing.Process(target=hog, args=(mode, stop)) for _ in range(2 if busy else 0)]
        for h in hogs:
            h.start()
        one(mode)                       # warm: the name resolved, the plan decided
        t0 = time.perf_counter()
        for _ in range(n):
            one(mode)
        out[mode].append((time.perf_counter() - t0) / n)
        stop.set()
        for h in hogs:
            h.join()
print(json.dumps(out))
"""


def _name() -> str:
    host = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, 80, socket.AF_INET)}
    except OSError:
        addrs = set()
    if addrs != {"127.0.0.1"}:
        pytest.skip(f"the hostname {host!r} does not resolve to 127.0.0.1 here")
    return host


@pytest.mark.parametrize("load", ["quiet", "busy"])
def test_captured_vs_proxied_request(benchmark, impl, load):  # type: ignore[no-untyped-def]
    name = _name()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if impl.__name__.endswith("_relay_py"):
        env["KODARELAY_NO_EXTENSIONS"] = "1"
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN], stdout=subprocess.PIPE, text=True)
    result: dict[str, list[float]] = {}
    try:
        port = int(origin.stdout.readline())  # type: ignore[union-attr]

        def run() -> None:
            out = subprocess.run(
                [sys.executable, "-m", "kodarelay", "run", "--isolate", "--upstream", "direct",
                 "--allow", f"{name},127.0.0.1:{port}", "--",
                 sys.executable, "-c", CLIENT, name, str(port), str(REQUESTS), str(ROUNDS), load],
                capture_output=True, text=True, timeout=600, env=env)
            assert out.returncode == 0, out.stderr
            result.update(json.loads(out.stdout))

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        origin.kill()
        origin.wait()
    ratios = [c / p for c, p in zip(result["captured"], result["proxied"])]
    ratio = statistics.median(ratios)
    CAPTURE_RESULTS[(load, "python" if impl.__name__.endswith("_relay_py") else "cython")] = ratio
    captured_ms = statistics.median(result["captured"]) * 1e3
    proxied_ms = statistics.median(result["proxied"]) * 1e3
    benchmark.extra_info.update(captured_ms=captured_ms, proxied_ms=proxied_ms, ratio=ratio)
    print(f"\ncaptured vs proxied ({impl.__name__}, {load}, {REQUESTS} requests x {ROUNDS} rounds): "
          f"{captured_ms:.3f} ms vs {proxied_ms:.3f} ms per request, median ratio {ratio:.2f}x")

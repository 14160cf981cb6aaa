"""Inspected HTTPS: requests per second on one kept-alive connection (with and without a
secret swapped into each request), a download's MB/s against the same download through a
blind tunnel, quiet and with a busy interpreter.

    pytest --benchmark-only benchmarks/test_inspect_bench.py -s

The proxy runs in this process (``BuiltInProxy(inspect=CertificateAuthority..., rules
GET localhost/*)``); the HTTPS origin and the client are child processes (so CPU measured here
is the proxy's alone). Figures are medians of per-round ratios (the box is shared and drifts).
The C reference for inspection is haproxy, measured side by side by the harness
(``../shared/bench``: ``run_all.sh --tests tls``); see README, Performance.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("cryptography")
trustme = pytest.importorskip("trustme")

SECS = float(os.environ.get("KODARELAY_BENCH_INSPECT_SECS", "1.5"))
ROUNDS = int(os.environ.get("KODARELAY_BENCH_INSPECT_ROUNDS", "3"))
DOWNLOAD = int(os.environ.get("KODARELAY_BENCH_INSPECT_MIB", "64")) << 20

ORIGIN = r"""
import socket, ssl, sys, threading
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1])
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 0)); lst.listen(512)
print(lst.getsockname()[1], flush=True)
small = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + b"x" * 64
block = b"\xa5" * (1 << 20)
def serve(raw):
    try:
        c = ctx.wrap_socket(raw, server_side=True)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/big/"):
                n = int(path[5:])
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                while n:
                    k = min(n, len(block)); c.sendall(block[:k]); n -= k
            else:
                c.sendall(small)
    except OSError:
        pass
while True:
    c, _ = lst.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, ssl, sys, time
proxy, port, ca, mode, secs, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6]
c = socket.create_connection(("127.0.0.1", proxy))
c.sendall(b"CONNECT localhost:%d HTTP/1.1\r\n\r\n" % port)
head = b""
while b"\r\n\r\n" not in head:
    head += c.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
t = ssl.create_default_context(cafile=ca).wrap_socket(c, server_hostname="localhost")
auth = b"Authorization: Bearer %s\r\n" % token.encode() if token != "-" else b""
if mode.startswith("big"):
    n = int(mode[3:])
    t0 = time.perf_counter()
    t.sendall(b"GET /big/%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (n, port))
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += t.recv(65536)
    got = len(buf.partition(b"\r\n\r\n")[2])
    while got < n:
        d = t.recv(1 << 20)
        assert d
        got += len(d)
    print(n / (time.perf_counter() - t0) / 1e6, flush=True)
else:
    req = b"GET /small HTTP/1.1\r\nHost: localhost:%d\r\n%s\r\n" % (port, auth)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        t.sendall(req)
        buf = b""
        while len(buf) < 64 or b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < 64:
            buf += t.recv(65536)
        done += 1
    print(done / (time.perf_counter() - t0), flush=True)
"""

INSPECT_RESULTS: dict[str, float] = {}


def _busy(stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n = (n * 31 + 7) % 1000003


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@pytest.mark.parametrize("load", ["quiet", "busy"])
def test_inspected_requests_downloads_and_a_secret(benchmark, tmp_path, load: str) -> None:
    from kodarelay import BuiltInProxy, CertificateAuthority, Filter, Secret, UpstreamConfig

    origin_ca = trustme.CA()
    leaf = origin_ca.issue_cert("localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "origin.pem"))
    origin_ca.cert_pem.write_to_path(str(tmp_path / "origin-ca.pem"))
    ca = CertificateAuthority.generate("bench")
    bundle = str(ca.write_bundle(tmp_path / "bundle.pem", extra=[tmp_path / "origin-ca.pem"]))
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(tmp_path / "origin.pem")], stdout=subprocess.PIPE,
                              text=True)
    stop = threading.Event()
    secret = Secret("TOKEN", "tok_" + "v" * 36, ["localhost"])
    handles = []
    try:
        assert origin.stdout is not None
        port = int(origin.stdout.readline())
        common = {"upstream": UpstreamConfig.direct(), "inspect": ca, "upstream_ca": str(tmp_path / "origin-ca.pem")}
        inspect = BuiltInProxy(Filter(["GET localhost/*"]), **common).start()
        with_secret = BuiltInProxy(Filter(["GET localhost/*"]), secrets=[secret], **common).start()
        blind = BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start()
        handles += [inspect, with_secret, blind]
        if load == "busy":
            threading.Thread(target=_busy, args=(stop,), daemon=True).start()

        def client(proxy: int, mode: str, token: str = "-") -> float:
            out = subprocess.run([sys.executable, "-c", CLIENT, str(proxy), str(port), bundle, mode, str(SECS), token],
                                 capture_output=True, text=True, timeout=600, check=True)
            return float(out.stdout)

        rps, rps_secret, mbs, mbs_blind, cpu_per_gib = [], [], [], [], []
        size = DOWNLOAD if load == "quiet" else DOWNLOAD // 8     # (a busy interpreter moves it slowly)

        def run() -> None:
            for _ in range(ROUNDS):
                rps.append(client(inspect.port, "small"))
                rps_secret.append(client(with_secret.port, "small", secret.phantom))
                c0 = _cpu()
                mbs.append(client(inspect.port, f"big{size}"))
                cpu_per_gib.append((_cpu() - c0) / (size / (1 << 30)))
                mbs_blind.append(client(blind.port, f"big{size}"))

        benchmark.pedantic(run, rounds=1, iterations=1)
        med = statistics.median
        print(f"\n{load}: inspected {med(rps):,.0f} requests/s on one connection; with a secret swapped "
              f"{med(rps_secret):,.0f}/s ({med([a / b for a, b in zip(rps_secret, rps)]):.2f}x); download "
              f"inspected {med(mbs):,.0f} MB/s ({med(cpu_per_gib):.2f} CPU-s/GiB), blind {med(mbs_blind):,.0f} "
              f"MB/s ({med([a / b for a, b in zip(mbs, mbs_blind)]):.2f}x)")
        INSPECT_RESULTS[f"{load} rps"] = med(rps)
        INSPECT_RESULTS[f"{load} mbs"] = med(mbs)
    finally:
        stop.set()
        for h in handles:
            h.shutdown()
        origin.kill()
        origin.wait()

"""Inspected HTTPS against a blind CONNECT tunnel to the same origin, and against haproxy
(C, OpenSSL: terminates and re-encrypts) when it is installed; compiled and pure-Python
kodarelay, quiet and with a busy interpreter.

    pytest --benchmark-only benchmarks/test_inspect_bench.py -s

Three measures, one test each per implementation:

* ``rps``: small ``GET``\\ s (64-byte bodies) one after another on one kept-alive connection
  (and through a third proxy that swaps a ``Secret``'s phantom in every request);
* ``conn``: new connections per second, ``KODARELAY_BENCH_INSPECT_CONC`` (8) at once, each
  CONNECT + a full TLS handshake + one ``GET`` + close;
* ``down``: one large body on one connection, read for the phase's time: MB/s, and the
  proxy's CPU-seconds per GiB (its busy thread's own CPU left out).

haproxy's phases are left out where ``haproxy`` is not installed.

The proxies run in a child process (``BuiltInProxy(inspect=CertificateAuthority.load(...),
upstream_ca=..., rules GET localhost/*)`` beside a blind ``BuiltInProxy(Filter(["localhost"]))``;
``KODARELAY_NO_EXTENSIONS=1`` for the pure-Python twin, ``KODARELAY_REQUIRE_EXTENSION=1`` for
the compiled one), so CPU read from ``/proc`` is the proxy's alone; the HTTPS origin, the
client and haproxy are child processes too. *busy*: a thread in the proxy's process spins
Python bytecode, switched on and off between phases. Every round measures each (relay, load)
phase once in a rotated order, and the figures reported are medians of per-round ratios (the
box is shared and drifts): inspect / haproxy, inspect / blind, busy / quiet. haproxy is held
to the quiet phases (the busy thread lives in kodarelay's process). The harness
(``../shared/bench``: ``run_all.sh --tests tls``) measures the same against a C client and
origin; see ``docs/BENCHMARKS-inspect.md``.

Scale with ``KODARELAY_BENCH_INSPECT_SECS`` (1.0 s per phase), ``..._ROUNDS`` (3) and
``..._CONC`` (8); each test takes about 5 x ROUNDS x SECS plus start-up (~20 s by default).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("cryptography")
trustme = pytest.importorskip("trustme")

SECS = float(os.environ.get("KODARELAY_BENCH_INSPECT_SECS", "1.0"))
ROUNDS = int(os.environ.get("KODARELAY_BENCH_INSPECT_ROUNDS", "3"))
CONC = int(os.environ.get("KODARELAY_BENCH_INSPECT_CONC", "8"))
CLK = os.sysconf("SC_CLK_TCK")

#: (measure, impl) -> {(relay, load): [figure per round]} and {(relay, load): [CPU-s/GiB per round]}
INSPECT_RESULTS: dict[tuple[str, str], dict[tuple[str, str], list[float]]] = {}
INSPECT_CPU: dict[tuple[str, str], dict[tuple[str, str], list[float]]] = {}
UNITS = {"rps": "requests/s, one connection", "conn": f"new TLS connections/s, {CONC} at once",
         "down": "download MB/s"}

# A keep-alive HTTPS/1.1 origin, a thread per connection: /small answers 64 bytes, /big/N N bytes.
ORIGIN = r"""
import socket, ssl, sys, threading
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1])
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", 0)); lst.listen(1024)
print(lst.getsockname()[1], flush=True)
small = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + b"x" * 64
block = b"\xa5" * (1 << 20)
def serve(raw):
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # (its session tickets then the answer)
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
    except (OSError, ValueError):
        pass
    finally:
        raw.close()
while True:
    c, _ = lst.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# The proxies under test, in a process of their own: an inspecting one and a blind one. Prints
# {"inspect": port, "blind": port, "impl": ..., "spinner": tid}; then each line on stdin is
# "busy" (the spinner runs) or "quiet" (it waits); EOF ends it.
PROXY = r"""
import json, sys, threading
from kodarelay import BuiltInProxy, CertificateAuthority, Filter, Secret, UpstreamConfig, relay
ca_cert, ca_key, origin_ca = sys.argv[1:4]
ca = CertificateAuthority.load(ca_cert, ca_key)
direct = UpstreamConfig.direct()
inspect = BuiltInProxy(Filter(["GET localhost/*"]), upstream=direct, inspect=ca, upstream_ca=origin_ca).start()
blind = BuiltInProxy(Filter(["localhost"]), upstream=direct).start()
secret = Secret("TOKEN", "tok_" + "v" * 36, ["localhost"])
swap = BuiltInProxy(Filter(["GET localhost/*"]), upstream=direct, inspect=ca, upstream_ca=origin_ca,
                    secrets=[secret]).start()
go = threading.Event()
tid = []
started = threading.Event()
def spin():
    tid.append(threading.get_native_id()); started.set()
    n = 0
    while True:
        go.wait()
        while go.is_set():
            n = (n * 31 + 7) % 1000003
threading.Thread(target=spin, daemon=True).start()
started.wait()
print(json.dumps({"inspect": inspect.port, "blind": blind.port, "secret": swap.port, "phantom": secret.phantom,
                  "impl": relay.IMPLEMENTATION, "spinner": tid[0]}),
      flush=True)
for line in sys.stdin:
    (go.set if line.strip() == "busy" else go.clear)()
    print("ok", flush=True)
go.clear()
inspect.shutdown(); blind.shutdown(); swap.shutdown()
"""

# One phase of load. via: "connect" (CONNECT localhost:PORT through a proxy) or "raw" (haproxy:
# TLS straight to it); token: a phantom sent as a bearer token in each small GET, or "-". Prints {"rate": ..., "bytes": ...}.
CLIENT = r"""
import json, socket, ssl, sys, threading, time
proxy, port, ca, mode, secs, via, conc, token = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                                 float(sys.argv[5]), sys.argv[6], int(sys.argv[7]), sys.argv[8])
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
auth = b"Authorization: Bearer %s\r\n" % token.encode() if token != "-" else b""
small = b"GET /small HTTP/1.1\r\nHost: localhost:%d\r\n%s\r\n" % (port, auth)

def tunnel():
    c = socket.create_connection(("127.0.0.1", proxy), timeout=30)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if via == "connect":
        c.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (port, port))
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(1)
            assert d, head
            head += d
        assert head.startswith(b"HTTP/1.1 200"), head
    return ctx.wrap_socket(c, server_hostname="localhost")

def get_small(t, buf):
    t.sendall(small)
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep and len(rest) >= 64:
            assert head.startswith(b"HTTP/1.1 200"), head
            return rest[64:]
        d = t.recv(65536)
        assert d, buf
        buf += d

if mode == "rps":
    t = tunnel()
    buf = b""
    for _ in range(20):
        buf = get_small(t, buf)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        buf = get_small(t, buf)
        done += 1
    print(json.dumps({"rate": done / (time.perf_counter() - t0), "bytes": 0}))
elif mode == "conn":
    count = [0] * conc
    errors = []
    t0 = time.perf_counter()
    stop = t0 + secs
    def one(i):
        try:
            while time.perf_counter() < stop:
                t = tunnel()
                get_small(t, b"")
                t.close()
                count[i] += 1
        except Exception as e:
            errors.append(repr(e))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
    for th in ts: th.start()
    for th in ts: th.join()
    assert not errors, errors[:3]
    print(json.dumps({"rate": sum(count) / (time.perf_counter() - t0), "bytes": 0}))
else:
    t = tunnel()
    t.sendall(b"GET /big/%d HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % (1 << 50, port))
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = t.recv(65536)
        assert d, buf
        buf += d
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    mem = bytearray(1 << 20)
    got, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < secs:
        k = t.recv_into(mem)
        assert k, got
        got += k
    print(json.dumps({"rate": got / (time.perf_counter() - t0) / 1e6, "bytes": got}))
    t.close()
"""

HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend fe
    bind fd@{fd} ssl crt {crt} alpn http/1.1
    default_backend be
backend be
    http-reuse always
    server origin 127.0.0.1:{port} ssl verify required ca-file {ca} sni str(localhost) alpn http/1.1
"""


def _ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (or one of its threads), in clock ticks."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class _Proxies:
    """The kodarelay child process: an inspecting proxy, a blind one and a switchable spinner."""

    def __init__(self, impl: str, ca_dir: Path, origin_ca: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.pop("KODARELAY_NO_EXTENSIONS", None)
        env.pop("KODARELAY_REQUIRE_EXTENSION", None)
        env["KODARELAY_NO_EXTENSIONS" if impl == "python" else "KODARELAY_REQUIRE_EXTENSION"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, str(ca_dir / "ca.pem"), str(ca_dir / "ca-key.pem"),
                                      str(origin_ca)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        assert info["impl"] == impl, info
        self.ports = {"inspect": info["inspect"], "blind": info["blind"], "secret": info["secret"]}
        self.phantom = info["phantom"]
        self.spinner = info["spinner"]
        self.load = "quiet"

    def set_load(self, load: str) -> None:
        if load != self.load:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(load + "\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "ok"
            self.load = load

    def cpu(self) -> float:
        """CPU-seconds of the proxy's process, its spinner's own left out."""
        return (_ticks(self.proc.pid) - _ticks(self.proc.pid, self.spinner)) / CLK

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Haproxy:
    """haproxy terminating TLS with a leaf of the origin's CA and re-encrypting to the origin."""

    def __init__(self, tmp: Path, origin_port: int, crt: Path, origin_ca: Path) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(fd=fd, crt=crt, port=origin_port, ca=origin_ca))
        self.proc = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], pass_fds=[fd],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def cpu(self) -> float:
        return _ticks(self.proc.pid) / CLK

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def _phase(port: int, origin_port: int, bundle: Path, measure: str, via: str, token: str = "-") -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(origin_port), str(bundle), measure, str(SECS),
                          via, str(CONC), token], capture_output=True, text=True, timeout=SECS * 20 + 60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("measure", ["rps", "conn", "down"])
def test_inspected_vs_blind_vs_haproxy(benchmark, impl, tmp_path, measure: str) -> None:  # type: ignore[no-untyped-def]
    from kodarelay import CertificateAuthority

    name = "python" if impl.__name__.endswith("_relay_py") else "cython"
    origin_ca = trustme.CA()
    origin_ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "origin.pem"))
    origin_ca.cert_pem.write_to_path(str(tmp_path / "origin-ca.pem"))
    # haproxy's leaf: the origin's CA, which the client trusts beside kodarelay's
    origin_ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "haproxy.pem"))
    ca = CertificateAuthority.in_dir(tmp_path / "ca", name="bench")
    bundle = ca.write_bundle(tmp_path / "bundle.pem", extra=[tmp_path / "origin-ca.pem"])
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN, str(tmp_path / "origin.pem")], stdout=subprocess.PIPE,
                              text=True)
    proxies = haproxy = None
    figures: dict[tuple[str, str], list[float]] = {}
    cpu_gib: dict[tuple[str, str], list[float]] = {}
    try:
        assert origin.stdout is not None
        origin_port = int(origin.stdout.readline())
        proxies = _Proxies(name, tmp_path / "ca", tmp_path / "origin-ca.pem")
        phases = [("inspect", "quiet"), ("blind", "quiet"), ("inspect", "busy"), ("blind", "busy")]
        if measure == "rps":        # and with a secret swapped into every request
            phases.append(("secret", "quiet"))
        if shutil.which("haproxy"):
            haproxy = _Haproxy(tmp_path, origin_port, tmp_path / "haproxy.pem", tmp_path / "origin-ca.pem")
            phases.append(("haproxy", "quiet"))
        # warm: leaves minted, plans decided, haproxy up (its first connection is the readiness check)
        for relay in dict.fromkeys(r for r, _ in phases):
            port = haproxy.port if relay == "haproxy" and haproxy else proxies.ports[relay]
            _warm(port, origin_port, bundle, "raw" if relay == "haproxy" else "connect")

        def run() -> None:
            for r in range(ROUNDS):
                order = phases[r % len(phases):] + phases[:r % len(phases)]
                for relay, load in order:
                    proxies.set_load(load)
                    subject = haproxy if relay == "haproxy" else proxies
                    assert subject is not None
                    port = haproxy.port if relay == "haproxy" and haproxy else proxies.ports[relay]
                    c0 = subject.cpu()
                    got = _phase(port, origin_port, bundle, measure, "raw" if relay == "haproxy" else "connect",
                                 proxies.phantom if relay == "secret" else "-")
                    cpu = subject.cpu() - c0
                    figures.setdefault((relay, load), []).append(got["rate"])
                    if got["bytes"]:
                        cpu_gib.setdefault((relay, load), []).append(cpu / (got["bytes"] / (1 << 30)))
                proxies.set_load("quiet")

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        if proxies:
            proxies.close()
        if haproxy:
            haproxy.close()
        origin.kill()
        origin.wait()
    INSPECT_RESULTS[(measure, name)] = figures
    INSPECT_CPU[(measure, name)] = cpu_gib
    med = statistics.median
    benchmark.extra_info.update({f"{r} {lo}": med(v) for (r, lo), v in figures.items()}, impl=name)
    print(f"\ninspection, {UNITS[measure]} ({name}, {ROUNDS} rounds of {SECS:g} s):")
    for (relay, load), v in figures.items():
        cpu = f"  {med(cpu_gib[(relay, load)]):6.2f} CPU-s/GiB" if (relay, load) in cpu_gib else ""
        print(f"  {relay:<8} {load:<6} {med(v):10,.1f}{cpu}")
    for label, ratio in _ratios(figures) + _cpu_ratios(cpu_gib):
        print(f"  {label:<28} {ratio:.2f}x")


def _warm(port: int, origin_port: int, bundle: Path, via: str) -> None:
    """A few requests through ``port`` (haproxy's listener is ours: they queue until it runs)."""
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(origin_port), str(bundle), "rps", "0.05",
                          via, "1", "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def _ratios(figures: dict[tuple[str, str], list[float]]) -> list[tuple[str, float]]:
    """Medians of per-round ratios; the second element of each pair is the denominator."""
    pairs = [("inspect / haproxy", ("inspect", "quiet"), ("haproxy", "quiet")),
             ("secret swapped / inspect", ("secret", "quiet"), ("inspect", "quiet")),
             ("inspect / blind", ("inspect", "quiet"), ("blind", "quiet")),
             ("inspect / blind, busy", ("inspect", "busy"), ("blind", "busy")),
             ("inspect busy / quiet", ("inspect", "busy"), ("inspect", "quiet")),
             ("blind busy / quiet", ("blind", "busy"), ("blind", "quiet"))]
    out = []
    for label, a, b in pairs:
        if a in figures and b in figures:
            out.append((label, statistics.median(x / y for x, y in zip(figures[a], figures[b]))))
    return out


def _cpu_ratios(cpu: dict[tuple[str, str], list[float]]) -> list[tuple[str, float]]:
    pairs = [("CPU/GiB inspect / haproxy", ("inspect", "quiet"), ("haproxy", "quiet")),
             ("CPU/GiB inspect / blind", ("inspect", "quiet"), ("blind", "quiet"))]
    return [(label, statistics.median(x / y for x, y in zip(cpu[a], cpu[b])))
            for label, a, b in pairs if a in cpu and b in cpu and all(cpu[b])]

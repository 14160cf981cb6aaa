#!/usr/bin/env python3
"""Soak the proxy (issue 14): a mix of bulk tunnels, short tunnels, refusals and resets for N
minutes against a proxy in a child process, printing its RSS, fds and threads at intervals;
exits 1 when they grow. Loopback only. Not run by CI (minutes long); see the README's figures.

    python scripts/soak.py --minutes 10 [--interval 30] [--workers 6] [--socks5]

Growth is judged after a warm-up (the first interval): at the end, fds and threads must be
back within a small margin of the warm-up sample, and RSS within 25 % + 16 MiB of it (the
allocator keeps some of a peak; a leak grows with time, this margin does not).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

CHILD = r"""
import sys
from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig
cls = BuiltInSocks5Proxy if sys.argv[1] == "socks5" else BuiltInProxy
handle = cls(Filter(["127.0.0.1"]), upstream=UpstreamConfig.direct()).start()
print(handle.port, flush=True)
sys.stdin.readline()
handle.shutdown()
"""

TIMEOUT = 20.0
LINGER0 = struct.pack("ii", 1, 0)


class Echo:
    """Echo server; with ``reset`` it resets every connection at its first bytes instead."""

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                    return
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()


def open_tunnel(port: int, target: str, socks5: bool) -> tuple[socket.socket, bool]:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    host, _, p = target.rpartition(":")
    if socks5:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            return s, False
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(p).to_bytes(2, "big"))
        rep = b""
        while len(rep) < 10:
            chunk = s.recv(10 - len(rep))
            if not chunk:
                break
            rep += chunk
        return s, rep[:2] == b"\x05\x00"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    return s, head.startswith(b"HTTP/1.1 200")


def echo_through(s: socket.socket, n: int) -> None:
    payload = os.urandom(min(n, 65536))
    sent = got = 0

    def send() -> None:
        nonlocal sent
        while sent < n:
            k = min(len(payload), n - sent)
            s.sendall(payload[:k])
            sent += k
        s.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=send)
    th.start()
    while True:
        data = s.recv(262144)
        if not data:
            break
        got += len(data)
    th.join()
    if got != n:
        raise RuntimeError(f"echo came back short: {got}/{n}")


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: dict[str, int] = {}

    def add(self, key: str) -> None:
        with self.lock:
            self.c[key] = self.c.get(key, 0) + 1


def worker(port: int, echo_port: int, reset_port: int, socks5: bool, stop: threading.Event, counts: Counters,
           seed: int) -> None:
    rnd = random.Random(seed)
    ok_target = f"127.0.0.1:{echo_port}"
    while not stop.is_set():
        kind = rnd.choices(["short", "bulk", "refused", "client_reset", "server_reset", "vanish"],
                           [60, 4, 15, 8, 8, 5])[0]
        try:
            if kind == "refused":
                s, ok = open_tunnel(port, "denied.invalid:443", socks5)
                s.close()
                counts.add("refused" if not ok else "unexpected_ok")
            elif kind == "vanish":           # a client that leaves mid-handshake
                s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                s.sendall(b"\x05" if socks5 else b"CONNECT 127.0.0.1:")
                s.close()
                counts.add("vanish")
            else:
                s, ok = open_tunnel(port, f"127.0.0.1:{reset_port}" if kind == "server_reset" else ok_target, socks5)
                if not ok:
                    s.close()
                    counts.add("failed_open")
                    continue
                if kind == "short":
                    echo_through(s, rnd.randint(1, 16384))
                elif kind == "bulk":
                    echo_through(s, rnd.randint(1, 16) << 20)
                elif kind == "client_reset":
                    s.sendall(os.urandom(200000))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                elif kind == "server_reset":
                    s.sendall(os.urandom(1000))
                    try:
                        while s.recv(65536):
                            pass
                    except OSError:
                        pass
                s.close()
                counts.add(kind)
        except (OSError, RuntimeError) as e:
            counts.add(f"error:{kind}:{type(e).__name__}")


def sample(pid: int) -> tuple[float, int, int]:
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss / 1024.0, len(os.listdir(f"/proc/{pid}/fd")), threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--workers", type=int, default=6, help="client threads")
    ap.add_argument("--socks5", action="store_true", help="soak the SOCKS5 proxy instead of HTTP CONNECT")
    args = ap.parse_args()

    echo = Echo()
    resetter = Echo(reset=True)
    child = subprocess.Popen([sys.executable, "-c", CHILD, "socks5" if args.socks5 else "http"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    port = int(child.stdout.readline())
    stop = threading.Event()
    counts = Counters()
    threads = [threading.Thread(target=worker, args=(port, echo.port, resetter.port, args.socks5, stop, counts, i), daemon=True)
               for i in range(args.workers)]
    for th in threads:
        th.start()
    samples = []
    start = time.monotonic()
    end = start + args.minutes * 60
    print(f"soak: {args.minutes} min, {args.workers} clients, {'SOCKS5' if args.socks5 else 'HTTP CONNECT'}"
          f" proxy pid {child.pid}", flush=True)
    while time.monotonic() < end:
        stop.wait(min(args.interval, max(0.0, end - time.monotonic())))
        rss, fds, nth = sample(child.pid)
        samples.append((rss, fds, nth))
        with counts.lock:
            total = sum(v for k, v in counts.c.items() if not k.startswith("error"))
            errors = sum(v for k, v in counts.c.items() if k.startswith("error"))
        print(f"t={time.monotonic() - start:6.0f}s rss={rss:7.1f}MiB fds={fds:4d} threads={nth:3d} "
              f"done={total} errors={errors}", flush=True)
    stop.set()
    for th in threads:
        th.join(TIMEOUT * 2)
    time.sleep(1.0)                 # let the last tunnels' completions land (a final sample, not a wait)
    final = sample(child.pid)
    print(f"final: rss={final[0]:.1f}MiB fds={final[1]} threads={final[2]}")
    print("counts:", dict(sorted(counts.c.items())))
    child.stdin.write("\n")
    child.stdin.flush()
    child.wait(TIMEOUT)

    base = samples[0]
    failures = []
    if final[1] > base[1] + 8:
        failures.append(f"fds grew: {base[1]} -> {final[1]}")
    if final[2] > base[2] + 2:
        failures.append(f"threads grew: {base[2]} -> {final[2]}")
    if final[0] > base[0] * 1.25 + 16:
        failures.append(f"RSS grew: {base[0]:.1f} -> {final[0]:.1f} MiB")
    if child.returncode != 0:
        failures.append(f"proxy exited {child.returncode}")
    unexpected = {k: v for k, v in counts.c.items() if k.startswith("error:short") or k.startswith("error:bulk")
                  or k in ("unexpected_ok", "failed_open")}
    if unexpected:
        failures.append(f"tunnels that should have worked did not: {unexpected}")
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Real peers for the tests: loopback echo / HTTP(S) servers, raw proxy clients, tinyproxy.

Everything binds 127.0.0.1 port 0 and is torn down by its fixture; nothing sleeps to wait.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

DEADLINE = 10.0


class EchoServer:
    """A threaded TCP echo server on 127.0.0.1 (or ::1): echoes, half-closes on EOF."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = f"hello from {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class WebServer:
    """A threaded HTTP or HTTPS server on 127.0.0.1:0 answering ``hello from <path>``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def require_tool(name: str) -> str:
    """Path of an external program a test needs.

    Missing, it fails the test where ``KODARELAY_REQUIRE_PEERS=1`` (scripts/test.sh sets it,
    after installing the peers) and skips it elsewhere (e.g. inside a manylinux container).
    """
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        if os.environ.get("KODARELAY_REQUIRE_PEERS", "") == "1":
            pytest.fail(f"{name} is required (KODARELAY_REQUIRE_PEERS=1) but not installed")
        pytest.skip(f"{name} not installed")
    return path


_HELD: list[socket.socket] = []


def dead_port() -> int:
    """A loopback port with nothing listening on it. It stays bound (never listening) on
    127.0.0.1 and, where it can be, on ::1 for the rest of the run: nobody else takes it
    meanwhile, and no connect can pick it as its own source port (a TCP self-connect would
    make the "dead" port answer)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    _HELD.append(probe)
    try:
        v6 = socket.socket(socket.AF_INET6)
    except OSError:
        return port
    try:
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::1", port))
    except OSError:
        v6.close()
        return port
    _HELD.append(v6)
    return port


def pinned(mapping: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A resolver for the proxies that knows only ``mapping`` (anything else: OSError)."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in mapping:
            raise OSError(f"no such host {host}")
        return mapping[host]

    return resolve


def recv_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def connect(port: int, timeout: float = DEADLINE) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def http_connect(port: int, target: str, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """Send ``CONNECT target`` to the proxy; returns the socket and the response head."""
    s = connect(port)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    return s, read_head(s)


def read_head(s: socket.socket) -> bytes:
    """A response head, byte by byte (nothing after it is consumed)."""
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            break
        head += b
    return head


def status_of(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1


def socks5_connect(port: int, host: bytes, dport: int, atyp: int = 3) -> tuple[socket.socket, bytes]:
    """Greeting + CONNECT to the SOCKS5 proxy; returns the socket and the 10-byte reply."""
    s = connect(port)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    if atyp == 3:
        addr = bytes([len(host)]) + host
    else:
        addr = host
    s.sendall(bytes([5, 1, 0, atyp]) + addr + dport.to_bytes(2, "big"))
    return s, recv_exact(s, 10)


def wait_until(pred, timeout: float = DEADLINE, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``pred`` with a deadline (for state that has no event to wait on)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def tinyproxy(tmp: Path, basic_auth: tuple[str, str] | None = None) -> Iterator[int]:
    """Run Debian's tinyproxy on loopback as a corporate upstream; yields its port."""
    import shutil

    from kodarelay import pick_ephemeral_port

    exe = shutil.which("tinyproxy")
    assert exe is not None
    port = pick_ephemeral_port()
    conf = tmp / "tinyproxy.conf"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        "MaxClients 200",
        "Allow 127.0.0.1",
        "LogLevel Critical",
        f"LogFile \"{tmp / 'tinyproxy.log'}\"",
        "DisableViaHeader Yes",
    ]
    if os.geteuid() == 0:
        lines += ["User nobody", "Group nogroup"]
    if basic_auth:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    (tmp / "tinyproxy.log").touch()
    os.chmod(tmp, 0o777)
    os.chmod(tmp / "tinyproxy.log", 0o666)
    proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def bound() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"tinyproxy exited {proc.returncode}: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            return not port_is_closed(port)

        wait_until(bound, what="tinyproxy to bind")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CannedProxy:
    """An upstream HTTP proxy on loopback that answers every CONNECT with ``reply`` (a head,
    maybe with bytes after it), then echoes; ``requests`` holds each request head it read,
    ``accepted`` counts connections. One thread per connection."""

    def __init__(self, reply: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n") -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(DEADLINE)
                self.requests.append(recv_until(conn, b"\r\n\r\n"))
                conn.sendall(self.reply)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()

"""An origin web server for the forwarding tests: every framing a proxy must keep, and a record
of what reached it (so a test can assert a refused request never did)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading

from peers import connect, read_head, recv_exact


#: Responses an origin can be asked for verbatim (``/raw/<name>``): shapes a proxy must not relay as they are.
RAW_RESPONSES = {
    "connection-content-length": b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    "connection-transfer-encoding": (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Transfer-Encoding\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "te-and-length": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n"),
    "trailer-obs-fold": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                         b"X-A: 1\r\n folded: into-x-a\r\n\r\n"),
    "trailer-framing": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                        b"X-Sum: 5\r\nContent-Length: 9\r\nSet-Cookie: a=b\r\n\r\n"),
}


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_OriginHTTPServer"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, *args: object) -> None:
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.seen.append((self.command, self.path, self.request_version, dict(self.headers.items()),
                                     [k.lower() for k in self.headers.keys()]))

    def _send(self, code: int, body: bytes, **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        if "no_length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            if k != "no_length":
                self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self._record()
        self._send(200, f"hello from {self.path}\n".encode())

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        path = self.path.split("?", 1)[0]
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Sum")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Sum: 3\r\n\r\n")
        elif path.startswith("/raw/"):        # a canned response, byte for byte
            self.wfile.write(RAW_RESPONSES[path[len("/raw/"):]])
            self.wfile.flush()
            self.close_connection = True
        elif path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif path in ("/204", "/304"):
            self.send_response(int(path[1:]))
            self.end_headers()
        elif path.startswith("/bytes/"):
            n = int(path[len("/bytes/"):])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * (1 << 20)
            while n:
                k = min(n, len(block))
                self.wfile.write(block[:k])
                n -= k
        elif path == "/forever":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            self.wfile.write(b"start")
            self.wfile.flush()
            self.server.stop.wait(30)
            self.close_connection = True
        else:
            self._send(200, f"hello from {self.path}\n".encode())

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        digest = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    left -= len(data)
                n += size
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                n += len(data)
                left -= len(data)
        self._send(200, f"{n} {digest.hexdigest()}".encode())

    do_PUT = do_POST


class _OriginHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, str, dict[str, str], list[str]]] = []
        self.connections = 0
        self.stop = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        pass        # clients the proxy cut off (idle tests) are expected here


class Origin:
    """A threaded HTTP/1.1 origin on 127.0.0.1:0 (``localhost``)."""

    def __init__(self) -> None:
        self.httpd = _OriginHTTPServer()
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def seen(self) -> list[tuple[str, str, str, dict[str, str], list[str]]]:
        with self.httpd.lock:
            return list(self.httpd.seen)

    @property
    def connections(self) -> int:
        with self.httpd.lock:
            return self.httpd.connections

    def close(self) -> None:
        self.httpd.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One response with a Content-Length (or none): (head, body)."""
    head = read_head(s)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, recv_exact(s, length)


def send_raw(port: int, data: bytes) -> socket.socket:
    s = connect(port)
    s.sendall(data)
    return s

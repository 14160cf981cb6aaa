"""An HTTPS origin for inspection tests: says what it received, takes bodies, upgrades."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/big/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = bytes(range(256)) * 256
            left = n
            while left:
                piece = chunk[: min(left, len(chunk))]
                self.wfile.write(piece)
                left -= len(piece)
            return
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    return
                self.connection.sendall(data.upper())
        echoed = self.headers.get("X-Echo")
        out = json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                          "body": len(body), "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        if echoed:
            self.send_header("X-Echo", echoed)
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, *args: object) -> None:
        pass


class _TlsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = self.socket.accept()
        # the handshake happens in the connection's own thread, on its first read
        return self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr


class Origin:
    """A threaded HTTPS origin on 127.0.0.1:0 answering JSON of what it received."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.httpd = _TlsServer(("127.0.0.1", 0), _Handler)
        self.httpd.tls = tls
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""Run ``kodarelay run ARGS`` inside a network namespace of the test's own, with sites on
127.0.0.1:80 (HTTP) and 127.0.0.1:443 (HTTPS, a ``trustme`` certificate for NAME): capture's
web ports need real sites on them, and the host's loopback ports 80 / 443 are nobody's to
take. Started by ``test_capture.py`` as ``unshare --net python capture_netns.py NAME CA_FILE
-- ARGS``; prints one JSON object: kodarelay's exit code, stdout and stderr, and the
requests each site saw (path and Host)."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading

import trustme

from kodarelay.isolate import loopback_up


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append((self.path, self.headers.get("Host", "")))
        body = f"hello from {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _site(port: int, tls: ssl.SSLContext | None, seen: list[tuple[str, str]]) -> http.server.ThreadingHTTPServer:
    handler = type("H", (_Handler,), {"seen": seen})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


def main() -> int:
    name, ca_file = sys.argv[1], sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1:]
    loopback_up()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(ca_file)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(tls)
    plain: list[tuple[str, str]] = []
    secure: list[tuple[str, str]] = []
    sites = [_site(80, None, plain), _site(443, tls, secure)]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out = subprocess.run([sys.executable, "-m", "kodarelay", "run", *args], capture_output=True, text=True, env=env,
                         timeout=60)
    for s in sites:
        s.shutdown()
        s.server_close()
    print(json.dumps({"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr, "http": plain,
                      "https": secure}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start kodarelay's proxy and watch it admit one host and refuse another (loopback only).

    python examples/quickstart.py
"""

from __future__ import annotations

import http.client
import http.server
import threading

import kodarelay
from kodarelay import BuiltInProxy, Filter, UpstreamConfig


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello from a site on the allowlist\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def fetch_through(proxy_port: int, host: str, port: int) -> str:
    """GET / on host:port through an HTTP CONNECT tunnel, as curl -p or pip would."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    conn.set_tunnel(host, port)
    try:
        conn.request("GET", "/")
        return f"200 {conn.getresponse().read().decode().strip()!r}"
    except OSError as e:  # http.client reports a refused CONNECT as OSError("Tunnel connection failed: 403 ...")
        return str(e)
    finally:
        conn.close()


def main() -> None:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    policy = Filter(["localhost"])
    with BuiltInProxy(policy, upstream=UpstreamConfig.direct()).start() as proxy:
        print(f"kodarelay {kodarelay.__version__} (relay: {kodarelay.IMPLEMENTATION}) on 127.0.0.1:{proxy.port}, allow: localhost")
        print(f"  localhost:{site.server_address[1]:<6}  -> {fetch_through(proxy.port, 'localhost', site.server_address[1])}")
        print(f"  blocked.example:443 -> {fetch_through(proxy.port, 'blocked.example', 443)}")
        for v in proxy.violations():
            print(f"  violation recorded: {v.protocol} {v.host}:{v.port} ({v.reason})")
    site.shutdown()


if __name__ == "__main__":
    main()

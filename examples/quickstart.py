"""kodarelay's main job in one go, on loopback only: fence a command, admit one host, refuse another.

    python examples/quickstart.py

It starts a small web site on 127.0.0.1, then runs

    kodarelay run --allow localhost -- python fetch.py http://localhost:PORT/ http://blocked.example/

where fetch.py is any program that honours HTTPS_PROXY (here: Python's http.client, which
tunnels through CONNECT like curl -p). kodarelay passes the command's exit status through and
prints what it refused.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import tempfile
import threading

FETCH = r"""
import http.client, os, sys, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
failures = 0
for url in sys.argv[1:]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=10)
    conn.set_tunnel(u.hostname, u.port or 80)
    try:
        conn.request("GET", u.path or "/")
        print(f"  fetched {url}: {conn.getresponse().read().decode().strip()!r}")
    except OSError as e:
        failures += 1
        print(f"  refused {url}: {e}")
sys.exit(failures)
"""


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello from a site on the allowlist\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    port = site.server_address[1]
    cmd = [sys.executable, "-m", "kodarelay", "run", "--allow", "localhost", "--upstream", "direct", "--",
           sys.executable, "-c", FETCH, f"http://localhost:{port}/", "http://blocked.example/"]
    print("$ kodarelay run --allow localhost -- python fetch.py "
          f"http://localhost:{port}/ http://blocked.example/", flush=True)
    # From a neutral directory, so `-m kodarelay` imports the installed package (with its
    # compiled relay), not a source checkout that happens to be the working directory.
    status = subprocess.run(cmd, cwd=tempfile.gettempdir()).returncode
    print(f"exit status {status} (the command's own: one URL was refused)")
    site.shutdown()
    return 0 if status == 1 else 1


if __name__ == "__main__":
    sys.exit(main())

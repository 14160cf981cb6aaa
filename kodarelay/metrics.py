"""Prometheus metrics of one proxy: counted as decisions are made, served in the text format.

``metrics=("127.0.0.1", port)`` (``--metrics [HOST:]PORT``) serves ``/metrics`` from a thread
of kodarelay's own (port 0 picks one: ``ProxyHandle.metrics_port``). Names and labels:

* ``kodarelay_tunnels_total{client,protocol,decision}`` (tunnels: CONNECT and SOCKS5),
* ``kodarelay_requests_total{client,method,decision}`` (forwarded and inspected requests),
* ``kodarelay_refusals_total{client,reason}``, ``kodarelay_bytes_total{client,direction}``
  (``up``: client to origin, ``down``), ``kodarelay_tunnels_open{client}``,
  ``kodarelay_handshakes_open``, ``kodarelay_decision_seconds`` (histogram),
  ``kodarelay_policy_reloads_total{result}`` (``ok`` / ``error``).

``decision`` is ``allow`` or ``refuse``; no client is ``client=""``; beyond 1,000 distinct
client names the rest count as ``client="other"``. Label values are escaped (``\\``, ``"``,
newline). Tunnels the engine serves from its cached plans without the GIL are counted by the
engine (``_NativeListener.engine_counters``: per known client and protocol, bytes, open) and
added at each scrape; ``kodarelay_decision_seconds`` times Python's decisions (a cached plan
takes microseconds and is not timed).
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .serving import ProxyServer, Target, Ticket

log = logging.getLogger(__name__)

MAX_CLIENTS = 1000
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The counters of one server (thread-safe) and their text exposition."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._lock = threading.Lock()
        self._clients: set[str] = set()
        self.tunnels: dict[tuple[str, str, str], int] = defaultdict(int)
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.refusals: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.open: dict[str, int] = defaultdict(int)
        self.reloads: dict[str, int] = defaultdict(int)
        self._hist = [0] * (len(BUCKETS) + 1)
        self._hist_sum = 0.0
        self._httpd: http.server.ThreadingHTTPServer | None = None

    def _client(self, name: str | None) -> str:
        """The label of a client (under the lock)."""
        if not name:
            return ""
        if name in self._clients:
            return name
        if len(self._clients) >= MAX_CLIENTS:
            return "other"
        self._clients.add(name)
        return name

    # ── counting ─────────────────────────────────────────────────────────────

    def decided(self, seconds: float) -> None:
        with self._lock:
            for i, le in enumerate(BUCKETS):
                if seconds <= le:
                    self._hist[i] += 1
                    break
            else:
                self._hist[-1] += 1
            self._hist_sum += seconds

    def judged(self, proto: str, target: Target, refused: str | None) -> None:
        """A tunnel or request refused (``refused``: its reason) or allowed (None)."""
        decision = "refuse" if refused is not None else "allow"
        with self._lock:
            client = self._client(target.client)
            if target.method == "CONNECT":
                if refused is not None:
                    self.tunnels[(client, proto, decision)] += 1
            else:
                self.requests[(client, target.method, decision)] += 1

    def allowed(self, ticket: Ticket) -> None:
        """An allowed tunnel's allow event (every front-end passes here)."""
        if ticket.method != "CONNECT":
            return
        with self._lock:
            client = self._client(ticket.client)
            self.tunnels[(client, ticket.protocol, "allow")] += 1
            self.open[client] += 1

    def rejected(self, proto: str, client: str | None) -> None:
        """A handshake refused before any policy (malformed, unsupported)."""
        with self._lock:
            self.tunnels[(self._client(client), proto, "refuse")] += 1

    def refused(self, client: str | None, reason: str) -> None:
        with self._lock:
            self.refusals[(self._client(client), reason)] += 1

    def ended(self, ticket: Ticket, moved: tuple[int, int] | None) -> None:
        with self._lock:
            client = self._client(ticket.client)
            if ticket.method == "CONNECT" and self.open.get(client, 0) > 0:
                self.open[client] -= 1
            if moved is not None:
                self.bytes[(client, "up")] += moved[0]
                self.bytes[(client, "down")] += moved[1]

    def policy_reloaded(self, ok: bool) -> None:
        with self._lock:
            self.reloads["ok" if ok else "error"] += 1

    # ── the text format ──────────────────────────────────────────────────────

    def _with_engine(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int], dict[str, int]]:
        """Python's tunnel, byte and open counts plus the engine's (under the lock)."""
        tunnels, nbytes, opened = dict(self.tunnels), dict(self.bytes), dict(self.open)
        front = getattr(self._server, "_front", None)
        counters = front.engine_counters() if front is not None and hasattr(front, "engine_counters") else {}
        for name, (http, socks, up, down, now_open) in counters.items():
            client = self._client(name)
            for proto, n in (("http", http), ("socks5", socks)):
                if n:
                    key = (client, proto, "allow")
                    tunnels[key] = tunnels.get(key, 0) + n
            for direction, n in (("up", up), ("down", down)):
                if n:
                    nbytes[(client, direction)] = nbytes.get((client, direction), 0) + n
            if now_open or client in opened:
                opened[client] = opened.get(client, 0) + now_open
        return tunnels, nbytes, opened

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, helptext: str) -> None:
            out.append(f"# HELP {name} {helptext}")
            out.append(f"# TYPE {name} {kind}")

        def labels(**kv: str) -> str:
            return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"

        with self._lock:
            tunnels, nbytes, opened = self._with_engine()
            family("kodarelay_tunnels_total", "counter", "Tunnels (CONNECT, SOCKS5) by client, protocol and decision.")
            for (c, p, d), n in sorted(tunnels.items()):
                out.append(f"kodarelay_tunnels_total{labels(client=c, protocol=p, decision=d)} {n}")
            family("kodarelay_requests_total", "counter", "Forwarded and inspected requests by client, method and "
                   "decision.")
            for (c, m, d), n in sorted(self.requests.items()):
                out.append(f"kodarelay_requests_total{labels(client=c, method=m, decision=d)} {n}")
            family("kodarelay_refusals_total", "counter", "Refusals by client and reason.")
            for (c, r), n in sorted(self.refusals.items()):
                out.append(f"kodarelay_refusals_total{labels(client=c, reason=r)} {n}")
            family("kodarelay_bytes_total", "counter", "Bytes relayed by client and direction (up: to the origin).")
            for (c, d), n in sorted(nbytes.items()):
                out.append(f"kodarelay_bytes_total{labels(client=c, direction=d)} {n}")
            family("kodarelay_tunnels_open", "gauge", "Open tunnels by client.")
            for c, n in sorted(opened.items()):
                out.append(f"kodarelay_tunnels_open{labels(client=c)} {n}")
            family("kodarelay_handshakes_open", "gauge", "Connections still in their handshake.")
            out.append(f"kodarelay_handshakes_open {len(self._server._handshaking)}")
            family("kodarelay_decision_seconds", "histogram", "Time to decide a tunnel or request.")
            total = 0
            for le, n in zip(BUCKETS, self._hist):
                total += n
                out.append(f'kodarelay_decision_seconds_bucket{{le="{le:g}"}} {total}')
            total += self._hist[-1]
            out.append(f'kodarelay_decision_seconds_bucket{{le="+Inf"}} {total}')
            out.append(f"kodarelay_decision_seconds_sum {self._hist_sum:.6f}")
            out.append(f"kodarelay_decision_seconds_count {total}")
            family("kodarelay_policy_reloads_total", "counter", "Policy reloads by result.")
            for r in ("ok", "error"):
                out.append(f'kodarelay_policy_reloads_total{{result="{r}"}} {self.reloads.get(r, 0)}')
        return "\n".join(out) + "\n"

    # ── serving ─────────────────────────────────────────────────────────────

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a thread of its own; returns the port."""
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics.render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="kodarelay-metrics", daemon=True,
                         kwargs={"poll_interval": 0.2}).start()
        log.info("metrics on http://%s:%d/metrics", host, httpd.server_address[1])
        return int(httpd.server_address[1])

    @property
    def port(self) -> int | None:
        return int(self._httpd.server_address[1]) if self._httpd is not None else None

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


__all__ = ["Metrics"]

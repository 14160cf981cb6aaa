"""``ProxyHandle``: one lifecycle object for every kind of proxy kodarelay starts.

A handle owns a *stop* callable supplied by whoever started the proxy. ``shutdown()`` runs
it at most once, from any thread, with or without a running event loop; the same happens
when the handle is garbage-collected or the interpreter exits (``weakref.finalize``), so a
forgotten handle never leaves a proxy or its child processes behind.
"""

from __future__ import annotations

import logging
import os
import weakref
from types import TracebackType
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


def _run_stop(stop: Callable[[], None], what: str) -> None:
    try:
        stop()
    except Exception:  # a stop failure must not escape a finalizer or a context exit
        log.exception("stopping %s failed", what)


class ProxyHandle:
    """A running proxy: its port, kind, CA bundle and UDS path, and how to stop it.

    ``kind`` is ``"external"`` or ``"builtin"``. ``ca_bundle`` is the MITM CA bundle clients
    must trust (None for both kinds today). ``uds_path`` is the UDS bridge of the built-in
    HTTP proxy on Linux, else None.
    """

    #: the capture socket beside the UDS bridge (``BuiltInProxy(..., capture=True)``), else None
    capture_path: str | None = None

    def __init__(
        self,
        port: int,
        kind: str,
        stop: Callable[[], None],
        *,
        ca_bundle: str | os.PathLike[str] | None = None,
        uds_path: str | os.PathLike[str] | None = None,
        violations: Callable[[], Sequence[Any]] | None = None,
        socks5_port: int | None = None,
        servers: Sequence[Any] = (),
    ) -> None:
        if kind not in ("external", "builtin"):
            raise ValueError(f"kind must be 'external' or 'builtin', not {kind!r}")
        self.port = port
        self.kind = kind
        self.ca_bundle = ca_bundle
        self.uds_path = uds_path
        self.socks5_port = socks5_port
        self._violations = violations
        self._servers = list(servers)
        # The finalizer must not reference self, or the handle could never be collected.
        self._finalizer = weakref.finalize(self, _run_stop, stop, f"{kind} proxy on port {port}")

    @property
    def alive(self) -> bool:
        """False once ``shutdown()`` has run (or started running)."""
        return self._finalizer.alive

    def shutdown(self) -> None:
        """Stop the proxy. Idempotent and thread-safe; later calls do nothing."""
        self._finalizer()

    def violations(self) -> list[Any]:
        """The refusals the proxy recorded, oldest first (empty for an external proxy)."""
        return list(self._violations()) if self._violations is not None else []

    @property
    def refused_total(self) -> int:
        """How many refusals the proxy counted, those whose details did not fit the ring (or
        came faster than they could be recorded) included; 0 for an external proxy."""
        return sum(server.violation_log.total for server in self._servers)

    @property
    def filter(self) -> Any:
        """The filter the proxy judges by now (None for an external proxy)."""
        return self._servers[0].filter if self._servers else None

    def set_filter(self, filter: Any) -> None:
        """Judge the next request by ``filter`` (any thread): cached decisions are dropped
        first, live tunnels keep running. An external proxy has no filter to set."""
        if not self._servers:
            raise TypeError(f"a {self.kind} proxy has no filter kodarelay can replace")
        for server in self._servers:
            server.set_filter(filter)

    def set_clients(self, clients: Sequence[Any], require_auth: bool | None = None) -> None:
        """Replace the named clients' policies (``kodarelay.ClientPolicy``, any thread): the
        next request is judged by them; open tunnels keep running and keep their counts."""
        if not self._servers:
            raise TypeError(f"a {self.kind} proxy has no clients kodarelay can replace")
        for server in self._servers:
            server.set_clients(clients, require_auth)

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (``metrics=``), else None."""
        for server in self._servers:
            port = server.metrics.port
            if port is not None:
                return int(port)
        return None

    def __enter__(self) -> ProxyHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    async def __aenter__(self) -> ProxyHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<ProxyHandle {self.kind} port={self.port} {state}>"

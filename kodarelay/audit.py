"""What the command does with events: JSON lines (``--events``), learn mode (``--learn``) and
the allowed-connection count in ``run``'s summary. Host and port only, never a path or query.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import IO, Callable, Iterable

from .events import Event, Request

log = logging.getLogger(__name__)


def _target(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


class JsonLines:
    """``on_event`` that writes one JSON object per event and line (``-``: stderr)."""

    def __init__(self, path: str) -> None:
        self._own = path != "-"
        #: the file written (None for stderr)
        self.path: str | None = path if self._own else None
        self._out: IO[str] = open(path, "a", encoding="utf-8", buffering=1) if self._own else sys.stderr

    def __call__(self, event: Event) -> None:
        self._out.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()


class Tally:
    """Counts allowed tunnels and the hosts they went to (for ``run``'s summary)."""

    def __init__(self) -> None:
        self.allowed = 0
        self.hosts: set[str] = set()
        self.seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if event.kind != "allow":
            return
        with self._lock:
            self.allowed += 1
            self.hosts.add(event.host)
            if event.port is not None:
                self.seen.add((event.host, event.port))

    def line(self) -> str | None:
        if not self.allowed:
            return None
        n, m = self.allowed, len(self.hosts)
        return f"allowed {n} connection{'s' if n != 1 else ''} to {m} host{'s' if m != 1 else ''}"

    def destinations(self) -> list[tuple[str, int]]:
        """Every (host, port) a tunnel was admitted to, sorted."""
        with self._lock:
            return sorted(self.seen)


async def admit_all(request: Request) -> str:
    """Learn mode's decider: admit what no rule matched (deny rules and the guard still refuse)."""
    return "allow"


def fan_out(callbacks: Iterable[Callable[[Event], None]]) -> Callable[[Event], None]:
    """One ``on_event`` calling several, in order; one that raises does not starve the rest."""
    targets = list(callbacks)

    def call(event: Event) -> None:
        for cb in targets:
            try:
                cb(event)
            except Exception:
                log.exception("event consumer %r failed", cb)

    return call


__all__ = ["JsonLines", "Tally", "admit_all", "fan_out"]

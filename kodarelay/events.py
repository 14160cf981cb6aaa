"""What the proxy tells its embedder: the request a decider is asked about, and the event stream.

``Request`` is what a decider sees; ``Event`` is one line of the audit stream (an allow, a
refusal, or the end of a tunnel with its byte counts). Events are handed to ``on_event`` on
one thread of kodarelay's own, in order, through a bounded queue: a slow callback delays
later events, never traffic or decisions, and when the queue is full the newest events are
dropped and counted (a flood of refusals cannot grow memory without bound).

Only host and port ever appear here: never a path, query string or credentials.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Optional, Union

log = logging.getLogger(__name__)

Answer = Literal["allow", "deny", "allow_always", "deny_always"]
#: ``async def decider(request) -> "allow" | "deny" | "allow_always" | "deny_always"``
#: (``True`` / ``False`` mean allow / deny).
Decider = Callable[["Request"], Awaitable[Union[Answer, bool]]]
OnEvent = Callable[["Event"], None]


@dataclass(frozen=True)
class Request:
    """A request the policy judges: ``protocol`` "http" / "socks5", ``method`` "CONNECT" or the
    forwarded method, ``host`` canonical text, ``port``, ``client`` (attribution) or None, and
    ``path`` (never the query) when one request of a host with request rules is asked about."""

    protocol: str
    method: str
    host: str
    port: int
    client: Optional[str] = None
    path: Optional[str] = None


@dataclass(frozen=True)
class Event:
    """One decision or tunnel end. ``kind`` is "allow", "refuse" or "end"; ``source`` says what
    decided ("rule", "guard", "decider" or "default"); ``tunnel_id`` links an allow to its end;
    ``bytes_up`` / ``bytes_down`` / ``duration`` are set on "end" only."""

    time: float
    kind: str
    protocol: str
    method: str
    host: str
    port: Optional[int]
    client: Optional[str] = None
    reason: Optional[str] = None
    rule: Optional[str] = None
    source: Optional[str] = None
    tunnel_id: Optional[int] = None
    bytes_up: Optional[int] = None
    bytes_down: Optional[int] = None
    duration: Optional[float] = None
    #: more about ``reason`` (e.g. "upstream refused (403)"); never a path or query
    detail: Optional[str] = None
    #: the request's path, never its query (None for a tunnel's own events)
    path: Optional[str] = None
    #: whether the request was read decrypted (a tunnel's bytes are not)
    inspected: bool = False
    #: the origin's status for a forwarded or inspected request's end
    status: Optional[int] = None
    #: the names of the secrets swapped into the request
    secrets: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The event as a JSON object (None fields left out)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if v is not None and v != () and not (k == "inspected" and v is False)}


_tunnel_ids = itertools.count(1)


def next_tunnel_id() -> int:
    """A process-wide unique tunnel id (``itertools.count`` is atomic under the GIL)."""
    return next(_tunnel_ids)


class EventStream:
    """Delivers events to ``on_event`` on a daemon thread, in order, never blocking the caller."""

    def __init__(self, on_event: OnEvent, capacity: int = 65536) -> None:
        self._on_event = on_event
        self._queue: queue.Queue[Event | None] = queue.Queue(capacity)
        self.dropped = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="kodarelay-events", daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10000 == 0:
                log.warning("on_event is too slow: %d events dropped", self.dropped)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event callback failed")

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop the thread (waits up to ``timeout``)."""
        thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        if thread is not threading.current_thread():
            thread.join(timeout)


__all__ = ["Request", "Event", "EventStream", "Decider", "OnEvent", "Answer", "next_tunnel_id"]

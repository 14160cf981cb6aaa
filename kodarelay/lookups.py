"""The threads blocking name lookups run on: never a queue behind lookups that hang.

``getaddrinfo`` blocks, and a name whose DNS never answers holds its thread until the system
resolver gives up (often 10-30 s). A fixed pool lets a flood of such names (100 new ones a
second) fill every thread, and a name that would resolve at once (``/etc/hosts``) then waits
behind them. The design, in three rules:

* **A thread per lookup in flight.** A lookup takes an idle thread if one waits, else a new
  one, up to ``MAX_LOOKUP_THREADS`` (bounded growth: a parked lookup costs a thread and the
  few stack pages it touched). Idle threads exit after ``IDLE_EXIT`` seconds, so a flood
  leaves nothing behind.
* **A share per zone.** Names that never answer come from zones whose name servers never
  answer, so the lookups of one zone (``zone_of``: the name's registrable part, roughly its
  last two labels) run at most ``PER_ZONE`` at a time; the rest of that zone waits in the
  zone's own queue, never in front of another zone's lookups. A flood of hung names in one
  zone holds ``PER_ZONE`` threads, whatever its size, and delays only names of that zone.
* **Fresh zones first.** When every thread is taken, the next free thread goes to the waiting
  zone with the fewest lookups running, so a name of a quiet zone is next, not behind the
  flood's backlog.

Each lookup has a deadline: the caller's (``Dialer.resolve`` waits ``connect_timeout``); a
lookup still queued when its caller gave up is dropped, never run. A lookup's zone is read
from ``lookup_zone`` (a context variable ``Dialer.resolve`` sets around the resolver), so a
``resolver=`` hook that runs its blocking calls on ``resolver_pool()`` through
``run_in_executor`` gets the same shares. A submission made outside any lookup (zone None)
has no share limit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

MAX_LOOKUP_THREADS = 1024
IDLE_EXIT = 10.0
PER_ZONE = 16

#: the zone of the lookup being made in this context (set by ``Dialer.resolve``)
lookup_zone: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("kodarelay_lookup_zone", default=None)

#: second-level labels under which registrations are made (``example.co.uk``): a zone there
#: is the last three labels
_REGISTRY_LABELS = frozenset({"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go", "gob", "mil"})


def zone_of(name: str) -> str:
    """The part of ``name`` one party registers, roughly: its last two labels, three under a
    country's registry label (``co.uk``, ``com.au``). Only used to share lookup threads
    fairly, never to decide anything."""
    labels = name.lower().rstrip(".").split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if len(labels[-1]) == 2 and labels[-2] in _REGISTRY_LABELS:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


_Item = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Zone:
    __slots__ = ("key", "limit", "running", "waiting", "ready")

    def __init__(self, key: Optional[str], limit: int) -> None:
        self.key = key
        self.limit = limit
        self.running = 0
        self.waiting: collections.deque[_Item] = collections.deque()
        self.ready = False              # in the pool's ready list


class LookupPool(concurrent.futures.Executor):
    """An executor with a thread per task in flight and a share per zone (see the module doc)."""

    def __init__(self, max_threads: int = MAX_LOOKUP_THREADS, idle_exit: float = IDLE_EXIT,
                 name: str = "kodarelay-dns", per_zone: int = PER_ZONE) -> None:
        self._max = max_threads
        self._idle_exit = idle_exit
        self._name = name
        self._per_zone = per_zone
        self._cv = threading.Condition(threading.Lock())
        self._zones: dict[Optional[str], _Zone] = {}     # zones with lookups running or waiting
        self._ready: list[_Zone] = []                     # zones with a lookup that may start now
        self._threads = 0
        self._sleeping = 0
        self._wakeups = 0                                  # sleepers already told to wake
        self._shutdown = False
        self._last_full_log = 0.0

    @property
    def threads(self) -> int:
        return self._threads

    def stats(self) -> dict[str, int]:
        """Threads, lookups running and waiting (read racily, for tests and logs)."""
        with self._cv:
            return {"threads": self._threads, "running": sum(z.running for z in self._zones.values()),
                    "waiting": sum(len(z.waiting) for z in self._zones.values()), "zones": len(self._zones)}

    def running_in(self, zone: str) -> int:
        """Lookups of ``zone`` running now."""
        with self._cv:
            z = self._zones.get(zone)
            return z.running if z is not None else 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        key = lookup_zone.get()
        with self._cv:
            if self._shutdown:
                raise RuntimeError("cannot schedule new lookups after shutdown")
            zone = self._zones.get(key)
            if zone is None:
                zone = self._zones[key] = _Zone(key, self._per_zone if key is not None else self._max)
            elif len(zone.waiting) >= 256 and len(zone.waiting) % 256 == 0:
                # callers that gave up leave cancelled lookups behind: drop them now and then
                zone.waiting = collections.deque(i for i in zone.waiting if not i[0].cancelled())
            zone.waiting.append((future, fn, args, kwargs))
            if zone.running < zone.limit and not zone.ready:
                zone.ready = True
                self._ready.append(zone)
            if zone.running + len(zone.waiting) <= zone.limit:
                self._want_thread()               # within the zone's share: it starts now
        return future

    def _want_thread(self) -> None:
        """A lookup may start: wake a sleeping thread, else start one (caller holds the lock)."""
        if self._sleeping > self._wakeups:
            self._wakeups += 1
            self._cv.notify()
        elif self._threads < self._max:
            self._threads += 1
            try:
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
            except RuntimeError:
                self._threads -= 1     # no thread to be had: a busy one serves it when it is done
                log.warning("could not start a lookup thread (%d running)", self._threads)
        elif time.monotonic() - self._last_full_log >= 1.0:
            self._last_full_log = time.monotonic()
            log.warning("%d lookups in flight: new ones wait for a thread", self._max)

    def _take(self) -> tuple[Optional[str], _Item] | None:
        """The next lookup to run and its zone (caller holds the lock): from the ready zone
        with the fewest running, cancelled ones dropped; None when nothing may start."""
        while self._ready:
            i = min(range(len(self._ready)), key=lambda k: self._ready[k].running)
            zone = self._ready[i]
            while zone.waiting and zone.waiting[0][0].cancelled():
                zone.waiting.popleft()
            if not zone.waiting:
                self._ready.pop(i)
                zone.ready = False
                if zone.running == 0:
                    del self._zones[zone.key]
                continue
            item = zone.waiting.popleft()
            zone.running += 1
            if not zone.waiting or zone.running >= zone.limit:
                self._ready.pop(i)
                zone.ready = False
            return zone.key, item
        return None

    def _done(self, key: Optional[str]) -> None:
        """A lookup of zone ``key`` ended (caller holds the lock)."""
        zone = self._zones[key]
        zone.running -= 1
        if zone.ready:
            return
        if zone.waiting:
            zone.ready = True
            self._ready.append(zone)
        elif zone.running == 0:
            del self._zones[key]

    def _run(self) -> None:
        finished: list[Optional[str]] = []        # the zone of the lookup this thread just ran
        while True:
            with self._cv:
                if finished:
                    self._done(finished.pop())
                taken = self._take()
                while taken is None:
                    if self._shutdown:
                        self._threads -= 1
                        return
                    self._sleeping += 1
                    self._cv.wait(self._idle_exit)
                    self._sleeping -= 1
                    woken = self._wakeups > 0
                    if woken:
                        self._wakeups -= 1
                    taken = self._take()
                    if taken is None and not woken:
                        self._threads -= 1       # idle for long: leave
                        return
            key, (future, fn, args, kwargs) = taken
            finished.append(key)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)
            del taken, future, fn, args, kwargs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._shutdown = True
            self._cv.notify_all()


__all__ = ["IDLE_EXIT", "LookupPool", "MAX_LOOKUP_THREADS", "PER_ZONE", "lookup_zone", "zone_of"]

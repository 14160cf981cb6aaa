"""The threads blocking name lookups run on: one per lookup in flight, never a queue behind
a lookup that hangs.

``getaddrinfo`` blocks, and a name whose DNS never answers holds its thread until the system
resolver gives up (often 10-30 s). A fixed pool lets a flood of such names (100 new ones a
second) fill every thread, and a name that would resolve at once (``/etc/hosts``) then waits
behind them. So a lookup takes an idle thread if one waits, else a new one, up to
``MAX_LOOKUP_THREADS`` (a parked lookup costs a thread and the few stack pages it touched); only
beyond that do lookups queue (logged). Idle threads exit after ``IDLE_EXIT`` seconds, so a
flood leaves nothing behind. The hand-off follows ``ThreadPoolExecutor``'s: a thread that goes
idle posts a token; a submission that takes one is served by an idle thread, else it starts a
thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_LOOKUP_THREADS = 1024
IDLE_EXIT = 10.0


class LookupPool(concurrent.futures.Executor):
    """An executor that starts a thread whenever no idle one waits (see the module doc)."""

    def __init__(self, max_threads: int = MAX_LOOKUP_THREADS, idle_exit: float = IDLE_EXIT,
                 name: str = "kodarelay-dns") -> None:
        self._max = max_threads
        self._idle_exit = idle_exit
        self._name = name
        self._work: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...],
                                            dict[str, Any]] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0
        self._shutdown = False
        self._last_full_log = 0.0

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new lookups after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle.acquire(blocking=False):
                return future                  # an idle thread takes it
            if self._threads < self._max:
                self._threads += 1
                self._start()
            elif time.monotonic() - self._last_full_log >= 1.0:
                self._last_full_log = time.monotonic()
                log.warning("%d lookups in flight: new ones wait for a thread", self._max)
        return future

    def _start(self) -> None:
        # (default stacks: ``threading.stack_size`` is process-wide, and changing it around
        # this start would also shrink a thread another part of the process starts meanwhile;
        # a parked lookup costs its stack's touched pages only)
        try:
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        except RuntimeError:
            self._threads -= 1                 # no thread to be had: an idle or busy one serves it later
            log.warning("could not start a lookup thread (%d running)", self._threads)

    def _run(self) -> None:
        while True:
            try:
                item = self._work.get(timeout=self._idle_exit)
            except queue.Empty:
                # idle for long: leave, unless a submission already counted on this thread
                if self._idle.acquire(blocking=False):
                    with self._lock:
                        self._threads -= 1
                    return
                continue
            if item is None:                   # shutdown
                with self._lock:
                    self._threads -= 1
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:
                    future.set_exception(e)
            del item, future
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            n = self._threads
        for _ in range(n):
            self._work.put(None)


__all__ = ["IDLE_EXIT", "LookupPool", "MAX_LOOKUP_THREADS"]

"""Policy files for ``kodarelay serve|run --policy FILE``, and keeping a running proxy in step.

The format is one rule per line, ``allow PATTERN`` or ``deny PATTERN``; ``#`` starts a
comment, blank lines are ignored. A file that does not parse (or a pattern that does not)
raises ``PolicyError`` naming the line, and a watcher keeps the old policy: a typo never
opens or shuts the fence by accident. A good reload logs the rules added and removed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .filter import Filter, PatternError

log = logging.getLogger(__name__)

#: How often a watcher looks at the file (seconds).
POLL_INTERVAL = 0.5


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Policy:
    """The rules of a policy file, in order."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def filter(self, extra_allow: Iterable[str] = (), extra_deny: Iterable[str] = ()) -> Filter:
        return Filter([*self.allow, *extra_allow], [*self.deny, *extra_deny])

    def lines(self) -> list[str]:
        return [f"allow {p}" for p in self.allow] + [f"deny {p}" for p in self.deny]


def parse_policy(text: str, name: str = "<policy>") -> Policy:
    """Rules from policy-file text; ``PolicyError`` names the first bad line."""
    allow: list[str] = []
    deny: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        verb, _, pattern = line.partition(" ")
        pattern = pattern.strip()
        if verb == "read-only" and pattern:          # shorthand for allow GET,HEAD,OPTIONS HOST/*
            verb, pattern = "allow", f"read-only {pattern}"
        if verb not in ("allow", "deny") or not pattern:
            raise PolicyError(f"{name}:{number}: want 'allow PATTERN', 'deny PATTERN' or 'read-only HOST', "
                              f"got {raw.strip()!r}")
        try:
            Filter([pattern]) if verb == "allow" else Filter((), [pattern])
        except PatternError as e:
            raise PolicyError(f"{name}:{number}: {e}") from None
        (allow if verb == "allow" else deny).append(pattern)
    return Policy(tuple(allow), tuple(deny))


def load_policy(path: str | os.PathLike[str], dir_fd: int | None = None, shown: str | None = None) -> Policy:
    """Read and parse ``path`` (relative to ``dir_fd`` when given; ``shown`` names it in errors)."""
    shown = os.fspath(path) if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        with open(fd, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{shown}: {e}") from None
    return parse_policy(text, shown)


def diff(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """(rules added, rules removed), as policy-file lines."""
    before, after = old.lines(), new.lines()
    return [r for r in after if r not in before], [r for r in before if r not in after]


class PolicyWatcher:
    """Reloads ``path`` when it changes (polled) or when ``reload()`` is called (SIGHUP), and
    hands each good policy's filter to ``apply``; a bad file keeps the old policy.

    The file is always read through its directory as opened at start (an ``O_PATH`` fd), never
    by walking the path again: a fenced CMD that renames a directory on the way and puts a
    policy of its own in its place is not read (the fence keeps the file itself read-only)."""

    def __init__(self, path: str | os.PathLike[str], apply: Callable[[Filter], None],
                 extra_allow: Iterable[str] = (), extra_deny: Iterable[str] = ()) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._apply = apply
        self._extra = (tuple(extra_allow), tuple(extra_deny))
        directory, self._name = os.path.split(self.path)
        try:
            self._dir_fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise PolicyError(f"{self.path}: {e}") from None
        try:
            self.policy = load_policy(self._name, self._dir_fd, self.path)   # the first load must work
        except PolicyError:
            os.close(self._dir_fd)
            raise
        self._stamp = self._stat()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def filter(self) -> Filter:
        return self.policy.filter(*self._extra)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._name, dir_fd=self._dir_fd)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Load the file now; True when a new policy took effect."""
        with self._lock:
            self._stamp = self._stat()
            try:
                new = load_policy(self._name, self._dir_fd, self.path)
                flt = new.filter(*self._extra)
            except (PolicyError, PatternError) as e:
                log.error("policy not reloaded, keeping the old one: %s", e)
                return False
            added, removed = diff(self.policy, new)
            self._apply(flt)
            self.policy = new
        log.warning("policy reloaded from %s: %s", self.path,
                    ", ".join([f"+{r}" for r in added] + [f"-{r}" for r in removed]) or "no change")
        return True

    def start(self) -> PolicyWatcher:
        self._thread = threading.Thread(target=self._run, name="kodarelay-policy", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            if self._stat() != self._stamp:
                self.reload()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1


__all__ = ["Policy", "PolicyError", "PolicyWatcher", "parse_policy", "load_policy", "diff"]

"""Policy files for ``kodarelay serve|run --policy FILE``, and keeping a running proxy in step.

The format is one rule per line, ``allow PATTERN`` or ``deny PATTERN`` (``read-only HOST``
for ``allow read-only HOST``); ``#`` starts a comment, blank lines are ignored. For a fleet
(``kodarelay.clients``): ``require-auth`` (before any section), and sections that start with
``client NAME [sha256:HEX]`` and hold that client's ``allow`` / ``deny`` / ``read-only``
lines and its limits, ``limit tunnels N``, ``limit rate R/s [burst B]``, ``limit upload SIZE
per PERIOD`` (``100M``, ``1G`` powers of ten, ``100Mi`` powers of two; ``30s``, ``30m``,
``1h``). A section runs to the next ``client`` line: global rules come first. A file that does not parse (or a pattern that does not)
raises ``PolicyError`` naming the line, and a watcher keeps the old policy: a typo never
opens or shuts the fence by accident. A good reload logs the rules added and removed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .clients import ClientPolicy, parse_period, parse_size
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
    clients: tuple[ClientPolicy, ...] = ()
    require_auth: bool = False

    def filter(self, extra_allow: Iterable[str] = (), extra_deny: Iterable[str] = ()) -> Filter:
        return Filter([*self.allow, *extra_allow], [*self.deny, *extra_deny])

    def lines(self) -> list[str]:
        out = [f"allow {p}" for p in self.allow] + [f"deny {p}" for p in self.deny]
        if self.require_auth:
            out.append("require-auth")
        for c in self.clients:
            out += [f"client {c.name}: allow {p}" for p in c.allow] + [f"client {c.name}: deny {p}" for p in c.deny]
            limits = (c.token_sha256 is not None, c.max_tunnels, c.rate, c.burst, c.upload_bytes, c.upload_period)
            out.append(f"client {c.name}: token={'yes' if limits[0] else 'no'} tunnels={limits[1]} rate={limits[2]} "
                       f"burst={limits[3]} upload={limits[4]}/{limits[5]:g}s")
        return out


def _limit(words: list[str], fields: dict[str, object]) -> None:
    """One ``limit`` line's words (after ``limit``) into ``fields`` (``ValueError`` when bad)."""
    if len(words) == 2 and words[0] == "tunnels" and words[1].isdigit():
        fields["max_tunnels"] = int(words[1])
    elif words[:1] == ["rate"] and len(words) in (2, 4) and words[1].endswith("/s"):
        fields["rate"] = float(words[1][:-2])
        if len(words) == 4:
            if words[2] != "burst":
                raise ValueError("write 'limit rate R/s burst B'")
            fields["burst"] = float(words[3])
    elif words[:1] == ["upload"] and len(words) == 4 and words[2] == "per":
        fields["upload_bytes"] = parse_size(words[1])
        fields["upload_period"] = parse_period(words[3])
    else:
        raise ValueError("want 'limit tunnels N', 'limit rate R/s [burst B]' or 'limit upload SIZE per PERIOD'")


def parse_policy(text: str, name: str = "<policy>") -> Policy:
    """Rules from policy-file text; ``PolicyError`` names the first bad line."""
    allow: list[str] = []
    deny: list[str] = []
    require_auth = False
    clients: list[ClientPolicy] = []
    section: dict[str, object] | None = None
    start = 0

    def close_section() -> None:
        if section is None:
            return
        try:
            clients.append(ClientPolicy(**section))  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise PolicyError(f"{name}:{start}: {e}") from None

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        verb, _, pattern = line.partition(" ")
        pattern = pattern.strip()
        if verb == "client":
            words = pattern.split()
            if not 1 <= len(words) <= 2 or (len(words) == 2 and not words[1].startswith("sha256:")):
                raise PolicyError(f"{name}:{number}: want 'client NAME [sha256:HEX]', got {raw.strip()!r}")
            close_section()
            if any(c.name == words[0] for c in clients):
                raise PolicyError(f"{name}:{number}: client {words[0]!r} has a section already")
            section = {"name": words[0], "allow": [], "deny": []}
            if len(words) == 2:
                section["token_sha256"] = words[1]
            start = number
            continue
        if verb == "require-auth" and not pattern:
            if section is not None:
                raise PolicyError(f"{name}:{number}: require-auth goes before the first client section")
            require_auth = True
            continue
        if verb == "limit":
            if section is None:
                raise PolicyError(f"{name}:{number}: a limit belongs to a client section ('client NAME' first)")
            try:
                _limit(pattern.split(), section)
            except ValueError as e:
                raise PolicyError(f"{name}:{number}: {e}; got {raw.strip()!r}") from None
            continue
        if verb == "read-only" and pattern:          # shorthand for allow GET,HEAD,OPTIONS HOST/*
            verb, pattern = "allow", f"read-only {pattern}"
        if verb not in ("allow", "deny") or not pattern:
            raise PolicyError(f"{name}:{number}: want 'allow PATTERN', 'deny PATTERN', 'read-only HOST', "
                              f"'client NAME', 'limit ...' or 'require-auth', got {raw.strip()!r}")
        try:
            Filter([pattern]) if verb == "allow" else Filter((), [pattern])
        except PatternError as e:
            raise PolicyError(f"{name}:{number}: {e}") from None
        if section is not None:
            rules = section[verb]
            assert isinstance(rules, list)
            rules.append(pattern)
        else:
            (allow if verb == "allow" else deny).append(pattern)
    close_section()
    return Policy(tuple(allow), tuple(deny), tuple(clients), require_auth)


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
                 extra_allow: Iterable[str] = (), extra_deny: Iterable[str] = (),
                 apply_clients: Callable[[Policy], None] | None = None,
                 reloaded: Callable[[bool], None] | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._apply = apply
        self._apply_clients = apply_clients     # the fleet's sections (clients, require-auth)
        self._reloaded = reloaded               # each reload's result (metrics)
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
                if self._reloaded is not None:
                    self._reloaded(False)
                return False
            added, removed = diff(self.policy, new)
            self._apply(flt)
            if self._apply_clients is not None:
                self._apply_clients(new)
            self.policy = new
            if self._reloaded is not None:
                self._reloaded(True)
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

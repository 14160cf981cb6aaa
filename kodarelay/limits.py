"""Process limits a proxy needs: ``raise_open_files_limit`` (offered, never applied behind the
caller's back; the ``kodarelay`` command calls it at start)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


_original_soft: int | None = None


def original_open_files_limit() -> int | None:
    """The RLIMIT_NOFILE soft limit before ``raise_open_files_limit`` first raised it (None if
    it never ran): what a command started by kodarelay gets back, since programs that loop up
    to their limit (closing every fd, sizing tables) must not inherit the proxy's."""
    return _original_soft


def restore_open_files_limit_for_child() -> None:
    """In a child about to execute a command: put the soft limit back to the original."""
    import resource

    if _original_soft is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(_original_soft, hard), hard))
        except (OSError, ValueError):
            pass


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the
    ``(soft, hard)`` pair in force afterwards.

    Every tunnel costs the proxy two sockets (and, while bytes move, a pipe's two fds), so the
    common soft limit of 1024 caps a busy proxy at a few hundred tunnels. The ``kodarelay``
    command calls this once at start; the library never changes a limit behind its caller's
    back: a program embedding the proxy calls it itself if it wants it. Failures (a
    seccomp'd or otherwise refused ``setrlimit``) leave the limit as it was.
    """
    import resource

    global _original_soft
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _original_soft is None:
        _original_soft = soft
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.debug("RLIMIT_NOFILE stays %s/%s: %s", soft, hard, e)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard

"""Process limits a proxy needs: ``raise_open_files_limit`` (offered, never applied behind the
caller's back; the ``kodarelay`` command calls it at start)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.debug("RLIMIT_NOFILE stays %s/%s: %s", soft, hard, e)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard

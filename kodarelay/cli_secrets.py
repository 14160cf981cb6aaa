"""``--secret NAME@HOSTS`` / ``--secret NAME=FILE@HOSTS``: the command's side of phantom secrets.

The value comes from kodarelay's own environment variable NAME, or the first line of FILE;
CMD's environment gets NAME = the phantom. What keeps the value out of CMD's reach:

* CMD runs fenced, in PID and mount namespaces of its own: it cannot see kodarelay's
  ``/proc/<pid>/environ`` or ``mem``; FILE is hidden inside the fence (an empty file bound
  over it); where either cannot be made, CMD is not run. ``--no-isolate`` with ``--secret``
  is a usage error: CMD would run as the same user, in the same namespaces, and could read
  kodarelay's memory (the library leaves that choice to its user);
* kodarelay's process is made non-dumpable (no core dump, its ``/proc`` files root's only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4


class SecretUsageError(ValueError):
    """A ``--secret`` that cannot be used as given (one line for the user)."""


def parse_secrets(values: Sequence[str] | None, environ: dict[str, str] | os._Environ[str]) -> list[Any]:
    """``Secret`` objects from the ``--secret`` values (``SecretUsageError`` naming the bad one)."""
    from .filter import Filter, PatternError
    from .secrets import Secret

    out: list[Any] = []
    for text in values or ():
        spec, at, hosts = text.rpartition("@")
        if not at or not spec or not hosts:
            raise SecretUsageError(f"--secret {text!r}: write NAME@HOSTS or NAME=FILE@HOSTS (HOSTS: a comma list)")
        name, eq, path = spec.partition("=")
        patterns = [h.strip() for h in hosts.split(",") if h.strip()]
        try:
            Filter(allow=patterns)
        except PatternError as e:
            raise SecretUsageError(f"--secret {name}: {e}") from None
        try:
            if eq:
                if not path:
                    raise SecretUsageError(f"--secret {name}=FILE@HOSTS: FILE is empty")
                secret = Secret.from_file(name, path, patterns)
            else:
                value = environ.get(name, "")
                if not value:
                    raise SecretUsageError(f"--secret {name}@{hosts}: {name} is not set in kodarelay's environment "
                                           f"(or write --secret {name}=FILE@{hosts})")
                secret = Secret(name, value, patterns)
        except OSError as e:
            raise SecretUsageError(f"--secret {name}: cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise SecretUsageError(f"--secret: {e}") from None
        if any(s.name == secret.name for s in out):
            raise SecretUsageError(f"--secret {name} is given twice")
        out.append(secret)
    return out


def keep_out_of_dumps() -> None:
    """No core dump of kodarelay, and its ``/proc`` files readable by root only."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make kodarelay non-dumpable: %s", os.strerror(ctypes.get_errno()))


__all__ = ["SecretUsageError", "keep_out_of_dumps", "parse_secrets"]

"""Chooses the relay engine and protocol parsers: compiled ``_relay`` or its pure-Python twin.

The choice is made once, at import:

* ``KODARELAY_NO_EXTENSIONS`` set to a true value (1, true, yes, on; any case) forces the
  pure-Python twin. ``0``, ``false`` or an empty value does not.
* ``KODARELAY_REQUIRE_EXTENSION`` set to a true value turns a missing or broken compiled
  module into an ``ImportError`` instead of a silent fallback (CI and wheel tests use it).

``IMPLEMENTATION`` says which relay engine is in use (``"cython"`` or ``"python"``);
``PARSERS`` says the same of the CONNECT / SOCKS5 parsers.

A silent fallback hides one common mistake: importing ``kodarelay`` from a checkout (for
example running ``python`` in its root after ``pip install .``) where the source tree
shadows the installed package and has no built extension. That case warns once with a
``SourceTreeWarning`` (a ``RuntimeWarning``) naming the cause and the fix. A warning, not a
log line: it reaches users who configured no logging, it is shown once per process, and it
can be silenced or made an error by category (``-W error::RuntimeWarning`` in CI).
``KODARELAY_NO_EXTENSIONS`` (the pure-Python twin on purpose) never warns.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import _relay_py
from .limits import raise_open_files_limit

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_TOTAL_TIMEOUT = 3600.0

_TRUE = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` holds 1/true/yes/on (any case)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


class SourceTreeWarning(RuntimeWarning):
    """kodarelay was imported from a source tree whose compiled relay is not built."""


def _unbuilt_source_tree() -> Path | None:
    """The checkout root when this package is a source tree without a built ``_relay``, else None.

    A source tree has ``_relay.pyx`` beside this file and ``setup.py`` / ``pyproject.toml``
    one level up (an installed package has neither above it); "built" means a file named
    ``_relay`` plus one of this interpreter's extension suffixes.
    """
    here = Path(__file__).resolve().parent
    root = here.parent
    if not (here / "_relay.pyx").is_file():
        return None
    if not ((root / "setup.py").is_file() or (root / "pyproject.toml").is_file()):
        return None
    if any((here / f"_relay{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return None
    return root


def _warn_source_tree(root: Path) -> None:
    warnings.warn(
        f"kodarelay is imported from the source tree {root} (it shadows any installed kodarelay) and "
        "its compiled relay is not built there, so the slower pure-Python relay is in use. "
        f"Build it in place with `pip install -e .` in {root}, or run from another directory so the "
        "installed package is imported. KODARELAY_NO_EXTENSIONS=1 picks the pure-Python relay without this warning.",
        SourceTreeWarning,
        stacklevel=2,
    )


def _load_compiled():  # type: ignore[no-untyped-def]
    if env_flag("KODARELAY_NO_EXTENSIONS"):
        if env_flag("KODARELAY_REQUIRE_EXTENSION"):
            raise ImportError("KODARELAY_REQUIRE_EXTENSION and KODARELAY_NO_EXTENSIONS are both set")
        return None
    try:
        from . import _relay
    except ImportError:
        if env_flag("KODARELAY_REQUIRE_EXTENSION"):
            raise
        log.debug("compiled kodarelay._relay unavailable; using the pure-Python twin", exc_info=True)
        root = _unbuilt_source_tree()
        if root is not None:
            _warn_source_tree(root)
        return None
    return _relay


_compiled = _load_compiled()

if TYPE_CHECKING:
    impl = _relay_py
    parsers = _relay_py
else:
    parsers = _compiled if _compiled is not None else _relay_py
    impl = _compiled if _compiled is not None and hasattr(_compiled, "relay_with_timeouts") else _relay_py

IMPLEMENTATION: str = "cython" if impl is not _relay_py else "python"
PARSERS: str = "cython" if parsers is not _relay_py else "python"

relay_with_timeouts = impl.relay_with_timeouts

__all__ = [
    "relay_with_timeouts",
    "raise_open_files_limit",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "IMPLEMENTATION",
    "PARSERS",
    "env_flag",
    "SourceTreeWarning",
]

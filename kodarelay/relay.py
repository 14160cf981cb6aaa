"""Chooses the relay engine and protocol parsers: compiled ``_relay`` or its pure-Python twin.

The choice is made once, at import:

* ``KODARELAY_NO_EXTENSIONS`` set to a true value (1, true, yes, on; any case) forces the
  pure-Python twin. ``0``, ``false`` or an empty value does not.
* ``KODARELAY_REQUIRE_EXTENSION`` set to a true value turns a missing or broken compiled
  module into an ``ImportError`` instead of a silent fallback (CI and wheel tests use it).

``IMPLEMENTATION`` says which relay engine is in use (``"cython"`` or ``"python"``);
``PARSERS`` says the same of the CONNECT / SOCKS5 parsers.
"""

from __future__ import annotations

import logging
import os
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
]

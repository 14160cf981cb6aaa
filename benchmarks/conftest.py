"""Benchmark fixtures: every benchmark runs once per implementation (compiled and twin)."""

from __future__ import annotations

import pytest

from kodarelay import _relay_py
from kodarelay.relay import env_flag


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
)
def impl(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``kodarelay._relay`` or ``kodarelay._relay_py``."""
    if request.param == "python":
        return _relay_py
    if env_flag("KODARELAY_NO_EXTENSIONS"):
        pytest.skip("KODARELAY_NO_EXTENSIONS is set")
    from kodarelay import _relay

    return _relay

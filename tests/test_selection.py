"""Which implementation ``kodarelay.relay`` picks, decided once at import from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kodarelay.relay import env_flag

PROBE = "import kodarelay.relay as r; print(r.IMPLEMENTATION, r.PARSERS)"
# Make the compiled module unimportable, as on a platform where it failed to build.
BROKEN = "import sys; sys.modules['kodarelay._relay'] = None; " + PROBE


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KODARELAY_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " On "])
def test_truthy_no_extensions_forces_the_twin(value):
    assert _run(PROBE, KODARELAY_NO_EXTENSIONS=value).stdout.split() == ["python", "python"]


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off"])
def test_falsy_no_extensions_keeps_the_compiled_module(value):
    if env_flag("KODARELAY_NO_EXTENSIONS"):
        pytest.skip("this run forbids the compiled module")
    assert _run(PROBE, KODARELAY_NO_EXTENSIONS=value).stdout.split() == ["cython", "cython"]


def test_missing_compiled_module_falls_back_quietly_by_default():
    out = _run(BROKEN)
    assert out.returncode == 0 and out.stdout.split() == ["python", "python"]


def test_require_extension_makes_a_missing_module_an_import_error():
    code = BROKEN.replace(PROBE, "") + "\ntry:\n    " + PROBE.replace("; ", "\n    ") + "\nexcept ImportError:\n    print('ImportError')"
    out = _run(code, KODARELAY_REQUIRE_EXTENSION="1")
    assert out.stdout.strip() == "ImportError", out


def test_require_and_forbid_together_is_an_error():
    out = _run(PROBE, KODARELAY_REQUIRE_EXTENSION="1", KODARELAY_NO_EXTENSIONS="1")
    assert out.returncode != 0 and "both set" in out.stderr

"""Importing kodarelay from a checkout without a built extension warns (issue 13, item 8).

The README's own check (``python -c "import kodarelay.relay as r; print(r.IMPLEMENTATION)"``)
printed ``python`` when run in the checkout root after ``pip install .``: the source tree
shadowed the installed package and the fallback was silent. Each test builds a copy of the
package as a checkout in a temporary directory and imports it from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kodarelay

PACKAGE = Path(kodarelay.__file__).resolve().parent
CHECK = "import kodarelay, kodarelay.relay as r; print(r.IMPLEMENTATION, kodarelay.__file__)"


def _checkout(tmp_path: Path, with_extension: bool = False) -> Path:
    root = tmp_path / "checkout"
    pkg = root / "kodarelay"
    pkg.mkdir(parents=True)
    for pattern in ("*.py", "*.pyx", "*.pxi", "*.pyi", "py.typed"):
        for f in PACKAGE.glob(pattern):
            shutil.copy(f, pkg / f.name)
    if with_extension:
        built = sorted(PACKAGE.glob("_relay.*.so"))
        if not built:
            pytest.skip("no built extension beside the imported package to copy")
        shutil.copy(built[0], pkg / built[0].name)
        libs = PACKAGE.parent / "kodarelay.libs"     # a repaired wheel's vendored libssl / libcrypto
        if libs.is_dir():
            shutil.copytree(libs, root / "kodarelay.libs")
    (root / "pyproject.toml").write_text("[project]\nname = 'kodarelay'\n")
    return root


def _import_in(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KODARELAY_") and k != "PYTHONWARNINGS"}
    clean.pop("PYTHONPATH", None)
    return subprocess.run(
        # -S: no site-packages, so no editable-install finder that would find the worktree's
        # extension for the copy (a regular install has no such finder either)
        [sys.executable, "-S", "-c", CHECK], cwd=root, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_unbuilt_checkout_warns_with_cause_and_fix(tmp_path):
    root = _checkout(tmp_path)
    out = _import_in(root)
    assert out.returncode == 0, out.stderr
    impl, path = out.stdout.split()
    assert impl == "python"
    assert Path(path).resolve().is_relative_to(root.resolve())  # the checkout shadowed the installed package
    assert out.stderr.count("SourceTreeWarning") == 1, out.stderr
    assert str(root.resolve()) in out.stderr
    assert "pip install -e ." in out.stderr and "another directory" in out.stderr


def test_no_warning_when_the_pure_python_relay_is_asked_for(tmp_path):
    out = _import_in(_checkout(tmp_path), KODARELAY_NO_EXTENSIONS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "python"
    assert out.stderr == ""


def test_no_warning_for_a_built_checkout(tmp_path):
    out = _import_in(_checkout(tmp_path, with_extension=True))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "cython"
    assert out.stderr == ""


def test_required_extension_still_fails_loudly(tmp_path):
    out = _import_in(_checkout(tmp_path), KODARELAY_REQUIRE_EXTENSION="1")
    assert out.returncode != 0
    assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr

"""Every public name SPEC lists is importable from ``kodarelay`` itself."""

from __future__ import annotations

import subprocess
import sys

import kodarelay


def test_every_export_resolves():
    for name in kodarelay.__all__:
        assert getattr(kodarelay, name) is not None, name
    assert "pick_ephemeral_port" in dir(kodarelay)


def test_import_is_cheap():
    """``import kodarelay`` loads no server, relay or asyncio module until a name is used."""
    code = "import sys, kodarelay; print(sorted(m for m in sys.modules if m.startswith('kodarelay') or m == 'asyncio'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['kodarelay', 'kodarelay._version']"


def test_py_typed_is_shipped():
    from importlib.resources import files

    assert files("kodarelay").joinpath("py.typed").is_file()

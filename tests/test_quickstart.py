"""The README's first command: examples/quickstart.py admits one host and refuses another."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


@pytest.mark.skipif(not QUICKSTART.exists(), reason="run from a source checkout")
def test_quickstart_admits_one_host_and_refuses_another():
    out = subprocess.run([sys.executable, str(QUICKSTART)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fetched http://localhost:" in out.stdout and "hello from a site on the allowlist" in out.stdout
    assert "refused http://blocked.example/: Tunnel connection failed: 403 Forbidden" in out.stdout
    assert "1x blocked.example:80  not_allowed" in out.stderr

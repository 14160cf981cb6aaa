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


HOOKS = QUICKSTART.parent / "hooks.py"


@pytest.mark.skipif(not HOOKS.exists(), reason="run from a source checkout")
def test_hooks_example_runs_as_the_readme_shows():
    out = subprocess.run([sys.executable, str(HOOKS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("decider asked: job-7 wants site.test:") == 1
    assert "first fetch: 200 hello" in out.stdout
    assert "second fetch (remembered, not asked): 200 hello" in out.stdout
    assert "after set_filter: 403 kodarelay: GET to site.test:" in out.stdout
    assert "violations: [('site.test', 'denied', 'job-7')]" in out.stdout

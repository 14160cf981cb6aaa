"""The README's first command: examples/quickstart.py admits one host and refuses another."""

from __future__ import annotations

import os
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


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_example() -> str:
    """The first ```python block under "## Using it from Python", as written."""
    text = README.read_text()
    section = text.split("## Using it from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


@pytest.mark.skipif(not README.exists(), reason="run from a source checkout")
def test_readme_python_example_runs_as_written(tmp_path, start_proxy):
    """Issue 13: the example lacked its imports, and with the default NO_PROXY a not-allowed
    127.0.0.1 was fetched directly while ``violations()`` stayed empty.

    The block runs verbatim, on loopback only: its proxy chains allowed names through the
    caller's HTTPS_PROXY (the crate's behaviour), here a local proxy that refuses everything
    and so records what the example's policy let through.
    """
    from peers import require_tool

    require_tool("curl")
    trap = start_proxy(patterns=())
    script = tmp_path / "example.py"
    script.write_text(readme_python_example())
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["HTTPS_PROXY"] = f"http://127.0.0.1:{trap.port}"
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "refused example.com 443 not_allowed" in lines, out.stdout
    assert "refused 127.0.0.1 8443 not_allowed" in lines, out.stdout
    assert "https://127.0.0.1:8443/ not fetched" in lines
    # pypi.org was admitted by the example's policy and went on to the (refusing) upstream
    assert [(v.host, v.port) for v in trap.violations()] == [("pypi.org", 443)]


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

"""The README's commands, run as a user types them (those that need no network beyond loopback).

Each is taken from README.md itself, so an edit that breaks a command fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peers import DEADLINE, WebServer, require_tool
from test_cli_hooks import _loopback_name

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands() -> list[str]:
    """Every line of the README's ``sh`` blocks, comments cut."""
    text = README.read_text(encoding="utf-8")
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _command(prefix: str) -> str:
    found = [c for c in _commands() if c.startswith(prefix)]
    assert found, f"the README no longer has a command starting with {prefix!r}"
    return found[0]


def _shell(line: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """``line`` in bash with the installed ``kodarelay`` on PATH, from a directory outside the tree."""
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=DEADLINE * 3,
                          cwd="/", env=env, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module", autouse=True)
def installed_command() -> None:
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "kodarelay")):
        pytest.skip("the kodarelay command is not installed beside this interpreter")


def test_env_json_as_typed():
    out = _shell(_command("kodarelay env --port 3128 --format json"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["HTTPS_PROXY"] == "http://127.0.0.1:3128"


def test_check_as_typed_says_allowed():
    out = _shell(_command("kodarelay check registry.npmjs.org:443"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("allowed")


def test_env_tools_eval_as_typed_sets_up_a_shell():
    line = _command('eval "$(kodarelay env --port 3128 --tools)"')
    out = _shell(f"{line} && echo \"$npm_config_proxy $HTTPS_PROXY\"")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["http://127.0.0.1:3128", "http://127.0.0.1:3128"]


def test_local_server_under_a_name_recipe():
    """The README's recipe for a name served on loopback, with the machine's own loopback
    name for ``site.test`` and the test site's port for 8080."""
    curl = require_tool("curl")
    line = _command("kodarelay run --allow site.test,127.0.0.1:8080")
    name = _loopback_name()
    site = WebServer()
    try:
        typed = line.replace("site.test", name).replace("8080", str(site.port)).replace("curl ", f"{curl} -sS ")
        out = _shell(typed)
        assert out.returncode == 0, out.stderr
        assert "hello from /" in out.stdout
        # and without the address rule the README explains, it is refused by the guard
        without = _shell(typed.replace(f",127.0.0.1:{site.port}", ""))
        assert "hello from" not in without.stdout and "resolved_address" in without.stderr
    finally:
        site.close()


def test_installed_check_prints_the_implementation():
    line = _command('python -c "import kodarelay.relay as r; print(r.IMPLEMENTATION)"')
    out = _shell(line.replace("python ", f"{sys.executable} ", 1))
    assert out.returncode == 0, out.stderr
    from kodarelay import relay

    assert out.stdout.strip() == relay.IMPLEMENTATION

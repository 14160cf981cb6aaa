"""A new user's first hour: what the command prints and suggests, checked as a user runs it."""

from __future__ import annotations

import pytest

from peers import require_tool
from test_cli import kr
from test_fence import FENCE_NOTE, _fence_works


@pytest.fixture(scope="module")
def fence() -> None:
    why = _fence_works()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("typo, flag", [("--alow", "--allow"), ("--deney", "--deny"), ("--upstrem", "--upstream")])
def test_a_misspelt_flag_gets_the_closest_one(typo, flag):
    out = kr("run", typo, "x.test", "--", "true")
    assert out.returncode == 2
    assert f"unrecognized arguments: {typo}" in out.stderr and f"(did you mean {flag}?)" in out.stderr


def test_an_unknown_flag_far_from_any_gets_no_guess():
    out = kr("check", "x.test", "--zzzzzz")
    assert out.returncode == 2 and "did you mean" not in out.stderr


def test_fence_note_not_printed_when_a_refusal_explains_the_failure(fence):
    curl = require_tool("curl")
    out = kr("run", "--upstream", "direct", "--", curl, "-sS", "-p", "--max-time", "20", "https://refused.test/")
    assert out.returncode != 0
    assert "refused.test:443  not_allowed" in out.stderr
    assert FENCE_NOTE not in out.stderr


def test_fence_note_printed_when_cmd_fails_with_nothing_refused(fence):
    out = kr("run", "--upstream", "direct", "--", "sh", "-c", "exit 4")
    assert out.returncode == 4
    assert out.stderr.count(FENCE_NOTE) == 1


def test_fence_note_once_with_verbose_and_never_on_a_clean_run(fence):
    quiet = kr("run", "--upstream", "direct", "--", "true")
    assert quiet.returncode == 0 and FENCE_NOTE not in quiet.stderr
    verbose = kr("run", "-v", "--upstream", "direct", "--", "true")
    assert verbose.returncode == 0 and verbose.stderr.count(FENCE_NOTE) == 1


def test_help_lists_every_subcommand_without_a_traceback():
    out = kr("--help")
    assert out.returncode == 0
    for sub in ("run", "serve", "env", "check"):
        assert sub in out.stdout


def test_a_name_on_loopback_is_refused_with_its_address_and_the_exact_flag():
    """Admitting a name that resolves to loopback took guesswork: the 403 and the summary did
    not say the address, and the hint named --allow-private, which does not help loopback."""
    from peers import WebServer
    from test_cli_hooks import _loopback_name

    name = _loopback_name()
    site = WebServer()
    try:
        curl = require_tool("curl")
        out = kr("run", "--allow", name, "--upstream", "direct", "--", curl, "-sS", f"http://{name}:{site.port}/")
        flag = f"--allow {name},127.0.0.1:{site.port}"
        assert f"{name} resolves to 127.0.0.1 (loopback); {flag} admits it" in out.stdout, out.stdout
        assert f"resolves to 127.0.0.1 (loopback); {flag} admits it" in out.stderr, out.stderr
        assert "--allow-private" not in out.stdout + out.stderr
        again = kr("run", *flag.split(" ", 1), "--upstream", "direct", "--", curl, "-sS", f"http://{name}:{site.port}/")
        assert again.returncode == 0 and "hello from /" in again.stdout, again.stderr
    finally:
        site.close()


@pytest.mark.parametrize("fence_flag", [[], ["--no-isolate"]], ids=["fenced", "unfenced"])
def test_cmd_gets_the_open_files_limit_kodarelay_started_with(fence_flag):
    """The command raises its own RLIMIT_NOFILE soft limit; CMD inherited the raised one."""
    import resource
    import subprocess

    from test_fence import KR, clean_env

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 512:
        pytest.skip("the hard limit leaves nothing to raise")
    if not fence_flag and _fence_works() is not None:
        pytest.skip(_fence_works())

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    out = subprocess.run([*KR, "run", *fence_flag, "--upstream", "direct", "--", "sh", "-c", "ulimit -Sn"],
                         env=clean_env(), capture_output=True, text=True, timeout=60, preexec_fn=lower)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "512"

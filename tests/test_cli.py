"""The ``kodarelay`` command, run for real as a subprocess against loopback peers.

Each test starts ``python -m kodarelay`` (one test the ``kodarelay`` console script) and
waits on files, pipes or process exit with deadlines; nothing sleeps to wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import textwrap
import time
from pathlib import Path

import pytest

from kodarelay.bridge import proxy_uds_path

from peers import DEADLINE, WebServer, port_is_closed, require_tool, wait_until


KR = [sys.executable, "-m", "kodarelay"]
RUN_TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def kr(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [*KR, *args], env=env if env is not None else clean_env(), capture_output=True, text=True,
        timeout=RUN_TIMEOUT, **kw,
    )


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr


def procs_mentioning(token: str) -> list[int]:
    """Live processes whose command line contains ``token`` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry))
    return found


def reap(proc: subprocess.Popen[bytes], token: str) -> None:
    """After a failed test: kill kodarelay and anything it left mentioning ``token``."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in procs_mentioning(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_script(path: Path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return str(path)


@pytest.fixture
def http_site():
    site = WebServer()
    yield site
    site.close()


def _unshare_works() -> str | None:
    """Why ``unshare --net`` cannot be used here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    exe = shutil.which("unshare")
    if exe is None:
        return "unshare (util-linux) is not installed"
    argv = [exe, "--net"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"]) + ["--", "true"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"unshare failed to start: {e}"
    if out.returncode != 0:
        return f"{' '.join(argv)} is not permitted here: {out.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def netns():
    why = _unshare_works()
    if why is not None:
        pytest.skip(why)


# ── version, help, entry points ──────────────────────────────────────────────


def test_version_via_python_m():
    from kodarelay import __version__

    out = kr("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"kodarelay {__version__}"


def test_console_script_is_the_same_command():
    exe = shutil.which("kodarelay") or os.path.join(os.path.dirname(sys.executable), "kodarelay")
    if not os.path.exists(exe):
        pytest.fail(f"console script kodarelay not found next to {sys.executable}")
    out = subprocess.run([exe, "check", "github.com:443", "--dev-defaults"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("allowed github.com:443 rule=github.com")


@pytest.mark.parametrize("sub", ["run", "serve", "env", "check"])
def test_help_has_examples(sub):
    out = kr(sub, "--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout
    assert f"kodarelay {sub} " in out.stdout.split("examples:", 1)[1]


def test_no_subcommand_is_a_usage_error():
    out = kr()
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


# ── check ────────────────────────────────────────────────────────────────────


def test_check_allowed_prints_rule():
    out = kr("check", "registry.npmjs.org:443", "--allow", "*.npmjs.org:443")
    assert out.returncode == 0
    assert out.stdout == "allowed registry.npmjs.org:443 rule=*.npmjs.org:443 reason=allowed\n"


def test_check_denied_by_deny_rule():
    out = kr("check", "gist.github.com", "--allow", "*.github.com", "--deny", "gist.github.com")
    assert out.returncode == 1
    assert out.stdout == "denied gist.github.com rule=gist.github.com reason=denied\n"


def test_check_not_allowed_and_comma_lists():
    out = kr("check", "evil.com:443", "--allow", "github.com,pypi.org")
    assert out.returncode == 1
    assert out.stdout == "denied evil.com:443 rule=- reason=not_allowed\n"
    assert kr("check", "pypi.org", "--allow", "github.com,pypi.org").returncode == 0


def test_check_port_limited_rule_without_port_explains():
    out = kr("check", "github.com", "--allow", "github.com:443")
    assert out.returncode == 1
    assert "reason=not_allowed" in out.stdout
    assert "HOST:PORT" in out.stdout


def test_check_ipv6_literal():
    out = kr("check", "[::1]:8080", "--allow", "::1")
    assert out.returncode == 0
    assert out.stdout.startswith("allowed [::1]:8080 rule=::1")


def test_check_bad_host_exits_2():
    out = kr("check", "a..b", "--allow", "a.b")
    assert out.returncode == 2
    assert out.stdout == ""
    assert_one_line_error(out.stderr, "'a..b'")


@pytest.mark.parametrize(
    ("target", "suggestion"),
    [("https://pypi.org", "pypi.org"), ("https://pypi.org:8443/simple", "pypi.org:8443"), ("pypi.org/simple", "pypi.org")],
)
def test_check_url_target_suggests_the_host(target, suggestion):
    out = kr("check", target, "--allow", "pypi.org")
    assert out.returncode == 2
    assert out.stdout == ""
    assert_one_line_error(out.stderr, repr(target), "HOST[:PORT]", f"(did you mean {suggestion!r}?)")
    assert "invalid port" not in out.stderr and "CIDR" not in out.stderr


@pytest.mark.parametrize(
    ("target", "args", "code", "reason"),
    [
        # private ranges: refused by default, --allow-private or a rule naming them admits them
        ("10.1.2.3:443", ["--allow", "0.0.0.0/0"], 1, "resolved_address"),
        ("10.1.2.3:443", ["--allow", "0.0.0.0/0", "--allow-private"], 0, "allowed"),
        ("10.1.2.3:443", ["--allow", "10.0.0.0/8"], 0, "allowed"),
        ("192.168.1.1:443", ["--allow", "192.168.1.1"], 0, "allowed"),
        ("[fd12::1]:443", ["--allow", "::/0"], 1, "resolved_address"),
        ("100.64.0.1:443", ["--allow", "0.0.0.0/0"], 1, "resolved_address"),
        # always guarded: documentation, benchmarking, reserved, loopback
        ("192.0.2.1:443", ["--allow", "0.0.0.0/0", "--allow-private"], 1, "resolved_address"),
        ("198.18.0.1:443", ["--allow", "0.0.0.0/0", "--allow-private"], 1, "resolved_address"),
        ("[2001:db8::1]:443", ["--allow", "::/0", "--allow-private"], 1, "resolved_address"),
        ("240.0.0.1:443", ["--allow", "0.0.0.0/0"], 1, "resolved_address"),
        ("127.0.0.1:8080", ["--allow", "0.0.0.0/0"], 1, "resolved_address"),
        ("127.0.0.1:8080", ["--allow", "127.0.0.1"], 0, "allowed"),
        ("192.0.2.1:443", ["--allow", "192.0.2.0/24"], 0, "allowed"),
        ("93.184.216.34:443", ["--allow", "0.0.0.0/0"], 0, "allowed"),
    ],
)
def test_check_ip_literal_is_judged_like_the_proxy(target, args, code, reason):
    out = kr("check", target, *args)
    assert out.returncode == code, out.stdout + out.stderr
    first, *rest = out.stdout.splitlines()
    assert first.startswith(("allowed " if code == 0 else "denied ") + target)
    assert first.endswith(f"reason={reason}")
    if reason == "resolved_address":
        assert rest and rest[0].startswith("note: "), out.stdout
        assert ("--allow-private" in rest[0]) == ("--allow-private" not in args and "private" in rest[0])
    assert out.stderr == ""


def test_check_says_a_name_is_judged_without_dns():
    out = kr("check", "pypi.org:443", "--allow", "pypi.org")
    assert out.returncode == 0
    assert out.stdout == "allowed pypi.org:443 rule=pypi.org reason=allowed\n"
    assert "judged by name only (no DNS)" in out.stderr and "private" in out.stderr
    assert "private" not in kr("check", "pypi.org:443", "--allow", "pypi.org", "--allow-private").stderr


def test_check_bad_pattern_exits_2():
    out = kr("check", "github.com", "--allow", "foo.*.com")
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "foo.*.com")


# ── env ──────────────────────────────────────────────────────────────────────


def test_env_sh_round_trips_through_a_shell(tmp_path):
    bundle = str(tmp_path / "it's a $bundle.pem")
    Path(bundle).write_text("")
    out = kr("env", "--port", "3128", "--socks5-port", "1080", "--ca-bundle", bundle)
    assert out.returncode == 0
    assert all(line.startswith("export ") for line in out.stdout.splitlines())
    assert "export HTTPS_PROXY='http://127.0.0.1:3128'\n" in out.stdout
    shell = subprocess.run(
        ["sh", "-c", out.stdout + 'printf "%s\\n%s\\n%s\\n" "$SSL_CERT_FILE" "$ALL_PROXY" "[$NO_PROXY]"'],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=RUN_TIMEOUT,
    )
    assert shell.stdout.splitlines() == [bundle, "socks5h://127.0.0.1:1080", "[]"]


def test_env_json_and_tools(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    out = kr("env", "--port", "3128", "--format", "json", "--tools", "--ca-bundle", str(bundle))
    data = json.loads(out.stdout)
    assert data["HTTPS_PROXY"] == data["npm_config_proxy"] == data["GRPC_PROXY"] == "http://127.0.0.1:3128"
    assert data["PIP_CERT"] == data["CURL_CA_BUNDLE"] == str(bundle)
    assert data["NO_PROXY"] == ""
    assert "ALL_PROXY" not in data  # no --socks5-port
    assert list(data) == sorted(data)


def test_env_dotenv_quotes_only_when_needed():
    out = kr("env", "--port", "3128", "--format", "dotenv", "--no-proxy", "localhost, 10.0.0.0/8")
    lines = out.stdout.splitlines()
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in lines
    assert 'NO_PROXY="localhost, 10.0.0.0/8"' in lines


def test_env_ca_bundle_is_checked_like_runs(tmp_path):
    """Issue 13: env accepted a missing bundle and printed a relative path as given; run refused it."""
    out = kr("env", "--port", "3128", "--ca-bundle", "missing.pem", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert_one_line_error(out.stderr, "--ca-bundle", "'missing.pem'")
    (tmp_path / "ca.pem").write_text("")
    out = kr("env", "--port", "3128", "--ca-bundle", "ca.pem", "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["SSL_CERT_FILE"] == data["CURL_CA_BUNDLE"] == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("bad", [["--port", "0"], ["--port", "70000"], ["--port", "x"], [], ["--port", "1", "--format", "xml"]])
def test_env_bad_arguments_exit_2(bad):
    out = kr("env", *bad)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr


# ── run: traffic ─────────────────────────────────────────────────────────────


def test_run_curl_to_local_https_and_http(https_site, http_site, ca):
    curl = require_tool("curl")
    out = kr(
        "run", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--",
        curl, "-sS", "--max-time", "20", https_site.url("/tls"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from /tls\n"
    assert out.stderr == ""  # nothing refused, nothing to say
    # Plain http:// is tunnelled too (the proxy speaks CONNECT only): curl -p.
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--", curl, "-sS", "-p", "--max-time", "20", http_site.url("/plain"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from /plain\n"


def test_run_socks5_through_all_proxy(https_site, ca):
    """--all-proxy-scheme socks5h (SOCKS-only setups): ALL_PROXY names the same port as socks5h://."""
    curl = require_tool("curl")
    out = kr(
        "run", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--all-proxy-scheme", "socks5h",
        "--", "sh", "-c",
        f'case "$ALL_PROXY" in socks5h://127.0.0.1:*) ;; *) exit 99;; esac; '
        f'exec {curl} -sS --max-time 20 --proxy "$ALL_PROXY" {https_site.url("/socks")}',
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from /socks\n"


def test_run_httpx_works_with_the_default_bouquet(https_site, ca):
    """Issue 13: ALL_PROXY=socks5h:// made every httpx request fail (socksio not installed).

    The port speaks both protocols, so ALL_PROXY is http:// and httpx needs no extra.
    """
    pytest.importorskip("httpx")
    code = (
        "import os, ssl, sys, httpx\n"
        "ctx = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])\n"
        "with httpx.Client(verify=ctx, timeout=20) as c:\n"
        "    print(c.get(sys.argv[1]).text, end='')\n"
        "    try:\n"
        "        c.get('https://blocked.invalid/')\n"
        "    except httpx.ProxyError as e:\n"
        "        print('refused:', e)\n"
    )
    out = kr(
        "run", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--",
        sys.executable, "-c", code, https_site.url("/httpx"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "hello from /httpx"
    assert out.stdout.splitlines()[1].startswith("refused:") and "403" in out.stdout
    assert "1x blocked.invalid:443  not_allowed" in out.stderr


def test_run_verbose_says_nothing_twice_and_no_normal_ending_as_an_error(https_site, ca):
    """Issue 13: -v printed "tunnel ended: [Errno 32] Broken pipe" after a good fetch."""
    curl = require_tool("curl")
    urls = [https_site.url(f"/{i}") for i in range(4)]
    out = kr("run", "-v", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--", curl, "-sS", *urls)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"hello from /{i}\n" for i in range(4))
    lines = out.stderr.splitlines()
    assert lines, "-v says where the proxy listens"
    assert len(lines) == len(set(lines)), out.stderr
    for noise in ("Errno", "Broken pipe", "reset by peer", "Traceback", "error"):
        assert noise not in out.stderr, out.stderr


def test_run_summary_never_prints_a_path_or_query():
    """A refused plain-HTTP request is recorded with its absolute-form target; the summary shows host[:port] only."""
    curl = require_tool("curl")
    out = kr("run", "--upstream", "direct", "--", curl, "-sS", "--max-time", "20", "http://blocked.invalid:8080/secret/path?token=abc")
    assert "1x blocked.invalid:8080  " in out.stderr, out.stderr
    assert "secret" not in out.stderr and "token" not in out.stderr, out.stderr


@pytest.mark.parametrize("level", ["-v", "-vv"])
def test_run_verbose_says_each_allowed_tunnel_once(https_site, ca, level):
    """-v showed refusals but not what was admitted, and -vv said lines twice; a CONNECT tunnel
    is labelled CONNECT (it said "allowed http")."""
    curl = require_tool("curl")
    out = kr(
        "run", level, "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--",
        "sh", "-c", f"{curl} -sS {https_site.url('/a')}; {curl} -sS --max-time 20 https://blocked.invalid/; exit 0",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == len(set(lines)), out.stderr
    where = f"localhost:{https_site.port}"
    assert [line for line in lines if line.startswith("kodarelay: allowed ") and where in line] == [
        f"kodarelay: allowed CONNECT {where} (rule localhost)"]
    assert [line for line in lines if "blocked.invalid" in line and "refused http" in line] == [
        "kodarelay: refused http blocked.invalid:443 (not_allowed)"
    ]
    ended = [line for line in lines if line.startswith(f"kodarelay: ended CONNECT {where}: ")]
    assert len(ended) == (1 if level == "-vv" else 0), out.stderr


def test_run_localhost_goes_through_the_policy(http_site):
    """NO_PROXY is empty: without a localhost rule, even localhost is refused."""
    curl = require_tool("curl")
    out = kr("run", "--allow", "example.org", "--upstream", "direct", "--", curl, "-sS", "-p", "--max-time", "20", http_site.url("/"))
    assert out.returncode != 0
    assert f"1x localhost:{http_site.port}  not_allowed" in out.stderr


def test_run_summarises_refusals(ca):
    curl = require_tool("curl")
    script = (
        f"{curl} -sS --max-time 20 https://blocked.invalid/; "
        f"{curl} -sS --max-time 20 https://blocked.invalid/; "
        f"{curl} -sS --max-time 20 https://gist.github.com/; exit 0"
    )
    out = kr("run", "--allow", "*.github.com", "--deny", "gist.github.com", "--upstream", "direct", "--", "sh", "-c", script)
    assert out.returncode == 0
    assert "kodarelay: refused 3 connections:" in out.stderr
    assert "  2x blocked.invalid:443  not_allowed: no --allow rule matches" in out.stderr
    assert "  1x gist.github.com:443  denied: a --deny rule matches" in out.stderr
    assert "403" in out.stderr  # curl's own error is untouched


def test_run_quiet_has_no_summary():
    curl = require_tool("curl")
    out = kr("run", "--quiet", "--upstream", "direct", "--", curl, "-s", "--max-time", "20", "https://blocked.invalid/")
    assert out.returncode == 56  # curl: CONNECT tunnel failed
    assert out.stderr == ""


def test_run_environment_replaces_inherited_proxies(tmp_path):
    dump = tmp_path / "env.json"
    env = clean_env(HTTPS_PROXY="http://corp.example:3128", FTP_PROXY="http://corp.example:21", npm_config_noproxy="x")
    code = f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"
    out = kr("run", "--upstream", "direct", "--", sys.executable, "-c", code, env=env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(dump.read_text())
    port = int(seen["HTTPS_PROXY"].rsplit(":", 1)[1])
    assert seen["HTTPS_PROXY"] == seen["http_proxy"] == seen["npm_config_proxy"] == f"http://127.0.0.1:{port}"
    assert seen["ALL_PROXY"] == seen["all_proxy"] == f"http://127.0.0.1:{port}"  # the port speaks both
    assert seen["NO_PROXY"] == seen["no_proxy"] == ""
    assert "FTP_PROXY" not in seen and "npm_config_noproxy" not in seen
    assert seen["PATH"] == env["PATH"]


def test_run_upstream_auto_chains_through_callers_https_proxy(https_site, ca):
    """The caller's HTTPS_PROXY is the upstream: a refusing upstream makes the tunnel fail."""
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    curl = require_tool("curl")
    with BuiltInProxy(Filter([]), upstream=UpstreamConfig.direct()).start() as corp:
        env = clean_env(HTTPS_PROXY=f"http://127.0.0.1:{corp.port}")
        args = ["run", "--allow", "localhost", "--ca-bundle", str(ca[0]), "--", curl, "-sS", "--max-time", "20", https_site.url("/")]
        chained = kr(*args, env=env)
        assert chained.returncode != 0
        assert [(v.host, v.port) for v in corp.violations()] == [("localhost", https_site.port)]
        direct = kr(args[0], "--upstream", "direct", *args[1:], env=env)
        assert direct.returncode == 0, direct.stderr
        assert len(corp.violations()) == 1


# ── run: exit status, errors ─────────────────────────────────────────────────


def test_run_passes_exit_status_through():
    assert kr("run", "--", "sh", "-c", "exit 7").returncode == 7
    assert kr("run", "--", "true").returncode == 0


def test_run_signal_death_is_128_plus_n():
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert kr("run", "--", sys.executable, "-c", code).returncode == 128 + signal.SIGTERM


def test_run_without_double_dash():
    out = kr("run", "--upstream", "direct", "sh", "-c", "echo $1 $2", "x", "--allow", "y")
    assert out.returncode == 0
    assert out.stdout == "--allow y\n"


def test_run_command_not_found_is_127():
    out = kr("run", "--allow", "x.org", "--", "no-such-command-kodarelay")
    assert out.returncode == 127
    assert_one_line_error(out.stderr, "no-such-command-kodarelay", "not found")


def test_run_command_not_executable_is_126(tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    out = kr("run", "--", str(script))
    assert out.returncode == 126
    assert_one_line_error(out.stderr, str(script))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--allow", "*.*.com"], "*.*.com"),
        (["--allow", "ok.com", "--deny", "foo.*"], "foo.*"),
        (["--allow", "a.com,"], "''"),
        (["--upstream", "ftp://proxy"], "ftp://proxy"),
        (["--ca-bundle", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        # issue 13: a URL said "invalid port '//pypi.org'", a path "invalid CIDR prefix length"
        (["--allow", "https://pypi.org"], "is a URL; patterns are host[:port], e.g. 'pypi.org' or '*.npmjs.org:443' (did you mean 'pypi.org'?)"),
        (["--allow", "pypi.org?x=1"], "has a path; patterns are host[:port], e.g. 'pypi.org' or '*.npmjs.org:443' (did you mean 'pypi.org'?)"),
        (["--deny", "https://evil.example:8443/x"], "(did you mean 'evil.example:8443'?)"),
    ],
)
def test_run_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    marker = tmp_path / "ran"
    out = kr("run", *args, "--", "touch", str(marker))
    assert out.returncode == 2
    assert_one_line_error(out.stderr, needle)
    assert not marker.exists()


def test_run_without_command_is_usage_error():
    out = kr("run", "--allow", "x.org", "--")
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "no command")


# ── run: signals and cleanup ─────────────────────────────────────────────────

SIGNAL_SCRIPT = """
import os, signal, sys
ready, marker = sys.argv[1], sys.argv[2]
def on_signal(signum, frame):
    with open(marker + ".tmp", "w") as f:
        f.write(signal.Signals(signum).name)
    os.rename(marker + ".tmp", marker)
    os._exit(3)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
with open(ready + ".tmp", "w") as f:
    f.write(os.environ["HTTPS_PROXY"] + "\\n" + str(os.getppid()))
os.rename(ready + ".tmp", ready)
while True:
    signal.pause()
"""


def _wait_file(path: Path, proc: subprocess.Popen[bytes]) -> str:
    def present() -> bool:
        if proc.poll() is not None and not path.exists():
            raise AssertionError(f"kodarelay exited {proc.returncode} early: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        return path.exists()

    wait_until(present, what=str(path))
    return path.read_text()


@pytest.mark.parametrize("isolated", [False, True], ids=["plain", "isolate"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_forwards_signals_and_leaves_nothing_behind(tmp_path, sig, isolated, request):
    if isolated:
        request.getfixturevalue("netns")
    script = write_script(tmp_path / "sleeper.py", SIGNAL_SCRIPT)
    ready, marker = tmp_path / "ready", tmp_path / "got-signal"
    args = [*KR, "run", "--upstream", "direct", *(["--isolate"] if isolated else ["--no-isolate"]), "--", sys.executable, script, str(ready), str(marker)]
    proc = subprocess.Popen(args, env=clean_env(), stderr=subprocess.PIPE)
    try:
        proxy_url, parent = _wait_file(ready, proc).split("\n")
        # The proxy's UDS bridge is named after kodarelay's pid and the proxy's TCP port.
        (uds,) = Path(tempfile.gettempdir()).glob(f"kodarelay-{proc.pid}-*.sock")
        port = int(uds.name[:-len(".sock")].rsplit("-", 1)[1])
        if isolated:
            assert int(parent) != proc.pid  # CMD's parent is the in-namespace helper
            assert proxy_url != f"http://127.0.0.1:{port}"  # ... and its proxy is the helper's forwarder
        else:
            assert int(parent) == proc.pid
            assert proxy_url == f"http://127.0.0.1:{port}"
        assert not port_is_closed(port)
        proc.send_signal(sig)
        assert _wait_file(marker, proc) == sig.name
        assert proc.wait(DEADLINE) == 3
        # Nothing left: no process mentioning the test's files, the port closed, the UDS gone.
        assert procs_mentioning(str(tmp_path)) == []
        assert port_is_closed(port)
        assert not uds.exists()
    finally:
        reap(proc, str(tmp_path))


def test_run_tty_interrupt_reaches_cmd_once(tmp_path):
    """^C on a terminal reaches CMD from the kernel; kodarelay must not send it a second one."""
    script = write_script(
        tmp_path / "count.py",
        """
        import os, signal, sys
        ready, marker = sys.argv[1], sys.argv[2]
        count = 0
        def on_int(signum, frame):
            global count
            count += 1
            with open(marker + ".tmp", "w") as f:
                f.write(str(count))
            os.rename(marker + ".tmp", marker)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGUSR1, lambda s, f: os._exit(10 + count))
        open(ready, "w").close()
        while True:
            signal.pause()
        """,
    )
    ready, marker = tmp_path / "ready", tmp_path / "ints"
    master, slave = os.openpty()

    def take_terminal() -> None:  # runs in the child after setsid(): the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            [*KR, "run", "--", sys.executable, script, str(ready), str(marker)],
            env=clean_env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=take_terminal,
        )
        os.close(slave)
        try:
            _wait_file(ready, proc)
            os.write(master, b"\x03")  # the terminal's intr character: SIGINT to the foreground group
            assert _wait_file(marker, proc) == "1"
            # A kill aimed at kodarelay alone is forwarded. Pending signals are taken lowest
            # first, so a wrongly forwarded SIGINT would reach CMD before this SIGUSR1.
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(DEADLINE) == 11
        finally:
            reap(proc, str(tmp_path))
    finally:
        os.close(master)


# ── run --isolate ────────────────────────────────────────────────────────────


def test_isolate_only_the_proxy_leads_out(netns, http_site, https_site, ca, tmp_path):
    curl = require_tool("curl")
    results = tmp_path / "results"
    script = f"""
        {curl} -sS --noproxy '*' --max-time 5 -o /dev/null http://127.0.0.1:{http_site.port}/ ; echo "direct=$?" >> {results}
        {curl} -sS --noproxy '*' --max-time 5 -o /dev/null http://localhost:{http_site.port}/ ; echo "direct-name=$?" >> {results}
        {curl} -sS -p --max-time 20 http://localhost:{http_site.port}/http >> {results}
        {curl} -sS --max-time 20 {https_site.url('/https')} >> {results}
        {curl} -sS --max-time 20 --proxy "$ALL_PROXY" {https_site.url('/socks')} >> {results}
        {curl} -sS --max-time 20 https://blocked.invalid/ ; echo "blocked=$?" >> {results}
        exit 5
    """
    out = kr(
        "run", "--isolate", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--",
        "sh", "-c", textwrap.dedent(script),
    )
    assert out.returncode == 5, out.stderr
    lines = results.read_text().splitlines()
    direct, direct_name = lines[0], lines[1]
    assert direct != "direct=0" and direct_name != "direct-name=0"  # no route to the host's loopback
    assert lines[2:] == ["hello from /http", "hello from /https", "hello from /socks", "blocked=56"]
    assert "1x blocked.invalid:443  not_allowed" in out.stderr


def test_isolate_cmd_sees_only_loopback(netns, tmp_path):
    code = "import socket; print(sorted(name for _, name in socket.if_nameindex()))"
    out = kr("run", "--isolate", "--upstream", "direct", "--", sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['lo']"


def test_isolate_exit_status_and_not_found(netns):
    assert kr("run", "--isolate", "--", "sh", "-c", "exit 9").returncode == 9
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert kr("run", "--isolate", "--", sys.executable, "-c", code).returncode == 128 + signal.SIGTERM
    out = kr("run", "--isolate", "--", "no-such-command-kodarelay")
    assert out.returncode == 127
    assert_one_line_error(out.stderr, "no-such-command-kodarelay")


def test_isolate_without_unshare_refuses_to_run(tmp_path):
    """No unshare on PATH: a clear line, exit 125, and CMD never runs unfenced."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("touch") or "/usr/bin/touch", bindir / "touch")
    marker = tmp_path / "ran"
    out = kr("run", "--isolate", "--", "touch", str(marker), env=clean_env(PATH=str(bindir)))
    assert out.returncode == 125
    assert_one_line_error(out.stderr, "unshare", "unfenced")
    assert not marker.exists()


# ── serve ────────────────────────────────────────────────────────────────────


class Lines:
    """Read lines from a pipe with a deadline (no thread, no blind sleep)."""

    def __init__(self, pipe) -> None:  # type: ignore[no-untyped-def]
        self.fd = pipe.fileno()
        self.buf = b""

    def readline(self, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no line within {timeout}s; have {self.buf!r}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF; have {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def read_available(self) -> str:
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.buf += chunk
        text, self.buf = self.buf.decode(), b""
        return text


def _start_serve(*args: str) -> tuple[subprocess.Popen[bytes], dict[str, str], Lines]:
    proc = subprocess.Popen([*KR, "serve", *args], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = Lines(proc.stderr)
    status = err.readline()  # printed after the exports were flushed
    assert status.startswith("kodarelay: serving on 127.0.0.1:"), status
    exports = {}
    for line in Lines(proc.stdout).read_available().splitlines():
        m = re.fullmatch(r"export ([A-Za-z_]+)='([^']*)'", line)
        assert m, line
        exports[m[1]] = m[2]
    return proc, exports, err


def test_serve_prints_exports_serves_and_stops_on_sigterm(https_site, ca):
    curl = require_tool("curl")
    proc, exports, err = _start_serve("--allow", "localhost", "--upstream", "direct")
    try:
        port = int(exports["HTTPS_PROXY"].rsplit(":", 1)[1])
        assert exports["ALL_PROXY"] == f"http://127.0.0.1:{port}"
        assert exports["NO_PROXY"] == ""
        env = clean_env(**exports, CURL_CA_BUNDLE=str(ca[0]))
        ok = subprocess.run([curl, "-sS", "--max-time", "20", https_site.url("/served")], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert ok.stdout == "hello from /served\n", ok.stderr
        socks = subprocess.run(
            [curl, "-sS", "--max-time", "20", "--proxy", f"socks5h://127.0.0.1:{port}", https_site.url("/socks")],
            env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        assert socks.stdout == "hello from /socks\n", socks.stderr
        refused = subprocess.run([curl, "-sS", "--max-time", "20", "https://blocked.invalid/"], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert refused.returncode != 0
        assert "refused http blocked.invalid:443 (not_allowed)" in err.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
        assert "stopped (1 refused)" in err.readline()
        assert port_is_closed(port)
        assert not os.path.exists(proxy_uds_path(proc.pid, port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_separate_socks5_port_and_sigint(https_site, ca):
    curl = require_tool("curl")
    proc, exports, _err = _start_serve("--allow", "localhost", "--upstream", "direct", "--socks5-port", "0")
    try:
        http_port = int(exports["HTTPS_PROXY"].rsplit(":", 1)[1])
        socks_port = int(exports["ALL_PROXY"].rsplit(":", 1)[1])
        assert exports["ALL_PROXY"].startswith("socks5h://") and socks_port != http_port
        out = subprocess.run(
            [curl, "-sS", "--max-time", "20", "--cacert", str(ca[0]), "--proxy", exports["ALL_PROXY"], https_site.url("/s")],
            env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        assert out.stdout == "hello from /s\n", out.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(DEADLINE) == 0
        assert port_is_closed(http_port) and port_is_closed(socks_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_port_in_use_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = kr("serve", "--port", str(port), "--upstream", "direct")
    assert out.returncode == 1
    assert out.stdout == ""
    assert_one_line_error(out.stderr, f"127.0.0.1:{port}", "in use")


def test_isolate_namespace_failure_refuses_to_run(tmp_path):
    """unshare present but not permitted: CMD is not run, kodarelay says why and exits 125."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    marker = tmp_path / "ran"
    out = kr("run", "--isolate", "--", "touch", str(marker), env=clean_env(PATH=f"{bindir}:{os.environ['PATH']}"))
    assert out.returncode == 125
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("kodarelay: --isolate: could not set up the network namespace")
    assert "CMD was not run" in out.stderr
    assert not marker.exists()
    assert procs_mentioning(str(tmp_path)) == []

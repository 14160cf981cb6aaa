"""The command's hooks, run as a user would: ``--events``, ``--learn``, ``--policy``, ``--dns-ttl``."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from peers import DEADLINE, CannedProxy, WebServer, require_tool, wait_until
from test_cli import _start_serve, clean_env, kr


@pytest.fixture
def http_site():  # type: ignore[no-untyped-def]
    site = WebServer()
    yield site
    site.close()


def _curl_p(url: str) -> list[str]:
    return [require_tool("curl"), "-sS", "-p", "--max-time", "20", url]


def test_run_events_jsonl_allow_end_refuse_and_never_a_path(http_site, tmp_path):
    events = tmp_path / "events.jsonl"
    curl = require_tool("curl")
    script = (f"{curl} -sS -p --max-time 20 '{http_site.url('/secret-path?token=abc123')}'; "
              f"{curl} -sS --max-time 20 '{http_site.url('/fwd-secret?token=abc123#frag-secret')}'; "
              f"{curl} -sS --max-time 20 'http://user:pw-secret@refused.test/p-secret?token=abc123'; "
              f"{curl} -sS --max-time 20 'https://refused.test/p?token=abc123'; exit 0")
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--events", str(events), "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    text = events.read_text()
    for secret in ("secret", "abc123", "token", "pw-", "frag"):
        assert secret not in text and secret not in out.stderr, secret
    rows = [json.loads(line) for line in text.splitlines()]
    kinds = [(r["kind"], r["host"]) for r in rows]
    assert ("allow", "localhost") in kinds and ("end", "localhost") in kinds and ("refuse", "refused.test") in kinds
    allow = next(r for r in rows if r["kind"] == "allow")
    end = next(r for r in rows if r["kind"] == "end")
    assert allow["tunnel_id"] == end["tunnel_id"] and allow["port"] == http_site.port
    assert end["bytes_down"] > 0 and end["bytes_up"] > 0 and end["duration"] >= 0


def test_run_events_to_stderr(http_site):
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--events", "-", "--", *_curl_p(http_site.url("/")))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in rows] == ["allow", "end"]


def test_run_verbose_counts_allowed_connections(http_site):
    out = kr("run", "-v", "--allow", "localhost", "--upstream", "direct", "--", "sh", "-c",
             " ; ".join([" ".join(_curl_p(http_site.url("/a")))] * 2))
    assert out.returncode == 0, out.stderr
    assert "kodarelay: allowed 2 connections to 1 host" in out.stderr


def test_run_learn_prints_the_exact_flags_cmd_needed(http_site, tmp_path):
    other = WebServer()
    try:
        out_file = tmp_path / "learned.policy"
        script = (" ".join(_curl_p(http_site.url("/one"))) + " ; " + " ".join(_curl_p(f"http://127.0.0.1:{other.port}/two")))
        # The guard still applies in learn mode: an IP rule lets names resolving to loopback through.
        out = kr("run", "--learn", "--learn-out", str(out_file), "--allow", "127.0.0.0/8", "--deny", "denied.test",
                 "--upstream", "direct", "--", "sh", "-c", script + f" ; {require_tool('curl')} -s https://denied.test/ ; exit 0")
        assert "hello from /one" in out.stdout and "hello from /two" in out.stdout, out.stderr
        flags = f"--allow 127.0.0.1:{other.port} --allow localhost:{http_site.port}"
        assert flags in out.stderr
        assert out_file.read_text().splitlines()[1:] == [f"allow 127.0.0.1:{other.port}", f"allow localhost:{http_site.port}"]
        assert "denied.test" in out.stderr and "denied" in out.stderr        # deny rules still refuse
        # the learned policy admits exactly what was reached
        again = kr("run", "--policy", str(out_file), "--upstream", "direct", "--", "sh", "-c", script)
        assert "hello from /one" in again.stdout and "hello from /two" in again.stdout, again.stderr
    finally:
        other.close()


def test_serve_policy_file_reloads_on_change_and_sighup_and_keeps_old_on_error(http_site, tmp_path):
    curl = require_tool("curl")
    policy = tmp_path / "policy"
    policy.write_text("# nothing yet\nallow other.test\n")
    proc, exports, err = _start_serve("--policy", str(policy), "--upstream", "direct")
    env = clean_env(**exports)

    def fetch() -> int:
        return subprocess.run([curl, "-s", "-o", "/dev/null", "-p", "--max-time", "20", http_site.url("/")], env=env,
                              timeout=DEADLINE).returncode

    try:
        assert fetch() != 0
        policy.write_text("allow localhost\n")
        wait_until(lambda: fetch() == 0, what="the policy file change to take effect")
        policy.write_text("allow localhost\nallow bad pattern here\n")
        wait_until(lambda: "keeping the old one" in err.read_available() or False, what="the bad file to be reported")
        assert fetch() == 0                         # the old policy stays
        policy.write_text("deny localhost\n")
        os.utime(policy, ns=(0, 0))                 # (a change the watcher may miss: SIGHUP reloads anyway)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: fetch() != 0, what="SIGHUP to reload the policy")
        assert proc.poll() is None                  # SIGHUP reloads, it does not stop serve
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_policy_file_at_start_is_a_usage_error(tmp_path):
    policy = tmp_path / "policy"
    policy.write_text("allow ok.test\npermit x.test\n")
    out = kr("run", "--policy", str(policy), "--", "true")
    assert out.returncode == 2
    assert f"{policy}:2" in out.stderr and "Traceback" not in out.stderr
    out = kr("run", "--dns-ttl", "-1", "--", "true")
    assert out.returncode == 2 and "--dns-ttl" in out.stderr


def test_an_upstream_refusal_is_visible_in_the_summary_and_events(tmp_path):
    """issue 13.5: chained through a proxy that answers 403, the client saw 502 and kodarelay
    said nothing."""
    corporate = CannedProxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    events = tmp_path / "e.jsonl"
    try:
        out = kr("run", "--allow", "pkg.test", "--upstream", f"http://127.0.0.1:{corporate.port}",
                 "--events", str(events), "--", require_tool("curl"), "-sS", "--max-time", "20", "https://pkg.test/")
    finally:
        corporate.close()
    assert out.returncode != 0
    assert "1x pkg.test:443  upstream_refused: upstream refused (403)" in out.stderr
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(r.get("reason"), r.get("detail")) for r in rows if r["kind"] == "end"] == [
        ("upstream_refused", "upstream refused (403)")]


def test_run_ask_prompts_on_the_terminal_and_remembers_always(http_site, tmp_path):
    """``--ask``: the person at the terminal admits a host no rule matches ("a": always)."""
    import fcntl
    import select
    import termios
    import time

    from test_cli import KR, reap

    curl = require_tool("curl")
    fetch = " ".join(_curl_p(http_site.url("/asked")))
    master, slave = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # 127.0.0.0/8 lets the name through the guard; no rule admits the name itself
    proc = subprocess.Popen([*KR, "run", "--ask", "--allow", "127.0.0.0/8", "--upstream", "direct", "--", "sh", "-c",
                             f"{fetch} ; {fetch} ; {curl} -s -o /dev/null -w '%{{http_code}}' -p https://other.test/ ; exit 0"],
                            env=clean_env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=take_terminal)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + DEADLINE
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([master], [], [], left)[0], seen
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        assert marker in seen, seen

    try:
        read_until(f"CONNECT localhost:{http_site.port} (http) is not on the allowlist".encode())
        os.write(master, b"a\n")
        read_until(b"hello from /asked")
        read_until(b"CONNECT other.test:443 (http) is not on the allowlist")
        os.write(master, b"n\n")
        assert proc.wait(DEADLINE) == 0
        read_until(b"other.test:443  decider_denied")
        assert seen.count(b"is not on the allowlist") == 2       # "always" was remembered
        assert seen.count(b"hello from /asked") == 2
    finally:
        reap(proc, "--ask")
        os.close(master)


def test_ask_without_a_terminal_is_a_usage_error():
    out = kr("run", "--ask", "--", "true", stdin=subprocess.DEVNULL, start_new_session=True)
    assert out.returncode == 2 and "--ask needs a terminal" in out.stderr



class _Terminal:
    """``kodarelay run`` with a pty as its controlling terminal, read as a person sees it."""

    def __init__(self, argv: list[str]) -> None:
        import fcntl
        import termios

        from test_cli import KR

        self.master, slave = os.openpty()

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([*KR, *argv], env=clean_env(), stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=take_terminal)
        os.close(slave)
        self.seen = b""

    def read_until(self, marker: bytes) -> None:
        import select
        import time

        deadline = time.monotonic() + DEADLINE
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.master], [], [], left)[0], self.seen
            try:
                data = os.read(self.master, 4096)
            except OSError:       # EIO: every writer is gone
                break
            if not data:
                break
            self.seen += data
        assert marker in self.seen, self.seen

    def close(self) -> None:
        from test_cli import reap

        reap(self.proc, "--ask")
        os.close(self.master)


def test_run_ask_question_open_when_cmd_ends_is_withdrawn(tmp_path):
    """A question still open when CMD exits ends with CMD: no 5-minute wait, no "Task was
    destroyed", and the summary says the question was never answered (not "you answered no")."""
    curl = require_tool("curl")
    go = tmp_path / "go"
    script = (f"{curl} -s -o /dev/null --max-time 30 -p https://asked.test/ & "
              f"while [ ! -e '{go}' ]; do sleep 0.02; done; exit 7")
    term = _Terminal(["run", "--ask", "--upstream", "direct", "--", "sh", "-c", script])
    try:
        term.read_until(b"CONNECT asked.test:443 (http) is not on the allowlist")
        go.touch()
        assert term.proc.wait(DEADLINE) == 7
        term.read_until(b"asked.test:443  decider_error: not answered")
        assert b"question withdrawn" in term.seen
        assert b"Task was destroyed" not in term.seen and b"you answered no" not in term.seen
    finally:
        term.close()


def test_run_ask_no_is_summarised_as_your_answer():
    """The summary of an ``--ask`` refusal speaks to the person who answered."""
    term = _Terminal(["run", "--ask", "--upstream", "direct", "--", *_curl_p("https://nope.test/")])
    try:
        term.read_until(b"CONNECT nope.test:443 (http) is not on the allowlist")
        os.write(term.master, b"n\n")
        assert term.proc.wait(DEADLINE) != 0
        term.read_until(b"nope.test:443  decider_denied: you answered no")
    finally:
        term.close()


def _loopback_name() -> str:
    """A name other than localhost that the system resolves to loopback only (the machine's
    own hostname on Debian-like systems), or skip."""
    import ipaddress
    import socket

    name = socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"{name!r} does not resolve")
    if name == "localhost" or not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        pytest.skip(f"{name!r} does not resolve to loopback only: {addrs}")
    return name


def test_run_learned_policy_replays_a_name_served_on_loopback(tmp_path):
    """``--learn`` with ``--allow 127.0.0.1`` learned ``site.test:8080`` but not the address
    rule the guard needed, so ``--policy learned`` refused everything it had learned."""
    name = _loopback_name()
    site = WebServer()
    try:
        out_file = tmp_path / "learned.policy"
        fetch = " ".join(_curl_p(f"http://{name}:{site.port}/learned"))
        out = kr("run", "--learn", "--learn-out", str(out_file), "--allow", "127.0.0.0/8", "--upstream", "direct",
                 "--", "sh", "-c", fetch)
        assert "hello from /learned" in out.stdout, out.stderr
        lines = out_file.read_text().splitlines()[1:]
        assert f"allow {name}:{site.port}" in lines and f"allow 127.0.0.1:{site.port}" in lines, lines
        assert "127.0.0.0/8" not in out_file.read_text()          # never the wider range that admitted it
        again = kr("run", "--policy", str(out_file), "--upstream", "direct", "--", "sh", "-c", fetch)
        assert again.returncode == 0 and "hello from /learned" in again.stdout, again.stderr
    finally:
        site.close()

"""The agent runtime's hooks on real proxies: the decider, events, attribution.

Runs on whichever front-end the run selects (CI runs it with and without
``KODARELAY_NO_NATIVE_FRONTEND``) and both relay implementations.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig, proxy_env_vars
from kodarelay.events import Event, Request

from peers import DEADLINE, connect, http_connect, pinned, recv_exact, require_tool, socks5_connect, status_of, wait_until


class Decider:
    """A decider that records what it was asked and answers from a table (default "deny")."""

    def __init__(self, answers: dict[str, object] | None = None, delay: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[Request] = []
        self.delay = delay
        self.gate = gate

    async def __call__(self, request: Request) -> object:
        self.asked.append(request)
        if self.gate is not None:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answers.get(request.host, "deny")
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Events:
    def __init__(self) -> None:
        self.items: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.items.append(event)

    def kinds(self) -> list[tuple[str, str | None]]:
        with self.lock:
            return [(e.kind, e.reason) for e in self.items]


def start_app(start_proxy, **options):  # type: ignore[no-untyped-def]
    """A proxy whose rules admit no name, whose guard admits 127.0.0.1 (an IP rule names it),
    and where ``app.test`` resolves there: what a decider allows can be reached on loopback."""
    return start_proxy(["127.0.0.1"], resolver=pinned({"app.test": ["127.0.0.1"]}), **options)


def _status(port: int, target: str, extra: bytes = b"") -> tuple[socket.socket, int, bytes]:
    s, head = http_connect(port, target, extra)
    return s, status_of(head), head


@pytest.mark.parametrize("answer, status, reason", [
    ("allow", 200, None),
    (True, 200, None),
    ("allow_always", 200, None),
    ("deny", 403, "decider_denied"),
    (False, 403, "decider_denied"),
    ("deny_always", 403, "decider_denied"),
    ("maybe", 403, "decider_error"),
    (None, 403, "decider_error"),
    (RuntimeError("boom"), 403, "decider_error"),
])
def test_decider_answers(start_proxy, echo, answer, status, reason):
    d = Decider({"app.test": answer})
    h = start_app(start_proxy, decider=d)
    s, code, head = _status(h.port, f"App.Test.:{echo.port}")
    assert code == status
    assert [(r.protocol, r.method, r.host, r.port) for r in d.asked] == [("http", "CONNECT", "app.test", echo.port)]
    if reason is None:
        s.sendall(b"ok")
        assert recv_exact(s, 2) == b"ok"
        assert h.violations() == []
    else:
        assert f"X-Proxy-Error: {reason}".encode() in head
        assert [v.reason for v in h.violations()] == [reason]
        assert echo.accepted == 0


def test_decider_timeout_refuses(start_proxy, echo):
    d = Decider(delay=30)
    h = start_app(start_proxy, decider=d, decider_timeout=0.2)
    s, code, head = _status(h.port, f"app.test:{echo.port}")
    assert code == 403 and b"X-Proxy-Error: decider_timeout" in head
    assert [v.reason for v in h.violations()] == ["decider_timeout"]


def test_the_client_waits_with_its_early_bytes_kept(start_proxy, echo):
    gate = threading.Event()
    d = Decider({"app.test": "allow"}, gate=gate)
    h = start_app(start_proxy, decider=d)
    s = connect(h.port)
    s.sendall(f"CONNECT app.test:{echo.port} HTTP/1.1\r\n\r\nearly".encode())
    wait_until(lambda: d.asked, what="the decider to be asked")
    gate.set()
    assert recv_exact(s, 39) == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert recv_exact(s, 5) == b"early"


def test_always_is_asked_once_for_many_clients_until_the_filter_changes(start_proxy, echo):
    gate = threading.Event()
    d = Decider({"app.test": "allow_always"}, gate=gate)
    h = start_app(start_proxy, decider=d)
    socks = []
    for _ in range(5):
        s = connect(h.port)
        s.sendall(f"CONNECT app.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
        socks.append(s)
    wait_until(lambda: d.asked, what="the decider to be asked")
    gate.set()
    for s in socks:
        assert recv_exact(s, 12) == b"HTTP/1.1 200"
    _status(h.port, f"app.test:{echo.port}")[0].close()
    assert len(d.asked) == 1
    h.set_filter(Filter(["127.0.0.1"]))
    assert _status(h.port, f"app.test:{echo.port}")[1] == 200
    assert len(d.asked) == 2


def test_a_slow_decider_stalls_neither_tunnels_nor_other_decisions(start_proxy, echo):
    gate = threading.Event()
    d = Decider({"app.test": "allow", "other.test": "allow"}, gate=gate)
    h = start_app(start_proxy, decider=d)
    pending = connect(h.port)
    pending.sendall(f"CONNECT app.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
    wait_until(lambda: d.asked, what="the decider to be asked")
    t0 = time.monotonic()
    s, code, _ = _status(h.port, f"127.0.0.1:{echo.port}")      # a rule: no decider
    assert code == 200
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    assert time.monotonic() - t0 < 5
    gate.set()
    assert recv_exact(pending, 12) == b"HTTP/1.1 200"


@pytest.mark.parametrize("target, reason", [
    ("evil.test:443", "denied"),
    ("bad_host..test:443", "bad_host"),
    ("169.254.169.254:80", "resolved_address"),
    ("127.0.0.1:9", "resolved_address"),
    ("[::1]:9", "resolved_address"),
])
def test_the_decider_is_never_asked_about_denied_bad_or_guarded_targets(target, reason):
    d = Decider({"evil.test": "allow", "169.254.169.254": "allow", "127.0.0.1": "allow", "::1": "allow"})
    with BuiltInProxy(Filter([], deny=["evil.test"]), upstream=UpstreamConfig.direct(), decider=d).start() as h:
        s, code, head = _status(h.port, target)
        assert code == 403 and f"X-Proxy-Error: {reason}".encode() in head
    assert d.asked == []


def test_a_name_the_decider_allows_is_still_guarded():
    d = Decider({"meta.test": "allow"})
    with BuiltInProxy(Filter([]), upstream=UpstreamConfig.direct(), decider=d,
                      resolver=pinned({"meta.test": ["169.254.169.254"]})).start() as h:
        s, code, head = _status(h.port, "meta.test:80")
        assert code == 403 and b"X-Proxy-Error: resolved_address" in head
    assert len(d.asked) == 1


def test_socks5_asks_the_decider_too(start_proxy, echo):
    d = Decider({"app.test": "allow"})
    h = start_app(start_proxy, cls=BuiltInSocks5Proxy, decider=d)
    s, rep = socks5_connect(h.port, b"app.test", echo.port)
    assert rep[:2] == b"\x05\x00"
    s2, rep = socks5_connect(h.port, b"nope.test", 443)
    assert rep[:2] == b"\x05\x02"
    assert [(r.protocol, r.host) for r in d.asked] == [("socks5", "app.test"), ("socks5", "nope.test")]


# ── events ───────────────────────────────────────────────────────────────────


def test_events_one_allow_and_one_end_per_tunnel_with_byte_counts(start_proxy, echo):
    ev = Events()
    h = start_proxy(["localhost"], on_event=ev)
    s, code, _ = _status(h.port, f"localhost:{echo.port}", b"early")
    assert code == 200
    assert recv_exact(s, 5) == b"early"
    s.sendall(b"x" * 1000)
    assert len(recv_exact(s, 1000)) == 1000
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    s, code, _ = _status(h.port, f"evil.test:{echo.port}")
    assert code == 403
    wait_until(lambda: len(ev.items) == 3, what=f"three events (have {ev.kinds()})")
    allow, second, third = ev.items
    end, refuse = (second, third) if second.kind == "end" else (third, second)
    assert (allow.kind, allow.host, allow.port, allow.source, allow.rule) == (
        "allow", "localhost", echo.port, "rule", "localhost")
    assert (end.kind, end.tunnel_id, end.bytes_up, end.bytes_down) == ("end", allow.tunnel_id, 1005, 1005)
    assert end.duration is not None and end.duration >= 0
    assert (refuse.kind, refuse.reason, refuse.source, refuse.host) == ("refuse", "not_allowed", "default", "evil.test")


def test_a_slow_event_callback_never_delays_traffic(start_proxy, echo):
    release = threading.Event()

    def slow(event: Event) -> None:
        release.wait(DEADLINE)

    h = start_proxy(["localhost"], on_event=slow)
    try:
        t0 = time.monotonic()
        for _ in range(5):
            s, code, _ = _status(h.port, f"localhost:{echo.port}")
            assert code == 200
            s.close()
        assert time.monotonic() - t0 < 5
    finally:
        release.set()


def test_an_event_callback_that_raises_is_logged_and_swallowed(start_proxy, echo, caplog):
    calls = []

    def bad(event: Event) -> None:
        calls.append(event)
        raise ValueError("nope")

    h = start_proxy(["localhost"], on_event=bad)
    for _ in range(2):
        s, code, _ = _status(h.port, f"localhost:{echo.port}")
        assert code == 200
        s.close()
    wait_until(lambda: len(calls) >= 2, what="both allow events")


def test_decider_events_say_so(start_proxy, echo):
    ev = Events()
    h = start_app(start_proxy, decider=Decider({"app.test": "allow"}), on_event=ev)
    _status(h.port, f"app.test:{echo.port}")[0].close()
    _status(h.port, "nope.test:443")
    wait_until(lambda: {e.kind for e in ev.items} >= {"allow", "refuse"}, what="allow and refuse events")
    by_kind = {e.kind: e for e in ev.items}
    assert (by_kind["allow"].source, by_kind["refuse"].source, by_kind["refuse"].reason) == (
        "decider", "decider", "decider_denied")


# ── attribution ──────────────────────────────────────────────────────────────


def test_proxy_env_vars_carry_the_client():
    env = dict(proxy_env_vars(8080, client="job-7"))
    assert env["HTTPS_PROXY"] == "http://job-7:@127.0.0.1:8080"
    from kodarelay import socks5_env_vars

    assert dict(socks5_env_vars(8080, client="job 7"))["ALL_PROXY"] == "socks5h://job%207:@127.0.0.1:8080"
    with pytest.raises(ValueError):
        proxy_env_vars(8080, client="a\nb")


def _client_env(port: int, client: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(proxy_env_vars(port, no_proxy="", client=client))
    return env


def test_attribution_through_curl(start_proxy):
    curl = require_tool("curl")
    ev = Events()
    h = start_proxy(["localhost"], on_event=ev)
    r = subprocess.run([curl, "-sS", "-o", "/dev/null", "https://refused.test/"], env=_client_env(h.port, "job-7"),
                       capture_output=True, timeout=DEADLINE)
    assert r.returncode != 0
    [v] = h.violations()
    assert (v.host, v.client) == ("refused.test", "job-7")
    wait_until(lambda: ev.items, what="the refuse event")
    assert ev.items[0].client == "job-7"


def test_attribution_through_requests(start_proxy):
    requests = pytest.importorskip("requests")
    h = start_proxy(["localhost"])
    env = _client_env(h.port, "job-8")
    code = ("import requests,sys\n"
            "try: requests.get('https://refused.test/', timeout=10)\n"
            "except requests.exceptions.ProxyError: sys.exit(3)\n")
    r = subprocess.run([os.sys.executable, "-c", code], env=env, capture_output=True, timeout=DEADLINE)
    assert r.returncode == 3, r.stderr
    assert [(v.host, v.client) for v in h.violations()] == [("refused.test", "job-8")]
    del requests


def test_attribution_through_pip(start_proxy, tmp_path):
    h = start_proxy(["localhost"])
    env = _client_env(h.port, "job-9")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    r = subprocess.run([os.sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp_path), "--retries",
                        "0", "--timeout", "5", "--index-url", "https://refused.test/simple/", "nothing-here"],
                       env=env, capture_output=True, timeout=60)
    assert r.returncode != 0
    clients = {(v.host, v.client) for v in h.violations()}
    assert clients == {("refused.test", "job-9")}


def test_attribution_through_git(start_proxy, tmp_path):
    git = require_tool("git")
    h = start_proxy(["localhost"])
    env = _client_env(h.port, "job-10")
    env.update(GIT_TERMINAL_PROMPT="0", HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1")
    r = subprocess.run([git, "ls-remote", "https://refused.test/repo.git"], env=env, capture_output=True,
                       timeout=DEADLINE)
    assert r.returncode != 0
    assert {(v.host, v.client) for v in h.violations()} == {("refused.test", "job-10")}


def test_a_cached_decision_never_skips_the_decider_after_set_filter(start_proxy, echo):
    """Rules admitted app.test (its plan is cached, in the engine too); once the filter no
    longer names it, the next request goes to the decider."""
    d = Decider({"app.test": "deny"})
    h = start_proxy(["app.test", "127.0.0.1"], resolver=pinned({"app.test": ["127.0.0.1"]}), decider=d)
    for _ in range(3):
        s, code, _ = _status(h.port, f"app.test:{echo.port}")
        assert code == 200
        s.close()
    assert d.asked == []
    h.set_filter(Filter(["127.0.0.1"]))
    s, code, head = _status(h.port, f"app.test:{echo.port}")
    assert code == 403 and b"X-Proxy-Error: decider_denied" in head
    assert [r.host for r in d.asked] == ["app.test"]

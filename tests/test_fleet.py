"""Many sandboxes, one proxy: named clients, their tokens, rules and limits, and the metrics.

Real parts: the proxy on port 0, echo servers on loopback, HTTP CONNECT and SOCKS5 spoken
on raw sockets, requests / curl with credentials in the proxy URL, and the metrics scraped
and parsed with prometheus_client's own parser. Runs on both front-ends and both relays.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
import threading

import pytest

from peers import DEADLINE, WebServer, connect, read_head, recv_exact, status_of, wait_until

from kodarelay import BuiltInSocks5Proxy, ClientPolicy, Filter, PatternError, proxy_env_vars  # noqa: E402
from kodarelay.clients import parse_period, parse_size  # noqa: E402
from kodarelay.policyfile import PolicyError, parse_policy  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0ken-of-job-7"
SHA = hashlib.sha256(TOKEN.encode()).hexdigest()


def _connect(port: int, target: str, user: str | None = None, password: str | None = None) -> tuple[socket.socket, bytes]:
    s = connect(port)
    auth = ""
    if user is not None:
        cred = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        auth = f"Proxy-Authorization: Basic {cred}\r\n"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    return s, read_head(s)


def _socks(port: int, host: bytes, dport: int, user: bytes | None, password: bytes = b"") -> tuple[socket.socket, bytes]:
    s = connect(port)
    if user is None:
        s.sendall(b"\x05\x01\x00")
        method = recv_exact(s, 2)
        if method != b"\x05\x00":
            return s, method
    else:
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = recv_exact(s, 2)
        if status != b"\x01\x00":
            return s, status
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + dport.to_bytes(2, "big"))
    return s, recv_exact(s, 10)


# ── the policy objects ───────────────────────────────────────────────────────


def test_client_policy_checks_what_it_is_given():
    p = ClientPolicy("job-7", allow=["pypi.org"], token_sha256="SHA256:" + SHA.upper())
    assert p.token_sha256 == SHA and p.allow == ("pypi.org",)
    for bad in ({"name": ""}, {"name": "a:b"}, {"name": "a b"}, {"name": "x", "token_sha256": "abc"}, {"name": "x", "rate": 0},
                {"name": "x", "max_tunnels": -1}, {"name": "x", "upload_period": 0}):
        with pytest.raises(ValueError):
            ClientPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(PatternError, match="https://"):
        ClientPolicy("x", allow=["https://pypi.org"])
    assert parse_size("100M") == 100_000_000 and parse_size("1Gi") == 1 << 30 and parse_size("512") == 512
    assert parse_period("30s") == 30 and parse_period("30m") == 1800 and parse_period("1h") == 3600


def test_policy_file_sections():
    text = f"""
        allow pypi.org
        deny evil.test
        require-auth
        client job-7 sha256:{SHA}
          allow github.com
          read-only api.test
          limit tunnels 4
          limit rate 10/s burst 20
          limit upload 100M per 1h
        client job-8
          deny pypi.org
    """
    p = parse_policy(text, "fleet.policy")
    assert p.allow == ("pypi.org",) and p.deny == ("evil.test",) and p.require_auth
    a, b = p.clients
    assert (a.name, a.token_sha256, a.allow, a.max_tunnels, a.rate, a.burst, a.upload_bytes, a.upload_period) == \
        ("job-7", SHA, ("github.com", "read-only api.test"), 4, 10.0, 20.0, 100_000_000, 3600.0)
    assert b.deny == ("pypi.org",) and b.token_sha256 is None
    for bad, where in (("limit tunnels 3", ":1:"), ("client a\nlimit rate fast", ":2:"),
                       ("client a\nrequire-auth", ":2:"), ("client a sha256:zz", ":1:"),
                       ("client a\nclient a", ":2:"), ("client a\nlimit upload 1X per 1h", ":2:")):
        with pytest.raises(PolicyError, match=where):
            parse_policy(bad, "f")


# ── who is who ───────────────────────────────────────────────────────────────


def test_a_token_is_checked_by_its_hash(start_proxy, echo):
    h = start_proxy(["example.invalid"], clients=[ClientPolicy("job-7", allow=["localhost"], token_sha256=SHA)])
    target = f"localhost:{echo.port}"
    s, head = _connect(h.port, target, "job-7", TOKEN)
    assert status_of(head) == 200
    s.sendall(b"ping")
    assert recv_exact(s, 4) == b"ping"
    s.close()
    for user, password in (("job-7", "wrong"), ("job-7", None)):
        s, head = _connect(h.port, target, user, password)
        assert status_of(head) == 407 and b'Proxy-Authenticate: Basic realm="kodarelay"' in head
        assert b"X-Proxy-Error: unauthenticated" in head
        s.close()
    s, head = _connect(h.port, target)                      # no client: the global rules
    assert status_of(head) == 403
    s.close()
    v = [x for x in h.violations() if x.reason == "unauthenticated"]
    assert len(v) == 2 and all(x.client == "job-7" for x in v)
    assert TOKEN not in repr(h.violations())


def test_require_auth_refuses_the_unnamed(start_proxy, echo):
    h = start_proxy(["localhost"], clients=[ClientPolicy("job-7", token_sha256=SHA)], require_auth=True)
    target = f"localhost:{echo.port}"
    for user in (None, "stranger"):
        s, head = _connect(h.port, target, user, "x")
        assert status_of(head) == 407
        s.close()
    s, head = _connect(h.port, target, "job-7", TOKEN)
    assert status_of(head) == 200
    s.close()


def test_a_clients_rules_add_to_the_global_ones(start_proxy, echo):
    from kodarelay import BuiltInProxy, UpstreamConfig

    h = BuiltInProxy(Filter(["example.invalid"], deny=["127.0.0.2"]), upstream=UpstreamConfig.direct(),
                     clients=[ClientPolicy("a", allow=["localhost", "127.0.0.0/8"]), ClientPolicy("b")]).start()
    try:
        target = f"localhost:{echo.port}"
        s, head = _connect(h.port, target, "a")
        assert status_of(head) == 200
        s.close()
        s, head = _connect(h.port, target, "b")            # b has no such rule
        assert status_of(head) == 403
        s.close()
        s, head = _connect(h.port, f"127.0.0.2:{echo.port}", "a")     # a global deny still holds
        assert status_of(head) == 403
        s.close()
    finally:
        h.shutdown()


def test_socks5_credentials(start_proxy, echo):
    h = start_proxy(["localhost"], cls=BuiltInSocks5Proxy, clients=[ClientPolicy("job-7", token_sha256=SHA)],
                    require_auth=True)
    s, rep = _socks(h.port, b"localhost", echo.port, b"job-7", TOKEN.encode())
    assert rep[:2] == b"\x05\x00"
    s.close()
    s, status = _socks(h.port, b"localhost", echo.port, b"job-7", b"nope")
    assert status == b"\x01\x01"                                  # RFC 1929: failure
    s.close()
    s, method = _socks(h.port, b"localhost", echo.port, None)
    assert method == b"\x05\xff"                                  # no-auth only, auth required
    s.close()
    # (the engine's refusals reach the log from its completer thread: soon, not at once)
    wait_until(lambda: {v.reason for v in h.violations()} == {"unauthenticated"}, what="the refusals recorded")


# ── limits ───────────────────────────────────────────────────────────────────


def test_max_tunnels_holds_for_one_client_only(start_proxy, echo):
    h = start_proxy(["localhost"], clients=[ClientPolicy("a", max_tunnels=2), ClientPolicy("b")])
    target = f"localhost:{echo.port}"
    held = [_connect(h.port, target, "a") for _ in range(2)]
    assert all(status_of(head) == 200 for _, head in held)
    s, head = _connect(h.port, target, "a")
    assert status_of(head) == 429 and b"too_many_tunnels" in head
    s.close()
    s, head = _connect(h.port, target, "b")                      # others unaffected
    assert status_of(head) == 200
    s.close()
    held[0][0].close()
    wait_until(lambda: status_of(_connect(h.port, target, "a")[1]) == 200, what="a slot freed")


def test_rate_with_burst(start_proxy, echo):
    h = start_proxy(["localhost"], clients=[ClientPolicy("a", rate=0.001, burst=2)])
    target = f"localhost:{echo.port}"
    codes = []
    for _ in range(3):
        s, head = _connect(h.port, target, "a")
        codes.append(status_of(head))
        s.close()
    assert codes == [200, 200, 429]
    assert any(v.reason == "rate_limited" for v in h.violations())


def test_socks5_limits_answer_rep_2(start_proxy, echo):
    h = start_proxy(["localhost"], cls=BuiltInSocks5Proxy, clients=[ClientPolicy("a", rate=0.001, burst=1)])
    s, rep = _socks(h.port, b"localhost", echo.port, b"a")
    assert rep[1] == 0
    s.close()
    s, rep = _socks(h.port, b"localhost", echo.port, b"a")
    assert rep[1] == 2
    s.close()


def test_upload_budget_refuses_new_tunnels_and_closes_open_ones(start_proxy, echo):
    h = start_proxy(["localhost"], clients=[ClientPolicy("a", upload_bytes=1000, upload_period=3600),
                                            ClientPolicy("b")])
    target = f"localhost:{echo.port}"
    idle, head = _connect(h.port, target, "a")                  # an open tunnel of a's
    assert status_of(head) == 200
    s, head = _connect(h.port, target, "a")
    assert status_of(head) == 200
    s.sendall(b"x" * 5000)
    assert recv_exact(s, 5000) == b"x" * 5000
    s.close()                                                     # charged at its end: over the budget
    idle.settimeout(DEADLINE)
    assert idle.recv(10) == b""                                   # a's open tunnel is closed
    wait_until(lambda: status_of(_connect(h.port, target, "a")[1]) == 429, what="a's budget refusal")
    s, head = _connect(h.port, target, "a")
    assert b"upload_budget" in head
    s, head = _connect(h.port, target, "b")
    assert status_of(head) == 200


def test_set_clients_is_live(start_proxy, echo):
    h = start_proxy(["example.invalid"], clients=[ClientPolicy("a")])
    target = f"localhost:{echo.port}"
    assert status_of(_connect(h.port, target, "a")[1]) == 403
    h.set_clients([ClientPolicy("a", allow=["localhost"])])
    assert status_of(_connect(h.port, target, "a")[1]) == 200
    h.set_clients([ClientPolicy("a", token_sha256=SHA)], require_auth=True)
    assert status_of(_connect(h.port, target, "a")[1]) == 407


# ── real clients ─────────────────────────────────────────────────────────────


def test_requests_and_curl_send_the_bouquets_credentials(start_proxy):
    from peers import require_tool

    site = WebServer()
    try:
        h = start_proxy(["example.invalid"], forward_http=True, require_auth=True,
                        clients=[ClientPolicy("job/7", allow=["localhost"], token_sha256=hashlib.sha256(
                            "p@ss:word".encode()).hexdigest())])
        env = dict(proxy_env_vars(h.port, client="job/7", token="p@ss:word"))
        proxy = env["HTTP_PROXY"]
        assert "job%2F7:p%40ss%3Aword@" in proxy
        import requests

        r = requests.get(site.url("/r"), proxies={"http": proxy}, timeout=DEADLINE)
        assert r.status_code == 200 and r.text == "hello from /r\n"
        out = subprocess.run([require_tool("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}", site.url("/c")],
                             env={"PATH": "/usr/bin:/bin", "http_proxy": proxy}, capture_output=True, text=True,
                             timeout=30)
        assert out.stdout == "200", out.stderr
        r = requests.get(site.url("/r"), proxies={"http": f"http://127.0.0.1:{h.port}"}, timeout=DEADLINE)
        assert r.status_code == 407
    finally:
        site.close()


# ── metrics ──────────────────────────────────────────────────────────────────


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_are_scraped_and_parsed(start_proxy, echo):
    pytest.importorskip("prometheus_client")
    h = start_proxy(["localhost"], clients=[ClientPolicy("job-7", token_sha256=SHA)], metrics=("127.0.0.1", 0))
    assert h.metrics_port
    target = f"localhost:{echo.port}"
    s, head = _connect(h.port, target, "job-7", TOKEN)
    s.sendall(b"12345")
    assert recv_exact(s, 5) == b"12345"
    _connect(h.port, "example.invalid:443", "job-7", TOKEN)[0].close()
    _connect(h.port, target, "job-7", "bad")[0].close()
    m = _scrape(h.metrics_port)
    assert m[("kodarelay_tunnels_open", (("client", "job-7"),))] == 1
    assert m[("kodarelay_tunnels_total", (("client", "job-7"), ("decision", "allow"), ("protocol", "http")))] == 1
    assert m[("kodarelay_refusals_total", (("client", "job-7"), ("reason", "not_allowed")))] == 1
    assert m[("kodarelay_refusals_total", (("client", "job-7"), ("reason", "unauthenticated")))] == 1
    assert m[("kodarelay_handshakes_open", ())] == 0
    assert m[("kodarelay_decision_seconds_count", ())] >= 2
    s.close()
    wait_until(lambda: _scrape(h.metrics_port).get(("kodarelay_bytes_total", (("client", "job-7"),
                                                                              ("direction", "up")))) == 5,
               what="the tunnel's bytes")
    assert _scrape(h.metrics_port)[("kodarelay_tunnels_open", (("client", "job-7"),))] == 0


def test_metrics_labels_are_escaped_and_folded(start_proxy):
    pytest.importorskip("prometheus_client")
    from kodarelay.metrics import MAX_CLIENTS

    h = start_proxy(["example.invalid"], metrics=("127.0.0.1", 0))
    server = h._servers[0]
    server.metrics.refused('we"ird\\name\nx', "not_allowed")
    for i in range(MAX_CLIENTS + 5):
        server.metrics.refused(f"c{i}", "not_allowed")
    m = _scrape(h.metrics_port)
    assert m[("kodarelay_refusals_total", (("client", 'we"ird\\name\nx'), ("reason", "not_allowed")))] == 1
    assert m[("kodarelay_refusals_total", (("client", "other"), ("reason", "not_allowed")))] == 6
    clients = {dict(k[1]).get("client") for k in m if k[0] == "kodarelay_refusals_total"}
    assert len(clients) == MAX_CLIENTS + 1


def test_serve_reloads_client_sections_live(tmp_path, echo):
    """``serve --policy`` with sections; a bad file keeps the old policy (metrics count both)."""
    pytest.importorskip("prometheus_client")
    import os
    import signal

    from test_cli import KR, clean_env

    policy = tmp_path / "fleet.policy"
    policy.write_text(f"require-auth\nclient job-7 sha256:{SHA}\n  allow localhost\n")
    proc = subprocess.Popen([*KR, "serve", "--upstream", "direct", "--port", "0", "--policy", str(policy),
                             "--metrics", "0"], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = ""
        while "serving on" not in line:
            line = proc.stderr.readline()   # type: ignore[union-attr]
            assert line, "serve ended early"
        port = int(line.split("127.0.0.1:")[1].split()[0])
        mport = int(line.split("/metrics")[0].rsplit(":", 1)[1])
        target = f"localhost:{echo.port}"
        assert status_of(_connect(port, target, "job-7", TOKEN)[1]) == 200
        assert status_of(_connect(port, target)[1]) == 407
        policy.write_text("client job-7 sha256:zz\n")             # bad: the old policy stays
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: _scrape(mport).get(("kodarelay_policy_reloads_total", (("result", "error"),))) == 1,
                   what="the failed reload counted")
        assert status_of(_connect(port, target, "job-7", TOKEN)[1]) == 200
        policy.write_text("allow localhost\n")                   # no sections: everyone, global rules
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: status_of(_connect(port, target)[1]) == 200, what="the new policy")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE)
        assert os.WIFEXITED(proc.returncode << 8) or proc.returncode == 0


# ── the engine's fast path (compiled front-end): attributed tunnels without the GIL ──


def _front(h):  # type: ignore[no-untyped-def]
    """The engine's front-end of ``h`` (it starts just after the port accepts)."""
    from kodarelay.serving import native_frontend_available

    if not native_frontend_available():
        pytest.skip("the native front-end is off here")
    wait_until(lambda: h._servers[0]._front is not None, what="the native front-end to start")
    return h._servers[0]._front


def test_engine_sha256_and_base64_are_the_standard_ones(impl):
    import base64 as b64

    from hypothesis import given, settings
    from hypothesis import strategies as st

    if not hasattr(impl, "_sha256"):
        pytest.skip("the pure-Python twin has no engine")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def check(data: bytes) -> None:
        assert impl._sha256(data) == hashlib.sha256(data).digest()
        enc = b64.b64encode(data)
        if 0 < len(data) <= 384:
            assert impl._b64decode(enc) == data

    check()

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40))
    def strict(text: bytes) -> None:
        try:
            want = b64.b64decode(text, validate=True)
        except ValueError:
            want = None
        got = impl._b64decode(text)
        if want == b"" and got is None:
            return                      # (an empty credential names nobody either way)
        assert got == want

    strict()


def test_plan_key_reads_the_credential_only_when_clients_are_named(impl):
    if not hasattr(impl, "_plan_key"):
        pytest.skip("the pure-Python twin has no engine")
    head = b"CONNECT a.test:443 HTTP/1.1\r\nProxy-Authorization:  Basic eDp5 \r\n\r\n"
    assert impl._plan_key(0, head) is None
    assert impl._plan_key(0, head, True) == (b"a.test", 443, len(head), b"Basic eDp5")
    two = head[:-2] + b"Proxy-Authorization: Basic eDp5\r\n\r\n"
    assert impl._plan_key(0, two, True) is None


def test_attributed_tunnels_are_served_from_the_engines_cache(start_proxy, echo):
    h = start_proxy(["example.invalid"], clients=[ClientPolicy("job-7", allow=["localhost"], token_sha256=SHA,
                                                               max_tunnels=3)])
    front = _front(h)
    target = f"localhost:{echo.port}"
    s, head = _connect(h.port, target, "job-7", TOKEN)       # decided in Python, cached per client
    assert status_of(head) == 200
    s.close()
    wait_until(lambda: h._servers[0].tunnel_count == 0, what="the first tunnel's end")
    hits = front.plan_stats()["hits"]
    held = [_connect(h.port, target, "job-7", TOKEN) for _ in range(3)]
    assert all(status_of(head) == 200 for _, head in held)
    assert front.plan_stats()["hits"] == hits + 3                 # the engine served them
    s, head = _connect(h.port, target, "job-7", TOKEN)             # the engine's count: full
    assert status_of(head) == 429 and b"too_many_tunnels" in head
    s, head = _connect(h.port, target, "job-7", "wrong")           # a wrong token never hits
    assert status_of(head) == 407
    s, head = _connect(h.port, target)                             # nor does nobody
    assert status_of(head) == 403
    for s, _ in held:
        s.close()
    wait_until(lambda: status_of(_connect(h.port, target, "job-7", TOKEN)[1]) == 200, what="slots back")


def test_the_engine_checks_socks5_credentials(start_proxy, echo):
    h = start_proxy(["localhost"], cls=BuiltInSocks5Proxy, clients=[ClientPolicy("job-7", token_sha256=SHA)],
                    require_auth=True)
    _front(h)
    s, status = _socks(h.port, b"localhost", echo.port, b"job-7", b"nope")
    assert status == b"\x01\x01"
    s, method = _socks(h.port, b"localhost", echo.port, None)
    assert method == b"\x05\xff"
    for _ in range(3):                                             # decided once, then cached
        s, rep = _socks(h.port, b"localhost", echo.port, b"job-7", TOKEN.encode())
        assert rep[:2] == b"\x05\x00"
        s.close()
    assert _front(h).plan_stats()["hits"] >= 1
    wait_until(lambda: [v.reason for v in h.violations()].count("unauthenticated") == 2, what="both recorded")
    assert {v.client for v in h.violations()} == {"job-7", None}


def test_a_spent_budget_closes_the_engines_tunnels_too(start_proxy, echo):
    h = start_proxy(["localhost"], clients=[ClientPolicy("a", upload_bytes=1000)])
    front = _front(h)
    target = f"localhost:{echo.port}"
    _connect(h.port, target, "a")[0].close()                       # the plan is cached now
    wait_until(lambda: h._servers[0].tunnel_count == 0, what="the first tunnel's end")
    hits = front.plan_stats()["hits"]
    idle, head = _connect(h.port, target, "a")
    s, head2 = _connect(h.port, target, "a")
    assert status_of(head) == status_of(head2) == 200 and front.plan_stats()["hits"] == hits + 2
    s.sendall(b"y" * 3000)
    assert recv_exact(s, 3000) == b"y" * 3000
    s.close()
    idle.settimeout(DEADLINE)
    assert idle.recv(10) == b""                                    # closed by the engine
    assert status_of(_connect(h.port, target, "a")[1]) == 429


def test_metrics_count_the_tunnels_the_engine_serves(start_proxy, echo):
    pytest.importorskip("prometheus_client")
    h = start_proxy(["localhost"], clients=[ClientPolicy("job-7", token_sha256=SHA)], metrics=("127.0.0.1", 0))
    front = _front(h)
    target = f"localhost:{echo.port}"
    for user in ("job-7", None):                   # decided in Python, then cached
        _connect(h.port, target, user, TOKEN)[0].close()
    wait_until(lambda: h._servers[0].tunnel_count == 0, what="the first tunnels' end")
    hits = front.plan_stats()["hits"]
    held = []
    for user in ("job-7", "job-7", None):
        s, head = _connect(h.port, target, user, TOKEN)
        assert status_of(head) == 200
        s.sendall(b"abc")
        assert recv_exact(s, 3) == b"abc"
        held.append(s)
    assert front.plan_stats()["hits"] == hits + 3             # served by the engine ...
    m = _scrape(h.metrics_port)                                 # ... and counted
    assert m[("kodarelay_tunnels_total", (("client", "job-7"), ("decision", "allow"), ("protocol", "http")))] == 3
    assert m[("kodarelay_tunnels_total", (("client", ""), ("decision", "allow"), ("protocol", "http")))] == 2
    assert m[("kodarelay_tunnels_open", (("client", "job-7"),))] == 2
    assert m[("kodarelay_tunnels_open", (("client", ""),))] == 1
    for s in held:
        s.close()
    key = ("kodarelay_bytes_total", (("client", "job-7"), ("direction", "up")))
    wait_until(lambda: _scrape(h.metrics_port).get(key) == 6, what="the engine's bytes counted")
    m = _scrape(h.metrics_port)
    assert m[("kodarelay_tunnels_open", (("client", "job-7"),))] == 0
    assert m[("kodarelay_bytes_total", (("client", ""), ("direction", "down")))] == 3

"""Request rules in the filter: ``[METHODS ]HOST[:PORT][/PATH]`` and ``read-only HOST``."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay import Filter, PatternError
from kodarelay.requestrules import bad_path


@pytest.mark.parametrize(("pattern", "method", "path", "allowed"), [
    ("read-only github.com", "GET", "/psf/requests", True),
    ("read-only github.com", "HEAD", "/", True),
    ("read-only github.com", "OPTIONS", "/x", True),
    ("read-only github.com", "POST", "/gists", False),
    ("GET,HEAD github.com/repos/*", "GET", "/repos/a/b", True),
    ("GET,HEAD github.com/repos/*", "GET", "/gists", False),
    ("GET,HEAD github.com/repos/*", "PUT", "/repos/a", False),
    ("* api.test/v1/*", "DELETE", "/v1/x", True),
    ("api.test/v1/exact", "PATCH", "/v1/exact", True),
    ("api.test/v1/exact", "GET", "/v1/exact/more", False),
    ("api.test/v1/exact", "GET", "/v1/exact?token=1", True),       # the query is never matched
    ("POST api.test", "POST", "/anything/at/all", True),
    ("POST api.test", "GET", "/", False),
    ("api.test/a*z", "GET", "/a/b/c/z", True),                     # * crosses slashes
    ("10.1.2.3/api/*", "GET", "/api/x", True),
])
def test_request_rules_match_method_and_path(pattern, method, path, allowed):
    f = Filter([pattern])
    host = pattern.split(" ")[-1].split("/")[0].split(":")[0]
    d = f.explain(host, 443, method, path)
    assert d.allowed is allowed, d
    if not allowed:
        assert d.reason == "request_not_allowed"


def test_connection_level_admits_a_host_any_allow_rule_names():
    f = Filter(["read-only github.com"], ["DELETE api.test/*"])
    assert f.explain("github.com", 443).allowed
    assert not f.explain("api.test", 443).allowed and f.explain("api.test", 443).reason == "not_allowed"


def test_deny_wins_and_a_host_deny_refuses_every_request():
    f = Filter(["*.test"], ["DELETE api.test/*", "gist.test"])
    assert f.explain("api.test", 443, "GET", "/x").allowed
    d = f.explain("api.test", 443, "DELETE", "/x")
    assert not d.allowed and d.reason == "request_denied" and d.rule == "DELETE api.test/*"
    assert f.explain("gist.test", 443, "GET", "/").reason == "denied"
    assert not f.explain("gist.test", 443).allowed          # a host deny refuses the connection too
    assert f.explain("api.test", 443).allowed               # a request deny does not


def test_an_ip_literal_keeps_its_cidr_prefix():
    assert Filter(["10.0.0.0/8"]).explain("10.9.8.7", 443).allowed
    assert not Filter(["10.0.0.0/8"]).has_request_rules("10.9.8.7", 443)
    f = Filter(["10.1.2.3/api/*"])
    assert f.has_request_rules("10.1.2.3", 443) and not f.explain("10.1.2.3", 443, "GET", "/other").allowed


@pytest.mark.parametrize("pattern", ["get github.com", "GET github.com/x?y=1", "GET, github.com", "read-only github.com/x",
                                     "GET github.com some.com", "GET https://github.com/x"])
def test_bad_request_patterns_name_the_pattern(pattern):
    with pytest.raises(PatternError) as info:
        Filter([pattern])
    assert repr(pattern) in str(info.value)


def test_https_url_keeps_its_did_you_mean():
    with pytest.raises(PatternError, match="did you mean 'pypi.org'"):
        Filter(["https://pypi.org/simple"])


@pytest.mark.parametrize(("path", "bad"), [
    ("/a/b", False), ("/a/./b", True), ("/a/../b", True), ("/a/..", True), ("/.", True), ("/a\\b", True),
    ("/a%2fb", True), ("/a%2Fb", True), ("/a%5cb", True), ("/a%2eb", True), ("/a%00", True), ("/a%41", False),
    ("/a/..b", False), ("/x?q=/../", False),
])
def test_bad_paths(path, bad):
    assert (bad_path(path) is not None) is bad


def test_bad_path_is_judged_only_on_hosts_with_request_rules():
    assert Filter(["read-only a.test"]).explain("a.test", 80, "GET", "/x/../y").reason == "bad_path"
    assert Filter(["a.test"]).explain("a.test", 80, "GET", "/x/../y").allowed


def test_needs_inspection():
    f = Filter(["read-only github.com", "pypi.org", "GET pypi.org/simple/*", "api.test"], ["DELETE api.test/*"])
    assert f.needs_inspection("github.com", 443)          # only request rules admit it
    assert not f.needs_inspection("pypi.org", 443)        # a host rule admits every request
    assert f.needs_inspection("api.test", 443)            # a deny request rule must see each request
    assert not f.needs_inspection("other.test", 443)


_PATH_ALPHABET = st.sampled_from(list("/ab*.-_") )


@settings(max_examples=400, deadline=None)
@given(rule=st.text(_PATH_ALPHABET, min_size=1, max_size=8), path=st.text(st.sampled_from(list("/ab.-_")), max_size=10))
def test_the_path_matcher_agrees_with_a_reference(rule: str, path: str) -> None:
    """``*`` matches any run (slashes included), the rest literally: the same as a regex made
    by hand, for every rule and path."""
    rule_path = "/" + rule.lstrip("/")
    target = "/" + path.lstrip("/")
    reference = re.fullmatch("".join(".*" if c == "*" else re.escape(c) for c in rule_path), target, re.S)
    f = Filter([f"GET fuzz.test{rule_path}"])
    d = f.explain("fuzz.test", 80, "GET", target)
    if bad_path(target) is not None:
        assert d.reason == "bad_path"
    else:
        assert d.allowed is (reference is not None), (rule_path, target, d)


# ── through the proxy: a tunnel's requests cannot be read ───────────────────

@pytest.mark.parametrize("socks", [False, True], ids=["connect", "socks5"])
def test_a_tunnel_to_a_host_with_request_rules_is_refused_needs_inspection(start_proxy, echo, socks):
    """Request rules admit a host at connection level, but a blind tunnel would carry any
    request: without inspection it is refused, on both front-ends and from the engine's cache."""
    from peers import http_connect, socks5_connect, status_of

    h = start_proxy(["read-only localhost", "127.0.0.1"], socks5=True)
    for _ in range(3):                       # the second and third would hit a cached plan
        if socks:
            s, reply = socks5_connect(h.port, b"localhost", echo.port)
            assert reply[1] == 0x02, reply
        else:
            s, head = http_connect(h.port, f"localhost:{echo.port}")
            assert status_of(head) == 403 and b"X-Proxy-Error: needs_inspection" in head, head
            body = b""
            while chunk := s.recv(4096):
                body += chunk
            assert b"tunnel it with a host rule" in body, body
        s.close()
    assert echo.accepted == 0
    assert [v.reason for v in h.violations()] == ["needs_inspection"] * 3


# ── forwarded plain HTTP is judged per request ──────────────────────────────

def _read_response(s):  # type: ignore[no-untyped-def]
    from forward_peers import read_response

    return read_response(s)


def test_forwarded_requests_are_judged_one_by_one(start_proxy):
    from forward_peers import Origin, send_raw

    from peers import status_of, wait_until

    origin = Origin()
    events: list = []
    try:
        h = start_proxy(["read-only localhost"], forward_http=True, on_event=events.append)
        s = send_raw(h.port, f"GET {origin.url('/repos/a?token=secret')} HTTP/1.1\r\n\r\n".encode())
        head, body = _read_response(s)
        assert status_of(head) == 200 and body == b"hello from /repos/a?token=secret\n"
        s.sendall(f"POST {origin.url('/gists?token=secret')} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
        head, body = _read_response(s)
        assert status_of(head) == 403 and b"X-Proxy-Error: request_not_allowed" in head, head
        assert b"POST localhost:%d/gists refused (request_not_allowed); allow it with --allow 'POST localhost:%d/gists'" % (origin.port, origin.port) in body, body
        assert b"secret" not in head + body
        s.sendall(f"GET {origin.url('/still-usable')} HTTP/1.1\r\n\r\n".encode())   # the connection stays usable
        head, body = _read_response(s)
        assert status_of(head) == 200 and body == b"hello from /still-usable\n"
        assert [p for (_m, p, *_rest) in origin.seen] == ["/repos/a?token=secret", "/still-usable"]
        (v,) = h.violations()
        assert (v.reason, v.method, v.path, v.host) == ("request_not_allowed", "POST", "/gists", "localhost")
        s.close()
        wait_until(lambda: len([e for e in events if e.kind == "end"]) >= 2, what="the end events")
        assert [(e.kind, e.method, e.path) for e in events if e.kind != "end"] == [
            ("allow", "GET", "/repos/a"), ("refuse", "POST", "/gists"), ("allow", "GET", "/still-usable")]
        assert all("token" not in repr(e) for e in events)
    finally:
        origin.close()


def test_forwarded_deny_request_rule_and_bad_path():
    from forward_peers import Origin, send_raw

    from kodarelay import BuiltInProxy, UpstreamConfig
    from peers import status_of

    origin = Origin()
    try:
        with BuiltInProxy(Filter(["localhost"], ["DELETE localhost/*"]), upstream=UpstreamConfig.direct(),
                          forward_http=True).start() as h:
            s = send_raw(h.port, f"DELETE {origin.url('/x')} HTTP/1.1\r\n\r\n".encode())
            head, body = _read_response(s)
            assert status_of(head) == 403 and b"request_denied" in head and b"DELETE localhost/*" in body, body
            s.sendall(f"GET {origin.url('/a/../b')} HTTP/1.1\r\n\r\n".encode())
            head, body = _read_response(s)
            assert status_of(head) == 400 and b"X-Proxy-Error: bad_path" in head, head
            s.sendall(f"GET {origin.url('/a/b')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            head, body = _read_response(s)
            assert status_of(head) == 200
            assert [p for (_m, p, *_rest) in origin.seen] == ["/a/b"]
            s.close()
    finally:
        origin.close()


# ── the command and the policy file ─────────────────────────────────────────

def test_check_judges_one_request():
    from test_cli import kr

    out = kr("check", "github.com:443", "--method", "POST", "--path", "/gists", "--allow", "read-only github.com")
    assert out.returncode == 1 and out.stdout.startswith("denied POST github.com:443/gists"), out
    assert "reason=request_not_allowed" in out.stdout
    out = kr("check", "api.github.com:443", "--method", "HEAD", "--path", "/repos/x?token=1",
             "--allow", "read-only github.com,GET,HEAD api.github.com/repos/*,pypi.org")
    assert out.returncode == 0, out
    assert "rule=GET,HEAD api.github.com/repos/*" in out.stdout and "token" not in out.stdout
    assert "needs_inspection" in out.stdout


def test_comma_lists_keep_a_request_rules_methods():
    from kodarelay.cli import _patterns

    assert _patterns(["GET,HEAD github.com/*,pypi.org", "a.test,b.test", "*,x.test", "POST,PUT api.test"]) == [
        "GET,HEAD github.com/*", "pypi.org", "a.test", "b.test", "*", "x.test", "POST,PUT api.test"]


def test_policy_file_takes_request_rules_and_read_only_lines(tmp_path):
    from kodarelay.policyfile import PolicyError, parse_policy

    policy = parse_policy("read-only github.com\nallow POST,PUT api.test/v1/*\ndeny DELETE api.test/*\n")
    flt = policy.filter()
    assert flt.explain("github.com", 443, "GET", "/x").allowed
    assert not flt.explain("github.com", 443, "POST", "/x").allowed
    assert flt.explain("api.test", 443, "PUT", "/v1/a").allowed
    assert flt.explain("api.test", 443, "DELETE", "/v1/a").reason == "request_denied"
    with pytest.raises(PolicyError, match="policy>:1"):
        parse_policy("allow get github.com\n")


def test_the_decider_is_asked_per_request_and_always_is_remembered_per_request():
    import asyncio

    from forward_peers import Origin, send_raw

    from kodarelay import BuiltInProxy, UpstreamConfig
    from peers import status_of

    asked: list = []

    async def decide(request):  # type: ignore[no-untyped-def]
        asked.append((request.method, request.path))
        await asyncio.sleep(0)
        return "allow_always" if request.path == "/ok" else "deny"

    origin = Origin()
    try:
        with BuiltInProxy(Filter(["read-only localhost"]), upstream=UpstreamConfig.direct(), forward_http=True,
                          decider=decide).start() as h:
            s = send_raw(h.port, f"POST {origin.url('/ok?x=1')} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
            assert status_of(_read_response(s)[0]) == 200
            s.sendall(f"POST {origin.url('/ok')} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
            assert status_of(_read_response(s)[0]) == 200           # remembered: not asked again
            s.sendall(f"POST {origin.url('/no')} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
            head, _ = _read_response(s)
            assert status_of(head) == 403 and b"X-Proxy-Error: decider_denied" in head
            s.sendall(f"GET {origin.url('/free')} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
            assert status_of(_read_response(s)[0]) == 200           # a rule matched: never asked
            s.close()
            assert asked == [("POST", "/ok"), ("POST", "/no")]
            assert [v.reason for v in h.violations()] == ["decider_denied"]
    finally:
        origin.close()


def test_verbose_run_names_the_path_of_a_judged_request():
    """``-v`` says which request a request rule admitted (the path, never the query)."""
    from forward_peers import Origin

    from peers import require_tool
    from test_cli import kr

    curl = require_tool("curl")
    origin = Origin()
    try:
        out = kr("run", "-v", "--allow", "read-only localhost", "--upstream", "direct", "--",
                 curl, "-sS", origin.url("/repos/a?token=abc"))
        assert out.returncode == 0, out.stderr
        assert f"allowed http GET localhost:{origin.port}/repos/a (rule read-only localhost)" in out.stderr, out.stderr
        assert "token" not in out.stderr
    finally:
        origin.close()

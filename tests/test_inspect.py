"""TLS inspection: the CA, which tunnels are decrypted, and each decrypted request judged.

Real parts throughout: a trustme-signed HTTPS origin on loopback, the proxy on port 0, and
real clients (``requests``, ``ssl`` sockets, curl). Runs on both front-ends (scripts/test.sh
runs this file again with KODARELAY_NO_NATIVE_FRONTEND=1).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading

import pytest

from peers import DEADLINE, http_connect, read_head, recv_until, socks5_connect, status_of, wait_until

pytest.importorskip("cryptography")
requests = pytest.importorskip("requests")

from kodarelay import BuiltInSocks5Proxy, CertificateAuthority, Filter, InspectionUnavailable  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _proxy(start_proxy, ca, run_ca, patterns, events=None, **options):
    options.setdefault("upstream_ca", str(ca[0]))
    if events is not None:
        options["on_event"] = events.append
    return start_proxy(patterns, inspect=run_ca, **options)


def _tls_client(port: int, target: str, bundle: str, host: str = "localhost") -> ssl.SSLSocket:
    """A CONNECT tunnel through the proxy, then TLS to ``host`` verified against ``bundle``."""
    s, rest = http_connect(port, target)
    head = read_head(s) if not rest else rest
    assert status_of(head) == 200, head
    ctx = ssl.create_default_context(cafile=bundle)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx.wrap_socket(s, server_hostname=host)


def _request(tls: ssl.SSLSocket, method: str, path: str, host: str, body: bytes = b"",
             extra: str = "") -> tuple[int, dict[str, str], bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    tls.sendall(head.encode() + body)
    raw = recv_until(tls, b"\r\n\r\n")
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(fields.get("content-length", "0"))
    while len(rest) < n:
        more = tls.recv(65536)
        assert more, "closed mid-body"
        rest += more
    return status, fields, rest[:n]


# ── the CA ───────────────────────────────────────────────────────────────────


def test_generate_mints_leaves_that_verify_for_names_and_addresses(run_ca, tmp_path):
    from cryptography import x509

    bundle = run_ca.write_bundle(tmp_path / "b.pem")
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o644
    text = bundle.read_bytes()
    assert text.endswith(run_ca.cert_pem) and text.count(b"BEGIN CERTIFICATE") > 1   # the system's roots too
    assert b"PRIVATE KEY" not in text
    for host, san_type in (("example.test", x509.DNSName), ("127.0.0.1", x509.IPAddress)):
        leaf = x509.load_pem_x509_certificate(run_ca.leaf_pem(host))
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(v) for v in sans.get_values_for_type(san_type)] == [host]
        assert leaf.not_valid_after_utc <= run_ca.not_after
    assert run_ca.leaf_context("Example.test") is run_ca.leaf_context("example.test")     # minted once
    assert "kodarelay-test" in repr(run_ca) and "PRIVATE" not in repr(run_ca)


def test_in_dir_keeps_the_key_0600_and_loads_it_again(tmp_path):
    d = tmp_path / "ca"
    first = CertificateAuthority.in_dir(d)
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d / "ca.pem").st_mode) == 0o644
    again = CertificateAuthority.in_dir(d)
    assert again.cert_pem == first.cert_pem
    other = CertificateAuthority.in_dir(tmp_path / "other")
    with pytest.raises(ValueError, match="is not the key of"):
        CertificateAuthority.load(d / "ca.pem", tmp_path / "other" / "ca-key.pem")
    assert other.cert_pem != first.cert_pem


def test_without_cryptography_inspection_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from kodarelay import CertificateAuthority, InspectionUnavailable\n"
            "try:\n    CertificateAuthority.generate()\n"
            "except InspectionUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True)
    assert "pip install 'kodarelay[inspect]'" in out.stdout
    assert issubclass(InspectionUnavailable, RuntimeError)


# ── decrypted requests, judged one by one ────────────────────────────────────


def test_requests_are_judged_one_by_one_on_a_kept_alive_connection(start_proxy, ca, run_ca, origin, bundle):
    events: list = []
    h = _proxy(start_proxy, ca, run_ca, [f"GET,HEAD localhost:{origin.port}/repos/*"], events)
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    assert tls.selected_alpn_protocol() == "http/1.1"          # never h2, whatever the client offers
    host = f"localhost:{origin.port}"
    status, _, body = _request(tls, "GET", "/repos/a/b?token=SECRET", host)
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/repos/a/b?token=SECRET" and seen["host"] == host   # as the client wrote it
    status, fields, body = _request(tls, "POST", "/repos/a/b", host)
    assert status == 403 and fields["x-proxy-error"] == "request_not_allowed"
    assert b"POST" in body and b"/repos/a/b" in body
    status, _, body = _request(tls, "GET", "/repos/c", host)                   # still usable
    assert status == 200 and json.loads(body)["path"] == "/repos/c"
    tls.close()
    wait_until(lambda: sum(e.kind == "end" for e in events) == 3, what="three end events")
    tunnel = [e for e in events if e.method == "CONNECT"]
    assert [e.kind for e in tunnel] == ["allow", "end"] and all(e.inspected for e in tunnel)
    ids = {e.tunnel_id for e in events}
    assert len(ids) == 1                                                        # all share the tunnel's id
    reqs = [(e.kind, e.method, e.path, e.status) for e in events if e.method != "CONNECT"]
    assert reqs == [("allow", "GET", "/repos/a/b", None), ("end", "GET", "/repos/a/b", 200),
                    ("refuse", "POST", "/repos/a/b", None),
                    ("allow", "GET", "/repos/c", None), ("end", "GET", "/repos/c", 200)]
    assert not any("SECRET" in json.dumps(e.to_json()) for e in events)        # never the query
    v = [x for x in h.violations() if x.reason == "request_not_allowed"]
    assert v and v[0].method == "POST" and v[0].path == "/repos/a/b"


def test_deny_bad_path_and_host_mismatch(start_proxy, ca, run_ca, origin, bundle):
    from kodarelay import BuiltInProxy, UpstreamConfig

    h = BuiltInProxy(Filter([f"localhost:{origin.port}/*"], deny=[f"DELETE localhost:{origin.port}/*"]),
                     upstream=UpstreamConfig.direct(), inspect=run_ca, upstream_ca=str(ca[0])).start()
    try:
        tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
        host = f"localhost:{origin.port}"
        status, fields, _ = _request(tls, "DELETE", "/x", host)
        assert status == 403 and fields["x-proxy-error"] == "request_denied"
        status, fields, _ = _request(tls, "GET", "/a/../b", host)
        assert status == 400 and fields["x-proxy-error"] == "bad_path"
        status, fields, body = _request(tls, "GET", "/x", "evil.test")
        assert status == 421 and fields["x-proxy-error"] == "host_mismatch" and b"evil.test" in body
        status, _, _ = _request(tls, "GET", "/x", host)
        assert status == 200
        tls.close()
        # (the engine's records reach the log from its completer thread: soon, not at once)
        wait_until(lambda: {"request_denied", "bad_path", "host_mismatch"} <= {v.reason for v in h.violations()},
                   what="three violations")
    finally:
        h.shutdown()


def test_bodies_and_large_downloads_pass_intact(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, [f"GET,POST localhost:{origin.port}/*"])
    proxies = {"https": f"http://127.0.0.1:{h.port}"}
    with requests.Session() as s:
        r = s.post(f"https://localhost:{origin.port}/up", data=b"x" * 300_000, proxies=proxies, verify=bundle,
                   timeout=DEADLINE)
        assert r.status_code == 200 and r.json()["body"] == 300_000
        r = s.get(f"https://localhost:{origin.port}/big/{3 << 20}", proxies=proxies, verify=bundle, timeout=DEADLINE)
        assert r.status_code == 200 and r.content == (bytes(range(256)) * 256 * 48)[: 3 << 20]


def test_an_origin_that_fails_verification_is_a_502_upstream_tls(start_proxy, ca, run_ca, origin, bundle, tmp_path):
    other = CertificateAuthority.generate("not-the-origins")
    wrong = other.write_bundle(tmp_path / "wrong.pem")
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"], upstream_ca=str(wrong))
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    status, fields, body = _request(tls, "GET", "/x", f"localhost:{origin.port}")
    assert status == 502 and fields["x-proxy-error"] == "upstream_tls"
    assert b"localhost" in body and b"certificate" in body.lower()
    wait_until(lambda: any(v.reason == "upstream_tls" for v in h.violations()), what="an upstream_tls violation")


def test_a_client_that_does_not_trust_the_ca_fails_alone(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_client(h.port, f"localhost:{origin.port}", str(ca[0]))      # trusts the origin's CA, not ours
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    assert _request(tls, "GET", "/ok", f"localhost:{origin.port}")[0] == 200


@pytest.mark.parametrize("first", [b"\x00\x01garbage\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
def test_neither_tls_nor_http1_is_closed_not_http(start_proxy, ca, run_ca, origin, first):
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"])
    s, rest = http_connect(h.port, f"localhost:{origin.port}")
    assert status_of(read_head(s) if not rest else rest) == 200
    s.sendall(first)
    s.settimeout(DEADLINE)
    assert s.recv(100) == b""
    s.close()
    wait_until(lambda: any(v.reason == "not_http" for v in h.violations()), what="a not_http violation")


def test_plain_http_inside_a_tunnel_to_an_inspected_host_is_judged(start_proxy, ca, run_ca):
    from peers import WebServer

    site = WebServer()
    try:
        h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{site.port}/ok/*"])
        s, rest = http_connect(h.port, f"localhost:{site.port}")
        assert status_of(read_head(s) if not rest else rest) == 200
        s.sendall(f"POST /ok/x HTTP/1.1\r\nHost: localhost:{site.port}\r\nContent-Length: 0\r\n\r\n".encode())
        assert status_of(read_head(s)) == 403
        s.sendall(f"GET /ok/x HTTP/1.1\r\nHost: localhost:{site.port}\r\n\r\n".encode())
        assert b"hello from /ok/x" in recv_until(s, b"/ok/x\n")
        s.close()
    finally:
        site.close()


def test_socks5_tunnels_are_inspected_the_same_way(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"], cls=BuiltInSocks5Proxy)
    s, reply = socks5_connect(h.port, b"localhost", origin.port)
    assert reply[1] == 0
    tls = ssl.create_default_context(cafile=bundle).wrap_socket(s, server_hostname="localhost")
    assert _request(tls, "GET", "/s", f"localhost:{origin.port}")[0] == 200
    assert _request(tls, "PUT", "/s", f"localhost:{origin.port}")[0] == 403


def test_a_websocket_upgrade_becomes_a_decrypted_tunnel(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/ws"])
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    tls.sendall(f"GET /ws HTTP/1.1\r\nHost: localhost:{origin.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = recv_until(tls, b"\r\n\r\n")
    assert status_of(head) == 101
    tls.sendall(b"ping over tls")
    assert recv_until(tls, b"TLS") == b"PING OVER TLS"


# ── what is decrypted ────────────────────────────────────────────────────────


def test_inspect_hosts_decrypts_for_the_audit_trail_and_no_inspect_never(start_proxy, ca, run_ca, origin, bundle):
    events: list = []
    h = _proxy(start_proxy, ca, run_ca, ["localhost"], events, inspect_hosts=["localhost"])
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    assert _request(tls, "DELETE", "/audited", f"localhost:{origin.port}")[0] == 200   # a host rule: all pass
    tls.close()
    wait_until(lambda: any(e.path == "/audited" and e.kind == "end" for e in events), what="the audited request")
    blind = _proxy(start_proxy, ca, run_ca, ["localhost"], inspect_hosts=["localhost"], no_inspect=["localhost"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_client(blind.port, f"localhost:{origin.port}", bundle)      # the origin's own certificate: blind
    s = _tls_client(blind.port, f"localhost:{origin.port}", str(ca[0]))
    assert _request(s, "GET", "/", f"localhost:{origin.port}")[0] == 200


def test_a_request_rule_on_a_never_inspected_host_is_a_usage_error(start_proxy, ca, run_ca):
    with pytest.raises(ValueError, match="never decrypts"):
        start_proxy(["read-only api.test"], inspect=run_ca, no_inspect=["*.test"])
    with pytest.raises(ValueError, match="inspect_hosts needs inspect="):
        start_proxy(["localhost"], inspect_hosts=["localhost"])


def test_other_tunnels_stay_blind(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, ["localhost", "read-only api.test"])
    tls = _tls_client(h.port, f"localhost:{origin.port}", str(ca[0]))         # the origin's own certificate
    assert _request(tls, "POST", "/anything", f"localhost:{origin.port}")[0] == 200


def test_curl_reads_a_refusal(start_proxy, ca, run_ca, origin, bundle):
    from peers import require_tool

    curl = require_tool("curl")
    h = _proxy(start_proxy, ca, run_ca, [f"read-only localhost:{origin.port}"])
    base = [curl, "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{h.port}", "--cacert", bundle]
    ok = subprocess.run([*base, f"https://localhost:{origin.port}/r"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and json.loads(ok.stdout)["path"] == "/r"
    no = subprocess.run([*base, "-i", "-X", "POST", f"https://localhost:{origin.port}/w"], capture_output=True,
                        text=True, timeout=30)
    assert "HTTP/1.1 403 Forbidden" in no.stdout and "request_not_allowed" in no.stdout


def test_many_tunnels_at_once(start_proxy, ca, run_ca, origin, bundle):
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"])
    errors: list = []

    def one(i: int) -> None:
        try:
            tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
            for j in range(3):
                status, _, body = _request(tls, "GET", f"/{i}/{j}", f"localhost:{origin.port}")
                assert status == 200 and json.loads(body)["path"] == f"/{i}/{j}"
            tls.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors, errors


# ── the command ──────────────────────────────────────────────────────────────

CLIENT = """
import json, os, ssl, sys, urllib.request, urllib.error
port = int(sys.argv[1])
out = {}
for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT",
            "GIT_SSL_CAINFO", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "HTTPLIB2_CA_CERTS"):
    out[var] = os.environ.get(var)
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
out["get"] = json.loads(opener.open(f"https://localhost:{port}/read").read())["path"]
try:
    opener.open(urllib.request.Request(f"https://localhost:{port}/write", data=b"x", method="POST"))
except urllib.error.HTTPError as e:
    out["post"] = [e.code, e.headers.get("X-Proxy-Error")]
print(json.dumps(out))
"""


@pytest.mark.parametrize("fence", ["--no-isolate", "--isolate"])
def test_run_inspects_the_hosts_request_rules_name(ca, origin, tmp_path, fence):
    from test_cli import kr
    from test_fence import _fence_works

    if fence == "--isolate" and _fence_works() is not None:
        pytest.skip(_fence_works())
    out = kr("run", "--upstream", "direct", fence, "--allow", f"read-only localhost:{origin.port}",
             "--upstream-ca", str(ca[0]), "--", sys.executable, "-c", CLIENT, str(origin.port))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["get"] == "/read" and seen["post"] == [403, "request_not_allowed"]
    bundles = {v for k, v in seen.items() if k.isupper()}
    assert len(bundles) == 1 and None not in bundles              # every CA variable names one bundle
    assert "request_not_allowed" in out.stderr                     # the summary lists the refusal


def test_run_usage_errors_are_one_line(ca, tmp_path):
    from test_cli import assert_one_line_error, kr

    out = kr("run", "--upstream", "direct", "--allow", "read-only api.test", "--no-inspect", "api.test",
             "--", "true")
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "never decrypts")
    out = kr("run", "--upstream", "direct", "--allow", "localhost", "--upstream-ca", str(tmp_path / "nope.pem"),
             "--", "true")
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "--upstream-ca")


def test_ca_dir_keeps_one_ca_across_runs(ca, origin, tmp_path):
    from test_cli import kr

    d = tmp_path / "ca"
    for _ in range(2):
        out = kr("run", "--upstream", "direct", "--no-isolate", "--allow", f"read-only localhost:{origin.port}",
                 "--upstream-ca", str(ca[0]), "--ca-dir", str(d), "--", sys.executable, "-c", CLIENT,
                 str(origin.port))
        assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    bundle = json.loads(out.stdout)["SSL_CERT_FILE"]
    assert not os.path.exists(bundle)                              # the run's bundle went with the run


# ── bad input loses nothing ──────────────────────────────────────────────────


def test_silent_tls_clients_count_as_handshakes_and_the_oldest_is_shed(start_proxy, ca, run_ca, origin, bundle,
                                                                      monkeypatch):
    # (the handshake timeout is far: only shedding can end the oldest within the test's deadline;
    # the asyncio path sheds, the engine's inspected tunnels have the timeout: the next test)
    monkeypatch.setenv("KODARELAY_NO_ENGINE_INSPECT", "1")
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"], max_handshakes=2, handshake_timeout=120)
    silent = []
    for _ in range(3):                            # answered 200, then never a ClientHello
        s, rest = http_connect(h.port, f"localhost:{origin.port}")
        assert status_of(read_head(s) if not rest else rest) == 200
        silent.append(s)
    silent[0].settimeout(DEADLINE)
    assert silent[0].recv(10) == b""              # the oldest was shed for the newest
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    assert _request(tls, "GET", "/ok", f"localhost:{origin.port}")[0] == 200
    for s in silent:
        s.close()


def test_a_silent_tls_client_ends_at_the_handshake_timeout(start_proxy, ca, run_ca, origin, bundle):
    # answered 200, then never a ClientHello: closed after handshake_timeout (not idle_timeout)
    h = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"], handshake_timeout=0.5, idle_timeout=120)
    s, rest = http_connect(h.port, f"localhost:{origin.port}")
    assert status_of(read_head(s) if not rest else rest) == 200
    s.settimeout(DEADLINE)
    assert s.recv(10) == b""
    s.close()
    tls = _tls_client(h.port, f"localhost:{origin.port}", bundle)
    assert _request(tls, "GET", "/ok", f"localhost:{origin.port}")[0] == 200


def test_no_fd_leaks_whatever_the_client_does(start_proxy, ca, run_ca, origin, bundle, tmp_path):
    from peers import fd_count

    wrong = CertificateAuthority.generate("wrong").write_bundle(tmp_path / "wrong.pem")
    good = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"])
    bad_origin = _proxy(start_proxy, ca, run_ca, [f"GET localhost:{origin.port}/*"], upstream_ca=str(wrong))
    server = good._servers[0]
    target = f"localhost:{origin.port}"

    def round_of_everything() -> None:
        tls = _tls_client(good.port, target, bundle)                       # a good exchange
        assert _request(tls, "GET", "/a", target)[0] == 200
        assert _request(tls, "POST", "/a", target)[0] == 403
        tls.close()
        s, rest = http_connect(good.port, target)                          # gone mid-handshake
        s.sendall(b"\x16\x03\x01\x00\x05ab")
        s.close()
        s, rest = http_connect(good.port, target)                          # garbage
        s.sendall(b"\x00" * 64)
        s.close()
        with pytest.raises(ssl.SSLError):                                  # distrusts our CA
            _tls_client(good.port, target, str(ca[0]))
        tls = _tls_client(bad_origin.port, target, bundle)                 # origin fails verification
        assert _request(tls, "GET", "/a", target)[0] == 502
        tls.close()
        tls = _tls_client(good.port, target, bundle)                       # gone mid-body
        tls.sendall(f"GET /big/{8 << 20} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        tls.recv(1000)
        tls.close()

    round_of_everything()                          # warm: pools, the leaf, lazily made things
    for srv in (good, bad_origin):
        wait_until(lambda srv=srv: srv._servers[0].tunnel_count == 0, what="every session ended")
    before = fd_count()
    for _ in range(5):
        round_of_everything()
    for srv in (good, bad_origin):
        wait_until(lambda srv=srv: srv._servers[0].tunnel_count == 0, what="every session ended")
    wait_until(lambda: fd_count() <= before, what=f"fds back to {before} (now {fd_count()})")
    assert server.tunnel_count == 0

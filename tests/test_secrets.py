"""Phantom secrets: the agent holds a look-alike, the proxy swaps in the real value.

Real parts: an HTTPS origin on loopback that reports what it received (tests/inspect_peers.py),
the proxy on port 0, clients using ``requests``, ``httpx``, curl and raw sockets.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import pytest

from inspect_peers import Origin
from peers import DEADLINE, WebServer, http_connect, read_head, recv_until, status_of, wait_until

pytest.importorskip("cryptography")
requests = pytest.importorskip("requests")

from kodarelay import CertificateAuthority, Secret, secret_env  # noqa: E402
from kodarelay.secrets import SecretSet, make_phantom  # noqa: E402

pytestmark = pytest.mark.timeout(60)

VALUE = "ghp_" + "R3alT0kenValue" * 3          # what the origin must receive, and CMD never see


@pytest.fixture
def other(ca):
    site = Origin(ca[1])
    yield site
    site.close()


# ── the phantom ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("value", "prefix"), [
    ("ghp_" + "a" * 36, "ghp_"), ("sk-" + "b" * 45, "sk-"), ("xoxb-" + "c" * 50, "xoxb-"),
    ("plainvalue", ""), ("sk-proj-" + "d" * 40, "sk-"),
])
def test_the_phantom_keeps_prefix_and_length_with_128_bits(value, prefix):
    p = make_phantom(value)
    assert p.startswith(prefix) and p != value
    rest = p[len(prefix):]
    assert len(rest) >= 22 and re.fullmatch(r"[A-Za-z0-9]+", rest)      # 22 base62 chars: 130 bits
    if len(value) - len(prefix) >= 22:
        assert len(p) == len(value)
    assert make_phantom(value) != p                                       # random per run


def test_repr_and_errors_never_show_value_or_phantom(caplog):
    s = Secret("GH_TOKEN", VALUE, ["api.test"])
    for text in (repr(s), str(s), repr(secret_env([s])[:0])):
        assert VALUE not in text and s.phantom not in text
    assert secret_env([s]) == [("GH_TOKEN", s.phantom)]
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(ValueError) as e:
        Secret("BAD NAME", VALUE, ["api.test"])
    assert VALUE not in str(e.value)
    with pytest.raises(ValueError, match="hosts"):
        Secret("X", VALUE, [])


def test_swap_in_target_headers_and_basic_and_back_in_responses():
    s = Secret("TOKEN", VALUE, ["api.test"])
    ss = SecretSet([s])
    basic = b"Basic " + base64.b64encode(f"user:{s.phantom}".encode())
    fields = [(b"Authorization", b"Bearer " + s.phantom.encode()), (b"X-Basic", basic),
              (b"Proxy-Authorization", b"Basic " + base64.b64encode(f"job:{s.phantom}".encode()))]
    out = ss.check("api.test", 443, f"/x?token={s.phantom}", fields, over_tls=True)
    assert out is not None and not hasattr(out, "reason")
    assert out.target == f"/x?token={VALUE}" and out.names == ("TOKEN",)
    assert out.fields[0][1] == b"Bearer " + VALUE.encode()
    assert base64.b64decode(out.fields[1][1].split()[1]) == f"user:{VALUE}".encode()
    assert out.fields[2] == fields[2]                                   # the proxy's own: untouched
    assert ss.check("api.test", 443, "/x", [(b"Accept", b"*/*")], over_tls=True) is None
    assert ss.check("api.test", 80, f"/{s.phantom}", [], over_tls=False).reason == "secret_plaintext"
    assert ss.check("evil.test", 443, "/", [(b"X", s.phantom.encode())], over_tls=True).reason == "secret_leak"
    back = ss.unswap("api.test", 443, [(b"X-Echo", VALUE.encode())])
    assert back == [(b"X-Echo", s.phantom.encode())]
    assert ss.redact(f"/a/{s.phantom}/{VALUE}") == "/a/[TOKEN]/[TOKEN]"
    mixed = [(b"Authorization", b"  bAsIc " + base64.b64encode(f"u:{s.phantom}".encode()))]
    swapped = ss.check("api.test", 443, "/", mixed, over_tls=True)
    assert swapped is not None and base64.b64decode(swapped.fields[0][1].split()[1]) == f"u:{VALUE}".encode()


def test_a_file_secret_is_reread_when_the_file_changes(tmp_path):
    f = tmp_path / "token"
    f.write_text("first-value-0000000000000000\n")
    s = Secret.from_file("T", f, ["api.test"])
    assert s.value == "first-value-0000000000000000" and s.path == str(f)
    f.write_text("second-value-111111111111111111\nignored\n")
    os.utime(f, (1, 1))
    s._checked -= 2                   # (the once-a-second check, without waiting a second)
    assert s.value == "second-value-111111111111111111"


# ── through the proxy ────────────────────────────────────────────────────────


def _start(start_proxy, ca, run_ca, patterns, secret, events=None, **more):
    options = {"inspect": run_ca, "upstream_ca": str(ca[0]), "secrets": [secret], "forward_http": True, **more}
    if events is not None:
        options["on_event"] = events.append
    return start_proxy(patterns, **options)


@pytest.mark.parametrize("client", ["requests", "httpx", "curl"])
def test_the_origin_gets_the_value_and_another_host_is_refused(start_proxy, ca, run_ca, origin, other, bundle,
                                                                client, caplog):
    caplog.set_level(logging.DEBUG, logger="kodarelay")
    s = Secret("GH_TOKEN", VALUE, [f"localhost:{origin.port}"])
    events: list = []
    # the other host is inspected too (a phantom in a blind tunnel is not seen: it is only a phantom)
    h = _start(start_proxy, ca, run_ca, ["localhost"], s, events, inspect_hosts=[f"localhost:{other.port}"])
    proxy = f"http://127.0.0.1:{h.port}"
    basic = base64.b64encode(f"x-access-token:{s.phantom}".encode()).decode()
    headers = {"Authorization": f"Bearer {s.phantom}", "x-api-key": s.phantom, "X-Basic": f"Basic {basic}",
               "X-Echo": s.phantom}
    url = f"https://localhost:{origin.port}/repos/{s.phantom}?access_token={s.phantom}"
    leak = f"https://localhost:{other.port}/collect"

    def get(u: str) -> tuple[int, dict, str]:
        if client == "requests":
            r = requests.get(u, headers=headers, proxies={"https": proxy}, verify=bundle, timeout=DEADLINE)
            return r.status_code, dict(r.headers), r.text
        if client == "httpx":
            httpx = pytest.importorskip("httpx")
            import ssl

            with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=bundle), timeout=DEADLINE) as c:
                r = c.get(u, headers=headers)
                return r.status_code, dict(r.headers), r.text
        from peers import require_tool

        argv = [require_tool("curl"), "-sS", "-i", "--proxy", proxy, "--cacert", bundle, "--max-time", "20"]
        for k, v in headers.items():
            argv += ["-H", f"{k}: {v}"]
        out = subprocess.run([*argv, u], capture_output=True, timeout=30).stdout.decode()
        resp = out.split("\r\n\r\n", 1)[1] if out.startswith("HTTP/1.1 200 Connection") else out
        head, _, body = resp.partition("\r\n\r\n")
        lines = head.split("\r\n")
        return int(lines[0].split()[1]), {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}, body

    status, fields, body = get(url)
    assert status == 200, body
    seen = json.loads(body)
    lowered = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == f"/repos/{VALUE}?access_token={VALUE}"
    assert lowered["authorization"] == f"Bearer {VALUE}" and lowered["x-api-key"] == VALUE
    assert base64.b64decode(lowered["x-basic"].split()[1]).decode() == f"x-access-token:{VALUE}"
    assert {k.lower(): v for k, v in fields.items()}["x-echo"] == s.phantom      # the echo comes back a phantom
    status, fields, body = get(leak)
    assert status == 403 and {k.lower(): v for k, v in fields.items()}["x-proxy-error"] == "secret_leak"
    assert "GH_TOKEN" in body and s.phantom not in body and VALUE not in body
    h.shutdown()
    v = [x for x in h.violations() if x.reason == "secret_leak"]
    assert v and "GH_TOKEN" in (v[0].detail or "")
    ends = [e for e in events if e.kind == "end" and e.method == "GET"]
    assert ends and ends[0].secrets == ("GH_TOKEN",) and ends[0].path == "/repos/[GH_TOKEN]"
    everything = json.dumps([e.to_json() for e in events]) + repr(h.violations()) + caplog.text
    assert VALUE not in everything and s.phantom not in everything


def test_plain_http_never_swaps(start_proxy, ca, run_ca):
    site = WebServer()
    try:
        s = Secret("TOKEN", VALUE, ["localhost"])
        h = _start(start_proxy, ca, run_ca, ["localhost"], s)
        r = requests.get(f"http://localhost:{site.port}/x", headers={"Authorization": f"Bearer {s.phantom}"},
                         proxies={"http": f"http://127.0.0.1:{h.port}"}, timeout=DEADLINE)
        assert r.status_code == 403 and r.headers["X-Proxy-Error"] == "secret_plaintext"
        r = requests.get(f"http://localhost:{site.port}/x", proxies={"http": f"http://127.0.0.1:{h.port}"},
                         timeout=DEADLINE)
        assert r.status_code == 200                                        # no phantom: forwarded
    finally:
        site.close()


def test_a_secrets_host_is_decrypted_without_a_request_rule(start_proxy, ca, run_ca, origin, bundle):
    s = Secret("TOKEN", VALUE, [f"localhost:{origin.port}"])
    h = _start(start_proxy, ca, run_ca, ["localhost"], s)
    r = requests.get(f"https://localhost:{origin.port}/", proxies={"https": f"http://127.0.0.1:{h.port}"},
                     verify=bundle, timeout=DEADLINE)
    assert r.status_code == 200                                           # our leaf: it was decrypted


def test_secrets_need_a_ca_and_a_decryptable_host(start_proxy, run_ca):
    s = Secret("TOKEN", VALUE, ["api.test"])
    with pytest.raises(ValueError, match="inspect="):
        start_proxy(["api.test"], secrets=[s])
    with pytest.raises(ValueError, match="never decrypts"):
        start_proxy(["api.test"], secrets=[s], inspect=run_ca, no_inspect=["api.test"])


# ── the command ──────────────────────────────────────────────────────────────

SEEN_BY_CMD = """
import glob, json, os, ssl, sys, urllib.request, urllib.error
port, secret_file = int(sys.argv[1]), sys.argv[2]
value, file_value = sys.argv[3][::-1], sys.argv[4][::-1]     # (given reversed: CMD's argv holds no value)
found = []
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
    try:
        data = open(path, "rb").read()
    except OSError:
        continue
    if value.encode() in data or file_value.encode() in data:
        found.append(path)
out = {"env": os.environ.get("GH_TOKEN"), "file_env": os.environ.get("FILE_TOKEN"),
       "file": open(secret_file).read(), "found": found}
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
req = urllib.request.Request(f"https://localhost:{port}/api", headers={
    "Authorization": "Bearer " + os.environ["GH_TOKEN"], "x-api-key": os.environ["FILE_TOKEN"]})
out["origin"] = json.loads(opener.open(req).read())["headers"]
print(json.dumps(out))
"""


def test_run_gives_cmd_phantoms_and_hides_the_values(ca, origin, tmp_path):
    from test_cli import clean_env, kr
    from test_fence import _fence_works

    if _fence_works() is not None:
        pytest.skip(_fence_works())
    secret_file = tmp_path / "token"
    file_value = "sk-" + "FileValue" * 5
    secret_file.write_text(file_value + "\n")
    events = tmp_path / "events.jsonl"
    where = f"localhost:{origin.port}"
    out = kr("run", "--upstream", "direct", "--allow", where, "--upstream-ca", str(ca[0]), "-vv",
             "--events", str(events), "--secret", f"GH_TOKEN@{where}", "--secret", f"FILE_TOKEN={secret_file}@{where}",
             "--", sys.executable, "-c", SEEN_BY_CMD, str(origin.port), str(secret_file), VALUE[::-1], file_value[::-1],
             env=clean_env(GH_TOKEN=VALUE))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["env"].startswith("ghp_") and seen["env"] != VALUE and len(seen["env"]) == len(VALUE)
    assert seen["file_env"].startswith("sk-") and seen["file_env"] != file_value
    assert seen["file"] == "" and seen["found"] == []                # hidden; in no process CMD can see
    headers = {k.lower(): v for k, v in seen["origin"].items()}
    assert headers["authorization"] == f"Bearer {VALUE}" and headers["x-api-key"] == file_value
    logs = out.stderr + events.read_text()
    for text in (VALUE, file_value, seen["env"], seen["file_env"]):
        assert text not in logs
    assert '"secrets": ["GH_TOKEN", "FILE_TOKEN"]' in events.read_text()


def test_run_refuses_secrets_it_cannot_keep(tmp_path):
    from test_cli import assert_one_line_error, clean_env, kr

    out = kr("run", "--no-isolate", "--allow", "api.test", "--secret", "GH_TOKEN@api.test", "--", "true",
             env=clean_env(GH_TOKEN=VALUE))
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "--secret needs the fence")
    out = kr("run", "--allow", "api.test", "--secret", "GH_TOKEN@api.test", "--", "true", env=clean_env())
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "GH_TOKEN is not set")
    out = kr("run", "--allow", "api.test", "--secret", "GH_TOKEN", "--", "true", env=clean_env(GH_TOKEN=VALUE))
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "NAME@HOSTS")
    assert VALUE not in out.stderr

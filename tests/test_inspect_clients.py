"""Real clients through ``kodarelay run`` with request rules on an inspected HTTPS origin.

Each test runs ``kodarelay run --allow RULE --upstream-ca ORIGIN_CA -- DRIVER`` unfenced
(``--no-isolate``) and, where user namespaces work, fenced (the default mode, asked for with
``--isolate``). DRIVER runs the client twice or more with the run's environment (the proxy
variables and the run's CA bundle in every CA variable): an allowed request succeeds, a refused
one (``POST``, or a path outside the rule) shows what that client shows for a ``403`` with
``X-Proxy-Error: request_not_allowed``, the origin never sees it, and kodarelay's summary on
stderr lists it. Clients: curl, requests, httpx, pip (an https simple index and a wheel made
here), git (ls-remote and clone over git's dumb HTTP protocol, served as static files over
TLS), npm (a registry's packument documents as static files; ``npm_config_https_proxy`` and
``npm_config_cafile``) and Node (``NODE_EXTRA_CA_CERTS``; Node's ``https`` ignores
``HTTPS_PROXY``, so its script opens the CONNECT itself, as proxy agents do).

The origin is a static HTTPS server on 127.0.0.1 port 0 with a trustme certificate for
``localhost``; nothing sleeps to wait; every process has a timeout.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from peers import require_tool

pytest.importorskip("cryptography")
trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.timeout(120)

RUN_TIMEOUT = 90
FENCES = ["--no-isolate", "--isolate"]
REFUSED = "request_not_allowed"


# ── the origin: static files over TLS, every request recorded ─────────────────


class StaticTlsSite:
    """A threaded static HTTPS server over ``root`` on 127.0.0.1:0; records (method, path)."""

    def __init__(self, root: Path, tls: ssl.SSLContext) -> None:
        seen: list[tuple[str, str]] = []
        self.seen = seen

        class Handler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def send_head(self):  # type: ignore[no-untyped-def]
                seen.append((self.command, self.path))
                return super().send_head()

            def do_POST(self) -> None:  # noqa: N802 - what the origin would answer (never reached here)
                seen.append(("POST", self.path))
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                self.send_response(200)
                self.send_header("Content-Length", "3")
                self.end_headers()
                self.wfile.write(b"ok\n")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # type: ignore[no-untyped-def]
                conn, addr = self.socket.accept()
                # the handshake happens in the connection's own thread, on its first read
                return tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

        self.httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def methods_seen(self, path_prefix: str) -> set[str]:
        return {m for m, p in self.seen if p.startswith(path_prefix)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _wheel(dest: Path, dist: str) -> Path:
    """A minimal pure-Python wheel ``dist``-1.0 in ``dest``."""
    mod = dist.replace("-", "_")
    whl = dest / f"{mod}-1.0-py3-none-any.whl"
    files = {
        f"{mod}/__init__.py": "VALUE = 42\n",
        f"{mod}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n",
        f"{mod}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{mod}-1.0.dist-info/RECORD", "".join(f"{p},,\n" for p in files) + f"{mod}-1.0.dist-info/RECORD,,\n")
    return whl


def _index(root: Path, dist: str, whl: Path, href_dir: str) -> None:
    """The simple-index page of ``dist`` linking to ``whl`` under ``href_dir``."""
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    page = root / "simple" / dist
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/{href_dir}/{whl.name}#sha256={digest}">{whl.name}</a></body></html>\n')


@pytest.fixture(scope="module")
def origin_ca(tmp_path_factory):  # type: ignore[no-untyped-def]
    """(CA bundle path, server context) for an origin named localhost / 127.0.0.1."""
    authority = trustme.CA()
    bundle = tmp_path_factory.mktemp("origin-ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return bundle, ctx


@pytest.fixture(scope="module")
def site_root(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("site")
    (root / "hello.txt").write_text("hello through the inspecting proxy\n")
    for sub in ("packages", "private"):
        (root / sub).mkdir()
    _index(root, "krtest-pkg", _wheel(root / "packages", "krtest-pkg"), "packages")
    _index(root, "krhidden-pkg", _wheel(root / "private", "krhidden-pkg"), "private")   # a link outside the rule
    return root


@pytest.fixture
def site(site_root, origin_ca):  # type: ignore[no-untyped-def]
    s = StaticTlsSite(site_root, origin_ca[1])
    yield s
    s.close()


@pytest.fixture(params=FENCES)
def fence(request):  # type: ignore[no-untyped-def]
    if request.param == "--isolate":
        from test_fence import _fence_works

        why = _fence_works()
        if why is not None:
            pytest.skip(why)
    return request.param


# ── one run: the client's steps in the run's environment ─────────────────────

DRIVER = r"""
import json, subprocess, sys
out = []
for argv in json.loads(sys.argv[1]):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    out.append({"rc": p.returncode, "out": p.stdout, "err": p.stderr})
print(json.dumps(out))
"""


def _run(fence: str, rules: list[str], ca: Path, steps: list[list[str]], tmp_path: Path,
         **env_extra: str) -> tuple[list[dict[str, object]], str]:
    """Run ``steps`` (argvs) one after another inside one ``kodarelay run``: (their results, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("PIP_") and not k.lower().startswith("npm_")}
    env.update(HOME=str(tmp_path), **env_extra)
    allow = [a for rule in rules for a in ("--allow", rule)]
    out = subprocess.run(
        [sys.executable, "-m", "kodarelay", "run", "--upstream", "direct", fence, *allow, "--upstream-ca", str(ca),
         "--", sys.executable, "-c", DRIVER, json.dumps(steps)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout), out.stderr


def _summarised(stderr: str, port: int) -> None:
    """kodarelay's summary lists the refused request's host and reason."""
    lines = [ln for ln in stderr.splitlines() if REFUSED in ln and f"localhost:{port}" in ln]
    assert lines, stderr


def _all_rules(port: int) -> list[str]:
    return [f"GET,HEAD localhost:{port}/*"]


# ── curl ─────────────────────────────────────────────────────────────────────


def test_curl(site, origin_ca, fence, tmp_path):
    curl = require_tool("curl")
    base = [curl, "-sS", "-i", "--max-time", "20"]
    (ok, no), stderr = _run(fence, _all_rules(site.port), origin_ca[0], [
        [*base, site.url("/hello.txt")],
        [*base, "-X", "POST", "--data", "x", site.url("/hello.txt")],
    ], tmp_path)
    assert ok["rc"] == 0 and "HTTP/1.1 200" in ok["out"], ok
    assert ok["out"].endswith("hello through the inspecting proxy\n")
    assert no["rc"] == 0 and "HTTP/1.1 403 Forbidden" in no["out"], no
    assert f"X-Proxy-Error: {REFUSED}" in no["out"]
    assert "POST" not in site.methods_seen("/hello.txt")
    _summarised(stderr, site.port)


# ── requests and httpx ───────────────────────────────────────────────────────

REQUESTS = r"""
import json, sys, requests
url = sys.argv[1]
ok = requests.get(url, timeout=20)
no = requests.post(url, data=b"x", timeout=20)
print(json.dumps({"ok": [ok.status_code, ok.text], "no": [no.status_code, no.headers.get("X-Proxy-Error"), no.text]}))
"""

HTTPX = r"""
import json, sys, httpx
url = sys.argv[1]
with httpx.Client(timeout=20) as c:           # trust_env: HTTPS_PROXY and SSL_CERT_FILE
    ok = c.get(url)
    no = c.post(url, content=b"x")
print(json.dumps({"ok": [ok.status_code, ok.text], "no": [no.status_code, no.headers.get("X-Proxy-Error"), no.text]}))
"""


@pytest.mark.parametrize("lib", ["requests", "httpx"])
def test_python_http_libraries(site, origin_ca, fence, tmp_path, lib):
    pytest.importorskip(lib)
    code = REQUESTS if lib == "requests" else HTTPX
    (res,), stderr = _run(fence, _all_rules(site.port), origin_ca[0], [[sys.executable, "-c", code,
                                                                         site.url("/hello.txt")]], tmp_path)
    assert res["rc"] == 0, res
    seen = json.loads(str(res["out"]))
    assert seen["ok"] == [200, "hello through the inspecting proxy\n"]
    status, reason, body = seen["no"]
    assert (status, reason) == (403, REFUSED)
    assert f"POST localhost:{site.port}/hello.txt refused ({REFUSED})" in body
    assert "POST" not in site.methods_seen("/hello.txt")
    _summarised(stderr, site.port)


# ── pip: an https simple index ───────────────────────────────────────────────


def test_pip_download_from_an_https_index(site, site_root, origin_ca, fence, tmp_path):
    # the index and /packages are allowed; /private (where krhidden-pkg's wheel lives) is not
    rules = [f"GET,HEAD localhost:{site.port}/simple/*", f"GET,HEAD localhost:{site.port}/packages/*"]
    dest = tmp_path / "dl"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--retries", "0", "--timeout", "20", "--index-url", site.url("/simple/"), "-d", str(dest)]
    (ok, no), stderr = _run(fence, rules, origin_ca[0], [[*pip, "krtest-pkg==1.0"], [*pip, "krhidden-pkg==1.0"]],
                            tmp_path, PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
    assert ok["rc"] == 0, ok
    [got] = [p for p in dest.iterdir() if p.name.startswith("krtest_pkg")]
    assert got.read_bytes() == (site_root / "packages" / got.name).read_bytes()
    assert no["rc"] != 0, no
    assert "HTTP error 403 while getting" in str(no["err"]), no["err"]
    assert "/private/krhidden_pkg-1.0-py3-none-any.whl" in str(no["err"])
    assert not any(p.startswith("/private/") for _, p in site.seen)
    assert not [p for p in dest.iterdir() if p.name.startswith("krhidden")]
    _summarised(stderr, site.port)


# ── git over https (the dumb HTTP protocol: static files over TLS) ───────────


@pytest.fixture(scope="module")
def git_repos(site_root, tmp_path_factory):  # type: ignore[no-untyped-def]
    """site_root/repo.git and site_root/other.git, bare, with info/refs for dumb HTTP."""
    git = require_tool("git")
    work_dir = tmp_path_factory.mktemp("git")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(GIT_CONFIG_NOSYSTEM="1", HOME=str(work_dir), GIT_TERMINAL_PROMPT="0")
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=env, check=True)
    for name in ("repo", "other"):
        work = work_dir / name
        run([git, "init", "-q", "-b", "main", str(work)])
        (work / "hello.txt").write_text(f"{name} through the inspecting proxy\n")
        run([git, "-C", str(work), "add", "hello.txt"])
        run([git, "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "one"])
        bare = site_root / f"{name}.git"
        if not bare.exists():
            run([git, "clone", "-q", "--bare", str(work), str(bare)])
            run([git, "-C", str(bare), "update-server-info"])
    return git


def test_git_ls_remote_and_clone_over_https(site, git_repos, origin_ca, fence, tmp_path):
    git = git_repos
    rules = [f"GET,HEAD localhost:{site.port}/repo.git/*"]
    dest = tmp_path / "clone"
    (refs, clone, no), stderr = _run(fence, rules, origin_ca[0], [
        [git, "ls-remote", site.url("/repo.git")],
        [git, "clone", "-q", site.url("/repo.git"), str(dest)],
        [git, "ls-remote", site.url("/other.git")],              # outside the rule
    ], tmp_path, GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
    assert refs["rc"] == 0 and "refs/heads/main" in str(refs["out"]), refs
    assert clone["rc"] == 0, clone
    assert (dest / "hello.txt").read_text() == "repo through the inspecting proxy\n"
    assert no["rc"] != 0 and "The requested URL returned error: 403" in str(no["err"]), no
    assert f"remote: kodarelay: GET localhost:{site.port}/other.git/info/refs refused ({REFUSED})" in str(no["err"])
    assert not any(p.startswith("/other.git") for _, p in site.seen)
    _summarised(stderr, site.port)


# ── npm: a registry over https ───────────────────────────────────────────────


def test_npm_view_from_an_https_registry(site, site_root, origin_ca, fence, tmp_path):
    npm = require_tool("npm")
    for name in ("krtest-pkg", "krhidden-pkg"):          # packuments, as a registry serves them
        (site_root / name).write_text(json.dumps({
            "name": name, "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {"name": name, "version": "1.0.0", "dist": {
                "tarball": site.url(f"/{name}/-/{name}-1.0.0.tgz"), "shasum": "0" * 40}}}}))
    rules = [f"GET,HEAD localhost:{site.port}/krtest-pkg"]  # the other package is outside the rule
    view = [npm, "view", "--registry", site.url("/"), "--fetch-retries", "0"]
    (ok, no), stderr = _run(fence, rules, origin_ca[0], [[*view, "krtest-pkg", "version"],
                                                         [*view, "krhidden-pkg", "version"]],
                            tmp_path, npm_config_update_notifier="false", npm_config_audit="false")
    assert ok["rc"] == 0 and str(ok["out"]).strip() == "1.0.0", ok
    assert no["rc"] != 0, no
    assert re.search(r"npm (ERR!|error) code E403", str(no["err"])), no["err"]      # (npm 9 says ERR!)
    assert f"403 Forbidden - GET {site.url('/krhidden-pkg')}" in str(no["err"])
    assert ("GET", "/krhidden-pkg") not in site.seen
    _summarised(stderr, site.port)


# ── Node (NODE_EXTRA_CA_CERTS) ───────────────────────────────────────────────

# Node's https module does not read HTTPS_PROXY (before Node 24's NODE_USE_ENV_PROXY): like the
# proxy agents npm and others use, the script opens the CONNECT and runs TLS over that socket.
NODE = r"""
const http = require("http"), https = require("https"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
const target = new URL(process.argv[2]);
function fetchThrough(method, body) {
  return new Promise((resolve, reject) => {
    const connect = http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT",
                                  path: `${target.hostname}:${target.port}`, timeout: 20000});
    connect.on("error", reject);
    connect.on("connect", (res, socket) => {
      if (res.statusCode !== 200) return reject(new Error(`CONNECT ${res.statusCode}`));
      const req = https.request({host: target.hostname, port: target.port, path: target.pathname, method,
        headers: {"Content-Length": Buffer.byteLength(body)},
        createConnection: () => tls.connect({socket, servername: target.hostname})}, (r) => {
        let data = "";
        r.setEncoding("utf8");
        r.on("data", (c) => { data += c; });
        r.on("end", () => { socket.destroy(); resolve([r.statusCode, r.headers["x-proxy-error"] || null, data]); });
      });
      req.on("error", reject);
      req.end(body);
    });
    connect.end();
  });
}
(async () => {
  const ok = await fetchThrough("GET", "");
  const no = await fetchThrough("POST", "x");
  console.log(JSON.stringify({ok, no, extra: process.env.NODE_EXTRA_CA_CERTS || null}));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_https_with_node_extra_ca_certs(site, origin_ca, fence, tmp_path):
    node = require_tool("node")
    script = tmp_path / "client.js"
    script.write_text(NODE)
    (res,), stderr = _run(fence, _all_rules(site.port), origin_ca[0], [[node, str(script), site.url("/hello.txt")]],
                          tmp_path)
    assert res["rc"] == 0, res
    seen = json.loads(str(res["out"]))
    assert seen["extra"]                                            # the run's bundle, through NODE_EXTRA_CA_CERTS
    assert seen["ok"] == [200, None, "hello through the inspecting proxy\n"]
    status, reason, body = seen["no"]
    assert (status, reason) == (403, REFUSED) and f"({REFUSED})" in body
    assert "POST" not in site.methods_seen("/hello.txt")
    _summarised(stderr, site.port)


def test_the_clients_origin_is_really_verified(site, origin_ca, tmp_path):
    """Control: without ``--upstream-ca`` the trustme origin fails verification (502
    upstream_tls), so the passes above are kodarelay verifying the origin against ORIGIN_CA."""
    curl = require_tool("curl")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out = subprocess.run(
        [sys.executable, "-m", "kodarelay", "run", "--upstream", "direct", "--no-isolate", "--allow",
         f"GET,HEAD localhost:{site.port}/*", "--", curl, "-sS", "-i", "--max-time", "20", site.url("/hello.txt")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    assert "HTTP/1.1 502" in out.stdout and "X-Proxy-Error: upstream_tls" in out.stdout, out.stdout + out.stderr
    assert site.seen == []                                         # its handshake failed: no request


"""Plain-HTTP forwarding with the tools that need it: apt, pip, git over dumb HTTP, chaining
through tinyproxy, and the ``kodarelay`` command. All on loopback; the sites live under a
name (``repo.test``) only the proxy can resolve, so a tool that skipped the proxy fails."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from kodarelay import UpstreamConfig

from forward_peers import Origin, read_response, send_raw
from peers import dead_port, pinned, require_tool, status_of, tinyproxy

SITE = "repo.test"


class StaticSite:
    """A threaded static HTTP server over ``root`` on 127.0.0.1:0 that records request paths."""

    def __init__(self, root: Path) -> None:
        paths: list[str] = []
        self.paths = paths

        class Handler(http.server.SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def send_head(self):  # type: ignore[no-untyped-def]
                paths.append(self.path)
                return super().send_head()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://{SITE}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def site_root(tmp_path):  # type: ignore[no-untyped-def]
    root = tmp_path / "site"
    root.mkdir()
    return root


@pytest.fixture
def site(site_root):  # type: ignore[no-untyped-def]
    s = StaticSite(site_root)
    yield s
    s.close()


@pytest.fixture
def repo_proxy(start_proxy):  # type: ignore[no-untyped-def]
    """A forwarding proxy that knows ``repo.test`` as 127.0.0.1 and allows it (and only it)."""
    return start_proxy([SITE, "127.0.0.1"], forward_http=True, socks5=True,
                       resolver=pinned({SITE: ["127.0.0.1"]}))


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


# ── apt ─────────────────────────────────────────────────────────────────────


def _build_deb(root: Path, work: Path) -> Path:
    pkg = work / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/doc/krtest").mkdir(parents=True)
    (pkg / "usr/share/doc/krtest/README").write_text("kodarelay forwarding test\n")
    (pkg / "DEBIAN/control").write_text(
        "Package: krtest\nVersion: 1.0\nArchitecture: all\nMaintainer: kodarelay <kr@example.invalid>\n"
        "Description: kodarelay forwarding test package\n"
    )
    deb = root / "krtest_1.0_all.deb"
    subprocess.run([require_tool("dpkg-deb"), "--build", "--root-owner-group", str(pkg), str(deb)], check=True,
                   capture_output=True, timeout=60)
    return deb


def test_apt_get_update_and_download_through_the_proxy(repo_proxy, site, site_root, tmp_path):
    apt_get = require_tool("apt-get")
    deb = _build_deb(site_root, tmp_path)
    data = deb.read_bytes()
    (site_root / "Packages").write_text(
        "Package: krtest\nVersion: 1.0\nArchitecture: all\nMaintainer: kodarelay <kr@example.invalid>\n"
        f"Filename: ./{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        "Description: kodarelay forwarding test package\n\n"
    )
    apt = tmp_path / "apt"
    for d in ("state/lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d",
              "etc/apt.conf.d", "out"):
        (apt / d).mkdir(parents=True)
    (apt / "state/status").write_text("")
    sources = apt / "etc/sources.list"
    sources.write_text(f"deb [trusted=yes] {site.base}/ ./\n")
    opts = [
        f"-o=Dir::Etc::sourcelist={sources}", f"-o=Dir::Etc::sourceparts={apt / 'etc/sources.list.d'}",
        f"-o=Dir::Etc::preferencesparts={apt / 'etc/preferences.d'}", f"-o=Dir::Etc::parts={apt / 'etc/apt.conf.d'}",
        f"-o=Dir::State={apt / 'state'}", f"-o=Dir::State::status={apt / 'state/status'}",
        f"-o=Dir::Cache={apt / 'cache'}", f"-o=Acquire::http::Proxy=http://127.0.0.1:{repo_proxy.port}",
        "-o=Debug::NoLocking=1", "-o=APT::Sandbox::User=root", "-o=Acquire::Languages=none",
        "-o=APT::Get::List-Cleanup=0", "-o=Acquire::AllowInsecureRepositories=1",
    ]
    env = _clean_env(DEBIAN_FRONTEND="noninteractive")
    out = subprocess.run([apt_get, *opts, "update"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([apt_get, *opts, "download", "krtest"], capture_output=True, text=True, timeout=60,
                         env=env, cwd=apt / "out")
    assert out.returncode == 0, out.stdout + out.stderr
    [got] = list((apt / "out").iterdir())
    assert got.read_bytes() == data
    assert "/./Packages" in site.paths and f"/./{deb.name}" in site.paths


# ── pip ─────────────────────────────────────────────────────────────────────


def _build_wheel(dest: Path) -> Path:
    name = "krtest_pkg-1.0-py3-none-any.whl"
    whl = dest / name
    files = {
        "krtest_pkg/__init__.py": "VALUE = 42\n",
        "krtest_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: krtest-pkg\nVersion: 1.0\n",
        "krtest_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + "krtest_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr("krtest_pkg-1.0.dist-info/RECORD", record)
    return whl


def test_pip_download_from_an_http_index(repo_proxy, site, site_root, tmp_path):
    (site_root / "packages").mkdir()
    whl = _build_wheel(site_root / "packages")
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    (site_root / "simple/krtest-pkg").mkdir(parents=True)
    (site_root / "simple/krtest-pkg/index.html").write_text(
        f'<html><body><a href="../../packages/{whl.name}#sha256={digest}">{whl.name}</a></body></html>\n'
    )
    out_dir = tmp_path / "dl"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--disable-pip-version-check",
         "--no-cache-dir", "--index-url", f"{site.base}/simple/", "--trusted-host", SITE,
         "--proxy", f"http://127.0.0.1:{repo_proxy.port}", "-d", str(out_dir), "krtest-pkg==1.0"],
        capture_output=True, text=True, timeout=120, env=_clean_env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (out_dir / whl.name).read_bytes() == whl.read_bytes()


# ── git over dumb HTTP ──────────────────────────────────────────────────────


def test_git_clone_over_dumb_http(repo_proxy, site, site_root, tmp_path):
    git = require_tool("git")
    env = _clean_env(GIT_CONFIG_NOSYSTEM="1", HOME=str(tmp_path), GIT_TERMINAL_PROMPT="0")
    work = tmp_path / "work"
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=env, check=True)
    run([git, "init", "-q", "-b", "main", str(work)])
    (work / "hello.txt").write_text("through the proxy\n")
    run([git, "-C", str(work), "add", "hello.txt"])
    run([git, "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "one"])
    bare = site_root / "repo.git"
    run([git, "clone", "-q", "--bare", str(work), str(bare)])
    run([git, "-C", str(bare), "update-server-info"])
    dest = tmp_path / "clone"
    out = subprocess.run([git, "-c", f"http.proxy=http://127.0.0.1:{repo_proxy.port}", "clone", "-q",
                          f"{site.base}/repo.git", str(dest)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert (dest / "hello.txt").read_text() == "through the proxy\n"
    assert any(p.startswith("/repo.git/info/refs") for p in site.paths)


# ── chained through tinyproxy ───────────────────────────────────────────────


@pytest.mark.parametrize("auth", [None, ("alice", "s3cret")])
def test_forwarding_chains_through_tinyproxy(start_proxy, tmp_path, auth):
    require_tool("tinyproxy")
    origin = Origin()
    try:
        with tinyproxy(tmp_path, basic_auth=auth) as tp_port:
            up = UpstreamConfig.http_proxy("127.0.0.1", tp_port, username=auth and auth[0], password=auth and auth[1])
            h = start_proxy(["localhost"], forward_http=True, upstream=up)
            s = send_raw(h.port, f"GET {origin.url('/chained?q=1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, body = read_response(s)
            assert status_of(head) == 200, head
            assert body == b"hello from /chained?q=1\n"
            [(_, path, _, headers, names)] = origin.seen
            assert path == "/chained?q=1" and "proxy-authorization" not in names
            s = send_raw(h.port, b"GET http://evil.test/ HTTP/1.1\r\n\r\n")
            assert status_of(read_response(s)[0]) == 403
    finally:
        origin.close()


def test_wrong_upstream_credentials_are_the_upstreams_answer(start_proxy, tmp_path):
    require_tool("tinyproxy")
    origin = Origin()
    try:
        with tinyproxy(tmp_path, basic_auth=("alice", "right")) as tp_port:
            up = UpstreamConfig.http_proxy("127.0.0.1", tp_port, username="alice", password="wrong")
            h = start_proxy(["localhost"], forward_http=True, upstream=up)
            s = send_raw(h.port, f"GET {origin.url('/x')} HTTP/1.1\r\n\r\n".encode())
            assert status_of(read_response(s)[0]) in (401, 407)   # tinyproxy says 401
            assert origin.seen == []
    finally:
        origin.close()


def test_no_proxy_hosts_skip_the_upstream(start_proxy):
    origin = Origin()
    try:
        up = UpstreamConfig.http_proxy("127.0.0.1", dead_port(), no_proxy=("localhost",))
        h = start_proxy(["localhost"], forward_http=True, upstream=up)
        s = send_raw(h.port, f"GET {origin.url('/direct')} HTTP/1.1\r\n\r\n".encode())
        assert read_response(s)[1] == b"hello from /direct\n"
        up = UpstreamConfig.http_proxy("127.0.0.1", dead_port())
        h = start_proxy(["localhost"], forward_http=True, upstream=up)
        s = send_raw(h.port, f"GET {origin.url('/direct')} HTTP/1.1\r\n\r\n".encode())
        assert status_of(read_response(s)[0]) == 502
    finally:
        origin.close()


# ── the command ─────────────────────────────────────────────────────────────

KR = [sys.executable, "-m", "kodarelay"]


def test_run_forwards_plain_http_and_summarises_host_and_port_only(tmp_path):
    curl = require_tool("curl")
    origin = Origin()
    try:
        secret_url = "http://evil.test/p-SECRET1?token=SECRET2#SECRET3"
        script = (f"{curl} -sS -f {origin.url('/ok')}; echo rc=$?; "
                  f"{curl} -sS -f '{secret_url}'; echo rc=$?")
        out = subprocess.run([*KR, "run", "--allow", "localhost", "--allow", "127.0.0.1", "--", "sh", "-c", script],
                             capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path)
        assert "hello from /ok\nrc=0\n" in out.stdout, out.stdout + out.stderr
        assert "rc=22" in out.stdout
        assert "evil.test:80" in out.stderr
        assert "SECRET" not in out.stdout + out.stderr
        out = subprocess.run([*KR, "run", "--no-forward-http", "--allow", "localhost", "--allow", "127.0.0.1", "--",
                              curl, "-sS", origin.url("/ok")],
                             capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path)
        assert "plain-HTTP forwarding is off" in out.stdout
        assert origin.seen[-1][1] == "/ok" and len(origin.seen) == 1
    finally:
        origin.close()


@pytest.mark.parametrize("flag, forwarded", [((), True), (("--no-forward-http",), False)])
def test_serve_forwards_plain_http_unless_told_not_to(flag, forwarded):
    import signal

    from test_cli import _start_serve

    curl = require_tool("curl")
    origin = Origin()
    proc, exports, err = _start_serve("--allow", "localhost", "--upstream", "direct", *flag)
    try:
        out = subprocess.run([curl, "-sS", "--max-time", "20", origin.url("/served")],
                             env=_clean_env(http_proxy=exports["HTTP_PROXY"]), capture_output=True, text=True,
                             timeout=30)
        if forwarded:
            assert out.stdout == "hello from /served\n", out.stderr
        else:
            assert "plain-HTTP forwarding is off" in out.stdout and origin.seen == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        origin.close()

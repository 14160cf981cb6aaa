"""The wider bouquet (``tools=True``) proven with real tools, offline, on loopback.

pip downloads from a local HTTPS simple index and git lists the refs of a local HTTPS
repository, each configured by nothing but the variables ``proxy_env_vars`` returns.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import ssl
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from kodarelay import BuiltInProxy, Filter, UpstreamConfig, proxy_env_vars

from peers import require_tool



class StaticHTTPS:
    """Serves a directory over HTTPS on 127.0.0.1:0 (as 'localhost' for the certificate)."""

    def __init__(self, root: Path, ctx: ssl.SSLContext) -> None:
        handler = lambda *a, **kw: _Quiet(*a, directory=str(root), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _tiny_wheel() -> tuple[str, bytes]:
    name = "kodademo-0.1-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("kodademo/__init__.py", "VALUE = 42\n")
        z.writestr("kodademo-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: kodademo\nVersion: 0.1\n")
        z.writestr(
            "kodademo-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: kodarelay-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("kodademo-0.1.dist-info/RECORD", "")
    return name, buf.getvalue()


def _clean_env(pairs) -> dict[str, str]:
    drop = ("proxy", "pip_", "git_", "ssl_cert", "ca_bundle", "requests_ca")
    env = {k: v for k, v in os.environ.items() if not any(d in k.lower() for d in drop)}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env.update(pairs)
    return env


@pytest.fixture
def proxy():
    with BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start() as h:
        yield h


def test_pip_downloads_through_the_proxy_with_only_the_bouquet(tmp_path, ca, proxy):
    name, data = _tiny_wheel()
    root = tmp_path / "index"
    (root / "simple" / "kodademo").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / "simple" / "kodademo" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/files/{name}#sha256={digest}">{name}</a></body></html>'
    )
    site = StaticHTTPS(root, ca[1])
    try:
        env = _clean_env(proxy_env_vars(proxy.port, ca[0], no_proxy="", tools=True))
        out = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d",
             str(tmp_path / "dl"), "--index-url", f"https://localhost:{site.port}/simple/", "kodademo==0.1"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert (tmp_path / "dl" / name).read_bytes() == data
        # Without the proxy's permission, pip gets nothing.
        with BuiltInProxy(Filter(["pypi.org"]), upstream=UpstreamConfig.direct()).start() as strict:
            env = _clean_env(proxy_env_vars(strict.port, ca[0], no_proxy="", tools=True))
            out = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "0",
                 "-d", str(tmp_path / "dl2"), "--index-url", f"https://localhost:{site.port}/simple/", "kodademo==0.1"],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert out.returncode != 0
            assert {v.host for v in strict.violations()} == {"localhost"}
    finally:
        site.close()


def test_git_ls_remote_through_the_proxy_with_only_the_bouquet(tmp_path, ca, proxy):
    git = require_tool("git")
    work = tmp_path / "work"
    bare = tmp_path / "srv" / "repo.git"
    genv = {**_clean_env([]), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path)}
    subprocess.run([git, "init", "-q", "-b", "main", str(work)], check=True, env=genv)
    (work / "f").write_text("x")
    subprocess.run([git, "-C", str(work), "add", "f"], check=True, env=genv)
    subprocess.run([git, "-C", str(work), "commit", "-qm", "c"], check=True, env=genv)
    subprocess.run([git, "clone", "-q", "--bare", str(work), str(bare)], check=True, env=genv)
    subprocess.run([git, "-C", str(bare), "update-server-info"], check=True, env=genv)  # dumb HTTP
    head = subprocess.run([git, "-C", str(work), "rev-parse", "HEAD"], check=True, env=genv, capture_output=True, text=True).stdout.strip()
    site = StaticHTTPS(tmp_path / "srv", ca[1])
    try:
        env = {**genv, **dict(proxy_env_vars(proxy.port, ca[0], no_proxy="", tools=True))}
        out = subprocess.run(
            [git, "ls-remote", f"https://localhost:{site.port}/repo.git"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert f"{head}\trefs/heads/main" in out.stdout
        assert proxy.violations() == []
        # The same command through a proxy that does not allow localhost gets nothing.
        with BuiltInProxy(Filter(["github.com"]), upstream=UpstreamConfig.direct()).start() as strict:
            env = {**genv, **dict(proxy_env_vars(strict.port, ca[0], no_proxy="", tools=True))}
            out = subprocess.run(
                [git, "ls-remote", f"https://localhost:{site.port}/repo.git"], env=env, capture_output=True, text=True,
                timeout=60,
            )
            assert out.returncode != 0
            assert {v.host for v in strict.violations()} == {"localhost"}
    finally:
        site.close()

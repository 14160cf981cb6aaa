"""Real clients through ``kodarelay run`` with a request rule on an inspected HTTPS origin:
git (clone over the dumb HTTP protocol, GET only) and pip (``pip download`` from a simple
index), each allowed, and refused where the rule does not reach, and what each shows.

The origin is a static HTTPS file server on loopback with a trustme certificate; kodarelay
verifies it with ``--upstream-ca`` and hands the run's CA to the client through the bouquet.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import ssl
import subprocess
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from peers import DEADLINE, require_tool

pytest.importorskip("cryptography")

pytestmark = pytest.mark.timeout(120)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _TlsStatic(http.server.ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext

    def get_request(self):  # type: ignore[no-untyped-def]
        conn, addr = self.socket.accept()
        return self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr


@pytest.fixture
def static_site(ca, tmp_path):  # type: ignore[no-untyped-def]
    root = tmp_path / "www"
    root.mkdir()
    httpd = _TlsStatic(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    httpd.tls = ca[1]
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield root, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    from test_cli import KR, clean_env

    env = clean_env(HOME=os.environ.get("HOME", "/tmp"), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1",
                    GIT_TERMINAL_PROMPT="0")
    return subprocess.run([*KR, "run", "--upstream", "direct", "--no-isolate", *args], env=env,
                          capture_output=True, text=True, timeout=DEADLINE * 9)


def test_git_clones_over_an_inspected_host_and_is_refused_outside_the_rule(static_site, ca, tmp_path):
    git = require_tool("git")
    root, port = static_site
    src = tmp_path / "src"
    subprocess.run([git, "init", "-q", str(src)], check=True)
    (src / "README").write_text("hello\n")
    subprocess.run([git, "-C", str(src), "-c", "user.email=a@b", "-c", "user.name=a", "add", "README"], check=True)
    subprocess.run([git, "-C", str(src), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one"],
                   check=True)
    for name in ("allowed", "other"):
        (root / name).mkdir()
        subprocess.run([git, "clone", "-q", "--bare", str(src), str(root / name / "repo.git")], check=True)
        subprocess.run([git, "-C", str(root / name / "repo.git"), "update-server-info"], check=True)
    out = _run("--allow", f"GET,HEAD localhost:{port}/allowed/*", "--upstream-ca", str(ca[0]), "--",
               git, "clone", "-q", f"https://localhost:{port}/allowed/repo.git", str(tmp_path / "got"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "got" / "README").read_text() == "hello\n"
    out = _run("--allow", f"GET,HEAD localhost:{port}/allowed/*", "--upstream-ca", str(ca[0]), "--",
               git, "clone", "-q", f"https://localhost:{port}/other/repo.git", str(tmp_path / "no"))
    assert out.returncode != 0
    assert "403" in out.stderr                                     # what git shows
    assert "request_not_allowed" in out.stderr                     # kodarelay's summary


def _wheel(directory: Path) -> str:
    name = "krdemo-1.0-py3-none-any.whl"
    files = {
        "krdemo/__init__.py": b"X = 1\n",
        "krdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: krdemo\nVersion: 1.0\n",
        "krdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},sha256={hashlib.sha256(v).hexdigest()},{len(v)}\n" for k, v in files.items())
    record += "krdemo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(directory / name, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr("krdemo-1.0.dist-info/RECORD", record)
    return name


def test_pip_downloads_from_an_inspected_index_and_is_refused_outside_the_rule(static_site, ca, tmp_path):
    root, port = static_site
    (root / "files").mkdir()
    wheel = _wheel(root / "files")
    (root / "simple" / "krdemo").mkdir(parents=True)
    (root / "simple" / "krdemo" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/files/{wheel}">{wheel}</a></body></html>')
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--index-url",
           f"https://localhost:{port}/simple/", "-d"]
    out = _run("--allow", f"GET,HEAD localhost:{port}/simple/*", "--allow", f"GET localhost:{port}/files/*",
               "--upstream-ca", str(ca[0]), "--", *pip, str(tmp_path / "dl"), "krdemo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "dl" / wheel).exists()
    shutil.rmtree(tmp_path / "dl")
    out = _run("--allow", f"GET,HEAD localhost:{port}/simple/*", "--upstream-ca", str(ca[0]), "--",
               *pip, str(tmp_path / "dl"), "krdemo")
    assert out.returncode != 0                                     # the index, but not its files
    assert "403" in out.stdout + out.stderr
    assert "request_not_allowed" in out.stderr

"""The fence of ``kodarelay run`` against a hostile CMD (issue 10, issue 13 item 1).

Real processes only: ``python -m kodarelay run`` with CMD trying to leave through
``nsenter``, a host Unix socket, another kodarelay's bridge or a direct TCP connection to
a host loopback listener. Every attempt is judged twice: by what CMD saw and by what the
host listener received (nothing). No sleeps: waits are on pipes, files or process exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import DEADLINE, EchoServer, require_tool

KR = [sys.executable, "-m", "kodarelay"]
RUN_TIMEOUT = 30
REPO = Path(__file__).resolve().parent.parent
FENCE_NOTE = "CMD ran fenced"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def kr(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KR, *args], env=env if env is not None else clean_env(), capture_output=True, text=True,
        timeout=RUN_TIMEOUT, cwd=cwd,
    )


def py(code: str) -> list[str]:
    """CMD that runs ``code`` with the interpreter of the tests."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def _fence_works() -> str | None:
    """Why a user namespace with a network namespace cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return "the fence is Linux-only"
    exe = shutil.which("unshare")
    if exe is None:
        return "unshare (util-linux) is not installed"
    out = subprocess.run([exe, "--user", "--map-root-user", "--net", "--", "true"], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return f"user namespaces are not permitted here: {out.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def fence() -> None:
    why = _fence_works()
    if why is not None:
        pytest.skip(why)


class UnixListener:
    """A host Unix socket (stream or datagram) that records whether anybody reached it."""

    def __init__(self, path: Path, kind: int = socket.SOCK_STREAM) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(self.path)
        self.kind = kind
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.reached = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    self.reached.set()
                    conn.sendall(b"host\n")
                    conn.close()
                else:
                    self.sock.recv(64)
                    self.reached.set()
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def _readline(pipe, timeout: float = DEADLINE) -> str:  # type: ignore[no-untyped-def]
    """One line from ``pipe`` within ``timeout`` seconds."""
    import select
    import time

    buf, deadline = b"", time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            raise AssertionError(f"no line within {timeout}s; have {buf!r}")
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"EOF; have {buf!r}")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for socket files (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kr-fence-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def echo_host() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


# ── issue 10 item 1: no capability, no way back into the host's network ─────


ESCAPE = """
    # every process CMD can see (in its PID namespace: its init and its own), and kodarelay's
    # pid given from outside (not visible in there)
    for target in /proc/[0-9]*/ns/net /proc/{kr}/ns/net; do
        {nsenter} --net=$target {curl} -sS --noproxy '*' --max-time 5 http://127.0.0.1:{port}/ >/dev/null 2>&1
        echo "$target=$?"
    done
"""


@pytest.mark.parametrize("flag", [[], ["--isolate"]], ids=["default", "isolate"])
def test_nsenter_cannot_walk_back_into_the_host_network(fence, echo_host, flag):
    script = ESCAPE.format(nsenter=require_tool("nsenter"), curl=require_tool("curl"), port=echo_host.port,
                           kr=os.getpid())
    out = kr("run", *flag, "--upstream", "direct", "--", "sh", "-c", textwrap.dedent(script))
    assert out.returncode == 0, out.stderr
    results = dict(line.rsplit("=", 1) for line in out.stdout.split())
    assert len(results) >= 2 and "0" not in results.values(), out.stdout
    assert echo_host.accepted == 0


def _status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_cmd_holds_no_capability_and_no_new_privs(fence):
    # grep is executed by sh after the fence: uid 0 of the user namespace regains nothing on exec.
    out = kr("run", "--upstream", "direct", "--", "sh", "-c", "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status")
    assert out.returncode == 0, out.stderr
    status = _status_fields(out.stdout)
    # Started by root, CMD keeps the file and identity capabilities package managers need
    # (apt drops to _apt) and nothing else; started by anyone else, nothing at all.
    from kodarelay._fence import KEPT_AS_ROOT

    allowed = KEPT_AS_ROOT if os.geteuid() == 0 else 0
    network = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 21) | (1 << 8) | (1 << 19)   # NET_*, SYS_ADMIN, SETPCAP, PTRACE
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        value = int(status[key], 16)
        assert value & ~allowed == 0 and value & network == 0, out.stdout
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_cmd_cannot_reach_into_the_helper(fence, tmp_path):
    """The helper holds the gate's notification fd and a route to the proxy: not CMD's to take."""
    script = """
        cat /proc/$PPID/environ >/dev/null 2>&1; echo "environ=$?"
        for fd in /proc/$PPID/fd/*; do cat "$fd" </dev/null >/dev/null 2>&1 && echo "opened $fd"; done
        true
    """
    out = kr("run", "--upstream", "direct", "--allow-unix", str(tmp_path / "x.sock"), "--", "sh", "-c", textwrap.dedent(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "environ=1", out.stdout


def test_cmd_may_bind_low_ports_on_its_own_loopback(fence):
    """No capability, yet a dev server on port 81 inside the fence works (the namespace's sysctl).
    (80 and 443 are capture's unless --no-capture: tests/test_capture.py.)"""
    code = """
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 81)); s.listen()
        with socket.create_connection(("127.0.0.1", 81), timeout=5):
            print("ok")
    """
    out = kr("run", "--upstream", "direct", "--", *py(code))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_non_root_user_is_fenced_too(fence, echo_host):
    """kodarelay started by an unprivileged user: the same fence, the same empty sets."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (setpriv)")
    setpriv = require_tool("setpriv")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that user 65534 can execute")
    probe = subprocess.run(
        [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", "unshare", "--user", "--map-root-user", "--net", "true"],
        capture_output=True, timeout=10,
    )
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are not available: {probe.stderr.decode().strip()}")
    script = ESCAPE.format(nsenter=require_tool("nsenter"), curl=require_tool("curl"), port=echo_host.port,
                           kr=os.getpid())
    script += "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status\n"
    # The user runs kodarelay from a copy it can read (the checkout or a wheel's venv may be
    # private to root); the pure-Python modules suffice, since the system Python is another build.
    import kodarelay

    readable = Path(tempfile.mkdtemp(prefix="kr-pkg-"))
    shutil.copytree(Path(kodarelay.__file__).parent, readable / "kodarelay",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for dirpath, _dirs, files in os.walk(readable):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    env = clean_env(PYTHONPATH=str(readable), KODARELAY_NO_EXTENSIONS="1", HOME="/tmp", TMPDIR="/tmp")
    env.pop("KODARELAY_REQUIRE_EXTENSION", None)
    out = subprocess.run(
        [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", python, "-m", "kodarelay",
         "run", "--isolate", "--upstream", "direct", "--", "sh", "-c", textwrap.dedent(script)],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd="/",
    )
    shutil.rmtree(readable, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    attempts = [line for line in lines if "/ns/net=" in line]
    assert len(attempts) >= 2 and all(line.rsplit("=", 1)[1] != "0" for line in attempts), out.stdout
    status = _status_fields("\n".join(line for line in lines if "/ns/net=" not in line))
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1"
    assert echo_host.accepted == 0


# ── issue 10 item 2: no Unix socket but the child's own way out ─────────────


def _unix_attempt(path: str) -> list[str]:
    return py(f"""
        import socket
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect({path!r})
            print("reached", s.recv(16))
        except OSError as e:
            print("refused", e.errno)
    """)


def test_host_unix_socket_is_unreachable(fence, sockdir):
    host = UnixListener(sockdir / "host.sock")
    try:
        out = kr("run", "--upstream", "direct", "--", *_unix_attempt(host.path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "refused", out.stdout
        assert not host.reached.is_set()
    finally:
        host.close()


def test_datagram_socketpair_cannot_be_pointed_at_a_host_socket(fence, sockdir):
    """A datagram socket can be re-pointed anywhere with sendto: such pairs are refused too."""
    host = UnixListener(sockdir / "log.sock", socket.SOCK_DGRAM)
    try:
        code = f"""
            import socket
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)   # pipes to oneself: fine
            a.sendall(b"x"); assert b.recv(1) == b"x"
            try:
                c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                c.sendto(b"escape", {host.path!r})
                print("sent")
            except OSError as e:
                print("refused", e.errno)
        """
        out = kr("run", "--upstream", "direct", "--", *py(code))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "refused", out.stdout
        assert not host.reached.is_set()
    finally:
        host.close()


def test_io_uring_is_not_available_in_the_fence(fence):
    """io_uring could create and connect sockets behind the filter's back."""
    code = """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(425, 1, None)  # io_uring_setup(1, NULL): EFAULT when it exists
        print(ctypes.get_errno() if rc < 0 else "created")
    """
    out = kr("run", "--upstream", "direct", "--", *py(code))
    assert out.returncode == 0, out.stderr
    import errno

    assert out.stdout.strip() == str(errno.ENOSYS)


def test_another_kodarelays_bridge_is_unreachable(fence, http_site):
    """A sibling sandbox's bridge (same user, looser policy) is a socket file: not from the fence."""
    sibling = subprocess.Popen(
        [*KR, "serve", "--allow", "localhost", "--upstream", "direct"], env=clean_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        status = _readline(sibling.stderr)
        assert "UDS bridge " in status, status
        bridge = status.split("UDS bridge ", 1)[1].split(";", 1)[0]
        assert os.path.exists(bridge)
        code = f"""
            import socket
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect({bridge!r})
                s.sendall(b"CONNECT localhost:{http_site.port} HTTP/1.1\\r\\nHost: localhost:{http_site.port}\\r\\n\\r\\n")
                print("reached", s.recv(64).split(b"\\r\\n")[0].decode())
            except OSError as e:
                print("refused", e.errno)
        """
        out = kr("run", "--upstream", "direct", "--", *py(code))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "refused", out.stdout
    finally:
        sibling.terminate()
        sibling.wait(RUN_TIMEOUT)


def test_allow_unix_reaches_that_path_and_only_it(fence, sockdir, http_site):
    allowed = UnixListener(sockdir / "allowed.sock")
    other = UnixListener(sockdir / "other.sock")
    curl = require_tool("curl")
    try:
        code = f"""
            import os, socket, subprocess
            def attempt(path):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.settimeout(5)
                    s.connect(path)
                    return s.recv(16).decode().strip()
                except OSError as e:
                    return f"errno{{e.errno}}"
            os.symlink({other.path!r}, "to-other.sock")
            os.symlink({allowed.path!r}, "to-allowed.sock")
            print(attempt({allowed.path!r}), attempt("allowed.sock"), attempt("to-allowed.sock"),
                  attempt({other.path!r}), attempt("to-other.sock"))
            # TCP is connected on CMD's behalf now: the proxy still works.
            print(subprocess.run([{curl!r}, "-sS", "-p", "--max-time", "10", "http://localhost:{http_site.port}/unix"],
                                 capture_output=True, text=True).stdout.strip())
        """
        out = kr("run", "--allow", "localhost", "--upstream", "direct", "--allow-unix", allowed.path, "--", *py(code), cwd=str(sockdir))
        assert out.returncode == 0, out.stderr
        import errno

        first, second = out.stdout.splitlines()
        assert first.split() == ["host", "host", "host", f"errno{errno.EACCES}", f"errno{errno.EACCES}"]
        assert second == "hello from /unix"
        assert not other.reached.is_set()
    finally:
        allowed.close()
        other.close()


def test_allow_unix_needs_the_fence():
    out = kr("run", "--no-isolate", "--allow-unix", "/tmp/x.sock", "--", "true")
    assert out.returncode == 2
    assert "--allow-unix" in out.stderr and "Traceback" not in out.stderr


# ── issue 13 item 1: fenced by default ──────────────────────────────────────


DIRECT = """
    {curl} -s --noproxy '*' --max-time 5 -o /dev/null http://127.0.0.1:{port}/
"""


@pytest.mark.parametrize("flag", [[], ["--isolate"]], ids=["default", "isolate"])
def test_direct_connection_has_no_route_and_the_summary_says_why(fence, echo_host, flag):
    script = DIRECT.format(curl=require_tool("curl"), port=echo_host.port)
    out = kr("run", *flag, "--upstream", "direct", "--", "sh", "-c", textwrap.dedent(script))
    assert out.returncode != 0
    assert echo_host.accepted == 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kodarelay: {FENCE_NOTE}") and "no route" in last, out.stderr


def test_no_isolate_opts_out(echo_host):
    script = DIRECT.format(curl=require_tool("curl"), port=echo_host.port)
    out = kr("run", "--no-isolate", "--upstream", "direct", "--", "sh", "-c", textwrap.dedent(script) + "exit 3")
    assert out.returncode == 3
    assert echo_host.accepted == 1  # nothing stops a client that ignores the proxy variables
    assert FENCE_NOTE not in out.stderr


def test_a_clean_fenced_run_says_nothing(fence):
    out = kr("run", "--upstream", "direct", "--", "true")
    assert out.returncode == 0
    assert out.stderr == ""


def _fake_unshare(tmp_path: Path) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


def test_without_a_fence_the_default_says_so_once_and_runs(tmp_path):
    marker = tmp_path / "ran"
    out = kr("run", "--", "touch", str(marker), env=clean_env(PATH=_fake_unshare(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert marker.exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kodarelay: no network fence here"), out.stderr
    assert "unfenced" in lines[0] and "Traceback" not in out.stderr
    quiet = kr("run", "--quiet", "--", "true", env=clean_env(PATH=_fake_unshare(tmp_path)))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_isolate_without_a_fence_refuses(tmp_path):
    marker = tmp_path / "ran"
    out = kr("run", "--isolate", "--", "touch", str(marker), env=clean_env(PATH=_fake_unshare(tmp_path)))
    assert out.returncode == 125
    assert not marker.exists()
    assert "CMD was not run" in out.stderr


def test_not_executable_in_the_fence_is_one_line_126(fence, tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    out = kr("run", "--", str(script))
    assert out.returncode == 126
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(script) in lines[0], out.stderr


def test_unknown_architecture_is_refused(monkeypatch):
    import platform

    from kodarelay import _fence

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(_fence.FenceError, match="riscv64"):
        _fence.current_arch()


def test_filter_checks_the_architecture_first():
    """The first instructions load seccomp_data.arch and kill any other ABI."""
    import struct

    from kodarelay import _fence

    arch = _fence.current_arch() if _fence_works() is None else _fence._ARCHES["x86_64"]
    for mediate in (False, True):
        prog = _fence.filter_program(arch, mediate_unix=mediate)
        first = [struct.unpack_from("=HBBI", prog, i * 8) for i in range(2)]
        assert first[0] == (0x20, 0, 0, 4)  # ld [arch]
        op, jt, jf, k = first[1]
        assert (op, jt, k) == (0x15, 0, arch.audit)
        kill = struct.unpack_from("=HBBI", prog, (2 + jf) * 8)
        assert kill == (0x06, 0, 0, 0x80000000)


@pytest.fixture
def http_site():  # type: ignore[no-untyped-def]
    from peers import WebServer

    site = WebServer()
    yield site
    site.close()

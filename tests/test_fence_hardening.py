"""The fence after the attack pass of issue 17: each test reproduces an attack from inside
the fence (CMD hostile) and asserts it fails, or that what the fence guards is unchanged."""

from __future__ import annotations

import os
import subprocess

import pytest

from peers import DEADLINE, require_tool
from test_fence import _fence_works, kr, py


@pytest.fixture(scope="module")
def fence() -> None:
    why = _fence_works()
    if why is not None:
        pytest.skip(why)


# ── item 14: no nested user namespace ────────────────────────────────────────

NESTED = """
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    for flags in (CLONE_NEWUSER, CLONE_NEWUSER | CLONE_NEWNET):
        assert libc.unshare(flags) == -1 and ctypes.get_errno() == errno.EPERM, ("unshare", flags, ctypes.get_errno())
    # clone(2) with CLONE_NEWUSER (SIGCHLD as the exit signal); a child would exit at once
    r = libc.syscall(56 if os.uname().machine == "x86_64" else 220, CLONE_NEWUSER | 17, 0, 0, 0, 0)
    assert r == -1 and ctypes.get_errno() == errno.EPERM, ("clone", r, ctypes.get_errno())
    r = libc.syscall(435, 0, 0)   # clone3: ENOSYS, so libc falls back to clone
    assert r == -1 and ctypes.get_errno() == errno.ENOSYS, ("clone3", r, ctypes.get_errno())
    fd = os.open("/proc/self/ns/user", os.O_RDONLY)
    assert libc.setns(fd, 0) == -1 and ctypes.get_errno() == errno.EPERM, ("setns", ctypes.get_errno())
    print("refused")
"""


def test_cmd_cannot_make_a_user_namespace(fence):
    out = kr("run", "--upstream", "direct", "--", *py(NESTED))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


THREADS_AND_FORKS = """
    import subprocess, sys, threading
    seen = []
    threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    out = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True)
    import multiprocessing as mp
    with mp.get_context("fork").Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    print(len(seen), out.stdout.strip(), squares)
"""


def test_threads_forks_and_spawns_still_work(fence):
    out = kr("run", "--upstream", "direct", "--", *py(THREADS_AND_FORKS))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8 child [1, 2, 3]"


# ── item 4: CMD cannot type into the terminal it shares with --ask ───────────

TIOCSTI = """
    import errno, fcntl, termios
    for request in (termios.TIOCSTI, termios.TIOCSTI | (1 << 32), 0x541C):
        try:
            fcntl.ioctl(0, request, b"a")
        except OSError as e:
            assert e.errno == errno.EPERM, (hex(request), e)
        else:
            raise SystemExit(f"ioctl {request:#x} went through")
    print("refused")
"""


def test_cmd_cannot_push_input_into_the_terminal(fence):
    master, slave = os.openpty()
    try:
        out = subprocess.run([*kr_argv(), "run", "--upstream", "direct", "--", *py(TIOCSTI)],
                             stdin=slave, capture_output=True, text=True, timeout=DEADLINE * 3)
    finally:
        os.close(slave)
        os.close(master)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


def kr_argv() -> list[str]:
    from test_fence import KR

    return list(KR)


# ── items 2, 3, 11: what the proxy reads or writes is out of CMD's reach ─────

def test_cmd_cannot_edit_the_policy_file_nor_swap_it(fence, tmp_path):
    """CMD appended ``allow evil.test`` to a ``--policy`` file its user could write and the
    reload admitted it. Now the file is read-only for CMD, and renaming its directory to put
    another policy in its place is not read by the proxy either."""
    curl = require_tool("curl")
    home = tmp_path / "policies"
    home.mkdir()
    policy = home / "policy"
    policy.write_text("allow localhost\n")
    script = f"""
        echo 'allow evil.test' >> {policy}; echo "append=$?"
        mv {policy} {policy}.old; echo "rename=$?"
        mv {home} {home}.moved && mkdir {home} && echo 'allow evil.test' > {policy}; echo "swap=$?"
        i=0; while [ $i -lt 30 ]; do
            {curl} -s -o /dev/null -p --max-time 5 https://evil.test/ && break
            i=$((i+1)); sleep 0.1
        done
        exit 0
    """
    out = kr("run", "--policy", str(policy), "--upstream", "direct", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert "append=0" not in out.stdout and "rename=0" not in out.stdout, out.stdout
    assert "evil.test:443  not_allowed" in out.stderr, out.stderr
    assert "policy reloaded" not in out.stderr
    assert (tmp_path / "policies.moved" / "policy").read_text() == "allow localhost\n"


def test_cmd_cannot_forge_events(fence, tmp_path):
    events = tmp_path / "events.jsonl"
    forged = '{"kind": "allow", "host": "forged.test"}'
    out = kr("run", "--events", str(events), "--upstream", "direct", "--", "sh", "-c",
             f"echo '{forged}' >> {events}; echo \"append=$?\"")
    assert out.returncode == 0, out.stderr
    assert "append=0" not in out.stdout
    assert "forged.test" not in events.read_text()


def test_cmd_has_its_own_hosts_and_cannot_touch_the_resolvers(fence):
    """As root of its user namespace CMD owned /etc/hosts and pointed an allowed name
    anywhere; now it writes a copy of its own, and the resolver's files are read-only."""
    with open("/etc/hosts") as f:
        before = f.read()
    script = """
        echo '203.0.113.9 pypi.org' >> /etc/hosts; echo "hosts=$?"; grep -c pypi.org /etc/hosts
        for f in /etc/resolv.conf /etc/nsswitch.conf; do
            [ -e $f ] || continue
            echo x >> $f 2>/dev/null; echo "$f=$?"
        done
    """
    out = kr("run", "--upstream", "direct", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert "hosts=0" in out.stdout                 # its own copy takes the write...
    with open("/etc/hosts") as f:
        assert f.read() == before                  # ...and the proxy's never sees it
    assert "resolv.conf=0" not in out.stdout and "nsswitch.conf=0" not in out.stdout, out.stdout


def test_kodarelays_installation_is_read_only_for_cmd(fence):
    import kodarelay

    pkg = os.path.dirname(kodarelay.__file__)
    out = kr("run", "--upstream", "direct", "--", "sh", "-c",
             f"touch {pkg}/planted.py; echo \"touch=$?\"")
    assert "touch=0" not in out.stdout, out.stdout
    assert not os.path.exists(os.path.join(pkg, "planted.py"))


# ── item 9: kodarelay's processes are out of sight and out of reach ─────────

def test_cmd_sees_neither_kodarelay_nor_its_sockets(fence):
    me = os.getpid()
    script = f"""
        ls -d /proc/[0-9]* | wc -l
        [ -e /proc/{me} ] && echo "sees-test-process"
        kill -0 {me} 2>/dev/null && echo "can-signal"
        cat /proc/net/tcp | wc -l
    """
    out = kr("run", "--upstream", "direct", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert int(lines[0]) <= 4, out.stdout          # its init, sh, and the commands of the script
    assert "sees-test-process" not in out.stdout and "can-signal" not in out.stdout


def test_signals_still_reach_cmd_through_the_init(fence, tmp_path):
    """kodarelay forwards SIGTERM to CMD (now behind an init of its own): CMD's trap runs."""
    import signal
    import time

    from test_fence import KR, clean_env

    ready = tmp_path / "ready"
    proc = subprocess.Popen([*KR, "run", "--upstream", "direct", "--", "sh", "-c",
                             f"trap 'echo got-term; exit 7' TERM; touch {ready}; while :; do sleep 0.05; done"],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 7, err
    assert "got-term" in out


# ── item 6: inherited sockets do not reach CMD ───────────────────────────────

INHERITED = """
    import os, socket, stat
    kinds = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        kinds[fd] = "socket" if stat.S_ISSOCK(mode) else "pipe" if stat.S_ISFIFO(mode) else "other"
    print(kinds.get(int(os.environ["SOCK_FD"]), "closed"), kinds.get(int(os.environ["PIPE_FD"]), "closed"))
"""


def test_inherited_sockets_are_closed_and_pipes_kept(fence):
    import socket as _socket

    from test_fence import KR, clean_env

    a, b = _socket.socketpair()                           # a parent's inheritable Unix socket
    tcp = _socket.create_server(("127.0.0.1", 0))         # and a host-namespace TCP socket
    r, w = os.pipe()                                      # a make jobserver's pipe stays
    try:
        for fd in (a.fileno(), tcp.fileno(), r, w):
            os.set_inheritable(fd, True)
        out = subprocess.run([*KR, "run", "--upstream", "direct", "--", *py(INHERITED)],
                             env=clean_env(SOCK_FD=str(a.fileno()), PIPE_FD=str(r)), capture_output=True,
                             text=True, timeout=DEADLINE * 3, pass_fds=(a.fileno(), tcp.fileno(), r, w))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["closed", "pipe"], out.stdout
    finally:
        for s in (a, b, tcp):
            s.close()
        os.close(r)
        os.close(w)


# ── items 5, 15: the Unix-socket gate ────────────────────────────────────────

RACE = """
    import os, socket, threading, time
    allowed, other = {allowed!r}, {other!r}
    stop = threading.Event()

    def flip():   # the allowed path, now the socket itself, now a symlink to another socket
        while not stop.is_set():
            os.rename(allowed, allowed + ".real")
            os.symlink(other, allowed)
            os.unlink(allowed)
            os.rename(allowed + ".real", allowed)

    t = threading.Thread(target=flip)
    t.start()
    outcomes = {{}}
    tries, until = 0, time.monotonic() + 8
    # 400 tries, and on until the allowed socket was reached once (the flipper may hold the
    # symlink state for every one of the first 400 on a loaded machine)
    while tries < 400 or ("host" not in outcomes and time.monotonic() < until):
        tries += 1
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(allowed)
            what = s.recv(16).decode().strip() or "eof"
        except OSError as e:
            what = f"errno{{e.errno}}"
        s.close()
        outcomes[what] = outcomes.get(what, 0) + 1
    stop.set()
    t.join()
    print(sorted(outcomes))
"""


def test_allow_unix_swapped_for_a_symlink_never_reaches_another_socket(fence, tmp_path):
    """CMD swapped the allowed path between the socket and a symlink to another socket; the
    gate checked one and connected to the other (won in 1-7 tries)."""
    import tempfile
    from pathlib import Path

    from test_fence import UnixListener

    sockdir = Path(tempfile.mkdtemp(prefix="kr-race-"))
    allowed = UnixListener(sockdir / "allowed.sock")
    other = UnixListener(sockdir / "other.sock")
    try:
        code = RACE.format(allowed=allowed.path, other=other.path)
        out = kr("run", "--upstream", "direct", "--allow-unix", allowed.path, "--", *py(code))
        assert out.returncode == 0, out.stderr
        assert "host" in out.stdout                 # the allowed socket was reached...
        assert not other.reached.is_set()           # ...and the other never
    finally:
        allowed.close()
        other.close()


STUCK = """
    import socket, time
    t0 = time.monotonic()
    results = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect({path!r})
            results.append("connected")
        except OSError as e:
            results.append(f"errno{{e.errno}}")
    print(results[-1], round(time.monotonic() - t0))
"""


def test_a_full_backlog_costs_cmd_a_timeout_not_a_thread_forever(fence):
    """A blocking connect to a listener whose backlog is full hung a gate thread forever."""
    import errno
    import socket as _socket
    import tempfile
    from pathlib import Path

    sockdir = Path(tempfile.mkdtemp(prefix="kr-full-"))
    path = str(sockdir / "full.sock")
    listener = _socket.socket(_socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)                              # never accepts: the backlog fills at once
    try:
        out = kr("run", "--upstream", "direct", "--allow-unix", path, "--",
                 *py(STUCK.format(path=path)), env=_env_with(KODARELAY_UNIX_CONNECT_DEADLINE="1"))
        assert out.returncode == 0, out.stderr
        last, _elapsed = out.stdout.split()
        assert last == f"errno{errno.ETIMEDOUT}", out.stdout
    finally:
        listener.close()


def _env_with(**extra: str) -> dict[str, str]:
    from test_fence import clean_env

    return clean_env(**extra)


# ── issue 22: apt fenced as root ─────────────────────────────────────────────

def _local_apt_repo(root) -> str:  # type: ignore[no-untyped-def]
    """A flat apt repository (an empty Packages and an unsigned Release) in ``root``."""
    import hashlib

    packages = b""
    (root / "Packages").write_bytes(packages)
    (root / "Release").write_text(
        "Origin: kodarelay-test\nLabel: kodarelay-test\nSuite: stable\nCodename: test\n"
        "Architectures: amd64 arm64 all\nComponents: main\nDate: Sat, 05 Dec 2026 00:00:00 UTC\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n")
    return str(root)


def test_apt_get_update_works_fenced_as_root_with_no_flags(fence, tmp_path):
    """apt could not drop to its _apt user inside the fence (setgroups / seteuid failed,
    'Method http has died'): root's fence maps the system's ids and keeps the file and
    identity capabilities apt needs, none that reaches the network."""
    import functools
    import http.server
    import threading

    if os.geteuid() != 0:
        pytest.skip("apt's privilege drop is root's")
    apt = require_tool("apt-get")
    repo = tmp_path / "repo"
    repo.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=_local_apt_repo(repo))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state = tmp_path / "state"
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "cache").mkdir()
    sources = tmp_path / "sources.list"
    sources.write_text(f"deb [trusted=yes] http://localhost:{httpd.server_address[1]}/ ./\n")
    try:
        out = kr("run", "--allow", "localhost", "--upstream", "direct", "--", apt, "update",
                 "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/nonexistent",
                 "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "setgroups" not in out.stdout + out.stderr and "has died" not in out.stdout + out.stderr
    assert any(name.endswith("_Release") for name in os.listdir(state / "lists")), os.listdir(state / "lists")

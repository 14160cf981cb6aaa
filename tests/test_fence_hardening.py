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

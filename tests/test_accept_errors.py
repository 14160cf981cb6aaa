"""fix: the crate's accept loop returned on the first accept error, so one EMFILE burst
killed the proxy for good. kodarelay backs off and keeps serving."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from peers import EchoServer, connect, http_connect, recv_exact, socks5_connect, status_of

CHILD = textwrap.dedent(
    """
    import resource, sys
    from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig
    cls = BuiltInSocks5Proxy if sys.argv[1] == "socks5" else BuiltInProxy
    handle = cls(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start()
    # Leave room for what is already open, then very little more.
    import os
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 24, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(handle.port, flush=True)
    sys.stdin.readline()
    handle.shutdown()
    """
)


def _open(port: int, protocol: str, echo_port: int):  # type: ignore[no-untyped-def]
    """A tunnel through the proxy, or None when it could not be made (the proxy is out of fds)."""
    try:
        if protocol == "http":
            s, head = http_connect(port, f"localhost:{echo_port}")
            ok = status_of(head) == 200
        else:
            s, rep = socks5_connect(port, b"localhost", echo_port)
            ok = rep[:2] == b"\x05\x00"
    except (OSError, AssertionError):
        return None
    if not ok:
        s.close()
        return None
    return s


@pytest.mark.parametrize("protocol", ["http", "socks5"])
def test_fd_exhaustion_does_not_stop_the_proxy(protocol):
    """Tunnels hold every fd: new clients wait or are refused (accept backs off, logging at
    most once a second, or an old handshake is shed), and service resumes once fds come back."""
    echo = EchoServer()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, protocol], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        port = int(child.stdout.readline())
        lines: list[str] = []
        exhausted = threading.Event()

        def read_stderr() -> None:
            for raw in child.stderr:
                lines.append(raw.decode())
                if "backing off" in lines[-1]:
                    exhausted.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        started = time.monotonic()
        hoard = []
        for _ in range(40):                 # fill the proxy's fds with live tunnels
            s = _open(port, protocol, echo.port) if not exhausted.is_set() else None
            if s is None:
                break
            hoard.append(s)
        assert len(hoard) < 40, "the proxy never ran out of fds"
        waiting = [connect(port) for _ in range(8)]     # accepted and shed, or not accepted yet
        for s in hoard + waiting:
            s.close()
        deadline = time.monotonic() + 20
        s = None
        while s is None and time.monotonic() < deadline:
            s = _open(port, protocol, echo.port)
        assert s is not None, "".join(lines)
        s.sendall(b"alive")
        assert recv_exact(s, 5) == b"alive"
        s.close()
        elapsed = time.monotonic() - started
        child.stdin.write(b"quit\n")
        child.stdin.flush()
        assert child.wait(20) == 0
        reader.join(10)
        err = "".join(lines)
        warnings = err.count("backing off")
        assert warnings <= elapsed + 2, err  # at most about once a second
        assert "Traceback" not in err, err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        echo.close()

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


@pytest.mark.parametrize("protocol", ["http", "socks5"])
def test_fd_exhaustion_does_not_stop_the_proxy(protocol):
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
        hoard = [connect(port) for _ in range(80)]  # idle handshakes pin the proxy's fds
        # Wait until the proxy says it ran out of fds (a client that left before being
        # accepted would pin nothing, so the hoard stays open until then).
        assert exhausted.wait(20), "".join(lines)
        started = time.monotonic()
        for s in hoard:
            s.close()
        if protocol == "http":
            s, head = http_connect(port, f"localhost:{echo.port}")
            assert status_of(head) == 200
        else:
            s, rep = socks5_connect(port, b"localhost", echo.port)
            assert rep[:2] == b"\x05\x00"
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
        assert warnings >= 1, err  # the exhaustion really happened
        assert warnings <= elapsed + 2, err  # at most about once a second
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        echo.close()

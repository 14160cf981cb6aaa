"""UDS bridge against real sockets: path rules, forwarding, close(), accept-error resilience."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from kodarelay import cleanup_uds_path, proxy_uds_path, rewrite_proxy_url_port, spawn_uds_bridge
from kodarelay.bridge import MAX_UDS_PATH_BYTES


@pytest.fixture
def sock_path():  # type: ignore[no-untyped-def]
    """A short socket path (pytest's tmp_path can exceed the AF_UNIX limit)."""
    d = tempfile.mkdtemp(prefix="krb-")
    yield os.path.join(d, "b.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def echo_port():  # type: ignore[no-untyped-def]
    """A TCP server that reads to EOF, then answers ``<data>|eof`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data + b"|eof")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _roundtrip(path: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # half-close: the answer must still come back
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


# --- paths -----------------------------------------------------------------------------


def test_proxy_uds_path_properties() -> None:
    p = proxy_uds_path(12345, 54321)
    assert os.path.dirname(p) == tempfile.gettempdir()
    assert "12345" in p and "54321" in p
    assert p.endswith(".sock")
    assert len(os.fsencode(p)) <= MAX_UDS_PATH_BYTES
    paths = {proxy_uds_path(pid, port) for pid in (1, 2, 12, 121) for port in (1, 21, 100, 101)}
    assert len(paths) == 16


def test_proxy_uds_path_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/" + "d" * 120)
    with pytest.raises(ValueError, match="AF_UNIX"):
        proxy_uds_path(1, 2)


@pytest.mark.parametrize("pid,port", [(-1, 80), (1, 70000), (1, -1), ("1", 80), (1, True)])
def test_proxy_uds_path_bad_numbers(pid: object, port: object) -> None:
    with pytest.raises(ValueError):
        proxy_uds_path(pid, port)  # type: ignore[arg-type]


def test_cleanup_uds_path(sock_path: str) -> None:
    cleanup_uds_path(sock_path)  # absent: fine
    Path(sock_path).write_text("x")
    cleanup_uds_path(Path(sock_path))
    assert not os.path.exists(sock_path)


# --- forwarding ----------------------------------------------------------------------


async def test_forwards_both_ways_with_half_close(sock_path: str, echo_port: int) -> None:
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    try:
        assert bridge.path == sock_path
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert await _roundtrip(sock_path, b"hello") == b"hello|eof"
        big = os.urandom(1 << 20)
        assert await _roundtrip(sock_path, big) == big + b"|eof"
        results = await asyncio.gather(*(_roundtrip(sock_path, b"c%d" % i) for i in range(20)))
        assert results == [b"c%d|eof" % i for i in range(20)]
    finally:
        bridge.close()
    await bridge.wait_closed()
    assert bridge.active_connections == 0


async def test_socket_mode_is_0600(sock_path: str, echo_port: int) -> None:
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    try:
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        # The private staging directory is gone.
        assert os.listdir(os.path.dirname(sock_path)) == ["b.sock"]
    finally:
        bridge.close()


async def test_stale_socket_is_replaced(sock_path: str, echo_port: int) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays behind, nothing listens
    old_ino = os.lstat(sock_path).st_ino
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    try:
        assert os.lstat(sock_path).st_ino != old_ino
        assert await _roundtrip(sock_path, b"x") == b"x|eof"
    finally:
        bridge.close()


async def test_non_socket_at_path_is_refused(sock_path: str, echo_port: int) -> None:
    Path(sock_path).write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await spawn_uds_bridge(sock_path, echo_port)
    assert Path(sock_path).read_text() == "precious"
    assert os.listdir(os.path.dirname(sock_path)) == ["b.sock"]


async def test_bad_arguments(sock_path: str) -> None:
    with pytest.raises(ValueError, match="tcp_port"):
        await spawn_uds_bridge(sock_path, 0)
    with pytest.raises(ValueError, match="AF_UNIX"):
        await spawn_uds_bridge("/tmp/" + "p" * 120 + ".sock", 80)


async def test_unreachable_tcp_side_closes_the_client(sock_path: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    bridge = await spawn_uds_bridge(sock_path, dead_port)
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # and the bridge keeps serving
        reader, writer = await asyncio.open_unix_connection(sock_path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        bridge.close()


# --- close -------------------------------------------------------------------------------


async def _open_live_connection(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection the bridge is forwarding (the echo server waits for EOF, so it stays open)."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"pending")
    await writer.drain()
    return reader, writer


async def _wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_close_unlinks_and_ends_live_connections(sock_path: str, echo_port: int) -> None:
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    reader, writer = await _open_live_connection(sock_path)
    await _wait_for(lambda: bridge.active_connections == 1)
    bridge.close()
    assert bridge.closed
    assert not os.path.exists(sock_path)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the peer sees the end
    writer.close()
    await asyncio.wait_for(bridge.wait_closed(), 5)
    assert bridge.active_connections == 0
    with pytest.raises(FileNotFoundError):
        await asyncio.open_unix_connection(sock_path)
    bridge.close()  # idempotent


async def test_close_from_another_thread(sock_path: str, echo_port: int) -> None:
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    reader, writer = await _open_live_connection(sock_path)
    await _wait_for(lambda: bridge.active_connections == 1)
    t = threading.Thread(target=bridge.close)
    t.start()
    await asyncio.to_thread(t.join, 5)
    assert not os.path.exists(sock_path)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await asyncio.wait_for(bridge.wait_closed(), 5)


async def test_close_leaves_a_replaced_path_alone(sock_path: str, echo_port: int) -> None:
    bridge = await spawn_uds_bridge(sock_path, echo_port)
    os.unlink(sock_path)
    Path(sock_path).write_text("someone else's")
    bridge.close()
    assert Path(sock_path).read_text() == "someone else's"


def test_close_after_the_loop_closed(sock_path: str) -> None:
    async def start():  # type: ignore[no-untyped-def]
        return await spawn_uds_bridge(sock_path, 9)

    bridge = asyncio.run(start())
    assert os.path.exists(sock_path)
    bridge.close()
    assert not os.path.exists(sock_path)
    bridge.close()


# --- accept errors -----------------------------------------------------------------------

EMFILE_SCRIPT = textwrap.dedent(
    r"""
    import asyncio, logging, os, resource, socket, sys
    from kodarelay.bridge import spawn_uds_bridge

    class Catch(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []
            self.seen = None
        def emit(self, record):
            self.records.append(record.getMessage())
            if self.seen is not None and "accept failed" in record.getMessage():
                self.seen.set()

    async def main(path):
        catch = Catch()
        catch.seen = asyncio.Event()
        logging.getLogger("kodarelay.bridge").addHandler(catch)
        logging.getLogger("kodarelay.bridge").setLevel(logging.WARNING)

        async def echo(r, w):
            w.write(await r.read(100))
            await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        bridge = await spawn_uds_bridge(path, server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hogs = []
        try:
            while True:
                hogs.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        client.setblocking(False)
        client.connect(path)  # queued in the backlog; the bridge's accept now hits EMFILE
        await asyncio.wait_for(catch.seen.wait(), 10)
        await asyncio.sleep(0.4)  # hold the fd table full across several accept retries
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await loop.sock_sendall(client, b"still-serving")
        data = await asyncio.wait_for(loop.sock_recv(client, 100), 10)
        client.close()
        bridge.close()
        warnings = [m for m in catch.records if "accept failed" in m]
        print(repr(data), len(warnings))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_accept_survives_emfile(sock_path: str, tmp_path: Path) -> None:
    script = tmp_path / "emfile.py"
    script.write_text(EMFILE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), sock_path], capture_output=True, text=True, timeout=40
    )
    assert proc.returncode == 0, proc.stderr
    data, warnings = proc.stdout.split()
    assert data == "b'still-serving'"
    assert warnings == "1"  # repeated failures within a second are logged once


# --- rewrite_proxy_url_port ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        ("http://127.0.0.1:1234", "http://127.0.0.1:9999"),
        ("http://user:pw@host:1/path", "http://user:pw@host:9999/path"),
        ("http://user:p%40ss@host:1/", "http://user:p%40ss@host:9999/"),
        ("http://[::1]:8080/", "http://[::1]:9999/"),
        ("http://[::1]", "http://[::1]:9999"),
        ("http://u@[fe80::1%25eth0]:3128", "http://u@[fe80::1%25eth0]:9999"),
        ("http://localhost", "http://localhost:9999"),
        ("http://localhost:", "http://localhost:9999"),
        ("http://127.0.0.1:1234/path?q=1#f", "http://127.0.0.1:9999/path?q=1#f"),
        ("http://Proxy.Example:1?x", "http://Proxy.Example:9999?x"),
        ("socks5h://127.0.0.1:1080", "socks5h://127.0.0.1:9999"),
    ],
)
def test_rewrite_proxy_url_port(url: str, expected: str) -> None:
    assert rewrite_proxy_url_port(url, 9999) == expected


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "",
        "http://",
        "http://:8080",
        "http://user@:1",
        "http://host:abc",
        "http://host:0",
        "http://host:99999",
        "http://host:+80",
        "http://host:1:2",
        "http://[::1",
        "http://[]:80",
        "http://[::1]x:80",
        "http://::1:80",
        "http:// host:1",
        "http://host:1\n",
        "127.0.0.1:8080",
        "://host:1",
        "1http://host:1",
    ],
)
def test_rewrite_proxy_url_port_garbage(url: str) -> None:
    assert rewrite_proxy_url_port(url, 9999) is None


def test_rewrite_proxy_url_port_bad_new_port() -> None:
    with pytest.raises(ValueError, match="70000"):
        rewrite_proxy_url_port("http://h:1", 70000)


def test_sweep_removes_only_dead_processes_sockets(tmp_path):
    from kodarelay.bridge import sweep_stale_uds_paths

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        def sock_file(name: str) -> str:
            path = str(tmp_path / name)
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.close()
            return path

        stale = sock_file(f"kodarelay-{dead_pid}-8080.sock")
        alive = sock_file(f"kodarelay-{live.pid}-8080.sock")
        mine = sock_file(f"kodarelay-{os.getpid()}-8080.sock")
        other = sock_file(f"other-{dead_pid}-8080.sock")
        not_a_socket = tmp_path / f"kodarelay-{dead_pid}-9090.sock"
        not_a_socket.write_text("keep me")
        assert sweep_stale_uds_paths(str(tmp_path)) == [stale]
        assert not os.path.exists(stale)
        assert all(os.path.exists(p) for p in (alive, mine, other, not_a_socket))
    finally:
        live.stdin.close()
        live.wait(10)

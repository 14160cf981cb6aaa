"""ExternalProxy against real child processes: readiness, failures, and clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from kodarelay import ExternalProxy, ProxyHandle, ProxySpawnError, pick_ephemeral_port

LISTENER = r"""
import json, os, signal, socket, sys
if os.environ.get("KR_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(os.environ["KODA_PROXY_PORT"])
info = {
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "sid": os.getsid(0),
    "port": port,
    "extra": os.environ.get("KR_EXTRA"),
    "stdin_devnull": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
    "stdout_devnull": os.path.samestat(os.fstat(1), os.stat(os.devnull)),
}
flood = int(os.environ.get("KR_STDERR_FLOOD", "0"))
if flood:
    sys.stderr.write("x" * flood)
    sys.stderr.flush()
path = os.environ["KR_INFO"]
with open(path + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(path + ".tmp", path)
s = socket.socket()
s.bind(("127.0.0.1", port))
s.listen(16)
while True:
    c, _ = s.accept()
    c.close()
"""


@pytest.fixture
def listener(tmp_path: Path) -> Path:
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    return script


def _dead(pid: int) -> bool:
    """Gone from /proc, or a zombie (dead, waiting for a reaper that is not us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _wait_until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return cond()


def _assert_reaped(pid: int) -> None:
    """Our direct child: reaped by us (ECHILD), and its /proc entry gone."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert _wait_until(lambda: not Path(f"/proc/{pid}").exists()), f"pid {pid} still in /proc"


def _read_info(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((tmp_path / "info.json").read_text())


def _proxy(listener: Path, tmp_path: Path, **kw) -> ExternalProxy:  # type: ignore[no-untyped-def]
    env = {"KR_INFO": str(tmp_path / "info.json"), **kw.pop("env", {})}
    return ExternalProxy([sys.executable, listener], env=env, **kw)


async def test_spawn_ephemeral_port_env_and_stdio(listener: Path, tmp_path: Path) -> None:
    handle = await _proxy(listener, tmp_path, env={"KR_EXTRA": "hello"}).spawn()
    try:
        assert isinstance(handle, ProxyHandle)
        assert handle.kind == "external"
        assert handle.ca_bundle is None and handle.uds_path is None
        assert handle.alive
        info = _read_info(tmp_path)
        assert info["port"] == handle.port
        assert info["extra"] == "hello"
        assert info["stdin_devnull"] is True
        assert info["stdout_devnull"] is True
        # The child leads its own session and process group.
        assert info["pgid"] == info["pid"] == info["sid"]
        with socket.create_connection(("127.0.0.1", handle.port), timeout=2):
            pass
    finally:
        handle.shutdown()
    assert not handle.alive
    _assert_reaped(info["pid"])


async def test_spawn_explicit_port(listener: Path, tmp_path: Path) -> None:
    port = pick_ephemeral_port()
    async with await _proxy(listener, tmp_path, port=port).spawn() as handle:
        assert handle.port == port
        assert _read_info(tmp_path)["port"] == port
    assert not handle.alive


async def test_pathlike_argv(listener: Path, tmp_path: Path) -> None:
    proxy = ExternalProxy([Path(sys.executable), listener], env={"KR_INFO": str(tmp_path / "info.json")})
    assert proxy.command == (sys.executable, str(listener))
    with await proxy.spawn() as handle:
        assert handle.alive
    assert not handle.alive


async def test_early_exit_fails_fast_with_status_and_stderr() -> None:
    code = "import sys; sys.stderr.write('boom: cannot listen\\n'); sys.exit(3)"
    start = time.monotonic()
    with pytest.raises(ProxySpawnError) as exc:
        await ExternalProxy([sys.executable, "-c", code], startup_timeout=20.0).spawn()
    assert time.monotonic() - start < 5.0  # nowhere near the 20 s timeout
    msg = str(exc.value)
    assert "exited with status 3" in msg
    assert "boom: cannot listen" in msg


async def test_early_death_by_signal_is_reported() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(ProxySpawnError, match=r"killed by signal 9 \(SIGKILL\)"):
        await ExternalProxy([sys.executable, "-c", code], startup_timeout=20.0).spawn()


async def test_stderr_flood_does_not_block_and_tail_is_bounded(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for i in range(20000): sys.stderr.write(f'line {i} ' + 'y' * 50 + '\\n')\n"
        "sys.stderr.write('LAST-WORDS\\n'); sys.exit(5)\n"
    )
    with pytest.raises(ProxySpawnError) as exc:
        await ExternalProxy([sys.executable, "-c", code], startup_timeout=20.0).spawn()
    msg = str(exc.value)
    assert "status 5" in msg and "LAST-WORDS" in msg
    assert "line 0 " not in msg
    assert len(msg) < 4096 + 512


async def test_big_stderr_before_binding_still_starts(listener: Path, tmp_path: Path) -> None:
    # 1 MiB is far more than a pipe buffer: a child whose stderr is not drained would hang.
    proxy = _proxy(listener, tmp_path, env={"KR_STDERR_FLOOD": str(1 << 20)}, startup_timeout=20.0)
    with await proxy.spawn() as handle:
        assert handle.alive


async def test_never_binds_times_out_and_child_is_reaped(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(1000)"
    port = pick_ephemeral_port()
    start = time.monotonic()
    with pytest.raises(ProxySpawnError) as exc:
        await ExternalProxy([sys.executable, "-c", code], port=port, startup_timeout=1.5).spawn()
    elapsed = time.monotonic() - start
    assert 1.4 <= elapsed < 5.0
    msg = str(exc.value)
    assert "did not bind" in msg and str(port) in msg and "1.5" in msg
    _assert_reaped(int(pidfile.read_text()))


async def test_sigterm_ignored_then_killed_after_grace(listener: Path, tmp_path: Path) -> None:
    handle = await _proxy(listener, tmp_path, env={"KR_IGNORE_TERM": "1"}, stop_grace=0.5).spawn()
    pid = _read_info(tmp_path)["pid"]
    start = time.monotonic()
    handle.shutdown()
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 5.0
    _assert_reaped(pid)


async def test_well_behaved_child_does_not_wait_out_grace(listener: Path, tmp_path: Path) -> None:
    handle = await _proxy(listener, tmp_path, stop_grace=30.0).spawn()
    pid = _read_info(tmp_path)["pid"]
    start = time.monotonic()
    handle.shutdown()
    assert time.monotonic() - start < 5.0
    _assert_reaped(pid)


async def test_grandchildren_die_with_the_group(listener: Path, tmp_path: Path) -> None:
    gc_file = tmp_path / "grandchild"
    # The grandchild ignores SIGTERM (an ignored signal stays ignored across exec), so only
    # the SIGKILL to the whole group can end it once the leader has exited on SIGTERM.
    line = f'trap "" TERM; sleep 1000 & echo $! > "{gc_file}"; trap - TERM; exec "{sys.executable}" "{listener}"'
    proxy = ExternalProxy(["sh", "-c", line], env={"KR_INFO": str(tmp_path / "info.json")}, stop_grace=5.0)
    handle = await proxy.spawn()
    leader = _read_info(tmp_path)["pid"]
    grandchild = int(gc_file.read_text())
    assert os.getpgid(grandchild) == leader
    handle.shutdown()
    _assert_reaped(leader)
    assert _wait_until(lambda: _dead(grandchild)), f"grandchild {grandchild} survived shutdown"


async def test_early_exit_kills_leftover_group_members(tmp_path: Path) -> None:
    gc_file = tmp_path / "grandchild"
    line = f'sleep 1000 & echo $! > "{gc_file}"; echo leaving >&2; exit 4'
    with pytest.raises(ProxySpawnError, match="status 4"):
        await ExternalProxy(["sh", "-c", line], startup_timeout=20.0).spawn()
    grandchild = int(gc_file.read_text())
    assert _wait_until(lambda: _dead(grandchild)), f"grandchild {grandchild} survived a failed spawn"


async def test_shutdown_is_idempotent(listener: Path, tmp_path: Path) -> None:
    handle = await _proxy(listener, tmp_path).spawn()
    pid = _read_info(tmp_path)["pid"]
    handle.shutdown()
    handle.shutdown()
    with handle:
        pass
    async with handle:
        pass
    assert not handle.alive
    _assert_reaped(pid)
    assert "stopped" in repr(handle)


async def test_sync_and_async_context_managers(listener: Path, tmp_path: Path) -> None:
    with await _proxy(listener, tmp_path).spawn() as h1:
        pid1 = _read_info(tmp_path)["pid"]
        assert h1.alive
    _assert_reaped(pid1)
    (tmp_path / "info.json").unlink()
    async with await _proxy(listener, tmp_path).spawn() as h2:
        pid2 = _read_info(tmp_path)["pid"]
        assert h2.alive
    _assert_reaped(pid2)


async def test_shutdown_from_another_thread(listener: Path, tmp_path: Path) -> None:
    handle = await _proxy(listener, tmp_path).spawn()
    pid = _read_info(tmp_path)["pid"]
    t = threading.Thread(target=handle.shutdown)
    t.start()
    await asyncio.to_thread(t.join, 10)
    assert not t.is_alive()
    assert not handle.alive
    _assert_reaped(pid)


def test_shutdown_after_the_creating_loop_closed(listener: Path, tmp_path: Path) -> None:
    handle = asyncio.run(_proxy(listener, tmp_path).spawn())  # asyncio.run closes its loop
    pid = _read_info(tmp_path)["pid"]
    assert not _dead(pid)
    handle.shutdown()
    _assert_reaped(pid)


def test_dropped_handle_stops_child_on_gc(listener: Path, tmp_path: Path) -> None:
    handle = asyncio.run(_proxy(listener, tmp_path).spawn())
    pid = _read_info(tmp_path)["pid"]
    ref = weakref.ref(handle)
    del handle
    gc.collect()
    assert ref() is None
    _assert_reaped(pid)


async def test_cancelled_spawn_kills_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(1000)"
    task = asyncio.ensure_future(ExternalProxy([sys.executable, "-c", code], startup_timeout=30.0).spawn())
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _assert_reaped(int(pidfile.read_text()))


async def test_empty_command() -> None:
    with pytest.raises(ProxySpawnError, match="must not be empty"):
        await ExternalProxy([]).spawn()


async def test_missing_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-proxy")
    with pytest.raises(ProxySpawnError, match="not found") as exc:
        await ExternalProxy([missing, "--flag"]).spawn()
    assert missing in str(exc.value)


async def test_non_executable_file(tmp_path: Path) -> None:
    script = tmp_path / "proxy.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(ProxySpawnError, match="not executable") as exc:
        await ExternalProxy([script]).spawn()
    assert str(script) in str(exc.value)


def test_string_command_is_rejected() -> None:
    with pytest.raises(TypeError, match="shlex.split"):
        ExternalProxy("mitmproxy --listen-port 8080")  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="KODA_PROXY_PORT"):
        ExternalProxy(["x"], env={"KODA_PROXY_PORT": "1"})
    with pytest.raises(ValueError, match="70000"):
        ExternalProxy(["x"], port=70000)
    with pytest.raises(ValueError, match="startup_timeout"):
        ExternalProxy(["x"], startup_timeout=0)
    with pytest.raises(ValueError, match="stop_grace"):
        ExternalProxy(["x"], stop_grace=-1)
    with pytest.raises(TypeError):
        ExternalProxy(["x", 3])  # type: ignore[list-item]


def test_repr_hides_env() -> None:
    r = repr(ExternalProxy(["mitmdump"], env={"TOKEN": "secret-value"}))
    assert "mitmdump" in r and "secret-value" not in r


def test_exit_status_text_for_signals() -> None:
    from kodarelay.external import _describe_returncode

    assert _describe_returncode(3) == "exited with status 3"
    assert _describe_returncode(-signal.SIGTERM) == "was killed by signal 15 (SIGTERM)"

"""``ExternalProxy``: run a user-supplied proxy program (mitmproxy, Squid, a corporate agent).

Users who already have egress infrastructure keep it: kodarelay starts their command, tells
it which port to bind (``KODA_PROXY_PORT``), waits until the port accepts connections and
hands back a ``ProxyHandle`` that stops the whole process group later.

Fail-open contract: every reason the proxy cannot be started is a ``ProxySpawnError``. The
caller decides what that means; the reference implementation warns and runs the session
without restrictions, because a broken proxy must never break a working session.

Decisions worth knowing:

* ``command`` is an argv sequence (``str`` / ``os.PathLike`` items). A plain string is
  refused with ``TypeError``: it is ambiguous between a program path that contains spaces
  and a shell line, and splitting it silently mis-handles shell syntax. Pass
  ``shlex.split(line)`` or ``["sh", "-c", line]`` explicitly.
* The child gets the parent's environment, then ``env``, then ``KODA_PROXY_PORT`` (``env``
  may not set that key: the port is what readiness is checked on). stdin is /dev/null,
  stdout is discarded (a proxy's chatter must not mix into the caller's output), stderr is
  drained for the child's whole life by a daemon thread that keeps only the last 4 KiB,
  which goes into error messages.
* The child leads its own session and process group (``start_new_session=True``). Stopping
  sends SIGTERM to the group, waits ``stop_grace`` seconds for the leader, then SIGKILLs the
  group (so grandchildren that ignore SIGTERM die too) and reaps the leader. The leader is
  not reaped before the group is killed, so its pid - the group id - cannot be reused in
  between. A descendant that leaves the group (``setsid``, daemonising) is out of reach.
* Stopping uses only blocking system calls: it works from any thread, with or without an
  event loop, after the spawning loop has closed, and from the handle's finalizer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import signal
import subprocess
import threading
from typing import Mapping, Sequence, Union

from .env import PROXY_PORT_ENV_KEY
from .handle import ProxyHandle
from .ports import pick_ephemeral_port, sleep_backoff_until, wait_for_bind

log = logging.getLogger(__name__)

#: Bytes of the child's stderr kept for error messages.
STDERR_TAIL_BYTES = 4096
#: Default seconds between SIGTERM and SIGKILL when stopping the child's process group.
DEFAULT_STOP_GRACE = 2.0

Arg = Union[str, "os.PathLike[str]"]


class ProxySpawnError(RuntimeError):
    """The external proxy could not be started; the caller decides whether to continue."""


class _EarlyExit(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class _StderrTail:
    """Drains a child's stderr so it never blocks on a full pipe, keeping the last bytes."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int = STDERR_TAIL_BYTES) -> None:
        assert proc.stderr is not None
        self._pipe = proc.stderr
        self._limit = limit
        self._buf: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"kodarelay-external-stderr-{proc.pid}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        fd = self._pipe.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                with self._lock:
                    self._buf.append(chunk)
                    self._size += len(chunk)
                    while self._size - len(self._buf[0]) >= self._limit:
                        self._size -= len(self._buf.popleft())
        finally:
            self._pipe.close()

    def text(self, wait: float = 0.0) -> str:
        """The kept tail, decoded; waits up to ``wait`` s for the pipe to reach EOF first."""
        if wait > 0:
            self._thread.join(wait)
        with self._lock:
            data = b"".join(self._buf)[-self._limit :]
        return data.decode("utf-8", "replace").strip()


def _describe_waitid(res: os.waitid_result) -> str:
    if res.si_code == os.CLD_EXITED:
        return f"exited with status {res.si_status}"
    try:
        name = signal.Signals(res.si_status).name
    except ValueError:
        name = str(res.si_status)
    return f"was killed by signal {res.si_status} ({name})"


def _describe_returncode(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"was killed by signal {-code} ({name})"


class _ChildStopper:
    """The ``stop`` callable of an external proxy's handle: group TERM, grace, group KILL, reap.

    It holds the ``Popen`` (never the handle), so the handle stays collectable.
    """

    def __init__(self, proc: subprocess.Popen[bytes], grace: float, label: str) -> None:
        self._proc = proc
        self._grace = grace
        self._label = label
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_status(self) -> str | None:
        """How the leader ended, or None while it runs. Does not reap it (keeps the pgid)."""
        if self._proc.returncode is not None:
            return _describe_returncode(self._proc.returncode)
        if hasattr(os, "waitid"):
            try:
                res = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                code = self._proc.poll()
                return _describe_returncode(code) if code is not None else "exited"
            return None if res is None else _describe_waitid(res)
        code = self._proc.poll()  # pragma: no cover - platforms without waitid
        return None if code is None else _describe_returncode(code)  # pragma: no cover

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The group id now names someone else's group: our group is gone.
            log.debug("killpg(%d, %s) not permitted; group already gone", self._proc.pid, sig.name)

    def __call__(self, grace: float | None = None) -> None:
        """Stop the group; ``grace`` overrides the configured SIGTERM grace (0: kill at once)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            grace = self._grace if grace is None else grace
            pid = self._proc.pid
            if grace > 0:
                self._signal_group(signal.SIGTERM)
                if not sleep_backoff_until(lambda: self.exit_status() is not None, grace):
                    log.warning("%s (pid %d) ignored SIGTERM for %.1fs; killing it", self._label, pid, grace)
            # Unconditional: descendants that outlived the leader die with the group.
            self._signal_group(signal.SIGKILL)
            try:
                self._proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - stuck in uninterruptible sleep
                log.error("%s (pid %d) did not die after SIGKILL", self._label, pid)
                return
            log.debug("%s (pid %d) stopped: %s", self._label, pid, _describe_returncode(self._proc.returncode))


class ExternalProxy:
    """Spawns a user-supplied proxy command and waits until it listens on its port.

    ``command``: argv as a sequence of ``str`` / ``os.PathLike`` (a plain string is a
    ``TypeError``; see the module doc). ``env``: extra variables for the child. ``port``:
    the port the child must bind on 127.0.0.1 (None: an ephemeral one is picked at
    spawn). ``startup_timeout``: seconds to wait for the bind. ``stop_grace``: seconds
    between SIGTERM and SIGKILL when the handle stops the child.
    """

    def __init__(
        self,
        command: Sequence[Arg],
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 5.0,
        *,
        stop_grace: float = DEFAULT_STOP_GRACE,
    ) -> None:
        if isinstance(command, (str, bytes, bytearray)):
            raise TypeError(
                f"command must be a sequence of arguments, not a string ({command!r}); "
                "pass shlex.split(line) or ['sh', '-c', line]"
            )
        argv: list[str] = []
        for arg in command:
            value = os.fspath(arg)
            if not isinstance(value, str):
                raise TypeError(f"command arguments must be str or os.PathLike[str], not {arg!r}")
            if "\0" in value:
                raise ValueError(f"command argument contains a NUL byte: {value!r}")
            argv.append(value)
        extra = dict(env or {})
        for key, value in extra.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"env keys and values must be str, not {key!r}: {value!r}")
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"invalid environment variable {key!r}")
        if PROXY_PORT_ENV_KEY in extra:
            raise ValueError(f"env must not set {PROXY_PORT_ENV_KEY}; pass port= instead")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValueError(f"port must be None or in 1..65535, not {port!r}")
        if not (startup_timeout > 0 and math.isfinite(startup_timeout)):
            raise ValueError(f"startup_timeout must be a positive number of seconds, not {startup_timeout!r}")
        if not (stop_grace >= 0 and math.isfinite(stop_grace)):
            raise ValueError(f"stop_grace must be a non-negative number of seconds, not {stop_grace!r}")
        self.command: tuple[str, ...] = tuple(argv)
        self.env: dict[str, str] = extra
        self.port = port
        self.startup_timeout = float(startup_timeout)
        self.stop_grace = float(stop_grace)

    def __repr__(self) -> str:
        # env is left out: it may carry credentials.
        return f"<ExternalProxy {list(self.command)!r} port={self.port}>"

    async def spawn(self) -> ProxyHandle:
        """Start the command and return its handle once ``127.0.0.1:port`` accepts connections.

        Raises ``ProxySpawnError`` when the command is empty or cannot be executed, when the
        child exits before binding (at once, with its exit status and stderr tail), or when
        it does not bind within ``startup_timeout`` (the child's group is killed and reaped).
        """
        if not self.command:
            raise ProxySpawnError("external proxy command must not be empty")
        port = self.port if self.port is not None else pick_ephemeral_port()
        program = self.command[0]
        child_env = dict(os.environ)
        child_env.update(self.env)
        child_env[PROXY_PORT_ENV_KEY] = str(port)
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=child_env,
                close_fds=True,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise ProxySpawnError(f"external proxy executable not found: {program!r}") from e
        except PermissionError as e:
            raise ProxySpawnError(f"external proxy {program!r} is not executable: {e.strerror}") from e
        except OSError as e:
            raise ProxySpawnError(f"could not start external proxy {program!r}: {e}") from e

        label = f"external proxy {program!r}"
        tail = _StderrTail(proc)
        stopper = _ChildStopper(proc, self.stop_grace, label)

        def check() -> None:
            status = stopper.exit_status()
            if status is not None:
                raise _EarlyExit(status)

        try:
            await wait_for_bind(port, self.startup_timeout, check=check)
        except _EarlyExit as e:
            stopper(grace=0)  # the leader is gone; kill what it left in the group and reap
            stderr = await asyncio.to_thread(tail.text, 1.0)
            raise ProxySpawnError(
                f"{label} {e.status} before binding 127.0.0.1:{port}{_stderr_suffix(stderr)}"
            ) from None
        except TimeoutError:
            stopper(grace=0)
            stderr = await asyncio.to_thread(tail.text, 1.0)
            raise ProxySpawnError(
                f"{label} did not bind 127.0.0.1:{port} within {self.startup_timeout}s "
                f"(killed it){_stderr_suffix(stderr)}"
            ) from None
        except BaseException:  # cancelled: never leave the child behind
            stopper(grace=0)
            raise
        log.info("%s (pid %d) is listening on 127.0.0.1:%d", label, proc.pid, port)
        return ProxyHandle(port, "external", stopper)


def _stderr_suffix(stderr: str) -> str:
    return f"; stderr tail:\n{stderr}" if stderr else "; no stderr output"

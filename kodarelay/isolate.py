"""Running a command behind kodarelay: its environment, its supervision, and the network fence.

``kodarelay run`` uses this module twice: on the host, to start CMD (or the namespace
helper) and wait for it; inside the fence's namespaces, to bring loopback up, forward a
loopback port to the proxy's UDS bridge and start CMD there, fenced by ``kodarelay._fence``.

Decisions worth knowing:

* **Signals.** The supervisor blocks the signals it forwards (and ``SIGCHLD``) before any
  other thread starts, then waits for them with ``sigtimedwait``: no Python handler runs
  in the middle of anything, and ``siginfo`` tells a keyboard ``^C`` (sent by the kernel
  to the whole foreground process group, CMD included) from a ``kill`` aimed at kodarelay
  alone. The first is not forwarded again (CMD would see two SIGINTs); the second is.
  CMD is started with ``posix_spawn`` and gets the signal mask kodarelay started with.
* **Exit status.** CMD's own status; ``128 + N`` when a signal ``N`` killed it.
* **The fence.** ``unshare --user --map-root-user --net`` (a user namespace even as root)
  runs ``python -m kodarelay._isolate_child``, which exits with CMD. In the new network
  namespace there is no interface but loopback; the helper brings it up, lets unprivileged
  processes bind every port there, and forwards a loopback TCP port to the proxy's UDS
  bridge (a socket *file*, which network namespaces do not separate). It then forks CMD's
  process, which drops every capability (bounding set included), sets ``no_new_privs`` and
  installs a seccomp filter (``kodarelay._fence``) before it executes CMD: CMD cannot
  ``setns`` back into the host's network, nor open a Unix socket to anything outside (only
  the paths ``--allow-unix`` names, through ``_fence.UnixGate``). The helper keeps its
  capabilities inside the user namespace only, so CMD cannot ptrace it either.
* **Ready or nothing.** The helper reports on a pipe: ``ok`` once CMD was started fenced,
  ``fail <why>`` (or nothing) when the fence could not be made, ``exec <code> <why>`` when
  it held but CMD could not be executed (kodarelay exits 126 / 127 with that one line).
  The helper never runs CMD unfenced: on ``fail`` ``spawn_isolated`` raises
  ``FenceUnavailable`` and the command decides (``--isolate``: exit 125; the default: one
  line on stderr, then CMD runs unfenced).
* **The helper dies with kodarelay.** It asks the kernel for ``SIGTERM`` when its parent
  dies (``PR_SET_PDEATHSIG``) and forwards it to CMD like any other signal.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .env import proxy_env_vars, socks5_env_vars
from .relay import DEFAULT_IDLE_TIMEOUT, DEFAULT_TOTAL_TIMEOUT, relay_with_timeouts

log = logging.getLogger(__name__)

#: Signals a supervisor passes on to its child.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: Signals the terminal sends to the whole foreground process group (CMD gets them itself).
_KEYBOARD = (signal.SIGINT, signal.SIGQUIT)
_SI_KERNEL = 0x80
_POLL = 1.0
READY_TIMEOUT = 15.0

EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
#: ``kodarelay run`` itself failed (like ``env`` / ``timeout`` / ``chroot``).
EXIT_RUN_FAILED = 125


class RunError(Exception):
    """``kodarelay run`` cannot do what was asked; ``exit_code`` is what it exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_RUN_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FenceUnavailable(RunError):
    """The fence could not be made, and CMD was not started (so it may still run unfenced)."""


# ── the environment ──────────────────────────────────────────────────────────


def _is_proxy_key(key: str) -> bool:
    low = key.lower()
    return low.endswith(("_proxy", "noproxy"))


def clean_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any inherited proxy setting (``*_proxy``, ``*noproxy``, any case).

    A caller's ``HTTPS_PROXY`` (or ``FTP_PROXY``, ``npm_config_proxy``...) would otherwise
    send some of CMD's traffic around kodarelay; kodarelay chains through it instead.
    """
    return {k: v for k, v in environ.items() if not _is_proxy_key(k)}


def run_bouquet(port: int, ca_bundle: str | None = None, all_proxy_scheme: str = "socks5h") -> list[tuple[str, str]]:
    """The variables CMD gets: the wide bouquet at ``127.0.0.1:port`` and an empty NO_PROXY.

    NO_PROXY is empty so that nothing, not even ``localhost``, skips the policy; the port
    speaks HTTP CONNECT and SOCKS5, so ``ALL_PROXY`` points at it too.
    """
    pairs = dict(proxy_env_vars(port, ca_bundle, no_proxy="", tools=True))
    pairs.update(socks5_env_vars(port, scheme=all_proxy_scheme))
    return sorted(pairs.items())


# ── spawning and supervising ─────────────────────────────────────────────────


def block_signals() -> set[int]:
    """Block the forwarded signals and SIGCHLD in this thread; returns the previous mask.

    Call it before starting any thread, so that threads inherit the mask and every such
    signal waits for ``supervise``.
    """
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, (*FORWARDED, signal.SIGCHLD)))


def pending_stop_signal() -> int | None:
    """A terminating signal that arrived while blocked (before CMD started), if any."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        if sig in signal.sigpending():
            return int(sig)
    return None


def command_exists(cmd: str, path: str | None = None) -> bool:
    """Whether ``cmd`` names something to execute (a path that exists, or a PATH hit)."""
    if os.sep in cmd:
        return os.path.exists(cmd)
    return shutil.which(cmd, path=path) is not None


def spawn(argv: Sequence[str], env: Mapping[str, str], sigmask: Iterable[int]) -> int:
    """Start ``argv`` (PATH lookup like ``execvp``) with ``env`` and ``sigmask``; returns its pid.

    SIGPIPE and SIGXFSZ go back to their defaults (Python ignores them). Raises
    ``RunError`` with 127 / 126 when the command is missing / not executable.
    """
    from .limits import original_open_files_limit

    original = original_open_files_limit()
    raised = None
    if original is not None:     # the command gets the open-files limit kodarelay started with
        import resource

        raised = resource.getrlimit(resource.RLIMIT_NOFILE)
        if raised[0] != original:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(original, raised[1]), raised[1]))
            except (OSError, ValueError):
                raised = None
        else:
            raised = None
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env),
            setsigmask=list(sigmask),
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except FileNotFoundError:
        raise RunError(f"{argv[0]}: command not found", EXIT_NOT_FOUND) from None
    except OSError as e:
        raise RunError(f"{argv[0]}: cannot run: {e.strerror or e}", EXIT_NOT_EXECUTABLE) from None
    finally:
        if raised is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, raised)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _forward(pid: int, info: signal.struct_siginfo) -> None:
    sig = info.si_signo
    if sig in _KEYBOARD and info.si_code == _SI_KERNEL:
        try:
            same_group = os.getpgid(pid) == os.getpgrp()
        except ProcessLookupError:
            return
        if same_group:
            log.debug("%s came from the terminal; the child got it too", signal.Signals(sig).name)
            return
    log.debug("forwarding %s to pid %d", signal.Signals(sig).name, pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def supervise(pid: int) -> int:
    """Forward signals to ``pid`` until it exits; returns its exit code (128 + N if signalled).

    Needs ``block_signals()`` to have run in this thread before ``pid`` started.
    """
    waited = (*FORWARDED, signal.SIGCHLD)
    while True:
        info = signal.sigtimedwait(waited, _POLL)
        if info is not None and info.si_signo != signal.SIGCHLD:
            _forward(pid, info)
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it; nothing more to learn
            return EXIT_RUN_FAILED
        if done:
            return exit_code(status)


# ── the host side of --isolate ───────────────────────────────────────────────


def unshare_argv(unshare: str, map_root: bool = True) -> list[str]:
    """``unshare --user --map-root-user --net``: a user namespace whoever runs it.

    As root too: the capabilities the helper holds are then those of the new user
    namespace, never the host's, so nothing in the fence can ``setns`` back out. Without
    ``map_root`` the ids are mapped by kodarelay itself once the helper asks (root maps the
    system's ids one to one: ``spawn_isolated``).
    """
    return [unshare, "--user", "--map-root-user", "--net", "--"] if map_root else [unshare, "--user", "--net", "--"]


#: The ids a fence started by root maps one to one: the system's users and groups (apt's
#: ``_apt``, ``nobody``), so that programs that drop to them work fenced.
ROOT_ID_MAP = "0 0 65536\n"


def _map_ids(pid: int) -> None:
    """Write the helper's id maps (root only: one to one for ``ROOT_ID_MAP``; ``setgroups``
    stays allowed, as a privileged writer may leave it)."""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(ROOT_ID_MAP)


def fence_unavailable() -> str | None:
    """Why the fence cannot be made here (checked without starting anything), or None."""
    from ._fence import FenceError, current_arch

    try:
        current_arch()
    except FenceError as e:
        return str(e)
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not on PATH"
    return None


def probe_namespaces(timeout: float = READY_TIMEOUT) -> str | None:
    """Why ``unshare`` cannot make the namespaces here (its own words), or None when it can."""
    argv = unshare_argv(shutil.which("unshare") or "unshare") + ["true"]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare: {e}"
    if out.returncode == 0:
        return None
    text = out.stderr.decode(errors="replace").strip().splitlines()
    return text[-1] if text else f"unshare exited {out.returncode}"


def spawn_isolated(
    cmd: Sequence[str],
    env: Mapping[str, str],
    sigmask: Iterable[int],
    uds_path: str,
    *,
    ca_bundle: str | None = None,
    all_proxy_scheme: str = "socks5h",
    allow_unix: Sequence[str] = (),
    protect: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
    capture_path: str | None = None,
    capture_ports: Sequence[int] = (),
    info: dict[str, object] | None = None,
    hide: Sequence[str] = (),
    private: bool = False,
) -> int:
    """Start CMD fenced (see the module docstring) with ``uds_path`` its only way out; returns the helper pid.

    Returns once the helper reported CMD started in the fence. Raises ``FenceUnavailable``
    (and leaves no process behind, CMD never started) when the fence cannot be made.
    With ``capture_path`` (the proxy's capture socket) the fence captures ``capture_ports``
    (``kodarelay.capture``); ``info["capture"]`` then says whether capture was set up, and
    ``info["capture_ports"]`` which ports it listens on. ``hide``: files CMD must not read
    (an empty file is bound over each); ``private``: CMD must not see kodarelay's processes.
    Where either cannot be made, CMD is not run (``FenceUnavailable``).
    """
    why = fence_unavailable()
    if why is not None:
        raise FenceUnavailable(f"--isolate: {why}; refusing to run CMD unfenced")
    unshare = shutil.which("unshare") or "unshare"
    rfd, wfd = os.pipe()
    # As root the system's ids are mapped one to one (apt & co. drop to their own users) and
    # CMD keeps the file capabilities they need (``_fence.KEPT_AS_ROOT``); the helper asks
    # for its maps on the ready pipe once its namespaces exist, and waits on ``go``.
    map_ids = os.geteuid() == 0
    go_r, go_w = os.pipe() if map_ids else (-1, -1)
    try:
        os.set_inheritable(wfd, True)
        argv = unshare_argv(unshare, map_root=not map_ids) + [
            sys.executable, "-m", "kodarelay._isolate_child",
            "--uds", uds_path, "--ready-fd", str(wfd), "--parent", str(os.getpid()),
            "--all-proxy-scheme", all_proxy_scheme,
        ]
        if map_ids:
            os.set_inheritable(go_r, True)
            argv += ["--map-fd", str(go_r)]
        if ca_bundle is not None:
            argv += ["--ca-bundle", ca_bundle]
        for path in allow_unix:
            argv += ["--allow-unix", path]
        for path in protect:
            argv += ["--protect", os.path.abspath(path)]
        for path in hide:
            argv += ["--hide", os.path.abspath(path)]
        if private:
            argv.append("--private")
        if capture_path is not None:
            argv += ["--capture", capture_path]
            for port in capture_ports:
                argv += ["--capture-port", str(port)]
        argv += ["--", *cmd]
        try:
            pid = spawn(argv, env, sigmask)
        finally:
            os.close(wfd)
            if map_ids:
                os.close(go_r)
        ready = _read_ready(rfd, ready_timeout)
        if ready == "map":
            try:
                _map_ids(pid)
                os.write(go_w, b"g")
            except OSError as e:
                ready = f"fail cannot map the fence's ids: {e.strerror or e}"
            else:
                ready = _read_ready(rfd, ready_timeout)
    finally:
        os.close(rfd)
        if map_ids:
            os.close(go_w)
    if ready == "ok" or ready.startswith("ok capture"):
        if info is not None:
            info["capture"] = ready != "ok"
            info["capture_ports"] = [int(p) for p in ready[len("ok capture "):].split(",") if p.isdigit()]
        return pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    if ready.startswith("exec "):  # fenced, but CMD could not be executed
        _, exit_text, why = (ready.split(" ", 2) + ["", ""])[:3]
        raise RunError(why, int(exit_text) if exit_text.isdigit() else EXIT_NOT_EXECUTABLE)
    if ready.startswith("fail "):
        raise FenceUnavailable(f"--isolate: could not set up the fence ({ready[5:]}); CMD was not run")
    code = os.waitstatus_to_exitcode(status)
    how = f"unshare exited {code}" if code >= 0 else f"the helper was killed by signal {-code}"
    raise FenceUnavailable(
        f"--isolate: could not set up the network namespace ({how}); CMD was not run. "
        "Namespaces need unprivileged user namespaces (user.max_user_namespaces > 0)"
    )


def _read_ready(fd: int, timeout: float) -> str:
    """The helper's report (``ok``, ``fail WHY``, ``exec CODE WHY``); "" on EOF or after ``timeout`` seconds."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf and len(buf) < 4096:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return ""
        chunk = os.read(fd, 512)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace") if b"\n" in buf else ""


# ── the namespace side of --isolate ──────────────────────────────────────────

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: name[16], short flags, padding to 40 bytes
_PR_SET_PDEATHSIG = 1


def loopback_up() -> None:
    """Bring ``lo`` up in this network namespace (what ``ip link set lo up`` does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0))
        flags = struct.unpack(_IFREQ, res)[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Ask for ``sig`` when the parent dies; exit at once if it already did."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:
        os._exit(EXIT_RUN_FAILED)


class UdsForwarder:
    """A loopback TCP listener whose every connection is relayed to a UDS path (on its own thread)."""

    def __init__(self, uds_path: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.uds_path = uds_path
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._lsock.bind((host, port))
            self._lsock.listen(128)  # connections queue from here on, before the thread runs
            self._lsock.setblocking(False)
        except BaseException:
            self._lsock.close()
            raise
        self.port: int = self._lsock.getsockname()[1]
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="kodarelay-isolate-forwarder", daemon=True)

    def start(self) -> UdsForwarder:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from ._aio import accept_forever

        loop = asyncio.get_running_loop()

        def accepted(conn: socket.socket) -> None:
            task = loop.create_task(self._pipe(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await accept_forever(self._lsock, accepted, what="isolate forwarder", log=log, backoff=0.1,
                             closed=lambda: False)

    async def _pipe(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await loop.sock_connect(up, self.uds_path)
        except OSError as e:
            log.warning("isolate forwarder: cannot reach the proxy at %s: %s", self.uds_path, e)
            conn.close()
            up.close()
            return
        try:
            await relay_with_timeouts(conn, up, DEFAULT_IDLE_TIMEOUT, DEFAULT_TOTAL_TIMEOUT)
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            log.debug("isolate forwarder: relay ended: %s", e)


def allow_unprivileged_ports() -> None:
    """Let CMD (no capability) bind ports below 1024 on the namespace's own loopback."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
            f.write("0")
    except OSError as e:
        log.debug("cannot lower ip_unprivileged_port_start: %s", e)


def spawn_fenced(
    cmd: Sequence[str], env: Mapping[str, str], sigmask: Iterable[int], *, allow_unix: Sequence[str] = (),
    protect: Sequence[str] = (), keep_caps: bool = False, hide: Sequence[str] = (), private: bool = False,
) -> tuple[int, int | None]:
    """Start CMD fenced; returns the pid to supervise and, with ``allow_unix``, the seccomp
    notification fd for ``UnixGate``.

    Where it can, CMD runs in a PID namespace and a mount namespace of its own
    (``kodarelay._fence_mounts``): the process forked here is their init (PID 1: it reaps,
    forwards signals to CMD, and takes every process of the namespace with it when CMD
    ends), makes ``protect`` and the resolver files read-only, gives CMD its own
    ``/etc/hosts`` and ``/proc``, and forks CMD. Where those namespaces cannot be made it
    says so on stderr and CMD is forked directly, fenced as before. CMD's process closes
    inherited sockets, drops every privilege, installs the filter and executes CMD.

    Call it before starting any thread (the children run Python after fork). Raises
    ``FenceError`` when the fence could not be applied (CMD not run) and ``RunError``
    (127 / 126) when CMD could not be executed.
    """
    from . import _fence, _fence_mounts

    arch = _fence.current_arch()
    _fence._libc()  # loaded before the fork
    _fence_mounts._libc()
    mediate = bool(allow_unix)
    argv, environ = list(cmd), dict(env)
    blocked = set(sigmask)
    parent_chan, child_chan = socket.socketpair() if mediate else (None, None)
    rfd, wfd = os.pipe()  # both close-on-exec: EOF on rfd means CMD was executed
    try:
        pid = _fence_mounts.fork_into_new_pid_namespace()
        as_init = True
    except OSError as e:
        if private or hide:
            raise _fence.FenceError(f"no PID namespace for CMD ({e.strerror or e}): it could read the secrets "
                                    "from kodarelay's processes") from None
        _fence_note(f"no PID namespace for CMD ({e.strerror or e}): it can see kodarelay's processes")
        as_init = False
        pid = os.fork()
    if pid == 0:  # init of CMD's namespaces, or CMD's own process: nothing here may return
        try:
            os.close(rfd)
            if as_init:
                fatal = _become_init(protect, hide, private)
                if fatal:
                    os.write(wfd, b"F" + fatal.encode(errors="replace"))
                    os._exit(EXIT_RUN_FAILED)
                cmd_pid = os.fork()
                if cmd_pid != 0:
                    os.close(wfd)
                    if child_chan is not None:
                        child_chan.close()
                    os._exit(supervise_as_init(cmd_pid))
            _exec_fenced(arch, argv, environ, blocked, mediate, child_chan, wfd,
                         _fence.KEPT_AS_ROOT if keep_caps else 0)
        finally:
            os._exit(EXIT_NOT_FOUND)
    os.close(wfd)
    listener: int | None = None
    try:
        if parent_chan is not None:
            assert child_chan is not None
            child_chan.close()
            _, fds, _, _ = socket.recv_fds(parent_chan, 1, 1)
            listener = fds[0] if fds else None
        report = b""
        while chunk := os.read(rfd, 4096):
            report += chunk
    finally:
        os.close(rfd)
        if parent_chan is not None:
            parent_chan.close()
    if report[:1] not in (b"F", b"E") and (listener is not None or not mediate):
        return pid, listener
    if listener is not None:
        os.close(listener)
    os.waitpid(pid, 0)
    if report[:1] == b"E":
        code = int(report[1:] or errno.ENOENT)
        if code == errno.ENOENT:
            raise RunError(f"{argv[0]}: command not found", EXIT_NOT_FOUND)
        raise RunError(f"{argv[0]}: cannot run: {os.strerror(code)}", EXIT_NOT_EXECUTABLE)
    raise _fence.FenceError(report[1:].decode(errors="replace") or "CMD's process did not start")


def _fence_note(text: str) -> None:
    """One line on stderr from inside the fence (no logging configured in a forked child)."""
    try:
        os.write(2, f"kodarelay: fence: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def _become_init(protect: Sequence[str], hide: Sequence[str] = (), private: bool = False) -> str | None:
    """PID 1 of CMD's namespace: dies with the helper, takes the signals it forwards (an init
    only receives signals it handles), protects what the proxy reads, hides ``hide``, mounts
    its own /proc. Returns why CMD must not run (a secret could not be kept from it), else None."""
    from . import _fence_mounts

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    for sig in (*FORWARDED, signal.SIGCHLD):
        signal.signal(sig, _ignore_signal)          # still blocked: sigtimedwait takes them
    try:
        for problem in _fence_mounts.fence_mounts(protect):
            _fence_note(f"cannot keep out of CMD's reach: {problem}")
    except OSError as e:
        if hide or private:
            return f"no mount namespace for CMD ({e.strerror or e}): a secret would be in its reach"
        _fence_note(f"no mount namespace for CMD ({e.strerror or e}): it can write what the proxy reads")
        return None
    for path in hide:
        try:
            _fence_mounts.hidden(path)
        except OSError as e:
            return f"cannot hide {path} from CMD ({e.strerror or e}): refusing to run it beside a secret"
    try:
        _fence_mounts.own_proc()
    except OSError as e:
        if private:
            return f"no /proc of CMD's own ({e.strerror or e}): it could read kodarelay's memory"
        _fence_note(f"no /proc of CMD's own ({e.strerror or e}): it can see kodarelay's processes")
    return None


def _ignore_signal(signum: int, frame: object) -> None:
    """A handler, so that the kernel delivers the signal to an init at all (never runs: blocked)."""


def _exec_fenced(arch: object, argv: list[str], environ: dict[str, str], blocked: set[int], mediate: bool,
                 child_chan: socket.socket | None, wfd: int, keep: int = 0) -> None:
    """CMD's own process: close inherited sockets, drop every privilege, install the filter,
    execute CMD. Reports a failure on ``wfd``; returns only to be ``_exit``-ed."""
    from . import _fence, _fence_mounts

    try:
        notify_fd = _fence.apply(arch, mediate_unix=mediate, keep=keep)  # type: ignore[arg-type]
        if notify_fd is not None and child_chan is not None:
            socket.send_fds(child_chan, [b"L"], [notify_fd])
            os.close(notify_fd)
        _fence_mounts.close_inherited_sockets(keep=(wfd,))
    except BaseException as e:  # noqa: BLE001 - whatever it is, CMD must not run
        os.write(wfd, b"F" + str(e).encode(errors="replace"))
        os._exit(EXIT_RUN_FAILED)
    for sig in (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    from .limits import restore_open_files_limit_for_child

    restore_open_files_limit_for_child()
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        os.execvpe(argv[0], argv, environ)
    except OSError as e:
        os.write(wfd, b"E%d" % (e.errno or errno.ENOEXEC))


def supervise_as_init(pid: int) -> int:
    """``supervise`` for PID 1: forwards signals to CMD (``pid``), reaps every orphan, and
    returns CMD's exit code once CMD ends (the kernel then ends the rest of the namespace)."""
    waited = (*FORWARDED, signal.SIGCHLD)
    while True:
        info = signal.sigtimedwait(waited, _POLL)
        if info is not None and info.si_signo != signal.SIGCHLD:
            _forward(pid, info)
        while True:
            try:
                done, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return EXIT_RUN_FAILED
            if done == 0:
                break
            if done == pid:
                return exit_code(status)


def _connect_deadline() -> float:
    """``KODARELAY_UNIX_CONNECT_DEADLINE`` (seconds) or the gate's default."""
    from ._fence import CONNECT_DEADLINE

    try:
        value = float(os.environ.get("KODARELAY_UNIX_CONNECT_DEADLINE", CONNECT_DEADLINE))
    except ValueError:
        return CONNECT_DEADLINE
    return value if 0 < value < float("inf") else CONNECT_DEADLINE


def child_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kodarelay._isolate_child`` (runs inside the new namespaces)."""
    import argparse

    from ._fence import FenceError, UnixGate

    p = argparse.ArgumentParser(prog="kodarelay._isolate_child", description="internal helper of kodarelay run --isolate")
    p.add_argument("--uds", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--ca-bundle")
    p.add_argument("--all-proxy-scheme", default="socks5h")
    p.add_argument("--allow-unix", action="append", default=[])
    p.add_argument("--protect", action="append", default=[])
    p.add_argument("--hide", action="append", default=[])
    p.add_argument("--private", action="store_true")
    p.add_argument("--map-fd", type=int)
    p.add_argument("--ids-mapped", action="store_true")
    p.add_argument("--capture")
    p.add_argument("--capture-port", type=int, action="append", default=[])
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # CMD follows the first "--", untouched
    args = p.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    logging.basicConfig(level=logging.WARNING, format="kodarelay (isolate): %(message)s")
    sigmask = block_signals()
    os.set_inheritable(args.ready_fd, False)
    die_with_parent(args.parent)

    def fail(why: str) -> int:
        os.write(args.ready_fd, b"fail " + why.replace("\n", " ").encode(errors="replace") + b"\n")
        return EXIT_RUN_FAILED

    if not cmd:
        return fail("no command given")
    if args.map_fd is not None:          # root: kodarelay maps our ids, then says go
        os.write(args.ready_fd, b"map\n")
        readable, _, _ = select.select([args.map_fd], [], [], READY_TIMEOUT)
        got = os.read(args.map_fd, 1) if readable else b""
        os.close(args.map_fd)
        if got != b"g":
            return fail("the fence's ids were not mapped")
        # The capabilities of the namespace were lost at our exec (we were unmapped then):
        # execute again, as the mapped root, to have them.
        os.set_inheritable(args.ready_fd, True)
        signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)   # the next run blocks them again itself
        i = argv.index("--map-fd")
        again = [*argv[:i], "--ids-mapped", *argv[i + 2:]]
        os.execv(sys.executable, [sys.executable, "-m", "kodarelay._isolate_child", *again])
    from .limits import raise_open_files_limit

    raise_open_files_limit()        # the forwarder's; CMD gets the original back before exec
    try:
        loopback_up()
        forwarder = UdsForwarder(args.uds)  # bound and listening; its thread starts after the fork
    except OSError as e:
        return fail(f"cannot set up loopback in the namespace: {e}")
    allow_unprivileged_ports()
    capture = _set_up_capture(args.capture, args.capture_port) if args.capture else None
    env = clean_env(os.environ)
    env.update(run_bouquet(forwarder.port, args.ca_bundle, args.all_proxy_scheme))
    try:
        protect = [*args.protect, os.path.dirname(os.path.abspath(__file__))]   # kodarelay's own installation
        pid, listener = spawn_fenced(cmd, env, sigmask, allow_unix=args.allow_unix, protect=protect,
                                     keep_caps=args.ids_mapped, hide=args.hide, private=args.private)
    except FenceError as e:
        return fail(str(e))
    except RunError as e:  # the fence held; CMD itself could not be executed: kodarelay says so
        os.write(args.ready_fd, f"exec {e.exit_code} {e}".replace("\n", " ").encode(errors="replace") + b"\n")
        return e.exit_code
    forwarder.start()
    if capture is not None:
        capture.start()
    if listener is not None:
        UnixGate(listener, args.allow_unix, deadline=_connect_deadline()).start()
    ok = "ok" if capture is None else "ok capture " + ",".join(str(p) for p in capture.ports)
    os.write(args.ready_fd, ok.encode("ascii") + b"\n")
    os.close(args.ready_fd)
    return supervise(pid)


def _set_up_capture(capture_path: str, ports: Sequence[int]) -> Any:
    """``kodarelay.capture.Capture`` bound (its thread starts after CMD's fork), or None and
    one line on stderr: the fence then holds as before."""
    from .capture import Capture, capture_ports

    try:
        return Capture(capture_path, capture_ports(None, ports))
    except OSError as e:
        _fence_note(f"capture is off ({e.strerror or e}): a client that ignores the proxy variables "
                    "gets no connection")
        return None

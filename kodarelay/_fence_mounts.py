"""What CMD's own mount and PID namespaces hide from it (``kodarelay run``'s fence).

The proxy runs outside the fence and reads files CMD's user could otherwise write: the
``--policy`` file (CMD appended ``allow evil.test``), the ``--events`` file (CMD forged
events), the resolver's configuration (as root of its user namespace CMD owns ``/etc/hosts``
and pointed an allowed name anywhere), and kodarelay's own installation. In the fence's own
mount namespace these are bind-mounted read-only onto themselves: CMD's writes fail with
``EROFS``, a rename or unlink of the path with ``EBUSY``, and without ``CAP_SYS_ADMIN`` CMD
cannot unmount them. CMD gets an ``/etc/hosts`` of its own (localhost lines only, on a
memfd), so what it writes there changes its view alone.

A PID namespace puts CMD under an init of kodarelay's (PID 1 there, ``kodarelay.isolate``)
with a ``/proc`` of its own: kodarelay's processes and their ``/proc/<pid>/net/tcp`` are not
visible, and no kodarelay process can be signalled from inside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from collections.abc import Iterable

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
# statvfs f_flag bits that a remount inside a user namespace must keep (they are locked)
_ST_KEEP = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: _MS_NOEXEC}

#: What the resolver reads: read-only for CMD (``/etc/hosts`` is replaced instead).
RESOLVER_FILES = ("/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf")
HOSTS = "/etc/hosts"
HOSTS_TEXT = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc_handle


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_SYS_CLONE = {"x86_64": 56, "amd64": 56, "aarch64": 220, "arm64": 220}


def fork_into_new_pid_namespace() -> int:
    """``os.fork()``, but the child is PID 1 of a new PID namespace (``clone(CLONE_NEWPID)``).

    Not ``unshare(CLONE_NEWPID)`` in the caller: after that a process can no longer start
    threads, and the helper needs them. The interpreter's fork bookkeeping is done as
    ``os.fork`` does it (``PyOS_BeforeFork`` / ``AfterFork_*``, the GIL held throughout);
    call it, like ``os.fork``, while this process runs one thread. ``OSError`` when the
    kernel refuses (then fork without it)."""
    import platform
    import signal

    nr = _SYS_CLONE.get(platform.machine().lower())
    if nr is None:
        raise OSError(errno.ENOSYS, "no clone number for this architecture")
    libc = ctypes.PyDLL(ctypes.util.find_library("c") or None, use_errno=True)   # keeps the GIL, as fork does
    libc.syscall.restype = ctypes.c_long
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = libc.syscall(ctypes.c_long(nr), ctypes.c_ulong(CLONE_NEWPID | int(signal.SIGCHLD)), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone(CLONE_NEWPID): {os.strerror(err)}")
    return int(pid)


def unshare(flags: int) -> None:
    _call(_libc().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _call(_libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None),
          f"mount {target}")


def read_only(path: str) -> None:
    """Bind ``path`` onto itself, then make that bind read-only (keeping the locked flags)."""
    _mount(path, path, None, _MS_BIND)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    st = os.statvfs(path)
    for bit, ms in _ST_KEEP.items():
        if st.f_flag & bit:
            flags |= ms
    _mount(None, path, None, flags)


def bind_content(content: bytes, target: str) -> None:
    """A file holding ``content`` bound over ``target``, on a memfd or, where a memfd cannot
    be bound, on a tmpfs mounted (privately) for the purpose and let go."""
    fd = os.memfd_create("kodarelay-file", 0)
    try:
        os.write(fd, content)
        _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
        return
    except OSError:
        pass
    finally:
        os.close(fd)
    import tempfile

    where = tempfile.mkdtemp(prefix="kodarelay-file-")
    try:
        _mount("tmpfs", where, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        try:
            with open(os.path.join(where, "file"), "wb") as f:
                f.write(content)
            _mount(os.path.join(where, "file"), target, None, _MS_BIND)
        finally:
            _libc().umount2(os.fsencode(where), ctypes.c_int(2))     # MNT_DETACH: the bind keeps the file
    finally:
        os.rmdir(where)


def private_hosts(text: str = HOSTS_TEXT) -> None:
    """CMD's own ``/etc/hosts``: a file with ``text`` bound over it."""
    bind_content(text.encode("ascii"), HOSTS)


def fence_mounts(protect: Iterable[str]) -> list[str]:
    """In a new mount namespace (this process and its children): ``/etc/hosts`` replaced,
    the resolver files and ``protect`` read-only. Returns the problems met (one line each);
    ``OSError`` when the namespace itself cannot be made."""
    unshare(CLONE_NEWNS)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)      # nothing we do here reaches the host
    problems: list[str] = []
    if os.path.exists(HOSTS):
        try:
            private_hosts()
        except OSError as e:
            problems.append(f"{HOSTS} (CMD's own copy): {e.strerror or e}")
            try:
                read_only(os.path.realpath(HOSTS))
            except OSError:
                pass
    seen: set[str] = set()
    for path in (*RESOLVER_FILES, *protect):
        real = os.path.realpath(path)
        if real in seen or not os.path.exists(real):
            continue
        seen.add(real)
        try:
            read_only(real)
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
    return problems


def hidden(path: str) -> None:
    """An empty, read-only file bound over ``path`` (a secret's file, out of CMD's reach)."""
    bind_content(b"", os.path.realpath(path))
    st = os.statvfs(path)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    for bit, ms in _ST_KEEP.items():
        if st.f_flag & bit:
            flags |= ms
    _mount(None, os.path.realpath(path), None, flags)
    with open(path, "rb") as f:
        if f.read(1):
            raise OSError(0, "the file still shows its content")


def own_proc() -> None:
    """A ``/proc`` of this (new) PID namespace over the old one."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def close_inherited_sockets(keep: Iterable[int] = ()) -> int:
    """Close every socket fd above stderr but ``keep`` (a parent's Unix or host-namespace TCP
    socket must not reach CMD); pipes and files stay (a make jobserver needs them). Returns
    how many were closed."""
    kept = set(keep)
    closed = 0
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    for fd in fds:
        if fd <= 2 or fd in kept:
            continue
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                closed += 1
        except OSError as e:
            if e.errno != errno.EBADF:      # (the fd listdir itself used)
                raise
    return closed


__all__ = ["CLONE_NEWNS", "CLONE_NEWPID", "RESOLVER_FILES", "close_inherited_sockets", "fence_mounts",
           "fork_into_new_pid_namespace", "own_proc", "unshare"]

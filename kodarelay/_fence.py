"""What makes ``kodarelay run``'s fence hold against a hostile CMD: no privilege, no Unix socket.

The network namespace takes the routes away; this module takes away what would let CMD
leave it or reach around it. It is applied in the child of the namespace helper, right
before CMD is executed (see ``kodarelay.isolate``):

* **No capability, no way to gain one** (see also "No new user namespace"). The bounding set, the ambient set and the
  effective / permitted / inheritable sets are emptied, ``no_new_privs`` is set, and the
  securebits ``NOROOT`` / ``NO_SETUID_FIXUP`` are set and locked, so neither a set-uid
  binary nor CMD being uid 0 of its user namespace gives anything back. Without
  ``CAP_SYS_ADMIN`` in the host's user namespace, ``setns`` (``nsenter``) into the host's
  network namespace is refused, whoever started kodarelay.
* **No Unix socket to the outside.** Unix sockets are files and cross network namespaces,
  so a seccomp filter (classic BPF, installed with ``no_new_privs``; no new dependency)
  refuses ``socket(AF_UNIX, ...)`` with ``EPERM``. ``socketpair(AF_UNIX, SOCK_STREAM |
  SOCK_SEQPACKET)`` stays allowed (pipes to one's own children; such a socket cannot be
  connected anywhere); ``SOCK_DGRAM`` pairs are refused, since a datagram socket can be
  re-pointed at any path with ``connect`` / ``sendto``. CMD's own way out is TCP to the
  helper's loopback forwarder, so it needs no ``AF_UNIX`` itself.
* **Socket families are allowlisted**: ``AF_INET``, ``AF_INET6`` (in the namespace: loopback
  only), ``AF_NETLINK`` and ``AF_PACKET`` (per namespace); every other family (``AF_VSOCK``
  reaches a hypervisor, Bluetooth, ...) fails with ``EAFNOSUPPORT``. ``io_uring`` (which
  can create and connect sockets behind seccomp's back) fails with ``ENOSYS``, which its
  users treat as "not available".
* **``--allow-unix PATH``** switches ``AF_UNIX`` from "refused" to "mediated":
  ``socket(AF_UNIX, SOCK_STREAM | SOCK_SEQPACKET)`` is allowed and every ``connect`` of CMD
  is handed to the helper (seccomp user notification, ``UnixGate``), which takes the socket
  with ``pidfd_getfd`` and connects it itself: to a named path (compared after making it
  absolute against CMD's working directory and resolving symlinks), to an abstract address
  (per network namespace: only the fence's own), or, for any other family, to the address
  CMD gave. Any other pathname gets ``EACCES``. The helper connects with the address it
  checked, never re-reading CMD's memory, so a second thread of CMD cannot swap it, and to
  the very inode it checked (opened once with ``O_PATH``, connected through
  ``/proc/self/fd/N``), so swapping the path for a symlink after the check changes nothing.
  A few gate threads connect, each within a deadline (a listener with a full backlog or one
  that never accepts costs CMD ``ETIMEDOUT``, never a thread for good).
* **No new user namespace**: ``unshare`` / ``clone`` with ``CLONE_NEWUSER`` and ``setns``
  fail with ``EPERM``, ``clone3`` with ``ENOSYS`` (its flags are out of seccomp's sight; libc
  then uses ``clone``): a child user namespace would give CMD back every capability inside
  it, and the kernel surface that comes with them (``CAP_NET_ADMIN``, nf_tables, raw
  sockets). Programs that sandbox themselves with user namespaces (Chromium, bubblewrap)
  need their own "no sandbox" switch inside the fence.
* **No typing into the terminal**: ``ioctl(TIOCSTI)`` (push input into the terminal) and
  ``ioctl(TIOCLINUX)`` fail with ``EPERM``, so CMD cannot answer ``--ask``'s questions on the
  terminal it shares with kodarelay.
* **Architectures**: x86_64 and aarch64, 64-bit processes. The filter checks
  ``AUDIT_ARCH`` and kills a process of any other ABI (a 32-bit binary, x32); on another
  machine the fence is refused (``FenceError``) rather than run without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import socket
import stat
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class FenceError(OSError):
    """The fence cannot be applied here (CMD must then not run fenced-or-not silently)."""


@dataclass(frozen=True)
class _Arch:
    name: str
    audit: int
    socket: int
    socketpair: int
    connect: int
    seccomp: int
    x32_bit: int  # syscall numbers at or above this belong to another ABI (0: none)
    ioctl: int
    clone: int
    unshare: int
    setns: int


_IO_URING = (425, 426, 427)  # setup, enter, register: the same numbers on both
_CLONE3 = 435                # the same number on both
_PIDFD_GETFD = 438
_ARCHES = {
    "x86_64": _Arch("x86_64", 0xC000003E, socket=41, socketpair=53, connect=42, seccomp=317, x32_bit=0x40000000,
                    ioctl=16, clone=56, unshare=272, setns=308),
    "aarch64": _Arch("aarch64", 0xC00000B7, socket=198, socketpair=199, connect=203, seccomp=277, x32_bit=0,
                     ioctl=29, clone=220, unshare=97, setns=268),
}
_CLONE_NEWUSER = 0x10000000
_TIOCSTI = 0x5412            # push a byte into the terminal's input: another process "types"
_TIOCLINUX = 0x541C          # the Linux console's subcommands (selection paste among them)
_ARCHES["amd64"] = _ARCHES["x86_64"]
_ARCHES["arm64"] = _ARCHES["aarch64"]


def current_arch() -> _Arch:
    """The syscall table of this process; ``FenceError`` where the fence has no filter for it."""
    if not sys.platform.startswith("linux"):
        raise FenceError(f"the fence needs Linux (this is {sys.platform})")
    machine = platform.machine().lower()
    arch = _ARCHES.get(machine)
    if arch is None or struct.calcsize("P") != 8 or sys.byteorder != "little":
        raise FenceError(f"no seccomp filter for this architecture ({machine}, {struct.calcsize('P') * 8}-bit)")
    return arch


# ── the seccomp filter (classic BPF) ─────────────────────────────────────────

_LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_RET_KILL_PROCESS = 0x80000000
_RET_USER_NOTIF = 0x7FC00000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_OFF_NR, _OFF_ARCH = 0, 4


def _off_arg(i: int) -> int:
    return 16 + 8 * i  # the low 32 bits of args[i] (little-endian); socket args are ints


_SOCK_TYPE_MASK = 0xF
_ALLOWED_FAMILIES = (socket.AF_INET, socket.AF_INET6, 16, 17)  # AF_NETLINK, AF_PACKET
_PAIRABLE = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


class _Asm:
    """A few classic-BPF instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_ABS_W, 0, 0, offset))

    def and_(self, k: int) -> None:
        self.code.append((_AND_K, 0, 0, k))

    def jeq(self, k: int, then: str | int = 0, otherwise: str | int = 0) -> None:
        self.code.append((_JEQ_K, then, otherwise, k))

    def jge(self, k: int, then: str | int = 0, otherwise: str | int = 0) -> None:
        self.code.append((_JGE_K, then, otherwise, k))

    def ret(self, k: int) -> None:
        self.code.append((_RET_K, 0, 0, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (op, jt, jf, k) in enumerate(self.code):
            offs = []
            for target in (jt, jf):
                if isinstance(target, str):
                    delta = self.labels[target] - pc - 1
                    if not 0 <= delta <= 255:
                        raise ValueError(f"jump to {target} out of range")
                    offs.append(delta)
                else:
                    offs.append(int(target))  # type: ignore[call-overload]
            out += struct.pack("=HBBI", op, offs[0], offs[1], k)
        return bytes(out)


def filter_program(arch: _Arch, *, mediate_unix: bool) -> bytes:
    """The BPF program, as ``struct sock_filter`` bytes (see the module docstring)."""
    a = _Asm()
    a.load(_OFF_ARCH)
    a.jeq(arch.audit, 0, "kill")
    a.load(_OFF_NR)
    if arch.x32_bit:
        a.jge(arch.x32_bit, "kill", 0)
    a.jeq(arch.socket, "socket", 0)
    a.jeq(arch.socketpair, "socketpair", 0)
    for nr in _IO_URING:
        a.jeq(nr, "enosys", 0)
    a.jeq(_CLONE3, "enosys", 0)        # its flags are in memory seccomp cannot read: libc falls back to clone
    a.jeq(arch.clone, "ns_flags", 0)
    a.jeq(arch.unshare, "ns_flags", 0)
    a.jeq(arch.setns, "eperm", 0)
    a.jeq(arch.ioctl, "ioctl", 0)
    if mediate_unix:
        a.jeq(arch.connect, "notify", 0)
    a.ret(_RET_ALLOW)

    # A new user namespace would hand CMD a full capability set inside it (CAP_NET_ADMIN,
    # CAP_NET_RAW, nf_tables: kernel attack surface); no other namespace can be made without
    # capabilities, which CMD has none of.
    a.label("ns_flags")
    a.load(_off_arg(0))
    a.and_(_CLONE_NEWUSER)
    a.jeq(_CLONE_NEWUSER, "eperm", "allow")

    # The terminal CMD shares with kodarelay (``--ask`` asks on it) cannot be typed into.
    # Only the low 32 bits are compared, as the kernel truncates the request to them.
    a.label("ioctl")
    a.load(_off_arg(1))
    a.jeq(_TIOCSTI, "eperm", 0)
    a.jeq(_TIOCLINUX, "eperm", "allow")

    a.label("socket")
    a.load(_off_arg(0))
    a.jeq(socket.AF_UNIX, "unix_socket", 0)
    for family in _ALLOWED_FAMILIES:
        a.jeq(family, "allow", 0)
    a.ret(_RET_ERRNO | errno.EAFNOSUPPORT)
    def allow_pairable_types() -> None:
        """Allow a stream / seqpacket type (argument 1); fall through for any other."""
        a.load(_off_arg(1))
        a.and_(_SOCK_TYPE_MASK)
        for kind in _PAIRABLE:
            a.jeq(kind, "allow", 0)

    a.label("unix_socket")
    if mediate_unix:
        allow_pairable_types()
    a.ret(_RET_ERRNO | errno.EPERM)

    a.label("socketpair")
    a.load(_off_arg(0))
    a.jeq(socket.AF_UNIX, 0, "allow")  # other families have no socketpair: the kernel refuses
    allow_pairable_types()
    a.ret(_RET_ERRNO | errno.EPERM)

    a.label("enosys")
    a.ret(_RET_ERRNO | errno.ENOSYS)
    a.label("eperm")
    a.ret(_RET_ERRNO | errno.EPERM)
    a.label("allow")
    a.ret(_RET_ALLOW)
    a.label("kill")
    a.ret(_RET_KILL_PROCESS)
    if mediate_unix:
        a.label("notify")
        a.ret(_RET_USER_NOTIF)
    return a.assemble()


# ── dropping privileges and installing the filter ────────────────────────────

_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each with its lock; KEEP_CAPS locked off.
_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
# With capabilities kept (below): NOROOT locked on; the setuid fixup locked *on* (a process that
# drops to another user loses them, as apt checks), KEEP_CAPS and NO_CAP_AMBIENT_RAISE locked off.
_SECUREBITS_KEEPING = 0x01 | 0x02 | 0x08 | 0x20 | 0x80
_PR_CAP_AMBIENT_RAISE = 2
#: What a fenced CMD keeps when kodarelay runs as root (ids mapped one to one): the file and
#: identity capabilities that package managers need to drop to their own users (apt's
#: ``_apt``) and to install files: CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, KILL,
#: SETGID, SETUID. None of them reaches the network (no NET_*, no SYS_ADMIN, no SETPCAP, no
#: SYS_PTRACE), the seccomp filter is the same, and they hold only inside CMD's user namespace.
KEPT_AS_ROOT = (1 << 8) - 1
_CAP_VERSION_3 = 0x20080522
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc_handle.syscall.restype = ctypes.c_long
    return _libc_handle


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise FenceError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63  # PR_CAPBSET_DROP of an unknown capability fails with EINVAL, skipped below


def drop_privileges(keep: int = 0) -> None:
    """Empty every capability set of this process for good but the ``keep`` mask (kept in the
    ambient set too, so that it survives ``exec``), and set ``no_new_privs``."""
    libc = _libc()
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    bits = _SECUREBITS_KEEPING if keep else _SECUREBITS
    _prctl(_PR_SET_SECUREBITS, bits, "prctl(PR_SET_SECUREBITS)")  # needs CAP_SETPCAP: before the drop
    for cap in range(_last_cap() + 1):
        if keep >> cap & 1:
            continue
        if libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) < 0:
            if ctypes.get_errno() == errno.EINVAL:
                break
            raise FenceError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(ctypes.get_errno())}")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    lo, hi = keep & 0xFFFFFFFF, keep >> 32
    data = struct.pack("=6I", lo, lo, lo, hi, hi, hi)  # {effective, permitted, inheritable} x 2
    _check(libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)), "capset")
    for cap in range(64):
        if keep >> cap & 1:
            _check(libc.prctl(_PR_CAP_AMBIENT, ctypes.c_ulong(_PR_CAP_AMBIENT_RAISE), ctypes.c_ulong(cap),
                              ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl(PR_CAP_AMBIENT_RAISE, {cap})")
    _verify_dropped(keep)


def _verify_dropped(keep: int = 0) -> None:
    """Read back what the kernel says, rather than trust the calls above."""
    try:
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError as e:
        raise FenceError(e.errno or errno.EIO, f"cannot verify the privilege drop: {e}") from None
    left = [k for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") if int(status.get(k, "1"), 16) & ~keep]
    if left or status.get("NoNewPrivs", "0").strip() != "1":
        raise FenceError(errno.EPERM, f"privileges left after the drop: {', '.join(left) or 'no_new_privs unset'}")


def install_filter(arch: _Arch, *, mediate_unix: bool) -> int | None:
    """Install the seccomp filter on this thread; with ``mediate_unix`` returns the notification fd."""
    program = filter_program(arch, mediate_unix=mediate_unix)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER if mediate_unix else 0
    fd = _check(
        _libc().syscall(ctypes.c_long(arch.seccomp), ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(flags), ctypes.byref(prog)),
        "seccomp(SECCOMP_SET_MODE_FILTER)",
    )
    return fd if mediate_unix else None


def apply(arch: _Arch, *, mediate_unix: bool, keep: int = 0) -> int | None:
    """Drop every privilege (but ``keep``), then install the filter; what CMD's process does
    right before exec."""
    drop_privileges(keep)
    return install_filter(arch, mediate_unix=mediate_unix)


# ── --allow-unix: connecting on CMD's behalf ─────────────────────────────────

# struct seccomp_notif: id u64, pid u32, flags u32, seccomp_data {nr i32, arch u32, ip u64, args[6] u64}
_NOTIF = struct.Struct("=QIIiIQ6Q")
_NOTIF_RESP = struct.Struct("=QqiI")  # id, val, error, flags
_IOC_RECV = 0xC0000000 | (_NOTIF.size << 16) | (0x21 << 8) | 0
_IOC_SEND = 0xC0000000 | (_NOTIF_RESP.size << 16) | (0x21 << 8) | 1
_IOC_ID_VALID = 0x40000000 | (8 << 16) | (0x21 << 8) | 2
_SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage)


def canonical_unix_path(path: str) -> str:
    """The form ``--allow-unix`` paths are kept and compared in: absolute, symlinks resolved."""
    return os.path.realpath(os.path.abspath(path))


#: Threads that answer CMD's connects (a slow one holds one thread, never the others).
GATE_WORKERS = 8
#: Connects waiting for a gate thread beyond which CMD gets EAGAIN at once.
GATE_QUEUE = 1024
#: How long one connect may take on CMD's behalf (a full backlog, a listener that never
#: accepts) before CMD gets ETIMEDOUT; a non-blocking CMD socket gets EINPROGRESS / EAGAIN.
CONNECT_DEADLINE = 10.0


class UnixGate:
    """Answers CMD's ``connect`` calls (seccomp user notifications): one thread receives them,
    ``GATE_WORKERS`` threads connect, each connect within ``CONNECT_DEADLINE``."""

    def __init__(self, listener: int, allowed: Iterable[str], workers: int = GATE_WORKERS,
                 deadline: float = CONNECT_DEADLINE) -> None:
        import queue

        self.listener = listener
        self.allowed = {canonical_unix_path(p) for p in allowed}
        self.deadline = deadline
        self._work: queue.Queue[tuple[int, ...]] = queue.Queue(GATE_QUEUE)
        self._workers = workers
        self._thread = threading.Thread(target=self._run, name="kodarelay-unix-gate", daemon=True)

    def start(self) -> UnixGate:
        for _ in range(self._workers):
            threading.Thread(target=self._serve, name="kodarelay-unix-gate-connect", daemon=True).start()
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            self._answer(self._work.get())

    def _refuse_now(self, notif: tuple[int, ...], error: int) -> None:
        resp = ctypes.create_string_buffer(_NOTIF_RESP.pack(notif[0], 0, -error, 0), _NOTIF_RESP.size)
        _libc().ioctl(self.listener, ctypes.c_ulong(_IOC_SEND), resp)

    def _run(self) -> None:
        libc = _libc()
        buf = ctypes.create_string_buffer(_NOTIF.size)
        while True:
            ctypes.memset(buf, 0, _NOTIF.size)
            if libc.ioctl(self.listener, ctypes.c_ulong(_IOC_RECV), buf) < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.ENOENT):  # ENOENT: the caller died meanwhile
                    continue
                log.debug("unix gate: stops: %s", os.strerror(err))
                return
            notif = _NOTIF.unpack(buf.raw)
            try:
                self._work.put_nowait(notif)
            except Exception:  # queue.Full: too many connects at once; CMD may retry
                self._refuse_now(notif, errno.EAGAIN)

    def _answer(self, notif: tuple[int, ...]) -> None:
        ident, tid = notif[0], notif[1]
        fd, addr_ptr, addr_len = notif[6], notif[7], notif[8] & 0xFFFFFFFF
        try:
            error = self._connect(ident, tid, ctypes.c_int(fd & 0xFFFFFFFF).value, addr_ptr, ctypes.c_int(addr_len).value)
        except Exception:  # never leave CMD hanging in connect()
            log.exception("unix gate: unexpected error")
            error = errno.EACCES
        resp = ctypes.create_string_buffer(_NOTIF_RESP.pack(ident, 0, -error, 0), _NOTIF_RESP.size)
        _libc().ioctl(self.listener, ctypes.c_ulong(_IOC_SEND), resp)  # ENOENT if CMD gave up: fine

    def _valid(self, ident: int) -> bool:
        return _libc().ioctl(self.listener, ctypes.c_ulong(_IOC_ID_VALID), ctypes.byref(ctypes.c_uint64(ident))) == 0

    def _connect(self, ident: int, tid: int, fd: int, addr_ptr: int, addr_len: int) -> int:
        """Do CMD's ``connect(fd, addr, addr_len)`` here if allowed; returns an errno (0: done)."""
        if not 0 <= addr_len <= _SOCKADDR_MAX:
            return errno.EINVAL
        try:
            with open(f"/proc/{tid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
            mem = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                addr = os.pread(mem, addr_len, addr_ptr) if addr_len else b""
            finally:
                os.close(mem)
            cwd = os.open(f"/proc/{tid}/cwd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (OSError, StopIteration, ValueError, OverflowError):
            return errno.EFAULT if self._valid(ident) else errno.ESRCH
        try:
            return self._connect_as(ident, tgid, fd, addr, addr_len, cwd)
        finally:
            os.close(cwd)

    def _connect_as(self, ident: int, tgid: int, fd: int, addr: bytes, addr_len: int, cwd: int) -> int:
        try:
            pidfd = os.pidfd_open(tgid)
        except OSError:
            return errno.EFAULT if self._valid(ident) else errno.ESRCH
        try:
            if not self._valid(ident):  # the pid was reused: the numbers above are not CMD's
                return errno.ESRCH
            dup = _libc().syscall(ctypes.c_long(_PIDFD_GETFD), pidfd, fd, 0)
            if dup < 0:
                return ctypes.get_errno()
        finally:
            os.close(pidfd)
        try:
            if len(addr) < addr_len:
                return errno.EFAULT
            try:
                family = _domain(dup)
            except OSError as e:
                return e.errno or errno.ENOTSOCK
            checked: int | None = None
            if family == socket.AF_UNIX:
                verdict = self._judge_unix(addr, cwd)
                if isinstance(verdict, int):
                    return verdict
                addr, checked = verdict
            try:
                return _connect_within(dup, addr, self.deadline)
            finally:
                if checked is not None:
                    os.close(checked)
        finally:
            os.close(dup)

    def _judge_unix(self, addr: bytes, cwd: int) -> tuple[bytes, int | None] | int:
        """For an allowed AF_UNIX ``addr``: the address to connect to and the ``O_PATH`` fd it
        names (the caller closes it); else the errno refusing it.

        The path is opened once (relative to CMD's working directory, symlinks followed by
        the kernel in that one step), the opened inode is what is checked, and the connect
        goes to that inode (``/proc/self/fd/N``): CMD swapping the path for a symlink to
        another socket between the check and the connect changes nothing."""
        if len(addr) <= 2 or struct.unpack_from("=H", addr)[0] != socket.AF_UNIX:
            return errno.EINVAL
        raw = addr[2:]
        if raw[:1] == b"\0":
            return addr, None  # abstract: per network namespace, so only the fence's own
        name = raw.split(b"\0", 1)[0]
        if not name:
            return errno.EINVAL
        try:
            opened = os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=cwd)
        except OSError as e:
            return e.errno or errno.ENOENT
        try:
            real = os.readlink(f"/proc/self/fd/{opened}")
            is_socket = stat.S_ISSOCK(os.fstat(opened).st_mode)
        except OSError as e:
            os.close(opened)
            return e.errno or errno.EACCES
        if real not in self.allowed:
            os.close(opened)
            log.info("refused a Unix socket connection (not named by --allow-unix)")
            return errno.EACCES
        if not is_socket:
            os.close(opened)
            return errno.ECONNREFUSED
        return struct.pack("=H", socket.AF_UNIX) + f"/proc/self/fd/{opened}".encode() + b"\0", opened


def _connect_within(fd: int, addr: bytes, deadline: float) -> int:
    """``connect(fd, addr)`` for CMD, as CMD's socket would behave, but never longer than
    ``deadline`` seconds: a blocking socket is connected non-blocking here and waited for
    (ETIMEDOUT past the deadline; a full Unix backlog is retried), a non-blocking one gets
    the kernel's immediate answer. The socket's flags are restored. Returns an errno, 0 when
    connected."""
    import fcntl
    import select
    import time

    libc = _libc()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_NONBLOCK:
        return 0 if libc.connect(fd, ctypes.c_char_p(addr), len(addr)) == 0 else ctypes.get_errno()
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        until = time.monotonic() + deadline
        pause = 0.005
        while True:
            if libc.connect(fd, ctypes.c_char_p(addr), len(addr)) == 0:
                return 0
            err = ctypes.get_errno()
            left = until - time.monotonic()
            if err == errno.EINTR:
                continue
            if err in (errno.EINPROGRESS, errno.EALREADY):
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                if not poller.poll(max(0, int(left * 1000))):
                    return errno.ETIMEDOUT
                value = ctypes.c_int(0)
                size = ctypes.c_uint32(ctypes.sizeof(value))
                libc.getsockopt(fd, socket.SOL_SOCKET, socket.SO_ERROR, ctypes.byref(value), ctypes.byref(size))
                return value.value
            if err == errno.EAGAIN:        # a Unix listener's backlog is full: retry until the deadline
                if left <= 0:
                    return errno.ETIMEDOUT
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)
                continue
            return err
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _domain(fd: int) -> int:
    """SO_DOMAIN of ``fd`` (the family the socket really has, not the one CMD claims)."""
    value = ctypes.c_int(0)
    size = ctypes.c_uint32(ctypes.sizeof(value))
    if _libc().getsockopt(fd, socket.SOL_SOCKET, 39, ctypes.byref(value), ctypes.byref(size)) < 0:  # SO_DOMAIN
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return value.value

"""UDS bridge: a Unix-domain socket that forwards each connection to the proxy's TCP port.

A program isolated in its own network namespace cannot reach the host's 127.0.0.1, but a
Unix socket is a file and crosses namespaces. The built-in proxy listens on TCP; this
bridge listens on a socket file and relays every connection to ``127.0.0.1:tcp_port``.
``rewrite_proxy_url_port`` re-points a proxy URL at the port of the in-namespace end.

Decisions worth knowing:

* The socket file is created with mode 0600 (``mode=`` widens it): only the owning user
  (and root) can connect. It is bound inside a private 0700 directory and renamed into
  place, so there is no window in which it exists with looser permissions.
* A stale *socket* at the path is replaced; anything else there (a regular file, a
  directory) is refused with ``FileExistsError`` rather than deleted.
* ``UdsBridge.close()`` is synchronous and idempotent. On the bridge's own loop thread it
  takes effect at once; from another thread it unlinks the path at once and hands the rest
  to the loop (``call_soon_threadsafe``); with the loop stopped or closed it closes the
  sockets itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import tempfile
import threading

from ._aio import accept_forever
from .relay import DEFAULT_IDLE_TIMEOUT, DEFAULT_TOTAL_TIMEOUT, relay_with_timeouts

log = logging.getLogger(__name__)

#: Longest AF_UNIX path Linux accepts (``sun_path`` is 108 bytes including the NUL).
MAX_UDS_PATH_BYTES = 107

#: Pause after an accept error that may persist (EMFILE, ENOBUFS, ...; ``_aio.accept_forever``).
_ACCEPT_BACKOFF = 0.1


def _check_path_length(path: str) -> None:
    if len(os.fsencode(path)) > MAX_UDS_PATH_BYTES:
        raise ValueError(
            f"UDS path is {len(os.fsencode(path))} bytes, over the {MAX_UDS_PATH_BYTES}-byte "
            f"AF_UNIX limit: {path!r} (set TMPDIR to a shorter directory)"
        )


def proxy_uds_path(pid: int, port: int) -> str:
    """The bridge socket path for proxy ``port`` of process ``pid``: ``<tmp>/kodarelay-<pid>-<port>.sock``.

    Both numbers are in the name so concurrent proxies and processes never collide.
    ``ValueError`` if the path would exceed the AF_UNIX limit (a long ``TMPDIR``).
    """
    for name, value, hi in (("pid", pid, 2**63), ("port", port, 65536)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < hi:
            raise ValueError(f"{name} must be a non-negative int below {hi}, not {value!r}")
    path = os.path.join(tempfile.gettempdir(), f"kodarelay-{pid}-{port}.sock")
    _check_path_length(path)
    return path


def cleanup_uds_path(path: str | os.PathLike[str]) -> None:
    """Unlink ``path``; a missing file is fine, other failures are logged, never raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove UDS path %s: %s", os.fspath(path), e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def sweep_stale_uds_paths(directory: str | None = None) -> list[str]:
    """Remove bridge sockets left by kodarelay processes that died without cleaning up.

    Only files named like ``proxy_uds_path`` makes them, that are sockets owned by this
    user and whose pid is no longer alive, are unlinked. Returns the removed paths.
    """
    directory = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        parts = name[: -len(".sock")].split("-") if name.startswith("kodarelay-") and name.endswith(".sock") else []
        if len(parts) != 3 or not parts[1].isdigit() or not _valid_port(parts[2]):
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
            cleanup_uds_path(path)
            removed.append(path)
    if removed:
        log.info("removed %d stale UDS bridge socket(s) of dead processes", len(removed))
    return removed


def _refuse_non_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; refusing to replace it", path)
    log.debug("replacing stale UDS socket %s", path)


def _bind_private(path: str, mode: int) -> tuple[socket.socket, os.stat_result]:
    """A listening AF_UNIX socket at ``path`` that never existed with permissions wider than ``mode``."""
    parent = os.path.dirname(path) or "."
    private = tempfile.mkdtemp(prefix=".kr", dir=parent)  # mode 0700
    tmp_path = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _check_path_length(tmp_path)
        sock.bind(tmp_path)
        os.chmod(tmp_path, mode)
        _refuse_non_socket(path)
        os.rename(tmp_path, path)  # atomically replaces a stale socket
        st = os.lstat(path)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        cleanup_uds_path(tmp_path)
        raise
    finally:
        try:
            os.rmdir(private)
        except OSError:
            pass
    return sock, st


class UdsBridge:
    """A running UDS→TCP bridge: ``path``, ``tcp_port`` and ``close()``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        path: str,
        ident: tuple[int, int],
        tcp_port: int,
        *,
        idle_timeout: float,
        total_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.path = path
        self.tcp_port = tcp_port
        self._loop = loop
        self._listener = listener
        self._ident = ident
        self._idle = idle_timeout
        self._total = total_timeout
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._closed = False
        # Strong references: the loop keeps only weak ones to tasks.
        self._conns: dict[asyncio.Task[None], list[socket.socket]] = {}
        self._accept_task: asyncio.Task[None] = loop.create_task(self._accept_loop())
        self._accept_task.add_done_callback(lambda _t: listener.close())

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    @property
    def active_connections(self) -> int:
        """Connections being forwarded right now."""
        return len(self._conns)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<UdsBridge {self.path} -> 127.0.0.1:{self.tcp_port} {state}>"

    async def _accept_loop(self) -> None:
        await accept_forever(self._listener, self._accepted, what=f"UDS bridge {self.path}", log=log,
                             backoff=_ACCEPT_BACKOFF, closed=lambda: self._closed)

    def _accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        socks = [conn]
        task = self._loop.create_task(self._forward(conn, socks))
        self._conns[task] = socks
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        # Also covers a task cancelled before it ever ran: its sockets still get closed.
        for s in self._conns.pop(task, ()):
            s.close()
        if not task.cancelled() and task.exception() is not None:
            log.debug("UDS bridge %s: connection ended with %r", self.path, task.exception())

    async def _forward(self, conn: socket.socket, socks: list[socket.socket]) -> None:
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            conn.close()
            log.debug("UDS bridge %s: no socket for the TCP side: %s", self.path, e)
            return
        socks.append(upstream)
        try:
            upstream.setblocking(False)
            await asyncio.wait_for(
                self._loop.sock_connect(upstream, ("127.0.0.1", self.tcp_port)), self._connect_timeout
            )
        except BaseException as e:
            conn.close()
            upstream.close()
            if isinstance(e, (OSError, asyncio.TimeoutError)):
                log.debug("UDS bridge %s: connect to 127.0.0.1:%d failed: %s", self.path, self.tcp_port, e)
                return
            raise
        try:
            await relay_with_timeouts(conn, upstream, self._idle, self._total)
        except (OSError, TimeoutError, asyncio.TimeoutError) as e:
            log.debug("UDS bridge %s: relay ended: %s", self.path, e)

    def _unlink_own_path(self) -> None:
        """Unlink ``path`` only if it is still the socket this bridge bound."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("UDS bridge: cannot stat %s: %s", self.path, e)
            return
        if (st.st_dev, st.st_ino) == self._ident:
            cleanup_uds_path(self.path)
        else:
            log.debug("UDS bridge: %s was replaced by someone else; leaving it", self.path)

    def _shut_sockets(self) -> None:
        for socks in list(self._conns.values()):
            for s in socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # peers see EOF now; the task closes the fd
                except OSError:
                    pass

    def _close_on_loop(self) -> None:
        # The listener itself is closed by the accept task's done callback, after asyncio has
        # unregistered its fd (closing it first could let a reused fd lose its reader).
        self._accept_task.cancel()
        self._shut_sockets()
        for task in list(self._conns):
            task.cancel()

    def _close_without_loop(self) -> None:
        if self._loop.is_closed():
            # No selector any more: nothing is registered, close everything now.
            self._listener.close()
            for socks in list(self._conns.values()):
                for s in socks:
                    s.close()
            self._conns.clear()
            return
        # Loop stopped but alive: unregister and close the listener, and leave cancelled
        # tasks to finish (and close their sockets) if the loop ever runs again.
        try:
            self._loop.remove_reader(self._listener.fileno())
        except (ValueError, OSError):
            pass
        self._listener.close()
        self._shut_sockets()
        self._accept_task.cancel()
        for task in list(self._conns):
            task.cancel()

    def close(self) -> None:
        """Stop accepting, close the listener and live connections, unlink the path. Idempotent.

        Thread-safe: from a thread other than the loop's, the path is unlinked at once and the
        sockets close on the loop's next iteration.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._unlink_own_path()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._close_on_loop()
        elif not self._loop.is_closed() and self._loop.is_running():
            try:
                self._loop.call_soon_threadsafe(self._close_on_loop)
            except RuntimeError:  # closed in between
                self._close_without_loop()
        else:
            self._close_without_loop()
        log.debug("UDS bridge %s closed", self.path)

    async def wait_closed(self) -> None:
        """After ``close()``: wait until the accept loop and every forwarded connection ended."""
        tasks = [self._accept_task, *self._conns]
        await asyncio.gather(*tasks, return_exceptions=True)


async def spawn_uds_bridge(
    path: str | os.PathLike[str],
    tcp_port: int,
    *,
    mode: int = 0o600,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
    connect_timeout: float = 10.0,
) -> UdsBridge:
    """Listen on the socket file ``path`` and forward every connection to ``127.0.0.1:tcp_port``.

    Serves on the running loop until ``close()``. A stale socket at ``path`` is replaced;
    a non-socket there raises ``FileExistsError``; a path over the AF_UNIX limit raises
    ``ValueError``. Forwarded connections get the relay's idle / total caps.
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {path!r}")
    if isinstance(tcp_port, bool) or not isinstance(tcp_port, int) or not 0 < tcp_port < 65536:
        raise ValueError(f"tcp_port must be in 1..65535, not {tcp_port!r}")
    _check_path_length(path)
    loop = asyncio.get_running_loop()
    listener, st = _bind_private(path, mode)
    bridge = UdsBridge(
        loop,
        listener,
        path,
        (st.st_dev, st.st_ino),
        tcp_port,
        idle_timeout=idle_timeout,
        total_timeout=total_timeout,
        connect_timeout=connect_timeout,
    )
    log.debug("UDS bridge listening on %s -> 127.0.0.1:%d", path, tcp_port)
    return bridge


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def rewrite_proxy_url_port(url: str, new_port: int) -> str | None:
    """``url`` with its port replaced (or added) by ``new_port``; None if it is not a proxy URL.

    Keeps the scheme, userinfo, host (bracketed IPv6 included), path, query and fragment.
    None for no ``scheme://``, an empty or unbracketed-IPv6 host, a bad existing port, or
    whitespace / control characters.
    """
    if isinstance(new_port, bool) or not isinstance(new_port, int) or not 0 < new_port < 65536:
        raise ValueError(f"new_port must be in 1..65535, not {new_port!r}")
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not (scheme[0].isascii() and scheme[0].isalpha()):
        return None
    if not all(c.isascii() and (c.isalnum() or c in "+-.") for c in scheme):
        return None
    end = len(rest)
    for delim in "/?#":
        i = rest.find(delim)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):
        close = hostport.find("]")
        if close == -1:
            return None
        host, after = hostport[: close + 1], hostport[close + 1 :]
        if len(host) <= 2:
            return None
        if after:
            if not after.startswith(":"):
                return None
            port_text = after[1:]
        else:
            port_text = ""
    else:
        host, colon, port_text = hostport.partition(":")
        if ":" in port_text or "[" in host or "]" in host:
            return None
    if not host:
        return None
    if port_text and not _valid_port(port_text):
        return None
    return f"{scheme}://{userinfo}{at}{host}:{new_port}{tail}"

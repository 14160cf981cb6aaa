"""What the HTTP CONNECT and SOCKS5 servers share: the loopback listener, an accept loop
that survives fd exhaustion, tunnel bookkeeping, shutdown and the violation ring.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Any, Tuple, TypeVar

from . import relay
from ._aio import recv_within
from .dial import REP_NOT_ALLOWED, Dialer, Refusal, Resolver
from .filter import Filter
from .upstream import UpstreamConfig
from .violations import OnViolation, Violation, ViolationLog

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
BACKLOG = 1024
ACCEPT_BACKOFF = 0.05
_ACCEPT_RETRYABLE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPERM, errno.EPROTO}

S = TypeVar("S", bound="ProxyServer")


#: What a successful handshake hands to the relay: the connected upstream socket, bytes the
#: client sent after its request (for the upstream) and bytes the upstream sent after its
#: response (for the client).
Handoff = Tuple[socket.socket, bytes, bytes]


class HandshakeTimeout(Exception):
    """The client did not finish its handshake within ``handshake_timeout``."""


class ProxyServer:
    """Base of ``Server`` and ``Socks5Server``; subclasses implement ``_session``."""

    protocol = "tcp"

    def __init__(
        self,
        lsock: socket.socket,
        filter: Filter,
        *,
        upstream: UpstreamConfig | None = None,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = relay.DEFAULT_IDLE_TIMEOUT,
        total_timeout: float = relay.DEFAULT_TOTAL_TIMEOUT,
        resolver: Resolver | None = None,
        deny_private: bool = False,
        on_violation: OnViolation | None = None,
        violation_capacity: int = 1024,
    ) -> None:
        self._lsock = lsock
        self._loop = asyncio.get_running_loop()
        self.filter = filter
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        self.dialer = Dialer(filter, upstream or UpstreamConfig.direct(), resolver, connect_timeout, deny_private)
        self.violation_log = ViolationLog(violation_capacity, on_violation)
        self._port: int = lsock.getsockname()[1]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serve_task: asyncio.Task[Any] | None = None
        self._closed = False
        self._last_accept_error_log = 0.0

    @classmethod
    async def bind(cls: type[S], port: int | None = None, filter: Filter | None = None, **options: Any) -> S:
        """Listen on ``127.0.0.1:port`` (``None``: an ephemeral port, bound once, no race)."""
        if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
            raise ValueError(f"port out of range: {port!r}")
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((LISTEN_HOST, port or 0))
            lsock.listen(BACKLOG)
            lsock.setblocking(False)
            return cls(lsock, filter if filter is not None else Filter(), **options)
        except BaseException:
            lsock.close()
            raise

    @property
    def port(self) -> int:
        return self._port

    @property
    def upstream(self) -> UpstreamConfig:
        return self.dialer.upstream

    def with_upstream(self: S, cfg: UpstreamConfig) -> S:
        """Chain tunnels through ``cfg`` from now on; returns the server."""
        self.dialer.upstream = cfg
        return self

    def violations(self) -> list[Violation]:
        return self.violation_log.snapshot()

    @property
    def tunnel_count(self) -> int:
        """Connections being served right now (handshaking or relaying)."""
        return len(self._tasks)

    # ── accepting ────────────────────────────────────────────────────────────

    async def serve(self) -> None:
        """Accept and serve connections until ``close()``.

        An accept error (EMFILE, ENFILE, ...) never ends serving: the loop backs off
        briefly and keeps accepting, logging repeated errors at most once a second.
        """
        if self._serve_task is not None:
            raise RuntimeError("serve() is already running")
        self._serve_task = asyncio.current_task()
        try:
            while not self._closed:
                try:
                    conn, _addr = await self._loop.sock_accept(self._lsock)
                except OSError as e:
                    if self._closed:
                        break
                    if e.errno not in _ACCEPT_RETRYABLE:
                        log.error("accept on port %d failed: %s", self._port, e)
                    self._log_accept_error(e)
                    await asyncio.sleep(ACCEPT_BACKOFF)
                    continue
                self._spawn(conn)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        finally:
            self._serve_task = None

    def _log_accept_error(self, e: OSError) -> None:
        now = time.monotonic()
        if now - self._last_accept_error_log >= 1.0:
            self._last_accept_error_log = now
            log.warning("accept on port %d failed (%s); backing off and retrying", self._port, e)

    def _spawn(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        task = self._loop.create_task(self._run(conn))
        self._tasks.add(task)  # strong reference: asyncio holds tasks only weakly
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket) -> None:
        try:
            handoff = await self._session(conn)
            if handoff is not None:
                upstream, to_upstream, to_client = handoff
                del handoff
                if to_upstream or to_client:
                    await self._forward_early(conn, upstream, to_upstream, to_client)
                del to_upstream, to_client
                # The handshake's frames are gone now: an idle tunnel keeps this frame and
                # the relay's, nothing else.
                await relay.relay_with_timeouts(conn, upstream, self.idle_timeout, self.total_timeout)
        except asyncio.CancelledError:
            pass
        except TimeoutError as e:
            log.debug("tunnel ended: %s", e)
        except OSError as e:
            log.debug("connection error: %s", e)
        except Exception:
            log.exception("unexpected error serving a connection")
        finally:
            conn.close()

    async def _session(self, conn: socket.socket) -> Handoff | None:
        """Run the protocol handshake; return what the tunnel needs, or None when refused."""
        raise NotImplementedError

    # ── helpers for sessions ─────────────────────────────────────────────────

    async def recv_some(self, conn: socket.socket, deadline: float, n: int = 4096) -> bytes:
        """Read up to ``n`` bytes before the handshake ``deadline`` (loop time)."""
        remaining = deadline - self._loop.time()
        if remaining <= 0:
            raise HandshakeTimeout()
        try:
            return await recv_within(conn, n, remaining)
        except TimeoutError:
            raise HandshakeTimeout() from None

    async def send(self, conn: socket.socket, data: bytes) -> None:
        await self._loop.sock_sendall(conn, data)

    def record(self, protocol: str, host: str, port: int | None, reason: str) -> None:
        self.violation_log.record(protocol, host, port, reason)

    async def open_tunnel(self, protocol: str, host: str, port: int) -> tuple[socket.socket, bytes]:
        """Judge ``host:port`` and connect to it; returns the socket and bytes already received.

        Every refusal is recorded (policy refusals as violations, unreachable targets as a
        log line) and raised as ``Refusal``, which carries each protocol's reply.
        """
        try:
            decision = self.filter.explain(host, port)
            if not decision.allowed:
                raise Refusal(f"{host}:{port} is {decision.reason}", http_status=403, socks_rep=REP_NOT_ALLOWED,
                              reason=decision.reason)
            return await self.dialer.dial(host, port)
        except Refusal as r:
            if r.reason is not None:
                self.record(protocol, host, port, r.reason)
            else:
                log.info("%s tunnel to %s:%d failed: %s", protocol, host, port, r)
            raise

    async def _forward_early(
        self, client: socket.socket, upstream: socket.socket, to_upstream: bytes, to_client: bytes
    ) -> None:
        """Deliver bytes read during the handshake on either side before the relay starts."""
        try:
            if to_client:
                await self._loop.sock_sendall(client, to_client)
            if to_upstream:
                await self._loop.sock_sendall(upstream, to_upstream)
        except BaseException:
            upstream.close()
            raise

    # ── shutdown ─────────────────────────────────────────────────────────────

    def close(self) -> None:
        """Stop accepting, close the listener, and end every live tunnel.

        Must be called on the server's event loop thread (``BuiltInProxy`` handles
        cross-thread shutdown); tunnels finish closing on the loop's next iterations,
        ``await wait_closed()`` waits for that.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._lsock.fileno())
        except (ValueError, RuntimeError):
            pass
        self._lsock.close()
        if self._serve_task is not None:
            self._serve_task.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = list(self._tasks)
        if self._serve_task is not None:
            tasks.append(self._serve_task)
        if tasks:
            await asyncio.wait(tasks)

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self: S) -> S:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["ProxyServer", "Handoff", "HandshakeTimeout", "Refusal"]

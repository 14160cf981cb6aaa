"""What the HTTP CONNECT and SOCKS5 servers share: the loopback listener, an accept loop
that survives fd exhaustion, tunnel bookkeeping, shutdown and the violation ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
import os
from typing import Any, Awaitable, Callable, Iterator, Tuple, TypeVar

from . import relay
from ._aio import recv_within
from .dial import REP_GENERAL_FAILURE, REP_NOT_ALLOWED, Dialer, Refusal, Resolver
from .filter import Filter, canonical_host
from .upstream import UpstreamConfig, bypasses_proxy
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


def native_frontend_available() -> bool:
    """The compiled engine serves accept and handshakes (``KODARELAY_NO_NATIVE_FRONTEND`` turns it off)."""
    return hasattr(relay.impl, "native_listen") and not relay.env_flag("KODARELAY_NO_NATIVE_FRONTEND")


@contextlib.contextmanager
def _connection_ends(conn: socket.socket) -> Iterator[None]:
    """How every served connection ends: closed, its normal endings logged, never raised."""
    try:
        yield
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
        self._front: Any = None            # the engine's listener (compiled front-end)
        self._native: set[Any] = set()     # tunnels the engine dialled and relays
        self._fast_cache: dict[Any, Any] = {}  # see _dial_fast

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
        return len(self._tasks) + len(self._native)

    # ── accepting ────────────────────────────────────────────────────────────

    async def serve(self) -> None:
        """Accept and serve connections until ``close()``.

        An accept error (EMFILE, ENFILE, ...) never ends serving: the loop backs off
        briefly and keeps accepting, logging repeated errors at most once a second.
        """
        if self._serve_task is not None:
            raise RuntimeError("serve() is already running")
        self._serve_task = asyncio.current_task()
        if native_frontend_available():
            try:
                self._start_front()
                await self._loop.create_future()      # until close() cancels it
            except asyncio.CancelledError:
                if not self._closed:
                    raise
            finally:
                self._serve_task = None
                if self._front is not None:     # serving ends: the engine stops accepting
                    self._front.close()
                    self._front = None
            return
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

    # ── the compiled front-end ───────────────────────────────────────────────

    #: "http", "socks5" or "mux": what the engine reads before handing a connection over
    front_mode = "http"

    def _start_front(self) -> None:
        self._front = relay.impl.native_listen(  # type: ignore[attr-defined]
            self._lsock, self.front_mode, self.handshake_timeout, self._loop, self._on_batch, self._on_batch_direct
        )

    def _on_batch_direct(self, items: list[Any]) -> list[Any]:
        """Runs on the engine's completer thread, holding the GIL it took for the batch: the
        common case (a well-formed request for an allowed address, dialled directly) is dialled
        at once; everything else (refusals and their violations, names to resolve, chaining)
        goes to the event loop, which decides it from scratch. Side-effect free until dial."""
        rest = []
        for h in items:
            try:
                if self._closed or not self._dial_fast(h):
                    rest.append(h)
            except Exception:
                rest.append(h)
        return rest

    def _fast_target(self, h: Any) -> tuple[str, str, int, bytes, bytes] | None:
        """(protocol, host, port, early bytes, ok reply) of a well-formed request, else None."""
        return None

    def _dial_fast(self, h: Any) -> bool:
        target = self._fast_target(h)
        if target is None:
            return False
        protocol, host, port, early, ok = target
        dialer = self.dialer
        # Verdicts for IP literals depend on nothing but the policy: remember the allowed ones
        # for as long as the filter, upstream and guard are the same objects.
        policy = (self.filter, dialer.filter, dialer.upstream, dialer.deny_private)
        cache = self._fast_cache
        if cache.get(None) != policy:
            cache.clear()
            cache[None] = policy
        name = cache.get((host, port))
        if name is None:
            if not self.filter.explain(host, port).allowed:
                return False
            canon = canonical_host(host)
            if not isinstance(canon, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                return False
            name = str(canon)
            if not dialer.upstream.is_direct and not bypasses_proxy(name, dialer.upstream.no_proxy):
                return False
            if not self.filter.check_resolved(canon, port, [name], deny_private=dialer.deny_private).allowed:
                return False
            if len(cache) > 1024:
                cache.clear()
            cache[(host, port)] = name
        try:
            self._dial_native(h, protocol, host, port, [name], early, ok)
        except ValueError:
            return False
        return True

    def _dial_native(self, h: Any, protocol: str, host: str, port: int, addresses: list[str], early: bytes,
                     ok: bytes) -> None:
        """``h.dial`` and track the tunnel; its end is reported on the engine's completer thread
        (no event-loop wakeup per tunnel). Safe on either thread."""
        native = self._native

        def done(e: BaseException | None) -> None:
            native.discard(tunnel)
            if isinstance(e, relay.impl.DialError):  # type: ignore[attr-defined]
                log.info("%s tunnel to %s:%d failed: %s", protocol, host, port, e)
            elif e is not None:
                log.debug("tunnel ended: %s", e)

        tunnel = h.dial(addresses, port, ok, early, self.dialer.connect_timeout, self.idle_timeout,
                        self.total_timeout, protocol == "socks5", self._loop, done)
        native.add(tunnel)
        if self._closed:                # close() ran meanwhile (on the loop thread)
            tunnel.abort()
            native.discard(tunnel)

    def _on_batch(self, items: list[Any], err: int) -> None:
        """One batch of handshakes the engine read (and maybe an accept error)."""
        if err == -1:                       # the engine was shut down under us: start again
            if not self._closed and self._serve_task is not None:
                self._start_front()
        elif err and not self._closed:
            e = OSError(err, os.strerror(err))
            if err not in _ACCEPT_RETRYABLE:
                log.error("accept on port %d failed: %s", self._port, e)
            self._log_accept_error(e)
        for h in items:
            if self._closed:
                h.close()
                continue
            try:
                self._decide(h)
            except Exception:
                log.exception("unexpected error serving a connection")
                h.close()

    def _decide(self, h: Any) -> None:
        """Answer one native handshake: ``h.dial``, ``h.reply_and_close`` or the asyncio path."""
        raise NotImplementedError

    def refusal_bytes(self, protocol: str, r: Refusal, host: str = "", port: int | None = None) -> bytes:
        if protocol == "socks5":
            from .socks5 import reply_bytes

            return reply_bytes(r.socks_rep or REP_GENERAL_FAILURE)
        from .server import refusal_reply

        return refusal_reply(r.http_status, r.reason, host, port)

    def _refuse(self, protocol: str, h: Any, host: str, port: int, r: Refusal) -> None:
        if r.reason is not None:
            self.record(protocol, host, port, r.reason)
        else:
            log.info("%s tunnel to %s:%d failed: %s", protocol, host, port, r)
        h.reply_and_close(self.refusal_bytes(protocol, r, host, port))

    def native_open(self, protocol: str, h: Any, host: str, port: int, early: bytes, ok: bytes) -> None:
        """``open_tunnel`` for a native handshake: judge now; dial in the engine when the target
        is an address (or after resolving it); chained tunnels take the asyncio path."""
        decision = self.filter.explain(host, port)
        if not decision.allowed:
            r = Refusal(f"{host}:{port} is {decision.reason}", http_status=403, socks_rep=REP_NOT_ALLOWED,
                        reason=decision.reason)
            self._refuse(protocol, h, host, port, r)
            return
        dialer = self.dialer
        canon = canonical_host(host)
        name = str(canon)
        chained = not dialer.upstream.is_direct and not bypasses_proxy(name, dialer.upstream.no_proxy)
        if chained or not isinstance(canon, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            self._track(self._loop.create_task(self._native_slow(protocol, h, host, port, early, ok, chained)))
            return
        self._native_dial(protocol, h, host, port, [name], early, ok)

    def _native_dial(self, protocol: str, h: Any, host: str, port: int, addresses: list[str], early: bytes,
                     ok: bytes) -> None:
        canon = canonical_host(host)
        decision = self.filter.check_resolved(canon, port, addresses, deny_private=self.dialer.deny_private)
        if not decision.allowed:
            r = Refusal(f"{canon} resolves to a refused address", http_status=403, socks_rep=REP_NOT_ALLOWED,
                        reason=decision.reason)
            self._refuse(protocol, h, host, port, r)
            return
        try:
            self._dial_native(h, protocol, host, port, addresses, early, ok)
        except ValueError:              # an address the engine cannot take (scoped IPv6 ...)
            self._track(self._loop.create_task(self._run_detached(protocol, h, host, port, early, ok)))

    async def _native_slow(self, protocol: str, h: Any, host: str, port: int, early: bytes, ok: bytes,
                           chained: bool) -> None:
        try:
            if chained:
                await self._run_detached(protocol, h, host, port, early, ok)
                return
            name = str(canonical_host(host))
            try:
                addresses = await self.dialer.resolve(name, port)
            except Refusal as r:
                self._refuse(protocol, h, host, port, r)
                return
            if not self._closed:
                self._native_dial(protocol, h, host, port, addresses, early, ok)
        finally:
            h.close()       # a no-op once answered

    async def _run_detached(self, protocol: str, h: Any, host: str, port: int, early: bytes, ok: bytes) -> None:
        """The asyncio path for a native handshake (upstream chaining)."""
        conn = socket.socket(fileno=h.detach())
        with _connection_ends(conn):
            conn.setblocking(False)
            try:
                upstream, from_upstream = await self.open_tunnel(protocol, host, port)
            except Refusal as r:
                try:
                    await self.send(conn, self.refusal_bytes(protocol, r, host, port))
                except OSError:
                    pass
                return
            try:
                await self.send(conn, ok)
                if early or from_upstream:
                    await self._forward_early(conn, upstream, early, from_upstream)
            except BaseException:
                upstream.close()
                raise
            await relay.relay_with_timeouts(conn, upstream, self.idle_timeout, self.total_timeout)

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a strong reference to ``task`` while it runs: asyncio holds tasks only weakly."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self._track(self._loop.create_task(self._run(conn)))

    async def _run(self, conn: socket.socket,
                   session: Callable[[socket.socket], Awaitable[Handoff | None]] | None = None) -> None:
        """Serve ``conn``: its session (``_session`` unless given), then the relay of its handoff."""
        with _connection_ends(conn):
            handoff = await (session or self._session)(conn)
            if handoff is not None:
                upstream, to_upstream, to_client = handoff
                del handoff
                if to_upstream or to_client:
                    await self._forward_early(conn, upstream, to_upstream, to_client)
                del to_upstream, to_client
                # The handshake's frames are gone now: an idle tunnel keeps this frame and
                # the relay's, nothing else.
                await relay.relay_with_timeouts(conn, upstream, self.idle_timeout, self.total_timeout)

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
        self._release_listener()
        if self._serve_task is not None:
            self._serve_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for tunnel in list(self._native):
            tunnel.abort()              # the engine closes both fds on its next iteration
            self._native.discard(tunnel)

    def _release_listener(self) -> None:
        """Close the listening socket now, the engine's copy of it included."""
        if self._front is not None:
            self._front.close()
            self._front = None
        try:
            # the engine closes its dup on its next iteration; SHUT_RD stops the listen at once
            self._lsock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self._lsock.close()

    async def wait_closed(self) -> None:
        tasks: list[Any] = list(self._tasks)
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

"""What the HTTP CONNECT and SOCKS5 servers share: the loopback listener, an accept loop
that survives fd exhaustion, tunnel bookkeeping, shutdown and the violation ring.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import os
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from . import relay
from ._aio import Throttle, accept_forever, recv_within
from .dial import REFUSE, REP_NOT_ALLOWED, Dialer, Plan, Refusal, Resolver
from .events import Decider, Event, EventStream, OnEvent, Request
from .filter import Filter
from .handshakes import (Handoff, Handover, HandshakeTimeout, Parsed, Protocol, Reject, Target, Ticket,
                         _connection_ends, native_frontend_available)
from .native_front import NativeFront
from .upstream import UpstreamConfig
from .violations import _printable, OnViolation, Violation, ViolationLog

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
BACKLOG = 1024
ACCEPT_BACKOFF = 0.05

S = TypeVar("S", bound="ProxyServer")


def default_max_handshakes() -> int:
    """A quarter of the fd limit (at least 64): dripping clients can never take every fd."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 65536
    return max(64, min(65536, soft // 4))


def _client_refusal(target: Target, e: Any, status: int) -> Plan:
    """A request refused for its client (``unauthenticated``: 407, a limit: 429) as a plan."""
    refusal = Refusal(e.detail, http_status=status, socks_rep=REP_NOT_ALLOWED, reason=e.reason, source="client",
                      detail=e.detail)
    return Plan(REFUSE, target.host, target.port, refusal, source="client", ttl=0)


def _literal_plan(plan: Plan) -> Plan:
    """A SOCKS5 address no rule names is refused as ``address_type`` (send the name)."""
    r = plan.refusal
    if plan.kind != REFUSE or r is None or r.reason != "not_allowed":
        return plan
    refusal = Refusal(f"{plan.host} sent as an address", http_status=403, socks_rep=0x08, reason="address_type",
                      source="default")
    return Plan(REFUSE, plan.host, plan.port, refusal, source="default")


def _refusal_detail(r: Refusal, host: str, port: int | None) -> str | None:
    """What a violation and its event say beyond the reason: for the guard, the address and
    the exact flag that would admit it."""
    if r.reason == "resolved_address" and r.address and r.detail:
        from .replies import _is_literal, admit_resolved

        literal = _is_literal(host)
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{r.detail}; {admit_resolved(shown, port, r.address, r.private, literal)}"
    return None


class ProxyServer(NativeFront):
    """Base of ``Server`` and ``Socks5Server``: serves parsed handshakes by executing plans.

    Subclasses supply ``_session`` (the asyncio handshake) and ``protocol_for`` (the
    ``Protocol`` of a handshake the engine read); everything after parsing is here, once.
    """

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
        dns_ttl: float = 30.0,
        decider: Decider | None = None,
        decider_timeout: float = 60.0,
        on_event: OnEvent | None = None,
        max_handshakes: int | None = None,
        inspect: Any = None,
        inspect_hosts: Iterable[str] = (),
        no_inspect: Iterable[str] = (),
        upstream_ca: str | os.PathLike[str] | None = None,
        secrets: Iterable[Any] = (),
        clients: Iterable[Any] = (),
        require_auth: bool = False,
        metrics: Any = None,
    ) -> None:
        if not isinstance(filter, Filter):
            raise TypeError(f"filter must be a kodarelay.Filter, not {type(filter).__name__}")
        from .clients import ClientBook
        from .inspection import Inspection
        from .secrets import SecretSet

        clients = list(clients)
        #: the named clients (``kodarelay.clients``); None: every request gets the global rules
        self.clients: ClientBook | None = ClientBook(clients, require_auth) if clients or require_auth else None
        self._client_dialers: dict[str, Dialer] = {}
        self._dialer_args = (resolver, connect_timeout, dns_ttl, decider, decider_timeout)

        #: the phantom secrets swapped on inspected requests (``kodarelay.secrets``); None: none
        self.secrets: SecretSet | None = SecretSet(list(secrets)) if secrets else None
        if self.secrets is not None and inspect is None:
            raise ValueError("secrets need inspect= (a kodarelay.CertificateAuthority): they are swapped only in "
                             "decrypted requests")
        #: what this server decrypts (``kodarelay.inspection``); None: nothing
        self.inspection: Inspection | None = None
        if inspect is not None or inspect_hosts or no_inspect or upstream_ca is not None:
            self.inspection = Inspection(inspect, inspect_hosts, no_inspect, upstream_ca, self.secrets)
            self.inspection.check(filter)
        self._lsock = lsock
        self._loop = asyncio.get_running_loop()
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        self.dialer = Dialer(filter, upstream or UpstreamConfig.direct(), resolver, connect_timeout, deny_private,
                             dns_ttl=dns_ttl, decider=decider, decider_timeout=decider_timeout)
        self.violation_log = ViolationLog(violation_capacity, on_violation)
        self._events = EventStream(on_event) if on_event is not None else None
        self._port: int = lsock.getsockname()[1]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serve_task: asyncio.Task[Any] | None = None
        self._closed = False
        self._accept_throttle = Throttle()
        self._front: Any = None            # the engine's listener (compiled front-end)
        #: tunnels the engine dialled and relays, each with what reports its end
        self._native: dict[Any, Callable[[BaseException | None, Any], None]] = {}
        self._announce_lock = threading.Lock()
        if max_handshakes is not None and max_handshakes < 1:
            raise ValueError(f"max_handshakes must be >= 1, not {max_handshakes!r}")
        #: connections still in their handshake, at most; at the bound the oldest are shed
        self.max_handshakes = max_handshakes if max_handshakes is not None else default_max_handshakes()
        self._handshaking: dict[asyncio.Task[Any], None] = {}     # oldest first
        self.dialer.on_policy_change.append(self._drop_engine_plans)
        self.dialer.on_policy_change.append(self._client_dialers.clear)
        from .metrics import Metrics

        #: the Prometheus counters (``metrics=(host, port)`` serves them); always kept
        self.metrics = Metrics(self)
        if metrics is not None:
            host, mport = metrics if isinstance(metrics, tuple) else ("127.0.0.1", int(metrics))
            self.metrics.serve(host, mport)

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

    # ── the policy (replaceable from any thread) ────────────────────────────

    @property
    def filter(self) -> Filter:
        return self.dialer.filter

    @filter.setter
    def filter(self, value: Filter) -> None:
        self.set_filter(value)

    def set_filter(self, filter: Filter) -> None:
        """Judge the next request by ``filter`` (any thread); cached decisions and remembered
        decider answers are dropped first, live tunnels keep running."""
        if not isinstance(filter, Filter):
            raise TypeError(f"filter must be a kodarelay.Filter, not {type(filter).__name__}")
        self.dialer.filter = filter

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
        """Connections being served right now (handshaking or relaying), those the engine
        opened from its cached plans included."""
        front = self._front
        return len(self._tasks) + len(self._native) + (front.plan_stats()["live"] if front is not None else 0)

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
                    if self.clients is not None:
                        self.clients.attach(None)
                    self._front.close()
                    self._front = None
            return
        try:
            await accept_forever(self._lsock, self._spawn, what=f"port {self._port}", log=log,
                                 backoff=ACCEPT_BACKOFF, closed=lambda: self._closed, shed=self._shed_oldest)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        finally:
            self._serve_task = None

    # ── judging: one plan per request, its violation and its events ─────────

    def protocol_for(self, h: Any) -> Protocol:
        """The protocol of a handshake the engine read."""
        raise NotImplementedError

    def _judged(self, proto: str, target: Target, plan: Plan, path: str | None = None,
                tunnel: Ticket | None = None, inspected: bool = False,
                secrets: tuple[str, ...] = ()) -> Ticket | None:
        """Record what ``plan`` means (a violation and a refuse event, or an allow event);
        returns the ticket of an allowed tunnel. Any thread. ``path``: a forwarded request's
        (never its query); ``tunnel``: the inspected tunnel a request came in."""
        method = target.method if path is not None else None
        if plan.kind == REFUSE:
            r = plan.refusal
            assert r is not None
            detail = _refusal_detail(r, plan.host, plan.port)
            self.record(proto, plan.host, plan.port, r.reason or "refused", target.client, detail, method=method,
                        path=path)
            self.emit(Event(time.time(), "refuse", proto, target.method, _printable(plan.host), plan.port,
                            target.client, r.reason, r.rule, r.source, tunnel.id if tunnel is not None else None,
                            detail=detail, path=path, inspected=inspected))
            self.metrics.judged(proto, target, r.reason or "refused")
            return None
        ticket = Ticket(proto, target.method, plan.host, plan.port, target.client, path, tunnel, inspected, secrets)
        if self.clients is not None:
            ticket.account = self.clients.get(target.client)     # (its slot was taken in _plan)
        self.metrics.judged(proto, target, None)
        self._allowed(ticket, plan)
        return ticket

    def _allowed(self, ticket: Ticket, plan: Plan) -> None:
        """The allow event of ``ticket``'s tunnel."""
        self.metrics.allowed(ticket)
        self.emit(Event(time.time(), "allow", ticket.protocol, ticket.method, ticket.host, ticket.port, ticket.client,
                        "allowed", plan.rule, plan.source, ticket.id, path=ticket.path, inspected=ticket.inspected,
                        secrets=ticket.secrets))

    def _reject(self, proto: str, parsed: Reject) -> None:
        """Record a handshake refused before any policy."""
        self.metrics.rejected(proto, parsed.client)
        if parsed.reason is not None:
            self.record(proto, parsed.host, parsed.port, parsed.reason, parsed.client)
            self.emit(Event(time.time(), "refuse", proto, "", _printable(parsed.host) if parsed.host else parsed.host, parsed.port,
                            parsed.client, parsed.reason, None, "default"))

    def _ended(self, ticket: Ticket | None, moved: tuple[int, int] | None, reason: str | None = None,
               detail: str | None = None) -> None:
        if ticket is None:
            return
        self.metrics.ended(ticket, moved)
        account, ticket.account = ticket.account, None
        if account is not None:
            account.closers.pop(ticket.id, None)
            if account.finish(moved[0] if moved is not None else 0, time.monotonic()):
                self._over_budget(account)
        if self._events is None:
            return
        up, down = moved if moved is not None else (None, None)
        self.emit(Event(time.time(), "end", ticket.protocol, ticket.method, ticket.host, ticket.port, ticket.client,
                        reason, None, None, ticket.id, up, down, time.monotonic() - ticket.start, detail,
                        path=ticket.path, inspected=ticket.inspected, status=ticket.status, secrets=ticket.secrets))

    def _unreachable(self, proto: str, target: Target, plan: Plan, r: Refusal, ticket: Ticket | None) -> None:
        """An allowed target that could not be reached (or an upstream that said no)."""
        if r.reason is not None:
            self.record(proto, plan.host, plan.port, r.reason, target.client, str(r))
        else:
            log.info("%s tunnel to %s:%d failed: %s", proto, plan.host, plan.port, r)
        self._ended(ticket, (0, 0), r.reason or "unreachable", str(r))

    def _over_budget(self, account: Any) -> None:
        """A client spent its upload budget: its open tunnels are closed (any thread)."""
        closers = list(account.closers.values())
        account.closers.clear()
        if closers:
            log.warning("client %s spent its upload budget: closing its %d open tunnel(s)",
                        account.policy.name, len(closers))
        for close in closers:
            try:
                self._loop.call_soon_threadsafe(close)
            except RuntimeError:
                pass                    # the loop is closed: so are the tunnels

    def _hold(self, ticket: Ticket) -> None:
        """A tunnel of a known client that the budget may have to close: this task's."""
        if ticket.account is not None:
            task = asyncio.current_task()
            if task is not None:
                ticket.account.closers[ticket.id] = task.cancel

    def emit(self, event: Event) -> None:
        if self._events is not None:
            self._events.emit(event)

    def record(self, protocol: str, host: str, port: int | None, reason: str, client: str | None = None,
               detail: str | None = None, when: float | None = None, method: str | None = None,
               path: str | None = None) -> None:
        self.violation_log.record(protocol, host, port, reason, client, detail, when, method, path)
        self.metrics.refused(client, reason)

    async def open_tunnel(self, protocol: str, host: str, port: int, *, method: str = "CONNECT",
                          client: str | None = None) -> tuple[socket.socket, bytes]:
        """Judge ``host:port`` and connect to it; returns the socket and bytes already received.

        Every refusal is recorded (policy refusals as violations, unreachable targets as a
        log line) and raised as ``Refusal``, which carries each protocol's reply.
        """
        target = Target(host, port, b"", method, client)
        plan = await self._plan(protocol, target)
        ticket = self._judged(protocol, target, plan)
        if plan.kind == REFUSE:
            assert plan.refusal is not None
            raise plan.refusal
        try:
            return await self.dialer.connect(plan)
        except Refusal as r:
            self._unreachable(protocol, target, plan, r, ticket)
            raise

    def dialer_for(self, client: str | None) -> Dialer:
        """The Dialer that judges ``client``'s requests: the global one, or one whose filter
        adds the client's own rules (``kodarelay.clients``), made on first use."""
        book = self.clients
        if book is None or client is None:
            return self.dialer
        c = book.get(client)
        if c is None or (not c.policy.allow and not c.policy.deny):
            return self.dialer
        d = self._client_dialers.get(client)
        if d is None:
            resolver, connect_timeout, dns_ttl, decider, decider_timeout = self._dialer_args
            d = Dialer(book.filter_for(c, self.dialer.filter), self.dialer.upstream, resolver, connect_timeout,
                       self.dialer.deny_private, dns_ttl=dns_ttl, decider=decider, decider_timeout=decider_timeout)
            self._client_dialers[client] = d
        return d

    def set_clients(self, clients: Iterable[Any], require_auth: bool | None = None) -> None:
        """Replace the client policies (live); open tunnels keep running, their counts kept."""
        from .clients import ClientBook

        clients = list(clients)
        if not clients and not (require_auth if require_auth is not None else
                                self.clients is not None and self.clients.require_auth):
            if self.clients is not None:
                self.clients.set([])
                self.clients.require_auth = False
                self.clients.push()
            self.clients = None          # nobody named: the global rules again
        elif self.clients is None:
            self.clients = ClientBook(clients, bool(require_auth))
            if self._front is not None:
                self.clients.attach(self._front)
        else:
            self.clients.set(clients)
            if require_auth is not None:
                self.clients.require_auth = require_auth
                self.clients.push()
        self._client_dialers.clear()
        self._drop_engine_plans()

    def _client_gate(self, target: Target) -> Plan | None:
        """A named client's credentials (``kodarelay.clients``): a 407 plan when they fail."""
        if self.clients is None:
            return None
        from .clients import ClientRefused

        try:
            self.clients.authenticate(target.client, target.token)
        except ClientRefused as e:
            return _client_refusal(target, e, 407)
        return None

    def _client_take(self, target: Target, plan: Plan) -> Plan:
        """An allowed plan of a known client takes a slot of its limits (given back when its
        ticket ends), or becomes a 429 plan."""
        if self.clients is not None and plan.kind != REFUSE:
            c = self.clients.get(target.client)
            if c is not None:
                from .clients import ClientRefused

                try:
                    c.take(time.monotonic())
                except ClientRefused as e:
                    return _client_refusal(target, e, 429)
        return plan

    def _untake(self, target: Target, plan: Plan) -> None:
        """Give back the slot ``_client_take`` took for a plan that is not carried out."""
        if self.clients is not None and plan.kind != REFUSE:
            c = self.clients.get(target.client)
            if c is not None:
                c.finish(0, time.monotonic())

    def _plan_known(self, target: Target) -> Plan | None:
        plan = self.dialer_for(target.client).plan_now(target.host, target.port)
        if plan is None:
            return None
        return self._tunnel_check(target, plan if not target.literal else _literal_plan(plan))

    def _plan_now(self, target: Target) -> Plan | None:
        """The plan for ``target`` if it is known at once (client gates included), else None."""
        started = time.monotonic()
        refused = self._client_gate(target)
        if refused is not None:
            return refused
        plan = self._plan_known(target)
        if plan is None:
            return None
        self.metrics.decided(time.monotonic() - started)
        return self._client_take(target, plan)

    async def _plan(self, protocol: str, target: Target) -> Plan:
        plan = self._plan_now(target)
        if plan is not None:
            return plan
        started = time.monotonic()
        plan = await self.dialer_for(target.client).plan(
            Request(protocol, target.method, target.host, target.port, target.client))
        if target.literal:
            plan = _literal_plan(plan)
        plan = self._tunnel_check(target, plan)
        self.metrics.decided(time.monotonic() - started)
        return self._client_take(target, plan)

    def _tunnel_check(self, target: Target, plan: Plan) -> Plan:
        """A tunnel (CONNECT, SOCKS5) to a host whose requests must be judged one by one
        (request rules name it) is refused ``needs_inspection``: its bytes would pass unread.
        Forwarded plain HTTP is judged per request instead. Such a refusal is never handed to
        the engine's cache as an allow (the plan is not the Dialer's)."""
        if plan.kind == REFUSE or target.method != "CONNECT":
            return plan
        flt = self.dialer_for(target.client).policy.filter
        if not flt.needs_inspection(plan.host, plan.port) or self._inspects(target, plan):
            return plan
        refusal = Refusal(f"{plan.host}:{plan.port} needs inspection", http_status=403, socks_rep=REP_NOT_ALLOWED,
                          reason="needs_inspection", rule=None, source="rule")
        return Plan(REFUSE, plan.host, plan.port, refusal, source="rule", ttl=0)

    def _inspects(self, target: Target, plan: Plan) -> bool:
        """Whether an allowed tunnel is decrypted and its requests judged (``kodarelay.inspection``)."""
        insp = self.inspection
        return (insp is not None and plan.kind != REFUSE and target.method == "CONNECT"
                and insp.wants(self.dialer_for(target.client).policy.filter, plan.host, plan.port))

    async def _inspect(self, conn: socket.socket, proto: Protocol, target: Target, plan: Plan,
                       ticket: Ticket) -> Handoff | None:
        """An allowed tunnel to an inspected host: answered as any other, then served
        request by request. It counts as a handshake (``max_handshakes`` sheds the oldest)
        until its first bytes were read and, for TLS, the client's handshake is done."""
        from .inspection import inspect_session

        self._hold(ticket)
        opened = await self._connect_plan(conn, proto, target, plan, ticket)
        if opened is None:
            return None
        return await inspect_session(self, conn, proto.name, plan, ticket, target.early, opened[0], opened[1],
                                     target.token)

    # ── the asyncio path ─────────────────────────────────────────────────────

    async def serve_parsed(self, conn: socket.socket, proto: Protocol, parsed: Parsed) -> Handoff | None:
        """Judge a parsed handshake, reply, and return what the relay needs (None: refused)."""
        if isinstance(parsed, Reject):
            self._reject(proto.name, parsed)
            if parsed.reply is not None:
                await self.send_quietly(conn, parsed.reply)
            return None
        if isinstance(parsed, Handover):
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            return await self.handover(conn, parsed)
        plan = await self._plan(proto.name, parsed)
        ticket = self._judged(proto.name, parsed, plan, inspected=self._inspects(parsed, plan))
        if ticket is None:
            assert plan.refusal is not None
            await self.send_quietly(conn, proto.refusal_reply(plan.refusal, plan.host, plan.port))
            return None
        if self._inspects(parsed, plan):
            return await self._inspect(conn, proto, parsed, plan, ticket)
        opened = await self._connect_plan(conn, proto, parsed, plan, ticket)
        if opened is None:
            return None
        return opened[0], parsed.early, opened[1], ticket

    async def _connect_plan(self, conn: socket.socket, proto: Protocol, target: Target, plan: Plan,
                            ticket: Ticket) -> tuple[socket.socket, bytes] | None:
        """Execute an allowed plan on the loop and send the client its answer."""
        try:
            upstream, from_upstream = await self.dialer.connect(plan)
        except Refusal as r:
            self._unreachable(proto.name, target, plan, r, ticket)
            await self.send_quietly(conn, proto.refusal_reply(r, plan.host, plan.port))
            return None
        try:
            await self.send(conn, proto.ok_reply)
        except BaseException:
            upstream.close()
            self._ended(ticket, (0, 0))
            raise
        return upstream, from_upstream

    def _spawn(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        while len(self._handshaking) >= self.max_handshakes:
            self._shed_oldest()
        task = self._loop.create_task(self._run(conn))
        self._handshaking[task] = None
        self._track(task)

    def _shed_oldest(self) -> bool:
        """End the oldest handshake still in progress (haproxy-style); False when none is."""
        for task in self._handshaking:
            del self._handshaking[task]
            task.cancel()
            log.debug("shed the oldest handshake (%d in progress)", len(self._handshaking) + 1)
            return True
        return False

    async def handover(self, conn: socket.socket, parsed: Handover) -> Handoff | None:
        """Serve a connection handed over by its protocol (``Server`` forwards plain HTTP)."""
        raise NotImplementedError

    async def connect_after_forward(self, conn: socket.socket, target: str, early: bytes,
                                    client: str | None, token: str | None = None) -> Handoff | None:
        """A CONNECT after forwarded requests on one connection (only ``Server`` forwards)."""
        raise NotImplementedError

    async def _run(self, conn: socket.socket,
                   session: Callable[[socket.socket], Awaitable[Handoff | None]] | None = None) -> None:
        """Serve ``conn``: its session (``_session`` unless given), then the relay of its handoff."""
        with _connection_ends(conn):
            try:
                handoff = await (session or self._session)(conn)
            finally:
                self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if handoff is not None:
                upstream, to_upstream, to_client, ticket = handoff
                del handoff
                await self._relay(conn, upstream, to_upstream, to_client, ticket)

    async def _relay(self, conn: socket.socket, upstream: socket.socket, to_upstream: bytes, to_client: bytes,
                     ticket: Ticket) -> None:
        moved = None
        self._hold(ticket)
        try:
            if to_upstream or to_client:
                await self._forward_early(conn, upstream, to_upstream, to_client)
            # The handshake's frames are gone now: an idle tunnel keeps this frame and
            # the relay's, nothing else.
            up, down = await relay.relay_with_timeouts(conn, upstream, self.idle_timeout, self.total_timeout)
            moved = (up + len(to_upstream), down + len(to_client))
        finally:
            self._ended(ticket, moved)

    async def _session(self, conn: socket.socket) -> Handoff | None:
        """Run the protocol handshake; return what the tunnel needs, or None when refused."""
        raise NotImplementedError

    # ── helpers ──────────────────────────────────────────────────────────────

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a strong reference to ``task`` while it runs: asyncio holds tasks only weakly."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def send_quietly(self, conn: socket.socket, data: bytes) -> None:
        """Send a final reply; a client that already left is not an error."""
        try:
            await self._loop.sock_sendall(conn, data)
        except OSError:
            pass

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
        self.metrics.close()
        try:
            self._loop.remove_reader(self._lsock.fileno())
        except (ValueError, RuntimeError):
            pass
        self._release_listener()
        if self._serve_task is not None:
            self._serve_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for tunnel, done in list(self._native.items()):
            tunnel.abort()              # the engine closes both fds on its next iteration
            done(None, tunnel)          # (an aborted tunnel's own callback never runs)

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
        """Close, wait for every tunnel, and deliver the events still queued."""
        self.close()
        await self.wait_closed()
        if self._events is not None:
            await self._loop.run_in_executor(None, self._events.close)

    async def __aenter__(self: S) -> S:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["ProxyServer", "Protocol", "Target", "Reject", "Handover", "Ticket", "Handoff", "HandshakeTimeout", "Refusal"]

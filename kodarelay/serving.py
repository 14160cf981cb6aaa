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
import threading
import os
import time
from typing import Any, Awaitable, Callable, Iterable, Iterator, NamedTuple, Optional, Tuple, TypeVar, Union

from . import relay
from ._aio import Throttle, accept_forever, log_accept_error, recv_within
from .dial import DIRECT, REFUSE, REP_NOT_ALLOWED, Dialer, Plan, Refusal, Resolver
from .events import Decider, Event, EventStream, OnEvent, Request, next_tunnel_id
from .filter import Filter
from .upstream import UpstreamConfig, connect_request
from .violations import _printable, OnViolation, Violation, ViolationLog

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
BACKLOG = 1024
ACCEPT_BACKOFF = 0.05
#: how a tunnel normally ends: the peer left (never worth more than a debug line)
_NORMAL_ENDS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}

S = TypeVar("S", bound="ProxyServer")


#: What a successful handshake hands to the relay: the connected upstream socket, bytes the
#: client sent after its request (for the upstream), bytes the upstream sent after its
#: response (for the client), and the tunnel's ticket (for its end event).
Handoff = Tuple[socket.socket, bytes, bytes, "Ticket"]


class Target(NamedTuple):
    """A handshake parsed into what the policy judges (host as the client sent it)."""

    host: str
    port: int
    early: bytes = b""
    method: str = "CONNECT"
    client: Optional[str] = None
    #: a SOCKS5 IPv4 / IPv6 address: only an IP / CIDR rule (or a decider) admits it, and
    #: without one the refusal is ``address_type`` (the client should send the name)
    literal: bool = False
    #: the SHA-256 (hex) of the password the client sent with its name, never the password
    token: Optional[str] = None


class Reject(NamedTuple):
    """A handshake refused before any policy (malformed, unsupported): its reply (None: close
    silently) and the violation to record (``reason`` None: none)."""

    reply: Optional[bytes]
    reason: Optional[str]
    host: str = ""
    port: Optional[int] = None
    client: Optional[str] = None


class Handover(NamedTuple):
    """A connection another session serves from here on (plain-HTTP forwarding): what was
    read of it so far."""

    data: bytes


Parsed = Union[Target, Reject, Handover]


class Protocol:
    """What a protocol module supplies: parsing a complete handshake and encoding replies."""

    name = "tcp"
    ok_reply = b""

    def parse(self, data: bytes) -> Parsed:
        raise NotImplementedError

    def parse_handshake(self, h: Any) -> Parsed:
        """``parse`` for a handshake the engine read."""
        return self.parse(h.data)

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        raise NotImplementedError


class Ticket:
    """An allowed tunnel, from its allow event to its end event."""

    __slots__ = ("id", "protocol", "method", "host", "port", "client", "start", "path", "inspected", "status",
                 "secrets", "account")

    def __init__(self, protocol: str, method: str, host: str, port: int, client: str | None,
                 path: str | None = None, tunnel: Ticket | None = None, inspected: bool = False,
                 secrets: tuple[str, ...] = ()) -> None:
        # a request inside an inspected tunnel shares that tunnel's id (SPEC: events for requests)
        self.id: int = tunnel.id if tunnel is not None else next_tunnel_id()
        self.protocol = protocol
        self.method = method
        self.host = host
        self.port = port
        self.client = client
        self.start = time.monotonic()
        self.path = path              # a forwarded request's path (never its query)
        self.inspected = inspected    # decrypted (the tunnel itself, or a request in one)
        self.status: int | None = None   # the origin's status, for a request's end event
        self.secrets = secrets        # the names of the secrets swapped into the request
        self.account: Any = None      # the known client whose limits hold a slot for it


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


def _refusal_detail(r: Refusal, host: str, port: int | None) -> str | None:
    """What a violation and its event say beyond the reason: for the guard, the address and
    the exact flag that would admit it."""
    if r.reason == "resolved_address" and r.address and r.detail:
        from .replies import _is_literal, admit_resolved

        literal = _is_literal(host)
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{r.detail}; {admit_resolved(shown, port, r.address, r.private, literal)}"
    return None


class HandshakeTimeout(Exception):
    """The client did not finish its handshake within ``handshake_timeout``."""


class ProxyServer:
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

    # ── the compiled front-end ───────────────────────────────────────────────

    #: "http", "socks5" or "mux": what the engine reads before handing a connection over
    front_mode = "http"

    def _start_front(self) -> None:
        self._front = relay.impl.native_listen(  # type: ignore[attr-defined]
            self._lsock, self.front_mode, self.handshake_timeout, self._loop, self._on_batch, self._on_batch_direct,
            self._engine_refused, self.dialer.connect_timeout, self.idle_timeout, self.total_timeout, self.max_handshakes,
        )
        self._front.clear_plans(self.dialer.policy.generation)     # plans carry the policy's generation
        if self.clients is not None:
            self.clients.attach(self._front)    # one set of client counters, the engine's

    # The engine keeps its own copy of the plans Python decided, per (protocol, host as the
    # client sent it, port), and serves those requests without the GIL: answered, dialled,
    # chained and relayed, or refused (its refusals come back in batches, ``_engine_refused``).
    # It holds a plan exactly as long as the Dialer's cache does (``Dialer.cached_for``) and
    # loses all of them on every policy change (``_drop_engine_plans``). Not cached in the
    # engine: plans the Dialer does not cache (a decider's one-off answer, a failed lookup),
    # SOCKS5 address-type requests, chaining to an upstream named by a hostname, and every
    # plan while ``on_event`` is set (events are per request: allow, refuse, end).

    def _engine_generation(self) -> int | None:
        """The generation a plan about to be decided is stored under: the policy's own (it
        never restarts, so a plan decided under an old policy is never stored in the cache
        of a listener made after an engine restart)."""
        return self.dialer.policy.generation if self._front is not None else None

    def _drop_engine_plans(self) -> None:
        """A policy change (any thread): the engine forgets every plan before it returns,
        and from then on stores only plans decided under the new policy."""
        front = self._front
        if front is not None:
            front.clear_plans(self.dialer.policy.generation)

    def _engine_plan(self, h: Any, proto: Protocol, target: Target, plan: Plan, gen: int | None) -> None:
        """Give the engine ``plan`` for the next requests to the same key (see above)."""
        front = self._front
        if front is None or gen is None or self._events is not None or target.literal or target.method != "CONNECT":
            return
        if plan.source == "client":
            return                      # a client's 407 / 429 is never cached
        if self.metrics.port is not None and target.client is not None and \
                (self.clients is None or self.clients.get(target.client) is None):
            return                      # the engine counts by known client only: Python counts this one
        inspect: tuple[Any, ...] = ()
        if self.inspection is not None and plan.kind != REFUSE and self._inspects(target, plan):
            insp_spec = self.inspection.engine_spec(self, target, plan) if not self.secrets else None
            if insp_spec is None:
                return                  # (with secrets: a value read from a file may change)
            inspect = (insp_spec,)      # the engine decrypts it
        ttl = self.dialer_for(target.client).cached_for(target.host, target.port, plan)
        if ttl == 0:
            return
        if plan.kind == REFUSE:
            assert plan.refusal is not None
            spec: tuple[Any, ...] = ("refuse", proto.refusal_reply(plan.refusal, plan.host, plan.port),
                                     plan.refusal.reason or "refused")
        elif plan.kind == DIRECT:
            spec = ("direct", list(plan.addresses), proto.ok_reply, *inspect)
        else:
            up = plan.upstream
            assert up is not None
            try:
                ip = ipaddress.ip_address((up.host or "").strip("[]"))
            except ValueError:
                return                  # an upstream named by a hostname: the asyncio path resolves it
            spec = ("chain", str(ip), up.port, connect_request(up, plan.host, plan.port), proto.ok_reply)
        client = None
        if target.client is not None:
            if self.clients is None or not target.client.isascii():
                return                  # attribution alone: Python records the name
            client = target.client.encode("ascii")
        try:
            front.set_plan(h.proto, target.host.encode("utf-8"), target.port, spec,
                           float("inf") if ttl is None else ttl, gen, plan.host, client)
        except (ValueError, UnicodeError):
            pass                        # an address the engine cannot take (scoped IPv6 ...)

    def _engine_refused(self, records: list[tuple[Any, ...]], dropped: int) -> None:
        """Refusals the engine served from cached plans, in order (on the engine's completer
        thread): recorded like every other refusal."""
        for rec in records:
            when, proto, host, port, reason, status, client = rec[:7]
            if len(rec) > 7:            # a request an inspected tunnel refused (kodarelay/_inspect.c)
                method, path, detail = rec[7:]
                self.record("socks5" if proto == 1 else "http", host.decode("utf-8", "backslashreplace"),
                            port if port else None, reason, client, detail, when=when, method=method or None,
                            path=path)
                continue
            if reason == "!budget":     # a client spent its upload budget in the engine
                account = self.clients.get(client) if self.clients is not None else None
                if account is not None:
                    self._over_budget(account)
                continue
            self.metrics.rejected("socks5" if proto == 1 else "http", client)
            detail = f"upstream refused ({status})" if status else None
            self.record("socks5" if proto == 1 else "http", host.decode("utf-8", "backslashreplace"),
                        port if port else None, reason, client, detail, when=when)
        if dropped:
            self.violation_log.count_unrecorded(dropped)
            log.warning("%d refusals on port %d were counted but not recorded in detail: they came faster "
                        "than they could be", dropped, self._port)

    def _on_batch_direct(self, items: list[Any]) -> list[Any]:
        """Runs on the engine's completer thread, holding the GIL it took for the batch: each
        handshake is parsed once, and a request whose plan is known at once and direct is
        dialled here (and its plan handed to the engine); the rest goes to the event loop with
        its parse."""
        rest: list[Any] = []
        for h in items:
            try:
                proto = self.protocol_for(h)
                parsed = proto.parse_handshake(h)
                if isinstance(parsed, Target) and not self._closed:
                    gen = self._engine_generation()
                    plan = self._plan_now(parsed)
                    if plan is not None and plan.kind == DIRECT and not self._inspects(parsed, plan):
                        # the engine has the plan before the client has its answer (a client
                        # that asks again at once must find it)
                        self._engine_plan(h, proto, parsed, plan, gen)
                        if self._dial_native(h, proto, parsed, plan):
                            continue
                    if plan is not None:
                        self._untake(parsed, plan)      # planned again on the loop
                rest.append((h, proto, parsed))
            except Exception:
                rest.append(h)
        return rest

    def _on_batch(self, items: list[Any], err: int) -> None:
        """One batch of handshakes the engine read (and maybe an accept error)."""
        if err == -1:                       # the engine was shut down under us: start again
            if not self._closed and self._serve_task is not None:
                self._start_front()
        elif err and not self._closed:
            log_accept_error(log, self._accept_throttle, f"port {self._port}", OSError(err, os.strerror(err)))
            if err in (errno.EMFILE, errno.ENFILE):
                self._shed_oldest()         # a client waiting on its decider / lookup frees an fd
        for item in items:
            h, proto, parsed = item if isinstance(item, tuple) else (item, None, None)
            if self._closed:
                h.close()
                continue
            try:
                if proto is None:
                    proto = self.protocol_for(h)
                    parsed = proto.parse_handshake(h)
                self._serve_native(h, proto, parsed)
            except Exception:
                log.exception("unexpected error serving a connection")
                h.close()

    def _serve_native(self, h: Any, proto: Protocol, parsed: Parsed) -> None:
        if isinstance(parsed, Reject):
            self._reject(proto.name, parsed)
            if parsed.reply is not None:
                h.reply_and_close(parsed.reply)
            else:
                h.close()
            return
        if isinstance(parsed, Handover) and self._forward_native(h, proto, parsed):
            return
        if isinstance(parsed, Handover):
            conn = socket.socket(fileno=h.detach())
            conn.setblocking(False)
            handed = parsed

            async def session(c: socket.socket) -> Handoff | None:
                return await self.handover(c, handed)

            self._track(self._loop.create_task(self._run(conn, session)))
            return
        gen = self._engine_generation()
        plan = self._plan_now(parsed)
        if plan is None:
            # Waiting on a lookup or the decider, the client still counts as a handshake (as on
            # the asyncio front-end): at ``max_handshakes`` the oldest waiting one is shed. (The
            # engine bounds the handshakes it is still reading by the same number, so on this
            # front-end at most twice ``max_handshakes`` connections are in a handshake.)
            while len(self._handshaking) >= self.max_handshakes and self._shed_oldest():
                pass
            task = self._loop.create_task(self._serve_native_later(h, proto, parsed, gen))
            self._handshaking[task] = None
            self._track(task)
        else:
            self._execute_native(h, proto, parsed, plan, gen)

    async def _serve_native_later(self, h: Any, proto: Protocol, target: Target, gen: int | None) -> None:
        try:
            plan = await self._plan(proto.name, target)
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if not self._closed:
                self._execute_native(h, proto, target, plan, gen)
        finally:
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            h.close()       # a no-op once answered, dialled or detached (and how a shed one ends)

    def _execute_native(self, h: Any, proto: Protocol, target: Target, plan: Plan, gen: int | None = None) -> None:
        """Carry out ``plan`` for a native handshake: refuse it, dial it in the engine, or
        (chaining, an address the engine cannot take) run it on the asyncio path; then hand
        the plan to the engine for the next requests (``gen``: the engine's plan generation
        read before deciding, so a plan decided under a replaced policy is never kept)."""
        self._engine_plan(h, proto, target, plan, gen)    # (before the client has its answer)
        if plan.kind == REFUSE:
            self._judged(proto.name, target, plan)
            assert plan.refusal is not None
            h.reply_and_close(proto.refusal_reply(plan.refusal, plan.host, plan.port))
            return
        inspected = self._inspects(target, plan)
        if plan.kind == DIRECT and not inspected and self._dial_native(h, proto, target, plan):
            return
        if inspected and self.inspection is not None:
            spec = self.inspection.engine_spec(self, target, plan)
            if spec is not None and self._dial_native(h, proto, target, plan, spec):
                return
        ticket = self._judged(proto.name, target, plan, inspected=inspected)
        assert ticket is not None
        conn = socket.socket(fileno=h.detach())      # taken now: nothing else may answer it
        if inspected:
            while len(self._handshaking) >= self.max_handshakes and self._shed_oldest():
                pass
        task = self._loop.create_task(self._run_detached(conn, proto, target, plan, ticket, inspected))
        if inspected:
            self._handshaking[task] = None            # until its TLS handshake is done
        self._track(task)

    def _forward_native(self, h: Any, proto: Protocol, parsed: Handover) -> bool:
        """Plain-HTTP forwarding served by the engine (``forward.engine_forwarding``): True
        when it took the connection."""
        from .forward import engine_forwarding

        gen = self._engine_generation()          # (read before deciding: see _engine_plan)
        found = engine_forwarding(self, parsed.data)
        if found is None:
            return False
        target, plan, spec = found
        front = self._front
        if front is not None and gen is not None and target.host.isascii() and not self.secrets:
            # the next connections to this host are the engine's alone (proto 2: forwarded)
            ttl = self.dialer.cached_for(target.host, target.port, plan)
            if ttl != 0:
                try:
                    front.set_plan(2, target.host.encode("ascii"), target.port,
                                   ("direct", list(plan.addresses), b"", spec), float("inf") if ttl is None else ttl,
                                   gen, plan.host)
                except (ValueError, UnicodeError):
                    pass
        return self._dial_native(h, proto, target, plan, spec, ok_reply=b"", early=parsed.data)

    def _resume_forward(self, fd: int, data: bytes) -> None:
        """(on the loop) a forwarded connection the engine gave back: ``forward_session``
        serves it from the request the engine did not."""
        conn = socket.socket(fileno=fd)
        if self._closed:
            conn.close()
            return
        conn.setblocking(False)

        async def session(c: socket.socket) -> Handoff | None:
            return await self.handover(c, Handover(data))

        self._track(self._loop.create_task(self._run(conn, session)))

    def _dial_native(self, h: Any, proto: Protocol, target: Target, plan: Plan,
                     inspect: tuple[Any, ...] | None = None, ok_reply: bytes | None = None,
                     early: bytes | None = None) -> bool:
        """``h.dial`` the plan's checked addresses and track the tunnel; False when the engine
        cannot take an address (the asyncio path then serves it). Safe on either thread; the
        tunnel's end is reported on the engine's completer thread (no loop wakeup)."""
        ticket = Ticket(proto.name, target.method, plan.host, plan.port, target.client, inspected=inspect is not None)
        if self.clients is not None:
            ticket.account = self.clients.get(target.client)     # (its slot was taken in planning)
        native = self._native

        announced: list[bool] = []

        def announce() -> None:
            # the allow event goes out before the end event, whichever thread gets here first
            with self._announce_lock:
                if not announced:
                    announced.append(True)
                    self._allowed(ticket, plan)

        reported: list[bool] = []

        def done(e: BaseException | None, tunnel: Any) -> None:
            # Called once by the engine (on its completer thread, possibly before ``h.dial``
            # has returned) or by ``close()`` for an aborted tunnel; whichever comes first.
            with self._announce_lock:
                if reported:
                    return
                reported.append(True)
            native.pop(tunnel, None)
            back = tunnel.take_handback() if inspect is not None else None
            if back is not None:                # forwarding: Python serves the next request
                try:
                    self._loop.call_soon_threadsafe(self._resume_forward, *back)
                except RuntimeError:
                    os.close(back[0])           # the loop is closed: so is the server
            announce()
            if isinstance(e, relay.impl.DialError):  # type: ignore[attr-defined]
                log.info("%s tunnel to %s:%d failed: %s", proto.name, plan.host, plan.port, e)
                self._ended(ticket, (0, 0), "unreachable")
                return
            if e is not None and not (isinstance(e, OSError) and e.errno in _NORMAL_ENDS):
                log.debug("tunnel ended: %s", e)
            self._ended(ticket, getattr(tunnel, "moved", None))

        try:
            tunnel = h.dial(list(plan.addresses), plan.port, proto.ok_reply if ok_reply is None else ok_reply,
                            target.early if early is None else early,
                            self.dialer.connect_timeout, self.idle_timeout, self.total_timeout,
                            proto.name == "socks5", self._loop, done, inspect)
        except ValueError:
            return False
        announce()
        with self._announce_lock:
            if not reported:
                native[tunnel] = done
                if ticket.account is not None:       # (a spent upload budget closes it)
                    def close_it(tunnel: Any = tunnel) -> None:
                        tunnel.abort()
                        done(None, tunnel)

                    ticket.account.closers[ticket.id] = close_it
        if self._closed:                # close() ran meanwhile (on the loop thread)
            tunnel.abort()
            done(None, tunnel)
        return True

    async def _run_detached(self, conn: socket.socket, proto: Protocol, target: Target, plan: Plan,
                            ticket: Ticket, inspected: bool = False) -> None:
        """The asyncio path for a native handshake (chaining, an inspected host, or an
        address the engine cannot take)."""
        with _connection_ends(conn):
            conn.setblocking(False)
            if inspected:
                try:
                    handoff = await self._inspect(conn, proto, target, plan, ticket)
                finally:
                    self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
                if handoff is not None:
                    upstream, to_upstream, to_client, req = handoff
                    await self._relay(conn, upstream, to_upstream, to_client, req)
                return
            opened = await self._connect_plan(conn, proto, target, plan, ticket)
            if opened is not None:
                await self._relay(conn, opened[0], target.early, opened[1], ticket)

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

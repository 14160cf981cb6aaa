"""TLS inspection: which tunnels are decrypted, and how a decrypted tunnel is served.

Only hosts that need it are decrypted: a request rule names them (``Filter.needs_inspection``),
or ``inspect_hosts`` does (the audit trail alone); ``no_inspect`` never decrypts a host
(certificate-pinning clients), and a request rule on such a host is a usage error. Every
other tunnel stays the blind splice it was.

An admitted tunnel to an inspected host is answered like any other (the origin is dialled
first, so an unreachable origin is still a 502 before the ``200``). Its first bytes then say
what it carries: a TLS ClientHello is answered with a leaf of the run's CA for the admitted
host (ALPN ``http/1.1`` only) and the origin is dialled in TLS (SNI, chain and name verified
against ``upstream_ca`` or the system's store, ALPN ``http/1.1``); an HTTP/1 request line is
served as plain HTTP inside the tunnel; anything else (HTTP/2 prior knowledge included) is
closed, reason ``not_http``. Each request is then read, judged and forwarded by the one
request pipeline (``kodarelay.forward``): its ``Host`` must name the admitted host (``421``),
request rules and the decider judge it, and its events share the tunnel's id.

Choices where the SPEC is silent:

* the leaf is minted for the host the tunnel was admitted for, whatever the SNI says (a
  client verifying another name then fails its own check; its requests could not pass the
  ``Host`` check anyway);
* a client that refuses the leaf (it does not trust the CA) ends its tunnel; the log says
  which host, at info level, as the client shows its own error;
* an origin that fails verification gets the client a ``502`` (reason ``upstream_tls``,
  body naming the host and the cause) as the answer to its request;
* the tunnel's end event counts decrypted bytes (what went to the origin, what came back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._relay_py import _TOKEN_CHARS
from .ca import CertificateAuthority, origin_context
from .dial import DIRECT, REP_NOT_ALLOWED, Plan, Refusal
from .events import Event
from .filter import Filter
from .forward import _Exchange, _Stream
from .secrets import SecretSet
from .serving import HandshakeTimeout, Target, Ticket
from .tlsstream import TlsStream

if TYPE_CHECKING:
    from .serving import Handoff, ProxyServer

log = logging.getLogger(__name__)

MAX_METHOD = 20


class Inspection:
    """What a server decrypts and with which CA (``BuiltInProxy(inspect=…)`` and friends)."""

    def __init__(self, ca: CertificateAuthority | None, hosts: Iterable[str] = (), never: Iterable[str] = (),
                 upstream_ca: str | os.PathLike[str] | None = None, secrets: SecretSet | None = None) -> None:
        hosts, never = tuple(hosts), tuple(never)
        if ca is not None and not isinstance(ca, CertificateAuthority):
            raise TypeError(f"inspect must be a kodarelay.CertificateAuthority, not {type(ca).__name__}")
        if hosts and ca is None:
            raise ValueError("inspect_hosts needs inspect= (a kodarelay.CertificateAuthority)")
        self.ca = ca
        self.hosts = Filter(allow=hosts) if hosts else None
        self.never = Filter(allow=never) if never else None
        self.upstream_ca = upstream_ca
        self.secrets = secrets          # their hosts are decrypted too
        self._origin_ctx: ssl.SSLContext | None = None
        self._engine: bool | None = None        # the compiled engine serves inspected tunnels
        self._engine_client: Any = None         # its origin context

    @property
    def origin_ctx(self) -> ssl.SSLContext:
        if self._origin_ctx is None:
            self._origin_ctx = origin_context(self.upstream_ca)
        return self._origin_ctx

    def engine_spec(self, srv: ProxyServer, target: Any, plan: Plan) -> tuple[Any, ...] | None:
        """What ``_NativeListener.dial(inspect=…)`` needs to serve this admitted tunnel in the
        compiled engine (``kodarelay/_inspect.c``), or None where the asyncio path serves it:
        no TLS engine in this build, or a part of the request pipeline the engine does not
        have yet (events or metrics being taken, a decider, named clients, an upstream
        proxy, more than 32 secrets). ``KODARELAY_NO_ENGINE_INSPECT=1`` keeps every
        inspected tunnel on the asyncio path."""
        if self._engine is False or plan.kind != DIRECT or self.ca is None:
            return None
        if self._engine is None:
            self._engine = _engine_available()
            if self._engine is False:
                return None
        if target.client is not None or not srv._engine_takes_requests():
            return None
        try:
            from . import _relay  # type: ignore[attr-defined]

            if self._engine_client is None:
                self._engine_client = _relay.tls_client_context(
                    os.fspath(self.upstream_ca) if self.upstream_ca is not None else None)
            judged, rules = srv.dialer_for(target.client).policy.filter.request_program(plan.host, plan.port)
            table = srv.secrets.engine_table(plan.host, plan.port) if srv.secrets else None
            return (self.ca.engine_context(plan.host), self._engine_client, _relay.RequestRules(judged, rules),
                    plan.host, None, table)
        except (ValueError, UnicodeError) as e:
            log.info("inspected tunnel to %s:%d served on the asyncio path: %s", plan.host, plan.port, e)
            return None

    def never_inspects(self, host: str, port: int | None) -> bool:
        return self.never is not None and self.never.allows(host, port)

    def wants(self, flt: Filter, host: str, port: int) -> bool:
        """Whether a tunnel to ``host:port`` is decrypted (``ca`` given, not ``no_inspect``)."""
        if self.ca is None or self.never_inspects(host, port):
            return False
        return (flt.needs_inspection(host, port) or (self.hosts is not None and self.hosts.allows(host, port))
                or (self.secrets is not None and self.secrets.for_host(host, port)))

    def check(self, flt: Filter) -> None:
        """``ValueError`` when a request rule names a host ``no_inspect`` never decrypts."""
        if self.never is None:
            return
        for s in self.secrets.secrets if self.secrets is not None else ():
            for pattern in s.hosts:
                name = "a" + pattern[1:] if pattern.startswith("*.") else pattern
                if self.never_inspects(name.split(":")[0] if name.count(":") == 1 else name, None):
                    raise ValueError(f"secret {s.name} goes to {pattern}, a host that --no-inspect never decrypts: "
                                     "its phantom could never be swapped")
        for pattern in (*flt.allow_patterns, *flt.deny_patterns):
            host = _request_rule_host(pattern)
            if host is not None and self.never_inspects(host, None):
                raise ValueError(f"request rule {pattern!r} names a host that --no-inspect never decrypts: "
                                 "its requests could not be judged")


def _engine_available() -> bool:
    from . import relay

    if relay.env_flag("KODARELAY_NO_ENGINE_INSPECT"):
        return False
    engine = getattr(relay.impl, "tls_engine", None)
    return engine is not None and engine() is not None


def _request_rule_host(pattern: str) -> str | None:
    """The host a request-rule pattern names (a wildcard's first label made concrete), or
    None for a host rule."""
    text = pattern.strip()
    if text.startswith("read-only "):
        text = text[len("read-only "):].strip()
    elif " " in text:
        text = text.split(None, 1)[1]
    else:
        slash = text.find("/")
        if slash < 0 or text[slash + 1:].isdigit():
            return None
    host = text.split("/", 1)[0]
    if host.startswith("["):
        host = host[1:host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.startswith("*."):
        host = "a" + host[1:]
    return host or None


def needs_ca(flt: Filter) -> bool:
    """Whether some rule of ``flt`` is a request rule (its host's requests must be read)."""
    return any(_request_rule_host(p) is not None for p in (*flt.allow_patterns, *flt.deny_patterns))


def first_bytes(buf: bytes) -> str | None:
    """What a tunnel's first bytes carry: "tls", "http", "other", or None (need more)."""
    if not buf:
        return None
    if buf[0] == 0x16:
        return "tls"
    sp = buf.find(b" ", 0, MAX_METHOD + 1)
    head = buf[:sp] if sp >= 0 else buf[:MAX_METHOD + 1]
    if not head or any(c not in _TOKEN_CHARS for c in head):
        return "other"
    if sp < 0:
        return None if len(buf) <= MAX_METHOD else "other"
    return "other" if head == b"PRI" else "http"


class InspectedExchange(_Exchange):
    """The requests of one inspected tunnel (plain or decrypted), forwarded to its host."""

    def __init__(self, srv: ProxyServer, conn: socket.socket, proto: str, plan: Plan, tunnel: Ticket,
                 tls: bool, pending: tuple[socket.socket, bytes] | None) -> None:
        super().__init__(srv, conn, proto, (plan.host, plan.port))
        self.tunnel = tunnel
        self.tls = tls
        self.over_tls = tls
        self.pending = pending          # the origin dialled for the tunnel's answer
        self.up_total = 0

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.up_total += self.upstream.sent
        super().drop_upstream()

    def close_pending(self) -> None:
        if self.pending is not None:
            self.pending[0].close()
            self.pending = None

    async def _connect(self, plan: Plan, ticket: Ticket, method: str, client: str | None) -> _Stream:
        srv = self.srv
        target = Target(plan.host, plan.port, b"", method, client)
        if self.pending is not None:
            sock, early = self.pending
            self.pending = None
        else:
            try:
                sock, early = await srv.dialer.connect(plan)
            except Refusal as r:
                srv._unreachable(self.proto, target, plan, r, ticket)
                raise
        sock.setblocking(False)
        self.via_proxy = None           # a chained origin is reached through a CONNECT tunnel
        if not self.tls:
            stream = _Stream(sock, self.clock)
            stream.buf = early
            return stream
        assert srv.inspection is not None
        up = TlsStream(sock, self.clock, srv.inspection.origin_ctx, server_side=False,
                       server_hostname=plan.host, received=early)
        try:
            await asyncio.wait_for(up.handshake(), srv.dialer.connect_timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            sock.close()
            if isinstance(e, ssl.SSLCertVerificationError):
                cause = e.verify_message or str(e)
            elif isinstance(e, asyncio.TimeoutError):
                cause = "no TLS handshake in time"
            else:
                cause = getattr(e, "reason", None) or str(e) or type(e).__name__
            shown = f"[{plan.host}]" if ":" in plan.host else plan.host
            refusal = Refusal(f"TLS to {shown}:{plan.port} failed: {cause}", http_status=502,
                              socks_rep=REP_NOT_ALLOWED, reason="upstream_tls", source="default")
            srv._unreachable(self.proto, target, plan, refusal, ticket)
            raise refusal from None
        return up

    def _rebuild(self, method: str, version: str, origin: str, authority: str,
                 fields: list[tuple[bytes, bytes]], fmap: dict[bytes, list[bytes]], upgrade: bool) -> bytes:
        if self.tls and authority.endswith(":443"):
            authority = authority[:-4]      # https's default port, as the client wrote it
        return super()._rebuild(method, version, origin, authority, fields, fmap, upgrade)


async def inspect_session(srv: ProxyServer, conn: socket.socket, proto: str, plan: Plan, ticket: Ticket,
                          early: bytes, upstream: socket.socket, from_upstream: bytes,
                          token: str | None = None) -> Handoff | None:
    """Serve an admitted, answered tunnel to an inspected host (see the module docstring).

    Returns a handoff only for a WebSocket ``101`` on plain HTTP inside the tunnel."""
    insp = srv.inspection
    assert insp is not None and insp.ca is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + srv.handshake_timeout
    buf = early
    ex: InspectedExchange | None = None
    ticket.inspected = True
    try:
        kind = first_bytes(buf)
        while kind is None:
            try:
                chunk = await srv.recv_some(conn, deadline)
            except HandshakeTimeout:
                chunk = b""
            if not chunk:
                upstream.close()
                return None
            buf += chunk
            kind = first_bytes(buf)
        if kind == "other":
            upstream.close()
            detail = "the tunnel carries neither TLS nor HTTP/1"
            srv.record(proto, plan.host, plan.port, "not_http", ticket.client, detail)
            srv.emit(Event(time.time(), "refuse", proto, "CONNECT", plan.host, plan.port, ticket.client, "not_http",
                           None, "default", ticket.id, detail=detail, inspected=True))
            return None
        ex = InspectedExchange(srv, conn, proto, plan, ticket, kind == "tls", (upstream, from_upstream))
        ex.tunnel_token = token
        if kind == "tls":
            client = TlsStream(conn, ex.clock, insp.ca.leaf_context(plan.host), server_side=True, received=buf)
            try:
                await asyncio.wait_for(client.handshake(), max(0.0, deadline - loop.time()))
            except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
                log.info("inspected tunnel to %s:%d: the client's TLS handshake failed (does it trust the CA?): %s",
                         plan.host, plan.port, e)
                return None
            ex.client = client
            deadline = loop.time() + srv.handshake_timeout
        else:
            ex.client.buf = buf
        srv._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]   # a tunnel now
        handoff = await ex.run(deadline)
        if isinstance(ex.client, TlsStream) and handoff is None:
            await ex.client.close_notify()
        return handoff
    finally:
        if ex is not None:
            ex.drop_upstream()
            ex.close_pending()
            srv._ended(ticket, (ex.up_total, ex.client.sent))
        else:
            srv._ended(ticket, (0, 0))


def bind_options(options: dict[str, Any]) -> Inspection | None:
    """Take the inspection options out of a server's keyword options."""
    ca = options.pop("inspect", None)
    hosts = tuple(options.pop("inspect_hosts", ()) or ())
    never = tuple(options.pop("no_inspect", ()) or ())
    upstream_ca = options.pop("upstream_ca", None)
    if ca is None and not hosts and not never and upstream_ca is None:
        return None
    return Inspection(ca, hosts, never, upstream_ca)


__all__ = ["Inspection", "inspect_session"]

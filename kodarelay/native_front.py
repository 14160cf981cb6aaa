# mypy: disable-error-code="misc"
# (each method's ``self: ProxyServer`` names the class this base serves, a subclass: mypy
# accepts only supertypes there, and types the bodies by it all the same)
"""The compiled front-end's side of ``ProxyServer`` (``NativeFront``, a base class of it):
handshakes the engine read arrive here in batches; a plan known at once is carried out in
the engine (dialled, inspected, forwarded, refused) and handed to its plan cache, the rest
goes to the asyncio path. Every method runs with ``self`` a ``ProxyServer``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from . import relay
from ._aio import log_accept_error
from .dial import DIRECT, REFUSE, Plan
from .handshakes import _NORMAL_ENDS, Handoff, Handover, Parsed, Protocol, Reject, Target, Ticket, _connection_ends
from .upstream import connect_request

if TYPE_CHECKING:
    from .serving import ProxyServer

log = logging.getLogger("kodarelay.serving")


class NativeFront:
    def _engine_takes_requests(self: ProxyServer) -> bool:
        """Whether the engine's request pipeline (inspected tunnels, forwarded requests) can
        serve this server's requests: it has no per-request events or metrics, decider or
        named clients yet, nor more secrets than it takes."""
        secrets = self.secrets
        return (self._events is None and self.metrics.port is None and self.clients is None
                and self.dialer.policy.decider is None
                and not (secrets and len(secrets.secrets) > secrets.ENGINE_MAX))

    # ── the compiled front-end ───────────────────────────────────────────────

    #: "http", "socks5" or "mux": what the engine reads before handing a connection over
    front_mode = "http"

    def _start_front(self: ProxyServer) -> None:
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

    def _engine_generation(self: ProxyServer) -> int | None:
        """The generation a plan about to be decided is stored under: the policy's own (it
        never restarts, so a plan decided under an old policy is never stored in the cache
        of a listener made after an engine restart)."""
        return self.dialer.policy.generation if self._front is not None else None

    def _drop_engine_plans(self: ProxyServer) -> None:
        """A policy change (any thread): the engine forgets every plan before it returns,
        and from then on stores only plans decided under the new policy."""
        front = self._front
        if front is not None:
            front.clear_plans(self.dialer.policy.generation)

    def _engine_plan(self: ProxyServer, h: Any, proto: Protocol, target: Target, plan: Plan, gen: int | None) -> None:
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

    def _engine_refused(self: ProxyServer, records: list[tuple[Any, ...]], dropped: int) -> None:
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

    def _on_batch_direct(self: ProxyServer, items: list[Any]) -> list[Any]:
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

    def _on_batch(self: ProxyServer, items: list[Any], err: int) -> None:
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

    def _serve_native(self: ProxyServer, h: Any, proto: Protocol, parsed: Parsed) -> None:
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

    async def _serve_native_later(self: ProxyServer, h: Any, proto: Protocol, target: Target, gen: int | None) -> None:
        try:
            plan = await self._plan(proto.name, target)
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if not self._closed:
                self._execute_native(h, proto, target, plan, gen)
        finally:
            self._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            h.close()       # a no-op once answered, dialled or detached (and how a shed one ends)

    def _execute_native(self: ProxyServer, h: Any, proto: Protocol, target: Target, plan: Plan, gen: int | None = None) -> None:
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

    def _forward_native(self: ProxyServer, h: Any, proto: Protocol, parsed: Handover) -> bool:
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

    def _resume_forward(self: ProxyServer, fd: int, data: bytes) -> None:
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

    def _dial_native(self: ProxyServer, h: Any, proto: Protocol, target: Target, plan: Plan,
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

    async def _run_detached(self: ProxyServer, conn: socket.socket, proto: Protocol, target: Target, plan: Plan,
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

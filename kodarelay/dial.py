"""One decision per request: from (host, port) to a plan, and from a plan to a connected socket.

``Dialer.plan`` holds every policy step, once, for every path that serves a tunnel (the
asyncio handshake, the engine's native front-end, forwarded plain HTTP). A plan is one of:

* **refuse** — a ``Refusal`` carrying the reason (recorded as a violation by the server),
  the rule or source that decided, and each protocol's reply status;
* **direct** — the addresses the guard checked: the proxy dials exactly these, in order
  (no second lookup, so a name cannot rebind between the check and the connect);
* **chain** — through the upstream HTTP proxy, which resolves the name (the guard does
  not apply to names there; an IP literal is guarded before it is chained).

The steps: the filter's rules (deny wins); when no rule matched, the decider, if any (an IP
literal is guarded first: a decider is never asked about an address the guard refuses);
then chaining or the resolved-address guard.

Decisions are cached, never widened: plans are kept per (host as sent, port) — direct plans
for names ``dns_ttl`` seconds, rule refusals and literal plans until the policy changes —
and replacing the filter, the upstream, the guard setting or the decider drops every cached
plan and remembered decider answer before the next request is judged (``Policy`` is one
immutable snapshot, swapped atomically, so no request is judged by a mix of old and new).

Resolution runs on lookup threads of kodarelay's own (not the event loop's default executor;
one per lookup in flight, at most ``PER_ZONE`` at once per zone, fresh zones first when all
are taken: ``kodarelay.lookups``), each within ``connect_timeout``, and concurrent lookups of
one name share one call, so a name whose DNS never answers delays only the clients that asked
for it (or for its zone), even in a flood of such names.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, List, Optional

from .events import Decider, Request
from .lookups import LookupPool, lookup_zone, zone_of
from .filter import Decision, Filter, _parse_resolved, canonical_host
from .upstream import UpstreamConfig, UpstreamError, bypasses_proxy, connect_upstream, open_tcp

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[List[str]]]

# SOCKS5 reply codes (RFC 1928 §6).
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05

#: Cached plans per server before the cache is emptied (a flood of distinct names).
PLAN_CACHE_MAX = 4096
DEFAULT_DNS_TTL = 30.0
DEFAULT_DECIDER_TIMEOUT = 60.0

REFUSE = "refuse"
DIRECT = "direct"
CHAIN = "chain"


class Refusal(Exception):
    """A tunnel that will not be opened, with the reply each protocol gives for it.

    ``reason`` is set for policy refusals (recorded as violations); it is None for a target
    that was allowed but could not be reached. ``rule`` / ``source`` say what decided,
    ``status`` is an upstream proxy's own refusal status.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        socks_rep: int,
        reason: str | None = None,
        rule: str | None = None,
        source: str | None = None,
        status: int | None = None,
        detail: str | None = None,
        address: str | None = None,
        private: bool = False,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.socks_rep = socks_rep
        self.reason = reason
        self.rule = rule
        self.source = source
        self.status = status
        #: for a guard refusal: what was refused and why ("resolves to 127.0.0.1, loopback"),
        #: the address, and whether ``--allow-private`` would admit it
        self.detail = detail
        self.address = address
        self.private = private


def guard_refusal(host: str, port: int | None, guarded: Decision, literal: bool) -> Refusal:
    """The guard's refusal, saying which address it refused and why (the reply and the
    summary show it, with the flag that would admit it)."""
    if guarded.reason != "resolved_address" or not guarded.address:
        return policy_refusal(host, port, guarded.reason, guarded.rule, "guard")
    why = guarded.detail.split(" is ", 1)[-1]
    detail = f"is {why}" if literal else f"resolves to {guarded.address} ({why})"
    return Refusal(f"{host}:{port} {detail}", http_status=403, socks_rep=REP_NOT_ALLOWED, reason=guarded.reason,
                   rule=guarded.rule, source="guard", detail=detail, address=guarded.address,
                   private=guarded.private)


def policy_refusal(host: str, port: int | None, reason: str, rule: str | None, source: str) -> Refusal:
    return Refusal(f"{host}:{port} is {reason}", http_status=403, socks_rep=REP_NOT_ALLOWED, reason=reason,
                   rule=rule, source=source)


@dataclass(frozen=True)
class Plan:
    """What to do with one request (see the module docstring). ``host`` is canonical text."""

    kind: str
    host: str
    port: int
    refusal: Optional[Refusal] = None
    addresses: tuple[str, ...] = ()
    upstream: Optional[UpstreamConfig] = None
    rule: Optional[str] = None
    source: str = "rule"
    #: seconds this plan may be reused for the same (host, port); None: until the policy
    #: changes; 0: not at all (a decider's one-off answer, a failed lookup)
    ttl: Optional[float] = None


@dataclass(frozen=True)
class Policy:
    """Everything a decision depends on, as one value: swapped whole, never edited."""

    filter: Filter
    upstream: UpstreamConfig
    deny_private: bool
    decider: Optional[Decider]
    generation: int


class _Need:
    """A step that has to wait: the decider's answer or a lookup."""

    __slots__ = ("what", "name")

    def __init__(self, what: str, name: str = "") -> None:
        self.what = what
        self.name = name


_NEED_DECIDER = _Need("decider")

_pool: LookupPool | None = None
_pool_lock = threading.Lock()


def resolver_pool() -> LookupPool:
    """kodarelay's own lookup threads (created on first use, shared by every server): one per
    lookup in flight, a share per zone, so a name that never answers delays nobody else
    (``kodarelay.lookups``)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = LookupPool()
    return _pool


def _forget_pool_in_child() -> None:
    global _pool
    _pool = None        # its threads did not survive the fork; the child makes its own


os.register_at_fork(after_in_child=_forget_pool_in_child)


async def default_resolver(host: str, port: int) -> list[str]:
    """``getaddrinfo`` on kodarelay's resolver pool: every TCP address of ``host``, once each."""
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        resolver_pool(), lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    )
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def socks_rep_for(exc: BaseException) -> int:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return REP_HOST_UNREACHABLE
    code = getattr(exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return REP_CONNECTION_REFUSED
    if code == errno.ENETUNREACH:
        return REP_NETWORK_UNREACHABLE
    if code in (errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN):
        return REP_HOST_UNREACHABLE
    return REP_GENERAL_FAILURE


def _is_ip(canon: object) -> bool:
    return isinstance(canon, (ipaddress.IPv4Address, ipaddress.IPv6Address))


class Dialer:
    """Plans and opens tunnels for one server: its policy, resolver, caches and timeouts."""

    def __init__(
        self,
        filter: Filter,
        upstream: UpstreamConfig,
        resolver: Resolver | None,
        connect_timeout: float,
        deny_private: bool,
        *,
        dns_ttl: float = DEFAULT_DNS_TTL,
        decider: Decider | None = None,
        decider_timeout: float = DEFAULT_DECIDER_TIMEOUT,
    ) -> None:
        if dns_ttl < 0:
            raise ValueError(f"dns_ttl must be >= 0, not {dns_ttl!r}")
        self.resolver: Resolver = resolver or default_resolver
        self.connect_timeout = connect_timeout
        self.dns_ttl = dns_ttl
        self.decider_timeout = decider_timeout
        self._lock = threading.Lock()
        self.policy = Policy(filter, upstream, deny_private, decider, 0)
        self._plans: dict[tuple[str, int], tuple[float | None, int, Plan]] = {}
        self._remembered: dict[tuple[str, int], bool] = {}
        #: ``*_always`` answers about single requests, per (method, host, port, path)
        self._remembered_requests: dict[tuple[str, str, int, str], bool] = {}
        self._asking_requests: dict[tuple[Any, ...], asyncio.Task[str]] = {}
        self._asking: dict[tuple[int, str, int], asyncio.Future[Any]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Future[list[str]]] = {}
        #: answers of finished lookups, for ``dns_ttl``: a request arriving between a lookup's
        #: end and its plan being stored reuses the answer instead of resolving again
        self._answers: dict[tuple[str, int], tuple[float, int, list[str]]] = {}
        #: called (on the changing thread) after every policy change, e.g. to empty the
        #: engine's own plan cache
        self.on_policy_change: list[Callable[[], None]] = []

    # ── the policy, replaced whole ───────────────────────────────────────────

    @property
    def filter(self) -> Filter:
        return self.policy.filter

    @filter.setter
    def filter(self, value: Filter) -> None:
        self.replace_policy(filter=value)

    @property
    def upstream(self) -> UpstreamConfig:
        return self.policy.upstream

    @upstream.setter
    def upstream(self, value: UpstreamConfig) -> None:
        self.replace_policy(upstream=value)

    @property
    def deny_private(self) -> bool:
        return self.policy.deny_private

    @deny_private.setter
    def deny_private(self, value: bool) -> None:
        self.replace_policy(deny_private=bool(value))

    @property
    def decider(self) -> Decider | None:
        return self.policy.decider

    @decider.setter
    def decider(self, value: Decider | None) -> None:
        self.replace_policy(decider=value)

    def replace_policy(self, **changes: Any) -> None:
        """Change the policy (any thread): cached plans and remembered answers go first."""
        with self._lock:
            generation = self.policy.generation + 1
            self._plans = {}
            self._remembered = {}
            self._remembered_requests = {}
            self._answers = {}
            self.policy = replace(self.policy, generation=generation, **changes)
        for callback in list(self.on_policy_change):
            try:
                callback()
            except Exception:
                log.exception("policy-change callback failed")

    # ── planning ─────────────────────────────────────────────────────────────

    def plan_now(self, host: str, port: int) -> Plan | None:
        """The plan when it needs no waiting (cached, or decided by rules and known
        addresses); None when a lookup or the decider is needed. Any thread."""
        policy = self.policy
        plan = self._cached(policy, host, port)
        if plan is None:
            step = self._steps(policy, host, port, None, None)
            if isinstance(step, _Need):
                return None
            plan = step
            self._store(policy, host, port, plan)
        return plan

    async def plan(self, request: Request, host: str | None = None) -> Plan:
        """The plan for ``request`` (``host`` as the client sent it, default ``request.host``).

        Never raises for policy: every refusal is a plan. Runs on the server's loop.
        """
        raw = request.host if host is None else host
        port = request.port
        policy = self.policy
        plan = self._cached(policy, raw, port)
        if plan is not None:
            return plan
        verdict: str | None = None
        addresses: list[str] | None = None
        while True:
            step = self._steps(policy, raw, port, verdict, addresses)
            if isinstance(step, Plan):
                self._store(policy, raw, port, step)
                return step
            if step.what == "decider":
                verdict = await self._ask(policy, request, raw, port)
            else:
                try:
                    addresses = await self._lookup(step.name, port)
                except Refusal as r:
                    if self.policy is policy:
                        return Plan(REFUSE, step.name, port, r, source="guard", ttl=0)
            # The policy may have changed while we waited (``set_filter(deny X)`` returned
            # during X's lookup or decider call): judge again under the policy the plan will
            # be executed under. The lookup's answer stands (DNS does not depend on the
            # policy); the decider's answer stands only if it is still the same decider, and
            # the new rules come first in any case (a deny refuses at once).
            current = self.policy
            if current is not policy:
                if current.decider is not policy.decider:
                    verdict = None
                policy = current

    def cached_for(self, host: str, port: int, plan: Plan) -> float | None:
        """Seconds ``plan`` stays cached for (host, port) from now: None until the policy
        changes, 0 when it is not cached (so nobody else may reuse it). Any thread."""
        hit = self._plans.get((host, port))
        if hit is None or hit[2] is not plan or hit[1] != self.policy.generation:
            return 0.0
        expires = hit[0]
        return None if expires is None else max(0.0, expires - time.monotonic())

    def _cached(self, policy: Policy, host: str, port: int) -> Plan | None:
        hit = self._plans.get((host, port))
        if hit is None:
            return None
        expires, generation, plan = hit
        if generation != policy.generation or (expires is not None and expires <= time.monotonic()):
            return None
        return plan

    def _store(self, policy: Policy, host: str, port: int, plan: Plan) -> None:
        if plan.ttl == 0:
            return
        expires = None if plan.ttl is None else time.monotonic() + plan.ttl
        with self._lock:
            if policy.generation != self.policy.generation:
                return          # decided under a policy that is gone: never cache it
            if len(self._plans) >= PLAN_CACHE_MAX:
                self._plans = {}
            self._plans[(host, port)] = (expires, policy.generation, plan)

    def _steps(self, policy: Policy, host: str, port: int, verdict: str | None,
               addresses: list[str] | None) -> Plan | _Need:
        """Every policy step, in order; stops at the first one that must wait."""
        flt = policy.filter
        decision, canon = flt._explain(host, port)
        text = decision.host or host
        source = "rule"
        ttl: float | None = None
        if not decision.allowed:
            if decision.reason != "not_allowed" or policy.decider is None:
                src = "rule" if decision.rule is not None else "default"
                return Plan(REFUSE, text, port, policy_refusal(text, port, decision.reason, decision.rule, src),
                            rule=decision.rule, source=src)
            if _is_ip(canon):        # a literal is guarded before a decider hears of it
                guarded = flt.guard_addresses(decision, canon, [text], deny_private=policy.deny_private)
                if guarded.reason != "not_allowed":
                    return Plan(REFUSE, text, port,
                                guard_refusal(text, port, guarded, literal=True),
                                rule=guarded.rule, source="guard")
            remembered = self._remembered.get((text, port))
            if remembered is None:
                if verdict is None:
                    return _NEED_DECIDER
                ttl = 0
            else:
                verdict = "allow" if remembered else "decider_denied"
            if verdict != "allow":
                return Plan(REFUSE, text, port, policy_refusal(text, port, verdict, None, "decider"),
                            source="decider", ttl=ttl)
            source = "decider"
            decision = Decision(True, None, "allowed", text, decision.port)
        assert canon is not None
        rule = decision.rule
        if _is_ip(canon):
            guarded = flt.guard_addresses(decision, canon, [text], deny_private=policy.deny_private)
            if not guarded.allowed:
                return Plan(REFUSE, text, port, guard_refusal(text, port, guarded, literal=True),
                            rule=guarded.rule, source="guard", ttl=ttl)
        upstream = policy.upstream
        if not upstream.is_direct and not bypasses_proxy(text, upstream.no_proxy):
            return Plan(CHAIN, text, port, upstream=upstream, rule=rule, source=source, ttl=ttl)
        if _is_ip(canon):
            return Plan(DIRECT, text, port, addresses=(text,), rule=rule, source=source, ttl=ttl)
        name_ttl = self.dns_ttl if ttl is None else 0
        if addresses is None:
            known = self._answers.get((text, port))
            left = known[0] - time.monotonic() if known is not None and known[1] == policy.generation else 0.0
            if left <= 0:
                return _Need("lookup", text)
            addresses = known[2]          # type: ignore[index]
            name_ttl = min(name_ttl, left)
        guarded = flt.guard_addresses(decision, canon, addresses, deny_private=policy.deny_private)
        if not guarded.allowed:
            r = guard_refusal(text, port, guarded, literal=False)
            return Plan(REFUSE, text, port, r, rule=guarded.rule, source="guard", ttl=name_ttl)
        # the checked addresses, canonical: every dialer (the engine's too) can take them
        return Plan(DIRECT, text, port, addresses=tuple(str(_parse_resolved(a)) for a in addresses), rule=rule,
                    source=source, ttl=name_ttl)

    # ── waiting steps ────────────────────────────────────────────────────────

    async def _ask(self, policy: Policy, request: Request, host: str, port: int) -> str:
        """The decider's verdict: "allow", or the refusal reason. One call per (host, port)
        at a time; ``*_always`` answers are remembered until the policy changes."""
        canon = str(canonical_host(host))
        key = (policy.generation, canon, port)
        pending = self._asking.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_task(self._call_decider(policy, replace(request, host=canon, port=port)))
            self._asking[key] = pending
            pending.add_done_callback(lambda _t: self._asking.pop(key, None))
        return await asyncio.shield(pending)

    async def _call_decider(self, policy: Policy, request: Request) -> str:
        assert policy.decider is not None
        try:
            answer = await asyncio.wait_for(policy.decider(request), self.decider_timeout)
        except asyncio.TimeoutError:
            log.warning("decider did not answer for %s:%d within %gs", request.host, request.port,
                        self.decider_timeout)
            return "decider_timeout"
        except Exception as e:
            if getattr(e, "quiet", False):   # an expected end (a question withdrawn): no traceback
                log.info("decider gave no answer for %s:%d: %s", request.host, request.port, e)
            else:
                log.exception("decider failed for %s:%d", request.host, request.port)
            return "decider_error"
        if answer is True:
            answer = "allow"
        elif answer is False:
            answer = "deny"
        if answer not in ("allow", "deny", "allow_always", "deny_always"):
            log.error("decider returned %r for %s:%d; refusing", answer, request.host, request.port)
            return "decider_error"
        if answer.endswith("_always"):
            with self._lock:
                if self.policy.generation == policy.generation:
                    if request.path is not None:
                        self._remembered_requests[(request.method, request.host, request.port, request.path)] = \
                            answer == "allow_always"
                    else:
                        self._remembered[(request.host, request.port)] = answer == "allow_always"
        return "allow" if answer.startswith("allow") else "decider_denied"

    async def ask_request(self, request: Request) -> str:
        """The decider's verdict on one request no request rule matched (``request.path`` set):
        "allow", or the refusal reason (``request_not_allowed`` without a decider). Concurrent
        askers of one request share one call; ``*_always`` answers are remembered per
        (method, host, port, path) until the policy changes."""
        policy = self.policy
        if policy.decider is None:
            return "request_not_allowed"
        key = (request.method, request.host, request.port, request.path or "/")
        remembered = self._remembered_requests.get(key)
        if remembered is not None:
            return "allow" if remembered else "decider_denied"
        pending = self._asking_requests.get((policy.generation, *key))
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._call_decider(policy, request))
            full = (policy.generation, *key)
            self._asking_requests[full] = pending
            pending.add_done_callback(lambda _t: self._asking_requests.pop(full, None))
        return await asyncio.shield(pending)

    async def _lookup(self, name: str, port: int) -> list[str]:
        """Resolve ``name`` (one call shared by concurrent askers) within ``connect_timeout``."""
        key = (name, port)
        pending = self._lookups.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve_once(name, port))
            self._lookups[key] = pending
            pending.add_done_callback(lambda _f: self._lookups.pop(key, None))
        return await asyncio.shield(pending)

    async def _resolve_once(self, name: str, port: int) -> list[str]:
        addresses = await self.resolve(name, port)
        if self.dns_ttl > 0:
            with self._lock:
                if len(self._answers) >= PLAN_CACHE_MAX:
                    self._answers = {}
                self._answers[(name, port)] = (time.monotonic() + self.dns_ttl, self.policy.generation, addresses)
        return addresses

    async def resolve(self, name: str, port: int) -> list[str]:
        """The resolver's answer within ``connect_timeout`` (each lookup's deadline; a lookup
        still queued for a thread then is dropped). Blocking calls the resolver makes on
        ``resolver_pool()`` count against ``name``'s zone share (``kodarelay.lookups``)."""
        token = lookup_zone.set(zone_of(name))
        try:
            addresses = await asyncio.wait_for(self.resolver(name, port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError, UnicodeError, ValueError) as e:
            raise Refusal(
                f"cannot resolve {name}: {e or type(e).__name__}", http_status=502, socks_rep=REP_HOST_UNREACHABLE,
                reason="resolve_failed", source="guard",
            ) from None
        finally:
            lookup_zone.reset(token)
        if not addresses:
            raise Refusal(
                f"{name} has no address", http_status=502, socks_rep=REP_HOST_UNREACHABLE, reason="resolve_failed",
                source="guard",
            )
        return [str(a) for a in addresses]

    # ── executing a plan on the event loop ───────────────────────────────────

    async def connect(self, plan: Plan) -> tuple[socket.socket, bytes]:
        """Open the tunnel ``plan`` describes; returns the socket and bytes already received.

        Raises the plan's ``Refusal`` for a refuse plan, and a ``Refusal`` without a reason
        (or ``upstream_refused``) when the target or upstream cannot be reached.
        """
        if plan.kind == REFUSE:
            assert plan.refusal is not None
            raise plan.refusal
        if plan.kind == CHAIN:
            assert plan.upstream is not None
            return await self._dial_upstream(plan.upstream, plan.host, plan.port)
        return await self._connect_any(plan.host, list(plan.addresses), plan.port), b""

    async def _connect_any(self, name: str, addresses: list[str], port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        last: BaseException | None = None
        for addr in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await open_tcp(addr, port, remaining)
            except (OSError, asyncio.TimeoutError, ValueError) as e:
                last = e
                log.debug("connect %s (%s):%d failed: %s", name, addr, port, e)
        exc = last or TimeoutError(f"connect to {name}:{port} timed out")
        raise Refusal(f"cannot connect to {name}:{port}: {exc}", http_status=502, socks_rep=socks_rep_for(exc))

    async def _dial_upstream(self, upstream: UpstreamConfig, name: str, port: int) -> tuple[socket.socket, bytes]:
        try:
            return await connect_upstream(upstream, name, port, connect_timeout=self.connect_timeout)
        except UpstreamError as e:
            if e.status is not None:
                raise Refusal(f"upstream refused ({e.status})", http_status=502, socks_rep=REP_CONNECTION_REFUSED,
                              reason="upstream_refused", source="upstream", status=e.status) from None
            raise Refusal(str(e), http_status=502, socks_rep=REP_CONNECTION_REFUSED) from None
        except (OSError, asyncio.TimeoutError) as e:
            raise Refusal(
                f"cannot reach upstream proxy {upstream}: {e}", http_status=502, socks_rep=socks_rep_for(e)
            ) from None


__all__ = ["Dialer", "Plan", "Policy", "Refusal", "Resolver", "default_resolver", "resolver_pool",
           "REFUSE", "DIRECT", "CHAIN"]

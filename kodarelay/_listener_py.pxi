# The native front-end's Python side: listeners and the handshakes they deliver.

class DialError(OSError):
    """The engine could not connect a natively dialled tunnel (its client got the failure reply)."""


cdef class _NativeListener:
    """The engine serving a listening socket's handshakes; batches go to ``cb(items, err)``
    on ``loop`` (``err``: an accept errno, -1 when the engine stopped, else 0)."""
    cdef Listener *l
    cdef _Engine e
    cdef readonly object loop
    cdef readonly object cb
    cdef readonly object direct
    cdef readonly object on_refused

    def __cinit__(self, lsock, int mode, double hs_timeout, loop, cb, direct=None, on_refused=None,
                  double connect_timeout=10.0, double idle_timeout=300.0, double total_timeout=3600.0,
                  int max_handshakes=0):
        cdef Listener *l
        cdef Worker *w
        cdef int fd
        self.loop = loop
        self.cb = cb
        self.direct = direct
        self.on_refused = on_refused
        fd = fcntl(lsock.fileno(), F_DUPFD_CLOEXEC, 0)
        if fd < 0:
            raise OSError(errno, _os.strerror(errno))
        l = <Listener *>calloc(1, sizeof(Listener))
        if l != NULL:
            l.plans = <PlanCache *>calloc(1, sizeof(PlanCache))
            l.clients = <ClientTab *>calloc(1, sizeof(ClientTab))
            if l.plans == NULL or l.clients == NULL:
                free(l.plans)
                free(l.clients)
                free(l)
                l = NULL
        if l == NULL:
            close(fd)
            raise MemoryError()
        pthread_mutex_init(&l.plans.mu, NULL)
        pthread_mutex_init(&l.clients.mu, NULL)
        l.fd = fd
        l.mode = mode
        l.hs_timeout = hs_timeout
        l.max_hs = max_handshakes if max_handshakes > 0 else 0x7fffffff
        l.connect_timeout = connect_timeout
        l.idle = idle_timeout if idle_timeout == idle_timeout else 1e300
        l.total = total_timeout if total_timeout == total_timeout else 1e300
        l.refs = 2                    # this object + the worker
        l.owner = <PyObject *>self
        while True:
            try:
                e = _get_engine()
            except BaseException:
                close(fd)
                pthread_mutex_destroy(&l.plans.mu)
                free(l.plans)
                _clients_free(l.clients)
                free(l)
                raise
            w = e.pick()
            pthread_mutex_lock(&w.mu)
            if not w.stopping:
                l.w = w
                l.snext = w.lsub
                w.lsub = l
                _wake_locked(w)
                pthread_mutex_unlock(&w.mu)
                break
            pthread_mutex_unlock(&w.mu)
        self.e = e
        self.l = l

    # ── cached plans (see _plans.pxi) ────────────────────────────────────────

    @property
    def plan_generation(self):
        """The generation plans are stored under (see ``clear_plans``; read under the lock)."""
        cdef PlanCache *c = self.l.plans
        cdef uint64_t g
        with nogil:
            pthread_mutex_lock(&c.mu)
            g = c.gen
            pthread_mutex_unlock(&c.mu)
        return g

    def set_plan(self, int proto, bytes host, int port, tuple plan, double ttl, gen=None, str record_host=None,
                 bytes client=None):
        """Cache ``plan`` for (proto, host as the client sent it, port) for ``ttl`` seconds
        (proto 0 CONNECT, 1 SOCKS5, 2 a forwarded plain-HTTP request, ``http://host:port/...``).

        ``plan`` is ``("direct", [IP strings], ok_reply[, inspect])`` (``inspect`` as for
        ``_Handshake.dial``: the tunnels it opens are inspected ones), ``("refuse", reply, reason)`` or
        ``("chain", upstream_ip, upstream_port, connect_request, ok_reply)``. ``ttl``: ``inf``
        keeps it until ``clear_plans()``; ``<= 0`` stores nothing. With ``gen`` (a
        ``plan_generation`` read before deciding) a plan decided before a ``clear_plans()`` is
        dropped. Refusals served from the plan (and an upstream's refusal of a chained one) are
        recorded under ``record_host`` (default: ``host``). ``client``: the named client the
        plan is for (``set_clients``; its handshakes carry its name), None for anonymous ones.
        Returns whether it was stored (hosts over 255 bytes, or a client name the engine does
        not take, never are)."""
        cdef Plan *p
        cdef PlanCache *c = self.l.plans
        cdef Py_ssize_t i, n
        cdef bytes reply, req = None, reason = b"", rhost
        cdef int kind
        if not ttl > 0 or proto not in (0, 1, 2) or not 0 <= port <= 65535 or len(host) == 0 \
                or len(host) > PLAN_HOST_MAX:
            return False
        if client is not None and not _client_name_ok(<const unsigned char *><char *>client, len(client)):
            return False
        what = plan[0]
        inspect = None
        if what == "direct":
            kind = PLAN_DIRECT
            addresses = [str(a).encode("ascii") for a in plan[1]]
            reply = plan[2]
            dport = port
            if len(plan) > 3:
                inspect = plan[3]             # an inspected tunnel's (see _Handshake.dial)
        elif what == "refuse":
            kind = PLAN_REFUSE
            addresses = []
            reply = plan[1]
            reason = str(plan[2]).encode("ascii")[:REASON_MAX - 1]
        elif what == "chain":
            kind = PLAN_CHAIN
            addresses = [str(plan[1]).encode("ascii")]
            dport = int(plan[2])
            req = plan[3]
            reply = plan[4]
        else:
            raise ValueError(f"unknown plan kind {what!r}")
        rhost = host if record_host is None else record_host.encode("utf-8", "backslashreplace")[:PLAN_HOST_MAX]
        n = len(addresses)
        if kind != PLAN_REFUSE and n == 0:
            raise ValueError("a plan to dial needs an address")
        p = <Plan *>calloc(1, sizeof(Plan))
        if p == NULL:
            raise MemoryError()
        p.kind = kind
        p.proto = proto
        p.port = port
        p.hostn = <int>len(host)
        memcpy(p.host, <char *>host, len(host))
        p.rhostn = <int>len(rhost)
        memcpy(p.rhost, <char *>rhost, len(rhost))
        p.expires = _mono() + ttl
        if client is not None:
            p.clientn = <int>len(client)
            memcpy(p.client, <char *>client, len(client))
        memcpy(p.reason, <char *>reason, len(reason))
        p.addrs = <kr_addr *>calloc(n + 1, sizeof(kr_addr))
        p.reply = _dup(<char *>reply, len(reply))
        p.replyn = len(reply)
        if req is not None:
            p.req = _dup(<char *>req, len(req))
            p.reqn = len(req)
        if p.addrs == NULL or p.reply == NULL or (req is not None and p.req == NULL):
            _plan_free(p)
            raise MemoryError()
        for i in range(n):
            if kr_addr_set(&p.addrs[i], addresses[i], dport) < 0:
                _plan_free(p)
                raise ValueError(f"not an IP address: {addresses[i]!r}")
        p.naddr = <int>n
        if inspect is not None:
            try:
                p.ispec = _ispec_new(NULL, inspect, dport)
            except BaseException:
                _plan_free(p)
                raise
        cdef bint check = gen is not None
        cdef uint64_t g = gen if check else 0
        with nogil:
            pthread_mutex_lock(&c.mu)
        if check and g != c.gen:
            pthread_mutex_unlock(&c.mu)
            _plan_free(p)
            return False
        _plan_put(c, p)
        pthread_mutex_unlock(&c.mu)
        return True

    def clear_plans(self, gen=None):
        """Drop every cached plan: once this returns, none is used (call it on every policy
        change: filter, upstream, guard, decider).

        ``gen``: the generation of the policy now in force (the server passes its policy's
        own, which never restarts, unlike a new listener's cache): from now on only plans
        decided under it are stored. It only moves forward (two changes whose calls cross
        keep the newer). Without it the cache's own generation is bumped."""
        cdef PlanCache *c = self.l.plans
        cdef bint given = gen is not None
        cdef uint64_t g = gen if given else 0
        with nogil:
            pthread_mutex_lock(&c.mu)
            _plans_clear(c)
            if not given:
                c.gen += 1
            elif g > c.gen:
                c.gen = g
            pthread_mutex_unlock(&c.mu)

    # ── named clients (see _clients.pxi) ─────────────────────────────────────

    def set_clients(self, list clients, bint require_auth):
        """The clients the engine knows: ``(name bytes, sha256 bytes or None, max_tunnels,
        rate, burst, upload, period)`` each (-1 / 0: no such limit). Counters of a client that
        stays are kept; one that goes is marked dead (its live tunnels keep their slot)."""
        cdef ClientTab *ct = self.l.clients
        cdef ClientEnt *e
        cdef ClientEnt *made
        cdef bytes name
        cdef uint64_t b
        cdef int i, live = 0
        entries = []
        for item in clients:
            name = item[0]
            if not _client_name_ok(<const unsigned char *><char *>name, len(name)):
                raise ValueError(f"the engine takes no client named {name!r}")
            if item[1] is not None and len(item[1]) != 32:
                raise ValueError("a token hash is 32 bytes")
            entries.append(item)
        pthread_mutex_lock(&ct.mu)
        for i in range(CLIENT_BUCKETS):
            e = ct.buckets[i]
            while e != NULL:
                e.dead = True
                e = e.next
        for item in entries:
            name = item[0]
            e = _client_lookup(ct, <char *>name, <int>len(name), True)
            if e == NULL:
                made = <ClientEnt *>calloc(1, sizeof(ClientEnt))
                if made == NULL:
                    continue              # (this client's handshakes then go to Python)
                e = made
                e.namen = <int>len(name)
                memcpy(e.name, <char *>name, len(name))
                e.wstart = -1.0
                e.refilled = _mono()
                b = _client_hash(e.name, e.namen) % CLIENT_BUCKETS
                e.next = ct.buckets[b]
                ct.buckets[b] = e
                e.tokens = -1.0           # filled below
            e.dead = False
            e.has_hash = item[1] is not None
            if e.has_hash:
                memcpy(e.hash, <char *>item[1], 32)
            e.max_tunnels = item[2]
            e.rate = item[3]
            e.burst = item[4]
            if e.tokens < 0 or e.tokens > e.burst:
                e.tokens = e.burst
            e.upload = item[5]
            e.period = item[6]
            live += 1
        kr_store_int(&ct.live, live)
        kr_store_int(&ct.require_auth, require_auth)
        pthread_mutex_unlock(&ct.mu)

    def client_take(self, bytes name):
        """Admit one tunnel or request of a known client: None, or the limit's reason."""
        cdef ClientTab *ct = self.l.clients
        cdef ClientEnt *e
        cdef int r = CL_OK
        pthread_mutex_lock(&ct.mu)
        e = _client_lookup(ct, <char *>name, <int>len(name), False)
        if e != NULL:
            r = _client_take(e, _mono())
        pthread_mutex_unlock(&ct.mu)
        return (None, "upload_budget", "too_many_tunnels", "rate_limited")[r]

    def client_release(self, bytes name, unsigned long long up):
        """A tunnel or request of ``name`` ended with ``up`` bytes to its origin: True when
        that spent its upload budget (the engine then closes the client's tunnels)."""
        cdef ClientTab *ct = self.l.clients
        cdef ClientEnt *e
        cdef bint spent = False
        pthread_mutex_lock(&ct.mu)
        e = _client_lookup(ct, <char *>name, <int>len(name), True)
        if e != NULL:
            spent = _client_release(e, up, _mono())
        pthread_mutex_unlock(&ct.mu)
        if spent:
            self.kill_client()
        return spent

    def engine_counters(self):
        """The metrics of the tunnels the engine served from cached plans: ``{client name or
        None: (tunnels over HTTP, tunnels over SOCKS5, bytes up, bytes down, open)}``."""
        cdef ClientTab *ct = self.l.clients
        cdef ClientEnt *e
        cdef int i
        out = {}
        pthread_mutex_lock(&ct.mu)
        out[None] = (ct.a_tunnels[0], ct.a_tunnels[1], ct.a_up, ct.a_down, ct.a_open)
        for i in range(CLIENT_BUCKETS):
            e = ct.buckets[i]
            while e != NULL:
                if e.m_tunnels[0] or e.m_tunnels[1] or e.m_open:
                    out[e.name[:e.namen].decode("ascii")] = (e.m_tunnels[0], e.m_tunnels[1], e.m_up, e.m_down,
                                                             e.m_open)
                e = e.next
        pthread_mutex_unlock(&ct.mu)
        return out

    def kill_client(self):
        """Have the worker close the tunnels of every client whose budget is spent."""
        cdef Listener *l = self.l
        kr_store_int(&l.clients.kill_pending, 1)
        pthread_mutex_lock(&l.w.mu)
        _wake_locked(l.w)
        pthread_mutex_unlock(&l.w.mu)

    def plan_stats(self):
        """Counters of the plan cache (read racily): plans held, hits, misses, refusals served
        from plans, evictions, and tunnels opened from plans still running."""
        cdef PlanCache *c = self.l.plans
        return {"plans": c.count, "hits": c.hits, "misses": c.misses, "refused": c.refused,
                "evicted": c.evicted, "live": kr_load_ssize(&self.l.nlive)}

    @property
    def shed(self):
        """Handshakes shed so far (at ``max_handshakes``, or for want of fds)."""
        return self.l.shed if self.l != NULL else 0

    def close(self):
        """Stop accepting (the engine closes its copy of the listener and open handshakes)."""
        cdef Listener *l = self.l
        if l == NULL or (self.e is not None and self.e.forked):
            return                    # (a forked child's copy: the engine closed its fd)
        pthread_mutex_lock(&l.w.mu)
        l.closing = True
        _wake_locked(l.w)
        pthread_mutex_unlock(&l.w.mu)

    def __dealloc__(self):
        cdef Listener *l = self.l
        if l == NULL or (self.e is not None and self.e.forked):
            return                    # a forked child's copy: lock nothing
        self.close()
        pthread_mutex_lock(&l.w.completer.mu)
        l.owner = NULL
        pthread_mutex_unlock(&l.w.completer.mu)
        self.l = NULL
        _l_drop(l.w.completer, l)


cdef class _Handshake:
    """A connection whose handshake the engine read; answer it exactly once."""
    cdef Hs *hs
    cdef readonly int proto           # 0 HTTP, 1 SOCKS5
    cdef readonly bint overflow       # the HTTP head did not end within 8 KiB
    cdef readonly bytes data          # HTTP: everything read; SOCKS5: the request onwards
    cdef readonly object user         # SOCKS5 RFC 1929 username (bytes), None without auth

    def __dealloc__(self):
        if self.hs != NULL:
            _close_fd(&self.hs.fd)
            free(self.hs)
            self.hs = NULL

    cdef int take(self) except -1:
        cdef int fd
        if self.hs == NULL:
            raise ValueError("handshake already answered")
        fd = self.hs.fd
        free(self.hs)
        self.hs = NULL
        return fd

    def close(self):
        if self.hs != NULL:
            _close_fd(&self.hs.fd)
            free(self.hs)
            self.hs = NULL

    def reply_and_close(self, const unsigned char[:] reply):
        """Send ``reply`` (non-blocking, best effort: a fresh socket takes it) and close."""
        cdef int fd = self.take()
        if reply.shape[0] > 0:
            _send_all_nb(fd, <const char *>&reply[0], reply.shape[0])
        close(fd)

    def detach(self):
        """The fd (non-blocking) for the asyncio path; the caller owns it."""
        return self.take()

    def dial(self, addresses, int port, bytes ok_reply, bytes early, connect_timeout, idle, total, bint socks,
             loop=None, on_done=None, inspect=None):
        """Connect to ``addresses`` in order (IP literals, already judged) within ``connect_timeout``;
        on success send ``ok_reply`` to the client and ``early`` to the target and relay the pair.
        Returns the tunnel's handle (its ``fut`` resolves like ``relay_with_timeouts``; a failed
        dial raises ``DialError`` after the protocol's failure reply went to the client).

        ``inspect``: ``(TlsContext server, TlsContext client, RequestRules, host, client name)``
        serves the tunnel as an inspected one (``_inspect.pxi``) instead of relaying it blind."""
        cdef Py_ssize_t n = len(addresses), i
        cdef Tunnel *t
        cdef _TunnelHandle h
        if self.hs == NULL:
            raise ValueError("handshake already answered")
        if n == 0:
            raise ValueError("no address to dial")
        t = _tunnel_new(idle, total)
        if t == NULL:
            raise MemoryError()
        t.addrs = <kr_addr *>calloc(n, sizeof(kr_addr))
        t.okrep = <char *>malloc(len(ok_reply) + 1)
        t.early = <char *>malloc(len(early) + 1)
        if t.addrs == NULL or t.okrep == NULL or t.early == NULL:
            _tunnel_free(t)
            raise MemoryError()
        for i in range(n):
            a = str(addresses[i]).encode("ascii")
            if kr_addr_set(&t.addrs[i], a, port) < 0:
                _tunnel_free(t)
                raise ValueError(f"not an IP address: {addresses[i]!r}")
        t.naddr = <int>n
        if inspect is not None:
            try:
                t.ispec = _ispec_new(self.hs.l, inspect, port)
            except BaseException:
                _tunnel_free(t)
                raise
        memcpy(t.okrep, <char *>ok_reply, len(ok_reply))
        t.okn = len(ok_reply)
        memcpy(t.early, <char *>early, len(early))
        t.earlyn = len(early)
        t.socks = socks
        t.phase = PH_CONNECT
        t.cdeadline = t.start + <double>connect_timeout
        try:
            if loop is None:
                loop = _asyncio.get_running_loop()
            h = _handle_new(loop, idle, total, on_done)     # (raises with the handshake still ours)
        except BaseException:
            _tunnel_free(t)
            raise
        t.fd[0] = self.take()
        return _tunnel_submit(t, h)


def native_listen(lsock, mode, handshake_timeout, loop, cb, direct=None, on_refused=None,
                  connect_timeout=10.0, idle_timeout=300.0, total_timeout=3600.0, max_handshakes=0):
    """Serve ``lsock``'s handshakes in the engine (mode: "http", "socks5" or "mux"), at most
    ``max_handshakes`` at once (0: unbounded; past it, or out of fds, the oldest are shed).

    A handshake with a cached plan (``set_plan``) is served in the engine: dialled within
    ``connect_timeout`` and relayed with the idle / total caps, or refused; those refusals go
    to ``on_refused(records, dropped)`` on the engine's completer thread, in order, in batches
    (records: ``(epoch_time, proto, host_bytes, port, reason, upstream_status)``; ``dropped``: how many the
    bounded queue lost). Every other batch first goes to ``direct(items) -> items left`` on
    the completer thread (when given), then what is left (and any accept error) to
    ``cb(items, err)`` on ``loop``."""
    return _NativeListener(lsock, {"http": 0, "socks5": 1, "mux": 2}[mode], handshake_timeout, loop, cb, direct,
                           on_refused, connect_timeout, idle_timeout, total_timeout, max_handshakes)


def _plan_key(int proto, bytes data, bint named=False):
    """Test hook: the (host, port, head length) the engine would look a plan up by, or None;
    with ``named`` (a client table in use) also the ``Proxy-Authorization`` value it read
    (None without one). ``data``: an HTTP head (proto 0) or a SOCKS5 request from its VER
    byte on (proto 1)."""
    cdef size_t off = 0, end = 0, aoff = 0, alen = 0
    cdef int hostn = 0, port = 0
    cdef bint ok
    if proto == 0:
        ok = _http_key(data, len(data), &off, &hostn, &port, &end, named, &aoff, &alen)
    else:
        ok = _socks_key(data, len(data), &off, &hostn, &port, &end)
    if not ok:
        return None
    if named:
        return data[off:off + hostn], port, end, (data[aoff:aoff + alen] if alen else None)
    return data[off:off + hostn], port, end


def _sha256(bytes data):
    """Test hook: the engine's own SHA-256 (held to hashlib's)."""
    cdef unsigned char out[32]
    kr_sha256(<const unsigned char *><char *>data, len(data), out)
    return out[:32]


def _b64decode(bytes data):
    """Test hook: the engine's strict base64 (held to ``base64.b64decode(validate=True)``);
    None where it refuses."""
    cdef unsigned char out[512]
    cdef int n = kr_b64decode(<const unsigned char *><char *>data, len(data), out, sizeof(out))
    return None if n < 0 else out[:n]

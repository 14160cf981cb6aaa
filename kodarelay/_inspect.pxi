# Inspected tunnels in the engine: the worker's side of kodarelay/_inspect.c (the machine that
# decrypts, judges and forwards each request), and the Python objects that feed it (TLS
# contexts, a host's compiled request rules). kodarelay.inspection decides which tunnels come
# here (``ProxyServer._engine_inspection``); the rest run on the asyncio path as before.


cdef void _ispec_free(InspSpec *s) noexcept nogil:
    if s == NULL:
        return
    kr_ctx_unref(s.sctx)
    kr_ctx_unref(s.cctx)
    kr_rules_unref(s.rules)
    kr_secrets_unref(s.secrets)
    if s.rl != NULL:
        _l_drop(s.cm, s.rl)
    free(s)


cdef InspSpec *_ispec_copy(InspSpec *s) noexcept nogil:
    """A tunnel's spec from a cached plan's (references taken; no listener yet): NULL when out
    of memory."""
    cdef InspSpec *n = <InspSpec *>malloc(sizeof(InspSpec))
    if n == NULL:
        return NULL
    memcpy(n, s, sizeof(InspSpec))
    if n.sctx != NULL:
        kr_ctx_ref(n.sctx)
    if n.cctx != NULL:
        kr_ctx_ref(n.cctx)
    kr_rules_ref(n.rules)
    if n.secrets != NULL:
        kr_secrets_ref(n.secrets)
    n.rl = NULL
    return n


cdef void _ispec_bind(InspSpec *s, Listener *l) noexcept nogil:
    """The listener that records the tunnel's violations (a reference of the tunnel's)."""
    s.cm = l.w.completer
    s.hs_timeout = l.hs_timeout
    pthread_mutex_lock(&s.cm.mu)
    l.refs += 1
    pthread_mutex_unlock(&s.cm.mu)
    s.rl = l


cdef void _insp_records(Tunnel *t) noexcept nogil:
    """The violations the machine found, to its listener's refusal ring (any worker: the ring
    and the completer's queue are guarded by the completer's mutex)."""
    cdef kr_rec *r = kr_insp_take(t.insp)
    cdef kr_rec *n
    cdef InspSpec *s = t.ispec
    cdef Listener *l = s.rl
    cdef Completer *cm = s.cm
    cdef Refusal *slot
    if l == NULL:
        while r != NULL:              # (no listener: nobody to record them)
            n = r.next
            kr_rec_free(r)
            r = n
        return
    cdef bint named
    cdef const char *none = ""
    if r == NULL:
        return
    pthread_mutex_lock(&cm.mu)
    while r != NULL:
        slot = _refusal_slot(l)
        if slot != NULL:
            named = strcmp(r.reason, "host_mismatch") != 0          # (as Python records it: no client)
            _refusal_fill(slot, 1 if t.socks else 0, <const char *>s.host if r.has_host else none,
                          s.hostn if r.has_host else 0, s.port if r.has_host else 0, r.reason, 0,
                          <const char *>s.client if named else none,
                          s.clientn if named else 0)
            slot.kind = 1
            memcpy(slot.method, r.method, 33)
            slot.path = r.path
            slot.detail = r.detail
            r.path = NULL
            r.detail = NULL
        n = r.next
        kr_rec_free(r)
        r = n
    _l_queue_locked(cm, l)
    pthread_mutex_unlock(&cm.mu)


cdef void _insp_service(Worker *w, Tunnel *t, double now) noexcept nogil:
    cdef int r = kr_insp_run(t.insp)
    cdef int e
    cdef int ofd = kr_insp_origin_fd(t.insp)
    cdef epoll_event ev
    if ofd >= 0 and ofd != t.fd[1]:
        # an idle origin connection of an earlier tunnel took over: the one dialled goes
        if t.registered:
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
        _close_fd(&t.fd[1])
        t.fd[1] = ofd
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>t | <uint64_t>1
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, ofd, &ev) < 0:
            _insp_records(t)
            _finish_errno(w, t, errno)
            return
    if kr_insp_handshaking(t.insp):
        pass                        # the handshake's deadline runs from the tunnel's start
    else:
        if t.idle != t.ispec.idle:
            t.idle = t.ispec.idle   # (a later deadline: the heap fixes its key lazily)
        t.last = now
    _insp_records(t)
    if r == KR_I_DONE:
        _finish(w, t, RES_OK, 0)
    elif r == KR_I_ERROR:
        e = kr_insp_errno(t.insp)
        _finish_errno(w, t, e if e != 0 else 71)      # (EPROTO)
    elif r == KR_I_MORE:
        _rq_push(w, t, 3)
    elif r == KR_I_HANDBACK:
        _insp_handback(w, t)


cdef void _insp_handback(Worker *w, Tunnel *t) noexcept nogil:
    """The forwarded connection goes back to Python with the bytes it has not read (the
    origin's connection ends here)."""
    cdef const char *p = NULL
    cdef size_t n = kr_insp_leftover(t.insp, &p)
    t.hb = <char *>malloc(n + 1)
    if t.hb == NULL:
        _finish_errno(w, t, ENOMEM)
        return
    memcpy(t.hb, p, n)
    t.hbn = n
    if t.registered:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[0], NULL)
    t.hbfd = t.fd[0]
    t.fd[0] = -1
    _finish(w, t, RES_HANDBACK, 0)


cdef void _insp_end(Tunnel *t) noexcept nogil:
    """(from _finish) the machine's counts become the tunnel's, its last records are queued."""
    if t.insp != NULL:
        t.d[0].moved = kr_insp_up(t.insp)
        t.d[1].moved = kr_insp_down(t.insp)
        _insp_records(t)
        kr_insp_free(t.insp)
        t.insp = NULL
    _ispec_free(t.ispec)
    t.ispec = NULL


cdef int _insp_start(Tunnel *t) noexcept nogil:
    """(``_begin_relay``) connected: the machine takes over. The ok reply goes out first, the
    client's early bytes are the machine's to read, and until the client's first bytes and
    TLS handshake are done the idle cap is ``handshake_timeout``. 0, or ENOMEM."""
    cdef InspSpec *s = t.ispec
    t.insp = kr_insp_new(t.fd[0], t.fd[1], s.sctx, s.cctx, s.rules, s.host, s.port, t.early, t.earlyn)
    if t.insp == NULL or kr_insp_reply(t.insp, t.okrep, t.okn) < 0:
        return ENOMEM
    kr_insp_set_secrets(t.insp, s.secrets)
    if s.forward:
        kr_insp_set_forward(t.insp)
    s.idle = t.idle
    if s.hs_timeout < t.idle:
        t.idle = s.hs_timeout
    return 0


# ── Python's side ────────────────────────────────────────────────────────────

cdef class TlsContext:
    """An OpenSSL context of the engine's (never one of the ``ssl`` module's)."""
    cdef kr_ctx *c

    def __dealloc__(self):
        kr_ctx_unref(self.c)


def tls_server_context(bytes pem):
    """A server context presenting ``pem`` (leaf, chain, key), ALPN ``http/1.1`` only."""
    cdef char err[300]
    cdef TlsContext t = TlsContext.__new__(TlsContext)
    err[0] = 0
    t.c = kr_server_ctx(pem, len(pem), err, sizeof(err))
    if t.c == NULL:
        raise ValueError(err.decode("utf-8", "replace"))
    return t


def tls_client_context(cafile=None):
    """A client context verifying origins (chain, name) against ``cafile`` or the system's store."""
    cdef char err[300]
    cdef TlsContext t = TlsContext.__new__(TlsContext)
    cdef bytes path = _os.fsencode(cafile) if cafile is not None else None
    err[0] = 0
    t.c = kr_client_ctx(<const char *>path if path is not None else NULL, err, sizeof(err))
    if t.c == NULL:
        raise ValueError(err.decode("utf-8", "replace"))
    return t


def tls_engine():
    """The OpenSSL the engine's inspected tunnels use, or None when this build has none."""
    return kr_tls_version().decode("ascii", "replace") if kr_tls_available() else None


cdef class RequestRules:
    """A host's request rules compiled for the engine: ``judged`` (its requests are judged at
    all), then ``(deny, methods or None, path pattern or None, rule text)`` in rule order."""
    cdef kr_rules *r

    def __cinit__(self, bint judged, rules=()):
        cdef bytes m, p, txt
        self.r = kr_rules_new(judged)
        if self.r == NULL:
            raise MemoryError()
        for deny, methods, path, text in rules:
            m = b"".join(x.encode("ascii") + b"\0" for x in sorted(methods)) + b"\0" if methods is not None else None
            p = path.encode("ascii") if path is not None else None
            txt = text.encode("utf-8", "replace")
            if kr_rules_add(self.r, 1 if deny else 0, <const char *>m if m is not None else NULL,
                            len(m) if m is not None else 0, <const char *>p if p is not None else NULL, txt) < 0:
                raise MemoryError()

    def __dealloc__(self):
        kr_rules_unref(self.r)

    def judge(self, str method, str path):
        """``(reason or None, rule text or None, detail or None)`` for one request (the
        engine's ``Filter.explain_request`` for this host; tests hold the two together)."""
        cdef bytes m = method.encode("latin-1"), p = path.encode("latin-1")
        cdef const char *rule = NULL
        cdef const char *detail = NULL
        cdef const char *why = kr_rules_judge(self.r, m, len(m), p, len(p), &rule, &detail)
        return (None if why == NULL else why.decode("ascii"), None if rule == NULL else rule.decode("utf-8"),
                None if detail == NULL else detail.decode("ascii"))


cdef class SecretTable:
    """A server's secrets as one tunnel's host sees them: ``(name, phantom, value, hosts
    text, covers)`` each (at most 32); the engine wipes the values when it lets them go."""
    cdef kr_secrets *s

    def __cinit__(self, secrets):
        cdef bytes name, phantom, value, hosts
        self.s = kr_secrets_new()
        if self.s == NULL:
            raise MemoryError()
        for name_s, phantom, value, hosts_s, covers in secrets:
            name = name_s.encode("ascii")
            hosts = hosts_s.encode("utf-8", "replace")
            if kr_secrets_add(self.s, name, phantom, len(phantom), value, len(value), hosts, 1 if covers else 0) < 0:
                raise ValueError("the engine takes at most 32 secrets, none empty")

    def __dealloc__(self):
        kr_secrets_unref(self.s)

    def __reduce__(self):
        raise TypeError("a SecretTable is not pickled: its values stay in this process")


def _inspect_fail_after(int n):
    """(tests) the Nth allocation of the engine's inspect / forward machines fails (0: none)."""
    kr_inspect_fail_after(n)


def _glob(str pattern, str path):
    cdef bytes a = pattern.encode("latin-1"), b = path.encode("latin-1")
    return bool(kr_glob(a, len(a), b, len(b)))


def _bad_path(str path):
    cdef bytes b = path.encode("latin-1")
    cdef const char *why = kr_bad_path(b, len(b))
    return None if why == NULL else why.decode("ascii")


cdef InspSpec *_ispec_new(Listener *l, inspect, int port) except NULL:
    """(``_Handshake.dial``, ``set_plan``) the spec of an inspected tunnel, holding references
    (of ``l`` too, unless NULL: a cached plan's template)."""
    cdef TlsContext sc
    cdef TlsContext cc
    cdef RequestRules rr
    cdef SecretTable st = None
    cdef bytes host, client
    cdef InspSpec *s
    sc, cc, rr, host_s, client_s = inspect[:5]
    if len(inspect) > 5 and inspect[5] is not None:
        st = inspect[5]
    forward = len(inspect) > 6 and inspect[6]
    host = host_s.encode("ascii")
    client = client_s.encode("ascii") if client_s is not None else b""
    if len(host) > PLAN_HOST_MAX or len(client) > CLIENT_MAX or b"\0" in host:
        raise ValueError("host or client too long for the engine")
    s = <InspSpec *>calloc(1, sizeof(InspSpec))
    if s == NULL:
        raise MemoryError()
    s.sctx = sc.c if sc is not None else NULL
    s.cctx = cc.c if cc is not None else NULL
    s.rules = rr.r
    s.forward = bool(forward)
    if s.sctx != NULL:
        kr_ctx_ref(s.sctx)
    if s.cctx != NULL:
        kr_ctx_ref(s.cctx)
    kr_rules_ref(s.rules)
    if st is not None:
        s.secrets = st.s
        kr_secrets_ref(s.secrets)
    memcpy(s.host, <const char *>host, len(host))
    s.hostn = <int>len(host)
    s.port = port
    memcpy(s.client, <const char *>client, len(client))
    s.clientn = <int>len(client)
    if l != NULL:
        _ispec_bind(s, l)
    return s

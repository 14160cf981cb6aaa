# Cached tunnel plans: a handshake whose (protocol, host as sent, port) has a live plan is
# answered, dialled, chained or refused here, on the worker, without the GIL.
#
# Python decides every plan (``kodarelay.serving``) and stores it with
# ``_NativeListener.set_plan``; the engine only looks plans up. Only a head the engine reads
# with certainty can hit: ``_http_key`` / ``_socks_key`` accept a strict subset of what the
# Python parsers (``_relay_py``, the specification) accept, and a head they decline is a miss,
# delivered to Python as before. Concurrent misses for one key all go to Python, which
# coalesces them (one resolution per name).

cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if c >= 0x41 and c <= 0x5A else c


cdef int _port_of(const unsigned char *p, size_t n) noexcept nogil:
    """1..5 ASCII digits naming 1-65535 (as ``split_host_port``), else -1."""
    cdef size_t i
    cdef int v = 0
    if n < 1 or n > 5:
        return -1
    for i in range(n):
        if p[i] < 0x30 or p[i] > 0x39:
            return -1
        v = v * 10 + (p[i] - 0x30)
    if v < 1 or v > 65535:
        return -1
    return v


cdef bint _http_key(const char *buf, size_t n, size_t *host_off, int *hostn, int *port,
                    size_t *end) noexcept nogil:
    """The target of a plain, well-formed ``CONNECT host:port HTTP/1.x`` head in ``buf``.

    Strict on purpose: ``CONNECT``, one space, an authority of visible ASCII (``host:port`` or
    ``[v6]:port``, as ``split_host_port`` splits it), one space, ``HTTP/1.0`` or ``HTTP/1.1``;
    then header lines ``name: value`` (a token, visible ASCII, spaces and tabs; no obs-fold,
    no bare CR or LF) and the blank line. A ``Proxy-Authorization`` header is a miss too (its
    user names the client, which plans do not carry). Anything else is a miss.
    """
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t i, s, tend, line, colon, k, hend = 0
    cdef size_t c
    cdef int pv
    # the first CRLFCRLF ends the head (http_head_end)
    i = 0
    while i + 3 < n:
        if p[i] == 13 and p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            hend = i + 4
            break
        i += 1
    if hend == 0:
        return False
    if hend < 8 + 1 + 1 + 8 + 4 or memcmp(p, b"CONNECT ", 8) != 0:
        return False
    s = 8
    i = s
    while i < hend and p[i] > 0x20 and p[i] < 0x7F:
        i += 1
    tend = i
    if tend == s or tend + 9 + 2 > hend or p[tend] != 0x20:
        return False
    if memcmp(p + tend + 1, b"HTTP/1.", 7) != 0 or (p[tend + 8] != 0x30 and p[tend + 8] != 0x31):
        return False
    if p[tend + 9] != 13 or p[tend + 10] != 10:
        return False
    # the authority, split as split_host_port does
    if p[s] == 0x5B:                                  # "[v6]:port"
        c = s + 1
        while c < tend and p[c] != 0x5D:
            c += 1
        if c >= tend or c == s + 1 or c + 1 >= tend or p[c + 1] != 0x3A:
            return False
        pv = _port_of(p + c + 2, tend - c - 2)
        k = c + 1 - s
    else:
        c = tend
        while c > s and p[c - 1] != 0x3A:
            c -= 1
        if c == s:                                    # no colon
            return False
        c -= 1                                        # the last colon
        if c == s:
            return False
        for k in range(s, c):
            if p[k] == 0x3A or p[k] == 0x5B or p[k] == 0x5D:
                return False
        pv = _port_of(p + c + 1, tend - c - 1)
        k = c - s
    if pv < 0 or k > PLAN_HOST_MAX:
        return False
    # header lines up to the blank line
    line = tend + 11
    while line < hend - 2:
        colon = 0
        i = line
        while i < hend and p[i] != 13:
            if p[i] == 10:
                return False
            if colon == 0:
                if p[i] == 0x3A:
                    if i == line:
                        return False
                    colon = i
                elif not _tchar(p[i]):
                    return False
            elif not ((p[i] >= 0x20 and p[i] < 0x7F) or p[i] == 9):
                return False
            i += 1
        if colon == 0 or i + 1 >= hend or p[i + 1] != 10:
            return False
        if colon - line == 19:
            for c in range(19):
                if _lower(p[line + c]) != (<const unsigned char *>b"proxy-authorization")[c]:
                    break
            else:
                return False
        line = i + 2
    host_off[0] = s
    hostn[0] = <int>k
    port[0] = pv
    end[0] = hend
    return True


cdef bint _socks_key(const char *buf, size_t n, size_t *host_off, int *hostn, int *port,
                     size_t *end) noexcept nogil:
    """The target of a SOCKS5 CONNECT to a DOMAIN (as ``parse_socks5_request`` reads it);
    other commands and address types are misses. The name is not checked for UTF-8: Python
    only stores plans under names it decoded, so undecodable bytes never match one."""
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t dn
    if n < 7 or p[0] != 5 or p[1] != 1 or p[3] != 3:
        return False
    dn = p[4]
    if dn == 0 or n < 7 + dn:
        return False
    host_off[0] = 5
    hostn[0] = <int>dn
    port[0] = (p[5 + dn] << 8) | p[6 + dn]
    end[0] = 7 + dn
    return True


cdef inline uint64_t _plan_hash(int proto, const char *host, int hostn, int port) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(hostn):
        h = (h ^ <unsigned char>host[i]) * 1099511628211ULL
    h = (h ^ <uint64_t>(port * 2 + proto)) * 1099511628211ULL
    return h ^ (h >> 29)


cdef void _plan_free(Plan *p) noexcept nogil:
    free(p.addrs)
    free(p.reply)
    free(p.req)
    free(p)


cdef void _plan_unlink(PlanCache *c, Plan *p) noexcept nogil:
    """Take ``p`` out of its bucket and the age list (caller holds c.mu and frees it)."""
    cdef Plan **pp = &c.buckets[_plan_hash(p.proto, p.host, p.hostn, p.port) % PLAN_BUCKETS]
    while pp[0] != NULL and pp[0] != p:
        pp = &pp[0].hnext
    if pp[0] == p:
        pp[0] = p.hnext
    if p.older != NULL:
        p.older.newer = p.newer
    else:
        c.oldest = p.newer
    if p.newer != NULL:
        p.newer.older = p.older
    else:
        c.newest = p.older
    c.count -= 1


cdef Plan *_plan_find(PlanCache *c, int proto, const char *host, int hostn, int port,
                      double now) noexcept nogil:
    """The live plan for the key, or NULL; an expired one is dropped (caller holds c.mu)."""
    cdef Plan *p = c.buckets[_plan_hash(proto, host, hostn, port) % PLAN_BUCKETS]
    while p != NULL:
        if p.port == port and p.proto == proto and p.hostn == hostn and memcmp(p.host, host, hostn) == 0:
            if p.expires <= now:
                _plan_unlink(c, p)
                _plan_free(p)
                return NULL
            return p
        p = p.hnext
    return NULL


cdef void _plan_put(PlanCache *c, Plan *p) noexcept nogil:
    """Store ``p`` (caller holds c.mu), replacing the plan for its key, evicting the oldest
    beyond PLAN_MAX."""
    cdef Plan *old = _plan_find(c, p.proto, p.host, p.hostn, p.port, -1.0)
    cdef Plan **b
    if old != NULL:
        _plan_unlink(c, old)
        _plan_free(old)
    while c.count >= PLAN_MAX and c.oldest != NULL:
        old = c.oldest
        _plan_unlink(c, old)
        _plan_free(old)
        c.evicted += 1
    b = &c.buckets[_plan_hash(p.proto, p.host, p.hostn, p.port) % PLAN_BUCKETS]
    p.hnext = b[0]
    b[0] = p
    p.newer = NULL
    p.older = c.newest
    if c.newest != NULL:
        c.newest.newer = p
    else:
        c.oldest = p
    c.newest = p
    c.count += 1


cdef void _plans_clear(PlanCache *c) noexcept nogil:
    """Drop every plan (caller holds c.mu; the generation is the caller's to set)."""
    cdef Plan *p
    while c.oldest != NULL:
        p = c.oldest
        _plan_unlink(c, p)
        _plan_free(p)


cdef void _refusal_queue(Completer *cm, Listener *l, int proto, const char *host, int hostn, int port,
                         const char *reason, int status) noexcept nogil:
    """Queue one refusal for Python, stamped with the time it happens (bounded: beyond
    REFUSAL_RING pending the oldest is dropped, and counted in ``ring_dropped``, which reaches
    ``ViolationLog.count_unrecorded``: a summary never undercounts)."""
    cdef Refusal *r
    cdef timespec ts
    cdef int i
    clock_gettime(CLOCK_REALTIME, &ts)
    pthread_mutex_lock(&cm.mu)
    if l.ring == NULL:
        l.ring = <Refusal *>malloc(REFUSAL_RING * sizeof(Refusal))
    if l.ring == NULL:
        l.ring_dropped += 1
        pthread_mutex_unlock(&cm.mu)
        return
    if l.ring_len == REFUSAL_RING:
        l.ring_head = (l.ring_head + 1) % REFUSAL_RING
        l.ring_len -= 1
        l.ring_dropped += 1
    r = &l.ring[(l.ring_head + l.ring_len) % REFUSAL_RING]
    l.ring_len += 1
    r.time = <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
    r.proto = proto
    r.port = port
    r.status = status
    r.hostn = hostn
    memcpy(r.host, host, hostn)
    r.host[hostn] = 0
    for i in range(REASON_MAX - 1):
        r.reason[i] = reason[i]
        if reason[i] == 0:
            break
    r.reason[REASON_MAX - 1] = 0
    pthread_mutex_unlock(&cm.mu)
    l.ref_new = True


cdef void _live_link(Listener *l, Tunnel *t) noexcept nogil:
    t.owner = l
    t.lprev = NULL
    t.lnext = l.live
    if l.live != NULL:
        l.live.lprev = t
    l.live = t
    l.nlive += 1


cdef void _live_unlink(Tunnel *t) noexcept nogil:
    cdef Listener *l = t.owner
    if l == NULL:
        return
    if t.lprev != NULL:
        t.lprev.lnext = t.lnext
    else:
        l.live = t.lnext
    if t.lnext != NULL:
        t.lnext.lprev = t.lprev
    t.lprev = NULL
    t.lnext = NULL
    t.owner = NULL
    l.nlive -= 1


cdef char *_dup(const char *p, size_t n) noexcept nogil:
    cdef char *q = <char *>malloc(n + 1)
    if q != NULL:
        memcpy(q, p, n)
    return q


cdef bint _plan_serve(Worker *w, Listener *l, Hs *h) noexcept nogil:
    """Answer a complete handshake from the cached plan for its key; False on a miss (the
    handshake then goes to Python). ``h`` is out of epoll and off the listener's lists."""
    cdef PlanCache *c = l.plans
    cdef Plan *p
    cdef size_t off = 0, end = 0, earlyn
    cdef int hostn = 0, port = 0, kind, i
    cdef bint ok
    cdef Tunnel *t = NULL
    cdef const char *base
    cdef double now
    if c == NULL or c.count == 0:     # racy peek: a plan stored this instant can wait a turn
        return False
    if h.proto == 1 and h.ulen >= 0:
        return False                  # a SOCKS5 username names the client: plans do not carry it
    if h.proto == 0:
        base = h.buf
        ok = _http_key(base, h.len, &off, &hostn, &port, &end)
    else:
        base = h.buf + h.off
        ok = _socks_key(base, h.len - h.off, &off, &hostn, &port, &end)
    if not ok:
        return False
    earlyn = (h.len - h.off - end) if h.proto == 1 else (h.len - end)
    now = _mono()
    pthread_mutex_lock(&c.mu)
    p = _plan_find(c, h.proto, base + off, hostn, port, now)
    if p == NULL:
        c.misses += 1
        pthread_mutex_unlock(&c.mu)
        return False
    kind = p.kind
    if kind == PLAN_REFUSE:
        c.refused += 1
        # recorded (with its own time) before the client has the refusal, as Python does
        _refusal_queue(w.completer, l, h.proto, p.rhost, p.rhostn, port, p.reason, 0)
        _send_all_nb(h.fd, p.reply, p.replyn)
        pthread_mutex_unlock(&c.mu)
        _close_fd(&h.fd)
        free(h)
        return True
    t = _tunnel_new(l.idle, l.total)
    if t != NULL:
        t.addrs = <kr_addr *>malloc(p.naddr * sizeof(kr_addr))
        t.okrep = _dup(p.reply, p.replyn)
        t.early = _dup(base + end, earlyn)
        if kind == PLAN_CHAIN:
            t.creq = _dup(p.req, p.reqn)
            t.creqn = p.reqn
            t.rhost = _dup(p.rhost, p.rhostn)
            t.rhostn = p.rhostn
            t.rport = port
        if t.addrs == NULL or t.okrep == NULL or t.early == NULL or (kind == PLAN_CHAIN and (t.creq == NULL or t.rhost == NULL)):
            _tunnel_free(t)
            t = NULL
        else:
            memcpy(t.addrs, p.addrs, p.naddr * sizeof(kr_addr))
            t.naddr = p.naddr
            t.okn = p.replyn
            t.earlyn = earlyn
    c.hits += 1
    pthread_mutex_unlock(&c.mu)
    if t == NULL:
        return False                  # out of memory: Python answers it
    t.fd[0] = h.fd
    t.socks = h.proto == 1
    free(h)
    t.phase = PH_CONNECT
    t.cdeadline = t.start + l.connect_timeout
    t.w = w
    _live_link(l, t)
    _register(w, t)
    return True

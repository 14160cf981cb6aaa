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


cdef size_t _head_end(const unsigned char *p, size_t n) noexcept nogil:
    """Where the first CRLFCRLF ends (0: none yet)."""
    cdef size_t i = 0
    while i + 3 < n:
        if p[i] == 13 and p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            return i + 4
        i += 1
    return 0


cdef bint _header_lines(const unsigned char *p, size_t line, size_t hend, bint named, size_t *auth_off,
                       size_t *auth_len) noexcept nogil:
    """Header lines from ``line`` up to the blank line ending at ``hend``: ``name: value`` (a
    token, visible ASCII, spaces and tabs; no obs-fold, no bare CR or LF). A
    ``Proxy-Authorization`` header names the client: without ``named`` it is a miss, with it
    its value goes to ``auth_off`` / ``auth_len`` (two of them are a miss)."""
    cdef size_t i, colon, va, vb
    cdef size_t c
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
                if not named or auth_len[0] != 0:
                    return False
                va = colon + 1
                while va < i and (p[va] == 0x20 or p[va] == 9):
                    va += 1
                vb = i
                while vb > va and (p[vb - 1] == 0x20 or p[vb - 1] == 9):
                    vb -= 1
                if vb == va:
                    return False
                auth_off[0] = va
                auth_len[0] = vb - va
        line = i + 2
    return True


cdef bint _fwd_key(const char *buf, size_t n, size_t *host_off, int *hostn, int *port) noexcept nogil:
    """The host and port of a plain, well-formed forwarded request: ``METHOD
    http://host[:port]/target HTTP/1.x`` (a method of 1-20 token bytes, not CONNECT; a
    host of letters, digits, dots and dashes; a path), header lines as ``_http_key`` reads
    them, no ``Proxy-Authorization``. Anything else is a miss."""
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t i, s, hend = 0, m, hs, he
    cdef size_t aoff = 0, alen = 0
    cdef int pv = 80
    hend = _head_end(p, n)
    if hend == 0:
        return False
    m = 0
    while m < hend and m <= 20 and _tchar(p[m]):
        m += 1
    if m == 0 or m > 20 or p[m] != 0x20 or (m == 7 and memcmp(p, b"CONNECT", 7) == 0):
        return False
    s = m + 1
    if s + 7 >= hend or memcmp(p + s, b"http://", 7) != 0:
        return False
    hs = s + 7
    he = hs
    while he < hend and ((p[he] >= 0x61 and p[he] <= 0x7A) or (p[he] >= 0x41 and p[he] <= 0x5A)
                         or (p[he] >= 0x30 and p[he] <= 0x39) or p[he] == 0x2E or p[he] == 0x2D):
        he += 1
    if he == hs or he - hs > PLAN_HOST_MAX:
        return False
    i = he
    if p[i] == 0x3A:
        i += 1
        while i < hend and p[i] >= 0x30 and p[i] <= 0x39:
            i += 1
        pv = _port_of(p + he + 1, i - he - 1)
        if pv < 0:
            return False
    if p[i] != 0x2F:
        return False
    while i < hend and p[i] > 0x20 and p[i] < 0x7F:
        i += 1
    if i + 11 > hend or p[i] != 0x20 or memcmp(p + i + 1, b"HTTP/1.", 7) != 0 \
            or (p[i + 8] != 0x30 and p[i + 8] != 0x31) or p[i + 9] != 13 or p[i + 10] != 10:
        return False
    if not _header_lines(p, i + 11, hend, False, &aoff, &alen):
        return False
    host_off[0] = hs
    hostn[0] = <int>(he - hs)
    port[0] = pv
    return True


cdef bint _http_key(const char *buf, size_t n, size_t *host_off, int *hostn, int *port,
                    size_t *end, bint named, size_t *auth_off, size_t *auth_len) noexcept nogil:
    """The target of a plain, well-formed ``CONNECT host:port HTTP/1.x`` head in ``buf``.

    Strict on purpose: ``CONNECT``, one space, an authority of visible ASCII (``host:port`` or
    ``[v6]:port``, as ``split_host_port`` splits it), one space, ``HTTP/1.0`` or ``HTTP/1.1``;
    then header lines ``name: value`` (a token, visible ASCII, spaces and tabs; no obs-fold,
    no bare CR or LF) and the blank line. A ``Proxy-Authorization`` header names
    the client: without ``named`` (no client table in use) it is a miss, with it its value is
    returned in ``auth_off`` / ``auth_len`` (two of them are a miss). Anything else is a miss.
    """
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t i, s, tend, k, hend = 0
    cdef size_t c
    cdef int pv
    hend = _head_end(p, n)          # the first CRLFCRLF ends the head (http_head_end)
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
    if not _header_lines(p, tend + 11, hend, named, auth_off, auth_len):
        return False
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


cdef inline uint64_t _plan_hash(int proto, const char *host, int hostn, int port, const char *client,
                                int clientn) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(hostn):
        h = (h ^ <unsigned char>host[i]) * 1099511628211ULL
    for i in range(clientn):
        h = (h ^ <unsigned char>client[i]) * 1099511628211ULL
    h = (h ^ <uint64_t>(port * 2 + proto)) * 1099511628211ULL
    return h ^ (h >> 29)


cdef void _plan_free(Plan *p) noexcept nogil:
    _ispec_free(p.ispec)
    free(p.addrs)
    free(p.reply)
    free(p.req)
    free(p)


cdef void _plan_unlink(PlanCache *c, Plan *p) noexcept nogil:
    """Take ``p`` out of its bucket and the age list (caller holds c.mu and frees it)."""
    cdef Plan **pp = &c.buckets[_plan_hash(p.proto, p.host, p.hostn, p.port, p.client, p.clientn) % PLAN_BUCKETS]
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
                      double now, const char *client, int clientn) noexcept nogil:
    """The live plan for the key (``client``: the named client's, ``clientn`` 0: nobody's),
    or NULL; an expired one is dropped (caller holds c.mu)."""
    cdef Plan *p = c.buckets[_plan_hash(proto, host, hostn, port, client, clientn) % PLAN_BUCKETS]
    while p != NULL:
        if p.port == port and p.proto == proto and p.hostn == hostn and memcmp(p.host, host, hostn) == 0 \
                and p.clientn == clientn and memcmp(p.client, client, clientn) == 0:
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
    cdef Plan *old = _plan_find(c, p.proto, p.host, p.hostn, p.port, -1.0, p.client, p.clientn)
    cdef Plan **b
    if old != NULL:
        _plan_unlink(c, old)
        _plan_free(old)
    while c.count >= PLAN_MAX and c.oldest != NULL:
        old = c.oldest
        _plan_unlink(c, old)
        _plan_free(old)
        c.evicted += 1
    b = &c.buckets[_plan_hash(p.proto, p.host, p.hostn, p.port, p.client, p.clientn) % PLAN_BUCKETS]
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
                         const char *reason, int status, const char *client, int clientn) noexcept nogil:
    """Queue one refusal for Python, stamped with the time it happens (bounded: beyond
    REFUSAL_RING pending the oldest is dropped, and counted in ``ring_dropped``, which reaches
    ``ViolationLog.count_unrecorded``: a summary never undercounts)."""
    cdef Refusal *r
    pthread_mutex_lock(&cm.mu)
    r = _refusal_slot(l)
    if r != NULL:
        _refusal_fill(r, proto, host, hostn, port, reason, status, client, clientn)
    pthread_mutex_unlock(&cm.mu)
    l.ref_new = True


cdef Refusal *_refusal_slot(Listener *l) noexcept nogil:
    """The next free slot of ``l``'s ring (caller holds the completer's mutex), the oldest
    record dropped when it is full; NULL when out of memory (counted as dropped)."""
    cdef Refusal *r
    if l.ring == NULL:
        l.ring = <Refusal *>calloc(REFUSAL_RING, sizeof(Refusal))
    if l.ring == NULL:
        l.ring_dropped += 1
        return NULL
    if l.ring_len == REFUSAL_RING:
        r = &l.ring[l.ring_head]
        free(r.path)
        free(r.detail)
        l.ring_head = (l.ring_head + 1) % REFUSAL_RING
        l.ring_len -= 1
        l.ring_dropped += 1
    r = &l.ring[(l.ring_head + l.ring_len) % REFUSAL_RING]
    l.ring_len += 1
    return r


cdef void _refusal_release(Refusal *r) noexcept nogil:
    free(r.path)
    free(r.detail)
    r.path = NULL
    r.detail = NULL


cdef void _refusal_fill(Refusal *r, int proto, const char *host, int hostn, int port, const char *reason,
                        int status, const char *client, int clientn) noexcept nogil:
    cdef timespec ts
    cdef int i
    clock_gettime(CLOCK_REALTIME, &ts)
    r.time = <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
    r.proto = proto
    r.port = port
    r.status = status
    r.hostn = hostn
    memcpy(r.host, host, hostn)
    r.host[hostn] = 0
    r.clientn = clientn
    memcpy(r.client, client, clientn)
    r.client[clientn] = 0
    for i in range(REASON_MAX - 1):
        r.reason[i] = reason[i]
        if reason[i] == 0:
            break
    r.reason[REASON_MAX - 1] = 0
    r.kind = 0
    r.method[0] = 0
    r.path = NULL
    r.detail = NULL


cdef void _live_link(Listener *l, Tunnel *t) noexcept nogil:
    t.owner = l
    t.lprev = NULL
    t.lnext = l.live
    if l.live != NULL:
        l.live.lprev = t
    l.live = t
    kr_add_ssize(&l.nlive, 1)


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
    kr_add_ssize(&l.nlive, -1)


cdef char *_dup(const char *p, size_t n) noexcept nogil:
    cdef char *q = <char *>malloc(n + 1)
    if q != NULL:
        memcpy(q, p, n)
    return q


cdef bint _plan_serve(Worker *w, Listener *l, Hs *h) noexcept nogil:
    """Answer a complete handshake from the cached plan for its key; False on a miss (the
    handshake then goes to Python). ``h`` is out of epoll and off the listener's lists."""
    cdef PlanCache *c = l.plans
    cdef ClientTab *ct = l.clients
    cdef ClientEnt *ent = NULL
    cdef Plan *p
    cdef size_t off = 0, end = 0, earlyn, aoff = 0, alen = 0, k
    cdef int hostn = 0, port = 0, kind, i, cn = 0, dn
    cdef bint ok, named, have_pw = False, fwd = False
    cdef Tunnel *t = NULL
    cdef const char *base
    cdef const char *cname = b""
    cdef double now
    cdef unsigned char cred[384]
    cdef unsigned char digest[32]
    if c == NULL or c.count == 0:     # racy peek: a plan stored this instant can wait a turn
        return False
    named = ct != NULL and (kr_load_int(&ct.live) > 0 or kr_load_int(&ct.require_auth))
    if h.proto == 1 and h.ulen >= 0:
        # a SOCKS5 username names the client (its token was checked at RFC 1929 time)
        if not named or not _client_name_ok(<const unsigned char *>h.buf + h.uoff, <size_t>h.ulen):
            return False
        cname = h.buf + h.uoff
        cn = h.ulen
    if h.proto == 0:
        base = h.buf
        ok = _http_key(base, h.len, &off, &hostn, &port, &end, named, &aoff, &alen)
        if not ok and not named and _fwd_key(base, h.len, &off, &hostn, &port):
            ok = True
            fwd = True                # forwarded plain HTTP: the whole head is the machine's
            end = 0
        if ok and alen > 0:
            # ``Basic <base64 of user:password>``: the user names the client, the password's
            # SHA-256 is its token's
            if alen < 7 or alen - 6 > 512 or _lower(<unsigned char>base[aoff]) != 0x62 \
                    or memcmp(base + aoff + 1, b"asic ", 5) != 0:
                return False
            k = 6
            while k < alen and base[aoff + k] == 0x20:
                k += 1
            dn = kr_b64decode(<const unsigned char *>base + aoff + k, alen - k, cred, sizeof(cred))
            if dn <= 0:
                return False
            i = 0
            while i < dn and cred[i] != 0x3A:
                i += 1
            if not _client_name_ok(cred, <size_t>i):
                return False
            cname = <const char *>cred
            cn = i
            if i < dn:
                kr_sha256(cred + i + 1, <size_t>(dn - i - 1), digest)
                have_pw = True
    else:
        base = h.buf + h.off
        ok = _socks_key(base, h.len - h.off, &off, &hostn, &port, &end)
    if not ok:
        return False
    if named:
        pthread_mutex_lock(&ct.mu)
        if cn > 0:
            ent = _client_lookup(ct, cname, cn, False)
        if cn == 0 and ct.require_auth:
            ok = False
        elif ent == NULL and ct.require_auth:
            ok = False                # a name nobody knows: Python answers 407
        elif ent != NULL and ent.has_hash and h.proto == 0 and (not have_pw or not kr_hash_eq(digest, ent.hash)):
            ok = False                # a wrong token: Python answers 407
        pthread_mutex_unlock(&ct.mu)
        if not ok:
            return False
    earlyn = (h.len - h.off - end) if h.proto == 1 else (h.len - end)
    now = _mono()
    pthread_mutex_lock(&c.mu)
    p = _plan_find(c, 2 if fwd else h.proto, base + off, hostn, port, now, cname, cn)
    if p == NULL:
        c.misses += 1
        pthread_mutex_unlock(&c.mu)
        return False
    kind = p.kind
    if fwd and (kind != PLAN_DIRECT or p.ispec == NULL or not p.ispec.forward):
        c.misses += 1
        pthread_mutex_unlock(&c.mu)
        return False
    if kind == PLAN_REFUSE:
        c.refused += 1
        # recorded (with its own time) before the client has the refusal, as Python does
        _refusal_queue(w.completer, l, h.proto, p.rhost, p.rhostn, port, p.reason, 0, cname, cn)
        _send_all_nb(h.fd, p.reply, p.replyn)
        pthread_mutex_unlock(&c.mu)
        _close_fd(&h.fd)
        free(h)
        return True
    if ent != NULL:
        pthread_mutex_lock(&ct.mu)
        i = _client_take(ent, now)
        pthread_mutex_unlock(&ct.mu)
        if i != CL_OK:
            c.misses += 1
            pthread_mutex_unlock(&c.mu)
            return False              # over a limit: Python answers 429 (and records it)
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
        if p.ispec != NULL:
            t.ispec = _ispec_copy(p.ispec)
        if t.addrs == NULL or t.okrep == NULL or t.early == NULL or (kind == PLAN_CHAIN and (t.creq == NULL or t.rhost == NULL)) \
                or (p.ispec != NULL and t.ispec == NULL):
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
        if ent != NULL:               # the slot taken goes back
            pthread_mutex_lock(&ct.mu)
            _client_release(ent, 0, now)
            pthread_mutex_unlock(&ct.mu)
        return False                  # out of memory: Python answers it
    if t.ispec != NULL:               # its violations are this listener's to deliver
        _ispec_bind(t.ispec, l)
    t.cent = ent
    t.ctab = ct
    pthread_mutex_lock(&ct.mu)        # its metrics (Python counts the tunnels it serves itself)
    if ent != NULL:
        ent.m_tunnels[h.proto] += 1
        ent.m_open += 1
    else:
        ct.a_tunnels[h.proto] += 1
        ct.a_open += 1
    pthread_mutex_unlock(&ct.mu)
    t.fd[0] = h.fd
    t.socks = h.proto == 1
    free(h)
    t.phase = PH_CONNECT
    t.cdeadline = t.start + l.connect_timeout
    t.w = w
    _live_link(l, t)
    _register(w, t)
    return True

# Named clients on the engine's fast path: the C half of ``kodarelay.clients``.
#
# A listener's table holds each client's token hash, limits and counters. While a table is
# in use (clients named, or ``require_auth``) the engine serves an attributed handshake from
# a cached plan keyed by its client too: the credential is checked here (SHA-256 of the
# password against the policy's hash, in constant time) and the limits are counted here, for
# the engine's tunnels and (through ``_NativeListener.client_take`` / ``client_release``) for
# those Python serves, so one set of counters holds for both. Whatever this code cannot
# decide with certainty is a miss: Python answers it (407, 429, the records), as before.
# The logic is ``kodarelay.clients._Client``'s, its readable twin.

cdef enum:
    CL_OK = 0
    CL_BUDGET = 1        # upload_budget
    CL_TUNNELS = 2       # too_many_tunnels
    CL_RATE = 3          # rate_limited


cdef inline uint64_t _client_hash(const char *name, int n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(n):
        h = (h ^ <unsigned char>name[i]) * 1099511628211ULL
    return h ^ (h >> 29)


cdef bint _client_name_ok(const unsigned char *p, size_t n) noexcept nogil:
    """A name the fast path takes: 1-100 visible ASCII bytes and no ':' (shown as it is)."""
    cdef size_t i
    if n < 1 or n > CLIENT_MAX:
        return False
    for i in range(n):
        if p[i] <= 0x20 or p[i] >= 0x7F or p[i] == 0x3A:
            return False
    return True


cdef ClientEnt *_client_lookup(ClientTab *t, const char *name, int n, bint dead_too) noexcept nogil:
    """The client named ``name`` (caller holds t.mu), or NULL."""
    cdef ClientEnt *e = t.buckets[_client_hash(name, n) % CLIENT_BUCKETS]
    while e != NULL:
        if e.namen == n and memcmp(e.name, name, n) == 0 and (dead_too or not e.dead):
            return e
        e = e.next
    return NULL


cdef bint _client_over_budget(ClientEnt *e, double now) noexcept nogil:
    if e.wstart >= 0 and now - e.wstart >= e.period:
        e.wstart = -1.0
        e.uploaded = 0
        e.kill = False
    return e.uploaded > e.upload or (e.upload == 0 and e.wstart >= 0)


cdef int _client_take(ClientEnt *e, double now) noexcept nogil:
    """Admit one new tunnel or request (caller holds the table's mutex): CL_OK, or the limit."""
    if e.upload >= 0 and _client_over_budget(e, now):
        return CL_BUDGET
    if e.max_tunnels >= 0 and e.open >= e.max_tunnels:
        return CL_TUNNELS
    if e.rate > 0:
        e.tokens = e.tokens + (now - e.refilled) * e.rate
        if e.tokens > e.burst:
            e.tokens = e.burst
        e.refilled = now
        if e.tokens < 1.0:
            return CL_RATE
        e.tokens -= 1.0
    e.open += 1
    return CL_OK


cdef bint _client_release(ClientEnt *e, uint64_t up, double now) noexcept nogil:
    """A tunnel or request of ``e`` ended having sent ``up`` bytes to its origin (caller holds
    the table's mutex): True when that spent the upload budget (``e.kill`` is then set)."""
    if e.open > 0:
        e.open -= 1
    if e.upload < 0 or up == 0:
        return False
    if e.wstart < 0 or now - e.wstart >= e.period:
        e.wstart = now
        e.uploaded = 0
    e.uploaded += <long long>up
    if e.uploaded > e.upload and not e.kill:
        e.kill = True
        return True
    return False


cdef void _clients_free(ClientTab *t) noexcept nogil:
    cdef int i
    cdef ClientEnt *e
    cdef ClientEnt *nxt
    for i in range(CLIENT_BUCKETS):
        e = t.buckets[i]
        while e != NULL:
            nxt = e.next
            free(e)
            e = nxt
        t.buckets[i] = NULL
    pthread_mutex_destroy(&t.mu)
    free(t)


cdef void _clients_kill(Worker *w, Listener *l) noexcept nogil:
    """Close the engine's tunnels of every client whose upload budget is spent (worker only)."""
    cdef Tunnel *t = l.live
    cdef Tunnel *nxt
    cdef bint kill
    if l.clients == NULL or not kr_load_int(&l.clients.kill_pending):
        return
    kr_store_int(&l.clients.kill_pending, 0)
    while t != NULL:
        nxt = t.lnext
        if t.cent != NULL:
            pthread_mutex_lock(&l.clients.mu)
            kill = t.cent.kill
            pthread_mutex_unlock(&l.clients.mu)
            if kill:
                _finish(w, t, RES_CANCELLED, 0)
        t = nxt


cdef void _client_tunnel_ends(Worker *w, Tunnel *t) noexcept nogil:
    """``_finish`` of a named client's tunnel: its slot back, its upload charged; a budget
    spent now closes the client's other tunnels (here at the end of the iteration, and in
    Python through the refusal queue's ``!budget`` record)."""
    cdef ClientTab *ct = t.ctab
    cdef ClientEnt *e = t.cent
    cdef bint spent = False
    cdef char name[CLIENT_MAX + 1]
    cdef int n = 0
    t.cent = NULL
    t.ctab = NULL
    pthread_mutex_lock(&ct.mu)
    if e == NULL:                     # an anonymous tunnel: its metrics only
        ct.a_up += t.d[0].moved
        ct.a_down += t.d[1].moved
        ct.a_open -= 1
    else:
        e.m_up += t.d[0].moved
        e.m_down += t.d[1].moved
        e.m_open -= 1
        spent = _client_release(e, t.d[0].moved, _mono())
        n = e.namen
        memcpy(name, e.name, n)
    pthread_mutex_unlock(&ct.mu)
    if spent:
        kr_store_int(&ct.kill_pending, 1)
        if t.owner != NULL:
            _refusal_queue(w.completer, t.owner, 1 if t.socks else 0, b"", 0, 0, "!budget", 0, name, n)


cdef bint _socks_auth_ok(Listener *l, const unsigned char *user, size_t ulen, const unsigned char *pw,
                         size_t pwlen) noexcept nogil:
    """RFC 1929 credentials, as ``ClientBook.authenticate`` judges them: True without a table
    in use; a name nobody knows passes unless auth is required; a known name with a token
    needs the password whose SHA-256 it is."""
    cdef ClientTab *ct = l.clients
    cdef ClientEnt *e
    cdef unsigned char digest[32]
    cdef bint ok = True
    if ct == NULL or not (kr_load_int(&ct.live) > 0 or kr_load_int(&ct.require_auth)):
        return True
    pthread_mutex_lock(&ct.mu)
    e = _client_lookup(ct, <const char *>user, <int>ulen, False) if _client_name_ok(user, ulen) else NULL
    if e == NULL:
        ok = not ct.require_auth
    elif e.has_hash:
        pthread_mutex_unlock(&ct.mu)
        kr_sha256(pw, pwlen, digest)
        pthread_mutex_lock(&ct.mu)
        ok = kr_hash_eq(digest, e.hash)
    pthread_mutex_unlock(&ct.mu)
    return ok


cdef void _socks_auth_refused(Worker *w, Listener *l, const unsigned char *user, size_t ulen) noexcept nogil:
    """Record an RFC 1929 refusal under the name the client gave (when the engine can show it)."""
    if _client_name_ok(user, ulen):
        _refusal_queue(w.completer, l, 1, b"", 0, 0, "unauthenticated", 0, <const char *>user, <int>ulen)
    else:
        _refusal_queue(w.completer, l, 1, b"", 0, 0, "unauthenticated", 0, b"", 0)

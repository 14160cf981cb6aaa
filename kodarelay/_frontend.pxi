# The native handshake front-end: accept and handshakes (worker thread only unless noted).
#
# A listener is served by one worker: accept4 up to ACCEPT_BATCH per wakeup, then each
# connection's handshake (HTTP head up to CRLFCRLF; SOCKS5 greeting, ``05 00``/``05 FF``,
# request) is read without the GIL. Complete handshakes go to the completer in one batch per
# listener per iteration; Python decides each one and answers through its ``_Handshake``:
# dial (a tunnel in phase PH_CONNECT, then relayed), reply-and-close, or detach.

cdef void _hs_unlink(Listener *l, Hs *h) noexcept nogil:
    l.nhs -= 1
    if h.prev != NULL:
        h.prev.next = h.next
    else:
        l.head = h.next
    if h.next != NULL:
        h.next.prev = h.prev
    else:
        l.tail = h.prev
    h.prev = NULL
    h.next = NULL


cdef void _hs_close(Worker *w, Listener *l, Hs *h) noexcept nogil:
    """Close ``h`` now, free it after the iteration: an event for it may still wait later in
    the same ``epoll_wait`` batch (a handshake shed by an accept earlier in that batch), and
    must find it marked dead, never freed memory or a reused fd."""
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, h.fd, NULL)
    _hs_unlink(l, h)
    _close_fd(&h.fd)
    h.state = ST_DEAD
    h.next = w.hs_grave
    w.hs_grave = h


cdef void _hs_bury(Worker *w) noexcept nogil:
    """Free the handshakes closed this iteration (no event of this batch is left to name them)."""
    cdef Hs *h
    while w.hs_grave != NULL:
        h = w.hs_grave
        w.hs_grave = h.next
        free(h)


cdef void _hs_ready(Worker *w, Listener *l, Hs *h, int proto, int flags) noexcept nogil:
    """A complete handshake: served from a cached plan, else queued for Python."""
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, h.fd, NULL)
    _hs_unlink(l, h)
    h.proto = proto
    h.flags = flags
    if flags == 0 and _plan_serve(w, l, h):
        return
    if l.ready_tail != NULL:
        l.ready_tail.next = h
    else:
        l.ready_head = h
    l.ready_tail = h


cdef int _hs_progress(Worker *w, Listener *l, Hs *h, size_t before) noexcept nogil:
    """Advance the state machine over the bytes read. 1: done (delivered or closed), 0: more."""
    cdef unsigned char *p
    cdef size_t n, need, m, i
    cdef bint noauth, userpass
    if h.state == ST_FIRST:
        h.state = ST_GREET if <unsigned char>h.buf[0] == 5 else ST_HTTP
    if h.state == ST_HTTP:
        if kr_has_crlfcrlf(h.buf, before - 3 if before > 3 else 0, h.len):
            _hs_ready(w, l, h, 0, 0)
            return 1
        if h.len >= HS_BUF:
            _hs_ready(w, l, h, 0, 1)      # Python answers 431 and records the violation
            return 1
        return 0
    p = <unsigned char *>h.buf
    if h.state == ST_GREET:
        if p[0] != 5:
            _hs_close(w, l, h)
            return 1
        if h.len < 2:
            return 0
        m = p[1]
        if h.len < 2 + m:
            return 0
        noauth = False
        userpass = False
        for i in range(m):
            if p[2 + i] == 0:
                noauth = True
            elif p[2 + i] == 2:
                userpass = True
        h.off = 2 + m
        if not userpass and l.clients != NULL and kr_load_int(&l.clients.require_auth):
            # no credentials offered where they are required: as Python answers (and records)
            _refusal_queue(w.completer, l, 1, b"", 0, 0, "unauthenticated", 0, b"", 0)
            _send_all_nb(h.fd, b"\x05\xff", 2)
            _hs_close(w, l, h)
            return 1
        if userpass:                  # preferred: the username attributes the request
            if _send_all_nb(h.fd, b"\x05\x02", 2) != 2:
                _hs_close(w, l, h)
                return 1
            h.state = ST_AUTH
        elif noauth:
            if _send_all_nb(h.fd, b"\x05\x00", 2) != 2:
                _hs_close(w, l, h)
                return 1
            h.state = ST_REQ
        else:
            _send_all_nb(h.fd, b"\x05\xff", 2)
            _hs_close(w, l, h)
            return 1
    if h.state == ST_AUTH:
        p = <unsigned char *>h.buf + h.off
        n = h.len - h.off
        if n < 1:
            return 0
        if p[0] != 1:
            _hs_close(w, l, h)
            return 1
        if n < 2 or n < 3 + <size_t>p[1]:
            return 0
        need = 3 + <size_t>p[1] + <size_t>p[2 + p[1]]
        if n < need:
            return 0
        h.uoff = h.off + 2
        h.ulen = p[1]
        if not _socks_auth_ok(l, p + 2, p[1], p + 3 + p[1], p[2 + p[1]]):
            _socks_auth_refused(w, l, p + 2, p[1])
            _send_all_nb(h.fd, b"\x01\x01", 2)      # RFC 1929: a failure, then the close
            _hs_close(w, l, h)
            return 1
        if _send_all_nb(h.fd, b"\x01\x00", 2) != 2:
            _hs_close(w, l, h)
            return 1
        h.off += need
        h.state = ST_REQ
    # ST_REQ
    p = <unsigned char *>h.buf + h.off
    n = h.len - h.off
    if n < 1:
        return 0
    if p[0] != 5:
        _hs_close(w, l, h)
        return 1
    if n < 4:
        return 0
    if p[3] == 1:
        need = 10
    elif p[3] == 4:
        need = 22
    elif p[3] == 3:
        if n < 5:
            return 0
        need = 7 + <size_t>p[4]
    else:
        _hs_close(w, l, h)            # unknown address type
        return 1
    if n < need:
        return 0
    _hs_ready(w, l, h, 1, 0)
    return 1


cdef void _hs_read(Worker *w, Listener *l, Hs *h) noexcept nogil:
    cdef ssize_t n
    cdef size_t before
    while True:
        if h.len >= HS_BUF:
            _hs_close(w, l, h)        # (SOCKS5 handshakes are far shorter; HTTP is delivered at HS_BUF)
            return
        n = recv(h.fd, h.buf + h.len, HS_BUF - h.len, 0)
        if n > 0:
            before = h.len
            h.len += <size_t>n
            if _hs_progress(w, l, h, before):
                return
        elif n == 0:
            _hs_close(w, l, h)
            return
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            return
        else:
            _hs_close(w, l, h)
            return


cdef void _hs_timeout(Worker *w, Listener *l, Hs *h) noexcept nogil:
    if h.state == ST_FIRST or h.state == ST_HTTP:
        _send_all_nb(h.fd, g_reply_408, g_reply_408n)
    _hs_close(w, l, h)


cdef void _l_arm(Worker *w, Listener *l) noexcept nogil:
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = <uint64_t><uintptr_t>l | <uint64_t>TAG_LISTENER
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, l.fd, &ev) == 0:
        l.in_epoll = True
        l.retry_at = 0
    else:
        l.accept_err = errno
        l.retry_at = _mono() + ACCEPT_BACKOFF


cdef void _l_accept(Worker *w, Listener *l, double now) noexcept nogil:
    cdef int k, fd, e
    cdef Hs *h
    cdef epoll_event ev
    for k in range(ACCEPT_BATCH):
        fd = kr_accept(l.fd)
        if fd < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                return
            if (e == EMFILE or e == ENFILE) and not kr_pending(l.fd):
                return                        # nobody waits (accept4 takes the fd first): shed nothing
            if (e == EMFILE or e == ENFILE) and l.head != NULL:
                l.shed += 1                   # (counted before the client can see it)
                _hs_timeout(w, l, l.head)     # out of fds: shed the oldest (slowest) handshake, retry
                continue
            # EMFILE, ENFILE, ...: never stop accepting; back off and re-arm
            l.accept_err = e
            if l.in_epoll:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
                l.in_epoll = False
            l.retry_at = now + ACCEPT_BACKOFF
            return
        while l.nhs >= l.max_hs and l.head != NULL:
            l.shed += 1
            _hs_timeout(w, l, l.head)         # at the bound: the oldest (slowest) goes first
        h = <Hs *>malloc(sizeof(Hs))
        if h == NULL:
            close(fd)
            continue
        _nodelay(fd)
        h.fd = fd
        h.state = ST_FIRST if l.mode == 2 else (ST_GREET if l.mode == 1 else ST_HTTP)
        h.proto = 0
        h.flags = 0
        h.len = 0
        h.off = 0
        h.uoff = 0
        h.ulen = -1
        h.l = l
        h.deadline = now + l.hs_timeout
        h.next = NULL
        h.prev = l.tail
        if l.tail != NULL:
            l.tail.next = h
        else:
            l.head = h
        l.tail = h
        l.nhs += 1
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>h | <uint64_t>TAG_HS
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            _hs_close(w, l, h)
            continue
        _hs_read(w, l, h)             # the request is usually there already


cdef void _l_close(Worker *w, Listener *l) noexcept nogil:
    """Stop serving ``l``: close its fd and every handshake still being read."""
    cdef Hs *h
    if l.done:
        return
    l.done = True
    if l.in_epoll:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
        l.in_epoll = False
    _close_fd(&l.fd)
    while l.head != NULL:
        _hs_close(w, l, l.head)
    while l.live != NULL:             # tunnels opened from its cached plans end with it
        _finish(w, l.live, RES_CANCELLED, 0)


cdef void _l_drop(Completer *c, Listener *l) noexcept nogil:
    cdef int left
    pthread_mutex_lock(&c.mu)
    l.refs -= 1
    left = l.refs
    pthread_mutex_unlock(&c.mu)
    if left == 0:
        if l.plans != NULL:
            _plans_clear(l.plans)
            pthread_mutex_destroy(&l.plans.mu)
            free(l.plans)
        if l.clients != NULL:
            _clients_free(l.clients)
        if l.ring != NULL:
            for left in range(l.ring_len):
                _refusal_release(&l.ring[(l.ring_head + left) % REFUSAL_RING])
        free(l.ring)
        free(l)


cdef void _l_flush(Worker *w, Listener *l) noexcept nogil:
    """End of an iteration: hand this listener's completed handshakes to the completer."""
    cdef Completer *c = w.completer
    if l.ready_head == NULL and l.accept_err == 0 and not l.ref_new:
        return
    l.ref_new = False
    pthread_mutex_lock(&c.mu)
    if l.ready_head != NULL:
        if l.pend_tail != NULL:
            l.pend_tail.next = l.ready_head
        else:
            l.pend_head = l.ready_head
        l.pend_tail = l.ready_tail
    if l.accept_err != 0:
        l.pend_err = l.accept_err
    l.ready_head = NULL
    l.ready_tail = NULL
    l.accept_err = 0
    _l_queue_locked(c, l)
    pthread_mutex_unlock(&c.mu)


cdef void _l_queue_locked(Completer *c, Listener *l) noexcept nogil:
    """Give ``l``'s pending handshakes and refusals to the completer (caller holds c.mu; any
    worker: an inspected tunnel's records come from the worker serving it)."""
    if not l.cqueued:
        l.cqueued = True
        l.refs += 1
        l.cnext = c.lhead
        c.lhead = l
    pthread_cond_signal(&c.cond)


cdef void _listeners_service(Worker *w, double now) noexcept nogil:
    """Timers (handshake deadlines, accept back-off), closes, and the per-iteration flush."""
    cdef Listener *l = w.listeners
    cdef Listener *prev = NULL
    cdef Listener *nxt
    cdef bint closing
    while l != NULL:
        nxt = l.next
        while l.head != NULL and l.head.deadline <= now:
            _hs_timeout(w, l, l.head)
        if l.retry_at > 0 and l.retry_at <= now and not l.done:
            _l_arm(w, l)
        _clients_kill(w, l)
        _l_flush(w, l)
        pthread_mutex_lock(&w.mu)
        closing = l.closing or w.stopping
        pthread_mutex_unlock(&w.mu)
        if closing:
            pthread_mutex_lock(&w.mu)
            closing = l.closing
            pthread_mutex_unlock(&w.mu)
            if not closing:           # the engine stops under a live server: tell it
                l.accept_err = -1
                _l_flush(w, l)
            _l_close(w, l)
            if prev != NULL:
                prev.next = nxt
            else:
                w.listeners = nxt
            _l_drop(w.completer, l)     # the worker's reference
        else:
            prev = l
        l = nxt


cdef double _listeners_next(Worker *w) noexcept nogil:
    cdef Listener *l = w.listeners
    cdef double t = 1e300
    while l != NULL:
        if l.head != NULL and l.head.deadline < t:
            t = l.head.deadline
        if l.retry_at > 0 and l.retry_at < t:
            t = l.retry_at
        l = l.next
    return t

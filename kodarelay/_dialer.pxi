# The native dialer: tunnels in phase PH_CONNECT (worker thread only).

cdef int _socks_rep_for(int err) noexcept nogil:
    if err == ECONNREFUSED:
        return 5
    if err == ENETUNREACH:
        return 3
    if err == EHOSTUNREACH or err == ETIMEDOUT or err == EHOSTDOWN:
        return 4
    return 1


cdef void _dial_fail(Worker *w, Tunnel *t, int err) noexcept nogil:
    cdef char rep[10]
    cdef int i
    if t.socks:
        for i in range(10):
            rep[i] = 0
        rep[0] = 5
        rep[1] = <char>_socks_rep_for(err)
        rep[3] = 1
        _send_all_nb(t.fd[0], rep, 10)
    else:
        _send_all_nb(t.fd[0], g_reply_502, g_reply_502n)
    _finish(w, t, RES_DIAL, err)


cdef void _connect_next(Worker *w, Tunnel *t, double now) noexcept nogil:
    cdef int fd, err = 0
    cdef epoll_event ev
    while t.aidx < t.naddr and now < t.cdeadline:
        fd = kr_connect(&t.addrs[t.aidx], &err)
        t.aidx += 1
        if fd < 0:
            t.cerr = err
            continue
        t.fd[1] = fd
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>t | <uint64_t>1
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            t.cerr = errno
            _close_fd(&t.fd[1])
            continue
        t.registered = True
        return
    _dial_fail(w, t, t.cerr if t.cerr != 0 else ETIMEDOUT)


cdef int _preload(Worker *w, Dir *d, int fd, const char *p, size_t n) noexcept nogil:
    """Send ``p`` to ``fd``; what the socket does not take now waits in the direction's buffer."""
    cdef int sent
    if n == 0:
        return 0
    sent = _send_all_nb(fd, p, n)
    if <size_t>sent == n:
        d.moved += n
        return 0
    if errno != EAGAIN and errno != EINTR:
        return errno
    if <size_t>sent + COPY_BUF < n or _buf_get(w, d) < 0:
        return ENOMEM
    d.copy = True
    memcpy(d.buf, p + sent, n - <size_t>sent)
    d.bpending = n - <size_t>sent
    d.moved += <uint64_t>sent
    return 0


cdef void _connect_event(Worker *w, Tunnel *t, uint32_t ev, double now) noexcept nogil:
    cdef int soerr = 0, e
    cdef socklen_t sl = sizeof(int)
    cdef epoll_event cev
    if getsockopt(t.fd[1], SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0:
        soerr = errno
    if soerr == 0 and not (ev & EPOLLOUT):
        return
    if soerr != 0:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
        _close_fd(&t.fd[1])
        t.cerr = soerr
        _connect_next(w, t, now)
        return
    _nodelay(t.fd[1])
    if t.creq != NULL:
        _chain_start(w, t, now)
    else:
        _begin_relay(w, t, 0, now)


cdef void _begin_relay(Worker *w, Tunnel *t, size_t extra, double now) noexcept nogil:
    """Connected (and chained): the ok reply (plus ``extra`` bytes the upstream proxy sent
    after its reply head, appended to it) to the client, the client's early bytes to the
    target, then relay (an inspected tunnel's machine takes both instead: ``_insp_start``)."""
    cdef int e
    cdef epoll_event cev
    if t.ispec != NULL:
        e = _insp_start(t)
    else:
        e = _preload(w, &t.d[1], t.fd[0], t.okrep, t.okn)
        if e == 0:
            e = _preload(w, &t.d[0], t.fd[1], t.early, t.earlyn)
    if e != 0:
        _finish_errno(w, t, e)
        return
    t.d[1].moved = extra      # the reply is ours, not the target's (the early bytes are the client's)
    free(t.okrep)
    t.okrep = NULL
    free(t.early)
    t.early = NULL
    free(t.addrs)
    t.addrs = NULL
    free(t.creq)
    t.creq = NULL
    free(t.chead)
    t.chead = NULL
    t.phase = PH_RELAY
    t.start = now
    t.last = now
    _heap_remove(w, t)
    t.key = t.start + (t.idle if t.idle < t.total else t.total)
    if _heap_push(w, t) < 0:
        _finish_errno(w, t, ENOMEM)
        return
    cev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    cev.data.u64 = <uint64_t><uintptr_t>t
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, t.fd[0], &cev) < 0:
        _finish_errno(w, t, errno)
        return
    _service(w, t, 3, now)    # (an inspected tunnel's: its machine, _insp_service)


# ── chaining through the upstream HTTP proxy (phase PH_CHAIN) ────────────────
#
# As ``kodarelay.upstream.connect_upstream``: send the CONNECT request Python built (Basic
# auth included), read the reply head up to CRLFCRLF or LFLF within CHAIN_HEAD_MAX bytes and
# the connect timeout (counted again from the connect); a non-2xx, malformed or missing reply
# is ECONNREFUSED (502 / SOCKS5 REP 0x05), a timeout ETIMEDOUT (502 / REP 0x04). Bytes after
# the head belong to the tunnel and reach the client after the ok reply.

cdef void _chain_start(Worker *w, Tunnel *t, double now) noexcept nogil:
    if <size_t>_send_all_nb(t.fd[1], t.creq, t.creqn) != t.creqn:
        _chain_fail(w, t, errno if errno != EAGAIN and errno != 0 else ECONNREFUSED)
        return
    t.chead = <char *>malloc(CHAIN_HEAD_MAX)
    if t.chead == NULL:
        _chain_fail(w, t, ENOMEM)
        return
    t.cheadn = 0
    t.phase = PH_CHAIN
    _heap_remove(w, t)
    t.cdeadline = now + (t.cdeadline - t.start)
    t.key = t.cdeadline
    if _heap_push(w, t) < 0:
        _chain_fail(w, t, ENOMEM)
        return
    _chain_event(w, t, EPOLLIN, now)     # the reply may be there already


cdef void _chain_fail(Worker *w, Tunnel *t, int err) noexcept nogil:
    if t.fd[1] >= 0:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
        _close_fd(&t.fd[1])
    t.registered = False
    _dial_fail(w, t, err)


cdef Py_ssize_t _reply_head_end(const char *p, size_t n) noexcept nogil:
    """``upstream._response_head_end``: the earlier of CRLFCRLF + 4 and LFLF + 2, else -1."""
    cdef size_t i
    for i in range(n):
        if p[i] == 10:
            if i + 1 < n and p[i + 1] == 10:
                return <Py_ssize_t>i + 2
            if i >= 1 and p[i - 1] == 13 and i + 2 < n and p[i + 1] == 13 and p[i + 2] == 10:
                return <Py_ssize_t>i + 3
    return -1


cdef int _reply_status(const char *buf, size_t n) noexcept nogil:
    """The status of ``connect_upstream``: the first line, stripped, split on spaces:
    ``HTTP/...`` then a code of digits (capped at 1000); -1 when malformed."""
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t a = 0, b = 0, i, s1, s2
    cdef long code = 0
    while b < n and p[b] != 10:
        b += 1
    while a < b and (p[a] == 32 or (p[a] >= 9 and p[a] <= 13)):
        a += 1
    while b > a and (p[b - 1] == 32 or (p[b - 1] >= 9 and p[b - 1] <= 13)):
        b -= 1
    if b - a < 5 or memcmp(p + a, b"HTTP/", 5) != 0:
        return -1
    s1 = a
    while s1 < b and p[s1] != 32:
        s1 += 1
    if s1 >= b:
        return -1
    s2 = s1 + 1
    while s2 < b and p[s2] != 32:
        s2 += 1
    if s2 == s1 + 1:
        return -1
    for i in range(s1 + 1, s2):
        if p[i] < 0x30 or p[i] > 0x39:
            return -1
        if code < 1000:
            code = code * 10 + (p[i] - 0x30)
    return <int>code


cdef void _chain_event(Worker *w, Tunnel *t, uint32_t ev, double now) noexcept nogil:
    cdef ssize_t n
    cdef Py_ssize_t end
    cdef size_t extra
    cdef char *rep
    cdef int status
    while True:
        n = recv(t.fd[1], t.chead + t.cheadn, CHAIN_HEAD_MAX - t.cheadn, 0)
        if n > 0:
            t.cheadn += <size_t>n
            end = _reply_head_end(t.chead, t.cheadn)
            if end >= 0:
                break
            if t.cheadn >= CHAIN_HEAD_MAX:
                _chain_fail(w, t, ECONNREFUSED)       # reply head too long
                return
        elif n == 0:
            _chain_fail(w, t, ECONNREFUSED)           # closed before answering
            return
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            return
        else:
            _chain_fail(w, t, errno)
            return
    status = _reply_status(t.chead, <size_t>end)
    if not 200 <= status < 300:
        if status >= 0 and t.owner != NULL:     # the upstream said no: a violation, as in Python
            if t.cent != NULL:
                _refusal_queue(w.completer, t.owner, 1 if t.socks else 0, t.rhost, t.rhostn, t.rport,
                               "upstream_refused", status, t.cent.name, t.cent.namen)
            else:
                _refusal_queue(w.completer, t.owner, 1 if t.socks else 0, t.rhost, t.rhostn, t.rport,
                               "upstream_refused", status, b"", 0)
        _chain_fail(w, t, ECONNREFUSED)
        return
    extra = t.cheadn - <size_t>end
    if extra > 0:
        rep = <char *>realloc(t.okrep, t.okn + extra)
        if rep == NULL:
            _chain_fail(w, t, ENOMEM)
            return
        memcpy(rep + t.okn, t.chead + end, extra)
        t.okrep = rep
        t.okn += extra
    _begin_relay(w, t, extra, now)

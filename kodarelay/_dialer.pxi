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
        _send_all_nb(t.fd[0], b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 28)
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
    # connected: the ok reply to the client, the client's early bytes to the target
    _nodelay(t.fd[1])
    e = _preload(w, &t.d[1], t.fd[0], t.okrep, t.okn)
    if e == 0:
        e = _preload(w, &t.d[0], t.fd[1], t.early, t.earlyn)
    if e != 0:
        _finish_errno(w, t, e)
        return
    t.d[1].moved = 0          # the reply is ours, not the target's
    t.d[0].moved = 0
    free(t.okrep)
    t.okrep = NULL
    free(t.early)
    t.early = NULL
    free(t.addrs)
    t.addrs = NULL
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
    _service(w, t, 3, now)

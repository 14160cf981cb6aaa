# The relay: moving bytes between a tunnel's two sockets (worker thread only).
#
# splice(2) socket -> pipe -> socket, Go's ``internal/poll/splice_linux.go`` discipline:
# "drain" only into an empty pipe, "pump" empties it; where the kernel refuses splice the
# direction copies with recv/send through a pooled buffer.

cdef void _release_dir(Worker *w, Dir *d) noexcept nogil:
    _pipe_put(w, d)       # closes it instead when bytes are left in it
    _buf_put(w, d)


cdef void _finish(Worker *w, Tunnel *t, int result, int err) noexcept nogil:
    """Close everything the tunnel owns and queue its completion for this iteration."""
    cdef int i
    if t.finished or t.result != RES_RUNNING:
        return
    t.result = result
    t.err = err
    if result == RES_OK and t.insp != NULL and t.fd[1] >= 0 and kr_insp_donate(t.insp):
        # its origin connection is kept for the next tunnel to that origin (_inspect.c's pool)
        if t.registered:
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
        t.fd[1] = -1
    for i in range(2):
        if t.fd[i] >= 0:
            if t.registered:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[i], NULL)
            _close_fd(&t.fd[i])
        _release_dir(w, &t.d[i])
    t.registered = False
    if t.insp != NULL or t.ispec != NULL:
        _insp_end(t)
    if t.ctab != NULL:
        _client_tunnel_ends(w, t)     # (before its listener is unlinked: a spent budget is queued there)
    free(t.addrs)
    t.addrs = NULL
    free(t.okrep)
    t.okrep = NULL
    free(t.early)
    t.early = NULL
    free(t.creq)
    t.creq = NULL
    free(t.chead)
    t.chead = NULL
    free(t.rhost)
    t.rhost = NULL
    _live_unlink(t)
    _heap_remove(w, t)
    _rq_remove(w, t)
    if w.ntunnels > 0:
        w.ntunnels -= 1
    pthread_mutex_lock(&w.mu)
    t.finished = True
    pthread_mutex_unlock(&w.mu)
    # The engine's reference is dropped at the end of the iteration, after the completion
    # has been delivered: events later in this batch may still name this tunnel.
    t.dnext = w.done_head
    w.done_head = t


cdef void _finish_errno(Worker *w, Tunnel *t, int err) noexcept nogil:
    _finish(w, t, RES_ERRNO, err)


# ── moving bytes (worker thread only) ────────────────────────────────────────

cdef int _service_copy(Worker *w, Tunnel *t, Dir *d, int src, int dst, double now) noexcept nogil:
    """One round of the copy path. 1: progress, 0: blocked, -1: error (tunnel finished)."""
    cdef ssize_t n
    cdef int e
    cdef size_t want
    if d.buf == NULL:
        if _buf_get(w, d) < 0:
            _finish_errno(w, t, ENOMEM)
            return -1
    if d.bpending == 0:
        d.boff = 0
        if d.pending > 0:
            # bytes left in the pipe from before the switch to copying
            want = d.pending if d.pending < COPY_BUF else COPY_BUF
            n = read(d.pr, d.buf, want)
            if n > 0:
                d.pending -= <size_t>n
                d.bpending = <size_t>n
                if d.pending == 0:
                    _pipe_put(w, d)
            elif n < 0 and errno != EINTR and errno != EAGAIN:
                _finish_errno(w, t, errno)
                return -1
            else:
                return 1
        elif not d.eof:
            w.copy_calls += 1
            n = recv(src, d.buf, COPY_BUF, 0)
            if n > 0:
                d.bpending = <size_t>n
                t.last = now
            elif n == 0:
                d.eof = True
                return 1
            else:
                e = errno
                if e == EINTR:
                    return 1
                if e == EAGAIN:
                    return 0
                _finish_errno(w, t, e)
                return -1
        else:
            return 0
    # send what the buffer holds
    w.copy_calls += 1
    n = send(dst, d.buf + d.boff, d.bpending, MSG_NOSIGNAL)
    if n > 0:
        d.bpending -= <size_t>n
        d.boff += <size_t>n
        d.moved += <uint64_t>n
        t.last = now
        return 1
    e = errno if n < 0 else EAGAIN
    if e == EINTR:
        return 1
    if e == EAGAIN:
        d.wout = True
        return 0
    _finish_errno(w, t, e)
    return -1


cdef int _service_dir(Worker *w, Tunnel *t, int di, double now) noexcept nogil:
    """Move bytes for direction ``di`` until blocked.

    Returns 0 when blocked (an epoll edge will resume it), 1 when the budget ran out (the
    caller queues it), -1 when the tunnel finished.
    """
    cdef Dir *d = &t.d[di]
    cdef int src = t.fd[di]
    cdef int dst = t.fd[1 - di]
    cdef ssize_t n
    cdef int e, r, rounds
    cdef bint progress
    d.wout = False
    for rounds in range(BUDGET):
        if d.shut:
            return 0
        progress = False
        if d.copy:
            r = _service_copy(w, t, d, src, dst, now)
            if r < 0:
                return -1
            progress = r > 0
        else:
            # drain: socket -> pipe, only into an empty pipe
            if d.pending == 0 and not d.eof:
                if d.pr < 0 and _pipe_get(w, d) < 0:
                    # no pipe (EMFILE / ENFILE / ENOMEM): this direction copies with recv/send
                    # from now on; the tunnel's sockets are fine, it must not die for it
                    w.pipe_fallbacks += 1
                    d.copy = True
                    continue
                w.splice_calls += 1
                n = splice(src, NULL, d.pw, NULL, d.pcap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    d.pending = <size_t>n
                    t.last = now
                    progress = True
                elif n == 0:
                    d.eof = True
                    progress = True
                else:
                    e = errno
                    if e == EINTR:
                        progress = True
                    elif e == EINVAL or e == ENOSYS:
                        d.copy = True          # this socket refuses splice: copy instead
                        progress = True
                    elif e != EAGAIN:
                        _finish_errno(w, t, e)
                        return -1
            # pump: pipe -> socket, until the pipe is empty or the socket is full
            if d.pending > 0 and not d.copy:
                w.splice_calls += 1
                n = splice(d.pr, NULL, dst, NULL, d.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    d.pending -= <size_t>n
                    d.moved += <uint64_t>n
                    t.last = now
                    progress = True
                    if d.pending == 0:
                        _pipe_put(w, d)
                else:
                    e = errno if n < 0 else EAGAIN
                    if e == EINTR:
                        progress = True
                    elif e == EINVAL or e == ENOSYS:
                        d.copy = True          # copy path empties the pipe first
                        progress = True
                    elif e == EAGAIN:
                        d.wout = True          # bytes stay in the pipe until EPOLLOUT
                        return 0
                    else:
                        _finish_errno(w, t, e)
                        return -1
        if d.eof and d.pending == 0 and d.bpending == 0:
            shutdown(dst, SHUT_WR)             # errors (ENOTCONN: peer gone) ignored, as the twin
            d.shut = True
            _release_dir(w, d)
            if t.d[1 - di].shut:
                _finish(w, t, RES_OK, 0)
                return -1
            return 0
        if not progress:
            if d.pr >= 0 and d.pending == 0:
                _pipe_put(w, d)
            if d.buf != NULL and d.bpending == 0:
                _buf_put(w, d)
            return 0
    return 1


cdef void _service(Worker *w, Tunnel *t, int dirs, double now) noexcept nogil:
    cdef int di, r
    if t.insp != NULL:
        if not t.finished and t.result == RES_RUNNING:
            _insp_service(w, t, now)
        return
    for di in range(2):
        if t.finished or t.result != RES_RUNNING:
            return
        if dirs & (1 << di):
            r = _service_dir(w, t, di, now)
            if r < 0:
                return
            if r > 0:
                _rq_push(w, t, 1 << di)


cdef void _on_event(Worker *w, Tunnel *t, int side, uint32_t ev, double now) noexcept nogil:
    cdef int dirs = 0
    cdef int soerr = 0
    cdef socklen_t sl = sizeof(int)
    if t.result != RES_RUNNING:
        return
    if t.phase == PH_CONNECT:
        if side == 1:
            _connect_event(w, t, ev, now)
        return
    if t.phase == PH_CHAIN:
        if side == 1:
            _chain_event(w, t, ev, now)
        return
    if t.insp != NULL:
        kr_insp_event(t.insp, side, ev)
        _insp_service(w, t, now)
        return
    # Edge-triggered epoll reports every ready bit on each wakeup (a writable socket shows
    # EPOLLOUT with each arriving segment): only wake a direction for what it waits on.
    # Reading fd[side] helps its direction unless that one waits to write (the pipe must
    # empty before the next drain); fd[side] writable helps the other direction only if
    # that one is blocked writing.
    if ev & (EPOLLHUP | EPOLLERR):
        dirs = 3
    else:
        if ev & (EPOLLIN | EPOLLRDHUP) and not t.d[side].wout:
            dirs |= 1 << side
        if ev & EPOLLOUT and t.d[1 - side].wout:
            dirs |= 1 << (1 - side)
    if dirs == 0:
        return
    _service(w, t, dirs, now)
    if ev & EPOLLERR and t.result == RES_RUNNING:
        # an error on a socket neither direction would touch again (e.g. a reset after EOF)
        if getsockopt(t.fd[side], SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 and soerr != 0:
            _finish_errno(w, t, soerr)

# An engine worker: one thread, one epoll loop, entirely without the GIL.

# ── submissions, cancellations, timers ───────────────────────────────────────

cdef void _register(Worker *w, Tunnel *t) noexcept nogil:
    cdef epoll_event ev
    cdef int i
    cdef bint cancelled
    w.ntunnels += 1
    w.total_tunnels += 1
    pthread_mutex_lock(&w.mu)
    cancelled = t.cancel_req          # written under w.mu by _TunnelHandle.cancel
    pthread_mutex_unlock(&w.mu)
    if cancelled:
        _finish(w, t, RES_CANCELLED, 0)
        return
    if not kr_load_int(&g_splice_enabled):
        t.d[0].copy = True
        t.d[1].copy = True
    if t.phase == PH_CONNECT:
        t.key = t.cdeadline
        if _heap_push(w, t) < 0:
            _dial_fail(w, t, ENOMEM)      # the client gets the protocol's failure reply
            return
        _connect_next(w, t, _mono())
        return
    t.key = t.start + (t.idle if t.idle < t.total else t.total)
    if _heap_push(w, t) < 0:
        _finish_errno(w, t, ENOMEM)
        return
    for i in range(2):
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>t | <uint64_t>i
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, t.fd[i], &ev) < 0:
            _finish_errno(w, t, errno)     # deregisters and closes both
            return
        t.registered = True
    # epoll reports the current readiness of edge-triggered fds on ADD: no service here


cdef void _on_wake(Worker *w) noexcept nogil:
    cdef uint64_t v
    cdef Tunnel *subs
    cdef Tunnel *cans
    cdef Tunnel *t
    cdef Tunnel *nxt
    cdef Tunnel *rev = NULL
    cdef Listener *lsubs
    cdef Listener *lnxt
    while read(w.evfd, &v, 8) < 0 and errno == EINTR:
        pass
    pthread_mutex_lock(&w.mu)
    subs = w.sub_head
    cans = w.cancel_head
    lsubs = w.lsub
    w.sub_head = NULL
    w.cancel_head = NULL
    w.lsub = NULL
    w.wake_pending = False
    pthread_mutex_unlock(&w.mu)
    while lsubs != NULL:
        lnxt = lsubs.snext
        lsubs.snext = NULL
        lsubs.next = w.listeners
        w.listeners = lsubs
        _l_arm(w, lsubs)
        lsubs = lnxt
    # submissions were pushed LIFO: register oldest first
    t = subs
    while t != NULL:
        nxt = t.snext
        t.snext = rev
        rev = t
        t = nxt
    t = rev
    while t != NULL:
        nxt = t.snext
        t.snext = NULL
        _register(w, t)
        t = nxt
    t = cans
    while t != NULL:
        nxt = t.xnext
        t.xnext = NULL
        _finish(w, t, RES_CANCELLED, 0)
        _drop_ref(t)          # the cancel list's reference (freed only if nothing else holds it)
        t = nxt


cdef void _expire(Worker *w, double now) noexcept nogil:
    cdef Tunnel *t
    cdef double dl, tl
    while w.hlen > 0 and w.heap[0].key <= now:
        t = w.heap[0]
        if t.phase == PH_CONNECT or t.phase == PH_CHAIN:
            if t.fd[1] >= 0:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
                _close_fd(&t.fd[1])
            _dial_fail(w, t, ETIMEDOUT)
            continue
        tl = t.start + t.total
        dl = t.last + t.idle
        if tl < dl:
            dl = tl
        if dl <= now:
            _finish(w, t, RES_TOTAL if now >= tl else RES_IDLE, 0)
        else:
            t.key = dl
            _heap_down(w, 0)


cdef void _park(Worker *w) noexcept nogil:
    """A fork is coming (``_before_fork``): wait, holding no lock and between iterations, so
    the child inherits consistent lists (it closes every fd they name)."""
    pthread_mutex_lock(&w.mu)
    w.parked = True
    pthread_cond_broadcast(&w.pcond)
    while kr_load_int(&w.park):
        pthread_cond_wait(&w.pcond, &w.mu)
    w.parked = False
    pthread_mutex_unlock(&w.mu)


cdef void _worker_loop(Worker *w) noexcept nogil:
    cdef epoll_event evs[MAX_EVENTS]
    cdef int n, i, timeout, k
    cdef double now, wait, nxt_t
    cdef uint64_t u, tag
    cdef Tunnel *t
    cdef Tunnel *nxt
    cdef Tunnel *cans
    cdef bint stop = False
    cdef Listener *lp
    cdef Hs *hp
    now = _mono()
    while True:
        if w.rq_len > 0:
            timeout = 0
        else:
            nxt_t = _listeners_next(w) if w.listeners != NULL else 1e300
            if w.hlen > 0 and w.heap[0].key < nxt_t:
                nxt_t = w.heap[0].key
            if w.trim_at < nxt_t and _pools_trimmable(w):
                nxt_t = w.trim_at
            if nxt_t >= 1e300:
                timeout = -1
            else:
                wait = (nxt_t - now) * 1000.0
                if wait <= 0:
                    timeout = 0
                elif wait < 3600000.0:
                    timeout = <int>ceil(wait)
                else:
                    timeout = 3600000         # (also NaN)
        n = epoll_wait(w.epfd, evs, MAX_EVENTS, timeout)
        now = _mono()
        if n < 0:
            n = 0                 # EINTR
        for i in range(n):
            u = evs[i].data.u64
            if u == 0:
                _on_wake(w)
                pthread_mutex_lock(&w.mu)
                stop = w.stopping
                pthread_mutex_unlock(&w.mu)
            else:
                tag = u & 3
                if tag == TAG_LISTENER:
                    lp = <Listener *><uintptr_t>(u & ~(<uint64_t>3))
                    if not lp.done:
                        _l_accept(w, lp, now)
                elif tag == TAG_HS:
                    hp = <Hs *><uintptr_t>(u & ~(<uint64_t>3))
                    if hp.state != ST_DEAD:       # shed earlier in this batch: its event is stale
                        _hs_read(w, hp.l, hp)
                else:
                    _on_event(w, <Tunnel *><uintptr_t>(u & ~(<uint64_t>1)), <int>(u & 1), evs[i].events, now)
        # tunnels whose budget ran out last time (those queued now wait for the next round)
        k = w.rq_len
        while k > 0 and w.rq_head != NULL:
            k -= 1
            t = w.rq_head
            i = t.rq_dirs
            t.rq_dirs = 0
            _rq_remove(w, t)
            _service(w, t, i, now)
        _expire(w, now)
        if w.listeners != NULL:
            _listeners_service(w, now)
        if w.done_head != NULL:
            _flush_done(w)
        _hs_bury(w)
        if now >= w.trim_at:
            _trim_pools(w, now)
        if stop:
            break
        if kr_load_int(&w.park):
            _park(w)
    # shutting down: close the listeners, fail every live tunnel, then release the pools
    _on_wake(w)
    _listeners_service(w, now)      # (w.stopping: closes them all)
    _hs_bury(w)
    while w.hlen > 0:
        _finish(w, w.heap[0], RES_SHUTDOWN, 0)
    # a cancel queued after the last wake: its tunnel is finished by now, drop the cancel
    # list's reference; from here on cancel() queues nothing (w.exited)
    pthread_mutex_lock(&w.mu)
    w.exited = True
    pthread_cond_broadcast(&w.pcond)      # (a fork waiting for this worker to park)
    cans = w.cancel_head
    w.cancel_head = NULL
    pthread_mutex_unlock(&w.mu)
    while cans != NULL:
        nxt = cans.xnext
        cans.xnext = NULL
        _finish(w, cans, RES_CANCELLED, 0)
        _drop_ref(cans)
        cans = nxt
    _flush_done(w)
    while w.pool_n > 0:
        w.pool_n -= 1
        close(w.pool_r[w.pool_n])
        close(w.pool_w[w.pool_n])
    while w.buf_n > 0:
        w.buf_n -= 1
        free(w.bufs[w.buf_n])
    _close_fd(&w.epfd)


def _worker_main(_Engine engine, int idx):
    cdef Worker *w = engine.workers[idx]
    with nogil:
        _worker_loop(w)

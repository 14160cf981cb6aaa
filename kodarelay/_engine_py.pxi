# The engine's Python side: the engine object, tunnel handles, controls and the relay call.

cdef class _Engine:
    cdef Worker **workers
    cdef Completer *completer
    cdef object completer_thread
    cdef int nworkers
    cdef int next_worker
    cdef object threads
    cdef bint stopped
    cdef bint started
    cdef bint forked         # inherited by a forked child: never touched again (see _after_fork_in_child)

    def __cinit__(self, int nthreads):
        cdef int i
        cdef Worker *w
        cdef epoll_event ev
        self.completer = <Completer *>calloc(1, sizeof(Completer))
        if self.completer == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.completer.mu, NULL)
        pthread_cond_init(&self.completer.cond, NULL)
        self.workers = <Worker **>calloc(nthreads, sizeof(Worker *))
        if self.workers == NULL:
            raise MemoryError()
        self.nworkers = 0
        self.threads = []
        for i in range(nthreads):
            w = <Worker *>calloc(1, sizeof(Worker))
            if w == NULL:
                raise MemoryError()
            w.epfd = -1
            w.evfd = -1
            pthread_mutex_init(&w.mu, NULL)
            pthread_cond_init(&w.pcond, NULL)
            w.completer = self.completer
            self.workers[i] = w
            self.nworkers += 1
            w.epfd = epoll_create1(EPOLL_CLOEXEC)
            if w.epfd < 0:
                raise OSError(errno, _os.strerror(errno))
            w.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if w.evfd < 0:
                raise OSError(errno, _os.strerror(errno))
            ev.events = EPOLLIN
            ev.data.u64 = 0
            if epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.evfd, &ev) < 0:
                raise OSError(errno, _os.strerror(errno))

    def start(self):
        """Start the completer and the workers. A start that fails partway (RLIMIT_NPROC, a
        pids cgroup) stops the threads it started and raises one ``RuntimeError``; the
        engine is then unusable and ``_get_engine`` retries with a fresh one next time."""
        cdef int i
        cdef int k = 0
        self.started = True
        try:
            th = _threading.Thread(
                target=_completer_main, args=(self,), name="kodarelay-engine-completer", daemon=True
            )
            _thread_start_check(k)
            th.start()
            k += 1
            self.completer_thread = th
            for i in range(self.nworkers):
                th = _threading.Thread(
                    target=_worker_main, args=(self, i), name=f"kodarelay-engine-{i}", daemon=True
                )
                _thread_start_check(k)
                th.start()
                k += 1
                self.threads.append(th)
        except BaseException as exc:
            self.stop()
            raise RuntimeError(
                f"kodarelay engine could not start its threads ({k} of {self.nworkers + 1} started, "
                f"stopped again): {exc}"
            ) from exc

    def stop(self):
        """Wake every worker, let it fail its tunnels and close its fds, and join it."""
        cdef int i
        cdef Worker *w
        if self.stopped:
            return
        self.stopped = True
        for i in range(self.nworkers):
            w = self.workers[i]
            pthread_mutex_lock(&w.mu)
            w.stopping = True
            w.wake_pending = False
            _wake_locked(w)
            pthread_mutex_unlock(&w.mu)
        for th in self.threads:
            if th is not _threading.current_thread():
                th.join()
        self.threads = []
        # the workers handed their last completions over: let the completer deliver them
        pthread_mutex_lock(&self.completer.mu)
        self.completer.stopping = True
        pthread_cond_signal(&self.completer.cond)
        pthread_mutex_unlock(&self.completer.mu)
        th = self.completer_thread
        if th is not None and th is not _threading.current_thread():
            th.join()
        self.completer_thread = None
        for i in range(self.nworkers):
            w = self.workers[i]
            pthread_mutex_lock(&w.mu)
            _close_fd(&w.evfd)
            pthread_mutex_unlock(&w.mu)
            _close_fd(&w.epfd)    # normally closed by the worker already

    def __dealloc__(self):
        cdef int i
        cdef Worker *w
        if self.completer != NULL and (self.stopped or not self.started):
            pthread_mutex_destroy(&self.completer.mu)
            pthread_cond_destroy(&self.completer.cond)
            free(self.completer)
            self.completer = NULL
        if self.workers == NULL:
            return
        for i in range(self.nworkers):
            w = self.workers[i]
            if not self.stopped:
                # never started (construction failed): nothing runs on these
                _close_fd(&w.evfd)
                _close_fd(&w.epfd)
            pthread_mutex_destroy(&w.mu)
            pthread_cond_destroy(&w.pcond)
            free(w.heap)
            free(w)
        free(self.workers)
        self.workers = NULL

    cdef Worker *pick(self):
        cdef Worker *w = self.workers[self.next_worker]
        self.next_worker = (self.next_worker + 1) % self.nworkers
        return w

    cdef dict stats(self):
        cdef int i
        cdef Worker *w
        cdef Py_ssize_t live = 0, pooled = 0
        cdef uint64_t total = 0, pipes = 0, sc = 0, cc = 0, fb = 0
        cdef Py_ssize_t bufs = 0, inuse = 0
        for i in range(self.nworkers):
            w = self.workers[i]
            live += w.ntunnels
            pooled += w.pool_n
            bufs += w.buf_n
            inuse += w.pipes_out
            fb += w.pipe_fallbacks
            total += w.total_tunnels
            pipes += w.pipes_created
            sc += w.splice_calls
            cc += w.copy_calls
        return {
            "running": not self.stopped,
            "threads": self.nworkers,
            "tunnels": live,
            "tunnels_total": total,
            "pooled_pipes": pooled,
            "pooled_buffers": bufs,
            "pipes_in_use": inuse,
            "pipe_fallbacks": fb,
            "pipes_created": pipes,
            "splice_calls": sc,
            "copy_calls": cc,
            "splice_enabled": bool(kr_load_int(&g_splice_enabled)),
            "pipe_size": kr_load_int(&g_pipe_size),
        }


cdef class _TunnelHandle:
    """Python-side half of a tunnel: the future to resolve and the right to cancel."""
    cdef Tunnel *t
    cdef _Engine engine
    cdef object loop
    cdef object fut
    cdef object idle_o
    cdef object total_o
    cdef object on_done      # native dials: called on the completer thread instead of a future

    def __dealloc__(self):
        if self.t != NULL:
            if self.engine is None or not self.engine.forked:
                _drop_ref(self.t)     # (in a forked child the worker's mutex may be held: leave it)
            self.t = NULL

    def outcome(self):
        """None when the tunnel ended normally (or was cancelled), else its exception."""
        cdef int res = self.t.result, err = self.t.err
        if res == RES_ERRNO:
            return OSError(err, _os.strerror(err))
        if res == RES_TOTAL:
            return TimeoutError(f"relay exceeded total timeout of {self.total_o}s")
        if res == RES_IDLE:
            return TimeoutError(f"relay idle for {self.idle_o}s")
        if res == RES_DIAL:
            return DialError(err, _os.strerror(err))
        if res == RES_SHUTDOWN:
            return ConnectionAbortedError(ECONNABORTED, "kodarelay relay engine shut down")
        return None

    def _deliver(self):
        cdef Tunnel *t = self.t
        fut = self.fut
        if fut.done():
            return
        if t.result == RES_OK:
            fut.set_result((t.d[0].moved, t.d[1].moved))
        elif t.result == RES_CANCELLED or t.result == RES_RUNNING:
            fut.cancel()
        else:
            fut.set_exception(self.outcome())

    @property
    def fut(self):
        return self.fut

    def take_handback(self):
        """A forwarded connection the engine gave back (``RES_HANDBACK``): ``(fd, unread
        bytes)``, the fd now the caller's; None otherwise (or once taken)."""
        cdef Tunnel *t = self.t
        if t == NULL or t.result != RES_HANDBACK or t.hbfd < 0:
            return None
        data = t.hb[:t.hbn] if t.hb != NULL else b""
        fd = t.hbfd
        t.hbfd = -1
        free(t.hb)
        t.hb = NULL
        return fd, data

    @property
    def moved(self):
        """(bytes to the target, bytes to the client) so far."""
        if self.t == NULL:
            return (0, 0)
        return (self.t.d[0].moved, self.t.d[1].moved)

    def abort(self):
        """End the tunnel and cancel its future (which the engine no longer resolves); an
        ``on_done`` callback is not called after this."""
        self.cancel()
        if self.fut is not None and not self.fut.done():
            self.fut.cancel()

    cdef void cancel(self):
        cdef Tunnel *t = self.t
        cdef Worker *w
        cdef PyObject *wp = NULL
        if t == NULL or (self.engine is not None and self.engine.forked):
            return                    # a forked child's copy: the tunnel is not ours
        w = t.w
        pthread_mutex_lock(&w.mu)
        if not t.finished and not t.cancel_req and not w.exited:
            t.cancel_req = True
            wp = t.waiter
            t.waiter = NULL
            t.refs += 1               # held by the cancel list
            t.xnext = w.cancel_head
            w.cancel_head = t
            _wake_locked(w)
        pthread_mutex_unlock(&w.mu)
        if wp != NULL:
            Py_DECREF(<object>wp)


cdef _Engine _engine = None
cdef int _engine_threads = 0
_engine_lock = _threading.Lock()


cdef int _env_threads():
    raw = _os.environ.get("KODARELAY_ENGINE_THREADS", "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        return 1
    return min(max(n, 1), MAX_THREADS)


cdef int _fail_thread_start = -1     # test hook: the k-th thread start of an engine fails


cdef int _thread_start_check(int k) except -1:
    if _fail_thread_start >= 0 and k >= _fail_thread_start:
        raise RuntimeError("can't start new thread (test hook)")
    return 0


def _test_fail_thread_start(int k):
    """Test hook: starting an engine's ``k``-th thread (0: the completer, then the workers)
    fails as if the thread limit were reached; ``-1`` restores normal starts."""
    global _fail_thread_start
    _fail_thread_start = k


cdef _Engine _get_engine():
    global _engine
    if _engine is not None:
        return _engine
    with _engine_lock:
        if _engine is None:
            e = _Engine(_engine_threads if _engine_threads > 0 else _env_threads())
            e.start()                 # raises after stopping what it started; retried next call
            _engine = e
        return _engine


def set_engine_threads(n):
    """Number of engine threads (1-64) for the next start of the engine.

    The engine starts lazily with this many threads (default: ``KODARELAY_ENGINE_THREADS``,
    else 1). A running engine keeps its threads until ``shutdown_engine()``.
    """
    global _engine_threads
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"engine threads must be 1-{MAX_THREADS}, got {n}")
    _engine_threads = n


def set_splice_enabled(enabled):
    """Global switch: ``False`` makes new tunnels copy with recv/send instead of splice(2)."""
    kr_store_int(&g_splice_enabled, 1 if enabled else 0)


def set_pipe_size(nbytes):
    """Pipe capacity requested (F_SETPIPE_SZ) for pipes created from now on; 0: kernel default."""
    nbytes = int(nbytes)
    if nbytes < 0 or nbytes > (1 << 30):
        raise ValueError(f"pipe size out of range: {nbytes}")
    kr_store_int(&g_pipe_size, <int>nbytes)


def engine_stats():
    """A snapshot of the engine's counters (``{"running": False}`` when it is not started)."""
    e = _engine
    if e is None:
        return {"running": False, "threads": 0, "tunnels": 0, "pooled_pipes": 0,
                "splice_enabled": bool(kr_load_int(&g_splice_enabled)), "pipe_size": kr_load_int(&g_pipe_size)}
    return (<_Engine>e).stats()


def shutdown_engine():
    """Stop the engine: live tunnels fail with ``ConnectionAbortedError``, every fd is closed,
    the threads are joined. The next relay starts a fresh engine."""
    global _engine
    with _engine_lock:
        e = _engine
        _engine = None
    if e is not None:
        (<_Engine>e).stop()


_forked_engines = []


def _before_fork():
    """Park every worker of the running engine at a safe point (no lock held, no list half
    changed) so that a forked child inherits consistent structures; released right after."""
    cdef _Engine e = _engine
    cdef Worker *w
    cdef int i
    if e is None or e.stopped or not e.started:
        return
    for i in range(e.nworkers):
        w = e.workers[i]
        with nogil:
            pthread_mutex_lock(&w.mu)
            kr_store_int(&w.park, 1)
            if not w.exited:
                _wake_locked(w)
            while not w.parked and not w.exited:
                pthread_cond_wait(&w.pcond, &w.mu)
            pthread_mutex_unlock(&w.mu)


def _after_fork_in_parent():
    cdef _Engine e = _engine
    cdef Worker *w
    cdef int i
    if e is None or not e.started:
        return
    for i in range(e.nworkers):
        w = e.workers[i]
        pthread_mutex_lock(&w.mu)
        kr_store_int(&w.park, 0)
        pthread_cond_broadcast(&w.pcond)
        pthread_mutex_unlock(&w.mu)


cdef void _close_hs_list(Hs *h) noexcept nogil:
    while h != NULL:
        _close_fd(&h.fd)
        h = h.next


cdef void _close_tunnel_fds(Tunnel *t) noexcept nogil:
    cdef int i
    for i in range(2):
        _close_fd(&t.fd[i])
        _close_fd(&t.d[i].pr)
        _close_fd(&t.d[i].pw)


cdef void _close_listener_fds(Listener *l) noexcept nogil:
    _close_fd(&l.fd)
    _close_hs_list(l.head)
    _close_hs_list(l.ready_head)
    _close_hs_list(l.pend_head)


cdef void _abandon_in_child(_Engine e) noexcept nogil:
    """In a forked child: close every fd the parent's engine owned (its workers parked at
    fork, see _before_fork, so their lists are consistent), lock nothing, free nothing.
    Otherwise the child would keep the parent's tunnels open: no FIN when the parent closes."""
    cdef int i, k
    cdef Worker *w
    cdef Tunnel *t
    cdef Listener *l
    for i in range(e.nworkers):
        w = e.workers[i]
        for k in range(<int>w.hlen):
            _close_tunnel_fds(w.heap[k])
        t = w.sub_head
        while t != NULL:
            _close_tunnel_fds(t)
            t = t.snext
        l = w.listeners
        while l != NULL:
            _close_listener_fds(l)
            l = l.next
        l = w.lsub
        while l != NULL:
            _close_listener_fds(l)
            l = l.snext
        while w.pool_n > 0:
            w.pool_n -= 1
            close(w.pool_r[w.pool_n])
            close(w.pool_w[w.pool_n])
        _close_fd(&w.epfd)
        _close_fd(&w.evfd)


def _after_fork_in_child():
    """The worker threads do not exist in the child and a lock may have been held at fork:
    close what the parent's engine owned and abandon it (it is never deallocated, handles and
    listeners inherited from the parent do nothing on dealloc). A new engine starts lazily."""
    global _engine
    cdef _Engine e = _engine
    if e is not None:
        e.forked = True
        if e.started and not e.stopped:
            _abandon_in_child(e)
        _forked_engines.append(e)
        _engine = None
    global _engine_lock
    _engine_lock = _threading.Lock()


_atexit.register(shutdown_engine)
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                         after_in_child=_after_fork_in_child)

def _pipe_size_from_env():
    """``KODARELAY_PIPE_SIZE``: bytes (ASCII digits, 0-2**30) through ``set_pipe_size``; any other
    value is ignored with a ``RuntimeWarning`` (the default stays): a bad variable never fails
    ``import kodarelay``."""
    raw = _os.environ.get("KODARELAY_PIPE_SIZE", "").strip()
    if not raw:
        return
    try:
        if not (raw.isascii() and raw.isdigit()):
            raise ValueError(raw)
        set_pipe_size(int(raw))
    except (ValueError, OverflowError):
        import warnings
        warnings.warn(f"KODARELAY_PIPE_SIZE={raw!r} ignored: expected bytes from 0 to {1 << 30}",
                      RuntimeWarning, stacklevel=2)


if _os.environ.get("KODARELAY_NO_SPLICE", "").strip().lower() in {"1", "true", "yes", "on"}:
    set_splice_enabled(False)
_pipe_size_from_env()


cdef Tunnel *_tunnel_new(double idle, double total) noexcept nogil:
    """The one tunnel constructor: no fds, no pipes, not in the heap, only the engine's
    reference. A NaN limit means none. NULL when out of memory."""
    cdef Tunnel *t = <Tunnel *>calloc(1, sizeof(Tunnel))
    cdef int i
    if t == NULL:
        return NULL
    for i in range(2):
        t.fd[i] = -1
        t.d[i].pr = -1
        t.d[i].pw = -1
    t.hbfd = -1
    t.hidx = -1
    t.idle = idle if idle == idle else 1e300
    t.total = total if total == total else 1e300
    t.start = _mono()
    t.last = t.start
    t.refs = 1
    return t


cdef void _tunnel_free(Tunnel *t) noexcept nogil:
    """Free a tunnel no worker has seen (its fds are closed, the dial data freed)."""
    _close_fd(&t.fd[0])
    _close_fd(&t.fd[1])
    free(t.addrs)
    free(t.okrep)
    free(t.early)
    free(t.creq)
    free(t.chead)
    free(t.rhost)
    _ispec_free(t.ispec)
    free(t)


cdef _TunnelHandle _handle_new(loop, idle, total, on_done):
    """The Python half of a tunnel, made before any fd is taken: when the engine cannot start
    or ``create_future`` raises, the caller still owns its sockets (and can still answer)."""
    cdef _TunnelHandle h
    e = _get_engine()
    h = _TunnelHandle.__new__(_TunnelHandle)
    h.engine = e
    h.loop = loop
    h.on_done = on_done
    h.fut = loop.create_future() if on_done is None else None
    h.idle_o = idle
    h.total_o = total
    return h


cdef _TunnelHandle _tunnel_submit(Tunnel *t, _TunnelHandle h):
    """Bind ``t`` to ``h`` and hand it to a worker (of a fresh engine if the current one
    stopped meanwhile). On failure ``t`` is freed, its fds closed, and the error raised."""
    cdef Worker *w
    cdef _Engine e = h.engine
    h.t = t
    t.refs = 2                # the engine's and the handle's
    Py_INCREF(h)
    t.waiter = <PyObject *>h
    while True:
        w = e.pick()
        t.w = w
        h.engine = e
        pthread_mutex_lock(&w.mu)
        if not w.stopping:
            t.snext = w.sub_head
            w.sub_head = t
            _wake_locked(w)
            pthread_mutex_unlock(&w.mu)
            return h
        pthread_mutex_unlock(&w.mu)
        # shutdown_engine() ran in between (another thread): use a fresh engine
        try:
            e = _get_engine()
        except BaseException:
            t.waiter = NULL
            Py_DECREF(h)
            h.t = NULL
            _tunnel_free(t)
            raise


cdef _TunnelHandle _submit(a, b, idle, total, loop):
    """Detach the sockets, build the tunnel and hand it to a worker. Closes both on failure."""
    cdef int fa = -1, fb = -1
    cdef Tunnel *t
    cdef _TunnelHandle h
    try:
        h = _handle_new(loop, idle, total, None)     # before the fds leave their sockets
        a.setblocking(False)
        b.setblocking(False)
        nd = [s.family in (_AF_INET, _AF_INET6) and s.type == _SOCK_STREAM for s in (a, b)]
        t = _tunnel_new(idle, total)
        if t == NULL:
            raise MemoryError()
        fa = a.detach()
        fb = b.detach()
        t.fd[0] = fa
        t.fd[1] = fb
        if fa < 0 or fb < 0:
            _tunnel_free(t)
            raise OSError(EBADF, _os.strerror(EBADF))
    except BaseException:
        a.close()
        b.close()
        raise
    if nd[0]:
        _nodelay(fa)
    if nd[1]:
        _nodelay(fb)
    return _tunnel_submit(t, h)


from socket import AF_INET as _AF_INET, AF_INET6 as _AF_INET6, SOCK_STREAM as _SOCK_STREAM


async def relay_with_timeouts(a, b, idle=300.0, total=3600.0):
    """Copy bytes both ways between ``a`` and ``b`` until both directions reach EOF.

    Compiled engine: same contract as ``kodarelay._relay_py.relay_with_timeouts``. The bytes
    move in the engine's native threads, without the GIL. Returns ``(a_to_b, b_to_a)``.
    """
    loop = _asyncio.get_running_loop()
    cdef _TunnelHandle h = _submit(a, b, idle, total, loop)
    try:
        return await h.fut
    except BaseException:
        h.cancel()      # no-op once the engine finished the tunnel
        raise

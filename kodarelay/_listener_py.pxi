# The native front-end's Python side: listeners and the handshakes they deliver.

class DialError(OSError):
    """The engine could not connect a natively dialled tunnel (its client got the failure reply)."""


cdef class _NativeListener:
    """The engine serving a listening socket's handshakes; batches go to ``cb(items, err)``
    on ``loop`` (``err``: an accept errno, -1 when the engine stopped, else 0)."""
    cdef Listener *l
    cdef _Engine e
    cdef readonly object loop
    cdef readonly object cb
    cdef readonly object direct

    def __cinit__(self, lsock, int mode, double hs_timeout, loop, cb, direct=None):
        cdef Listener *l
        cdef Worker *w
        cdef int fd
        self.loop = loop
        self.cb = cb
        self.direct = direct
        fd = fcntl(lsock.fileno(), F_DUPFD_CLOEXEC, 0)
        if fd < 0:
            raise OSError(errno, _os.strerror(errno))
        l = <Listener *>calloc(1, sizeof(Listener))
        if l == NULL:
            close(fd)
            raise MemoryError()
        l.fd = fd
        l.mode = mode
        l.hs_timeout = hs_timeout
        l.refs = 2                    # this object + the worker
        l.owner = <PyObject *>self
        while True:
            try:
                e = _get_engine()
            except BaseException:
                close(fd)
                free(l)
                raise
            w = e.pick()
            pthread_mutex_lock(&w.mu)
            if not w.stopping:
                l.w = w
                l.snext = w.lsub
                w.lsub = l
                _wake_locked(w)
                pthread_mutex_unlock(&w.mu)
                break
            pthread_mutex_unlock(&w.mu)
        self.e = e
        self.l = l

    def close(self):
        """Stop accepting (the engine closes its copy of the listener and open handshakes)."""
        cdef Listener *l = self.l
        if l == NULL:
            return
        pthread_mutex_lock(&l.w.mu)
        l.closing = True
        _wake_locked(l.w)
        pthread_mutex_unlock(&l.w.mu)

    def __dealloc__(self):
        cdef Listener *l = self.l
        if l == NULL:
            return
        self.close()
        pthread_mutex_lock(&l.w.completer.mu)
        l.owner = NULL
        pthread_mutex_unlock(&l.w.completer.mu)
        self.l = NULL
        _l_drop(l.w.completer, l)


cdef class _Handshake:
    """A connection whose handshake the engine read; answer it exactly once."""
    cdef Hs *hs
    cdef readonly int proto           # 0 HTTP, 1 SOCKS5
    cdef readonly bint overflow       # the HTTP head did not end within 8 KiB
    cdef readonly bytes data          # HTTP: everything read; SOCKS5: the request onwards

    def __dealloc__(self):
        if self.hs != NULL:
            _close_fd(&self.hs.fd)
            free(self.hs)
            self.hs = NULL

    cdef int take(self) except -1:
        cdef int fd
        if self.hs == NULL:
            raise ValueError("handshake already answered")
        fd = self.hs.fd
        free(self.hs)
        self.hs = NULL
        return fd

    def close(self):
        if self.hs != NULL:
            _close_fd(&self.hs.fd)
            free(self.hs)
            self.hs = NULL

    def reply_and_close(self, const unsigned char[:] reply):
        """Send ``reply`` (non-blocking, best effort: a fresh socket takes it) and close."""
        cdef int fd = self.take()
        if reply.shape[0] > 0:
            _send_all_nb(fd, <const char *>&reply[0], reply.shape[0])
        close(fd)

    def detach(self):
        """The fd (non-blocking) for the asyncio path; the caller owns it."""
        return self.take()

    def dial(self, addresses, int port, bytes ok_reply, bytes early, connect_timeout, idle, total, bint socks,
             loop=None, on_done=None):
        """Connect to ``addresses`` in order (IP literals, already judged) within ``connect_timeout``;
        on success send ``ok_reply`` to the client and ``early`` to the target and relay the pair.
        Returns the tunnel's handle (its ``fut`` resolves like ``relay_with_timeouts``; a failed
        dial raises ``DialError`` after the protocol's failure reply went to the client)."""
        cdef Py_ssize_t n = len(addresses), i
        cdef Tunnel *t
        if self.hs == NULL:
            raise ValueError("handshake already answered")
        if n == 0:
            raise ValueError("no address to dial")
        t = _tunnel_new(idle, total)
        if t == NULL:
            raise MemoryError()
        t.addrs = <kr_addr *>calloc(n, sizeof(kr_addr))
        t.okrep = <char *>malloc(len(ok_reply) + 1)
        t.early = <char *>malloc(len(early) + 1)
        if t.addrs == NULL or t.okrep == NULL or t.early == NULL:
            _tunnel_free(t)
            raise MemoryError()
        for i in range(n):
            a = str(addresses[i]).encode("ascii")
            if kr_addr_set(&t.addrs[i], a, port) < 0:
                _tunnel_free(t)
                raise ValueError(f"not an IP address: {addresses[i]!r}")
        t.naddr = <int>n
        memcpy(t.okrep, <char *>ok_reply, len(ok_reply))
        t.okn = len(ok_reply)
        memcpy(t.early, <char *>early, len(early))
        t.earlyn = len(early)
        t.socks = socks
        t.phase = PH_CONNECT
        t.cdeadline = t.start + <double>connect_timeout
        if loop is None:
            try:
                loop = _asyncio.get_running_loop()
            except BaseException:
                _tunnel_free(t)
                raise
        t.fd[0] = self.take()
        return _tunnel_submit(t, loop, idle, total, on_done)


def native_listen(lsock, mode, handshake_timeout, loop, cb, direct=None):
    """Serve ``lsock``'s handshakes in the engine (mode: "http", "socks5" or "mux").

    Each batch first goes to ``direct(items) -> items left`` on the engine's completer thread
    (when given), then what is left (and any accept error) to ``cb(items, err)`` on ``loop``."""
    return _NativeListener(lsock, {"http": 0, "socks5": 1, "mux": 2}[mode], handshake_timeout, loop, cb, direct)

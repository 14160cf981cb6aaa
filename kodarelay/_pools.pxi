# Pipe and buffer pools, per worker (worker thread only).
#
# Pipes are taken only while bytes are in flight, so an idle tunnel holds none; a pipe that
# still holds bytes is never pooled.

cdef int _pipe_get(Worker *w, Dir *d) noexcept nogil:
    cdef int p[2]
    cdef int sz
    cdef int want = kr_load_int(&g_pipe_size)
    if w.pool_n > 0:
        w.pool_n -= 1
        d.pr = w.pool_r[w.pool_n]
        d.pw = w.pool_w[w.pool_n]
        d.pcap = w.pool_cap[w.pool_n]
        return 0
    if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    if want > 0:
        fcntl(p[1], F_SETPIPE_SZ, want)   # may fail (pipe-user-pages); keep default
    sz = fcntl(p[1], F_GETPIPE_SZ)
    d.pr = p[0]
    d.pw = p[1]
    d.pcap = <size_t>sz if sz > 0 else 65536
    w.pipes_created += 1
    return 0


cdef void _pipe_put(Worker *w, Dir *d) noexcept nogil:
    if d.pr < 0:
        return
    if d.pending == 0 and w.pool_n < POOL_MAX and w.pool_n < POOL_SPARE + w.ntunnels:
        w.pool_r[w.pool_n] = d.pr
        w.pool_w[w.pool_n] = d.pw
        w.pool_cap[w.pool_n] = d.pcap
        w.pool_n += 1
    else:                 # never pool a pipe that still holds bytes
        close(d.pr)
        close(d.pw)
    d.pr = -1
    d.pw = -1
    d.pending = 0


cdef void _buf_put(Worker *w, Dir *d) noexcept nogil:
    if d.buf == NULL:
        return
    if w.buf_n < POOL_MAX and w.buf_n < POOL_SPARE + w.ntunnels:
        w.bufs[w.buf_n] = d.buf
        w.buf_n += 1
    else:
        free(d.buf)
    d.buf = NULL
    d.bpending = 0
    d.boff = 0


cdef int _buf_get(Worker *w, Dir *d) noexcept nogil:
    if w.buf_n > 0:
        w.buf_n -= 1
        d.buf = w.bufs[w.buf_n]
    else:
        d.buf = <char *>malloc(COPY_BUF)
        if d.buf == NULL:
            return -1
    d.bpending = 0
    d.boff = 0
    return 0


cdef void _trim_pools(Worker *w) noexcept nogil:
    # after a burst of tunnels ends, give back what only that burst needed
    while w.pool_n > POOL_SPARE + w.ntunnels:
        w.pool_n -= 1
        close(w.pool_r[w.pool_n])
        close(w.pool_w[w.pool_n])
    while w.buf_n > POOL_SPARE + w.ntunnels:
        w.buf_n -= 1
        free(w.bufs[w.buf_n])

# Pipe and buffer pools, per worker (worker thread only).
#
# Pipes are taken only while bytes are in flight, so an idle tunnel holds none; a pipe that
# still holds bytes is never pooled. The pools are bounded by what is actually in use: at
# most POOL_SPARE more than the peak of pipes (buffers) held by directions moving bytes since
# the last trim, and a timer (TRIM_EVERY) trims them to that bound, so an idle engine ends
# up holding POOL_SPARE pipes at most (pooled 256 KiB pipes count against the user's
# pipe-user-pages-soft, past which new pipes silently shrink).

cdef inline void _pipe_out(Worker *w, int delta) noexcept nogil:
    w.pipes_out += delta
    if w.pipes_out > w.pipes_peak:
        w.pipes_peak = w.pipes_out


cdef inline void _buf_out(Worker *w, int delta) noexcept nogil:
    w.bufs_out += delta
    if w.bufs_out > w.bufs_peak:
        w.bufs_peak = w.bufs_out

cdef int _pipe_get(Worker *w, Dir *d) noexcept nogil:
    cdef int p[2]
    cdef int sz
    cdef int want = kr_load_int(&g_pipe_size)
    if w.pool_n > 0:
        w.pool_n -= 1
        d.pr = w.pool_r[w.pool_n]
        d.pw = w.pool_w[w.pool_n]
        d.pcap = w.pool_cap[w.pool_n]
        _pipe_out(w, 1)
        return 0
    if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1             # (errno: EMFILE / ENFILE / ENOMEM; the caller copies instead)
    if want > 0:
        fcntl(p[1], F_SETPIPE_SZ, want)   # may fail (pipe-user-pages); keep default
    sz = fcntl(p[1], F_GETPIPE_SZ)
    d.pr = p[0]
    d.pw = p[1]
    d.pcap = <size_t>sz if sz > 0 else 65536
    w.pipes_created += 1
    _pipe_out(w, 1)
    return 0


cdef void _pipe_put(Worker *w, Dir *d) noexcept nogil:
    if d.pr < 0:
        return
    _pipe_out(w, -1)
    if d.pending == 0 and w.pool_n < POOL_MAX and w.pool_n < POOL_SPARE + w.pipes_peak - w.pipes_out:
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
    _buf_out(w, -1)
    if w.buf_n < POOL_MAX and w.buf_n < POOL_SPARE + w.bufs_peak - w.bufs_out:
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
    _buf_out(w, 1)
    d.bpending = 0
    d.boff = 0
    return 0


cdef void _trim_pools(Worker *w, double now) noexcept nogil:
    """The pool timer: keep at most POOL_SPARE more than the peak in use since the last trim
    (a pooled pipe is 2 fds and up to 256 KiB of pipe pages), then start a new period."""
    while w.pool_n > 0 and w.pool_n > POOL_SPARE + w.pipes_peak - w.pipes_out:
        w.pool_n -= 1
        close(w.pool_r[w.pool_n])
        close(w.pool_w[w.pool_n])
    while w.buf_n > 0 and w.buf_n > POOL_SPARE + w.bufs_peak - w.bufs_out:
        w.buf_n -= 1
        free(w.bufs[w.buf_n])
    w.pipes_peak = w.pipes_out
    w.bufs_peak = w.bufs_out
    w.trim_at = now + TRIM_EVERY


cdef inline bint _pools_trimmable(Worker *w) noexcept nogil:
    """Something the next trim could release (else the pool timer need not wake the worker)."""
    return w.pool_n > POOL_SPARE or w.buf_n > POOL_SPARE or w.pipes_peak > w.pipes_out \
        or w.bufs_peak > w.bufs_out

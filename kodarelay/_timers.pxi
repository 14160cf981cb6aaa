# Per-worker deadlines and the run queue (worker thread only).
#
# The heap is keyed by a lower bound of each tunnel's deadline (idle / total, or the connect
# deadline while dialling); activity only moves a deadline later, so the heap is fixed lazily
# when its top expires. The run queue holds tunnels whose service budget ran out.

cdef inline void _heap_set(Worker *w, Py_ssize_t i, Tunnel *t) noexcept nogil:
    w.heap[i] = t
    t.hidx = i


cdef void _heap_up(Worker *w, Py_ssize_t i) noexcept nogil:
    cdef Tunnel *t = w.heap[i]
    cdef Py_ssize_t p
    while i > 0:
        p = (i - 1) >> 1
        if w.heap[p].key <= t.key:
            break
        _heap_set(w, i, w.heap[p])
        i = p
    _heap_set(w, i, t)


cdef void _heap_down(Worker *w, Py_ssize_t i) noexcept nogil:
    cdef Tunnel *t = w.heap[i]
    cdef Py_ssize_t c
    while True:
        c = 2 * i + 1
        if c >= w.hlen:
            break
        if c + 1 < w.hlen and w.heap[c + 1].key < w.heap[c].key:
            c += 1
        if t.key <= w.heap[c].key:
            break
        _heap_set(w, i, w.heap[c])
        i = c
    _heap_set(w, i, t)


cdef int _heap_push(Worker *w, Tunnel *t) noexcept nogil:
    cdef Py_ssize_t ncap
    cdef Tunnel **nh
    if w.hlen == w.hcap:
        ncap = w.hcap * 2 if w.hcap else 64
        nh = <Tunnel **>realloc(w.heap, ncap * sizeof(Tunnel *))
        if nh == NULL:
            return -1
        w.heap = nh
        w.hcap = ncap
    w.hlen += 1
    _heap_set(w, w.hlen - 1, t)
    _heap_up(w, w.hlen - 1)
    return 0


cdef void _heap_remove(Worker *w, Tunnel *t) noexcept nogil:
    cdef Py_ssize_t i = t.hidx
    cdef Tunnel *last
    if i < 0:
        return
    t.hidx = -1
    w.hlen -= 1
    if i == w.hlen:
        return
    last = w.heap[w.hlen]
    _heap_set(w, i, last)
    if i > 0 and w.heap[(i - 1) >> 1].key > last.key:
        _heap_up(w, i)
    else:
        _heap_down(w, i)


# ── run queue (tunnels whose budget ran out; worker thread only) ─────────────

cdef void _rq_push(Worker *w, Tunnel *t, int dirs) noexcept nogil:
    t.rq_dirs |= dirs
    if t.queued:
        return
    t.queued = True
    t.rq_next = NULL
    t.rq_prev = w.rq_tail
    if w.rq_tail != NULL:
        w.rq_tail.rq_next = t
    else:
        w.rq_head = t
    w.rq_tail = t
    w.rq_len += 1


cdef void _rq_remove(Worker *w, Tunnel *t) noexcept nogil:
    if not t.queued:
        return
    if t.rq_prev != NULL:
        t.rq_prev.rq_next = t.rq_next
    else:
        w.rq_head = t.rq_next
    if t.rq_next != NULL:
        t.rq_next.rq_prev = t.rq_prev
    else:
        w.rq_tail = t.rq_prev
    t.rq_prev = NULL
    t.rq_next = NULL
    t.queued = False
    w.rq_len -= 1

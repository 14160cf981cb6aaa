# Delivery to Python: the only place that takes the GIL, on the completer thread.

import logging as _logging

_log = _logging.getLogger("kodarelay._relay")


cdef void _report(exc, loop, str what) noexcept:
    """An exception on the completer thread: silent only when ``loop`` is closed (nobody is
    waiting any more); anything else is logged with its traceback, never lost."""
    try:
        if loop is not None and isinstance(exc, RuntimeError) and loop.is_closed():
            return
        _log.error("kodarelay engine: %s raised %s", what, type(exc).__name__, exc_info=exc)
    except BaseException:
        pass              # (logging itself failed: nothing better to do on this thread)

cdef void _deliver_batch(Tunnel *head) noexcept with gil:
    cdef Tunnel *t = head
    cdef PyObject *wp
    cdef _TunnelHandle h
    while t != NULL:
        pthread_mutex_lock(&t.w.mu)
        wp = t.waiter
        t.waiter = NULL
        pthread_mutex_unlock(&t.w.mu)
        if wp != NULL:
            h = <_TunnelHandle>wp
            Py_DECREF(h)      # the reference the tunnel held; ``h`` keeps its own
            try:
                if h.on_done is not None:
                    cb = h.on_done
                    h.on_done = None           # (it usually refers to ``h``: no cycle left)
                    cb(h.outcome(), h)         # no event-loop wakeup per tunnel; the handle: the
                                               # callback may run before h.dial has returned it
                else:
                    h.loop.call_soon_threadsafe(h._deliver)
            except BaseException as exc:
                _report(exc, h.loop, "a tunnel's completion callback")
            h = None
        t = t.dnext


cdef void _flush_done(Worker *w) noexcept nogil:
    """End of an iteration: tunnels with a waiter go to the completer thread, which holds the
    engine's reference until it has notified the waiter's loop; the others are released."""
    cdef Tunnel *t = w.done_head
    cdef Tunnel *nxt
    cdef Tunnel *chain = NULL
    cdef Tunnel *tail = NULL
    cdef Completer *c = w.completer
    w.done_head = NULL
    while t != NULL:
        nxt = t.dnext
        if t.waiter != NULL:      # racy peek: only a cancel clears it, and _deliver_batch re-reads
            t.dnext = NULL
            if tail == NULL:
                chain = t
            else:
                tail.dnext = t
            tail = t
        else:
            _drop_ref(t)          # the engine's reference
        t = nxt
    if chain != NULL:
        pthread_mutex_lock(&c.mu)
        tail.dnext = c.head
        c.head = chain
        pthread_cond_signal(&c.cond)
        pthread_mutex_unlock(&c.mu)


cdef void _deliver_handshakes(Completer *c, Listener *l) noexcept with gil:
    """One batch per listener: one GIL acquisition, one call_soon_threadsafe."""
    cdef Listener *nxt
    cdef Hs *h
    cdef Hs *hn
    cdef Hs *hs
    cdef int err
    cdef PyObject *owner
    cdef _Handshake hd
    cdef Refusal *refs
    cdef int nref, i
    cdef uint64_t dropped
    while l != NULL:
        pthread_mutex_lock(&c.mu)
        nxt = l.cnext
        l.cnext = NULL
        l.cqueued = False
        h = l.pend_head
        l.pend_head = NULL
        l.pend_tail = NULL
        err = l.pend_err
        l.pend_err = 0
        owner = l.owner
        if owner != NULL:
            Py_INCREF(<object>owner)
        # refusals served from cached plans: taken in order, delivered outside the lock
        nref = l.ring_len
        dropped = l.ring_dropped
        refs = NULL
        if nref > 0:
            refs = <Refusal *>malloc(nref * sizeof(Refusal))
            if refs != NULL:
                for i in range(nref):
                    refs[i] = l.ring[(l.ring_head + i) % REFUSAL_RING]
            else:
                dropped += nref
                for i in range(nref):
                    _refusal_release(&l.ring[(l.ring_head + i) % REFUSAL_RING])
            l.ring_head = 0
            l.ring_len = 0
        l.ring_dropped = 0
        pthread_mutex_unlock(&c.mu)
        try:
            if (refs != NULL or dropped) and owner != NULL:
                recs = []
                for i in range(nref if refs != NULL else 0):
                    recs.append((refs[i].time, refs[i].proto, refs[i].host[:refs[i].hostn], refs[i].port,
                                 refs[i].reason.decode("ascii", "replace"), refs[i].status,
                                 refs[i].client[:refs[i].clientn].decode("ascii") if refs[i].clientn else None)
                                + ((refs[i].method.decode("ascii", "replace"),
                                    None if refs[i].path == NULL else refs[i].path.decode("latin-1"),
                                    None if refs[i].detail == NULL else refs[i].detail.decode("latin-1"))
                                   if refs[i].kind else ()))
                for i in range(nref):
                    _refusal_release(&refs[i])
                free(refs)
                refs = NULL
                sink = (<_NativeListener>owner).on_refused
                if sink is not None:
                    try:
                        sink(recs, dropped)
                    except BaseException as exc:
                        _report(exc, None, "the listener's on_refused")
                recs = None
        except BaseException as exc:
            _report(exc, None, "refusal delivery")
        finally:
            if refs != NULL:
                for i in range(nref):
                    _refusal_release(&refs[i])
                free(refs)
        nl = None
        try:
            items = []
            while h != NULL:
                hd = _Handshake.__new__(_Handshake)   # (may raise: h still on the list)
                hs = h
                h = h.next                            # from here on hd alone owns hs
                hs.next = NULL
                hd.hs = hs
                hd.proto = hs.proto
                hd.overflow = hs.flags & 1
                hd.data = hs.buf[hs.off:hs.len] if hs.proto == 1 else hs.buf[:hs.len]
                hd.user = hs.buf[hs.uoff:hs.uoff + <size_t>hs.ulen] if hs.proto == 1 and hs.ulen >= 0 else None
                items.append(hd)
            hd = None
            if owner != NULL:
                nl = <_NativeListener>owner
                if nl.direct is not None and items:
                    # the common case is decided right here, in this one GIL acquisition
                    try:
                        items = nl.direct(items)
                    except BaseException as exc:
                        _report(exc, None, "the listener's direct hook")
                if items or err:
                    nl.loop.call_soon_threadsafe(nl.cb, items, err)
        except BaseException as exc:
            # the handles already made close their connections as they are released
            _report(exc, nl.loop if nl is not None else None, "handshake delivery")
        finally:
            if owner != NULL:
                Py_DECREF(<object>owner)
        items = None
        while h != NULL:      # (only after a MemoryError above)
            hn = h.next
            _close_fd(&h.fd)
            free(h)
            h = hn
        _l_drop(c, l)         # the completer queue's reference
        l = nxt


cdef void _deliver_all(Completer *c, Tunnel *head, Listener *lhead) noexcept with gil:
    # one GIL acquisition for finished tunnels and handshakes alike: under a CPU-bound
    # Python thread each acquisition can wait a whole switch interval
    if head != NULL:
        _deliver_batch(head)
    if lhead != NULL:
        _deliver_handshakes(c, lhead)


cdef void _completer_loop(Completer *c) noexcept nogil:
    cdef Tunnel *head
    cdef Tunnel *t
    cdef Tunnel *nxt
    cdef Listener *lhead
    while True:
        pthread_mutex_lock(&c.mu)
        while c.head == NULL and c.lhead == NULL and not c.stopping:
            pthread_cond_wait(&c.cond, &c.mu)
        head = c.head
        c.head = NULL
        lhead = c.lhead
        c.lhead = NULL
        pthread_mutex_unlock(&c.mu)
        if head == NULL and lhead == NULL:
            return                # stopping, and nothing left to deliver
        _deliver_all(c, head, lhead)
        t = head
        while t != NULL:
            nxt = t.dnext
            _drop_ref(t)          # the engine's reference
            t = nxt


def _completer_main(_Engine engine):
    cdef Completer *c = engine.completer
    with nogil:
        _completer_loop(c)

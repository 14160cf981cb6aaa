# The GIL-free relay engine, included at the end of ``_relay.pyx``.
#
# Design
# ------
# * ``relay_with_timeouts`` detaches the two sockets' fds from their Python objects (so no
#   Python-side close can race with the engine; from then on the engine alone owns them),
#   wraps them in a ``Tunnel`` (a malloc'd C struct) and hands it to one engine worker.
# * A worker is a thread that runs an epoll loop entirely inside ``with nogil``. Both fds are
#   registered edge-triggered (IN|OUT|RDHUP); an event on fd X services the direction reading
#   X (readable) and/or the direction writing X (writable), each until EAGAIN or a budget.
# * Data moves with splice(2) socket -> pipe -> socket, Go's ``internal/poll/splice_linux.go``
#   discipline: "drain" (socket -> pipe) only starts when the pipe is empty, "pump"
#   (pipe -> socket) empties it; a partial pump leaves the bytes in the pipe until the
#   destination is writable again. Pipes come from a per-worker pool only while bytes are in
#   flight, so an idle tunnel holds no pipe. Where the kernel refuses splice (EINVAL/ENOSYS)
#   the direction falls back to recv/send through a pooled buffer; ``set_splice_enabled``
#   (or ``KODARELAY_NO_SPLICE``) forces the copy path globally.
# * Idle / total deadlines live in a per-worker binary heap keyed by a lower bound of each
#   tunnel's deadline; activity only moves a deadline later, so the heap is fixed lazily when
#   its top expires. epoll_wait sleeps until the nearest key.
# * Completion: the worker closes the fds and, once per loop iteration, hands the batch of
#   finished tunnels to the engine's completer thread (mutex + condvar), which takes the GIL
#   and calls ``loop.call_soon_threadsafe`` for each. Workers never wait for the GIL, so a
#   busy event loop cannot stall other tunnels' bytes. Cancellation: the awaiting task flags
#   the tunnel and wakes the worker through its eventfd; the worker closes the fds at once.
# * Locking: each worker has one mutex guarding its submission / cancel lists, the
#   ``finished`` flag, the waiter pointer, tunnel refcounts and eventfd writes. Nothing holds
#   a worker or completer mutex while taking the GIL.

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.errno cimport errno, EINTR, EAGAIN, EINVAL, ENOSYS, EBADF, ECONNABORTED, EMFILE, ENFILE
from libc.math cimport ceil
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

import asyncio as _asyncio
import atexit as _atexit
import os as _os
import threading as _threading


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLRDHUP
        EPOLLERR
        EPOLLHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<fcntl.h>" nogil:
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)
    int fcntl(int fd, int cmd, ...)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)
    int pipe2(int *pipefd, int flags)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    enum:
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
        MSG_NOSIGNAL
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    ssize_t send(int fd, const void *buf, size_t len, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from *:
    """
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #include <string.h>
    #include <errno.h>
    typedef struct { struct sockaddr_storage ss; socklen_t len; } kr_addr;
    static int kr_addr_set(kr_addr *a, const char *txt, int port) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&a->ss;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a->ss;
        memset(a, 0, sizeof(*a));
        if (inet_pton(AF_INET, txt, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET; s4->sin_port = htons((unsigned short)port); a->len = sizeof(*s4); return 0;
        }
        if (inet_pton(AF_INET6, txt, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6; s6->sin6_port = htons((unsigned short)port); a->len = sizeof(*s6); return 0;
        }
        return -1;
    }
    /* a non-blocking socket connecting to a; returns the fd (err: 0 or EINPROGRESS) or -1 (err set) */
    static int kr_connect(const kr_addr *a, int *err) {
        int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) { *err = errno; return -1; }
        if (connect(fd, (const struct sockaddr *)&a->ss, a->len) == 0) { *err = 0; return fd; }
        *err = errno;
        if (*err == EINPROGRESS || *err == EINTR) { *err = EINPROGRESS; return fd; }
        close(fd);
        return -1;
    }
    static int kr_accept(int lfd) { return accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); }
    static int kr_has_crlfcrlf(const char *buf, size_t from, size_t len) {
        return memmem(buf + from, len - from, "\\r\\n\\r\\n", 4) != NULL;
    }
    """
    ctypedef struct kr_addr:
        pass
    int kr_addr_set(kr_addr *a, const char *txt, int port) nogil
    int kr_connect(const kr_addr *a, int *err) nogil
    int kr_accept(int lfd) nogil
    int kr_has_crlfcrlf(const char *buf, size_t frm, size_t len) nogil


# ── tunables ─────────────────────────────────────────────────────────────────

DEF MAX_EVENTS = 256
DEF BUDGET = 16                  # drain/pump rounds per direction before yielding to others
DEF COPY_BUF = 128 * 1024        # copy-mode buffer
DEF POOL_MAX = 1024              # pooled pipes / buffers kept per worker, at most ...
DEF POOL_SPARE = 8               # ... and at most this many more than live tunnels
DEF MAX_THREADS = 64

# result codes
DEF RES_RUNNING = 0
DEF RES_OK = 1
DEF RES_ERRNO = 2
DEF RES_IDLE = 3
DEF RES_TOTAL = 4
DEF RES_CANCELLED = 5
DEF RES_SHUTDOWN = 6
DEF RES_DIAL = 7          # native dial failed (err: the last connect error)

cdef int g_splice_enabled = 1     # global switch: 0 forces the recv/send copy path
cdef int g_pipe_size = 256 * 1024  # F_SETPIPE_SZ request for new pipes (0: kernel default)


cdef struct Dir:
    int pr                 # pipe read end, -1 when none
    int pw                 # pipe write end
    size_t pcap            # capacity of the current pipe
    size_t pending         # bytes sitting in the pipe
    char *buf              # copy-mode buffer, NULL when none
    size_t bpending        # bytes in buf still to send, from boff
    size_t boff
    uint64_t moved         # bytes delivered to the destination
    bint eof
    bint shut
    bint copy
    bint wout              # blocked writing: bytes wait for the destination to drain


cdef struct Worker
cdef struct Listener


cdef struct Tunnel:
    int fd[2]
    Dir d[2]               # d[0]: fd[0] -> fd[1] (a -> b); d[1]: fd[1] -> fd[0]
    double start
    double last            # last time a byte moved, either direction
    double idle
    double total
    double key             # heap key: a lower bound of the tunnel's deadline
    Py_ssize_t hidx        # heap index, -1 when not in the heap
    int result             # RES_*
    int err                # errno for RES_ERRNO
    int refs               # engine + handle (+ cancel list); guarded by the worker mutex
    bint finished          # guarded by the worker mutex
    bint cancel_req
    bint registered        # fds added to epoll
    bint queued            # on the run queue
    int rq_dirs            # directions to resume from the run queue (bit mask)
    PyObject *waiter       # the _TunnelHandle to notify (owned ref), guarded by the mutex
    Worker *w
    Tunnel *snext          # submission list
    Tunnel *xnext          # cancel list
    Tunnel *rq_prev        # run queue
    Tunnel *rq_next
    Tunnel *dnext          # done list (this loop iteration)
    # native dial (phase PH_CONNECT), see the front-end section
    int phase
    kr_addr *addrs
    int naddr
    int aidx
    int cerr
    bint socks
    double cdeadline
    char *okrep
    size_t okn
    char *early
    size_t earlyn


cdef struct Completer:
    # Finished tunnels waiting for their Python-side delivery, so that engine workers never
    # wait for the GIL (a busy event loop can hold it for a whole switch interval).
    pthread_mutex_t mu
    pthread_cond_t cond
    Tunnel *head
    Listener *lhead        # listeners with handshakes (or an accept error) to deliver
    bint stopping


cdef struct Worker:
    Completer *completer
    int epfd
    int evfd
    pthread_mutex_t mu
    # guarded by mu
    Tunnel *sub_head
    Tunnel *cancel_head
    Listener *lsub         # listeners to start serving
    bint lclose            # some listener asked to close
    bint wake_pending
    bint stopping
    # worker thread only
    Tunnel **heap
    Py_ssize_t hlen
    Py_ssize_t hcap
    Tunnel *rq_head
    Tunnel *rq_tail
    Py_ssize_t rq_len
    Tunnel *done_head
    Listener *listeners
    int pool_r[POOL_MAX]
    int pool_w[POOL_MAX]
    size_t pool_cap[POOL_MAX]
    int pool_n
    char *bufs[POOL_MAX]
    int buf_n
    # statistics (read racily)
    Py_ssize_t ntunnels
    uint64_t total_tunnels
    uint64_t pipes_created
    uint64_t splice_calls
    uint64_t copy_calls


DEF HS_BUF = 8192            # an HTTP head must end within this many bytes (else 431)
DEF ACCEPT_BATCH = 64        # accepts per listener wakeup
DEF ACCEPT_BACKOFF = 0.05

# handshake states
DEF ST_FIRST = 0     # mux: the first byte decides HTTP or SOCKS5
DEF ST_HTTP = 1
DEF ST_GREET = 2
DEF ST_REQ = 3
DEF ST_AUTH = 4      # SOCKS5 RFC 1929 username/password (attribution: the password is ignored)

DEF PH_RELAY = 0
DEF PH_CONNECT = 1

DEF TAG_LISTENER = 2
DEF TAG_HS = 3


cdef struct Hs:
    # One connection whose handshake the engine reads (worker thread only until delivered,
    # then owned by its ``_Handshake``).
    int fd
    int state
    int proto            # 0 HTTP, 1 SOCKS5 (at delivery)
    int flags            # 1: the HTTP head overflowed HS_BUF
    double deadline
    size_t len
    size_t off           # SOCKS5: where the request starts
    size_t uoff          # SOCKS5 RFC 1929: where the username starts (ulen < 0: no auth)
    int ulen
    Hs *prev
    Hs *next
    Listener *l
    char buf[HS_BUF]


cdef struct Listener:
    int fd               # the engine's own dup of the listening socket
    int mode             # 0 HTTP, 1 SOCKS5, 2 both (first byte 0x05: SOCKS5)
    double hs_timeout
    Worker *w
    # worker thread only
    Hs *head             # handshakes in accept order = deadline order
    Hs *tail
    int nhs              # handshakes in the list
    int max_hs           # ... at most (the oldest are shed first)
    unsigned long shed   # handshakes shed at the bound or for want of fds
    Hs *ready_head       # completed this iteration
    Hs *ready_tail
    int accept_err
    double retry_at      # accept back-off: re-arm at this time (0: armed)
    bint in_epoll
    bint done            # the worker closed it
    Listener *next       # worker's list
    Listener *snext      # submission list
    # guarded by w.mu
    bint closing
    # guarded by the completer mutex
    Hs *pend_head
    Hs *pend_tail
    int pend_err
    bint cqueued
    Listener *cnext
    PyObject *owner      # the _NativeListener (borrowed; cleared by its dealloc, with the GIL)
    int refs


# ── small helpers (no GIL) ───────────────────────────────────────────────────

cdef inline double _mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline void _close_fd(int *fd) noexcept nogil:
    if fd[0] >= 0:
        close(fd[0])      # never retried: on Linux the fd is released even on EINTR
        fd[0] = -1


cdef inline void _wake_locked(Worker *w) noexcept nogil:
    # caller holds w.mu
    cdef uint64_t one = 1
    if not w.wake_pending and w.evfd >= 0:
        w.wake_pending = True
        while write(w.evfd, &one, 8) < 0 and errno == EINTR:
            pass


cdef void _drop_ref(Tunnel *t) noexcept nogil:
    cdef Worker *w = t.w
    cdef int left
    pthread_mutex_lock(&w.mu)
    t.refs -= 1
    left = t.refs
    pthread_mutex_unlock(&w.mu)
    if left == 0:
        free(t)


# ── pipe and buffer pools (worker thread only) ───────────────────────────────

cdef int _pipe_get(Worker *w, Dir *d) noexcept nogil:
    cdef int p[2]
    cdef int sz
    if w.pool_n > 0:
        w.pool_n -= 1
        d.pr = w.pool_r[w.pool_n]
        d.pw = w.pool_w[w.pool_n]
        d.pcap = w.pool_cap[w.pool_n]
        return 0
    if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
        return -1
    if g_pipe_size > 0:
        fcntl(p[1], F_SETPIPE_SZ, <int>g_pipe_size)   # may fail (pipe-user-pages); keep default
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


# ── timer heap (worker thread only) ──────────────────────────────────────────

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


# ── tunnel teardown (worker thread only) ─────────────────────────────────────

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
    for i in range(2):
        if t.fd[i] >= 0:
            if t.registered:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[i], NULL)
            _close_fd(&t.fd[i])
        _release_dir(w, &t.d[i])
    t.registered = False
    free(t.addrs)
    t.addrs = NULL
    free(t.okrep)
    t.okrep = NULL
    free(t.early)
    t.early = NULL
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
            _finish_errno(w, t, 12)   # ENOMEM
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
                    _finish_errno(w, t, errno)
                    return -1
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


# ── submissions, cancellations, timers ───────────────────────────────────────

cdef void _register(Worker *w, Tunnel *t) noexcept nogil:
    cdef epoll_event ev
    cdef int i
    w.ntunnels += 1
    w.total_tunnels += 1
    if t.cancel_req:
        _finish(w, t, RES_CANCELLED, 0)
        return
    if not g_splice_enabled:
        t.d[0].copy = True
        t.d[1].copy = True
    if t.phase == PH_CONNECT:
        t.key = t.cdeadline
        if _heap_push(w, t) < 0:
            _finish_errno(w, t, 12)
            return
        _connect_next(w, t, _mono())
        return
    t.key = t.start + (t.idle if t.idle < t.total else t.total)
    if _heap_push(w, t) < 0:
        _finish_errno(w, t, 12)
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
        if t.phase == PH_CONNECT:
            if t.fd[1] >= 0:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, t.fd[1], NULL)
                _close_fd(&t.fd[1])
            _dial_fail(w, t, 110)       # ETIMEDOUT
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


# ── native handshake front-end (worker thread only unless noted) ─────────────
#
# A listener is served by one worker: accept4 up to ACCEPT_BATCH per wakeup, then each
# connection's handshake (HTTP head up to CRLFCRLF; SOCKS5 greeting, ``05 00``/``05 FF``,
# request) is read without the GIL. Complete handshakes go to the completer in one batch per
# listener per iteration; Python decides each one and answers through its ``_Handshake``:
# dial (a tunnel in phase PH_CONNECT, then relayed), reply-and-close, or detach.

cdef inline int _send_all_nb(int fd, const char *p, size_t n) noexcept nogil:
    """Best-effort non-blocking send; returns bytes sent (a fresh socket takes a small reply)."""
    cdef ssize_t r
    cdef size_t done = 0
    while done < n:
        r = send(fd, p + done, n - done, MSG_NOSIGNAL)
        if r > 0:
            done += <size_t>r
        elif r < 0 and errno == EINTR:
            continue
        else:
            break
    return <int>done


cdef void _hs_unlink(Listener *l, Hs *h) noexcept nogil:
    l.nhs -= 1
    if h.prev != NULL:
        h.prev.next = h.next
    else:
        l.head = h.next
    if h.next != NULL:
        h.next.prev = h.prev
    else:
        l.tail = h.prev
    h.prev = NULL
    h.next = NULL


cdef void _hs_close(Worker *w, Listener *l, Hs *h) noexcept nogil:
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, h.fd, NULL)
    _hs_unlink(l, h)
    _close_fd(&h.fd)
    free(h)


cdef void _hs_ready(Worker *w, Listener *l, Hs *h, int proto, int flags) noexcept nogil:
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, h.fd, NULL)
    _hs_unlink(l, h)
    h.proto = proto
    h.flags = flags
    if l.ready_tail != NULL:
        l.ready_tail.next = h
    else:
        l.ready_head = h
    l.ready_tail = h


cdef int _hs_progress(Worker *w, Listener *l, Hs *h, size_t before) noexcept nogil:
    """Advance the state machine over the bytes read. 1: done (delivered or closed), 0: more."""
    cdef unsigned char *p
    cdef size_t n, need, m, i
    cdef bint noauth, userpass
    if h.state == ST_FIRST:
        h.state = ST_GREET if <unsigned char>h.buf[0] == 5 else ST_HTTP
    if h.state == ST_HTTP:
        if kr_has_crlfcrlf(h.buf, before - 3 if before > 3 else 0, h.len):
            _hs_ready(w, l, h, 0, 0)
            return 1
        if h.len >= HS_BUF:
            _hs_ready(w, l, h, 0, 1)      # Python answers 431 and records the violation
            return 1
        return 0
    p = <unsigned char *>h.buf
    if h.state == ST_GREET:
        if p[0] != 5:
            _hs_close(w, l, h)
            return 1
        if h.len < 2:
            return 0
        m = p[1]
        if h.len < 2 + m:
            return 0
        noauth = False
        userpass = False
        for i in range(m):
            if p[2 + i] == 0:
                noauth = True
            elif p[2 + i] == 2:
                userpass = True
        h.off = 2 + m
        if userpass:                  # preferred: the username attributes the request
            if _send_all_nb(h.fd, b"\x05\x02", 2) != 2:
                _hs_close(w, l, h)
                return 1
            h.state = ST_AUTH
        elif noauth:
            if _send_all_nb(h.fd, b"\x05\x00", 2) != 2:
                _hs_close(w, l, h)
                return 1
            h.state = ST_REQ
        else:
            _send_all_nb(h.fd, b"\x05\xff", 2)
            _hs_close(w, l, h)
            return 1
    if h.state == ST_AUTH:
        p = <unsigned char *>h.buf + h.off
        n = h.len - h.off
        if n < 1:
            return 0
        if p[0] != 1:
            _hs_close(w, l, h)
            return 1
        if n < 2 or n < 3 + <size_t>p[1]:
            return 0
        need = 3 + <size_t>p[1] + <size_t>p[2 + p[1]]
        if n < need:
            return 0
        h.uoff = h.off + 2
        h.ulen = p[1]
        if _send_all_nb(h.fd, b"\x01\x00", 2) != 2:
            _hs_close(w, l, h)
            return 1
        h.off += need
        h.state = ST_REQ
    # ST_REQ
    p = <unsigned char *>h.buf + h.off
    n = h.len - h.off
    if n < 1:
        return 0
    if p[0] != 5:
        _hs_close(w, l, h)
        return 1
    if n < 4:
        return 0
    if p[3] == 1:
        need = 10
    elif p[3] == 4:
        need = 22
    elif p[3] == 3:
        if n < 5:
            return 0
        need = 7 + <size_t>p[4]
    else:
        _hs_close(w, l, h)            # unknown address type
        return 1
    if n < need:
        return 0
    _hs_ready(w, l, h, 1, 0)
    return 1


cdef void _hs_read(Worker *w, Listener *l, Hs *h) noexcept nogil:
    cdef ssize_t n
    cdef size_t before
    while True:
        if h.len >= HS_BUF:
            _hs_close(w, l, h)        # (SOCKS5 handshakes are far shorter; HTTP is delivered at HS_BUF)
            return
        n = recv(h.fd, h.buf + h.len, HS_BUF - h.len, 0)
        if n > 0:
            before = h.len
            h.len += <size_t>n
            if _hs_progress(w, l, h, before):
                return
        elif n == 0:
            _hs_close(w, l, h)
            return
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            return
        else:
            _hs_close(w, l, h)
            return


cdef void _hs_timeout(Worker *w, Listener *l, Hs *h) noexcept nogil:
    if h.state == ST_FIRST or h.state == ST_HTTP:
        _send_all_nb(h.fd, b"HTTP/1.1 408 Request Timeout\r\n\r\n", 32)
    _hs_close(w, l, h)


cdef void _l_arm(Worker *w, Listener *l) noexcept nogil:
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.u64 = <uint64_t><uintptr_t>l | <uint64_t>TAG_LISTENER
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, l.fd, &ev) == 0:
        l.in_epoll = True
        l.retry_at = 0
    else:
        l.accept_err = errno
        l.retry_at = _mono() + ACCEPT_BACKOFF


cdef void _l_accept(Worker *w, Listener *l, double now) noexcept nogil:
    cdef int k, fd, e
    cdef Hs *h
    cdef epoll_event ev
    for k in range(ACCEPT_BATCH):
        fd = kr_accept(l.fd)
        if fd < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                return
            if (e == EMFILE or e == ENFILE) and l.head != NULL:
                _hs_timeout(w, l, l.head)     # out of fds: shed the oldest (slowest) handshake, retry
                l.shed += 1
                continue
            # EMFILE, ENFILE, ...: never stop accepting; back off and re-arm
            l.accept_err = e
            if l.in_epoll:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
                l.in_epoll = False
            l.retry_at = now + ACCEPT_BACKOFF
            return
        while l.nhs >= l.max_hs and l.head != NULL:
            _hs_timeout(w, l, l.head)         # at the bound: the oldest (slowest) goes first
            l.shed += 1
        h = <Hs *>malloc(sizeof(Hs))
        if h == NULL:
            close(fd)
            continue
        _nodelay(fd)
        h.fd = fd
        h.state = ST_FIRST if l.mode == 2 else (ST_GREET if l.mode == 1 else ST_HTTP)
        h.proto = 0
        h.flags = 0
        h.len = 0
        h.off = 0
        h.uoff = 0
        h.ulen = -1
        h.l = l
        h.deadline = now + l.hs_timeout
        h.next = NULL
        h.prev = l.tail
        if l.tail != NULL:
            l.tail.next = h
        else:
            l.head = h
        l.tail = h
        l.nhs += 1
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t><uintptr_t>h | <uint64_t>TAG_HS
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            _hs_close(w, l, h)
            continue
        _hs_read(w, l, h)             # the request is usually there already


cdef void _l_close(Worker *w, Listener *l) noexcept nogil:
    """Stop serving ``l``: close its fd and every handshake still being read."""
    cdef Hs *h
    if l.done:
        return
    l.done = True
    if l.in_epoll:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
        l.in_epoll = False
    _close_fd(&l.fd)
    while l.head != NULL:
        _hs_close(w, l, l.head)


cdef void _l_drop(Completer *c, Listener *l) noexcept nogil:
    cdef int left
    pthread_mutex_lock(&c.mu)
    l.refs -= 1
    left = l.refs
    pthread_mutex_unlock(&c.mu)
    if left == 0:
        free(l)


cdef void _l_flush(Worker *w, Listener *l) noexcept nogil:
    """End of an iteration: hand this listener's completed handshakes to the completer."""
    cdef Completer *c = w.completer
    if l.ready_head == NULL and l.accept_err == 0:
        return
    pthread_mutex_lock(&c.mu)
    if l.ready_head != NULL:
        if l.pend_tail != NULL:
            l.pend_tail.next = l.ready_head
        else:
            l.pend_head = l.ready_head
        l.pend_tail = l.ready_tail
    if l.accept_err != 0:
        l.pend_err = l.accept_err
    l.ready_head = NULL
    l.ready_tail = NULL
    l.accept_err = 0
    if not l.cqueued:
        l.cqueued = True
        l.refs += 1
        l.cnext = c.lhead
        c.lhead = l
    pthread_cond_signal(&c.cond)
    pthread_mutex_unlock(&c.mu)


cdef void _listeners_service(Worker *w, double now) noexcept nogil:
    """Timers (handshake deadlines, accept back-off), closes, and the per-iteration flush."""
    cdef Listener *l = w.listeners
    cdef Listener *prev = NULL
    cdef Listener *nxt
    cdef bint closing
    while l != NULL:
        nxt = l.next
        while l.head != NULL and l.head.deadline <= now:
            _hs_timeout(w, l, l.head)
        if l.retry_at > 0 and l.retry_at <= now and not l.done:
            _l_arm(w, l)
        _l_flush(w, l)
        pthread_mutex_lock(&w.mu)
        closing = l.closing or w.stopping
        pthread_mutex_unlock(&w.mu)
        if closing:
            pthread_mutex_lock(&w.mu)
            closing = l.closing
            pthread_mutex_unlock(&w.mu)
            if not closing:           # the engine stops under a live server: tell it
                l.accept_err = -1
                _l_flush(w, l)
            _l_close(w, l)
            if prev != NULL:
                prev.next = nxt
            else:
                w.listeners = nxt
            _l_drop(w.completer, l)     # the worker's reference
        else:
            prev = l
        l = nxt


cdef double _listeners_next(Worker *w) noexcept nogil:
    cdef Listener *l = w.listeners
    cdef double t = 1e300
    while l != NULL:
        if l.head != NULL and l.head.deadline < t:
            t = l.head.deadline
        if l.retry_at > 0 and l.retry_at < t:
            t = l.retry_at
        l = l.next
    return t


# ── native dial (tunnels in phase PH_CONNECT) ────────────────────────────────

cdef int _socks_rep_for(int err) noexcept nogil:
    if err == 111:       # ECONNREFUSED
        return 5
    if err == 101:       # ENETUNREACH
        return 3
    if err == 113 or err == 110 or err == 112:   # EHOSTUNREACH, ETIMEDOUT, EHOSTDOWN
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
    _dial_fail(w, t, t.cerr if t.cerr != 0 else 110)   # ETIMEDOUT


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
        return 12
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
    t.d[1].moved = 0          # the reply is ours, not the target's (the early bytes are the client's)
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
        _finish_errno(w, t, 12)
        return
    cev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    cev.data.u64 = <uint64_t><uintptr_t>t
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, t.fd[0], &cev) < 0:
        _finish_errno(w, t, errno)
        return
    _service(w, t, 3, now)


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
                    cb(h.outcome())            # no event-loop wakeup per tunnel
                else:
                    h.loop.call_soon_threadsafe(h._deliver)
            except BaseException:
                pass          # the loop is closed: nobody is waiting any more
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
    cdef int err
    cdef PyObject *owner
    cdef _Handshake hd
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
        pthread_mutex_unlock(&c.mu)
        try:
            items = []
            while h != NULL:
                hn = h.next
                h.next = NULL
                hd = _Handshake.__new__(_Handshake)
                hd.hs = h
                hd.proto = h.proto
                hd.overflow = h.flags & 1
                hd.data = h.buf[h.off:h.len] if h.proto == 1 else h.buf[:h.len]
                hd.user = h.buf[h.uoff:h.uoff + <size_t>h.ulen] if h.proto == 1 and h.ulen >= 0 else None
                items.append(hd)
                h = hn
            hd = None
            if owner != NULL:
                nl = <_NativeListener>owner
                if nl.direct is not None and items:
                    # the common case is decided right here, in this one GIL acquisition
                    try:
                        items = nl.direct(items)
                    except BaseException:
                        pass
                if items or err:
                    nl.loop.call_soon_threadsafe(nl.cb, items, err)
        except BaseException:
            pass              # the loop is closed: the handles close their connections
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


cdef void _worker_loop(Worker *w) noexcept nogil:
    cdef epoll_event evs[MAX_EVENTS]
    cdef int n, i, timeout, k
    cdef double now, wait, nxt_t
    cdef uint64_t u, tag
    cdef Tunnel *t
    cdef Tunnel *nxt
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
            _trim_pools(w)
        if stop:
            break
    # shutting down: close the listeners, fail every live tunnel, then release the pools
    _on_wake(w)
    _listeners_service(w, now)      # (w.stopping: closes them all)
    while w.hlen > 0:
        _finish(w, w.heap[0], RES_SHUTDOWN, 0)
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


# ── Python side ──────────────────────────────────────────────────────────────

cdef class _Engine:
    cdef Worker **workers
    cdef Completer *completer
    cdef object completer_thread
    cdef int nworkers
    cdef int next_worker
    cdef object threads
    cdef bint stopped
    cdef bint started

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
        cdef int i
        self.started = True
        self.completer_thread = _threading.Thread(
            target=_completer_main, args=(self,), name="kodarelay-engine-completer", daemon=True
        )
        self.completer_thread.start()
        for i in range(self.nworkers):
            th = _threading.Thread(
                target=_worker_main, args=(self, i), name=f"kodarelay-engine-{i}", daemon=True
            )
            th.start()
            self.threads.append(th)

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
        cdef uint64_t total = 0, pipes = 0, sc = 0, cc = 0
        for i in range(self.nworkers):
            w = self.workers[i]
            live += w.ntunnels
            pooled += w.pool_n
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
            "pipes_created": pipes,
            "splice_calls": sc,
            "copy_calls": cc,
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
            _drop_ref(self.t)
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
        cdef int res, err
        fut = self.fut
        if fut.done():
            return
        res = t.result
        err = t.err
        if res == RES_OK:
            fut.set_result((t.d[0].moved, t.d[1].moved))
        elif res == RES_ERRNO:
            fut.set_exception(OSError(err, _os.strerror(err)))
        elif res == RES_TOTAL:
            fut.set_exception(TimeoutError(f"relay exceeded total timeout of {self.total_o}s"))
        elif res == RES_IDLE:
            fut.set_exception(TimeoutError(f"relay idle for {self.idle_o}s"))
        elif res == RES_DIAL:
            fut.set_exception(DialError(err, _os.strerror(err)))
        elif res == RES_SHUTDOWN:
            fut.set_exception(ConnectionAbortedError(ECONNABORTED, "kodarelay relay engine shut down"))
        else:
            fut.cancel()

    @property
    def fut(self):
        return self.fut

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
        cdef Worker *w = t.w
        cdef PyObject *wp = NULL
        pthread_mutex_lock(&w.mu)
        if not t.finished and not t.cancel_req:
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


cdef _Engine _get_engine():
    global _engine
    if _engine is not None:
        return _engine
    with _engine_lock:
        if _engine is None:
            e = _Engine(_engine_threads if _engine_threads > 0 else _env_threads())
            e.start()
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
    global g_splice_enabled
    g_splice_enabled = 1 if enabled else 0


def set_pipe_size(nbytes):
    """Pipe capacity requested (F_SETPIPE_SZ) for pipes created from now on; 0: kernel default."""
    global g_pipe_size
    nbytes = int(nbytes)
    if nbytes < 0 or nbytes > (1 << 30):
        raise ValueError(f"pipe size out of range: {nbytes}")
    g_pipe_size = nbytes


def engine_stats():
    """A snapshot of the engine's counters (``{"running": False}`` when it is not started)."""
    e = _engine
    if e is None:
        return {"running": False, "threads": 0, "tunnels": 0, "pooled_pipes": 0}
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


def _after_fork_in_child():
    # The worker threads do not exist in the child and their locks may be held: abandon the
    # parent's engine without touching it (its fds are close-on-exec). A new one starts lazily.
    global _engine
    if _engine is not None:
        _forked_engines.append(_engine)
        _engine = None
    global _engine_lock
    _engine_lock = _threading.Lock()


_atexit.register(shutdown_engine)
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)

if _os.environ.get("KODARELAY_NO_SPLICE", "").strip().lower() in {"1", "true", "yes", "on"}:
    g_splice_enabled = 0
if _os.environ.get("KODARELAY_PIPE_SIZE", "").strip().isdigit():
    g_pipe_size = int(_os.environ["KODARELAY_PIPE_SIZE"].strip())


cdef inline int _nodelay(int fd) noexcept nogil:
    cdef int one = 1
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))


cdef _TunnelHandle _submit(a, b, idle, total, loop):
    """Detach the sockets, build the tunnel and hand it to a worker. Closes both on failure."""
    cdef int fa = -1, fb = -1
    cdef double di, dt
    cdef Tunnel *t
    cdef Worker *w
    cdef _TunnelHandle h
    cdef _Engine e
    cdef int i
    try:
        a.setblocking(False)
        b.setblocking(False)
        di = idle
        dt = total
        if di != di:          # NaN: no idle limit
            di = float("inf")
        if dt != dt:
            dt = float("inf")
        nd = [s.family in (_AF_INET, _AF_INET6) and s.type == _SOCK_STREAM for s in (a, b)]
        e = _get_engine()
        fa = a.detach()
        fb = b.detach()
        if fa < 0 or fb < 0:
            raise OSError(EBADF, _os.strerror(EBADF))
    except BaseException:
        _close_fd(&fa)
        _close_fd(&fb)
        a.close()
        b.close()
        raise
    if nd[0]:
        _nodelay(fa)
    if nd[1]:
        _nodelay(fb)
    t = <Tunnel *>calloc(1, sizeof(Tunnel))
    if t == NULL:
        _close_fd(&fa)
        _close_fd(&fb)
        raise MemoryError()
    t.fd[0] = fa
    t.fd[1] = fb
    for i in range(2):
        t.d[i].pr = -1
        t.d[i].pw = -1
    t.hidx = -1
    t.idle = di
    t.total = dt
    t.start = _mono()
    t.last = t.start
    t.refs = 2
    h = _TunnelHandle.__new__(_TunnelHandle)
    h.t = t
    h.engine = e
    h.loop = loop
    h.fut = loop.create_future()
    h.idle_o = idle
    h.total_o = total
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
            _close_fd(&t.fd[0])
            _close_fd(&t.fd[1])
            free(t)
            raise


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


# ── native handshake front-end: the Python side ──────────────────────────────

class DialError(OSError):
    """The engine could not connect a natively dialled tunnel (its client got the failure reply)."""


cdef extern from "<fcntl.h>" nogil:
    enum:
        F_DUPFD_CLOEXEC


cdef class _NativeListener:
    """The engine serving a listening socket's handshakes; batches go to ``cb(items, err)``
    on ``loop`` (``err``: an accept errno, -1 when the engine stopped, else 0)."""
    cdef Listener *l
    cdef _Engine e
    cdef readonly object loop
    cdef readonly object cb
    cdef readonly object direct

    def __cinit__(self, lsock, int mode, double hs_timeout, loop, cb, direct=None, int max_handshakes=0):
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
        l.max_hs = max_handshakes if max_handshakes > 0 else 0x7fffffff
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

    @property
    def shed(self):
        """Handshakes shed so far (at ``max_handshakes``, or for want of fds)."""
        return self.l.shed if self.l != NULL else 0

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
    cdef readonly object user         # SOCKS5 RFC 1929 username (bytes), None without auth

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
        cdef kr_addr *addrs
        cdef Tunnel *t
        cdef Worker *w
        cdef _TunnelHandle h
        cdef _Engine e
        cdef double di = idle, dt = total
        if self.hs == NULL:
            raise ValueError("handshake already answered")
        if n == 0:
            raise ValueError("no address to dial")
        addrs = <kr_addr *>calloc(n, sizeof(kr_addr))
        if addrs == NULL:
            raise MemoryError()
        for i in range(n):
            a = str(addresses[i]).encode("ascii")
            if kr_addr_set(&addrs[i], a, port) < 0:
                free(addrs)
                raise ValueError(f"not an IP address: {addresses[i]!r}")
        t = <Tunnel *>calloc(1, sizeof(Tunnel))
        if t == NULL:
            free(addrs)
            raise MemoryError()
        t.addrs = addrs
        t.naddr = <int>n
        t.okrep = <char *>malloc(len(ok_reply) + 1)
        t.early = <char *>malloc(len(early) + 1)
        if t.okrep == NULL or t.early == NULL:
            free(t.okrep)
            free(t.early)
            free(addrs)
            free(t)
            raise MemoryError()
        memcpy(t.okrep, <char *>ok_reply, len(ok_reply))
        t.okn = len(ok_reply)
        memcpy(t.early, <char *>early, len(early))
        t.earlyn = len(early)
        t.socks = socks
        t.phase = PH_CONNECT
        if di != di:
            di = float("inf")
        if dt != dt:
            dt = float("inf")
        for i in range(2):
            t.d[i].pr = -1
            t.d[i].pw = -1
        t.hidx = -1
        t.idle = di
        t.total = dt
        t.start = _mono()
        t.last = t.start
        t.cdeadline = t.start + <double>connect_timeout
        t.refs = 2
        t.fd[1] = -1
        try:
            e = _get_engine()
        except BaseException:
            free(t.okrep)
            free(t.early)
            free(addrs)
            free(t)
            raise
        t.fd[0] = self.take()
        if loop is None:
            loop = _asyncio.get_running_loop()
        h = _TunnelHandle.__new__(_TunnelHandle)
        h.t = t
        h.engine = e
        h.loop = loop
        h.on_done = on_done
        h.fut = loop.create_future() if on_done is None else None
        h.idle_o = idle
        h.total_o = total
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
            try:
                e = _get_engine()
            except BaseException:
                t.waiter = NULL
                Py_DECREF(h)
                h.t = NULL
                _close_fd(&t.fd[0])
                free(t.okrep)
                free(t.early)
                free(addrs)
                free(t)
                raise


def native_listen(lsock, mode, handshake_timeout, loop, cb, direct=None, max_handshakes=0):
    """Serve ``lsock``'s handshakes in the engine (mode: "http", "socks5" or "mux"), at most
    ``max_handshakes`` at once (0: unbounded; past it, or out of fds, the oldest are shed).

    Each batch first goes to ``direct(items) -> items left`` on the engine's completer thread
    (when given), then what is left (and any accept error) to ``cb(items, err)`` on ``loop``."""
    return _NativeListener(lsock, {"http": 0, "socks5": 1, "mux": 2}[mode], handshake_timeout, loop, cb, direct,
                           max_handshakes)

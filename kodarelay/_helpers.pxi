# Small helpers and global switches shared by the engine's parts (no GIL).

# Global switches, written from Python threads and read by workers: only through
# kr_load_int / kr_store_int (atomic).
cdef int g_splice_enabled = 1     # 0 forces the recv/send copy path
cdef int g_pipe_size = 256 * 1024  # F_SETPIPE_SZ request for new pipes (0: kernel default)
cdef double ACCEPT_BACKOFF = 0.05  # seconds before a listener is re-armed after an accept error
cdef double TRIM_EVERY = 1.0       # seconds between trims of a worker's pipe and buffer pools

# The engine's own bare replies, written by kodarelay.replies.status_line (the one place a
# status line is spelled): a native dial that failed, a handshake that timed out.
from .replies import status_line as _status_line
cdef bytes _REPLY_502 = _status_line(502)
cdef bytes _REPLY_408 = _status_line(408)
cdef const char *g_reply_502 = _REPLY_502
cdef size_t g_reply_502n = len(_REPLY_502)
cdef const char *g_reply_408 = _REPLY_408
cdef size_t g_reply_408n = len(_REPLY_408)


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
        if t.hbfd >= 0:           # a handback nobody took
            close(t.hbfd)
        free(t.hb)
        free(t)


cdef inline int _nodelay(int fd) noexcept nogil:
    cdef int one = 1
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))


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

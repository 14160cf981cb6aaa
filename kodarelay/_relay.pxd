# Declarations of the compiled module ``kodarelay._relay`` (read by Cython before
# ``_relay.pyx``): the system calls the engine makes, its constants and its C structs.
# Which thread owns a struct, and which lock guards a field, is written beside it.

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memcmp, strcmp
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.errno cimport (
    errno, EINTR, EAGAIN, EINVAL, ENOSYS, EBADF, ECONNABORTED, ENOMEM, ETIMEDOUT, ECONNREFUSED,
    ENETUNREACH, EHOSTUNREACH, EHOSTDOWN, EMFILE, ENFILE,
)
from libc.math cimport ceil
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF


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
        CLOCK_REALTIME
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
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "<fcntl.h>" nogil:
    enum:
        F_DUPFD_CLOEXEC


cdef extern from "_inspect.h" nogil:
    ctypedef struct kr_ctx:
        pass
    ctypedef struct kr_rules:
        pass
    ctypedef struct kr_insp:
        pass
    ctypedef struct kr_rec:
        kr_rec *next
        char reason[32]
        char method[33]
        int has_host
        char *path
        char *detail
    enum:
        KR_I_AGAIN
        KR_I_DONE
        KR_I_MORE
        KR_I_HANDBACK
        KR_I_ERROR
    ctypedef struct kr_secrets:
        pass
    kr_secrets *kr_secrets_new()
    int kr_secrets_add(kr_secrets *s, const char *name, const char *phantom, size_t pn, const char *value, size_t vn,
                       const char *hosts, int covers)
    void kr_secrets_ref(kr_secrets *s)
    void kr_secrets_unref(kr_secrets *s)
    void kr_insp_set_secrets(kr_insp *x, kr_secrets *s)
    int kr_insp_set_forward(kr_insp *x)
    int kr_inspect_fail_after(int n)
    void kr_insp_event(kr_insp *x, int side, uint32_t ev)
    int kr_insp_origin_fd(const kr_insp *x)
    int kr_insp_donate(kr_insp *x)
    size_t kr_insp_leftover(const kr_insp *x, const char **p)
    int kr_tls_available()
    const char *kr_tls_version()
    kr_ctx *kr_server_ctx(const char *pem, size_t n, char *err, size_t errn)
    kr_ctx *kr_client_ctx(const char *cafile, char *err, size_t errn)
    void kr_ctx_ref(kr_ctx *c)
    void kr_ctx_unref(kr_ctx *c)
    kr_rules *kr_rules_new(int judged)
    int kr_rules_add(kr_rules *r, int deny, const char *methods, size_t methodsn, const char *path, const char *text)
    void kr_rules_ref(kr_rules *r)
    void kr_rules_unref(kr_rules *r)
    int kr_glob(const char *pat, size_t pn, const char *s, size_t n)
    const char *kr_rules_judge(const kr_rules *r, const char *method, size_t mn, const char *path, size_t pn,
                               const char **rule, const char **detail)
    const char *kr_bad_path(const char *p, size_t n)
    void kr_rec_free(kr_rec *r)
    kr_insp *kr_insp_new(int cfd, int ofd, kr_ctx *sctx, kr_ctx *cctx, kr_rules *rules, const char *host,
                         int port, const char *early, size_t earlyn)
    int kr_insp_reply(kr_insp *x, const char *p, size_t n)
    int kr_insp_run(kr_insp *x)
    int kr_insp_errno(const kr_insp *x)
    kr_rec *kr_insp_take(kr_insp *x)
    uint64_t kr_insp_up(const kr_insp *x)
    uint64_t kr_insp_down(const kr_insp *x)
    int kr_insp_handshaking(const kr_insp *x)
    void kr_insp_free(kr_insp *x)


cdef extern from "_engine.h" nogil:
    ctypedef struct kr_addr:
        pass
    int kr_addr_set(kr_addr *a, const char *txt, int port)
    int kr_connect(const kr_addr *a, int *err)
    int kr_accept(int lfd)
    int kr_pending(int lfd)
    int kr_has_crlfcrlf(const char *buf, size_t frm, size_t len)
    int kr_load_int(const int *p)
    void kr_store_int(int *p, int v)
    Py_ssize_t kr_load_ssize(const Py_ssize_t *p)
    void kr_add_ssize(Py_ssize_t *p, Py_ssize_t v)
    void kr_sha256(const unsigned char *p, size_t n, unsigned char *out)
    int kr_b64decode(const unsigned char *inp, size_t n, unsigned char *out, size_t outcap)
    int kr_hash_eq(const unsigned char *a, const unsigned char *b)


# ── constants ────────────────────────────────────────────────────────────────

cdef enum:
    MAX_HEAD_DEFAULT = 8192      # parsers: an HTTP head must end within this many bytes
    MAX_EVENTS = 256             # epoll events per wait
    BUDGET = 16                  # drain/pump rounds per direction before yielding to others
    COPY_BUF = 128 * 1024        # copy-mode buffer
    POOL_MAX = 1024              # pooled pipes / buffers kept per worker, at most ...
    POOL_SPARE = 8               # ... and at most this many more than in use (see _pools.pxi)
    MAX_THREADS = 64
    HS_BUF = 8192                # a native HTTP head must end within this many bytes (else 431)
    ACCEPT_BATCH = 64            # accepts per listener wakeup

cdef enum:                       # Tunnel.result
    RES_RUNNING = 0
    RES_OK = 1
    RES_ERRNO = 2
    RES_IDLE = 3
    RES_TOTAL = 4
    RES_CANCELLED = 5
    RES_SHUTDOWN = 6
    RES_DIAL = 7                 # native dial failed (err: the last connect error)
    RES_HANDBACK = 8             # a forwarded connection goes back to Python (hbfd, hb)

cdef enum:                       # Hs.state
    ST_FIRST = 0                 # mux: the first byte decides HTTP or SOCKS5
    ST_HTTP = 1
    ST_GREET = 2
    ST_REQ = 3
    ST_AUTH = 4                  # SOCKS5 RFC 1929 username/password (attribution: the password is ignored)
    ST_DEAD = 5                  # closed; freed after the iteration (an event for it may still wait in the batch)

cdef enum:                       # Tunnel.phase
    PH_RELAY = 0
    PH_CONNECT = 1               # connecting to the target (or the upstream proxy)
    PH_CHAIN = 2                 # connected to the upstream proxy: its reply to our CONNECT

cdef enum:                       # Plan.kind
    PLAN_DIRECT = 1              # dial the checked addresses
    PLAN_REFUSE = 2              # send the refusal, record a violation
    PLAN_CHAIN = 3               # CONNECT through the upstream HTTP proxy

cdef enum:
    PLAN_BUCKETS = 1024          # hash buckets of a listener's plan cache
    PLAN_MAX = 4096              # plans kept per listener (the oldest is evicted beyond)
    PLAN_HOST_MAX = 255          # longer hosts are never cached (a SOCKS5 name is at most 255)
    REASON_MAX = 32              # a refusal reason, NUL included
    CLIENT_MAX = 100             # a named client on the fast path: 1-100 visible ASCII bytes, no ":"
    CLIENT_BUCKETS = 256         # hash buckets of a listener's client table
    REFUSAL_RING = 1024          # refusals queued for Python per listener (drop-oldest beyond)
    CHAIN_HEAD_MAX = 8192        # the upstream proxy's reply head must end within this

# epoll data is a pointer with a tag in its low bits (structs are 8-byte aligned): a tunnel's
# side (0 / 1), the worker's eventfd (the value 0), a listener or a handshake.
cdef enum:
    TAG_LISTENER = 2
    TAG_HS = 3


# ── structs ──────────────────────────────────────────────────────────────────

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
cdef struct PlanCache
cdef struct Refusal
cdef struct InspSpec
cdef struct ClientEnt
cdef struct ClientTab


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
    # chaining (phase PH_CHAIN): our CONNECT request, then the upstream's reply head
    char *creq
    size_t creqn
    char *chead            # CHAIN_HEAD_MAX bytes, allocated when the request is sent
    size_t cheadn
    # a tunnel the engine opened from a cached plan: its listener (worker thread only), and
    # what an upstream's refusal is recorded under
    Listener *owner
    char *rhost
    int rhostn
    int rport
    Tunnel *lprev
    Tunnel *lnext
    # a tunnel opened from a cached plan: its listener's client table (metrics, and for a
    # named client its slot and upload; cent NULL: an anonymous one)
    ClientEnt *cent
    ClientTab *ctab
    # an inspected tunnel (kodarelay._inspect.c): what it needs until it is relayed, then its machine
    InspSpec *ispec
    kr_insp *insp
    int hbfd               # RES_HANDBACK: the client's fd and its unread bytes, Python's to take
    char *hb
    size_t hbn


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
    bint exited            # the loop ended: cancel() queues nothing more
    pthread_cond_t pcond   # fork: the forking thread waits for ``parked``, the worker for ``park`` to clear
    int park               # (atomic, also read without mu) a fork is coming: stop at a safe point
    bint parked            # the worker waits at the top of its loop, touching nothing
    # worker thread only
    Tunnel **heap
    Py_ssize_t hlen
    Py_ssize_t hcap
    Tunnel *rq_head
    Tunnel *rq_tail
    Py_ssize_t rq_len
    Tunnel *done_head
    Listener *listeners
    Hs *hs_grave           # closed handshakes, freed once the iteration's events are handled
    int pool_r[POOL_MAX]
    int pool_w[POOL_MAX]
    size_t pool_cap[POOL_MAX]
    int pool_n
    char *bufs[POOL_MAX]
    int buf_n
    int pipes_out          # pipes held by directions moving bytes
    int pipes_peak         # ... at most, since the last trim
    int bufs_out           # copy buffers held by directions
    int bufs_peak
    double trim_at         # next pool trim (monotonic)
    # statistics (read racily)
    Py_ssize_t ntunnels
    uint64_t total_tunnels
    uint64_t pipes_created
    uint64_t splice_calls
    uint64_t copy_calls
    uint64_t pipe_fallbacks   # directions that copied because no pipe could be made (fds, memory)


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
    Refusal *ring        # refusals served from cached plans, not yet delivered (lazy)
    int ring_head
    int ring_len
    uint64_t ring_dropped
    # worker thread only
    Tunnel *live         # tunnels opened from cached plans (closed with the listener)
    Py_ssize_t nlive
    bint ref_new         # refusals were queued this iteration
    # set before the listener is submitted, read-only afterwards (the table's content has its lock)
    ClientTab *clients
    PlanCache *plans
    double connect_timeout
    double idle
    double total


cdef struct Plan:
    # One cached decision for (proto, host as sent, port); owned by its PlanCache.
    Plan *hnext          # bucket chain
    Plan *older          # insertion order (eviction: oldest first)
    Plan *newer
    int kind             # PLAN_*
    int proto            # 0 HTTP, 1 SOCKS5
    int port
    int hostn
    double expires       # monotonic seconds (1e300: until cleared)
    kr_addr *addrs       # direct: the checked addresses; chain: the upstream proxy's
    int naddr
    char *reply          # direct / chain: the ok reply; refuse: the refusal
    size_t replyn
    char *req            # chain: the CONNECT request for the upstream proxy
    size_t reqn
    char reason[REASON_MAX]
    char host[PLAN_HOST_MAX + 1]
    int rhostn
    char rhost[PLAN_HOST_MAX + 1]   # the host a refusal is recorded under (canonical text)
    int clientn                     # the named client the plan is for (0: none)
    char client[CLIENT_MAX + 1]
    InspSpec *ispec                 # direct: an inspected tunnel's spec (no listener reference)


cdef struct PlanCache:
    # A listener's plans. ``mu`` guards everything here: the worker looks plans up, Python
    # threads set and clear them.
    pthread_mutex_t mu
    Plan *buckets[PLAN_BUCKETS]
    Plan *oldest
    Plan *newest
    int count
    uint64_t gen         # bumped by every clear: a plan decided before it is refused
    uint64_t hits
    uint64_t misses
    uint64_t refused
    uint64_t evicted


cdef struct InspSpec:
    # What an inspected tunnel is served with (its references are the tunnel's): the leaf's
    # and the origins' TLS contexts, the host's request rules, and the listener its
    # violations are recorded by.
    kr_ctx *sctx
    kr_ctx *cctx
    kr_rules *rules
    kr_secrets *secrets    # NULL: the server has none
    Listener *rl
    Completer *cm
    double idle            # the tunnel's idle cap once its handshake is done (until then: hs_timeout)
    double hs_timeout
    bint forward           # plain-HTTP forwarding (kr_insp_set_forward), not an inspected tunnel
    int hostn
    char host[PLAN_HOST_MAX + 1]
    int port
    int clientn
    char client[CLIENT_MAX + 1]


cdef struct Refusal:
    # A refusal the engine served from a cached plan, queued for ViolationLog.record.
    double time          # epoch seconds
    int proto
    int port
    int hostn
    int status           # upstream_refused: the upstream proxy's status code, else 0
    char reason[REASON_MAX]
    char host[PLAN_HOST_MAX + 1]
    int clientn
    char client[CLIENT_MAX + 1]
    # a request an inspected tunnel refused (kind 1): its method, path and detail (owned, may be NULL)
    int kind
    char method[33]
    char *path
    char *detail


cdef struct ClientEnt:
    # One named client's credential hash, limits and counters (kodarelay.clients, the C
    # half): guarded by its table's mutex. Never freed while its listener lives (a tunnel
    # holds a pointer); a client the policy drops is marked ``dead``.
    ClientEnt *next
    int namen
    char name[CLIENT_MAX + 1]
    bint dead
    bint has_hash
    unsigned char hash[32]
    long max_tunnels     # < 0: no limit
    double rate          # <= 0: no limit
    double burst
    double tokens
    double refilled
    long open
    long long upload     # < 0: no budget
    double period
    long long uploaded
    double wstart        # < 0: no window open
    bint kill            # the budget is spent: its open tunnels are closed
    # metrics of the tunnels the engine served from cached plans (Python counts its own)
    uint64_t m_tunnels[2]    # by protocol: 0 HTTP, 1 SOCKS5
    uint64_t m_up
    uint64_t m_down
    long m_open


cdef struct ClientTab:
    pthread_mutex_t mu
    ClientEnt *buckets[CLIENT_BUCKETS]
    int live             # clients not dead (atomic for racy peeks)
    int require_auth     # (atomic, idem)
    int kill_pending     # (atomic) some client's tunnels are to be closed
    # metrics of the anonymous tunnels the engine served from cached plans (guarded by mu)
    uint64_t a_tunnels[2]
    uint64_t a_up
    uint64_t a_down
    long a_open

/* Small C helpers of the kodarelay engine (included by _relay.pxd): socket addresses,
 * non-blocking connect and accept, and the end-of-head search. No Python here. */
#ifndef KODARELAY_ENGINE_H
#define KODARELAY_ENGINE_H

#define _GNU_SOURCE 1
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <poll.h>

typedef struct { struct sockaddr_storage ss; socklen_t len; } kr_addr;

/* parse the IP literal txt into a (port included); 0, or -1 when txt is not an address */
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

/* a connection waits in lfd's accept queue (accept4 fails with EMFILE before it looks: out
 * of fds, an empty queue reads as EMFILE too) */
static int kr_pending(int lfd) {
    struct pollfd p = { lfd, POLLIN, 0 };
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static int kr_has_crlfcrlf(const char *buf, size_t from, size_t len) {
    return memmem(buf + from, len - from, "\r\n\r\n", 4) != NULL;
}

/* the engine's global switches are written by Python threads and read by workers */
static inline int kr_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void kr_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

#endif

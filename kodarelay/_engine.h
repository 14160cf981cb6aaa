/* Small C helpers of the kodarelay engine (included by _relay.pxd and _inspect.c): socket addresses,
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
static inline int kr_addr_set(kr_addr *a, const char *txt, int port) {
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
static inline int kr_connect(const kr_addr *a, int *err) {
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { *err = errno; return -1; }
    if (connect(fd, (const struct sockaddr *)&a->ss, a->len) == 0) { *err = 0; return fd; }
    *err = errno;
    if (*err == EINPROGRESS || *err == EINTR) { *err = EINPROGRESS; return fd; }
    close(fd);
    return -1;
}

static inline int kr_accept(int lfd) { return accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC); }

/* a connection waits in lfd's accept queue (accept4 fails with EMFILE before it looks: out
 * of fds, an empty queue reads as EMFILE too) */
static inline int kr_pending(int lfd) {
    struct pollfd p = { lfd, POLLIN, 0 };
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static inline int kr_has_crlfcrlf(const char *buf, size_t from, size_t len) {
    return memmem(buf + from, len - from, "\r\n\r\n", 4) != NULL;
}

/* the engine's global switches are written by Python threads and read by workers */
static inline int kr_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void kr_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* counters a worker writes and Python threads read for statistics */
static inline ssize_t kr_load_ssize(const ssize_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void kr_add_ssize(ssize_t *p, ssize_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

/* ── credentials of named clients (kodarelay.clients), checked on the worker ───────────── */

#include <stdint.h>

/* SHA-256 (FIPS 180-4) of n bytes: a client's token is compared by its hash, as in Python */
static const uint32_t kr_sha_k[64] = {
    0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
    0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
    0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
    0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
    0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
    0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
    0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
    0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};

#define KR_ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static inline void kr_sha_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4*i] << 24) | ((uint32_t)p[4*i+1] << 16) | ((uint32_t)p[4*i+2] << 8) | p[4*i+3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = KR_ROR(w[i-15], 7) ^ KR_ROR(w[i-15], 18) ^ (w[i-15] >> 3);
        uint32_t s1 = KR_ROR(w[i-2], 17) ^ KR_ROR(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (KR_ROR(e, 6) ^ KR_ROR(e, 11) ^ KR_ROR(e, 25)) + ((e & f) ^ (~e & g)) + kr_sha_k[i] + w[i];
        t2 = (KR_ROR(a, 2) ^ KR_ROR(a, 13) ^ KR_ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static inline void kr_sha256(const unsigned char *p, size_t n, unsigned char out[32]) {
    uint32_t h[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
    unsigned char tail[128];
    size_t i, rest, tn;
    uint64_t bits = (uint64_t)n * 8;
    for (i = 0; i + 64 <= n; i += 64)
        kr_sha_block(h, p + i);
    rest = n - i;
    memcpy(tail, p + i, rest);
    tail[rest] = 0x80;
    tn = rest + 1 + 8 <= 64 ? 64 : 128;
    memset(tail + rest + 1, 0, tn - rest - 1);
    for (i = 0; i < 8; i++)
        tail[tn - 1 - i] = (unsigned char)(bits >> (8 * i));
    kr_sha_block(h, tail);
    if (tn == 128)
        kr_sha_block(h, tail + 64);
    for (i = 0; i < 8; i++) {
        out[4*i] = (unsigned char)(h[i] >> 24); out[4*i+1] = (unsigned char)(h[i] >> 16);
        out[4*i+2] = (unsigned char)(h[i] >> 8); out[4*i+3] = (unsigned char)h[i];
    }
}

static inline int kr_b64val(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* strict base64 (Python's b64decode(validate=True)): length a multiple of 4, '=' only at the
 * end; the decoded bytes in out (at most outcap); their count, or -1 */
static inline int kr_b64decode(const unsigned char *in, size_t n, unsigned char *out, size_t outcap) {
    size_t i, o = 0;
    int v[4], j, pad;
    if (n == 0 || n % 4 != 0)
        return -1;
    for (i = 0; i < n; i += 4) {
        pad = 0;
        for (j = 0; j < 4; j++) {
            if (in[i + j] == '=' && i + 4 == n && j >= 2) { v[j] = 0; pad++; continue; }
            if (pad) return -1;
            v[j] = kr_b64val(in[i + j]);
            if (v[j] < 0) return -1;
        }
        if (o + 3 - pad > outcap) return -1;
        out[o++] = (unsigned char)((v[0] << 2) | (v[1] >> 4));
        if (pad < 2) out[o++] = (unsigned char)((v[1] << 4) | (v[2] >> 2));
        if (pad < 1) out[o++] = (unsigned char)((v[2] << 6) | v[3]);
    }
    return (int)o;
}

/* constant-time comparison of two 32-byte hashes */
static inline int kr_hash_eq(const unsigned char *a, const unsigned char *b) {
    unsigned char d = 0;
    int i;
    for (i = 0; i < 32; i++) d |= a[i] ^ b[i];
    return d == 0;
}

#endif

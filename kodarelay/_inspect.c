/* The engine's inspected tunnel: see _inspect.h. One machine per tunnel, driven by its
 * worker on epoll edges; it never blocks and never takes the GIL.
 *
 * The machine mirrors kodarelay.forward._Exchange as an inspected tunnel runs it
 * (kodarelay.inspection.InspectedExchange): the same checks in the same order, the same
 * replies byte for byte, the same head rebuilt for the origin. Requests on one connection
 * are served one after another (the next head is read once the response has ended), and an
 * inspected tunnel holds one origin connection: where the origin cannot go on (a
 * close-delimited or HTTP/1.0 response, ``Connection: close``) the client is told
 * ``Connection: close`` and the tunnel ends after that response.
 */
#define _GNU_SOURCE 1
#include "_inspect.h"
#include "_engine.h"          /* the engine's strict base64 (kr_b64decode), shared */

/* replies and records are bounded on purpose (snprintf cuts an absurd method or host) */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wformat-truncation"
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <time.h>

#ifdef KR_HAVE_TLS
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <openssl/pem.h>
#endif

#define MAX_HEAD 8192
#define MAX_RESPONSE_HEAD 65536
#define MAX_LINE 4096
#define MAX_TRAILERS 64
#define IN_CAP (MAX_RESPONSE_HEAD + 16384)
#define HIGH_WATER (256 * 1024)      /* a side's output: stop moving body bytes beyond this */
#define BUDGET 64

/* ── fault injection (tests): the Nth allocation of a machine fails ─────────────── */

static int g_fail_after;          /* 0: off */

int kr_inspect_fail_after(int n) { __atomic_store_n(&g_fail_after, n, __ATOMIC_RELAXED); return 0; }

static int fail_now(void) {
    int v = __atomic_load_n(&g_fail_after, __ATOMIC_RELAXED);
    while (v > 0) {
        if (__atomic_compare_exchange_n(&g_fail_after, &v, v - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return v == 1;
    }
    return 0;
}

/* ── rules ──────────────────────────────────────────────────────────────────── */

typedef struct {
    int deny;
    char *methods;       /* NUL-separated, empty name last; NULL: any */
    size_t methodsn;
    char *path;          /* NULL: any */
    size_t pathn;
    char *text;
} kr_rule;

struct kr_rules {
    int refs;
    int judged;
    int n;
    kr_rule *v;
};

kr_rules *kr_rules_new(int judged) {
    kr_rules *r = calloc(1, sizeof(*r));
    if (r) { r->refs = 1; r->judged = judged; }
    return r;
}

static char *dupn(const char *p, size_t n) {
    char *q = malloc(n + 1);
    if (q) { memcpy(q, p, n); q[n] = 0; }
    return q;
}

int kr_rules_add(kr_rules *r, int deny, const char *methods, size_t methodsn, const char *path,
                 const char *text) {
    kr_rule *v = realloc(r->v, (size_t)(r->n + 1) * sizeof(kr_rule));
    kr_rule *e;
    if (!v) return -1;
    r->v = v;
    e = &v[r->n];
    memset(e, 0, sizeof(*e));
    e->deny = deny;
    if (methods) { e->methods = dupn(methods, methodsn); e->methodsn = methodsn; if (!e->methods) return -1; }
    if (path) { e->pathn = strlen(path); e->path = dupn(path, e->pathn); if (!e->path) { free(e->methods); return -1; } }
    e->text = dupn(text, strlen(text));
    if (!e->text) { free(e->methods); free(e->path); return -1; }
    r->n++;
    return 0;
}

void kr_rules_ref(kr_rules *r) { __atomic_fetch_add(&r->refs, 1, __ATOMIC_RELAXED); }

void kr_rules_unref(kr_rules *r) {
    int i;
    if (!r || __atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    for (i = 0; i < r->n; i++) { free(r->v[i].methods); free(r->v[i].path); free(r->v[i].text); }
    free(r->v);
    free(r);
}

int kr_glob(const char *pat, size_t pn, const char *s, size_t n) {
    size_t p = 0, i = 0, star = (size_t)-1, mark = 0;
    while (i < n) {
        if (p < pn && pat[p] == '*') { star = p++; mark = i; }
        else if (p < pn && pat[p] == s[i]) { p++; i++; }
        else if (star != (size_t)-1) { p = star + 1; i = ++mark; }
        else return 0;
    }
    while (p < pn && pat[p] == '*') p++;
    return p == pn;
}

static int method_in(const kr_rule *e, const char *m, size_t mn) {
    const char *p = e->methods, *end = e->methods + e->methodsn;
    while (p < end && *p) {
        size_t l = strlen(p);
        if (l == mn && memcmp(p, m, mn) == 0) return 1;
        p += l + 1;
    }
    return 0;
}

const char *kr_bad_path(const char *p, size_t n) {
    size_t i, seg;
    const char *q = memchr(p, '?', n);
    if (q) n = (size_t)(q - p);
    if (n == 0 || p[0] != '/') return "the path does not start with /";
    if (memchr(p, '\\', n)) return "a backslash in the path";
    for (i = 0; i + 2 < n; i++) {
        if (p[i] == '%') {
            char a = p[i + 1], b = p[i + 2];
            if ((a == '2' && (b == 'f' || b == 'F' || b == 'e' || b == 'E')) || (a == '5' && (b == 'c' || b == 'C'))
                || (a == '0' && b == '0'))
                return "a percent-encoded '/', '\\', '.' or NUL in the path";
        }
    }
    seg = 0;
    for (i = 0; i <= n; i++) {
        if (i == n || p[i] == '/') {
            size_t l = i - seg;
            if ((l == 1 && p[seg] == '.') || (l == 2 && p[seg] == '.' && p[seg + 1] == '.'))
                return "a dot segment in the path";
            seg = i + 1;
        }
    }
    return NULL;
}

/* ── records ───────────────────────────────────────────────────────────────── */

void kr_rec_free(kr_rec *r) {
    if (!r) return;
    free(r->path);
    free(r->detail);
    free(r);
}

/* ── TLS contexts ──────────────────────────────────────────────────────────── */

#define SESSION_SLOTS 64
#define POOL_SLOTS 64
#define POOL_IDLE 4.0      /* seconds an idle origin connection is kept (origins close theirs at 5 s and up) */

struct kr_ctx {
#ifdef KR_HAVE_TLS
    SSL_CTX *ctx;
    /* (a client context) the last resumable session per origin "host port": a new tunnel
     * to an origin resumes instead of a full handshake and chain check, as haproxy does */
    pthread_mutex_t mu;
    struct { char key[300]; SSL_SESSION *s; } sessions[SESSION_SLOTS];
    int next;
    int client;
    /* idle origin connections, kept after a clean exchange for the next tunnel to the same
     * origin (haproxy's http-reuse): one TLS handshake per new tunnel instead of two */
    struct { char key[300]; int fd; SSL *ssl; double since; } pool[POOL_SLOTS];
#endif
    int refs;
};

#ifdef KR_HAVE_TLS
int kr_tls_available(void) { return 1; }
const char *kr_tls_version(void) { return OpenSSL_version(OPENSSL_VERSION); }

static void ssl_err(char *err, size_t errn, const char *what) {
    unsigned long e = ERR_get_error();
    char buf[200];
    if (e) ERR_error_string_n(e, buf, sizeof(buf)); else snprintf(buf, sizeof(buf), "unknown error");
    snprintf(err, errn, "%s: %s", what, buf);
    ERR_clear_error();
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
    static const unsigned char mine[] = "\x08http/1.1";
    unsigned char *o;
    (void)ssl; (void)arg;
    if (SSL_select_next_proto(&o, outlen, mine, sizeof(mine) - 1, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = o;
    return SSL_TLSEXT_ERR_OK;
}

kr_ctx *kr_server_ctx(const char *pem, size_t n, char *err, size_t errn) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    BIO *b = NULL;
    X509 *x = NULL;
    EVP_PKEY *k = NULL;
    kr_ctx *c;
    if (!ctx) { ssl_err(err, errn, "SSL_CTX_new"); return NULL; }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    b = BIO_new_mem_buf(pem, (int)n);
    if (!b) goto fail;
    x = PEM_read_bio_X509(b, NULL, NULL, NULL);
    if (!x || SSL_CTX_use_certificate(ctx, x) != 1) goto fail;
    X509_free(x);
    x = NULL;
    for (;;) {                               /* the chain, up to the key */
        X509 *extra = PEM_read_bio_X509(b, NULL, NULL, NULL);
        if (!extra) break;
        if (SSL_CTX_add_extra_chain_cert(ctx, extra) != 1) { X509_free(extra); goto fail; }
    }
    ERR_clear_error();
    BIO_free(b);
    b = BIO_new_mem_buf(pem, (int)n);
    if (!b) goto fail;
    k = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL);
    if (!k || SSL_CTX_use_PrivateKey(ctx, k) != 1 || SSL_CTX_check_private_key(ctx) != 1) goto fail;
    EVP_PKEY_free(k);
    BIO_free(b);
    c = calloc(1, sizeof(*c));
    if (!c) { SSL_CTX_free(ctx); snprintf(err, errn, "out of memory"); return NULL; }
    c->ctx = ctx;
    c->refs = 1;
    pthread_mutex_init(&c->mu, NULL);
    return c;
fail:
    ssl_err(err, errn, "loading the leaf");
    X509_free(x);
    EVP_PKEY_free(k);
    BIO_free(b);
    SSL_CTX_free(ctx);
    return NULL;
}

static int new_session(SSL *ssl, SSL_SESSION *sess);

kr_ctx *kr_client_ctx(const char *cafile, char *err, size_t errn) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    kr_ctx *c;
    static const unsigned char alpn[] = "\x08http/1.1";
    if (!ctx) { ssl_err(err, errn, "SSL_CTX_new"); return NULL; }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session);
    if ((cafile ? SSL_CTX_load_verify_locations(ctx, cafile, NULL) : SSL_CTX_set_default_verify_paths(ctx)) != 1) {
        ssl_err(err, errn, "loading the CA store");
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn) - 1) != 0) {
        ssl_err(err, errn, "ALPN");
        SSL_CTX_free(ctx);
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (!c) { SSL_CTX_free(ctx); snprintf(err, errn, "out of memory"); return NULL; }
    c->ctx = ctx;
    c->refs = 1;
    c->client = 1;
    pthread_mutex_init(&c->mu, NULL);
    SSL_CTX_set_app_data(ctx, c);
    return c;
}

/* the key a session is kept under (the SSL's app data is its tunnel's "host port") */
static int new_session(SSL *ssl, SSL_SESSION *sess) {
    kr_ctx *c = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const char *key = SSL_get_app_data(ssl);
    int i, slot = -1;
    if (!c || !key || !SSL_SESSION_is_resumable(sess)) return 0;
    pthread_mutex_lock(&c->mu);
    for (i = 0; i < SESSION_SLOTS; i++) if (c->sessions[i].s && !strcmp(c->sessions[i].key, key)) { slot = i; break; }
    if (slot < 0) { slot = c->next; c->next = (c->next + 1) % SESSION_SLOTS; }
    if (c->sessions[slot].s) SSL_SESSION_free(c->sessions[slot].s);
    snprintf(c->sessions[slot].key, sizeof(c->sessions[slot].key), "%s", key);
    c->sessions[slot].s = sess;                  /* (the reference OpenSSL hands us: return 1) */
    pthread_mutex_unlock(&c->mu);
    return 1;
}

static void resume_session(kr_ctx *c, SSL *ssl, const char *key) {
    int i;
    pthread_mutex_lock(&c->mu);
    for (i = 0; i < SESSION_SLOTS; i++) {
        if (c->sessions[i].s && !strcmp(c->sessions[i].key, key)) {
            SSL_set_session(ssl, c->sessions[i].s);
            break;
        }
    }
    pthread_mutex_unlock(&c->mu);
}

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void pool_drop(kr_ctx *c, int i) {
    SSL_free(c->pool[i].ssl);
    close(c->pool[i].fd);
    c->pool[i].ssl = NULL;
    c->pool[i].fd = -1;
}

/* keep an idle origin connection (the SSL's BIO must not point at a machine any more) */
static void pool_put(kr_ctx *c, const char *key, int fd, SSL *ssl) {
    int i, slot = -1, oldest = 0;
    double now = mono_now();
    pthread_mutex_lock(&c->mu);
    for (i = 0; i < POOL_SLOTS; i++) {
        if (c->pool[i].ssl && now - c->pool[i].since > POOL_IDLE) pool_drop(c, i);
        if (!c->pool[i].ssl) { if (slot < 0) slot = i; }
        else if (c->pool[i].since < c->pool[oldest].since || !c->pool[oldest].ssl) oldest = i;
    }
    if (slot < 0) { pool_drop(c, oldest); slot = oldest; }
    snprintf(c->pool[slot].key, sizeof(c->pool[slot].key), "%s", key);
    c->pool[slot].fd = fd;
    c->pool[slot].ssl = ssl;
    c->pool[slot].since = now;
    pthread_mutex_unlock(&c->mu);
}

/* an idle origin connection to key that is still open and quiet, or -1 */
static int pool_take(kr_ctx *c, const char *key, SSL **ssl) {
    for (;;) {
        int i, best = -1, fd;
        double now = mono_now();
        char b;
        ssize_t k;
        pthread_mutex_lock(&c->mu);
        for (i = 0; i < POOL_SLOTS; i++) {
            if (!c->pool[i].ssl) continue;
            if (now - c->pool[i].since > POOL_IDLE) { pool_drop(c, i); continue; }
            if (!strcmp(c->pool[i].key, key) && (best < 0 || c->pool[i].since > c->pool[best].since)) best = i;
        }
        if (best < 0) { pthread_mutex_unlock(&c->mu); return -1; }
        fd = c->pool[best].fd;
        *ssl = c->pool[best].ssl;
        c->pool[best].ssl = NULL;
        c->pool[best].fd = -1;
        pthread_mutex_unlock(&c->mu);
        k = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return fd;   /* open, nothing unasked-for */
        SSL_free(*ssl);                               /* closed by the origin (or it spoke first) */
        close(fd);
        *ssl = NULL;
    }
}

void kr_ctx_unref(kr_ctx *c) {
    int i;
    if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    for (i = 0; i < POOL_SLOTS; i++) if (c->pool[i].ssl) pool_drop(c, i);
    for (i = 0; i < SESSION_SLOTS; i++) if (c->sessions[i].s) SSL_SESSION_free(c->sessions[i].s);
    pthread_mutex_destroy(&c->mu);
    SSL_CTX_free(c->ctx);
    free(c);
}
#else
int kr_tls_available(void) { return 0; }
const char *kr_tls_version(void) { return ""; }
kr_ctx *kr_server_ctx(const char *pem, size_t n, char *err, size_t errn) {
    (void)pem; (void)n; snprintf(err, errn, "built without OpenSSL"); return NULL;
}
kr_ctx *kr_client_ctx(const char *cafile, char *err, size_t errn) {
    (void)cafile; snprintf(err, errn, "built without OpenSSL"); return NULL;
}
void kr_ctx_unref(kr_ctx *c) {
    if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    free(c);
}
#endif

void kr_ctx_ref(kr_ctx *c) { __atomic_fetch_add(&c->refs, 1, __ATOMIC_RELAXED); }

/* ── secrets (kodarelay.secrets.SecretSet, the request / response half) ────────── */

typedef struct {
    char *name;
    char *phantom; size_t pn;
    char *value; size_t vn;
    char *hosts;           /* the hosts it goes to, as a refusal names them */
    int covers;            /* this tunnel's host is one of them */
} kr_secret;

struct kr_secrets {
    int refs;
    int n;
    kr_secret *v;
};

kr_secrets *kr_secrets_new(void) {
    kr_secrets *s = calloc(1, sizeof(*s));
    if (s) s->refs = 1;
    return s;
}

int kr_secrets_add(kr_secrets *s, const char *name, const char *phantom, size_t pn, const char *value, size_t vn,
                   const char *hosts, int covers) {
    kr_secret *v;
    kr_secret *e;
    if (s->n >= 32 || pn == 0 || vn == 0) return -1;
    v = realloc(s->v, (size_t)(s->n + 1) * sizeof(kr_secret));
    if (!v) return -1;
    s->v = v;
    e = &v[s->n];
    e->name = dupn(name, strlen(name));
    e->phantom = dupn(phantom, pn);
    e->value = dupn(value, vn);
    e->hosts = dupn(hosts, strlen(hosts));
    if (!e->name || !e->phantom || !e->value || !e->hosts) {
        free(e->name); free(e->phantom); free(e->value); free(e->hosts);
        return -1;
    }
    e->pn = pn;
    e->vn = vn;
    e->covers = covers;
    s->n++;
    return 0;
}

void kr_secrets_ref(kr_secrets *s) { __atomic_fetch_add(&s->refs, 1, __ATOMIC_RELAXED); }

void kr_secrets_unref(kr_secrets *s) {
    int i;
    if (!s || __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    for (i = 0; i < s->n; i++) {
        kr_secret *e = &s->v[i];
        explicit_bzero(e->value, e->vn);       /* the value is wiped before its memory goes back */
        explicit_bzero(e->phantom, e->pn);
        free(e->name); free(e->phantom); free(e->value); free(e->hosts);
    }
    free(s->v);
    free(s);
}

/* strict base64 (b64decode(validate=True), the engine's kr_b64decode) into a malloc'd
 * buffer: its length, or -1 */
static long b64_decode(const char *in, size_t n, char **out) {
    size_t cap = n / 4 * 3;
    char *d;
    int k;
    if (n == 0 || n % 4) return -1;
    d = malloc(cap + 1);
    if (!d) return -1;
    k = kr_b64decode((const unsigned char *)in, n, (unsigned char *)d, cap);
    if (k < 0) { free(d); return -1; }
    *out = d;
    return k;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t b64_encode(const char *in, size_t n, char *out) {
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        unsigned v = ((unsigned)(unsigned char)in[i] << 16) | ((unsigned)(unsigned char)in[i + 1] << 8)
                     | (unsigned char)in[i + 2];
        out[o++] = B64[v >> 18]; out[o++] = B64[(v >> 12) & 63]; out[o++] = B64[(v >> 6) & 63]; out[o++] = B64[v & 63];
    }
    if (n - i == 1) {
        unsigned v = (unsigned)(unsigned char)in[i] << 16;
        out[o++] = B64[v >> 18]; out[o++] = B64[(v >> 12) & 63]; out[o++] = '='; out[o++] = '=';
    } else if (n - i == 2) {
        unsigned v = ((unsigned)(unsigned char)in[i] << 16) | ((unsigned)(unsigned char)in[i + 1] << 8);
        out[o++] = B64[v >> 18]; out[o++] = B64[(v >> 12) & 63]; out[o++] = B64[(v >> 6) & 63]; out[o++] = '=';
    }
    return o;
}

/* ``Basic <base64>`` (secrets._BASIC on a stripped value): where the base64 starts, or 0 */
static size_t basic_at(const char *v, size_t n) {
    size_t i = 5, s;
    if (n < 7 || strncasecmp(v, "basic", 5) != 0 || (v[5] != ' ' && v[5] != '\t')) return 0;
    while (i < n && (v[i] == ' ' || v[i] == '\t')) i++;
    s = i;
    if (s == n) return 0;
    for (; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (!(kr_b64val(c) >= 0 || c == '=')) return 0;
    }
    return s;
}

/* whether v (or its decoded Basic credential) holds needle */
static int value_has(const char *v, size_t n, const char *needle, size_t nn) {
    size_t at;
    if (memmem(v, n, needle, nn)) return 1;
    if ((at = basic_at(v, n)) != 0) {
        char *d = NULL;
        long dn = b64_decode(v + at, n - at, &d);
        int r = dn >= 0 && memmem(d, (size_t)dn, needle, nn) != NULL;
        if (d) { explicit_bzero(d, dn > 0 ? (size_t)dn : 0); free(d); }
        return r;
    }
    return 0;
}

/* secrets._swap_value: every ``old`` in v becomes ``nw``, then (basic) in its Basic
 * credential too; the result is malloc'd in *out (its length returned), or -1 */
static long swap_value(const char *v, size_t n, const char *old, size_t on, const char *nw, size_t nn, char **out,
                       int basic) {
    size_t cap = n + 64, o = 0, i = 0, at;
    char *r = fail_now() ? NULL : malloc(cap);
    if (!r) return -1;
    while (i < n) {
        const char *hit = on ? memmem(v + i, n - i, old, on) : NULL;
        size_t take = hit ? (size_t)(hit - (v + i)) : n - i;
        size_t need = o + take + (hit ? nn : 0) + 1;
        if (need > cap) {
            char *q;
            while (cap < need) cap *= 2;
            q = realloc(r, cap);
            if (!q) { free(r); return -1; }
            r = q;
        }
        memcpy(r + o, v + i, take); o += take; i += take;
        if (hit) { memcpy(r + o, nw, nn); o += nn; i += on; }
    }
    if (basic && (at = basic_at(r, o)) != 0) {
        char *d = NULL;
        long dn = b64_decode(r + at, o - at, &d);
        if (dn >= 0 && memmem(d, (size_t)dn, old, on)) {
            char *sw = NULL, *enc;
            long sn = swap_value(d, (size_t)dn, old, on, nw, nn, &sw, 0);
            if (sn < 0) { free(d); free(r); return -1; }
            enc = malloc(at + ((size_t)sn + 2) / 3 * 4 + 1);
            if (!enc) { free(sw); free(d); free(r); return -1; }
            memcpy(enc, r, at);
            explicit_bzero(r, o);
            free(r);
            o = at + b64_encode(sw, (size_t)sn, enc + at);
            explicit_bzero(sw, (size_t)sn);
            free(sw);
            r = enc;
        }
        if (d) { explicit_bzero(d, dn > 0 ? (size_t)dn : 0); free(d); }
    }
    *out = r;
    return (long)o;
}

/* ── the machine ───────────────────────────────────────────────────────────── */

typedef struct side {
    int fd;
#ifdef KR_HAVE_TLS
    SSL *ssl;              /* NULL: plain bytes */
#else
    void *ssl;
#endif
    char *pre;             /* bytes read before the TLS object existed (served to it first) */
    size_t pren, preoff;
    int rblocked, wblocked;
    int hs_want;           /* what the handshake waits for (SSL_ERROR_WANT_READ / _WRITE) */
    int eof;
    int err;
    int hs;                /* TLS handshake done (always 1 for plain) */
    char *ib; size_t il;   /* plaintext from this side, not yet consumed (IN_CAP) */
    char *ob; size_t ol, oo, ocap;  /* plaintext to this side */
    uint64_t wrote;
    int shut;              /* close_notify sent */
} side;

enum { F_NONE, F_LEN, F_CHUNKED, F_EOF };
enum { CS_SIZE, CS_DATA, CS_CRLF, CS_TRAILER };

typedef struct {
    int mode;
    uint64_t left;
    int cst;
    int ntrailers;
    int done;
    const char *bad;       /* why the body is malformed */
    int badreq;            /* the request side's _BadRequest (a 400), not a reset */
} framer;

enum { P_FIRST, P_HS, P_HTTP, P_TUNNEL };
enum { RQ_HEAD, RQ_BODY, RQ_WAIT, RQ_STOP };
enum { RS_NONE, RS_HEAD, RS_BODY };

struct kr_insp {
    side c, o;
    kr_ctx *sctx, *cctx;
    kr_rules *rules;
    char host[256];
    char shown[260];       /* host as URLs show it ([v6]) */
    int port;
    int phase;
    int tls;
    int ohs_failed;
    char ohs_err[256];
    int rq, rs;
    framer rqb, rsb;
    int head_req;          /* the request in flight is a HEAD */
    int upgrade;
    int client_close;
    int reusable;
    int close_after;       /* end the tunnel once the client has its bytes */
    int sent_any;          /* part of the current response reached the client */
    char method[33];
    kr_rec *recs, **rtail;
    int err;
    int closing;
    kr_secrets *secrets;   /* NULL: none */
    unsigned swap;         /* the secrets (bits) the request in flight carries */
    int fwd;               /* plain-HTTP forwarding: absolute-form requests to host:port */
    int handback;          /* a request Python serves: the connection goes back to it */
    char authority[300];   /* (fwd) the request's authority as written: its Host */
    char skey[300];        /* the origin's session key: "host port" */
    int exchanges;         /* responses relayed in full */
    int nopool;            /* the origin authenticates the connection itself: never reused */
};

static int grow_out(side *s, size_t more) {
    size_t need;
    if (fail_now()) return -1;
    if (s->oo > 0 && s->oo == s->ol) { s->oo = s->ol = 0; }
    need = s->ol + more;
    if (need <= s->ocap) return 0;
    if (s->oo > 0) {                         /* slide first */
        memmove(s->ob, s->ob + s->oo, s->ol - s->oo);
        s->ol -= s->oo;
        s->oo = 0;
        need = s->ol + more;
        if (need <= s->ocap) return 0;
    }
    {
        size_t cap = s->ocap ? s->ocap : 16384;
        char *nb;
        while (cap < need) cap *= 2;
        nb = realloc(s->ob, cap);
        if (!nb) return -1;
        s->ob = nb;
        s->ocap = cap;
    }
    return 0;
}

static int out_put(kr_insp *x, side *s, const char *p, size_t n) {
    if (n == 0) return 0;                        /* (a forwarded connection's empty "ok reply") */
    if (grow_out(s, n) < 0) { x->err = ENOMEM; return -1; }
    memcpy(s->ob + s->ol, p, n);
    s->ol += n;
    return 0;
}

static size_t out_pending(const side *s) { return s->ol - s->oo; }

static void rec(kr_insp *x, const char *reason, const char *method, int has_host, const char *path, size_t pathn,
                const char *detail) {
    kr_rec *r = calloc(1, sizeof(*r));
    if (!r) return;
    snprintf(r->reason, sizeof(r->reason), "%s", reason);
    snprintf(r->method, sizeof(r->method), "%s", method ? method : "");
    r->has_host = has_host;
    if (path) r->path = dupn(path, pathn);
    if (detail) r->detail = dupn(detail, strlen(detail));
    *x->rtail = r;
    x->rtail = &r->next;
}

/* ── raw I/O and the TLS objects' BIO (the worker's sockets, never blocking) ── */

static ssize_t raw_read(side *s, char *buf, size_t n) {
    ssize_t k;
    if (s->preoff < s->pren) {
        size_t m = s->pren - s->preoff;
        if (m > n) m = n;
        memcpy(buf, s->pre + s->preoff, m);
        s->preoff += m;
        if (s->preoff == s->pren) { free(s->pre); s->pre = NULL; s->pren = s->preoff = 0; }
        return (ssize_t)m;
    }
    do { k = recv(s->fd, buf, n, 0); } while (k < 0 && errno == EINTR);
    return k;
}

static ssize_t raw_write(side *s, const char *buf, size_t n) {
    ssize_t k;
    do { k = send(s->fd, buf, n, MSG_NOSIGNAL); } while (k < 0 && errno == EINTR);
    return k;
}

#ifdef KR_HAVE_TLS
static BIO_METHOD *g_bio_method;
static pthread_once_t g_bio_once = PTHREAD_ONCE_INIT;

static int bio_write(BIO *b, const char *buf, int n) {
    side *s = BIO_get_data(b);
    ssize_t k;
    BIO_clear_retry_flags(b);
    if (!s) return -1;                           /* (pooled: no machine to write for) */
    k = raw_write(s, buf, (size_t)n);
    if (k >= 0) return (int)k;
    if (errno == EAGAIN) { BIO_set_retry_write(b); s->wblocked = 1; }
    else s->err = errno;
    return -1;
}

static int bio_read(BIO *b, char *buf, int n) {
    side *s = BIO_get_data(b);
    ssize_t k;
    BIO_clear_retry_flags(b);
    if (!s) return -1;
    k = raw_read(s, buf, (size_t)n);
    if (k > 0) return (int)k;
    if (k == 0) { s->eof = 1; return 0; }
    if (errno == EAGAIN) { BIO_set_retry_read(b); s->rblocked = 1; }
    else s->err = errno;
    return -1;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)b; (void)num; (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *b) { BIO_set_init(b, 1); return 1; }
static int bio_destroy(BIO *b) { (void)b; return 1; }

static void bio_init(void) {
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "kodarelay engine socket");
    if (!m) return;
    BIO_meth_set_write(m, bio_write);
    BIO_meth_set_read(m, bio_read);
    BIO_meth_set_ctrl(m, bio_ctrl);
    BIO_meth_set_create(m, bio_create);
    BIO_meth_set_destroy(m, bio_destroy);
    g_bio_method = m;
}

static int side_tls(side *s, kr_ctx *c, int server, const char *sni, const char *skey) {
    BIO *b;
    pthread_once(&g_bio_once, bio_init);
    if (!g_bio_method) return -1;
    s->ssl = SSL_new(c->ctx);
    if (!s->ssl) return -1;
    b = BIO_new(g_bio_method);
    if (!b) { SSL_free(s->ssl); s->ssl = NULL; return -1; }
    BIO_set_data(b, s);
    SSL_set_bio(s->ssl, b, b);
    if (server) SSL_set_accept_state(s->ssl);
    else {
        SSL_set_connect_state(s->ssl);
        if (sni[0] && !strchr(sni, ':') && strspn(sni, "0123456789.") != strlen(sni))
            SSL_set_tlsext_host_name(s->ssl, sni);
        if (strchr(sni, ':') || strspn(sni, "0123456789.") == strlen(sni)) {
            if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s->ssl), sni) != 1) return -1;
        } else if (SSL_set1_host(s->ssl, sni) != 1) return -1;
        SSL_set_app_data(s->ssl, (void *)skey);
        resume_session(c, s->ssl, skey);
    }
    s->hs = 0;
    return 0;
}
#endif

/* read plaintext into s->ib: >0 bytes, 0 would block (or no room), -1 EOF, -2 error */
static int side_fill(kr_insp *x, side *s) {
    size_t room = IN_CAP - s->il;
    if (room == 0 || s->eof) return s->eof ? -1 : 0;
    /* drained since its last readable edge: no read (no EAGAIN syscall) until the next one,
     * unless the TLS object holds bytes it read ahead */
    if (s->rblocked && s->preoff >= s->pren
#ifdef KR_HAVE_TLS
        && !(s->ssl && SSL_has_pending(s->ssl))
#endif
        ) return 0;
#ifdef KR_HAVE_TLS
    if (s->ssl) {
        size_t got = 0;
        int r;
        ERR_clear_error();
        r = SSL_read_ex(s->ssl, s->ib + s->il, room, &got);
        if (r == 1) { s->il += got; return (int)got; }
        switch (SSL_get_error(s->ssl, r)) {
        case SSL_ERROR_WANT_READ: s->rblocked = 1; return 0;
        case SSL_ERROR_WANT_WRITE: return 0;
        case SSL_ERROR_ZERO_RETURN: s->eof = 1; return -1;
        case SSL_ERROR_SYSCALL:
            if (s->err) { x->err = s->err; return -2; }
            s->eof = 1; return -1;               /* many peers close without close_notify */
        default:
            if (s->eof) return -1;
            ERR_clear_error();
            x->err = EPROTO;
            return -2;
        }
    }
#endif
    {
        ssize_t k = raw_read(s, s->ib + s->il, room);
        if (k > 0) { s->il += (size_t)k; return (int)k; }
        if (k == 0) { s->eof = 1; return -1; }
        if (errno == EAGAIN) { s->rblocked = 1; return 0; }
        x->err = errno;
        return -2;
    }
}

/* write what s->ob holds: 1 progress, 0 blocked or nothing to do, -2 error */
static int side_flush(kr_insp *x, side *s) {
    int progress = 0;
    while (s->oo < s->ol) {
        size_t n = s->ol - s->oo;
        if (s->wblocked) return progress;        /* full since its last writable edge */
#ifdef KR_HAVE_TLS
        if (s->ssl) {
            size_t put = 0;
            int r;
            ERR_clear_error();
            r = SSL_write_ex(s->ssl, s->ob + s->oo, n, &put);
            if (r == 1) { s->oo += put; s->wrote += put; progress = 1; continue; }
            switch (SSL_get_error(s->ssl, r)) {
            case SSL_ERROR_WANT_WRITE: s->wblocked = 1; return progress;
            case SSL_ERROR_WANT_READ: return progress;
            default:
                ERR_clear_error();
                x->err = s->err ? s->err : EPIPE;
                return -2;
            }
        }
#endif
        {
            ssize_t k = raw_write(s, s->ob + s->oo, n);
            if (k > 0) { s->oo += (size_t)k; s->wrote += (uint64_t)k; progress = 1; continue; }
            if (k < 0 && errno == EAGAIN) { s->wblocked = 1; return progress; }
            x->err = k < 0 ? errno : EPIPE;
            return -2;
        }
    }
    if (s->oo == s->ol) s->oo = s->ol = 0;
    return progress;
}

static void consume(side *s, size_t n) {
    memmove(s->ib, s->ib + n, s->il - n);
    s->il -= n;
}

/* ── heads ─────────────────────────────────────────────────────────────────── */

static int tchar(unsigned char c) {
    if ((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int value_bad(unsigned char c) { return (c < 0x20 && c != 0x09) || c == 0x7F; }

typedef struct { const char *name; size_t namen; const char *value; size_t valuen; } field;

#define MAX_FIELDS 256

typedef struct {
    field f[MAX_FIELDS];
    int n;
} fields;

/* parse_http_head's field lines from pos (the head ends with CRLF CRLF); NULL or the error */
static const char *parse_fields(const char *p, size_t n, size_t pos, fields *out) {
    out->n = 0;
    for (;;) {
        const char *e = memmem(p + pos, n - pos, "\r\n", 2);
        size_t eol, colon, i, vs, ve;
        if (!e) return "head does not end with CRLF CRLF";
        eol = (size_t)(e - p);
        if (eol == pos) return eol + 2 != n ? "bytes after the blank line" : NULL;
        if (p[pos] == ' ' || p[pos] == '\t') return "obs-fold in header";
        colon = pos;
        while (colon < eol && p[colon] != ':') colon++;
        if (colon >= eol || colon == pos) return "malformed header line";
        for (i = pos; i < colon; i++) if (!tchar((unsigned char)p[i])) return "malformed header name";
        vs = colon + 1;
        ve = eol;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        for (i = vs; i < ve; i++) if (value_bad((unsigned char)p[i])) return "control byte in header value";
        if (out->n == MAX_FIELDS) return "too many header fields";
        out->f[out->n].name = p + pos;
        out->f[out->n].namen = colon - pos;
        out->f[out->n].value = p + vs;
        out->f[out->n].valuen = ve - vs;
        out->n++;
        pos = eol + 2;
    }
}

static const char *check_line_ends(const char *p, size_t n) {
    size_t i;
    if (memchr(p, 0, n)) return "NUL in head";
    for (i = 0; i < n; i++) {
        if (p[i] == '\r') { if (i + 1 >= n || p[i + 1] != '\n') return "bare CR or LF in head"; }
        else if (p[i] == '\n') { if (i == 0 || p[i - 1] != '\r') return "bare CR or LF in head"; }
    }
    return NULL;
}

static int name_is(const field *f, const char *lower) {
    size_t n = strlen(lower);
    return f->namen == n && strncasecmp(f->name, lower, n) == 0;
}

/* the comma-separated tokens of every value of name: calls fn(token, len, arg) for each
 * non-empty one (lower-cased comparison is the caller's) */
typedef int (*tok_fn)(const char *t, size_t n, void *arg);

static int each_token(const fields *fs, const char *name, tok_fn fn, void *arg) {
    int i;
    for (i = 0; i < fs->n; i++) {
        const field *f = &fs->f[i];
        size_t a = 0;
        if (!name_is(f, name)) continue;
        while (a <= f->valuen) {
            size_t b = a, s, e;
            while (b < f->valuen && f->value[b] != ',') b++;
            s = a; e = b;
            while (s < e && (f->value[s] == ' ' || f->value[s] == '\t')) s++;
            while (e > s && (f->value[e - 1] == ' ' || f->value[e - 1] == '\t')) e--;
            if (e > s) { int r = fn(f->value + s, e - s, arg); if (r) return r; }
            a = b + 1;
        }
    }
    return 0;
}

static int tok_eq(const char *t, size_t n, const char *lower) {
    return strlen(lower) == n && strncasecmp(t, lower, n) == 0;
}

struct has_arg { const char *want; };
static int tok_has(const char *t, size_t n, void *arg) { return tok_eq(t, n, ((struct has_arg *)arg)->want); }

static int has_token(const fields *fs, const char *name, const char *want) {
    struct has_arg a = { want };
    return each_token(fs, name, tok_has, &a);
}

static int count_fields(const fields *fs, const char *name) {
    int i, k = 0;
    for (i = 0; i < fs->n; i++) if (name_is(&fs->f[i], name)) k++;
    return k;
}

/* the framing field Connection names (content-length / transfer-encoding / host), if any */
struct framing_arg { const char *found; };
static int tok_framing(const char *t, size_t n, void *arg) {
    static const char *names[] = { "content-length", "transfer-encoding", "host" };
    int i;
    for (i = 0; i < 3; i++) if (tok_eq(t, n, names[i])) { ((struct framing_arg *)arg)->found = names[i]; return 1; }
    return 0;
}

static const char *connection_names_framing(const fields *fs) {
    struct framing_arg a = { NULL };
    each_token(fs, "connection", tok_framing, &a);
    return a.found;
}

/* _content_length: the one length all values agree on; -1 when malformed or unequal */
static int64_t content_length(const fields *fs) {
    int i;
    int64_t v = -2;
    const char *first = NULL;
    size_t firstn = 0;
    for (i = 0; i < fs->n; i++) {
        const field *f = &fs->f[i];
        size_t a = 0;
        if (!name_is(f, "content-length")) continue;
        while (a <= f->valuen) {
            size_t b = a, s, e, k;
            while (b < f->valuen && f->value[b] != ',') b++;
            s = a; e = b;
            while (s < e && (f->value[s] == ' ' || f->value[s] == '\t')) s++;
            while (e > s && (f->value[e - 1] == ' ' || f->value[e - 1] == '\t')) e--;
            if (e == s || e - s > 18) return -1;
            for (k = s; k < e; k++) if (f->value[k] < '0' || f->value[k] > '9') return -1;
            if (first == NULL) {
                first = f->value + s; firstn = e - s;
                v = 0;
                for (k = s; k < e; k++) v = v * 10 + (f->value[k] - '0');
            } else if (firstn != e - s || memcmp(first, f->value + s, firstn) != 0) return -1;
            a = b + 1;
        }
    }
    return first ? v : -1;
}

/* the last Transfer-Encoding coding is chunked, and chunked appears once; also counts them */
struct te_arg { int n; int chunked; int last_chunked; };
static int tok_te(const char *t, size_t n, void *arg) {
    struct te_arg *a = arg;
    a->n++;
    a->last_chunked = tok_eq(t, n, "chunked");
    if (a->last_chunked) a->chunked++;
    return 0;
}

/* hop-by-hop (forward.HOP_BY_HOP) or named by Connection: dropped when rebuilding */
static const char *HOP[] = { "connection", "proxy-connection", "keep-alive", "te", "trailer", "upgrade",
                             "proxy-authorization", NULL };

struct drop_arg { const field *f; };
static int tok_names(const char *t, size_t n, void *arg) {
    const field *f = ((struct drop_arg *)arg)->f;
    return f->namen == n && strncasecmp(f->name, t, n) == 0;
}

static int dropped(const fields *fs, const field *f, int keep_upgrade) {
    int i;
    struct drop_arg a = { f };
    for (i = 0; HOP[i]; i++) {
        if (name_is(f, HOP[i])) return !(keep_upgrade && i == 5);
    }
    if (each_token(fs, "connection", tok_names, &a)) return !(keep_upgrade && name_is(f, "upgrade"));
    return 0;
}

/* ── replies (kodarelay.replies / forward.request_refusal, byte for byte) ─────── */

static const char *status_text(int code) {
    switch (code) {
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 408: return "Request Timeout";
    case 421: return "Misdirected Request";
    case 431: return "Request Header Fields Too Large";
    case 502: return "Bad Gateway";
    default: return "Error";
    }
}

/* a body from untrusted bytes: what Python's encode("ascii", "replace") gives */
static size_t ascii_replace(char *dst, size_t cap, const char *src, size_t n) {
    size_t i, o = 0;
    for (i = 0; i < n && o + 1 < cap; i++) {
        unsigned char c = (unsigned char)src[i];
        dst[o++] = c < 0x80 ? (char)c : '?';
    }
    dst[o] = 0;
    return o;
}

static void reply_text(kr_insp *x, int code, const char *reason, const char *text, const char *connection) {
    char head[512];
    char body[12288];
    size_t bn = ascii_replace(body, sizeof(body) - 1, text, strlen(text));
    int hn;
    body[bn++] = '\n';
    hn = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\n%s%s%sContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                  "Connection: %s\r\n\r\n", code, status_text(code), reason ? "X-Proxy-Error: " : "",
                  reason ? reason : "", reason ? "\r\n" : "", bn, connection);
    out_put(x, &x->c, head, (size_t)hn);
    if (strcmp(x->method, "HEAD") != 0)          /* a HEAD gets the head only */
        out_put(x, &x->c, body, bn);
}

/* refusal_reply(code, reason, host, port, method, detail): codes other than 403 with detail */
static void refuse(kr_insp *x, int code, const char *what, const char *method, int with_host, const char *reason) {
    char text[10240];
    if (with_host) {
        char target[300];
        if (strchr(x->shown, ':')) snprintf(target, sizeof(target), "[%s]:%d", x->shown, x->port);
        else snprintf(target, sizeof(target), "%s:%d", x->shown, x->port);
        snprintf(text, sizeof(text), "kodarelay: %s to %s: %s", method, target, what);
    } else snprintf(text, sizeof(text), "kodarelay: %s", what);
    reply_text(x, code, reason, text, "close");
    x->closing = 1;
}

/* _printable(text, 300) of latin-1 text: anything but visible ASCII escaped, then capped */
static void printable(char *dst, size_t cap, const char *s, size_t n) {
    size_t i, o = 0;
    for (i = 0; i < n && o + 8 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c > 0x20 && c < 0x7F) dst[o++] = (char)c;
        else o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", c);
    }
    if (o > 300) { memcpy(dst + 300, "...", 3); o = 303; }
    dst[o] = 0;
}

/* ── one request head ─────────────────────────────────────────────────────── */

static int host_names(const char *v, size_t n, const char *host) {
    /* captured.host_header_names: the value's host (port not compared) against host,
     * lower case, one trailing dot stripped (ASCII names only here) */
    size_t s = 0, e = n, hn = strlen(host), colons = 0, i;
    const char *name;
    size_t namen;
    while (s < e && (v[s] == ' ' || v[s] == '\t')) s++;
    while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
    for (i = s; i < e; i++) { if ((unsigned char)v[i] >= 0x80) return 0; if (v[i] == ':') colons++; }
    if (e > s && v[s] == '[') {
        const char *close = memchr(v + s, ']', e - s);
        name = v + s + 1;
        namen = close ? (size_t)(close - name) : e - s - 1;
        if (!close) { name = v + s; namen = e - s; }
    } else if (colons == 1) {
        name = v + s;
        namen = (size_t)((const char *)memchr(v + s, ':', e - s) - name);
    } else { name = v + s; namen = e - s; }
    if (namen > 0 && name[namen - 1] == '.') namen--;
    if (hn > 0 && host[hn - 1] == '.') hn--;
    return namen == hn && strncasecmp(name, host, hn) == 0;
}

static int framing_of(const fields *fs, int64_t *len, const char **why) {
    /* _body_framing: 0 none, 1 length (*len), 2 chunked; -1 with *why */
    int has_te = count_fields(fs, "transfer-encoding") > 0, has_cl = count_fields(fs, "content-length") > 0;
    if (has_te) {
        struct te_arg a = { 0, 0, 0 };
        if (has_cl) { *why = "both Content-Length and Transfer-Encoding"; return -1; }
        each_token(fs, "transfer-encoding", tok_te, &a);
        if (a.n == 0 || !a.last_chunked || a.chunked != 1) { *why = "Transfer-Encoding does not end in chunked"; return -1; }
        return 2;
    }
    if (has_cl) {
        *len = content_length(fs);
        if (*len < 0) { *why = "malformed or unequal Content-Length"; return -1; }
        return 1;
    }
    return 0;
}

static void start_body(framer *f, int kind, int64_t len) {
    memset(f, 0, sizeof(*f));
    if (kind == 1) { f->mode = F_LEN; f->left = (uint64_t)len; f->done = len == 0; }
    else if (kind == 2) { f->mode = F_CHUNKED; f->cst = CS_SIZE; }
    else if (kind == 3) f->mode = F_EOF;
    else { f->mode = F_NONE; f->done = 1; }
}

static void append(char **o, size_t *on, size_t *cap, const char *p, size_t n, int *fail) {
    if (*fail) return;
    if (*on + n > *cap) {
        size_t c = *cap ? *cap : 1024;
        char *q;
        while (c < *on + n) c *= 2;
        q = realloc(*o, c);
        if (!q) { *fail = 1; return; }
        *o = q;
        *cap = c;
    }
    memcpy(*o + *on, p, n);
    *on += n;
}

#define APP(s, n) append(&ob, &on, &ocap, (s), (n), &fail)
#define APPS(s) APP((s), strlen(s))

/* v with the secrets swapped in (request: the phantoms of those in x->swap become their
 * values) or out (a response: the values of the host's secrets become their phantoms), one
 * secret after another, as SecretSet.check / unswap do; basic: inside a Basic credential
 * too. Into out (*outn), the caller's to wipe and free; v itself (nothing malloc'd) when no
 * secret applies; NULL when out of memory. */
static const char *swapped(kr_insp *x, int request, int basic, const char *v, size_t n, size_t *outn) {
    kr_secrets *s = x->secrets;
    char *cur = NULL;
    size_t cn = n;
    int i;
    for (i = 0; s && i < s->n; i++) {
        const kr_secret *e = &s->v[i];
        char *next = NULL;
        long k;
        if (request ? !(x->swap & (1u << i)) : !e->covers) continue;
        k = request ? swap_value(cur ? cur : v, cn, e->phantom, e->pn, e->value, e->vn, &next, basic)
                    : swap_value(cur ? cur : v, cn, e->value, e->vn, e->phantom, e->pn, &next, basic);
        if (cur) { explicit_bzero(cur, cn); free(cur); }
        if (k < 0) return NULL;
        cur = next;
        cn = (size_t)k;
    }
    *outn = cn;
    return cur ? cur : v;
}

/* one field's value into the head being rebuilt, secrets swapped (a request's phantoms, a
 * response's values: see swapped; never the proxy's own credentials) */
static void put_value(kr_insp *x, int request, const field *f, char **ob, size_t *on, size_t *ocap, int *fail) {
    const char *v = f->value;
    size_t n = f->valuen;
    if (x->secrets && (request ? (x->swap && !name_is(f, "proxy-authorization")) : x->tls)) {
        v = swapped(x, request, 1, f->value, f->valuen, &n);
        if (!v) { *fail = 1; return; }
    }
    append(ob, on, ocap, v, n, fail);
    if (v != f->value) { explicit_bzero((char *)v, n); free((char *)v); }
}

/* the request judged and allowed: its rebuilt head for the origin (InspectedExchange._rebuild) */
static int send_request(kr_insp *x, const char *method, const char *origin, size_t originn, const char *version,
                        const fields *fs) {
    char *ob = NULL;
    size_t on = 0, ocap = 0;
    int fail = 0, i;
    char authority[300];
    if (x->fwd) snprintf(authority, sizeof(authority), "%s", x->authority);
    else if (x->port == 80 || (x->tls && x->port == 443)) snprintf(authority, sizeof(authority), "%s", x->shown);
    else snprintf(authority, sizeof(authority), "%s:%d", x->shown, x->port);
    APPS(method); APP(" ", 1);
    if (x->swap) {                           /* the target: phantoms only (no Basic there) */
        size_t tn = 0;
        const char *t = swapped(x, 1, 0, origin, originn, &tn);
        if (!t) fail = 1;
        else {
            APP(t, tn);
            if (t != origin) { explicit_bzero((char *)t, tn); free((char *)t); }
        }
    } else APP(origin, originn);
    APP(" ", 1); APPS(version); APP("\r\n", 2);
    APP("Host: ", 6); APPS(authority); APP("\r\n", 2);
    for (i = 0; i < fs->n; i++) {
        const field *f = &fs->f[i];
        if (name_is(f, "host") || dropped(fs, f, x->upgrade)) continue;
        APP(f->name, f->namen); APP(": ", 2); put_value(x, 1, f, &ob, &on, &ocap, &fail); APP("\r\n", 2);
    }
    if (x->upgrade) APPS("Connection: Upgrade\r\n");
    APP("\r\n", 2);
    if (fail || out_put(x, &x->o, ob, on) < 0) { free(ob); x->err = ENOMEM; return -1; }
    free(ob);
    return 0;
}

/* secrets.redact: a path for records and replies with every phantom and value as [NAME] */
static size_t redact(kr_insp *x, const char *p, size_t n, char *out, size_t cap) {
    char *cur = NULL;
    size_t cn = n;
    int i, pass;
    kr_secrets *s = x->secrets;
    for (i = 0; s && i < s->n; i++) {
        char tag[80];
        int tn = snprintf(tag, sizeof(tag), "[%s]", s->v[i].name);
        for (pass = 0; pass < 2; pass++) {
            const char *old = pass ? s->v[i].value : s->v[i].phantom;
            size_t on = pass ? s->v[i].vn : s->v[i].pn;
            char *next = NULL;
            long k;
            if (!memmem(cur ? cur : p, cn, old, on)) continue;
            k = swap_value(cur ? cur : p, cn, old, on, tag, (size_t)tn, &next, 0);
            if (k < 0) { if (cur) free(cur); cur = NULL; cn = 0; break; }
            if (cur) { explicit_bzero(cur, cn); free(cur); }
            cur = next;
            cn = (size_t)k;
        }
    }
    if (cn >= cap) cn = cap - 1;
    memcpy(out, cur ? cur : p, cn);
    out[cn] = 0;
    if (cur) { explicit_bzero(cur, cn); free(cur); }
    return cn;
}

/* the secrets a request carries (bits), in its target or a field (Basic decoded) */
static unsigned carried(kr_insp *x, const char *origin, size_t originn, const fields *fs) {
    unsigned found = 0;
    int i, j;
    kr_secrets *s = x->secrets;
    for (i = 0; s && i < s->n; i++) {
        const kr_secret *e = &s->v[i];
        if (memmem(origin, originn, e->phantom, e->pn)) { found |= 1u << i; continue; }
        for (j = 0; j < fs->n; j++) {
            const field *f = &fs->f[j];
            if (!name_is(f, "proxy-authorization") && value_has(f->value, f->valuen, e->phantom, e->pn)) {
                found |= 1u << i;
                break;
            }
        }
    }
    return found;
}

/* forward.request_refusal */
static void request_refusal(kr_insp *x, const char *reason, const char *method, const char *path,
                            const char *detail, const char *rule, int keep) {
    char where[4700], why[5000], text[10240], at[300];
    if (strchr(x->shown, ':')) snprintf(at, sizeof(at), "[%s]", x->shown); else snprintf(at, sizeof(at), "%s", x->shown);
    snprintf(where, sizeof(where), "%s:%d%s", at, x->port, path);
    if (!strcmp(reason, "request_denied")) snprintf(why, sizeof(why), "a deny rule matches it (%s)", rule ? rule : "None");
    else if (!strcmp(reason, "secret_leak"))
        snprintf(why, sizeof(why), "it carries the phantom of %s, which goes only to %s", detail, rule);
    else if (!strcmp(reason, "secret_plaintext"))
        snprintf(why, sizeof(why), "the phantom of %s is swapped for its value only over HTTPS; use https://", detail);
    else if (!strcmp(reason, "bad_path")) snprintf(why, sizeof(why), "%s; paths must be plain on hosts with request rules", detail);
    else {
        char at2[310];
        if (x->port == 80 || x->port == 443) snprintf(at2, sizeof(at2), "%s", at);
        else snprintf(at2, sizeof(at2), "%s:%d", at, x->port);
        snprintf(why, sizeof(why), "allow it with --allow '%s %s%s'", method, at2, path);
    }
    snprintf(text, sizeof(text), "kodarelay: %s %s refused (%s); %s", method, where, reason, why);
    reply_text(x, !strcmp(reason, "bad_path") ? 400 : 403, reason, text, keep ? "keep-alive" : "close");
    if (!keep) x->closing = 1;
}

/* what the rules say: NULL (allowed) or the reason; *rule / *detail set */
const char *kr_rules_judge(const kr_rules *r, const char *method, size_t mn, const char *path, size_t pn,
                           const char **rule, const char **detail) {
    int i, pass;
    size_t qn = pn;
    const char *q = memchr(path, '?', pn);
    *rule = NULL;
    *detail = NULL;
    if (!r || !r->judged) return NULL;
    if ((*detail = kr_bad_path(path, pn)) != NULL) return "bad_path";
    if (q) qn = (size_t)(q - path);
    for (pass = 1; pass >= 0; pass--) {          /* deny first, then allow */
        for (i = 0; i < r->n; i++) {
            const kr_rule *e = &r->v[i];
            if (e->deny != pass) continue;
            if (e->methods && !method_in(e, method, mn)) continue;
            if (e->path && !kr_glob(e->path, e->pathn, path, qn)) continue;
            *rule = e->text;
            return pass ? "request_denied" : NULL;
        }
    }
    return "request_not_allowed";
}

static const char *judge(kr_insp *x, const char *method, size_t mn, const char *path, size_t pn,
                         const char **rule, const char **detail) {
    return kr_rules_judge(x->rules, method, mn, path, pn, rule, detail);
}

/* a complete request head h[0..hn) at the front of c.ib: judged, then refused or forwarded.
 * 0 served (or refused), -1 error (x->err) */
/* (forwarding) parse_absolute_target for the requests the engine serves: ``http://`` then
 * host[:port] naming this machine's host and port; 1 with the origin-form tail in
 * tailbuf, 0 for anything else (Python serves it: another host, userinfo, v6, errors) */
static int absolute_target(kr_insp *x, const char *t, size_t n, char *tailbuf, size_t *tailn) {
    size_t i = 7, a, hn, k;
    int port = 80;
    const char *colon;
    if (n < 8 || strncasecmp(t, "http://", 7) != 0) return 0;
    while (i < n && t[i] != '/' && t[i] != '?' && t[i] != '#') i++;
    a = i - 7;
    if (a == 0 || a >= sizeof(x->authority) || memchr(t + 7, '@', a) || memchr(t + 7, '[', a) || memchr(t + 7, ']', a))
        return 0;
    colon = memchr(t + 7, ':', a);
    hn = colon ? (size_t)(colon - (t + 7)) : a;
    if (colon) {
        size_t pn = a - hn - 1;
        if (pn < 1 || pn > 5) return 0;
        port = 0;
        for (k = 0; k < pn; k++) {
            char c = colon[1 + k];
            if (c < '0' || c > '9') return 0;
            port = port * 10 + (c - '0');
        }
    }
    if (port != x->port || !host_names(t + 7, hn, x->host)) return 0;
    memcpy(x->authority, t + 7, a);
    x->authority[a] = 0;
    {   /* the tail: fragment dropped, "/" first */
        const char *hash = memchr(t + i, '#', n - i);
        size_t tn = (hash ? (size_t)(hash - t) : n) - i, o = 0;
        if (tn + 2 > MAX_HEAD) return 0;
        if (tn == 0 || t[i] != '/') tailbuf[o++] = '/';
        memcpy(tailbuf + o, t + i, tn);
        *tailn = o + tn;
    }
    return 1;
}

static int on_request_head(kr_insp *x, size_t hn) {
    const char *h = x->c.ib;
    const char *bad;
    fields *fs;
    size_t eol, s1 = 0, s2 = 0, i, spaces = 0, originn, shown_n;
    const char *origin;
    char method[MAX_HEAD], version[9];
    int64_t len = 0;
    int kind, keep, r = 0;
    const char *why = NULL, *reason, *rule, *detail;
    char path_buf[MAX_HEAD];
    x->method[0] = 0;                            /* (until this head's method is known) */
    fs = fail_now() ? NULL : malloc(sizeof(*fs));
    if (!fs) { x->err = ENOMEM; return -1; }
    if ((bad = check_line_ends(h, hn)) != NULL) goto bad_head;
    eol = (size_t)((const char *)memmem(h, hn, "\r\n", 2) - h);
    for (i = 0; i < eol; i++) {
        if (h[i] == ' ') { spaces++; if (!s1) s1 = i; else if (!s2) s2 = i; }
    }
    if (spaces != 2) { bad = "malformed request line"; goto bad_head; }
    if (s1 == 0) { bad = "malformed method"; goto bad_head; }
    for (i = 0; i < s1; i++) if (!tchar((unsigned char)h[i])) { bad = "malformed method"; goto bad_head; }
    if (s2 == s1 + 1) { bad = "malformed request target"; goto bad_head; }
    for (i = s1 + 1; i < s2; i++)
        if ((unsigned char)h[i] <= 0x20 || (unsigned char)h[i] >= 0x7F) { bad = "malformed request target"; goto bad_head; }
    if (eol - s2 - 1 != 8 || memcmp(h + s2 + 1, "HTTP/", 5) != 0 || h[s2 + 6] < '0' || h[s2 + 6] > '9'
        || h[s2 + 7] != '.' || h[s2 + 8] < '0' || h[s2 + 8] > '9') { bad = "malformed HTTP version"; goto bad_head; }
    if ((bad = parse_fields(h, hn, eol + 2, fs)) != NULL) goto bad_head;
    memcpy(method, h, s1); method[s1] = 0;
    memcpy(version, h + s2 + 1, 8); version[8] = 0;
    snprintf(x->method, sizeof(x->method), "%s", method);
    origin = h + s1 + 1;
    originn = s2 - s1 - 1;
    if (x->fwd) {
        /* forwarding: an absolute-form request to this machine's host and port, naming no
         * proxy user, or Python serves it (from this request on) */
        static __thread char tail[MAX_HEAD];
        size_t tn = 0;
        if (!strcmp(method, "CONNECT") || count_fields(fs, "proxy-authorization") > 0
            || !absolute_target(x, origin, originn, tail, &tn)) {
            x->handback = 1;
            goto done;
        }
        origin = tail;
        originn = tn;
        goto judged;
    }
    /* _captured_target: origin-form to this host only (absolute form: a 400 here) */
    if (origin[0] != '/') {
        rec(x, "bad_request", NULL, 1, NULL, 0, NULL);
        refuse(x, 400, "a captured connection takes origin-form requests to its own host", method, 1, NULL);
        goto done;
    }
    for (i = 0; i < (size_t)fs->n; i++) {
        const field *f = &fs->f[i];
        if (name_is(f, "host") && !host_names(f->value, f->valuen, x->host)) {
            char named[1300], detail_s[1400], text[3000];
            int nobody;
            int64_t l2 = 0;
            const char *w2;
            printable(named, sizeof(named), f->value, f->valuen);
            snprintf(detail_s, sizeof(detail_s), "Host names %s", named);
            rec(x, "host_mismatch", NULL, 1, NULL, 0, detail_s);
            kind = framing_of(fs, &l2, &w2);
            nobody = kind == 0 || (kind == 1 && l2 == 0);
            keep = nobody && strcmp(version, "HTTP/1.0") != 0 && !has_token(fs, "connection", "close");
            snprintf(text, sizeof(text), "kodarelay: %s refused (host_mismatch): this connection was made to %s, "
                     "its Host names %s", method, x->shown, named);
            reply_text(x, 421, "host_mismatch", text, keep ? "keep-alive" : "close");
            if (!keep) x->closing = 1;
            consume(&x->c, hn);
            goto done;
        }
    }
judged:
    {   /* the fragment is never sent on */
        const char *hash = memchr(origin, '#', originn);
        if (hash) originn = (size_t)(hash - origin);
    }
    kind = framing_of(fs, &len, &why);
    if (kind >= 0 && count_fields(fs, "host") > 1) { kind = -1; why = "more than one Host"; }
    if (kind >= 0) {
        const char *named = connection_names_framing(fs);
        if (named) {
            snprintf(path_buf, sizeof(path_buf), "Connection names %s, which is not hop-by-hop", named);
            why = path_buf;
            kind = -1;
        }
    }
    if (kind < 0) {
        rec(x, "bad_request", NULL, 1, NULL, 0, NULL);
        refuse(x, 400, why, method, 1, NULL);
        goto done;
    }
    x->upgrade = has_token(fs, "upgrade", "websocket") && has_token(fs, "connection", "upgrade");
    shown_n = originn;
    {
        const char *q = memchr(origin, '?', originn);
        if (q) shown_n = (size_t)(q - origin);
    }
    reason = judge(x, method, s1, origin, originn, &rule, &detail);
    x->swap = 0;
    if (!reason && x->secrets) {
        /* SecretSet.check: a phantom to a host not its own is a leak, over plain HTTP it is
         * never swapped; else the request goes on with the values in */
        unsigned found = carried(x, origin, originn, fs);
        int i;
        for (i = 0; found && i < x->secrets->n; i++) {
            if (!(found & (1u << i))) continue;
            if (!x->secrets->v[i].covers || !x->tls) {
                static __thread char secret_detail[96];
                snprintf(secret_detail, sizeof(secret_detail), "secret %s", x->secrets->v[i].name);
                reason = x->secrets->v[i].covers ? "secret_plaintext" : "secret_leak";
                detail = secret_detail;
                rule = x->secrets->v[i].hosts;
                break;
            }
        }
        if (!reason) x->swap = found;
    }
    if (reason) {
        char shown_path[MAX_HEAD];
        size_t pn = redact(x, origin, shown_n, shown_path, sizeof(shown_path));
        rec(x, reason, method, 1, shown_path, pn, detail);
        keep = (kind == 0 || (kind == 1 && len == 0)) && strcmp(version, "HTTP/1.0") != 0
               && !has_token(fs, "connection", "close");
        request_refusal(x, reason, method, shown_path, detail, rule, keep);
        consume(&x->c, hn);
        goto done;
    }
    if (x->ohs_failed) {
        char what[600];
        snprintf(what, sizeof(what), "TLS to %s:%d failed: %s", x->shown, x->port, x->ohs_err);
        rec(x, "upstream_tls", NULL, 1, NULL, 0, what);
        refuse(x, 502, what, method, 1, "upstream_tls");
        goto done;
    }
    x->client_close = !strcmp(version, "HTTP/1.0") || has_token(fs, "connection", "close");
    x->head_req = !strcmp(method, "HEAD");
    if (send_request(x, method, origin, originn, version, fs) < 0) { r = -1; goto done; }
    consume(&x->c, hn);
    start_body(&x->rqb, kind, len);
    x->rq = x->rqb.done ? RQ_WAIT : RQ_BODY;
    x->rs = RS_HEAD;
    x->sent_any = 0;
    goto done;
bad_head:
    rec(x, "bad_request", NULL, 0, NULL, 0, NULL);
    refuse(x, 400, bad, "", 0, NULL);
done:
    free(fs);
    return r;
}

/* the response head at the front of o.ib (parse_response_head, then _respond's choices) */
static int on_response_head(kr_insp *x, size_t hn) {
    const char *h = x->o.ib;
    fields *fs = fail_now() ? NULL : malloc(sizeof(*fs));
    const char *bad = NULL;
    size_t eol, i;
    int status, kind = 0, upload_done, close;
    int64_t len = 0;
    char *ob = NULL;
    size_t on = 0, ocap = 0;
    int fail = 0;
    if (!fs) { x->err = ENOMEM; return -1; }
    if ((bad = check_line_ends(h, hn)) != NULL) goto bad;
    eol = (size_t)((const char *)memmem(h, hn, "\r\n", 2) - h);
    if (eol < 12 || memcmp(h, "HTTP/", 5) != 0 || h[5] < '0' || h[5] > '9' || h[6] != '.' || h[7] < '0' || h[7] > '9'
        || h[8] != ' ') goto bad;
    for (i = 9; i < 12; i++) if (h[i] < '0' || h[i] > '9') goto bad;
    if (eol > 12 && h[12] != ' ') goto bad;
    for (i = 12; i < eol; i++) if (value_bad((unsigned char)h[i])) goto bad;
    if (parse_fields(h, hn, eol + 2, fs) != NULL) goto bad;
    status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
    for (i = 0; i < (size_t)fs->n; i++) {
        /* NTLM / Negotiate bind a login to the TCP connection: such a connection is never
         * handed to another tunnel */
        const field *f = &fs->f[i];
        if (name_is(f, "www-authenticate") && ((f->valuen >= 4 && !strncasecmp(f->value, "NTLM", 4))
                                               || (f->valuen >= 9 && !strncasecmp(f->value, "Negotiate", 9))))
            x->nopool = 1;
    }
    if (status == 101 && !x->upgrade) goto bad;
    if (status >= 100 && status < 200 && status != 101) {
        /* an interim response: forwarded as it is rebuilt, then the next head */
        APP(h, eol + 2);
        for (i = 0; i < (size_t)fs->n; i++) {
            const field *f = &fs->f[i];
            if (dropped(fs, f, 0)) continue;
            APP(f->name, f->namen); APP(": ", 2); put_value(x, 0, f, &ob, &on, &ocap, &fail); APP("\r\n", 2);
        }
        APP("\r\n", 2);
        goto emit_interim;
    }
    if (status != 101 && connection_names_framing(fs)) goto bad;
    if (status == 101) kind = 0;
    else if (x->head_req || status == 204 || status == 304) kind = 0;
    else if (count_fields(fs, "transfer-encoding")) {
        struct te_arg a = { 0, 0, 0 };
        each_token(fs, "transfer-encoding", tok_te, &a);
        kind = a.n > 0 && a.last_chunked ? 2 : 3;
    } else if (count_fields(fs, "content-length")) {
        len = content_length(fs);
        if (len < 0) goto bad;
        kind = 1;
    } else kind = 3;
    upload_done = x->rqb.done;
    x->reusable = kind != 3 && !(h[5] == '1' && h[7] == '0') && !has_token(fs, "connection", "close");
    close = x->client_close || kind == 3 || (!x->fwd && !x->reusable);
    APP(h, eol + 2);
    for (i = 0; i < (size_t)fs->n; i++) {
        const field *f = &fs->f[i];
        if (dropped(fs, f, status == 101)) continue;
        if (status != 101 && count_fields(fs, "transfer-encoding") && name_is(f, "content-length")) continue;
        APP(f->name, f->namen); APP(": ", 2); put_value(x, 0, f, &ob, &on, &ocap, &fail); APP("\r\n", 2);
    }
    if (status == 101) APPS("Connection: Upgrade\r\n");
    else if (close || !upload_done) APPS("Connection: close\r\n");
    APP("\r\n", 2);
    if (fail || out_put(x, &x->c, ob, on) < 0) { free(ob); free(fs); x->err = ENOMEM; return -1; }
    free(ob);
    free(fs);
    consume(&x->o, hn);
    x->sent_any = 1;
    if (status == 101) { x->phase = P_TUNNEL; x->rq = RQ_STOP; x->rs = RS_NONE; return 0; }
    if (close || !upload_done) x->close_after = 1;
    start_body(&x->rsb, kind, len);
    x->rs = RS_BODY;
    return 0;
emit_interim:
    if (fail || out_put(x, &x->c, ob, on) < 0) { free(ob); free(fs); x->err = ENOMEM; return -1; }
    free(ob);
    free(fs);
    consume(&x->o, hn);
    x->sent_any = 1;
    return 0;
bad:
    free(ob);
    free(fs);
    if (!x->sent_any) refuse(x, 502, "the upstream answered with malformed HTTP", x->method, 1, NULL);
    x->closing = 1;
    x->rs = RS_NONE;
    x->rq = RQ_STOP;
    return 0;
}

/* ── bodies: move framed bytes from src.ib to dst.ob ─────────────────────────── */

static const char *NOT_IN_TRAILERS[] = {
    "content-length", "transfer-encoding", "host", "connection", "keep-alive", "te", "trailer", "upgrade",
    "proxy-connection", "proxy-authorization", "proxy-authenticate", "authorization", "www-authenticate",
    "set-cookie", "cookie", "content-encoding", "content-type", "content-range", "expect", "max-forwards",
    "cache-control", "age", "expires", "date", "location", "retry-after", "vary", "warning", NULL };

/* 1 progress, 0 needs input or output room, -1 malformed (f->bad), -2 error */
static int body_step(kr_insp *x, framer *f, side *src, side *dst) {
    size_t room, n;
    if (f->done) return 0;
    if (out_pending(dst) >= HIGH_WATER) return 0;
    room = HIGH_WATER - out_pending(dst);
    switch (f->mode) {
    case F_LEN:
    case F_EOF:
        n = src->il;
        if (f->mode == F_LEN && n > f->left) n = (size_t)f->left;
        if (n > room) n = room;
        if (n == 0) {
            if (f->mode == F_EOF && src->eof) { f->done = 1; return 1; }
            return 0;
        }
        if (out_put(x, dst, src->ib, n) < 0) return -2;
        consume(src, n);
        if (f->mode == F_LEN) { f->left -= n; if (f->left == 0) f->done = 1; }
        return 1;
    case F_CHUNKED:
        if (f->cst == CS_DATA) {
            n = src->il;
            if (n > f->left) n = (size_t)f->left;
            if (n > room) n = room;
            if (n == 0) return 0;
            if (out_put(x, dst, src->ib, n) < 0) return -2;
            consume(src, n);
            f->left -= n;
            if (f->left == 0) f->cst = CS_CRLF;
            return 1;
        }
        {
            size_t lim = src->il < MAX_LINE ? src->il : MAX_LINE;
            const char *e = memmem(src->ib, lim, "\r\n", 2);
            size_t ln, i;
            if (!e) {
                if (src->il >= MAX_LINE) { f->bad = "line too long in chunked body"; f->badreq = 0; return -1; }
                return 0;
            }
            ln = (size_t)(e - src->ib);          /* without CRLF */
            if (f->cst == CS_CRLF) {
                if (ln != 0) { f->bad = "chunk data not followed by CRLF"; f->badreq = 1; return -1; }
                if (out_put(x, dst, "\r\n", 2) < 0) return -2;
                consume(src, 2);
                f->cst = CS_SIZE;
                return 1;
            }
            if (f->cst == CS_SIZE) {
                const char *semi = memchr(src->ib, ';', ln);
                size_t sn = semi ? (size_t)(semi - src->ib) : ln;
                uint64_t v = 0;
                if (sn == 0 || sn > 16) { f->bad = "malformed chunk size"; f->badreq = 1; return -1; }
                for (i = 0; i < sn; i++) {
                    char c = src->ib[i];
                    int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                          : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
                    if (d < 0) { f->bad = "malformed chunk size"; f->badreq = 1; return -1; }
                    v = v * 16 + (uint64_t)d;
                }
                for (i = 0; i < ln; i++) {
                    if (value_bad((unsigned char)src->ib[i])) { f->bad = "control byte in chunk extension"; f->badreq = 1; return -1; }
                }
                if (out_put(x, dst, src->ib, ln + 2) < 0) return -2;
                consume(src, ln + 2);
                if (v == 0) { f->cst = CS_TRAILER; f->ntrailers = 0; }
                else { f->cst = CS_DATA; f->left = v; }
                return 1;
            }
            /* a trailer line */
            if (ln == 0) {
                if (out_put(x, dst, "\r\n", 2) < 0) return -2;
                consume(src, 2);
                f->done = 1;
                return 1;
            }
            if (++f->ntrailers > MAX_TRAILERS) { f->bad = "too many trailer fields"; f->badreq = 1; return -1; }
            if (memchr(src->ib, '\n', ln) || memchr(src->ib, '\r', ln) || src->ib[0] == ' ' || src->ib[0] == '\t') {
                f->bad = "malformed trailer (obs-fold or bare CR / LF)"; f->badreq = 1; return -1;
            }
            {
                const char *colon = memchr(src->ib, ':', ln);
                size_t nn, vs, ve;
                int k, keep = 1;
                if (!colon || colon == src->ib) { f->bad = "malformed trailer field"; f->badreq = 1; return -1; }
                nn = (size_t)(colon - src->ib);
                for (i = 0; i < nn; i++) if (!tchar((unsigned char)src->ib[i])) { f->bad = "malformed trailer field"; f->badreq = 1; return -1; }
                vs = nn + 1; ve = ln;
                for (i = vs; i < ve; i++) if (value_bad((unsigned char)src->ib[i])) { f->bad = "control byte in a trailer field"; f->badreq = 1; return -1; }
                while (vs < ve && (src->ib[vs] == ' ' || src->ib[vs] == '\t')) vs++;
                while (ve > vs && (src->ib[ve - 1] == ' ' || src->ib[ve - 1] == '\t')) ve--;
                for (k = 0; NOT_IN_TRAILERS[k]; k++) {
                    if (strlen(NOT_IN_TRAILERS[k]) == nn && strncasecmp(src->ib, NOT_IN_TRAILERS[k], nn) == 0) { keep = 0; break; }
                }
                if (keep) {
                    if (out_put(x, dst, src->ib, nn) < 0 || out_put(x, dst, ": ", 2) < 0
                        || out_put(x, dst, src->ib + vs, ve - vs) < 0 || out_put(x, dst, "\r\n", 2) < 0) return -2;
                }
                consume(src, ln + 2);
                return 1;
            }
        }
    default:
        return 0;
    }
}

/* ── creation, the run loop ───────────────────────────────────────────────── */

kr_insp *kr_insp_new(int cfd, int ofd, kr_ctx *sctx, kr_ctx *cctx, kr_rules *rules, const char *host,
                     int port, const char *early, size_t earlyn) {
    kr_insp *x = fail_now() ? NULL : calloc(1, sizeof(*x));
    if (!x) return NULL;
    x->c.fd = cfd;
    x->o.fd = ofd;
    x->c.hs = x->o.hs = 1;
    x->c.ib = malloc(IN_CAP);
    x->o.ib = malloc(IN_CAP);
    if (!x->c.ib || !x->o.ib) { kr_insp_free(x); return NULL; }
    if (earlyn) {
        x->c.pre = malloc(earlyn);
        if (!x->c.pre) { kr_insp_free(x); return NULL; }
        memcpy(x->c.pre, early, earlyn);
        x->c.pren = earlyn;
    }
    if (sctx) kr_ctx_ref(sctx);
    if (cctx) kr_ctx_ref(cctx);
    if (rules) kr_rules_ref(rules);
    x->sctx = sctx;
    x->cctx = cctx;
    x->rules = rules;
    snprintf(x->host, sizeof(x->host), "%s", host);
    if (strchr(host, ':')) snprintf(x->shown, sizeof(x->shown), "[%s]", host);
    else snprintf(x->shown, sizeof(x->shown), "%s", host);
    x->port = port;
    x->phase = P_FIRST;
    x->rtail = &x->recs;
    return x;
}

void kr_insp_free(kr_insp *x) {
    kr_rec *r;
    if (!x) return;
#ifdef KR_HAVE_TLS
    if (x->c.ssl) SSL_free(x->c.ssl);
    if (x->o.ssl) SSL_free(x->o.ssl);
#endif
    free(x->c.pre); free(x->o.pre);
    free(x->c.ib); free(x->o.ib);
    free(x->c.ob); free(x->o.ob);
    kr_ctx_unref(x->sctx);
    kr_ctx_unref(x->cctx);
    kr_rules_unref(x->rules);
    kr_secrets_unref(x->secrets);
    while ((r = x->recs) != NULL) { x->recs = r->next; kr_rec_free(r); }
    free(x);
}

void kr_insp_set_secrets(kr_insp *x, kr_secrets *s) {
    if (s) kr_secrets_ref(s);
    kr_secrets_unref(x->secrets);
    x->secrets = s;
}

kr_rec *kr_insp_take(kr_insp *x) {
    kr_rec *r = x->recs;
    x->recs = NULL;
    x->rtail = &x->recs;
    return r;
}

int kr_insp_errno(const kr_insp *x) { return x->err; }
uint64_t kr_insp_up(const kr_insp *x) { return x->o.wrote; }
uint64_t kr_insp_down(const kr_insp *x) { return x->c.wrote; }
int kr_insp_handshaking(const kr_insp *x) { return x->phase == P_FIRST || x->phase == P_HS; }

/* inspection.first_bytes: 1 tls, 2 http, 3 other, 0 need more */
static int first_bytes(const char *b, size_t n) {
    size_t i;
    if (n == 0) return 0;
    if ((unsigned char)b[0] == 0x16) return 1;
    for (i = 0; i < n && i <= 20; i++) {
        if (b[i] == ' ') break;
        if (!tchar((unsigned char)b[i])) return 3;
    }
    if (i == 0) return 3;
    if (i >= n || b[i] != ' ') return n <= 20 ? 0 : 3;
    return (i == 3 && memcmp(b, "PRI", 3) == 0) ? 3 : 2;
}

#ifdef KR_HAVE_TLS
/* advance a handshake: 1 done now, 0 waiting, -1 failed */
static int handshake(kr_insp *x, side *s, int origin) {
    int r, e;
    if ((s->hs_want == SSL_ERROR_WANT_READ && s->rblocked) || (s->hs_want == SSL_ERROR_WANT_WRITE && s->wblocked))
        return 0;                                /* nothing new since it last had to wait */
    ERR_clear_error();
    r = SSL_do_handshake(s->ssl);
    if (r == 1) { s->hs = 1; s->hs_want = 0; return 1; }
    switch ((e = SSL_get_error(s->ssl, r))) {
    case SSL_ERROR_WANT_READ: case SSL_ERROR_WANT_WRITE: s->hs_want = e; return 0;
    default:
        if (origin) {
            long v = SSL_get_verify_result(s->ssl);
            if (v == X509_V_ERR_HOSTNAME_MISMATCH)
                snprintf(x->ohs_err, sizeof(x->ohs_err), "Hostname mismatch, certificate is not valid for '%s'.", x->host);
            else if (v == X509_V_ERR_IP_ADDRESS_MISMATCH)
                snprintf(x->ohs_err, sizeof(x->ohs_err), "IP address mismatch, certificate is not valid for '%s'.", x->host);
            else if (v != X509_V_OK) snprintf(x->ohs_err, sizeof(x->ohs_err), "%s", X509_verify_cert_error_string(v));
            else {
                unsigned long e = ERR_peek_error();
                const char *why = e ? ERR_reason_error_string(e) : NULL;
                snprintf(x->ohs_err, sizeof(x->ohs_err), "%s", why ? why : s->eof ? "the origin closed the connection"
                         : "handshake failed");
            }
        }
        ERR_clear_error();
        return -1;
    }
}
#endif

static int finish_ok(kr_insp *x) {
#ifdef KR_HAVE_TLS
    if (x->c.ssl && x->c.hs && !x->c.shut) {
        x->c.shut = 1;
        ERR_clear_error();
        SSL_shutdown(x->c.ssl);          /* close_notify, best effort */
        ERR_clear_error();
    }
#endif
    return KR_I_DONE;
}

int kr_insp_run(kr_insp *x) {
    int rounds, progress, r;
    for (rounds = 0; rounds < BUDGET; rounds++) {
        progress = 0;
        if (x->err) return KR_I_ERROR;
        /* outputs first: they free room for the bodies */
        if ((r = side_flush(x, &x->c)) < 0) return KR_I_ERROR;
        progress |= r;
        if (x->o.hs || !x->o.ssl) {
            if ((r = side_flush(x, &x->o)) < 0) {
                if (x->phase == P_HTTP && !x->sent_any && x->rs == RS_HEAD) {
                    x->err = 0;
                    refuse(x, 502, "the upstream connection failed", x->method, 1, NULL);
                    x->rs = RS_NONE; x->rq = RQ_STOP;
                    continue;
                }
                return KR_I_ERROR;
            }
            progress |= r;
        }
        if (x->handback) {
            if (out_pending(&x->c) == 0) return KR_I_HANDBACK;
            if (x->c.wblocked) return KR_I_AGAIN;
            continue;
        }
        if (x->closing) {
            if (out_pending(&x->c) == 0) return finish_ok(x);
            if (x->c.wblocked) return KR_I_AGAIN;
            continue;
        }
        switch (x->phase) {
        case P_FIRST: {
            int k = first_bytes(x->c.pre ? x->c.pre + x->c.preoff : "", x->c.pren - x->c.preoff);
            if (k == 0) {
                char buf[64];
                ssize_t n;
                do { n = recv(x->c.fd, buf, sizeof(buf), 0); } while (n < 0 && errno == EINTR);
                if (n == 0) return KR_I_DONE;
                if (n < 0) { if (errno == EAGAIN) return KR_I_AGAIN; x->err = errno; return KR_I_ERROR; }
                {
                    size_t have = x->c.pren - x->c.preoff;
                    char *np = malloc(have + (size_t)n);
                    if (!np) { x->err = ENOMEM; return KR_I_ERROR; }
                    if (have) memcpy(np, x->c.pre + x->c.preoff, have);
                    memcpy(np + have, buf, (size_t)n);
                    free(x->c.pre);
                    x->c.pre = np; x->c.preoff = 0; x->c.pren = have + (size_t)n;
                }
                progress = 1;
                break;
            }
            if (k == 3) {
                rec(x, "not_http", NULL, 1, NULL, 0, "the tunnel carries neither TLS nor HTTP/1");
                return KR_I_DONE;
            }
            if (k == 2) {                    /* plain HTTP inside the tunnel */
                size_t have = x->c.pren - x->c.preoff;
                memcpy(x->c.ib, x->c.pre + x->c.preoff, have);
                x->c.il = have;
                free(x->c.pre); x->c.pre = NULL; x->c.pren = x->c.preoff = 0;
                x->phase = P_HTTP;
                x->rq = RQ_HEAD;
                progress = 1;
                break;
            }
#ifdef KR_HAVE_TLS
            snprintf(x->skey, sizeof(x->skey), "%s %d", x->host, x->port);
            if (!x->sctx || !x->cctx || side_tls(&x->c, x->sctx, 1, "", NULL) < 0) {
                x->err = ENOMEM;
                return KR_I_ERROR;
            }
            {   /* an idle connection to this origin from an earlier tunnel: this tunnel's (the
                 * one dialled for it is closed by the engine, kr_insp_origin_fd) */
                SSL *ps = NULL;
                int pfd = pool_take(x->cctx, x->skey, &ps);
                if (pfd >= 0) {
                    x->o.fd = pfd;
                    x->o.ssl = ps;
                    x->o.hs = 1;
                    BIO_set_data(SSL_get_rbio(ps), &x->o);
                } else if (side_tls(&x->o, x->cctx, 0, x->host, x->skey) < 0) {
                    x->err = ENOMEM;
                    return KR_I_ERROR;
                }
            }
            x->tls = 1;
            x->phase = P_HS;
            progress = 1;
            break;
#else
            return KR_I_DONE;
#endif
        }
#ifdef KR_HAVE_TLS
        case P_HS:
            if (!x->o.hs && !x->ohs_failed) {
                r = handshake(x, &x->o, 1);
                if (r < 0) x->ohs_failed = 1;
                if (r != 0) progress = 1;
            }
            r = handshake(x, &x->c, 0);
            if (r < 0) return KR_I_DONE;     /* the client refused the leaf (does it trust the CA?) */
            if (r > 0) { x->phase = P_HTTP; x->rq = RQ_HEAD; progress = 1; }
            break;
#endif
        case P_HTTP:
#ifdef KR_HAVE_TLS
            if (x->o.ssl && !x->o.hs && !x->ohs_failed) {
                r = handshake(x, &x->o, 1);
                if (r < 0) x->ohs_failed = 1;
                if (r != 0) progress = 1;
            }
#endif
            /* the request side */
            if (x->rq == RQ_HEAD) {
                const char *e = x->c.il >= 4 ? memmem(x->c.ib, x->c.il < MAX_HEAD ? x->c.il : MAX_HEAD, "\r\n\r\n", 4) : NULL;
                if (e) {
                    size_t hn = (size_t)(e - x->c.ib) + 4;
                    if (x->o.ssl && !x->o.hs && !x->ohs_failed) break;
                    if (on_request_head(x, hn) < 0) return KR_I_ERROR;
                    progress = 1;
                } else if (x->c.il >= MAX_HEAD) {
                    rec(x, "bad_request", NULL, 0, NULL, 0, NULL);
                    refuse(x, 431, "request head too large", "", 0, NULL);
                    progress = 1;
                } else {
                    r = side_fill(x, &x->c);
                    if (r == -2) return KR_I_ERROR;
                    if (r == -1) { x->closing = 1; progress = 1; }
                    else if (r > 0) progress = 1;
                }
            } else if (x->rq == RQ_BODY) {
                r = body_step(x, &x->rqb, &x->c, &x->o);
                if (r == -2) return KR_I_ERROR;
                if (r == -1) {
                    if (x->rqb.badreq && !x->sent_any) {
                        rec(x, "bad_request", NULL, 1, NULL, 0, NULL);
                        refuse(x, 400, x->rqb.bad, x->method, 1, NULL);
                    } else x->closing = 1;
                    x->rq = RQ_STOP;
                    progress = 1;
                } else if (r > 0) {
                    progress = 1;
                    if (x->rqb.done) x->rq = RQ_WAIT;
                } else if (out_pending(&x->o) < HIGH_WATER) {
                    r = side_fill(x, &x->c);
                    if (r == -2) return KR_I_ERROR;
                    if (r == -1) { x->closing = 1; x->rq = RQ_STOP; progress = 1; }   /* the body never came */
                    else if (r > 0) progress = 1;
                }
            }
            /* the response side */
            if (x->rs == RS_HEAD && !x->closing) {
                const char *e = x->o.il >= 4 ? memmem(x->o.ib, x->o.il < MAX_RESPONSE_HEAD ? x->o.il : MAX_RESPONSE_HEAD,
                                                      "\r\n\r\n", 4) : NULL;
                if (e) {
                    if (on_response_head(x, (size_t)(e - x->o.ib) + 4) < 0) return KR_I_ERROR;
                    progress = 1;
                } else if (x->o.il >= MAX_RESPONSE_HEAD) {
                    if (!x->sent_any) refuse(x, 502, "the upstream answered with malformed HTTP", x->method, 1, NULL);
                    x->closing = 1;
                    progress = 1;
                } else {
                    r = side_fill(x, &x->o);
                    if (r == -2 || r == -1) {
                        if (r == -2) x->err = 0;
                        if (!x->sent_any) refuse(x, 502, "the upstream closed the connection", x->method, 1, NULL);
                        x->closing = 1;
                        progress = 1;
                    } else if (r > 0) progress = 1;
                }
            } else if (x->rs == RS_BODY && !x->closing) {
                r = body_step(x, &x->rsb, &x->o, &x->c);
                if (r == -2) return KR_I_ERROR;
                if (r == -1) { x->closing = 1; progress = 1; }
                else if (r > 0) progress = 1;
                else if (!x->rsb.done && out_pending(&x->c) < HIGH_WATER) {
                    r = side_fill(x, &x->o);
                    if (r == -2) return KR_I_ERROR;
                    if (r == -1 && x->rsb.mode != F_EOF) { x->closing = 1; progress = 1; }
                    else if (r != 0) progress = 1;
                }
                if (x->rsb.done) {
                    /* the exchange is over */
                    x->rs = RS_NONE;
                    x->exchanges++;
                    if (x->close_after || x->rq != RQ_WAIT) { x->closing = 1; }
                    else if (x->fwd && (!x->reusable || x->o.il > 0)) { x->handback = 1; }   /* Python dials again */
                    else if (x->o.il > 0) { x->closing = 1; }
                    else { x->rq = RQ_HEAD; }
                    progress = 1;
                }
            }
            break;
        case P_TUNNEL: {
            int k;
            for (k = 0; k < 2; k++) {
                side *src = k ? &x->o : &x->c, *dst = k ? &x->c : &x->o;
                if (src->il && out_pending(dst) < HIGH_WATER) {
                    size_t n = src->il;
                    if (out_put(x, dst, src->ib, n) < 0) return KR_I_ERROR;
                    consume(src, n);
                    progress = 1;
                }
                if (src->eof) { x->closing = 1; progress = 1; continue; }
                if (out_pending(dst) < HIGH_WATER) {
                    r = side_fill(x, src);
                    if (r == -2) return KR_I_ERROR;
                    if (r != 0) progress = 1;
                }
            }
            break;
        }
        }
        if (!progress) return KR_I_AGAIN;
    }
    return KR_I_MORE;
}

int kr_insp_origin_fd(const kr_insp *x) { return x->o.fd; }

int kr_insp_donate(kr_insp *x) {
#ifdef KR_HAVE_TLS
    side *o = &x->o;
    if (!x->tls || !x->cctx || !o->ssl || !o->hs || x->ohs_failed || x->phase != P_HTTP || x->rs != RS_NONE
        || x->rq == RQ_BODY || x->err || o->err || o->eof || o->il || out_pending(o) || SSL_has_pending(o->ssl)
        || (x->exchanges && !x->reusable) || x->nopool)
        return 0;
    BIO_set_data(SSL_get_rbio(o->ssl), NULL);
    pool_put(x->cctx, x->skey, o->fd, o->ssl);
    o->ssl = NULL;
    o->fd = -1;
    return 1;
#else
    (void)x;
    return 0;
#endif
}

void kr_insp_event(kr_insp *x, int side_, uint32_t ev) {
    side *s = side_ ? &x->o : &x->c;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->rblocked = 0;
    if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->wblocked = 0;
}

int kr_insp_set_forward(kr_insp *x) {
    size_t have = x->c.pren - x->c.preoff;
    x->fwd = 1;
    x->phase = P_HTTP;
    x->rq = RQ_HEAD;
    if (have > IN_CAP) { x->handback = 1; return 0; }
    if (have) memcpy(x->c.ib, x->c.pre + x->c.preoff, have);
    x->c.il = have;
    free(x->c.pre);
    x->c.pre = NULL;
    x->c.pren = x->c.preoff = 0;
    return 0;
}

size_t kr_insp_leftover(const kr_insp *x, const char **p) {
    *p = x->c.ib;
    return x->c.il;
}

int kr_insp_reply(kr_insp *x, const char *p, size_t n) {
    return out_put(x, &x->c, p, n);
}

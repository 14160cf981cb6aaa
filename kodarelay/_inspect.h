/* The engine's inspected tunnel (kodarelay/_inspect.c): TLS on both sides through OpenSSL's
 * C API and HTTP/1 request by request, on an engine worker, without the GIL.
 *
 * kodarelay.forward / kodarelay.inspection (asyncio + ssl) are the readable specification;
 * tests/test_inspect_engine.py holds the two to the same decisions and the same bytes. */
#ifndef KODARELAY_INSPECT_H
#define KODARELAY_INSPECT_H

#include <stddef.h>
#include <stdint.h>

/* whether this build has the TLS engine (OpenSSL headers were found at build time) */
int kr_tls_available(void);
/* the OpenSSL this module runs with, e.g. "OpenSSL 3.0.20 7 Apr 2026" */
const char *kr_tls_version(void);

typedef struct kr_ctx kr_ctx;          /* an SSL_CTX and its role, reference counted */

/* a server context presenting the PEM chain (leaf, then CA) and key in pem; ALPN http/1.1 only */
kr_ctx *kr_server_ctx(const char *pem, size_t n, char *err, size_t errn);
/* a client context verifying origins against cafile (NULL: the system's store); ALPN http/1.1 */
kr_ctx *kr_client_ctx(const char *cafile, char *err, size_t errn);
void kr_ctx_ref(kr_ctx *c);
void kr_ctx_unref(kr_ctx *c);

/* A host's request rules, compiled (immutable once built, reference counted). */
typedef struct kr_rules kr_rules;
kr_rules *kr_rules_new(int judged);
/* methods: NUL-separated upper-case names ending in an empty one, NULL for any; path: a
 * pattern where '*' matches any run, NULL for any; 0 or -1 (ENOMEM) */
int kr_rules_add(kr_rules *r, int deny, const char *methods, size_t methodsn, const char *path,
                 const char *text);
void kr_rules_ref(kr_rules *r);
void kr_rules_unref(kr_rules *r);
/* what the rules say of one request (Filter.explain_request for its host): NULL (allowed)
 * or the reason (request_denied with *rule, bad_path with *detail, request_not_allowed) */
const char *kr_rules_judge(const kr_rules *r, const char *method, size_t mn, const char *path, size_t pn,
                           const char **rule, const char **detail);
/* (exposed for the tests) 1 when the pattern matches the path (query excluded by the caller) */
int kr_glob(const char *pat, size_t pn, const char *s, size_t n);
/* why a path is not plain (requestrules.bad_path), or NULL */
const char *kr_bad_path(const char *p, size_t n);

/* The secrets of a server as one tunnel sees them (kodarelay.secrets): name, phantom, value,
 * the hosts they go to (as a refusal names them) and whether this tunnel's host is one. */
typedef struct kr_secrets kr_secrets;
kr_secrets *kr_secrets_new(void);
/* 0, or -1 (out of memory, an empty phantom or value, more than 32) */
int kr_secrets_add(kr_secrets *s, const char *name, const char *phantom, size_t pn, const char *value, size_t vn,
                   const char *hosts, int covers);
void kr_secrets_ref(kr_secrets *s);
void kr_secrets_unref(kr_secrets *s);

/* One violation for Python, queued by the machine, taken with kr_insp_take. */
typedef struct kr_rec {
    struct kr_rec *next;
    char reason[32];
    char method[33];
    int has_host;          /* 0: recorded without host and port (a head that did not parse) */
    char *path;            /* NULL: none; malloc'd */
    char *detail;          /* NULL: none; malloc'd */
} kr_rec;
void kr_rec_free(kr_rec *r);

typedef struct kr_insp kr_insp;

enum { KR_I_AGAIN = 0, KR_I_DONE = 1, KR_I_MORE = 2, KR_I_HANDBACK = 3, KR_I_ERROR = -1 };

/* a machine for an answered tunnel: cfd the client, ofd the origin (connected), host / port
 * what it was admitted for (host as the plan names it), early the bytes that came after the
 * handshake; sctx may be NULL (then only plain HTTP inside the tunnel is served) */
kr_insp *kr_insp_new(int cfd, int ofd, kr_ctx *sctx, kr_ctx *cctx, kr_rules *rules, const char *host,
                     int port, const char *early, size_t earlyn);
/* the origin's fd now: another than the dialled one when an idle connection was reused (the
 * caller closes the dialled one and watches this one) */
int kr_insp_origin_fd(const kr_insp *x);
/* (a tunnel that ended cleanly) 1 when its origin connection was kept for the next tunnel to
 * that origin: the fd is no longer the caller's to close */
int kr_insp_donate(kr_insp *x);
/* an epoll event on the client's (side 0) or the origin's (side 1) socket: what it may do
 * again (the machine skips reads and writes that would only say EAGAIN) */
void kr_insp_event(kr_insp *x, int side, uint32_t ev);
/* plain-HTTP forwarding instead of an inspected tunnel: the early bytes are the first
 * request; a request the engine does not serve (another host, a proxy user, anything
 * unusual) ends the run with KR_I_HANDBACK, the connection Python's again */
int kr_insp_set_forward(kr_insp *x);
/* (after KR_I_HANDBACK) the client's bytes not consumed yet: Python reads them first */
size_t kr_insp_leftover(const kr_insp *x, const char **p);
/* the secrets its requests are searched for (a reference is taken) */
void kr_insp_set_secrets(kr_insp *x, kr_secrets *s);
/* bytes for the client before anything else (the handshake's ok reply); 0 or -1 */
int kr_insp_reply(kr_insp *x, const char *p, size_t n);
/* drive it until every socket it waits on would block: KR_I_AGAIN (wait for epoll),
 * KR_I_MORE (budget spent: call again), KR_I_DONE (finished), KR_I_ERROR (kr_insp_errno) */
int kr_insp_run(kr_insp *x);
int kr_insp_errno(const kr_insp *x);
kr_rec *kr_insp_take(kr_insp *x);
/* decrypted bytes to the origin / to the client */
uint64_t kr_insp_up(const kr_insp *x);
uint64_t kr_insp_down(const kr_insp *x);
/* 1 while the client's TLS handshake (or its first bytes) is still being read */
int kr_insp_handshaking(const kr_insp *x);
void kr_insp_free(kr_insp *x);

/* (tests) the Nth allocation of the machines from now on fails (0: none) */
int kr_inspect_fail_after(int n);

#endif

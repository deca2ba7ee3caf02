/* [tls] C helpers of the TLS termination (fastlb/core/tls.pxi): OpenSSL callbacks and context
 * building, kept in C because they are OpenSSL callbacks (SNI, ALPN) or walk OpenSSL structures
 * (a certificate's names). No Python here. */
#ifndef FLB_TLS_H
#define FLB_TLS_H
#include <errno.h>
#include <string.h>
#include <strings.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

/* errno for the callers of _tls_recv/_tls_send (Cython sees an assigned errno as a local) */
static inline void flb_set_errno(int e) { errno = e; }
/* after a failed SSL call: errno if it names a socket error, else dflt */
static inline void flb_errno_or(int dflt) {
    if (errno == 0 || errno == EAGAIN || errno == EINTR) errno = dflt;
}

typedef struct flb_sni_entry {
    char name[256];      /* lower case; a wildcard "*.example.com" is kept as ".example.com" */
    int wildcard;
    SSL_CTX *ctx;
} flb_sni_entry;

typedef struct flb_sni {
    int n;
    flb_sni_entry *e;
    unsigned char alpn[256];   /* the ALPN list in wire form (length-prefixed) */
    unsigned int alpn_len;
    /* [tlsops] session ticket keys shared by every worker (flb_ticket_cb): previous, current,
     * next, each HAProxy's 80-byte form (name 16 | AES-256 32 | HMAC-SHA256 32); tk_on 0:
     * OpenSSL's own per-context keys (a context not given keys yet) */
    unsigned char tk[3][80];
    int tk_on;
} flb_sni;

/* The context for a server name: an exact name first, then a wildcard matching its first
 * label (one label only, as RFC 6125 and HAProxy's ssl_sock_switchctx_cbk do); NULL: none. */
static SSL_CTX *flb_sni_pick(const flb_sni *t, const char *name) {
    int i;
    const char *dot;
    for (i = 0; i < t->n; i++)
        if (!t->e[i].wildcard && strcasecmp(t->e[i].name, name) == 0)
            return t->e[i].ctx;
    dot = strchr(name, '.');
    if (dot == NULL || dot == name)
        return NULL;
    for (i = 0; i < t->n; i++)
        if (t->e[i].wildcard && strcasecmp(t->e[i].name, dot) == 0)
            return t->e[i].ctx;
    return NULL;
}

static int flb_sni_cb(SSL *ssl, int *ad, void *arg) {
    const flb_sni *t = (const flb_sni *)arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    SSL_CTX *ctx;
    (void)ad;
    if (name == NULL || t == NULL)
        return SSL_TLSEXT_ERR_OK;          /* no SNI: the default certificate */
    ctx = flb_sni_pick(t, name);
    if (ctx != NULL && ctx != SSL_get_SSL_CTX(ssl))
        SSL_set_SSL_CTX(ssl, ctx);
    return SSL_TLSEXT_ERR_OK;              /* no match: the default, as HAProxy does */
}

static int flb_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg) {
    const flb_sni *t = (const flb_sni *)arg;
    (void)ssl;
    if (t == NULL || t->alpn_len == 0)
        return SSL_TLSEXT_ERR_NOACK;
    /* our order first (server preference), as HAProxy's ssl_sock_advertise_alpn_protos */
    if (SSL_select_next_proto((unsigned char **)out, outlen, t->alpn, t->alpn_len, in, inlen)
            != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    return SSL_TLSEXT_ERR_OK;
}

static void flb_err(char *err, int errlen, const char *what) {
    unsigned long e = ERR_get_error();
    char buf[256];
    if (e) {
        ERR_error_string_n(e, buf, sizeof(buf));
        snprintf(err, errlen, "%s: %s", what, buf);
    } else {
        snprintf(err, errlen, "%s", what);
    }
    ERR_clear_error();
}

/* ctx's certificate (its chain after it) and key, from PEM in memory: 0, or -1 with a message
 * in err made of msg[i]: not a certificate, the certificate refused, the chain refused, not a
 * key, the key refused or not matching. Used by both sides (flb_ctx_new, and flb_orig_ctx_new
 * for the client certificate fastlb presents to backends). */
static int flb_use_pair(SSL_CTX *ctx, const char *cert, int certlen, const char *key, int keylen,
                        const char *const msg[5], char *err, int errlen) {
    BIO *bio;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;
    bio = BIO_new_mem_buf(cert, certlen);
    if (bio == NULL || (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) == NULL) {
        flb_err(err, errlen, msg[0]); goto fail;
    }
    if (SSL_CTX_use_certificate(ctx, x) != 1) { flb_err(err, errlen, msg[1]); goto fail; }
    X509_free(x);
    x = NULL;
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {   /* the chain */
        if (SSL_CTX_add0_chain_cert(ctx, x) != 1) { flb_err(err, errlen, msg[2]); goto fail; }
        x = NULL;
    }
    ERR_clear_error();                      /* the end of the PEM stream */
    BIO_free(bio);
    bio = BIO_new_mem_buf(key, keylen);
    if (bio == NULL || (pk = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)) == NULL) {
        flb_err(err, errlen, msg[3]); goto fail;
    }
    if (SSL_CTX_use_PrivateKey(ctx, pk) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        flb_err(err, errlen, msg[4]); goto fail;
    }
    EVP_PKEY_free(pk);
    BIO_free(bio);
    return 0;
fail:
    if (x) X509_free(x);
    if (pk) EVP_PKEY_free(pk);
    if (bio) BIO_free(bio);
    return -1;
}

/* A server context from a PEM certificate (its chain after it) and a PEM key, in memory.
 * NULL with a message in err when they do not load or do not match. */
static SSL_CTX *flb_ctx_new(const char *cert, int certlen, const char *key, int keylen,
                            int min_version, flb_sni *t, char *err, int errlen) {
    SSL_CTX *ctx = NULL;
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) { flb_err(err, errlen, "SSL_CTX_new"); return NULL; }
    static const char *const msg[5] = {
        "the certificate is not a PEM certificate", "the certificate", "the chain",
        "the key is not a PEM private key (or it is encrypted)",
        "the key does not match the certificate"};
    if (flb_use_pair(ctx, cert, certlen, key, keylen, msg, err, errlen) < 0) goto fail;
    if (SSL_CTX_set_min_proto_version(ctx, min_version) != 1) {
        flb_err(err, errlen, "min_version"); goto fail;
    }
    /* HAProxy's defaults (ssl_sock.c ssl_sock_prepare_ctx): no renegotiation, no compression,
     * server cipher preference; partial writes and moving buffers (our _flush advances by what
     * was written), buffers released when idle (SSL_MODE_RELEASE_BUFFERS). */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION
                        | SSL_OP_CIPHER_SERVER_PREFERENCE
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
                        | SSL_OP_IGNORE_UNEXPECTED_EOF
#endif
                        );
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                     | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"fastlb", 6);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);   /* tickets: on (default) */
    SSL_CTX_set_tlsext_servername_callback(ctx, flb_sni_cb);
    SSL_CTX_set_tlsext_servername_arg(ctx, t);
    SSL_CTX_set_alpn_select_cb(ctx, flb_alpn_cb, t);
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

/* The DNS names of ctx's certificate (subjectAltName; the subject CN when it has none), each
 * followed by a NUL, into out. Returns the bytes written. */
static int flb_ctx_names(SSL_CTX *ctx, char *out, int outlen) {
    X509 *x = SSL_CTX_get0_certificate(ctx);
    GENERAL_NAMES *gens;
    int i, n = 0, len;
    if (x == NULL)
        return 0;
    gens = (GENERAL_NAMES *)X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    if (gens != NULL) {
        for (i = 0; i < sk_GENERAL_NAME_num(gens); i++) {
            GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
            if (g->type != GEN_DNS)
                continue;
            len = ASN1_STRING_length(g->d.dNSName);
            if (len <= 0 || n + len + 1 > outlen)
                continue;
            memcpy(out + n, ASN1_STRING_get0_data(g->d.dNSName), len);
            n += len;
            out[n++] = 0;
        }
        GENERAL_NAMES_free(gens);
    }
    if (n == 0) {
        len = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, out, outlen - 1);
        if (len > 0)
            n = len + 1;
    }
    return n;
}

/* [tls] stage 2, mutual TLS: the client CAs (PEM, one or more) into ctx's store and its list
 * of acceptable CAs; the client certificate asked for (required: a handshake without one fails).
 * 0, or -1 with a message. */
static int flb_ctx_client_ca(SSL_CTX *ctx, const char *pem, int len, int required,
                             char *err, int errlen) {
    BIO *bio = BIO_new_mem_buf(pem, len);
    X509 *x;
    int n = 0;
    X509_STORE *st = SSL_CTX_get_cert_store(ctx);
    STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
    if (bio == NULL || names == NULL) {
        if (bio) BIO_free(bio);
        if (names) sk_X509_NAME_free(names);
        flb_err(err, errlen, "client_ca: out of memory");
        return -1;
    }
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        X509_STORE_add_cert(st, x);
        sk_X509_NAME_push(names, X509_NAME_dup(X509_get_subject_name(x)));
        X509_free(x);
        n++;
    }
    ERR_clear_error();
    BIO_free(bio);
    if (n == 0) {
        sk_X509_NAME_pop_free(names, X509_NAME_free);
        snprintf(err, errlen, "client_ca holds no PEM certificate");
        return -1;
    }
    SSL_CTX_set_client_CA_list(ctx, names);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (required ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    return 0;
}

/* Why a handshake failed, for the counts (before the error queue is cleared):
 * 1 no client certificate, 2 expired (or not yet valid), 3 not trusted (a foreign CA, a bad
 * signature...), 4 [tlsops] a protocol error of the client (not TLS, a bad or oversized
 * message, no shared version or cipher: an SSL-library error that is not an alert the client
 * sent us), 0 anything else (the client left or sent an alert, a socket error). */
static int flb_verify_reason(SSL *ssl) {
    long v = SSL_get_verify_result(ssl);
    unsigned long e = ERR_peek_error();
    if (ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE)
        return 1;
    if (v == X509_V_ERR_CERT_HAS_EXPIRED || v == X509_V_ERR_CERT_NOT_YET_VALID)
        return 2;
    if (v != X509_V_OK)
        return 3;
    if (e != 0 && ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) < SSL_AD_REASON_OFFSET)
        return 4;
    return 0;
}

static int flb_id_match(const char *pat, const char *val, size_t len, int nocase) {
    size_t pl = strlen(pat);
    if (pl && pat[pl - 1] == '*')                     /* a prefix */
        return len >= pl - 1 && (nocase ? strncasecmp(pat, val, pl - 1) : memcmp(pat, val, pl - 1)) == 0;
    return len == pl && (nocase ? strncasecmp(pat, val, pl) : memcmp(pat, val, pl)) == 0;
}

/* Is the verified client certificate one of the identities? pats: NUL-terminated patterns back
 * to back, an empty one last: "dns:NAME" (a DNS SAN), "cn:NAME" (the subject CN), else a URI
 * SAN (spiffe://...); a trailing '*' matches any rest. 1 allowed, 0 not (no certificate too). */
static int flb_authz(SSL *ssl, const char *pats) {
    X509 *x = SSL_get_peer_certificate(ssl);
    GENERAL_NAMES *gens;
    const char *p;
    char cn[256];
    int i, ok = 0, cnlen;
    if (x == NULL)
        return 0;
    gens = (GENERAL_NAMES *)X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    for (i = 0; gens != NULL && !ok && i < sk_GENERAL_NAME_num(gens); i++) {
        GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
        const char *val;
        size_t len;
        if (g->type == GEN_URI) {
            val = (const char *)ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
            len = (size_t)ASN1_STRING_length(g->d.uniformResourceIdentifier);
            for (p = pats; *p && !ok; p += strlen(p) + 1)
                if (strncmp(p, "dns:", 4) != 0 && strncmp(p, "cn:", 3) != 0)
                    ok = flb_id_match(p, val, len, 0);
        } else if (g->type == GEN_DNS) {
            val = (const char *)ASN1_STRING_get0_data(g->d.dNSName);
            len = (size_t)ASN1_STRING_length(g->d.dNSName);
            for (p = pats; *p && !ok; p += strlen(p) + 1)
                if (strncmp(p, "dns:", 4) == 0)
                    ok = flb_id_match(p + 4, val, len, 1);
        }
    }
    if (gens != NULL)
        GENERAL_NAMES_free(gens);
    if (!ok) {
        cnlen = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
        for (p = pats; cnlen > 0 && *p && !ok; p += strlen(p) + 1)
            if (strncmp(p, "cn:", 3) == 0)
                ok = flb_id_match(p + 3, cn, (size_t)cnlen, 0);
    }
    X509_free(x);
    return ok;
}

/* [tls] stage 3: the verified client certificate's subject CN into out (at most outlen - 1
 * bytes, NUL-terminated); -1 when the client presented no certificate, else its length (0: no
 * CN). *verified: 1 when a certificate was presented and verified. */
static int flb_peer_cn(SSL *ssl, char *out, int outlen, int *verified) {
    X509 *x = SSL_get_peer_certificate(ssl);
    int n;
    *verified = 0;
    out[0] = 0;
    if (x == NULL)
        return -1;
    *verified = SSL_get_verify_result(ssl) == X509_V_OK;
    n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, out, outlen);
    X509_free(x);
    return n > 0 ? n : 0;
}

/* -- [tlsops] session tickets shared across workers, with rotation ----------------------------
 * The supervisor makes the keys and sends them to every worker (fastlb/tickets.py); the
 * contexts of a service all point at one flb_sni (app data), where the keys are. HAProxy's
 * scheme (ssl_tlsext_ticket_key_cb, TLS_TICKETS_NO = 3): the middle key encrypts, all three
 * decrypt; a ticket of the previous key is accepted and renewed (2), one of a key no longer
 * held is not (0: a full handshake). OpenSSL 3's EVP callback (no deprecated HMAC_CTX). */
#include <openssl/rand.h>
#include <openssl/core_names.h>

static int flb_ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *ectx,
                         EVP_MAC_CTX *hctx, int enc) {
    flb_sni *t = (flb_sni *)SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const unsigned char *k;
    OSSL_PARAM params[3];
    int i = 1;
    if (t == NULL || !t->tk_on)
        return 0;
    if (enc) {
        k = t->tk[1];
        memcpy(name, k, 16);
        if (RAND_bytes(iv, 16) <= 0 || !EVP_EncryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, k + 16, iv))
            return -1;
    } else {
        for (i = 0; i < 3 && memcmp(name, t->tk[i], 16) != 0; i++)
            ;
        if (i == 3)
            return 0;                      /* a key no longer held: not resumed */
        k = t->tk[i];
        if (!EVP_DecryptInit_ex(ectx, EVP_aes_256_cbc(), NULL, k + 16, iv))
            return -1;
    }
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)(k + 48), 32);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    if (!EVP_MAC_CTX_set_params(hctx, params))
        return -1;
    return i == 1 ? 1 : 2;                 /* not the current key: renew the ticket */
}

/* The keys (240 bytes: previous, current, next) into t; the callback on each context. */
static void flb_tickets_set(flb_sni *t, SSL_CTX **ctxs, int n, const unsigned char *keys) {
    int i;
    memcpy(t->tk, keys, sizeof(t->tk));
    t->tk_on = 1;
    for (i = 0; i < n; i++)
        SSL_CTX_set_tlsext_ticket_key_evp_cb(ctxs[i], flb_ticket_cb);
}

/* Each context's settings of this part: the flb_sni as app data (the ticket callback's way
 * to the keys), the session lifetime (the ticket's lifetime hint; a session older is not
 * resumed) and the session id context (sessions of one service resume only there). */
static int flb_ctx_ops(SSL_CTX *ctx, flb_sni *t, long lifetime, const unsigned char *sid,
                       unsigned int sidlen) {
    SSL_CTX_set_app_data(ctx, t);
    SSL_CTX_set_timeout(ctx, lifetime);
    return SSL_CTX_set_session_id_context(ctx, sid, sidlen);
}

/* The negotiated ALPN protocol (NULL, 0: none) for the PROXY v2 TLV. */
static const unsigned char *flb_alpn_of(const SSL *ssl, unsigned int *len) {
    const unsigned char *p = NULL;
    *len = 0;
    SSL_get0_alpn_selected(ssl, &p, len);
    return *len ? p : NULL;
}

#endif

/* [orig] C helpers of TLS origination (fastlb/core/tls_orig.pxi): the client contexts fastlb
 * uses toward its backends (CA store or the system's, verification, a client certificate for
 * mTLS), the per-connection setup (SNI, the name or IP verified, a cached session) and the
 * session cache callback. No Python here. */
#ifndef FLB_TLS_ORIG_H
#define FLB_TLS_ORIG_H
#include "_tls.h"
#include <openssl/x509_vfy.h>

/* OpenSSL's new-session callback (a client context with SSL_SESS_CACHE_CLIENT): keep the
 * backend's latest session in its slot's cell (the SSL's app data), for resumption by the next
 * connection to that slot, as HAProxy keeps one per server (ssl_sess_new_srv_cb). With TLS 1.3
 * the ticket arrives after the handshake, during the first SSL_read: a callback, not a copy
 * taken when the handshake ends. Returns 1: we own the reference. */
static int flb_orig_new_sess(SSL *ssl, SSL_SESSION *sess) {
    SSL_SESSION **cell = (SSL_SESSION **)SSL_get_app_data(ssl);
    if (cell == NULL)
        return 0;
    if (*cell != NULL)
        SSL_SESSION_free(*cell);
    *cell = sess;
    return 1;
}

/* Forget a slot's cached session (a handshake with it failed; the backend's keys changed). */
static void flb_orig_forget(SSL_SESSION **cell) {
    if (cell != NULL && *cell != NULL) {
        SSL_SESSION_free(*cell);
        *cell = NULL;
    }
}

/* A client context for backends: ca (PEM, one or more; len 0: the system's default store),
 * verify (0: the backend's certificate is not checked), a client certificate (its chain after
 * it) and key in PEM (certlen 0: none). NULL with a message in err. */
static SSL_CTX *flb_orig_ctx_new(const char *ca, int calen, int verify, const char *cert,
                                 int certlen, const char *key, int keylen, char *err, int errlen) {
    SSL_CTX *ctx;
    BIO *bio = NULL;
    X509 *x = NULL;
    int n = 0;
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) { flb_err(err, errlen, "SSL_CTX_new"); return NULL; }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (calen > 0) {
        X509_STORE *st = SSL_CTX_get_cert_store(ctx);
        bio = BIO_new_mem_buf(ca, calen);
        while (bio != NULL && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
            X509_STORE_add_cert(st, x);
            X509_free(x);
            n++;
        }
        x = NULL;
        ERR_clear_error();
        if (bio) BIO_free(bio);
        bio = NULL;
        if (n == 0) { snprintf(err, errlen, "ca: holds no PEM certificate"); goto fail; }
    } else if (verify && SSL_CTX_set_default_verify_paths(ctx) != 1) {
        flb_err(err, errlen, "ca: the system's CA store does not load"); goto fail;
    }
    SSL_CTX_set_verify(ctx, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (certlen > 0) {
        static const char *const msg[5] = {
            "cert: not a PEM certificate", "cert", "cert: the chain",
            "key: not a PEM private key (or it is encrypted)", "key: does not match the certificate"};
        if (flb_use_pair(ctx, cert, certlen, key, keylen, msg, err, errlen) < 0) goto fail;
    }
    /* as the server side (fastlb/_tls.h, HAProxy's ssl_sock_prepare_srv_ctx): no
     * renegotiation, no compression, partial writes with moving buffers, buffers released when
     * idle, an unexpected EOF read as an EOF */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
                        | SSL_OP_IGNORE_UNEXPECTED_EOF
#endif
                        );
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                     | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, flb_orig_new_sess);
    return ctx;
fail:
    if (x) X509_free(x);
    if (bio) BIO_free(bio);
    SSL_CTX_free(ctx);
    return NULL;
}

/* One connection's SSL toward a backend on fd: client mode; name: the host name sent as SNI
 * and verified (is_ip: an IP address, verified against the certificate's IP SANs and not sent:
 * RFC 6066 3 forbids literal addresses in SNI); the slot's cached session offered. 0, or -1. */
static int flb_orig_setup(SSL *ssl, int fd, const char *name, int is_ip, int verify,
                          SSL_SESSION **cell) {
    if (SSL_set_fd(ssl, fd) != 1)
        return -1;
    SSL_set_connect_state(ssl);
    SSL_set_app_data(ssl, cell);
    if (name[0]) {
        if (!is_ip && SSL_set_tlsext_host_name(ssl, name) != 1)
            return -1;
        if (verify) {
            /* as curl and HAProxy (verifyhost): no partial wildcards ("f*.example.com") */
            SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name) != 1
                      : SSL_set1_host(ssl, name) != 1)
                return -1;
        }
    }
    if (*cell != NULL)
        SSL_set_session(ssl, *cell);        /* a stale one only costs a full handshake */
    return 0;
}

#endif

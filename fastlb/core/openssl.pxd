# [tls] OpenSSL as the data path sees it (libssl, libcrypto: -lssl -lcrypto in setup.py) and the
# C helpers of fastlb/_tls.h. Declarations only, cimported by fastlb/_core.pyx like system.pxd.

cdef extern from "_tls.h" nogil:
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CTX:
        pass
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        TLS1_2_VERSION
        TLS1_3_VERSION
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    void SSL_set_accept_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_shutdown(const SSL *ssl)     # & SSL_RECEIVED_SHUTDOWN: the peer's close_notify read
    enum: SSL_RECEIVED_SHUTDOWN
    void SSL_set_quiet_shutdown(SSL *ssl, int mode)
    int SSL_session_reused(const SSL *ssl)
    int SSL_has_pending(const SSL *ssl)     # [tlsbench] _tls_recv's early return
    int SSL_version(const SSL *ssl)
    const char *SSL_get_servername(const SSL *ssl, int type)
    void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len)
    SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl)
    void SSL_CTX_free(SSL_CTX *ctx)
    void ERR_clear_error()
    enum:
        TLSEXT_NAMETYPE_host_name

    void flb_set_errno(int e)
    void flb_errno_or(int dflt)
    ctypedef struct flb_sni_entry:
        char name[256]
        int wildcard
        SSL_CTX *ctx
    ctypedef struct flb_sni:
        int n
        flb_sni_entry *e
        unsigned char alpn[256]
        unsigned int alpn_len
    SSL_CTX *flb_ctx_new(const char *cert, int certlen, const char *key, int keylen,
                         int min_version, flb_sni *t, char *err, int errlen)
    int flb_ctx_names(SSL_CTX *ctx, char *out, int outlen)
    SSL_CTX *flb_sni_pick(const flb_sni *t, const char *name)
    int flb_ctx_client_ca(SSL_CTX *ctx, const char *pem, int len, int required, char *err,
                          int errlen)
    int flb_verify_reason(SSL *ssl)
    int flb_authz(SSL *ssl, const char *pats)
    int flb_peer_cn(SSL *ssl, char *out, int outlen, int *verified)
    const char *SSL_get_version(const SSL *ssl)

    # [tlsops] shared session tickets, the counts' reasons, the ALPN TLV
    void flb_tickets_set(flb_sni *t, SSL_CTX **ctxs, int n, const unsigned char *keys)
    int flb_ctx_ops(SSL_CTX *ctx, flb_sni *t, long lifetime, const unsigned char *sid,
                    unsigned int sidlen)
    const unsigned char *flb_alpn_of(const SSL *ssl, unsigned int *len)

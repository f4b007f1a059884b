/* hash.h — SHA-256 through OpenSSL's EVP interface (libcrypto), for model
 * fingerprints and hashed API keys.
 *
 * OpenSSL is linked anyway (gRPC TLS, CurveZMQ keys) and its SHA-256 uses the
 * CPU's SHA extensions / AVX2: fingerprinting a full-size expert's tensors is
 * disk-bound, not hash-bound. The digest is the standard one, so a fingerprint
 * is identical on every host and with `sha256sum`.
 *
 *     mm_sha256 h;
 *     if (mm_sha256_init(&h) != MM_OK) {...}
 *     mm_sha256_update(&h, "abc", 3);
 *     uint8_t d[MM_SHA256_BYTES];  char hex[MM_SHA256_HEX];
 *     mm_sha256_final(&h, d);      // also frees h's context
 *     mm_sha256_hex(d, hex);       // "ba7816bf..."
 */
#ifndef MM_HASH_H
#define MM_HASH_H

#include <stddef.h>
#include <stdint.h>

#define MM_SHA256_BYTES 32
#define MM_SHA256_HEX 65 /* 64 hex digits + NUL */

typedef struct mm_sha256 {
    void *ctx; /* EVP_MD_CTX *, NULL after final or a failed init */
} mm_sha256;

/* MM_OK, or MM_ENOMEM when OpenSSL cannot make a context. */
int mm_sha256_init(mm_sha256 *h);
void mm_sha256_update(mm_sha256 *h, const void *data, size_t len);
/* Finish, write the 32-byte digest and free the context (re-init to reuse).
 * After a failed init the digest is all zeros. */
void mm_sha256_final(mm_sha256 *h, uint8_t digest[MM_SHA256_BYTES]);
/* Lower-case hex of a digest, NUL-terminated. */
void mm_sha256_hex(const uint8_t digest[MM_SHA256_BYTES], char hex[MM_SHA256_HEX]);
/* One-shot helper: hex digest of a buffer. */
void mm_sha256_buf_hex(const void *data, size_t len, char hex[MM_SHA256_HEX]);
/* Known-answer tests (FIPS 180-2 "abc", the 448-bit message, a million 'a',
 * the empty string); MM_OK or MM_ERR. */
int mm_sha256_selftest(void);

#endif

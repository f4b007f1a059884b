/* sha256.h — SHA-256 (FIPS 180-4), written out plainly, for model fingerprints.
 *
 * The router and every expert node hash "config + an expert's tensors" and
 * compare the digests at registration; no crypto library is needed for that,
 * and a self-contained implementation keeps the hash identical on every host.
 *
 *     mm_sha256 h;
 *     mm_sha256_init(&h);
 *     mm_sha256_update(&h, "abc", 3);
 *     uint8_t d[32];  char hex[MM_SHA256_HEX];
 *     mm_sha256_final(&h, d);
 *     mm_sha256_hex(d, hex);   // "ba7816bf..."
 */
#ifndef MM_SHA256_H
#define MM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define MM_SHA256_BYTES 32
#define MM_SHA256_HEX 65 /* 64 hex digits + NUL */

typedef struct mm_sha256 {
    uint32_t state[8]; /* running hash value H0..H7        */
    uint64_t nbytes;   /* message bytes absorbed so far     */
    uint8_t block[64]; /* partial block awaiting compression */
    size_t fill;       /* bytes used in block (0..63)       */
} mm_sha256;

void mm_sha256_init(mm_sha256 *h);
void mm_sha256_update(mm_sha256 *h, const void *data, size_t len);
/* Finish and write the 32-byte digest; h must be re-initialised to reuse. */
void mm_sha256_final(mm_sha256 *h, uint8_t digest[MM_SHA256_BYTES]);
/* Lower-case hex of a digest, NUL-terminated. */
void mm_sha256_hex(const uint8_t digest[MM_SHA256_BYTES], char hex[MM_SHA256_HEX]);
/* One-shot helper: hex digest of a buffer. */
void mm_sha256_buf_hex(const void *data, size_t len, char hex[MM_SHA256_HEX]);
/* Known-answer tests (FIPS 180-2 "abc", the 448-bit message, a million 'a',
 * the empty string); MM_OK or MM_ERR. */
int mm_sha256_selftest(void);

#endif

/* hash.c — SHA-256 via OpenSSL EVP (see hash.h). */
#include "hash.h"

#include <openssl/evp.h>
#include <string.h>

#include "status.h"

int mm_sha256_init(mm_sha256 *h) {
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (c && EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(c);
        c = NULL;
    }
    h->ctx = c;
    return c ? MM_OK : MM_ENOMEM;
}

void mm_sha256_update(mm_sha256 *h, const void *data, size_t len) {
    if (h->ctx && len)
        EVP_DigestUpdate(h->ctx, data, len);
}

void mm_sha256_final(mm_sha256 *h, uint8_t digest[MM_SHA256_BYTES]) {
    unsigned n = 0;
    memset(digest, 0, MM_SHA256_BYTES);
    if (h->ctx)
        EVP_DigestFinal_ex(h->ctx, digest, &n);
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
}

void mm_sha256_hex(const uint8_t digest[MM_SHA256_BYTES], char hex[MM_SHA256_HEX]) {
    static const char d[] = "0123456789abcdef";
    for (int i = 0; i < MM_SHA256_BYTES; i++) {
        hex[2 * i] = d[digest[i] >> 4];
        hex[2 * i + 1] = d[digest[i] & 15];
    }
    hex[2 * MM_SHA256_BYTES] = 0;
}

void mm_sha256_buf_hex(const void *data, size_t len, char hex[MM_SHA256_HEX]) {
    mm_sha256 h;
    uint8_t d[MM_SHA256_BYTES];
    mm_sha256_init(&h);
    mm_sha256_update(&h, data, len);
    mm_sha256_final(&h, d);
    mm_sha256_hex(d, hex);
}

int mm_sha256_selftest(void) {
    static const struct {
        const char *msg;
        const char *hex;
    } kat[] = {
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
    };
    char hex[MM_SHA256_HEX];
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        mm_sha256_buf_hex(kat[i].msg, strlen(kat[i].msg), hex);
        if (strcmp(hex, kat[i].hex) != 0)
            return MM_ERR;
    }
    mm_sha256 h;
    char a[1000];
    memset(a, 'a', sizeof a);
    uint8_t d[MM_SHA256_BYTES];
    if (mm_sha256_init(&h) != MM_OK)
        return MM_ERR;
    for (int i = 0; i < 1000; i++)
        mm_sha256_update(&h, a, sizeof a);
    mm_sha256_final(&h, d);
    mm_sha256_hex(d, hex);
    return strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0
               ? MM_OK
               : MM_ERR;
}

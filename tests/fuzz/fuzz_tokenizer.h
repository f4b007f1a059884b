/* fuzz_tokenizer.h — shared body of fuzz_tokenizer_json and fuzz_tiktoken.
 * The input is "<file bytes>\0\0<text>": the part before the first two NUL
 * bytes becomes the tokenizer file (neither format has NULs in a valid file),
 * the rest, when present, is encoded by what loaded. Then every id is
 * decoded in one call and through the streaming decoder, and the two must
 * agree (tokenizer.h promises it). */
#include <assert.h>
#include <string.h>

#include "fuzz_file.h"
#include "tokenizer.h"

static void s_fuzz_tokenizer(const char *name, const uint8_t *data, size_t len) {
    const uint8_t *sep = NULL;
    for (size_t i = 0; i + 1 < len && !sep; i++)
        if (data[i] == 0 && data[i + 1] == 0)
            sep = data + i;
    size_t flen = sep ? (size_t)(sep - data) : len;
    const char *text = sep ? (const char *)sep + 2 : "Is there a lesion in the left lung?";
    size_t tlen = sep ? len - flen - 2 : strlen(text);
    const char *path = mm_fuzz_file(name, data, flen);
    mm_tokenizer *tok = NULL;
    char err[512];
    if (mm_tokenizer_load_file(path, &tok, err, sizeof err) == MM_OK) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (mm_tokenizer_encode(tok, text, tlen, &ids, &n, err, sizeof err) == MM_OK) {
            for (unsigned flags = 0; flags <= MM_DECODE_SKIP_SPECIAL; flags++) {
                char *out = NULL;
                size_t olen = 0;
                int rc = mm_tokenizer_decode(tok, ids, n, flags, &out, &olen, err, sizeof err);
                assert(rc == MM_OK);
                mm_detok *dt = NULL;
                if (mm_detok_new(tok, flags, &dt) == MM_OK) {
                    size_t at = 0;
                    const char *piece;
                    size_t plen;
                    for (size_t i = 0; i < n; i++) {
                        rc = mm_detok_push(dt, ids[i], &piece, &plen, err, sizeof err);
                        assert(rc == MM_OK && at + plen <= olen && !memcmp(out + at, piece, plen));
                        at += plen;
                    }
                    mm_detok_flush(dt, &piece, &plen);
                    assert(at + plen == olen && !memcmp(out + at, piece, plen));
                    mm_detok_destroy(&dt);
                }
                free(out);
            }
            free(ids);
        }
        size_t size = mm_tokenizer_size(tok);
        for (int32_t id = -1; id <= (int32_t)size && id < 64; id++) {
            size_t blen;
            mm_tokenizer_token_bytes(tok, id, &blen);
            mm_tokenizer_is_special(tok, id);
        }
        mm_tokenizer_token_id(tok, "<|endoftext|>");
        mm_tokenizer_destroy(&tok);
    }
    unlink(path);
}

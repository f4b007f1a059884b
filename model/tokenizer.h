/* tokenizer.h — byte-level BPE tokenizer (GPT-2 / Phi-2 and cl100k / Arcade100k
 * styles), read from a Hugging Face tokenizer.json or a *.tiktoken file.
 *
 * Offers: load from a checkpoint directory, encode UTF-8 text to ids (added /
 * special tokens in the text are recognised and never split), decode ids to
 * text, a streaming decoder that only ever hands out complete UTF-8, and
 * look-ups (token id by text, length, end-of-text id).
 *
 *     mm_tokenizer *tok = NULL;
 *     char err[256];
 *     if (mm_tokenizer_load("ckpt/", &tok, err, sizeof err) != MM_OK) { puts(err); ... }
 *     int32_t *ids = NULL;
 *     size_t n = 0;
 *     mm_tokenizer_encode(tok, "Is there a lesion?", 18, &ids, &n, err, sizeof err);
 *     mm_detok *dt = NULL;
 *     mm_detok_new(tok, MM_DECODE_SKIP_SPECIAL, &dt);
 *     for (i...) { mm_detok_push(dt, id, &piece, &plen, err, sizeof err); fwrite(piece, 1, plen,
 * out); } mm_detok_flush(dt, &piece, &plen); mm_detok_destroy(&dt); free(ids);
 * mm_tokenizer_destroy(&tok);
 *
 * Semantics (those of HF `tokenizers` for tokenizer.json, of tiktoken for a
 * *.tiktoken file; tests/reference/bpe_ref.py is the executable spec):
 *  - tokenizer.json: model.type "BPE" with a byte-level vocab, merges as
 *    "a b" strings or [a, b] pairs; pre_tokenizer ByteLevel (use_regex: the
 *    GPT-2 pattern) or a Sequence of Split(Regex, Isolated) stages followed by
 *    ByteLevel; normalizer must be null; no BOS is ever added. Added tokens'
 *    lstrip/rstrip/single_word flags are not honoured (Med-MoE's have none).
 *  - *.tiktoken (used when the directory has no tokenizer.json): "base64 rank"
 *    lines, the cl100k pre-tokenisation pattern, a pair's rank is the rank of
 *    its concatenated bytes, and "<|endoftext|>" = highest rank + 1.
 *  - Input text must be valid UTF-8: invalid input is rejected with MM_EINVAL
 *    and the byte offset (the pre-tokenisation regexes are defined over
 *    characters, so there is no faithful way to split broken text).
 *  - Decoded bytes that are not valid UTF-8 become U+FFFD, one per maximal
 *    invalid subsequence (as HF's from_utf8_lossy and Python's "replace").
 *  - Encoding works on a const tokenizer and keeps no cache, so one loaded
 *    tokenizer may be shared by threads.
 */
#ifndef MM_TOKENIZER_H
#define MM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct mm_tokenizer mm_tokenizer;
typedef struct mm_detok mm_detok;

/* Flags for decoding. */
enum {
    MM_DECODE_SKIP_SPECIAL = 1u << 0, /* leave out added tokens marked special */
};

/* Load dir/tokenizer.json, else the first dir/\*.tiktoken (sorted by name).
 * tokenizer_config.json's eos_token, when present, names the eos token;
 * otherwise "<|endoftext|>". Errors name the file and field. */
int mm_tokenizer_load(const char *dir, mm_tokenizer **out, char *err, size_t errlen);

/* Load one file: a path ending in ".tiktoken" is read as tiktoken, anything
 * else as tokenizer.json (no tokenizer_config.json is read). */
int mm_tokenizer_load_file(const char *path, mm_tokenizer **out, char *err, size_t errlen);

/* Free and set *tok to NULL; NULL and *tok == NULL are fine. */
void mm_tokenizer_destroy(mm_tokenizer **tok);

/* Encode len bytes of UTF-8 text (NUL bytes allowed) into a malloc'd array
 * *ids of *n ids (caller frees; *ids may be NULL when *n is 0). */
int mm_tokenizer_encode(const mm_tokenizer *tok, const char *text, size_t len, int32_t **ids,
                        size_t *n, char *err, size_t errlen);

/* Decode n ids into a malloc'd NUL-terminated string *out of *outlen bytes
 * (caller frees). An id outside the tokenizer is MM_EINVAL. */
int mm_tokenizer_decode(const mm_tokenizer *tok, const int32_t *ids, size_t n, unsigned flags,
                        char **out, size_t *outlen, char *err, size_t errlen);

/* Id of an added token ("<|endoftext|>") or of a vocabulary token given by
 * its raw bytes (" the"); -1 when absent. */
int32_t mm_tokenizer_token_id(const mm_tokenizer *tok, const char *text);

/* len(tokenizer): highest id + 1 over the vocabulary and the added tokens. */
size_t mm_tokenizer_size(const mm_tokenizer *tok);

/* End-of-text id (generation stops on it); -1 when the tokenizer has none. */
int32_t mm_tokenizer_eos_id(const mm_tokenizer *tok);

/* Raw bytes of one token (not NUL-terminated) and their count, or NULL for an
 * id the tokenizer does not have. Valid as long as tok. */
const char *mm_tokenizer_token_bytes(const mm_tokenizer *tok, int32_t id, size_t *len);

/* 1 when id is an added token marked special, else 0. */
int mm_tokenizer_is_special(const mm_tokenizer *tok, int32_t id);

/* The file that was loaded (for messages). */
const char *mm_tokenizer_path(const mm_tokenizer *tok);

/* Streaming decoder: push ids one by one, get back only complete UTF-8.
 * Bytes of an unfinished character are held back until the next push or the
 * flush; invalid bytes come out as U+FFFD. The concatenation of every piece
 * handed out equals mm_tokenizer_decode of the same ids and flags. The
 * tokenizer must outlive the decoder. */
int mm_detok_new(const mm_tokenizer *tok, unsigned flags, mm_detok **out);
void mm_detok_destroy(mm_detok **dt);

/* *piece (valid until the next call on dt) gets *len bytes of new text, maybe 0. */
int mm_detok_push(mm_detok *dt, int32_t id, const char **piece, size_t *len, char *err,
                  size_t errlen);

/* Hand out whatever is held back (an unfinished character becomes U+FFFD) and
 * reset dt for a new sequence. */
int mm_detok_flush(mm_detok *dt, const char **piece, size_t *len);

#endif

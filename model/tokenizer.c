/* tokenizer.c — byte-level BPE: loading tokenizer.json / *.tiktoken, encoding
 * (added tokens, regex pre-tokenisation with PCRE2, merge by rank), decoding
 * and the streaming decoder. See tokenizer.h for the semantics.
 *
 * Everything works on raw bytes: the byte-level "unicode" spelling of
 * tokenizer.json is turned into bytes while loading (the map is a bijection),
 * so a piece of text is BPE-merged as a sequence of byte spans.
 *
 * Why one file of ~1400 lines: loading, encoding and both decoders work on
 * one vocabulary/merge table and its byte spelling; a split would export
 * those internals to several files for no reader's gain.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ patterns */

/* HF's ByteLevel pre-tokenizer pattern (use_regex: true). */
static const char s_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
/* tiktoken's cl100k_base pattern, used for *.tiktoken files (Arcade100k). */
static const char s_cl100k_pattern[] = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|"
                                       "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*|\\s*[\\r\\n]|"
                                       "\\s+(?!\\S)|\\s+";

#define S_MAX_ID (1 << 24) /* ids at or above this are refused as corrupt */
#define S_MAX_SPLITS 8     /* Split stages before the ByteLevel step */
#define S_EOT "<|endoftext|>"

/* ------------------------------------------------------------------ types */

typedef struct s_tok {
    uint32_t off;    /* offset of the token's bytes in mm_tokenizer.blob */
    uint32_t len;    /* byte length                                      */
    uint8_t present; /* 1 when some token has this id (ids may have holes) */
    uint8_t in_bpe;  /* 1 when part of the BPE vocabulary                */
    uint8_t added;   /* 1 when an added token (matched before splitting)  */
    uint8_t special; /* 1 when an added token marked special             */
} s_tok;

/* Open-addressing map from token bytes to id, keys stored in the token table. */
typedef struct s_bmap {
    int32_t *slots; /* [cap] id or -1 */
    size_t cap;     /* power of two   */
} s_bmap;

/* Open-addressing map (id_a, id_b) -> (rank, merged id). */
typedef struct s_pmap {
    uint64_t *keys;  /* [cap] (a << 32 | b) + 1, 0 = empty */
    int32_t *rank;   /* [cap] merge rank                   */
    int32_t *merged; /* [cap] id of a+b                    */
    size_t cap;      /* power of two                       */
} s_pmap;

struct mm_tokenizer {
    char *path;                      /* file loaded, for messages                      */
    size_t size;                     /* highest id + 1                                 */
    s_tok *toks;                     /* [size] per id                                  */
    char *blob;                      /* every token's bytes, back to back              */
    size_t blob_len;                 /* bytes used in blob                             */
    size_t blob_cap;                 /* bytes allocated in blob                        */
    s_bmap vocab;                    /* BPE vocabulary: bytes -> id                    */
    s_pmap merges;                   /* HF merges (unused for tiktoken)                */
    int tiktoken;                    /* 1: pair rank = rank of the concatenated bytes  */
    int ignore_merges;               /* HF model.ignore_merges                         */
    int32_t byte_id[256];            /* id of each single-byte token                   */
    pcre2_code *split[S_MAX_SPLITS]; /* Split(Isolated) stages, in order   */
    size_t n_split;                  /* how many split stages                          */
    int bl_regex;                    /* ByteLevel use_regex: also split with GPT-2's    */
    int add_prefix_space;            /* ByteLevel add_prefix_space                     */
    pcre2_code *gpt2;                /* the GPT-2 pattern when bl_regex                */
    int32_t *added;                  /* [n_added] added-token ids, longest first       */
    size_t n_added;                  /* number of added tokens                         */
    uint8_t added_first[256];        /* 1 when some added token starts with this byte */
    int32_t eos;                     /* end-of-text id or -1                           */
};

struct mm_detok {
    const mm_tokenizer *tok; /* borrowed                                  */
    unsigned flags;          /* MM_DECODE_*                               */
    char pend[8];            /* bytes of an unfinished character (<= 3)   */
    size_t n_pend;           /* how many                                  */
    char *out;               /* text handed out by the last call          */
    size_t out_cap;          /* bytes allocated in out                    */
};

/* A growable byte buffer. */
typedef struct s_buf {
    char *p;
    size_t len, cap;
} s_buf;

static int s_buf_reserve(s_buf *b, size_t extra) {
    if (extra > SIZE_MAX - b->len - 1)
        return MM_ENOMEM;
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return MM_OK;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return MM_ENOMEM;
    b->p = p;
    b->cap = cap;
    return MM_OK;
}

static int s_buf_put(s_buf *b, const void *src, size_t n) {
    if (s_buf_reserve(b, n) != MM_OK)
        return MM_ENOMEM;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    b->p[b->len] = '\0';
    return MM_OK;
}

/* ------------------------------------------------------------------ UTF-8 */

/* Length of the valid UTF-8 sequence at p[0..n), 0 when invalid, and -k when
 * the first k bytes (all there are) are a valid but unfinished prefix. The
 * ranges are those of Unicode's table 3-7 (no overlongs, surrogates or
 * values past U+10FFFF). For an invalid sequence *bad gets the length of its
 * maximal valid prefix (>= 1), the unit that becomes one U+FFFD. */
static int s_utf8_seq(const uint8_t *p, size_t n, size_t *bad) {
    uint8_t c = p[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    *bad = 1;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n)
            return -i;
        uint8_t d = p[i];
        if (d < lo || d > hi) {
            *bad = (size_t)i;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

/* Offset of the first invalid byte of p[0..n), or n when all is valid UTF-8. */
static size_t s_utf8_check(const char *p, size_t n) {
    size_t i = 0, bad;
    while (i < n) {
        if ((uint8_t)p[i] < 0x80) {
            i++;
            continue;
        }
        int k = s_utf8_seq((const uint8_t *)p + i, n - i, &bad);
        if (k <= 0)
            return i;
        i += (size_t)k;
    }
    return n;
}

/* Append p[0..n) to out with invalid sequences replaced by U+FFFD. When
 * !final an unfinished sequence at the end is not consumed; returns the
 * number of bytes consumed. */
static int s_utf8_lossy(const char *p, size_t n, int final, s_buf *out, size_t *consumed) {
    static const char repl[] = "\xEF\xBF\xBD";
    size_t i = 0, start = 0, bad;
    while (i < n) {
        int k = s_utf8_seq((const uint8_t *)p + i, n - i, &bad);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        if (k < 0 && !final)
            break;
        if (s_buf_put(out, p + start, i - start) != MM_OK || s_buf_put(out, repl, 3) != MM_OK)
            return MM_ENOMEM;
        i += k < 0 ? (size_t)(-k) : bad;
        start = i;
    }
    if (s_buf_put(out, p + start, i - start) != MM_OK)
        return MM_ENOMEM;
    *consumed = i;
    return MM_OK;
}

/* ------------------------------------------------------------------ hashing */

static uint64_t s_hash(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static size_t s_pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

static int s_bmap_init(s_bmap *m, size_t n) {
    m->cap = s_pow2_at_least(n * 2 + 1);
    m->slots = malloc(m->cap * sizeof *m->slots);
    if (!m->slots)
        return MM_ENOMEM;
    for (size_t i = 0; i < m->cap; i++)
        m->slots[i] = -1;
    return MM_OK;
}

static const char *s_tok_bytes(const mm_tokenizer *t, int32_t id) {
    return t->blob + t->toks[id].off;
}

/* Id of the BPE token with bytes p[0..n), or -1. */
static int32_t s_bmap_get(const mm_tokenizer *t, const char *p, size_t n) {
    const s_bmap *m = &t->vocab;
    size_t i = s_hash(p, n) & (m->cap - 1);
    for (;;) {
        int32_t id = m->slots[i];
        if (id < 0)
            return -1;
        if (t->toks[id].len == n && memcmp(s_tok_bytes(t, id), p, n) == 0)
            return id;
        i = (i + 1) & (m->cap - 1);
    }
}

/* Insert id (whose bytes are already in the token table); returns the id
 * already holding the same bytes, or -1 when inserted. */
static int32_t s_bmap_put(mm_tokenizer *t, int32_t id) {
    s_bmap *m = &t->vocab;
    const char *p = s_tok_bytes(t, id);
    size_t n = t->toks[id].len;
    size_t i = s_hash(p, n) & (m->cap - 1);
    for (;;) {
        int32_t cur = m->slots[i];
        if (cur < 0) {
            m->slots[i] = id;
            return -1;
        }
        if (t->toks[cur].len == n && memcmp(s_tok_bytes(t, cur), p, n) == 0)
            return cur;
        i = (i + 1) & (m->cap - 1);
    }
}

static int s_pmap_init(s_pmap *m, size_t n) {
    m->cap = s_pow2_at_least(n * 2 + 1);
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->rank = malloc(m->cap * sizeof *m->rank);
    m->merged = malloc(m->cap * sizeof *m->merged);
    return m->keys && m->rank && m->merged ? MM_OK : MM_ENOMEM;
}

static size_t s_pmap_slot(const s_pmap *m, uint64_t key) {
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & (m->cap - 1);
    while (m->keys[i] != 0 && m->keys[i] != key)
        i = (i + 1) & (m->cap - 1);
    return i;
}

static uint64_t s_pair_key(int32_t a, int32_t b) {
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
}

/* ------------------------------------------------------------------ token table */

/* Give id the bytes p[0..n). Returns MM_OK, or MM_EPROTO with *other set when
 * the id is taken by different bytes (same bytes: *other = -2, no change). */
static int s_set_token(mm_tokenizer *t, int32_t id, const char *p, size_t n, int32_t *other) {
    s_tok *k = &t->toks[id];
    *other = -1;
    if (k->present) {
        if (k->len == n && memcmp(s_tok_bytes(t, id), p, n) == 0) {
            *other = -2;
            return MM_OK;
        }
        *other = id;
        return MM_EPROTO;
    }
    if (n > UINT32_MAX || t->blob_len > UINT32_MAX - n)
        return MM_ENOMEM;
    if (t->blob_len + n > t->blob_cap) {
        size_t cap = t->blob_cap ? t->blob_cap : 4096;
        while (cap < t->blob_len + n)
            cap *= 2;
        char *nb = realloc(t->blob, cap);
        if (!nb)
            return MM_ENOMEM;
        t->blob = nb;
        t->blob_cap = cap;
    }
    memcpy(t->blob + t->blob_len, p, n);
    k->off = (uint32_t)t->blob_len;
    k->len = (uint32_t)n;
    k->present = 1;
    t->blob_len += n;
    return MM_OK;
}

static int s_alloc_table(mm_tokenizer *t, size_t size, size_t n_bpe, char *err, size_t errlen) {
    t->size = size;
    t->toks = calloc(size ? size : 1, sizeof *t->toks);
    if (!t->toks || s_bmap_init(&t->vocab, n_bpe) != MM_OK)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory for %zu tokens", t->path, size);
    return MM_OK;
}

/* ------------------------------------------------------------------ byte-level alphabet */

/* GPT-2's bytes_to_unicode: byte -> code point, and its inverse. */
static void s_byte_unicode(uint32_t b2u[256], int16_t u2b[324]) {
    int n = 0;
    for (int i = 0; i < 324; i++)
        u2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        b2u[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        u2b[b2u[b]] = (int16_t)b;
    }
}

/* Turn a byte-level spelled token (UTF-8) into raw bytes in out. */
static int s_unbyte(const int16_t u2b[324], const char *s, size_t n, s_buf *out) {
    out->len = 0;
    size_t i = 0, bad;
    while (i < n) {
        int k = s_utf8_seq((const uint8_t *)s + i, n - i, &bad);
        if (k <= 0)
            return MM_EPROTO;
        const uint8_t *p = (const uint8_t *)s + i;
        uint32_t cp = k == 1   ? p[0]
                      : k == 2 ? (uint32_t)(p[0] & 0x1F) << 6 | (p[1] & 0x3F)
                               : 0x7FFFFFFF; /* 3+ byte code points are past the alphabet */
        if (cp >= 324 || u2b[cp] < 0)
            return MM_EPROTO;
        uint8_t b = (uint8_t)u2b[cp];
        if (s_buf_put(out, &b, 1) != MM_OK)
            return MM_ENOMEM;
        i += (size_t)k;
    }
    return MM_OK;
}

/* ------------------------------------------------------------------ regexes */

static int s_compile(mm_tokenizer *t, const char *pat, pcre2_code **out, const char *field,
                     char *err, size_t errlen) {
    int ec;
    PCRE2_SIZE eo;
    *out = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo,
                         NULL);
    if (!*out) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return mm_errorf(err, errlen, MM_EPROTO, "%s: %s: regex does not compile at %zu: %s",
                         t->path, field, (size_t)eo, (const char *)msg);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* a failed JIT falls back to the interpreter */
    return MM_OK;
}

/* ------------------------------------------------------------------ loading: shared */

static mm_tokenizer *s_new(const char *path) {
    mm_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->path = strdup(path);
    t->eos = -1;
    if (!t->path) {
        free(t);
        return NULL;
    }
    return t;
}

/* Checks common to both formats, once every token is in: the 256 byte
 * tokens, the added-token index and the end-of-text id. */
static int s_finish(mm_tokenizer *t, const char *eos_name, char *err, size_t errlen) {
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = s_bmap_get(t, &c, 1);
        if (t->byte_id[b] < 0)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "%s: vocabulary lacks the token for byte 0x%02x (a byte-level BPE "
                             "needs all 256)",
                             t->path, b);
    }
    size_t n = 0;
    for (size_t i = 0; i < t->size; i++)
        n += t->toks[i].added;
    t->added = malloc((n ? n : 1) * sizeof *t->added);
    if (!t->added)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
    for (size_t i = 0; i < t->size; i++)
        if (t->toks[i].added) {
            t->added[t->n_added++] = (int32_t)i;
            if (t->toks[i].len > 0)
                t->added_first[(uint8_t)s_tok_bytes(t, (int32_t)i)[0]] = 1;
        }
    /* longest first, so the first hit at a position is the longest match */
    for (size_t i = 1; i < t->n_added; i++)
        for (size_t j = i; j > 0 && t->toks[t->added[j]].len > t->toks[t->added[j - 1]].len; j--) {
            int32_t x = t->added[j];
            t->added[j] = t->added[j - 1];
            t->added[j - 1] = x;
        }
    t->eos = mm_tokenizer_token_id(t, eos_name ? eos_name : S_EOT);
    return MM_OK;
}

/* ------------------------------------------------------------------ loading: tokenizer.json */

static int s_json_id(const mm_tokenizer *t, json_t *v, const char *field, const char *name,
                     int32_t *id, char *err, size_t errlen) {
    if (!json_is_integer(v))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: %s \"%s\": id is not an integer", t->path,
                         field, name);
    json_int_t x = json_integer_value(v);
    if (x < 0 || x >= S_MAX_ID)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: %s \"%s\": id %lld out of range [0, %d)",
                         t->path, field, name, (long long)x, S_MAX_ID);
    *id = (int32_t)x;
    return MM_OK;
}

static int s_load_pre_tokenizer(mm_tokenizer *t, json_t *pt, char *err, size_t errlen) {
    if (!json_is_object(pt))
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "%s: pre_tokenizer is missing (a byte-level BPE needs ByteLevel)",
                         t->path);
    json_t *stages = pt, *one[1] = {pt};
    size_t n = 1;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (type && strcmp(type, "Sequence") == 0) {
        stages = json_object_get(pt, "pretokenizers");
        if (!json_is_array(stages))
            return mm_errorf(err, errlen, MM_EPROTO,
                             "%s: pre_tokenizer.pretokenizers is not an array", t->path);
        n = json_array_size(stages);
    }
    int seen_bl = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *st = stages == pt ? one[0] : json_array_get(stages, i);
        const char *ty = json_string_value(json_object_get(st, "type"));
        char field[64];
        snprintf(field, sizeof field, "pre_tokenizer[%zu]", i);
        if (!ty)
            return mm_errorf(err, errlen, MM_EPROTO, "%s: %s has no type", t->path, field);
        if (seen_bl)
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "%s: %s (%s) after ByteLevel is not supported", t->path, field, ty);
        if (strcmp(ty, "Split") == 0) {
            const char *beh = json_string_value(json_object_get(st, "behavior"));
            const char *re =
                json_string_value(json_object_get(json_object_get(st, "pattern"), "Regex"));
            if (!re || !beh || strcmp(beh, "Isolated") != 0 ||
                json_is_true(json_object_get(st, "invert")))
                return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                                 "%s: %s: only Split with a Regex pattern, behavior Isolated "
                                 "and invert false is supported",
                                 t->path, field);
            if (t->n_split == S_MAX_SPLITS)
                return mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: more than %d Split stages",
                                 t->path, S_MAX_SPLITS);
            int rc = s_compile(t, re, &t->split[t->n_split], field, err, errlen);
            if (rc != MM_OK)
                return rc;
            t->n_split++;
        } else if (strcmp(ty, "ByteLevel") == 0) {
            json_t *ur = json_object_get(st, "use_regex");
            seen_bl = 1;
            t->bl_regex = ur ? json_is_true(ur) : 1; /* HF's default is true */
            t->add_prefix_space = json_is_true(json_object_get(st, "add_prefix_space"));
        } else
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "%s: %s: pre-tokenizer type \"%s\" is not supported", t->path, field,
                             ty);
    }
    if (!seen_bl)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "%s: pre_tokenizer has no ByteLevel step (only byte-level BPE is "
                         "supported)",
                         t->path);
    if (t->bl_regex)
        return s_compile(t, s_gpt2_pattern, &t->gpt2, "ByteLevel regex", err, errlen);
    return MM_OK;
}

/* A merge "a b" or ["a", "b"] as two strings. */
static int s_merge_parts(json_t *m, const char **a, size_t *na, const char **b, size_t *nb) {
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t n = json_string_length(m);
        const char *sp = memchr(s, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s)))
            return MM_EPROTO;
        *a = s;
        *na = (size_t)(sp - s);
        *b = sp + 1;
        *nb = n - *na - 1;
        return MM_OK;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0));
        *na = json_string_length(json_array_get(m, 0));
        *b = json_string_value(json_array_get(m, 1));
        *nb = json_string_length(json_array_get(m, 1));
        return MM_OK;
    }
    return MM_EPROTO;
}

static int s_load_merges(mm_tokenizer *t, json_t *merges, const int16_t u2b[324], char *err,
                         size_t errlen) {
    size_t n = json_array_size(merges);
    if (s_pmap_init(&t->merges, n) != MM_OK)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory for %zu merges", t->path, n);
    if (n >= S_MAX_ID)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: model.merges has %zu entries", t->path, n);
    s_buf ba = {0}, bb = {0};
    int rc = MM_OK;
    for (size_t i = 0; i < n && rc == MM_OK; i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t na, nb;
        if (s_merge_parts(m, &a, &na, &b, &nb) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", t->path,
                           i);
            break;
        }
        if (s_unbyte(u2b, a, na, &ba) != MM_OK || s_unbyte(u2b, b, nb, &bb) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: model.merges[%zu] \"%.*s\" \"%.*s\" has a character outside the "
                           "byte-level alphabet",
                           t->path, i, (int)na, a, (int)nb, b);
            break;
        }
        int32_t ia = s_bmap_get(t, ba.p ? ba.p : "", ba.len);
        int32_t ib = s_bmap_get(t, bb.p ? bb.p : "", bb.len);
        if (ia < 0 || ib < 0) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: model.merges[%zu] \"%.*s %.*s\": token \"%.*s\" is not in "
                           "model.vocab",
                           t->path, i, (int)na, a, (int)nb, b, ia < 0 ? (int)na : (int)nb,
                           ia < 0 ? a : b);
            break;
        }
        if (s_buf_put(&ba, bb.p, bb.len) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
            break;
        }
        int32_t im = s_bmap_get(t, ba.p, ba.len);
        if (im < 0) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: model.merges[%zu] \"%.*s %.*s\": the merged token \"%.*s%.*s\" is "
                           "not in model.vocab",
                           t->path, i, (int)na, a, (int)nb, b, (int)na, a, (int)nb, b);
            break;
        }
        uint64_t key = s_pair_key(ia, ib);
        size_t slot = s_pmap_slot(&t->merges, key);
        t->merges.keys[slot] = key; /* a repeated pair keeps its last rank, as in HF */
        t->merges.rank[slot] = (int32_t)i;
        t->merges.merged[slot] = im;
    }
    free(ba.p);
    free(bb.p);
    return rc;
}

static int s_load_json(mm_tokenizer *t, const char *eos_name, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_load_file(t->path, 0, &jerr);
    if (!root)
        return mm_errorf(err, errlen, MM_EPROTO, "%s:%d:%d: not valid JSON: %s", t->path, jerr.line,
                         jerr.column, jerr.text);
    int rc = MM_OK;
    s_buf tmp = {0};
    uint32_t b2u[256];
    int16_t u2b[324];
    s_byte_unicode(b2u, u2b);
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    json_t *added = json_object_get(root, "added_tokens");
    json_t *norm = json_object_get(root, "normalizer");
    const char *type = json_string_value(json_object_get(model, "type"));
    const char *key;
    json_t *val;
    if (!json_is_object(model)) {
        rc = mm_errorf(err, errlen, MM_EPROTO, "%s: field \"model\" is missing", t->path);
        goto done;
    }
    if (type && strcmp(type, "BPE") != 0) {
        rc = mm_errorf(err, errlen, MM_EUNSUPPORTED,
                       "%s: model.type is \"%s\", only BPE is "
                       "supported",
                       t->path, type);
        goto done;
    }
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        rc = mm_errorf(err, errlen, MM_EPROTO, "%s: model.%s is missing or not an %s", t->path,
                       json_is_object(vocab) ? "merges" : "vocab",
                       json_is_object(vocab) ? "array" : "object");
        goto done;
    }
    if (norm && !json_is_null(norm)) {
        rc = mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: normalizer must be null (got \"%s\")",
                       t->path, json_string_value(json_object_get(norm, "type")) ?: "?");
        goto done;
    }
    for (const char *f = "continuing_subword_prefix"; f;
         f = strcmp(f, "end_of_word_suffix") == 0 ? NULL : "end_of_word_suffix") {
        json_t *v = json_object_get(model, f);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0)) {
            rc = mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: model.%s is not supported", t->path,
                           f);
            goto done;
        }
    }
    if (json_is_true(json_object_get(model, "byte_fallback"))) {
        rc = mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: model.byte_fallback is not supported",
                       t->path);
        goto done;
    }
    if (added && !json_is_array(added)) {
        rc = mm_errorf(err, errlen, MM_EPROTO, "%s: added_tokens is not an array", t->path);
        goto done;
    }
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));

    /* pass 1: the highest id, to size the table */
    int32_t max_id = -1, id;
    json_object_foreach(vocab, key, val) {
        if ((rc = s_json_id(t, val, "model.vocab", key, &id, err, errlen)) != MM_OK)
            goto done;
        max_id = id > max_id ? id : max_id;
    }
    size_t i;
    json_t *at;
    json_array_foreach(added, i, at) {
        json_t *content = json_object_get(at, "content");
        if (!json_is_string(content)) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s: added_tokens[%zu].content is not a string",
                           t->path, i);
            goto done;
        }
        if ((rc = s_json_id(t, json_object_get(at, "id"), "added_tokens",
                            json_string_value(content), &id, err, errlen)) != MM_OK)
            goto done;
        max_id = id > max_id ? id : max_id;
    }
    if ((rc = s_alloc_table(t, (size_t)max_id + 1, json_object_size(vocab), err, errlen)) != MM_OK)
        goto done;

    /* pass 2: fill the table */
    json_object_foreach(vocab, key, val) {
        int32_t other;
        id = (int32_t)json_integer_value(val);
        int r = s_unbyte(u2b, key, strlen(key), &tmp);
        if (r != MM_OK) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: model.vocab \"%s\": a character outside the byte-level alphabet",
                           t->path, key);
            goto done;
        }
        r = s_set_token(t, id, tmp.p ? tmp.p : "", tmp.len, &other);
        if (r == MM_EPROTO || (r == MM_OK && other == -2)) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s: model.vocab: id %d is used twice (\"%s\")",
                           t->path, id, key);
            goto done;
        }
        if (r != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
            goto done;
        }
        t->toks[id].in_bpe = 1;
        if (s_bmap_put(t, id) >= 0) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s: model.vocab: token \"%s\" appears twice",
                           t->path, key);
            goto done;
        }
    }
    json_array_foreach(added, i, at) {
        const char *content = json_string_value(json_object_get(at, "content"));
        size_t clen = json_string_length(json_object_get(at, "content"));
        int32_t other;
        id = (int32_t)json_integer_value(json_object_get(at, "id"));
        if (clen == 0) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s: added_tokens[%zu] is empty", t->path, i);
            goto done;
        }
        int r = s_set_token(t, id, content, clen, &other);
        if (r == MM_EPROTO) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: added_tokens[%zu] \"%s\": id %d already belongs to another token",
                           t->path, i, content, id);
            goto done;
        }
        if (r != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
            goto done;
        }
        t->toks[id].added = 1;
        t->toks[id].special = json_is_true(json_object_get(at, "special"));
    }
    if ((rc = s_load_merges(t, merges, u2b, err, errlen)) != MM_OK)
        goto done;
    if ((rc = s_load_pre_tokenizer(t, json_object_get(root, "pre_tokenizer"), err, errlen)) !=
        MM_OK)
        goto done;
    rc = s_finish(t, eos_name, err, errlen);
done:
    free(tmp.p);
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------ loading: tiktoken */

static int s_b64_val(int c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Strict base64 (padding required) of s[0..n) into out; MM_EPROTO when malformed. */
static int s_b64_decode(const char *s, size_t n, s_buf *out) {
    out->len = 0;
    if (n % 4 != 0)
        return MM_EPROTO;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            if (s[i + k] == '=' && i + 4 == n && k >= 2) {
                v[k] = 0;
                pad++;
            } else if (pad || (v[k] = s_b64_val((unsigned char)s[i + k])) < 0)
                return MM_EPROTO;
        }
        uint8_t b[3] = {(uint8_t)(v[0] << 2 | v[1] >> 4), (uint8_t)(v[1] << 4 | v[2] >> 2),
                        (uint8_t)(v[2] << 6 | v[3])};
        if (s_buf_put(out, b, (size_t)(3 - pad)) != MM_OK)
            return MM_ENOMEM;
    }
    return MM_OK;
}

static int s_read_file(const char *path, s_buf *out, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "%s: cannot open: %s", path, strerror(errno));
    char chunk[65536];
    size_t got;
    int rc = MM_OK;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (s_buf_put(out, chunk, got) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
            break;
        }
    if (rc == MM_OK && ferror(f))
        rc = mm_errorf(err, errlen, MM_EIO, "%s: read error: %s", path, strerror(errno));
    fclose(f);
    return rc;
}

static int s_load_tiktoken(mm_tokenizer *t, const char *eos_name, char *err, size_t errlen) {
    s_buf file = {0}, tokb = {0};
    int rc = s_read_file(t->path, &file, err, errlen);
    if (rc != MM_OK)
        goto done;
    /* pass 1: count lines and find the highest rank */
    size_t lines = 0;
    long max_rank = -1;
    for (int pass = 0; pass < 2; pass++) {
        size_t lineno = 0, pos = 0;
        while (pos < file.len) {
            const char *line = file.p + pos;
            const char *nl = memchr(line, '\n', file.len - pos);
            size_t ll = nl ? (size_t)(nl - line) : file.len - pos;
            pos += ll + (nl ? 1 : 0);
            lineno++;
            if (ll > 0 && line[ll - 1] == '\r')
                ll--;
            if (ll == 0)
                continue;
            const char *sp = memchr(line, ' ', ll);
            char num[16];
            size_t nn = sp ? ll - (size_t)(sp - line) - 1 : 0;
            char *end;
            if (!sp || nn == 0 || nn >= sizeof num) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%zu: expected \"<base64> <rank>\"",
                               t->path, lineno);
                goto done;
            }
            memcpy(num, sp + 1, nn);
            num[nn] = '\0';
            errno = 0;
            long r = strtol(num, &end, 10);
            if (*end != '\0' || errno || r < 0 || r >= S_MAX_ID - 1) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%zu: rank \"%s\" out of range [0, %d)",
                               t->path, lineno, num, S_MAX_ID - 1);
                goto done;
            }
            if (pass == 0) {
                lines++;
                max_rank = r > max_rank ? r : max_rank;
                continue;
            }
            if ((rc = s_b64_decode(line, (size_t)(sp - line), &tokb)) != MM_OK || tokb.len == 0) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%zu: token is not valid base64", t->path,
                               lineno);
                goto done;
            }
            int32_t other;
            int r2 = s_set_token(t, (int32_t)r, tokb.p, tokb.len, &other);
            if (r2 == MM_EPROTO || (r2 == MM_OK && other == -2)) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%zu: rank %ld is used twice", t->path,
                               lineno, r);
                goto done;
            }
            if (r2 != MM_OK) {
                rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
                goto done;
            }
            t->toks[r].in_bpe = 1;
            if (s_bmap_put(t, (int32_t)r) >= 0) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s:%zu: token appears twice", t->path,
                               lineno);
                goto done;
            }
        }
        if (pass == 0) {
            if (lines == 0) {
                rc = mm_errorf(err, errlen, MM_EPROTO, "%s: no tokens", t->path);
                goto done;
            }
            /* the ranks, then <|endoftext|> right after the highest */
            if ((rc = s_alloc_table(t, (size_t)max_rank + 2, lines, err, errlen)) != MM_OK)
                goto done;
        }
    }
    int32_t eot = (int32_t)max_rank + 1, other;
    if (s_set_token(t, eot, S_EOT, strlen(S_EOT), &other) != MM_OK) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", t->path);
        goto done;
    }
    t->toks[eot].added = 1;
    t->toks[eot].special = 1;
    t->tiktoken = 1;
    if ((rc = s_compile(t, s_cl100k_pattern, &t->split[0], "cl100k pattern", err, errlen)) != MM_OK)
        goto done;
    t->n_split = 1;
    rc = s_finish(t, eos_name, err, errlen);
done:
    free(file.p);
    free(tokb.p);
    return rc;
}

/* ------------------------------------------------------------------ loading: public */

static int s_ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int s_load(const char *path, const char *eos_name, mm_tokenizer **out, char *err,
                  size_t errlen) {
    *out = NULL;
    mm_tokenizer *t = s_new(path);
    if (!t)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    int rc = s_ends_with(path, ".tiktoken") ? s_load_tiktoken(t, eos_name, err, errlen)
                                            : s_load_json(t, eos_name, err, errlen);
    if (rc != MM_OK) {
        mm_tokenizer_destroy(&t);
        return rc;
    }
    *out = t;
    return MM_OK;
}

int mm_tokenizer_load_file(const char *path, mm_tokenizer **out, char *err, size_t errlen) {
    if (!path || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_tokenizer_load_file: NULL argument");
    return s_load(path, NULL, out, err, errlen);
}

/* eos_token of dir/tokenizer_config.json (a string or {"content": ...}), or NULL. */
static char *s_config_eos(const char *dir) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= sizeof path)
        return NULL;
    json_t *root = json_load_file(path, 0, NULL);
    if (!root)
        return NULL;
    json_t *e = json_object_get(root, "eos_token");
    const char *s =
        json_is_string(e) ? json_string_value(e) : json_string_value(json_object_get(e, "content"));
    char *r = s ? strdup(s) : NULL;
    json_decref(root);
    return r;
}

int mm_tokenizer_load(const char *dir, mm_tokenizer **out, char *err, size_t errlen) {
    if (!dir || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_tokenizer_load: NULL argument");
    *out = NULL;
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", dir) >= sizeof path)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: path too long", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        /* no tokenizer.json: the first *.tiktoken by name */
        DIR *d = opendir(dir);
        if (!d)
            return mm_errorf(err, errlen, MM_ENOTFOUND, "%s: cannot open directory: %s", dir,
                             strerror(errno));
        char best[1024] = "";
        struct dirent *de;
        while ((de = readdir(d)) != NULL)
            if (s_ends_with(de->d_name, ".tiktoken") && strlen(de->d_name) < sizeof best &&
                (!best[0] || strcmp(de->d_name, best) < 0))
                strcpy(best, de->d_name);
        closedir(d);
        if (!best[0])
            return mm_errorf(err, errlen, MM_ENOTFOUND,
                             "%s: no tokenizer.json and no *.tiktoken file", dir);
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, best) >= sizeof path)
            return mm_errorf(err, errlen, MM_EINVAL, "%s: path too long", dir);
    } else
        fclose(f);
    char *eos = s_config_eos(dir);
    int rc = s_load(path, eos, out, err, errlen);
    free(eos);
    return rc;
}

void mm_tokenizer_destroy(mm_tokenizer **tok) {
    if (!tok || !*tok)
        return;
    mm_tokenizer *t = *tok;
    for (size_t i = 0; i < t->n_split; i++)
        pcre2_code_free(t->split[i]);
    pcre2_code_free(t->gpt2);
    free(t->vocab.slots);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->added);
    free(t->toks);
    free(t->blob);
    free(t->path);
    free(t);
    *tok = NULL;
}

/* ------------------------------------------------------------------ encoding */

/* Per-call scratch, so encoding needs no lock. */
typedef struct s_enc {
    const mm_tokenizer *t;
    int32_t *ids;          /* output ids                              */
    size_t n, cap;         /* used / allocated                        */
    int32_t *sym;          /* BPE symbols of the current piece        */
    uint32_t *start, *len; /* byte span of each symbol in the piece   */
    int32_t *rank;         /* rank of the pair (i, i+1), INT32_MAX: none */
    int32_t *merged;       /* id the pair (i, i+1) merges into        */
    size_t scap;           /* capacity of the symbol arrays           */
    s_buf prefixed;        /* piece with the ByteLevel prefix space   */
    pcre2_match_data *md;  /* match data big enough for every pattern */
    char *err;             /* caller's error buffer                   */
    size_t errlen;
} s_enc;

static int s_emit(s_enc *e, int32_t id) {
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        int32_t *p = realloc(e->ids, cap * sizeof *p);
        if (!p)
            return MM_ENOMEM;
        e->ids = p;
        e->cap = cap;
    }
    e->ids[e->n++] = id;
    return MM_OK;
}

/* Rank and result of merging symbols i and i+1 of piece p. */
static void s_pair_rank(const s_enc *e, const char *p, size_t i) {
    const mm_tokenizer *t = e->t;
    e->rank[i] = INT32_MAX;
    if (t->tiktoken) {
        int32_t id = s_bmap_get(t, p + e->start[i], (size_t)e->len[i] + e->len[i + 1]);
        if (id >= 0) {
            e->rank[i] = id;
            e->merged[i] = id;
        }
        return;
    }
    uint64_t key = s_pair_key(e->sym[i], e->sym[i + 1]);
    size_t slot = s_pmap_slot(&t->merges, key);
    if (t->merges.keys[slot] == key) {
        e->rank[i] = t->merges.rank[slot];
        e->merged[i] = t->merges.merged[slot];
    }
}

/* BPE one piece: merge the adjacent pair of lowest rank, leftmost on ties,
 * until no pair merges. Quadratic in the piece's length, which is short for
 * text (a word); only pathological input (a 10k-character run) is slow. */
static int s_bpe(s_enc *e, const char *p, size_t n) {
    const mm_tokenizer *t = e->t;
    if (n == 0)
        return MM_OK;
    if (t->ignore_merges) {
        int32_t id = s_bmap_get(t, p, n);
        if (id >= 0)
            return s_emit(e, id);
    }
    if (n > e->scap) {
        size_t cap = n < 64 ? 64 : n;
        void *a = realloc(e->sym, cap * sizeof *e->sym);
        if (a)
            e->sym = a;
        void *b = realloc(e->start, cap * sizeof *e->start);
        if (b)
            e->start = b;
        void *c = realloc(e->len, cap * sizeof *e->len);
        if (c)
            e->len = c;
        void *d = realloc(e->rank, cap * sizeof *e->rank);
        if (d)
            e->rank = d;
        void *f = realloc(e->merged, cap * sizeof *e->merged);
        if (f)
            e->merged = f;
        if (!a || !b || !c || !d || !f)
            return MM_ENOMEM;
        e->scap = cap;
    }
    size_t m = n;
    for (size_t i = 0; i < n; i++) {
        e->sym[i] = t->byte_id[(uint8_t)p[i]];
        e->start[i] = (uint32_t)i;
        e->len[i] = 1;
    }
    for (size_t i = 0; i + 1 < m; i++)
        s_pair_rank(e, p, i);
    while (m > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < m; i++)
            if (e->rank[i] < e->rank[best])
                best = i;
        if (e->rank[best] == INT32_MAX)
            break;
        e->sym[best] = e->merged[best];
        e->len[best] += e->len[best + 1];
        size_t tail = m - best - 2; /* symbols after best + 1 */
        memmove(e->sym + best + 1, e->sym + best + 2, tail * sizeof *e->sym);
        memmove(e->start + best + 1, e->start + best + 2, tail * sizeof *e->start);
        memmove(e->len + best + 1, e->len + best + 2, tail * sizeof *e->len);
        if (tail > 0) {
            memmove(e->rank + best + 1, e->rank + best + 2, (tail - 1) * sizeof *e->rank);
            memmove(e->merged + best + 1, e->merged + best + 2, (tail - 1) * sizeof *e->merged);
        }
        m--;
        if (best + 1 < m)
            s_pair_rank(e, p, best);
        if (best > 0)
            s_pair_rank(e, p, best - 1);
    }
    for (size_t i = 0; i < m; i++)
        if (s_emit(e, e->sym[i]) != MM_OK)
            return MM_ENOMEM;
    return MM_OK;
}

/* Call fn on every match of re in p[0..n) and on the gaps between them
 * (HF's "Isolated" split). Empty matches are skipped. */
static int s_isolate(s_enc *e, const pcre2_code *re, const char *p, size_t n,
                     int (*fn)(s_enc *, size_t, const char *, size_t), size_t stage) {
    size_t off = 0, last = 0;
    while (off < n) {
        int r = pcre2_match(re, (PCRE2_SPTR)p, n, off, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(r, msg, sizeof msg);
            return mm_errorf(e->err, e->errlen, MM_ERR, "%s: pre-tokenisation regex failed: %s",
                             e->t->path, (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t s = ov[0], f = ov[1];
        if (f == s) { /* empty match: step over one character */
            off = s + 1;
            while (off < n && ((uint8_t)p[off] & 0xC0) == 0x80)
                off++;
            continue;
        }
        int rc;
        if (s > last && (rc = fn(e, stage, p + last, s - last)) != MM_OK)
            return rc;
        if ((rc = fn(e, stage, p + s, f - s)) != MM_OK)
            return rc;
        last = off = f;
    }
    if (last < n)
        return fn(e, stage, p + last, n - last);
    return MM_OK;
}

static int s_bpe_cb(s_enc *e, size_t stage, const char *p, size_t n) {
    (void)stage;
    int rc = s_bpe(e, p, n);
    return rc == MM_ENOMEM ? mm_errorf(e->err, e->errlen, rc, "encode: out of memory") : rc;
}

/* Pre-tokenise p[0..n) from Split stage `stage` on, then ByteLevel, then BPE. */
static int s_pretok(s_enc *e, size_t stage, const char *p, size_t n) {
    const mm_tokenizer *t = e->t;
    if (n == 0)
        return MM_OK;
    if (stage < t->n_split)
        return s_isolate(e, t->split[stage], p, n, s_pretok, stage + 1);
    if (t->add_prefix_space && p[0] != ' ') {
        e->prefixed.len = 0;
        if (s_buf_put(&e->prefixed, " ", 1) != MM_OK || s_buf_put(&e->prefixed, p, n) != MM_OK)
            return mm_errorf(e->err, e->errlen, MM_ENOMEM, "encode: out of memory");
        p = e->prefixed.p;
        n = e->prefixed.len;
    }
    if (t->bl_regex)
        return s_isolate(e, t->gpt2, p, n, s_bpe_cb, 0);
    return s_bpe_cb(e, 0, p, n);
}

/* The longest added token at text[i..n), or -1. */
static int32_t s_added_at(const mm_tokenizer *t, const char *text, size_t i, size_t n) {
    if (!t->added_first[(uint8_t)text[i]])
        return -1;
    for (size_t k = 0; k < t->n_added; k++) {
        const s_tok *a = &t->toks[t->added[k]];
        if (a->len <= n - i && memcmp(text + i, s_tok_bytes(t, t->added[k]), a->len) == 0)
            return t->added[k];
    }
    return -1;
}

int mm_tokenizer_encode(const mm_tokenizer *tok, const char *text, size_t len, int32_t **ids,
                        size_t *n, char *err, size_t errlen) {
    if (!tok || (!text && len) || !ids || !n)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_tokenizer_encode: NULL argument");
    *ids = NULL;
    *n = 0;
    size_t bad = s_utf8_check(text, len);
    if (bad < len)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "encode: text is not valid UTF-8 at byte %zu (0x%02x)", bad,
                         (unsigned)(uint8_t)text[bad]);
    s_enc e = {.t = tok, .err = err, .errlen = errlen};
    int rc = MM_OK;
    /* ovector of 1 pair: only the whole match is used */
    e.md = pcre2_match_data_create(1, NULL);
    if (!e.md) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "encode: out of memory");
        goto done;
    }
    size_t seg = 0;
    for (size_t i = 0; i < len;) {
        int32_t a = s_added_at(tok, text, i, len);
        if (a < 0) {
            i++;
            continue;
        }
        if ((rc = s_pretok(&e, 0, text + seg, i - seg)) != MM_OK)
            goto done;
        if (s_emit(&e, a) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "encode: out of memory");
            goto done;
        }
        i += tok->toks[a].len;
        seg = i;
    }
    if ((rc = s_pretok(&e, 0, text + seg, len - seg)) != MM_OK)
        goto done;
    *ids = e.ids;
    *n = e.n;
    e.ids = NULL;
done:
    pcre2_match_data_free(e.md);
    free(e.ids);
    free(e.sym);
    free(e.start);
    free(e.len);
    free(e.rank);
    free(e.merged);
    free(e.prefixed.p);
    return rc;
}

/* ------------------------------------------------------------------ decoding */

static int s_check_id(const mm_tokenizer *t, int32_t id, char *err, size_t errlen) {
    if (id < 0 || (size_t)id >= t->size || !t->toks[id].present)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "decode: token id %d is not in the tokenizer "
                         "(size %zu)",
                         id, t->size);
    return MM_OK;
}

int mm_tokenizer_decode(const mm_tokenizer *tok, const int32_t *ids, size_t n, unsigned flags,
                        char **out, size_t *outlen, char *err, size_t errlen) {
    if (!tok || (!ids && n) || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_tokenizer_decode: NULL argument");
    *out = NULL;
    s_buf raw = {0}, text = {0};
    int rc = MM_OK;
    for (size_t i = 0; i < n; i++) {
        if ((rc = s_check_id(tok, ids[i], err, errlen)) != MM_OK)
            goto done;
        const s_tok *k = &tok->toks[ids[i]];
        if ((flags & MM_DECODE_SKIP_SPECIAL) && k->special)
            continue;
        if (s_buf_put(&raw, s_tok_bytes(tok, ids[i]), k->len) != MM_OK) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "decode: out of memory");
            goto done;
        }
    }
    size_t used;
    if (s_utf8_lossy(raw.p ? raw.p : "", raw.len, 1, &text, &used) != MM_OK ||
        s_buf_reserve(&text, 0) != MM_OK) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "decode: out of memory");
        goto done;
    }
    text.p[text.len] = '\0';
    *out = text.p;
    if (outlen)
        *outlen = text.len;
    text.p = NULL;
done:
    free(raw.p);
    free(text.p);
    return rc;
}

/* ------------------------------------------------------------------ look-ups */

int32_t mm_tokenizer_token_id(const mm_tokenizer *tok, const char *text) {
    if (!tok || !text)
        return -1;
    size_t n = strlen(text);
    for (size_t k = 0; k < tok->n_added; k++) {
        int32_t id = tok->added[k];
        if (tok->toks[id].len == n && memcmp(s_tok_bytes(tok, id), text, n) == 0)
            return id;
    }
    return s_bmap_get(tok, text, n);
}

size_t mm_tokenizer_size(const mm_tokenizer *tok) { return tok ? tok->size : 0; }

int32_t mm_tokenizer_eos_id(const mm_tokenizer *tok) { return tok ? tok->eos : -1; }

const char *mm_tokenizer_token_bytes(const mm_tokenizer *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || (size_t)id >= tok->size || !tok->toks[id].present)
        return NULL;
    if (len)
        *len = tok->toks[id].len;
    return s_tok_bytes(tok, id);
}

int mm_tokenizer_is_special(const mm_tokenizer *tok, int32_t id) {
    return tok && id >= 0 && (size_t)id < tok->size && tok->toks[id].special;
}

const char *mm_tokenizer_path(const mm_tokenizer *tok) { return tok ? tok->path : NULL; }

/* ------------------------------------------------------------------ streaming decoder */

int mm_detok_new(const mm_tokenizer *tok, unsigned flags, mm_detok **out) {
    if (!tok || !out)
        return MM_EINVAL;
    *out = calloc(1, sizeof **out);
    if (!*out)
        return MM_ENOMEM;
    (*out)->tok = tok;
    (*out)->flags = flags;
    return MM_OK;
}

void mm_detok_destroy(mm_detok **dt) {
    if (!dt || !*dt)
        return;
    free((*dt)->out);
    free(*dt);
    *dt = NULL;
}

/* Decode pend + extra into dt->out, keeping back an unfinished tail unless final. */
static int s_detok_run(mm_detok *dt, const char *extra, size_t n, int final, const char **piece,
                       size_t *len) {
    s_buf in = {0}, out = {.p = dt->out, .len = 0, .cap = dt->out_cap};
    int rc = MM_ENOMEM;
    size_t used;
    if (s_buf_put(&in, dt->pend, dt->n_pend) != MM_OK || s_buf_put(&in, extra, n) != MM_OK ||
        s_buf_reserve(&out, 0) != MM_OK)
        goto done;
    if (s_utf8_lossy(in.p, in.len, final, &out, &used) != MM_OK)
        goto done;
    dt->n_pend = in.len - used; /* at most 3: an unfinished sequence */
    memcpy(dt->pend, in.p + used, dt->n_pend);
    out.p[out.len] = '\0';
    *piece = out.p;
    *len = out.len;
    rc = MM_OK;
done:
    dt->out = out.p;
    dt->out_cap = out.cap;
    free(in.p);
    return rc;
}

int mm_detok_push(mm_detok *dt, int32_t id, const char **piece, size_t *len, char *err,
                  size_t errlen) {
    if (!dt || !piece || !len)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_detok_push: NULL argument");
    *piece = "";
    *len = 0;
    int rc = s_check_id(dt->tok, id, err, errlen);
    if (rc != MM_OK)
        return rc;
    const s_tok *k = &dt->tok->toks[id];
    size_t n = ((dt->flags & MM_DECODE_SKIP_SPECIAL) && k->special) ? 0 : k->len;
    rc = s_detok_run(dt, s_tok_bytes(dt->tok, id), n, 0, piece, len);
    return rc == MM_OK ? rc : mm_errorf(err, errlen, rc, "detok: out of memory");
}

int mm_detok_flush(mm_detok *dt, const char **piece, size_t *len) {
    if (!dt || !piece || !len)
        return MM_EINVAL;
    return s_detok_run(dt, "", 0, 1, piece, len);
}

/* test_tokenizer.c — the C side of the tokenizer tests (driven by
 * tests/test_tokenizer.py, which compares with tests/reference/bpe_ref.py).
 *
 *   test_tokenizer encode PATH CORPUS [--no-roundtrip]
 *                                       one JSON id list per corpus line, then
 *                                       one for the whole file; checks that
 *                                       decode and the streaming decoder give
 *                                       the text back
 *   test_tokenizer prompt DIR CORPUS    {"mode":..,"image":..,"before":[..],"after":[..]}
 *                                       per line x conv mode x image/no image
 *   test_tokenizer load PATH            "OK size eos" or "ERR STATUS message"
 *   test_tokenizer unit GPT2DIR         self-checks (streaming, errors, look-ups)
 * PATH is a directory, or a tokenizer.json / *.tiktoken file. Exit 0 = pass.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prompt.h"
#include "tokenizer.h"

static int g_failed;
static int g_roundtrip = 1; /* 0 with --no-roundtrip (add_prefix_space adds text) */

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            g_failed++;                                                                            \
        }                                                                                          \
    } while (0)

static int load_any(const char *path, mm_tokenizer **tok, char *err, size_t errlen) {
    size_t n = strlen(path);
    if ((n > 5 && strcmp(path + n - 5, ".json") == 0) ||
        (n > 9 && strcmp(path + n - 9, ".tiktoken") == 0))
        return mm_tokenizer_load_file(path, tok, err, errlen);
    return mm_tokenizer_load(path, tok, err, errlen);
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0, got;
    char *p = malloc(cap + 1);
    while (p && (got = fread(p + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *q = realloc(p, cap * 2 + 1);
            if (!q) {
                free(p);
                p = NULL;
                break;
            }
            p = q;
            cap *= 2;
        }
    }
    fclose(f);
    if (p)
        p[n] = '\0';
    *len = n;
    return p;
}

static void print_ids(const int32_t *ids, size_t n) {
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf(i ? ",%d" : "%d", ids[i]);
    putchar(']');
}

/* Encode text, print the ids, check decode and streaming decode. */
static void encode_one(const mm_tokenizer *tok, const char *text, size_t len) {
    char err[512];
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = mm_tokenizer_encode(tok, text, len, &ids, &n, err, sizeof err);
    CHECK(rc == MM_OK, "encode: %s", err);
    print_ids(ids, n);
    putchar('\n');
    char *back = NULL;
    size_t blen = 0;
    rc = mm_tokenizer_decode(tok, ids, n, 0, &back, &blen, err, sizeof err);
    CHECK(rc == MM_OK && (!g_roundtrip || (blen == len && memcmp(back, text, len) == 0)),
          "decode(encode(x)) != x for \"%.*s\"", (int)len, text);
    /* streaming: the pieces concatenate to the text */
    mm_detok *dt = NULL;
    CHECK(mm_detok_new(tok, 0, &dt) == MM_OK, "detok_new");
    char *acc = malloc(blen + 16);
    size_t alen = 0;
    const char *piece;
    size_t plen;
    for (size_t i = 0; i < n && dt; i++) {
        rc = mm_detok_push(dt, ids[i], &piece, &plen, err, sizeof err);
        CHECK(rc == MM_OK, "detok_push: %s", err);
        if (rc == MM_OK && alen + plen <= blen + 8) {
            memcpy(acc + alen, piece, plen);
            alen += plen;
        }
    }
    if (dt && mm_detok_flush(dt, &piece, &plen) == MM_OK && alen + plen <= blen + 8) {
        memcpy(acc + alen, piece, plen);
        alen += plen;
    }
    CHECK(alen == blen && memcmp(acc, back, blen) == 0, "streaming decode != decode for \"%.*s\"",
          (int)len, text);
    mm_detok_destroy(&dt);
    free(acc);
    free(back);
    free(ids);
}

static int cmd_encode(const char *path, const char *corpus) {
    char err[512];
    mm_tokenizer *tok = NULL;
    if (load_any(path, &tok, err, sizeof err) != MM_OK) {
        fprintf(stderr, "load: %s\n", err);
        return 1;
    }
    size_t len;
    char *text = read_all(corpus, &len);
    if (!text) {
        fprintf(stderr, "%s: cannot read\n", corpus);
        mm_tokenizer_destroy(&tok);
        return 1;
    }
    /* lines as Python's str.split("\n") gives them (a final newline gives a last, empty one) */
    for (size_t s = 0;;) {
        char *nl = memchr(text + s, '\n', len - s);
        size_t e = nl ? (size_t)(nl - text) : len;
        encode_one(tok, text + s, e - s);
        if (!nl)
            break;
        s = e + 1;
    }
    encode_one(tok, text, len);
    free(text);
    mm_tokenizer_destroy(&tok);
    return g_failed ? 1 : 0;
}

static int cmd_prompt(const char *path, const char *corpus) {
    char err[512];
    mm_tokenizer *tok = NULL;
    if (load_any(path, &tok, err, sizeof err) != MM_OK) {
        fprintf(stderr, "load: %s\n", err);
        return 1;
    }
    size_t len;
    char *text = read_all(corpus, &len);
    for (size_t s = 0; text;) {
        char *nl = memchr(text + s, '\n', len - s);
        size_t e = nl ? (size_t)(nl - text) : len;
        for (int mode = 0; mode < 3; mode++)
            for (int img = 1; img >= 0; img--) {
                mm_prompt_ids p;
                int rc = mm_prompt_tokenize(tok, (mm_conv_mode)mode, text + s, e - s, img, &p, err,
                                            sizeof err);
                CHECK(rc == MM_OK, "prompt: %s", err);
                CHECK(p.has_image == img, "has_image");
                printf("{\"mode\":\"%s\",\"image\":%d,\"before\":", mm_conv_mode_name(mode), img);
                print_ids(p.before, p.n_before);
                printf(",\"after\":");
                print_ids(p.after, p.n_after);
                printf("}\n");
                mm_prompt_ids_clear(&p);
            }
        if (!nl)
            break;
        s = e + 1;
    }
    free(text);
    mm_tokenizer_destroy(&tok);
    return g_failed ? 1 : 0;
}

static int cmd_load(const char *path) {
    char err[1024] = "";
    mm_tokenizer *tok = NULL;
    int rc = load_any(path, &tok, err, sizeof err);
    if (rc == MM_OK)
        printf("OK %zu %d\n", mm_tokenizer_size(tok), mm_tokenizer_eos_id(tok));
    else
        printf("ERR %s %s\n", mm_status_str(rc), err);
    CHECK((rc == MM_OK) == (tok != NULL), "out pointer on %s", mm_status_str(rc));
    mm_tokenizer_destroy(&tok);
    mm_tokenizer_destroy(&tok); /* idempotent */
    return g_failed ? 1 : 0;
}

/* Push ids, return the concatenated output (static buffer) of push + flush. */
static const char *stream(const mm_tokenizer *tok, unsigned flags, const int32_t *ids, size_t n,
                          int flush, size_t *outlen, size_t *first_len) {
    static char buf[256];
    char err[256];
    size_t o = 0;
    mm_detok *dt = NULL;
    const char *piece;
    size_t plen;
    if (mm_detok_new(tok, flags, &dt) != MM_OK)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (mm_detok_push(dt, ids[i], &piece, &plen, err, sizeof err) != MM_OK)
            plen = 0;
        if (i == 0 && first_len)
            *first_len = plen;
        memcpy(buf + o, piece, plen);
        o += plen;
    }
    if (flush && mm_detok_flush(dt, &piece, &plen) == MM_OK) {
        memcpy(buf + o, piece, plen);
        o += plen;
    }
    buf[o] = '\0';
    *outlen = o;
    mm_detok_destroy(&dt);
    return buf;
}

static int32_t byte_tok(const mm_tokenizer *tok, unsigned char b) {
    char s[2] = {(char)b, 0};
    return b ? mm_tokenizer_token_id(tok, s) : -1;
}

static int cmd_unit(const char *dir) {
    char err[512];
    mm_tokenizer *tok = NULL;
    if (mm_tokenizer_load(dir, &tok, err, sizeof err) != MM_OK) {
        fprintf(stderr, "load: %s\n", err);
        return 1;
    }
    /* look-ups */
    int32_t eos = mm_tokenizer_eos_id(tok);
    CHECK(eos >= 0 && eos == mm_tokenizer_token_id(tok, "<|endoftext|>"), "eos %d", eos);
    CHECK(mm_tokenizer_is_special(tok, eos), "eos special");
    CHECK(mm_tokenizer_token_id(tok, "no-such-token-xyz") == -1, "absent token");
    CHECK(mm_tokenizer_token_id(tok, " the") >= 0, "\" the\" is in the vocabulary");
    CHECK(mm_tokenizer_size(tok) > (size_t)eos, "size %zu", mm_tokenizer_size(tok));
    size_t bl = 0;
    const char *bytes = mm_tokenizer_token_bytes(tok, eos, &bl);
    CHECK(bytes && bl == 13 && memcmp(bytes, "<|endoftext|>", 13) == 0, "eos bytes");
    CHECK(mm_tokenizer_token_bytes(tok, -1, &bl) == NULL, "id -1");
    CHECK(mm_tokenizer_token_bytes(tok, (int32_t)mm_tokenizer_size(tok), &bl) == NULL, "id size");

    /* streaming: "中" (E4 B8 AD) as three byte tokens comes out only when complete */
    int32_t zh[3] = {byte_tok(tok, 0xE4), byte_tok(tok, 0xB8), byte_tok(tok, 0xAD)};
    size_t olen, first = 99;
    const char *o = stream(tok, 0, zh, 2, 0, &olen, &first);
    CHECK(o && olen == 0 && first == 0, "held back, got %zu bytes", olen);
    o = stream(tok, 0, zh, 3, 0, &olen, NULL);
    CHECK(o && olen == 3 && memcmp(o, "\xE4\xB8\xAD", 3) == 0, "complete character");
    o = stream(tok, 0, zh, 2, 1, &olen, NULL); /* flushed unfinished -> one U+FFFD */
    CHECK(o && strcmp(o, "\xEF\xBF\xBD") == 0, "flush unfinished: \"%s\"", o ? o : "");
    int32_t zha[3] = {zh[0], zh[1], byte_tok(tok, 'A')};
    o = stream(tok, 0, zha, 3, 1, &olen, NULL);
    CHECK(o && strcmp(o, "\xEF\xBF\xBD"
                         "A") == 0,
          "broken then A: \"%s\"", o ? o : "");
    int32_t ff[2] = {byte_tok(tok, 0xFF), byte_tok(tok, 'b')};
    o = stream(tok, 0, ff, 2, 1, &olen, NULL);
    CHECK(o && strcmp(o, "\xEF\xBF\xBD"
                         "b") == 0,
          "invalid byte: \"%s\"", o ? o : "");
    /* 4-byte emoji split 1 + 3 */
    int32_t em[4] = {byte_tok(tok, 0xF0), byte_tok(tok, 0x9F), byte_tok(tok, 0x99),
                     byte_tok(tok, 0x82)};
    o = stream(tok, 0, em, 4, 1, &olen, &first);
    CHECK(o && first == 0 && strcmp(o, "\xF0\x9F\x99\x82") == 0, "emoji");
    /* decode agrees with the streaming rules */
    char *d = NULL;
    size_t dl;
    CHECK(mm_tokenizer_decode(tok, zha, 3, 0, &d, &dl, err, sizeof err) == MM_OK &&
              strcmp(d, "\xEF\xBF\xBD"
                        "A") == 0,
          "lossy decode");
    free(d);
    /* skip special */
    int32_t sp[3] = {byte_tok(tok, 'x'), eos, byte_tok(tok, 'y')};
    CHECK(mm_tokenizer_decode(tok, sp, 3, MM_DECODE_SKIP_SPECIAL, &d, &dl, err, sizeof err) ==
                  MM_OK &&
              strcmp(d, "xy") == 0,
          "skip special");
    free(d);
    o = stream(tok, MM_DECODE_SKIP_SPECIAL, sp, 3, 1, &olen, NULL);
    CHECK(o && strcmp(o, "xy") == 0, "stream skip special");
    o = stream(tok, 0, sp, 3, 1, &olen, NULL);
    CHECK(o && strcmp(o, "x<|endoftext|>y") == 0, "stream with special");
    int32_t bad[1] = {(int32_t)mm_tokenizer_size(tok) + 5};
    d = NULL;
    CHECK(mm_tokenizer_decode(tok, bad, 1, 0, &d, &dl, err, sizeof err) == MM_EINVAL && !d,
          "bad id");
    CHECK(strstr(err, "not in the tokenizer") != NULL, "message: %s", err);

    /* encode: invalid UTF-8 is refused with the offset; empty text is fine */
    int32_t *ids = NULL;
    size_t n = 7;
    CHECK(mm_tokenizer_encode(tok, "abc\xC3(", 5, &ids, &n, err, sizeof err) == MM_EINVAL,
          "invalid UTF-8");
    CHECK(strstr(err, "byte 3") != NULL, "message: %s", err);
    CHECK(mm_tokenizer_encode(tok, "\xED\xA0\x80", 3, &ids, &n, err, sizeof err) == MM_EINVAL,
          "surrogate");
    CHECK(mm_tokenizer_encode(tok, "\xC0\xAF", 2, &ids, &n, err, sizeof err) == MM_EINVAL,
          "overlong");
    CHECK(mm_tokenizer_encode(tok, "", 0, &ids, &n, err, sizeof err) == MM_OK && n == 0, "empty");
    free(ids);
    /* NUL bytes are ordinary text */
    CHECK(mm_tokenizer_encode(tok, "a\0b", 3, &ids, &n, err, sizeof err) == MM_OK && n >= 2, "NUL");
    CHECK(mm_tokenizer_decode(tok, ids, n, 0, &d, &dl, err, sizeof err) == MM_OK && dl == 3 &&
              memcmp(d, "a\0b", 3) == 0,
          "NUL round trip");
    free(d);
    free(ids);
    /* a special token in the text is one id, never split */
    CHECK(mm_tokenizer_encode(tok, "a<|endoftext|>b", 15, &ids, &n, err, sizeof err) == MM_OK &&
              n == 3 && ids[1] == eos,
          "special in text");
    free(ids);
    /* a long run (quadratic BPE stays fast enough) */
    size_t big = 6000;
    char *run = malloc(big);
    for (size_t i = 0; i < big; i++)
        run[i] = "lesion"[i % 6];
    CHECK(mm_tokenizer_encode(tok, run, big, &ids, &n, err, sizeof err) == MM_OK && n > 0 &&
              n < big,
          "long run");
    free(ids);
    free(run);

    /* prompts */
    mm_conv_mode mode;
    CHECK(mm_conv_mode_parse("simple", &mode, err, sizeof err) == MM_OK && mode == MM_CONV_SIMPLE,
          "parse simple");
    CHECK(mm_conv_mode_parse("vicuna", &mode, err, sizeof err) == MM_EINVAL &&
              strstr(err, "phi, stablelm, simple"),
          "parse bad: %s", err);
    CHECK(strcmp(mm_conv_stop_string(MM_CONV_PHI), "<|endoftext|>") == 0 &&
              strcmp(mm_conv_stop_string(MM_CONV_SIMPLE), "###") == 0,
          "stop strings");
    char *text = NULL;
    size_t tl;
    const char *q = " <image>\n Is there a lesion in the left lung?\t\xC2\xA0";
    CHECK(mm_prompt_render(MM_CONV_PHI, q, strlen(q), 1, &text, &tl, err, sizeof err) == MM_OK,
          "render");
    const char *want =
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs "
        "there a lesion in the left lung? ASSISTANT:";
    CHECK(text && strcmp(text, want) == 0, "phi prompt: \"%s\"", text ? text : "");
    free(text);
    CHECK(mm_prompt_render(MM_CONV_SIMPLE, "Q?", 2, 0, &text, &tl, err, sizeof err) == MM_OK,
          "render simple");
    CHECK(text && strstr(text, "today?\n###Human: Q?###Assistant:") && !strstr(text, "<image>") &&
              strncmp(text, "You are LLaVA-Med", 17) == 0 && tl == strlen(text),
          "simple prompt: \"%s\"", text ? text : "");
    free(text);
    mm_prompt_ids p;
    CHECK(mm_prompt_tokenize(tok, MM_CONV_PHI, "\xFF", 1, 1, &p, err, sizeof err) == MM_EINVAL &&
              p.before == NULL && p.after == NULL,
          "bad question");

    mm_tokenizer_destroy(&tok);
    CHECK(tok == NULL, "destroy clears the pointer");
    printf("%d failed\n", g_failed);
    return g_failed ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "encode") == 0 && strcmp(argv[4], "--no-roundtrip") == 0)
        g_roundtrip = 0;
    if ((argc == 4 || !g_roundtrip) && strcmp(argv[1], "encode") == 0)
        return cmd_encode(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "prompt") == 0)
        return cmd_prompt(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "load") == 0)
        return cmd_load(argv[2]);
    if (argc == 3 && strcmp(argv[1], "unit") == 0)
        return cmd_unit(argv[2]);
    fprintf(stderr, "usage: test_tokenizer encode|prompt PATH CORPUS | load PATH | unit DIR\n");
    return 2;
}

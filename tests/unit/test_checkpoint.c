/* test_checkpoint.c — safetensors files and checkpoint directories (valid,
 * sharded, every malformed case, truncation and byte-flip fuzzing), config.json
 * parsing of both backbones and the CLIP tower, SHA-256 and fingerprints.
 *
 * Files are written at test time into a scratch directory (argv[1], else a
 * mkdtemp under /tmp). Plain C: returns nonzero when any check fails.
 *
 * One file (over 900 lines) because every case shares the writers of valid
 * and broken files at the top; split, each part would repeat them.
 */
#include <dirent.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "fingerprint.h"
#include "safetensors.h"
#include "hash.h"

static int g_fail, g_checks;
static char g_root[512];

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        g_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            g_fail++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

/* rc must equal want and err must contain each of up to three substrings. */
#define EXPECT_ERR(rc, want, err, s1, s2, s3)                                                      \
    s_expect_err(__FILE__, __LINE__, rc, want, err, s1, s2, s3)

static void s_expect_err(const char *file, int line, int rc, int want, const char *err,
                         const char *s1, const char *s2, const char *s3) {
    g_checks++;
    const char *subs[3] = {s1, s2, s3};
    int ok = rc == want;
    for (int i = 0; i < 3; i++)
        if (subs[i] && !strstr(err, subs[i]))
            ok = 0;
    if (!ok) {
        g_fail++;
        fprintf(stderr, "%s:%d: got %s \"%s\", want %s containing [%s] [%s] [%s]\n", file, line,
                mm_status_str(rc), err, mm_status_str(want), s1 ? s1 : "", s2 ? s2 : "",
                s3 ? s3 : "");
    }
}

/* ==== writing safetensors files =========================================== */

typedef struct tspec {
    const char *name;
    const char *dtype;
    int ndim;
    size_t shape[4];
    const void *data;
    size_t nbytes;
} tspec;

static char *s_path(const char *sub, const char *name) {
    static char buf[8][1024];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 1024, "%s/%s%s%s", g_root, sub, name ? "/" : "", name ? name : "");
    return p;
}

static void s_mkdir(const char *sub) {
    char *p = s_path(sub, NULL);
    mkdir(p, 0755);
    /* Leave no stale files from an earlier run in this case's directory. */
    DIR *d = opendir(p);
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL)
        if (de->d_name[0] != '.') {
            char f[1200];
            snprintf(f, sizeof f, "%s/%s", p, de->d_name);
            unlink(f);
        }
    if (d)
        closedir(d);
}

static void s_write_raw(const char *path, const void *a, size_t na) {
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        perror(path);
        exit(2);
    }
    if (na)
        fwrite(a, 1, na, fp);
    fclose(fp);
}

/* u64 header length + header text + data bytes. */
static void s_write_st_raw(const char *path, const char *header, const void *data, size_t nd) {
    size_t hl = strlen(header);
    size_t total = 8 + hl + nd;
    unsigned char *b = malloc(total);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    if (nd)
        memcpy(b + 8 + hl, data, nd);
    s_write_raw(path, b, total);
    free(b);
}

/* A well-formed file from specs (header padded with spaces to 8 bytes). */
static void s_write_st(const char *path, const tspec *ts, size_t n, const char *meta_json) {
    json_t *root = json_object();
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_object(), *sh = json_array();
        for (int d = 0; d < ts[i].ndim; d++)
            json_array_append_new(sh, json_integer((json_int_t)ts[i].shape[d]));
        json_object_set_new(e, "dtype", json_string(ts[i].dtype));
        json_object_set_new(e, "shape", sh);
        json_object_set_new(e, "data_offsets",
                            json_pack("[I, I]", (json_int_t)off, (json_int_t)(off + ts[i].nbytes)));
        json_object_set_new(root, ts[i].name, e);
        off += ts[i].nbytes;
    }
    if (meta_json)
        json_object_set_new(root, "__metadata__", json_loads(meta_json, 0, NULL));
    char *h = json_dumps(root, JSON_COMPACT);
    size_t hl = strlen(h), pad = (8 - hl % 8) % 8;
    char *hp = malloc(hl + pad + 1);
    memcpy(hp, h, hl);
    memset(hp + hl, ' ', pad);
    hp[hl + pad] = '\0';
    unsigned char *data = malloc(off ? off : 1);
    off = 0;
    for (size_t i = 0; i < n; i++) {
        if (ts[i].nbytes)
            memcpy(data + off, ts[i].data, ts[i].nbytes);
        off += ts[i].nbytes;
    }
    s_write_st_raw(path, hp, data, off);
    free(data);
    free(hp);
    free(h);
    json_decref(root);
}

static unsigned char *s_read_all(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    *len = fread(b, 1, (size_t)n, fp);
    fclose(fp);
    return b;
}

/* ==== the fixture tensors ================================================= */

static float g_w[6] = {1, 2, 3, 4, 5, -6.5f};
static uint16_t g_h[4] = {0x3c00, 0x4000, 0xc000, 0x0000};  /* f16 1, 2, -2, 0 */
static uint16_t g_bf[4] = {0x3f80, 0x4040, 0xbf80, 0x0000}; /* bf16 1, 3, -1, 0 */
static int64_t g_pos[5] = {0, 1, 2, 3, 4};
static float g_scalar = 42.0f;

static tspec g_specs[] = {
    {"model.embed_tokens.weight", "F32", 2, {2, 3}, g_w, sizeof g_w},
    {"model.norm.weight", "F16", 1, {4}, g_h, sizeof g_h},
    {"lm_head.weight", "BF16", 2, {2, 2}, g_bf, sizeof g_bf},
    {"vision_model.embeddings.position_ids", "I64", 2, {1, 5}, g_pos, sizeof g_pos},
    {"scale", "F32", 0, {0}, &g_scalar, sizeof g_scalar},
    {"empty", "F32", 2, {0, 4}, NULL, 0},
};
#define NSPECS (sizeof g_specs / sizeof g_specs[0])

static void s_check_fixture(const mm_checkpoint *ck) {
    char err[512];
    const mm_st_tensor *t;
    CHECK(mm_checkpoint_count(ck) == NSPECS);
    /* Iteration is in name order. */
    for (size_t i = 1; i < mm_checkpoint_count(ck); i++)
        CHECK(strcmp(mm_checkpoint_at(ck, i - 1)->name, mm_checkpoint_at(ck, i)->name) < 0);
    CHECK(mm_checkpoint_at(ck, NSPECS) == NULL);

    size_t want[2] = {2, 3};
    CHECK(mm_checkpoint_get(ck, "model.embed_tokens.weight", 2, want, &t, err, sizeof err) ==
          MM_OK);
    if (t) {
        CHECK(t->dtype == MM_F32 && t->st_dtype == MM_ST_F32 && t->usable);
        CHECK(t->nelem == 6 && t->nbytes == 24 && t->ndim == 2);
        CHECK(memcmp(t->data, g_w, sizeof g_w) == 0);
    }
    t = mm_checkpoint_find(ck, "model.norm.weight");
    CHECK(t && t->dtype == MM_F16 && t->shape[0] == 4 && memcmp(t->data, g_h, sizeof g_h) == 0);
    t = mm_checkpoint_find(ck, "lm_head.weight");
    CHECK(t && t->dtype == MM_BF16 && memcmp(t->data, g_bf, sizeof g_bf) == 0);
    if (t) {
        float f[4];
        mm_convert_to_f32(f, t->data, t->dtype, 4);
        CHECK(f[0] == 1.0f && f[1] == 3.0f && f[2] == -1.0f && f[3] == 0.0f);
    }
    t = mm_checkpoint_find(ck, "scale");
    CHECK(t && t->ndim == 0 && t->nelem == 1 && memcmp(t->data, &g_scalar, 4) == 0);
    t = mm_checkpoint_find(ck, "empty");
    CHECK(t && t->nelem == 0 && t->nbytes == 0);
    CHECK(mm_checkpoint_find(ck, "nope") == NULL);

    /* Any-shape and wildcard getters. */
    CHECK(mm_checkpoint_get(ck, "model.embed_tokens.weight", 2, NULL, &t, err, sizeof err) ==
          MM_OK);
    size_t wild[2] = {MM_ANY_DIM, 3};
    CHECK(mm_checkpoint_get(ck, "model.embed_tokens.weight", 2, wild, &t, err, sizeof err) ==
          MM_OK);
    CHECK(mm_checkpoint_get(ck, "model.embed_tokens.weight", 0, NULL, &t, err, sizeof err) ==
          MM_OK);

    /* Errors of the checked getter. */
    size_t bad[2] = {3, 2};
    int rc = mm_checkpoint_get(ck, "model.embed_tokens.weight", 2, bad, &t, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "tensor 'model.embed_tokens.weight'",
               "has shape [2, 3], expected [3, 2]", ".safetensors");
    CHECK(t == NULL);
    rc = mm_checkpoint_get(ck, "model.norm.weight", 2, NULL, &t, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'model.norm.weight'", "has shape [4], expected 2 dims", NULL);
    rc = mm_checkpoint_get(ck, "missing.weight", 2, NULL, &t, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "tensor 'missing.weight' not found in", g_root, NULL);
    rc =
        mm_checkpoint_get(ck, "vision_model.embeddings.position_ids", 2, NULL, &t, err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "'vision_model.embeddings.position_ids'", "I64",
               ".safetensors");
    t = mm_checkpoint_find(ck, "vision_model.embeddings.position_ids");
    CHECK(t && !t->usable && t->st_dtype == MM_ST_I64 && memcmp(t->data, g_pos, 40) == 0);
}

/* ==== valid checkpoints =================================================== */

static void test_single(void) {
    char err[512];
    s_mkdir("single");
    s_write_st(s_path("single", "model.safetensors"), g_specs, NSPECS,
               "{\"format\": \"pt\", \"expert_names\": \"MRI,CT,PATH,XRAY\"}");
    mm_checkpoint *ck = NULL;
    int rc = mm_checkpoint_open(s_path("single", NULL), &ck, err, sizeof err);
    CHECK(rc == MM_OK);
    if (rc != MM_OK) {
        fprintf(stderr, "  %s\n", err);
        return;
    }
    s_check_fixture(ck);
    CHECK(mm_checkpoint_file_count(ck) == 1);
    const char *v = mm_checkpoint_metadata(ck, "expert_names");
    CHECK(v && strcmp(v, "MRI,CT,PATH,XRAY") == 0);
    CHECK(mm_checkpoint_metadata(ck, "nope") == NULL);
    const mm_st_file *f = mm_checkpoint_file_at(ck, 0);
    CHECK(mm_st_metadata_count(f) == 2);
    const char *k;
    CHECK(mm_st_metadata_at(f, 0, &k, &v) == MM_OK && strcmp(k, "expert_names") == 0);
    CHECK(mm_st_metadata_at(f, 2, &k, &v) == MM_EINVAL);
    mm_checkpoint_destroy(&ck);
    CHECK(ck == NULL);
    mm_checkpoint_destroy(&ck); /* idempotent */

    /* A file path works as a one-file checkpoint; trailing slashes are fine. */
    rc = mm_checkpoint_open(s_path("single", "model.safetensors"), &ck, err, sizeof err);
    CHECK(rc == MM_OK);
    if (ck)
        s_check_fixture(ck);
    mm_checkpoint_destroy(&ck);
    char slash[1100];
    snprintf(slash, sizeof slash, "%s//", s_path("single", NULL));
    rc = mm_checkpoint_open(slash, &ck, err, sizeof err);
    CHECK(rc == MM_OK && ck && strstr(mm_st_path(mm_checkpoint_file_at(ck, 0)), "//") == NULL);
    mm_checkpoint_destroy(&ck);
}

static const char *g_shard1 = "model-00001-of-00002.safetensors";
static const char *g_shard2 = "model-00002-of-00002.safetensors";

static void s_write_index(const char *sub, const char *extra_name, const char *extra_shard) {
    json_t *wm = json_object();
    for (size_t i = 0; i < NSPECS; i++)
        json_object_set_new(wm, g_specs[i].name, json_string(i < 3 ? g_shard1 : g_shard2));
    if (extra_name)
        json_object_set_new(wm, extra_name, json_string(extra_shard));
    json_t *root = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 123, "weight_map", wm);
    json_dump_file(root, s_path(sub, "model.safetensors.index.json"), JSON_INDENT(2));
    json_decref(root);
}

static void test_sharded(void) {
    char err[512];
    s_mkdir("sharded");
    s_write_st(s_path("sharded", g_shard1), g_specs, 3, "{\"format\": \"pt\"}");
    s_write_st(s_path("sharded", g_shard2), g_specs + 3, NSPECS - 3, NULL);
    s_write_index("sharded", NULL, NULL);
    mm_checkpoint *ck = NULL;
    int rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    CHECK(rc == MM_OK);
    if (rc != MM_OK) {
        fprintf(stderr, "  %s\n", err);
        return;
    }
    s_check_fixture(ck);
    CHECK(mm_checkpoint_file_count(ck) == 2);
    CHECK(strstr(mm_checkpoint_find(ck, "scale")->file, g_shard2) != NULL);
    CHECK(strstr(mm_checkpoint_find(ck, "lm_head.weight")->file, g_shard1) != NULL);
    CHECK(mm_checkpoint_metadata(ck, "format") != NULL);
    mm_checkpoint_destroy(&ck);

    /* A missing shard. */
    s_write_index("sharded", "extra.weight", "model-00003-of-00002.safetensors");
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "model-00003-of-00002.safetensors", "'extra.weight'",
               "index.json");
    CHECK(ck == NULL);
    /* Names that would leave the directory. */
    s_write_index("sharded", "extra.weight", "../single/model.safetensors");
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'extra.weight'", "../single/model.safetensors",
               "not a plain file name");
    s_write_index("sharded", "extra.weight", "/etc/passwd");
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'extra.weight'", "/etc/passwd", NULL);
    s_write_index("sharded", "extra.weight", "..");
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'extra.weight'", NULL, NULL);
    s_write_index("sharded", "extra.weight", "");
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'extra.weight'", NULL, NULL);
    /* A tensor mapped to a shard that does not hold it. */
    s_write_index("sharded", "extra.weight", g_shard2);
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'extra.weight'", g_shard2, "does not hold it");
    /* A malformed index. */
    s_write_raw(s_path("sharded", "model.safetensors.index.json"), "{\"weight_map\": [", 16);
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "model.safetensors.index.json", "not valid JSON", NULL);
    s_write_raw(s_path("sharded", "model.safetensors.index.json"), "{\"metadata\": {}}", 16);
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "model.safetensors.index.json", "weight_map", NULL);
    const char *nonstr = "{\"weight_map\": {\"a\": 3}}";
    s_write_raw(s_path("sharded", "model.safetensors.index.json"), nonstr, strlen(nonstr));
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "tensor 'a'", "not a string", NULL);

    /* No index: every *.safetensors in the directory. */
    unlink(s_path("sharded", "model.safetensors.index.json"));
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    CHECK(rc == MM_OK);
    if (ck)
        s_check_fixture(ck);
    mm_checkpoint_destroy(&ck);
    /* ... where a name in two files is an error. */
    s_write_st(s_path("sharded", "zz.safetensors"), g_specs, 1, NULL);
    rc = mm_checkpoint_open(s_path("sharded", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'model.embed_tokens.weight'", "zz.safetensors", g_shard1);

    /* Nothing there at all. */
    s_mkdir("emptydir");
    rc = mm_checkpoint_open(s_path("emptydir", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "emptydir", "no model.safetensors", NULL);
    rc = mm_checkpoint_open(s_path("does-not-exist", NULL), &ck, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "does-not-exist", NULL, NULL);
}

/* ==== malformed files ===================================================== */

/* Write header text + nd zero data bytes as bad/NAME, open, expect. */
static void s_bad(const char *fname, const char *header, size_t nd, int want, const char *s1,
                  const char *s2, int line) {
    char err[512] = "";
    unsigned char *data = calloc(nd ? nd : 1, 1);
    char *p = s_path("bad", fname);
    s_write_st_raw(p, header, data, nd);
    free(data);
    mm_st_file *f = (mm_st_file *)1;
    int rc = mm_st_open(p, &f, err, sizeof err);
    if (want == MM_OK) {
        s_expect_err(__FILE__, line, rc, want, err, NULL, NULL, NULL);
        CHECK(rc != MM_OK || f != NULL);
        mm_st_destroy(&f);
        return;
    }
    s_expect_err(__FILE__, line, rc, want, err, fname, s1, s2);
    CHECK(f == NULL);
}
#define BAD(fname, header, nd, want, s1, s2) s_bad(fname, header, nd, want, s1, s2, __LINE__)

static void test_bad_files(void) {
    char err[512];
    mm_st_file *f;
    s_mkdir("bad");
    /* Shorter than the length prefix, at every length. */
    for (size_t n = 0; n < 8; n++) {
        s_write_raw(s_path("bad", "short.safetensors"), "\x10\0\0\0\0\0\0", n);
        int rc = mm_st_open(s_path("bad", "short.safetensors"), &f, err, sizeof err);
        EXPECT_ERR(rc, MM_EPROTO, err, "short.safetensors", "shorter than", NULL);
    }
    /* Header length beyond the file, and absurd. */
    unsigned char hb[16] = {0xff, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    s_write_raw(s_path("bad", "hlen.safetensors"), hb, 10);
    EXPECT_ERR(mm_st_open(s_path("bad", "hlen.safetensors"), &f, err, sizeof err), MM_EPROTO, err,
               "hlen.safetensors", "beyond the file", NULL);
    unsigned char hb2[16] = {0, 0, 0, 0, 0, 0, 0, 0x80, '{', '}'};
    s_write_raw(s_path("bad", "absurd.safetensors"), hb2, 10);
    EXPECT_ERR(mm_st_open(s_path("bad", "absurd.safetensors"), &f, err, sizeof err), MM_EPROTO, err,
               "absurd.safetensors", "absurd", NULL);
    unsigned char hb3[16] = {0x00, 0xe2, 0xf5, 0x05, 0, 0, 0, 0, '{', '}'}; /* 100 000 256 */
    s_write_raw(s_path("bad", "absurd2.safetensors"), hb3, 10);
    EXPECT_ERR(mm_st_open(s_path("bad", "absurd2.safetensors"), &f, err, sizeof err), MM_EPROTO,
               err, "absurd2.safetensors", "absurd", NULL);
    EXPECT_ERR(mm_st_open(s_path("bad", "nofile.safetensors"), &f, err, sizeof err), MM_ENOTFOUND,
               err, "nofile.safetensors", NULL, NULL);
    EXPECT_ERR(mm_st_open(s_path("bad", NULL), &f, err, sizeof err), MM_EIO, err,
               "not a regular file", NULL, NULL);

    BAD("notjson.safetensors", "{\"a\": ", 0, MM_EPROTO, "not valid JSON", NULL);
    BAD("array.safetensors", "[1, 2]", 0, MM_EPROTO, "not a JSON object", NULL);
    BAD("emptyobj.safetensors", "{}", 0, MM_OK, NULL, NULL);
    BAD("entry.safetensors", "{\"w\": 3}", 0, MM_EPROTO, "tensor 'w'", "not a JSON object");
    BAD("nodtype.safetensors", "{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, MM_EPROTO,
        "tensor 'w'", "'dtype' missing");
    BAD("noshape.safetensors", "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4,
        MM_EPROTO, "tensor 'w'", "'shape' missing");
    BAD("nooffs.safetensors", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, MM_EPROTO,
        "tensor 'w'", "'data_offsets' missing");
    BAD("dtypenum.safetensors", "{\"w\": {\"dtype\": 7, \"shape\": [1], \"data_offsets\": [0, 4]}}",
        4, MM_EPROTO, "tensor 'w'", "'dtype' is not a string");
    BAD("dtypeunk.safetensors",
        "{\"w\": {\"dtype\": \"Q4_K\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, MM_EPROTO,
        "tensor 'w'", "unknown dtype \"Q4_K\"");
    BAD("shapeobj.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": {}, \"data_offsets\": [0, 4]}}", 4, MM_EPROTO,
        "tensor 'w'", "'shape' is not an array");
    BAD("shapeneg.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, MM_EPROTO,
        "tensor 'w'", "shape[0] is not a non-negative integer");
    BAD("shapereal.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1, 2.5], \"data_offsets\": [0, 4]}}", 4,
        MM_EPROTO, "tensor 'w'", "shape[1]");
    BAD("shapestr.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", 4, MM_EPROTO,
        "tensor 'w'", "shape[0]");
    BAD("ndim5.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4,
        MM_EPROTO, "tensor 'w'", "5 dims");
    BAD("offs1.safetensors", "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}",
        4, MM_EPROTO, "tensor 'w'", "'data_offsets'");
    BAD("offsneg.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, MM_EPROTO,
        "tensor 'w'", "'data_offsets'");
    BAD("offsstr.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": \"0,4\"}}", 4, MM_EPROTO,
        "tensor 'w'", "'data_offsets'");
    BAD("beginend.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8, MM_EPROTO,
        "tensor 'w'", "begin 8 > end 4");
    BAD("beyond.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8, MM_EPROTO,
        "tensor 'w'", "end 16 beyond the data section (8 bytes)");
    BAD("size.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 24,
        MM_EPROTO, "tensor 'w'", "shape [2, 3] × F32 needs 24");
    BAD("overflow.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4611686018427387904], "
        "\"data_offsets\": [0, 4]}}",
        4, MM_EPROTO, "tensor 'w'", "overflows");
    BAD("overflow2.safetensors",
        "{\"w\": {\"dtype\": \"F64\", \"shape\": [4611686018427387904], "
        "\"data_offsets\": [0, 4]}}",
        4, MM_EPROTO, "tensor 'w'", "overflows");
    BAD("huge.safetensors",
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
        "\"data_offsets\": [0, 99999999999999999999999]}}",
        4, MM_EPROTO, "not valid JSON", NULL);
    BAD("overlap.safetensors",
        "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
        " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
        12, MM_EPROTO, "tensors 'a' and 'b' overlap", NULL);
    BAD("same.safetensors",
        "{\"a\": {\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [0, 4]},"
        " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
        4, MM_EPROTO, "overlap", NULL);
    BAD("dupkey.safetensors",
        "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
        " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
        8, MM_EPROTO, "not valid JSON", "duplicate");
    BAD("meta.safetensors", "{\"__metadata__\": {\"k\": 1}}", 0, MM_EPROTO, "__metadata__", "'k'");
    BAD("meta2.safetensors", "{\"__metadata__\": [\"k\"]}", 0, MM_EPROTO, "__metadata__", NULL);
    /* Adjacent tensors and empty ones touching others are fine. */
    BAD("ok.safetensors",
        "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
        " \"e\": {\"dtype\": \"BF16\", \"shape\": [0, 7], \"data_offsets\": [4, 4]},"
        " \"b\": {\"dtype\": \"BOOL\", \"shape\": [4], \"data_offsets\": [8, 12]}}",
        12, MM_OK, NULL, NULL);
    /* Every known dtype string opens. */
    const char *known[] = {"F32", "F16", "BF16", "F64", "I64",  "I32",     "I16",    "I8",
                           "U64", "U32", "U16",  "U8",  "BOOL", "F8_E4M3", "F8_E5M2"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        char h[256];
        snprintf(h, sizeof h,
                 "{\"t\": {\"dtype\": \"%s\", \"shape\": [2], \"data_offsets\": [0, %zu]}}",
                 known[i], 2 * mm_st_dtype_size((mm_st_dtype)i));
        CHECK(strcmp(mm_st_dtype_name((mm_st_dtype)i), known[i]) == 0);
        BAD("known.safetensors", h, 16, MM_OK, NULL, NULL);
    }
}

/* ==== fuzzing: truncation and flipped bytes =============================== */

/* What a successful open must guarantee, whatever the bytes were. */
static void s_check_invariants(const mm_st_file *f, size_t fsize) {
    for (size_t i = 0; i < mm_st_count(f); i++) {
        const mm_st_tensor *t = mm_st_at(f, i);
        size_t n = 1;
        for (int d = 0; d < t->ndim; d++)
            n *= t->shape[d];
        CHECK(n == t->nelem);
        CHECK(t->nbytes == t->nelem * mm_st_dtype_size(t->st_dtype));
        CHECK(t->file_offset <= fsize && t->nbytes <= fsize - t->file_offset);
        /* Touch every byte: ASan would catch anything outside the mapping. */
        volatile unsigned char sum = 0;
        for (size_t b = 0; b < t->nbytes; b++)
            sum += ((const unsigned char *)t->data)[b];
        (void)sum;
    }
}

static void test_fuzz(void) {
    char err[512];
    s_mkdir("fuzz");
    char *good = s_path("fuzz", "good.safetensors");
    s_write_st(good, g_specs, NSPECS, "{\"format\": \"pt\"}");
    size_t size;
    unsigned char *orig = s_read_all(good, &size);
    char *p = s_path("fuzz", "cut.safetensors");
    int opened = 0;
    for (size_t len = 0; len <= size; len++) {
        s_write_raw(p, orig, len);
        mm_st_file *f;
        int rc = mm_st_open(p, &f, err, sizeof err);
        CHECK(rc == MM_OK || (rc < 0 && f == NULL && err[0]));
        if (rc == MM_OK) {
            opened++;
            s_check_invariants(f, len);
        }
        mm_st_destroy(&f);
    }
    CHECK(opened >= 1); /* at least the whole file */

    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | orig[i];
    uint32_t seed = 12345;
    unsigned char *mut = malloc(size);
    int ok = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(mut, orig, size);
        int flips = 1 + it % 3;
        for (int k = 0; k < flips; k++) {
            seed = seed * 1103515245u + 12345u;
            /* Mostly inside the length prefix and header, sometimes data. */
            size_t pos = (seed >> 8) % (it % 10 == 0 ? size : 8 + hlen);
            seed = seed * 1103515245u + 12345u;
            unsigned char v = (unsigned char)(seed >> 16);
            if (it % 4 == 0) /* swap in a JSON-meaningful character */
                v = (unsigned char)"0123456789-,:[]{}\". e"[v % 22];
            mut[pos] = v;
        }
        s_write_raw(p, mut, size);
        mm_st_file *f;
        int rc = mm_st_open(p, &f, err, sizeof err);
        CHECK(rc == MM_OK || (rc < 0 && f == NULL && err[0]));
        if (rc == MM_OK) {
            ok++;
            s_check_invariants(f, size);
        }
        mm_st_destroy(&f);
    }
    if (getenv("MM_TEST_VERBOSE"))
        fprintf(stderr, "fuzz: %d of 3000 mutants opened\n", ok);
    free(mut);
    free(orig);
}

/* ==== config.json ========================================================= */

static const char *STABLELM_HF =
    "{\"architectures\": [\"MoELLaVAStablelmForCausalLM\"], \"model_type\": \"moe_llava_stablelm\","
    " \"hidden_size\": 2048, \"intermediate_size\": 5632, \"num_hidden_layers\": 24,"
    " \"num_attention_heads\": 32, \"num_key_value_heads\": 32, \"partial_rotary_factor\": 0.25,"
    " \"rope_theta\": 10000, \"layer_norm_eps\": 1e-05, \"use_qkv_bias\": true,"
    " \"hidden_act\": \"silu\", \"vocab_size\": 100352, \"max_position_embeddings\": 4096,"
    " \"bos_token_id\": 100257, \"eos_token_id\": 100257, \"pad_token_id\": null,"
    " \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
    " \"mm_hidden_size\": 1024, \"image_projector_type\": \"mlp2x_gelu\","
    " \"mm_vision_select_layer\": -2, \"mm_vision_select_feature\": \"patch\","
    " \"image_aspect_ratio\": \"pad\", \"mm_image_tower\": "
    "\"/root/openai/clip-vit-large-patch14-336\","
    " \"moe\": {\"moe_enable\": true, \"moe_mode\": \"sparse\","
    "   \"moe_layers_idx\": [0,2,4,6,8,10,12,14,16,18,20,22], \"ep_size\": 1,"
    "   \"num_experts\": [4,4,4,4,4,4,4,4,4,4,4,4], \"top_k_experts\": 1,"
    "   \"capacity_factor\": 1.5, \"use_residual\": false,"
    "   \"expert_names\": [\"MRI\", \"CT\", \"pathology\", \"X-ray\"]}}";

static const char *STABLELM_EPOCH =
    "{\"model_type\": \"stablelm_epoch\", \"hidden_size\": 256, \"intermediate_size\": 512,"
    " \"num_hidden_layers\": 4, \"num_attention_heads\": 4, \"rope_pct\": 0.25,"
    " \"rotary_emb_base\": 5000, \"norm_eps\": 1e-6, \"vocab_size\": 1000,"
    " \"max_position_embeddings\": 128,"
    " \"moe\": {\"moe_enable\": true, \"moe_layers_idx\": [1, 3], \"num_experts\": 3,"
    "  \"top_k_experts\": 2}}";

static const char *PHI_HF =
    "{\"model_type\": \"moe_llava_phi\", \"hidden_size\": 2560, \"intermediate_size\": 10240,"
    " \"num_hidden_layers\": 32, \"num_attention_heads\": 32, \"partial_rotary_factor\": 0.4,"
    " \"layer_norm_eps\": 1e-05, \"hidden_act\": \"gelu_new\", \"vocab_size\": 51200,"
    " \"max_position_embeddings\": 2048, \"bos_token_id\": 50256, \"eos_token_id\": 50256,"
    " \"tie_word_embeddings\": false, \"mm_hidden_size\": 1024,"
    " \"mm_projector_type\": \"mlp2x_gelu\", \"image_tower\": \"openai/clip\"}";

static int s_cfg(const char *json, mm_config *c, char *err, size_t errlen) {
    return mm_config_parse(json, strlen(json), "config.json", c, err, errlen);
}

/* A variant of a base config with one top-level (or moe.) key replaced:
 * value NULL deletes it. Returns a malloc'd string. */
static char *s_variant(const char *base, const char *key, const char *value) {
    json_t *root = json_loads(base, 0, NULL);
    json_t *obj = root;
    if (strncmp(key, "moe.", 4) == 0) {
        obj = json_object_get(root, "moe");
        key += 4;
    }
    if (value)
        json_object_set_new(obj, key, json_loads(value, JSON_DECODE_ANY, NULL));
    else
        json_object_del(obj, key);
    char *s = json_dumps(root, 0);
    json_decref(root);
    return s;
}

static int s_cfg_var(const char *base, const char *key, const char *value, char *err,
                     size_t errlen) {
    mm_config c;
    char *s = s_variant(base, key, value);
    int rc = s_cfg(s, &c, err, errlen);
    free(s);
    return rc;
}

static void test_config(void) {
    mm_config c;
    char err[512];
    int rc = s_cfg(STABLELM_HF, &c, err, sizeof err);
    CHECK(rc == MM_OK);
    if (rc != MM_OK)
        fprintf(stderr, "  %s\n", err);
    CHECK(c.arch == MM_ARCH_STABLELM && c.hidden_size == 2048 && c.intermediate_size == 5632);
    CHECK(c.num_hidden_layers == 24 && c.num_attention_heads == 32 && c.num_key_value_heads == 32);
    CHECK(c.head_dim == 64 && c.rotary_dims == 16 && c.rope_theta == 10000.0);
    CHECK(c.norm_eps == 1e-5 && c.use_qkv_bias == 1 && c.hidden_act == MM_ACT_SILU);
    CHECK(c.vocab_size == 100352 && c.max_position_embeddings == 4096);
    CHECK(c.bos_token_id == 100257 && c.eos_token_id == 100257 && c.pad_token_id == -1);
    CHECK(!c.tie_word_embeddings && strcmp(c.torch_dtype, "bfloat16") == 0);
    CHECK(c.mm_hidden_size == 1024 && strcmp(c.mm_projector_type, "mlp2x_gelu") == 0);
    CHECK(c.mm_vision_select_layer == -2 && strcmp(c.mm_vision_select_feature, "patch") == 0);
    CHECK(strcmp(c.image_aspect_ratio, "pad") == 0 && strstr(c.image_tower, "clip-vit-large"));
    CHECK(c.moe_enable && strcmp(c.moe_mode, "sparse") == 0 && c.n_moe_layers == 12);
    CHECK(c.top_k_experts == 1 && !c.use_residual && c.num_experts[11] == 4);
    CHECK(c.n_expert_names == 4 && strcmp(c.expert_names[2], "pathology") == 0);
    CHECK(mm_config_is_moe_layer(&c, 0) == 0 && mm_config_is_moe_layer(&c, 1) == -1);
    CHECK(mm_config_is_moe_layer(&c, 22) == 11 && mm_config_is_moe_layer(&c, 23) == -1);

    rc = s_cfg(STABLELM_EPOCH, &c, err, sizeof err);
    CHECK(rc == MM_OK);
    if (rc != MM_OK)
        fprintf(stderr, "  %s\n", err);
    CHECK(c.arch == MM_ARCH_STABLELM && c.head_dim == 64 && c.rotary_dims == 16);
    CHECK(c.rope_theta == 5000.0 && c.norm_eps == 1e-6 && c.use_qkv_bias == 0);
    CHECK(c.num_key_value_heads == 4 && c.bos_token_id == -1 && c.eos_token_id == -1);
    CHECK(c.n_moe_layers == 2 && c.num_experts[0] == 3 && c.num_experts[1] == 3);
    CHECK(c.top_k_experts == 2 && mm_config_is_moe_layer(&c, 3) == 1);
    CHECK(strcmp(c.image_aspect_ratio, "pad") == 0 && c.mm_vision_select_layer == -2);
    CHECK(c.mm_hidden_size == 0 && c.n_expert_names == 0);

    rc = s_cfg(PHI_HF, &c, err, sizeof err);
    CHECK(rc == MM_OK);
    if (rc != MM_OK)
        fprintf(stderr, "  %s\n", err);
    CHECK(c.arch == MM_ARCH_PHI && c.head_dim == 80 && c.rotary_dims == 32);
    CHECK(c.hidden_act == MM_ACT_GELU_TANH && c.use_qkv_bias == 1 && c.use_parallel_residual);
    CHECK(c.rope_theta == 10000.0 && !c.moe_enable && mm_config_is_moe_layer(&c, 0) == -1);
    CHECK(strcmp(c.image_tower, "openai/clip") == 0);

    /* HF "phi" plain and "stablelm" plain are recognised; others are not. */
    CHECK(s_cfg_var(PHI_HF, "model_type", "\"phi\"", err, sizeof err) == MM_OK);
    CHECK(s_cfg_var(STABLELM_HF, "model_type", "\"stablelm\"", err, sizeof err) == MM_OK);
    rc = s_cfg_var(STABLELM_HF, "model_type", "\"llama\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "config.json", "model_type", "llama");
    rc = s_cfg_var(STABLELM_HF, "model_type", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'model_type' missing", NULL, NULL);

    /* Missing and mistyped fields. */
    rc = s_cfg_var(STABLELM_HF, "hidden_size", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'hidden_size' missing", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "vocab_size", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'vocab_size' missing", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "layer_norm_eps", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'norm_eps' missing", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "hidden_size", "\"2048\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'hidden_size' is not an integer", NULL,
               NULL);
    rc = s_cfg_var(STABLELM_HF, "hidden_size", "2048.0", err, sizeof err);
    CHECK(rc == MM_OK);
    rc = s_cfg_var(STABLELM_HF, "hidden_size", "0", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'hidden_size' = 0 must be > 0", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "use_qkv_bias", "\"yes\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'use_qkv_bias' is not a boolean", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "hidden_act", "\"relu6\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "'hidden_act'", "relu6", NULL);
    rc = s_cfg_var(STABLELM_HF, "eos_token_id", "[100257, 100278]", err, sizeof err);
    CHECK(rc == MM_OK);
    rc = s_cfg_var(STABLELM_HF, "eos_token_id", "\"x\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'eos_token_id'", NULL, NULL);
    rc = s_cfg("[1]", &c, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json", "not a JSON object", NULL);
    rc = s_cfg("{\"model_type\": ", &c, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json", "not valid JSON", NULL);

    /* Inconsistent sizes. */
    rc = s_cfg_var(STABLELM_HF, "num_attention_heads", "30", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err,
               "hidden_size = 2048 is not divisible by num_attention_heads = 30", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "num_key_value_heads", "5", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "num_key_value_heads", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "partial_rotary_factor", "1.5", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'partial_rotary_factor' = 1.5", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "partial_rotary_factor", "0.01", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "rotary dims = 0", NULL, NULL);
    rc = s_cfg_var(STABLELM_HF, "num_hidden_layers", "300", err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "num_hidden_layers", NULL, NULL);

    /* The MoE block. */
    const char *four = "{\"model_type\": \"stablelm\", \"hidden_size\": 64,"
                       " \"intermediate_size\": 128, \"num_hidden_layers\": 4,"
                       " \"num_attention_heads\": 4, \"vocab_size\": 100, \"layer_norm_eps\": 1e-5,"
                       " \"max_position_embeddings\": 64,"
                       " \"moe\": {\"moe_enable\": true, \"moe_layers_idx\": [0, 2],"
                       " \"num_experts\": [4, 4], \"top_k_experts\": 1}}";
    CHECK(s_cfg(four, &c, err, sizeof err) == MM_OK && c.rotary_dims == 4);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[0, 1, 9]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err,
               "config.json: moe.moe_layers_idx[2] = 9 but num_hidden_layers = 4", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[2, 2]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.moe_layers_idx[1] = 2", "strictly increasing", NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[2, 0]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.moe_layers_idx[1] = 0", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[-1, 0]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.moe_layers_idx[0] = -1", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[0, \"2\"]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.moe_layers_idx[1] is not an integer", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe_layers_idx is empty", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", "[0,1,2,3,3]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "5 entries", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_layers_idx", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'moe.moe_layers_idx' missing", NULL, NULL);
    rc = s_cfg_var(four, "moe.num_experts", "[4]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.num_experts has 1 entries but moe.moe_layers_idx has 2",
               NULL, NULL);
    rc = s_cfg_var(four, "moe.num_experts", "[4, 0]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.num_experts[1] = 0 outside 1..64", NULL, NULL);
    rc = s_cfg_var(four, "moe.num_experts", "65", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.num_experts[0] = 65", NULL, NULL);
    rc = s_cfg_var(four, "moe.num_experts", "\"4\"", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.num_experts", NULL, NULL);
    rc = s_cfg_var(four, "moe.num_experts", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "field 'moe.num_experts' missing", NULL, NULL);
    rc = s_cfg_var(four, "moe.top_k_experts", "3", err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "moe.top_k_experts = 3", NULL, NULL);
    rc = s_cfg_var(four, "moe.top_k_experts", "0", err, sizeof err);
    EXPECT_ERR(rc, MM_EUNSUPPORTED, err, "moe.top_k_experts = 0", NULL, NULL);
    rc = s_cfg_var(four, "moe.top_k_experts", NULL, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "field 'moe.top_k_experts' missing", NULL, NULL);
    char *one = s_variant(four, "moe.num_experts", "[4, 1]");
    rc = s_cfg_var(one, "moe.top_k_experts", "2", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "moe.top_k_experts = 2 but a MoE layer has only 1 experts", NULL,
               NULL);
    free(one);
    rc = s_cfg_var(four, "moe.expert_names", "[\"a\", \"b\"]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "expert_names has 2 names", NULL, NULL);
    rc = s_cfg_var(four, "moe.moe_enable", "false", err, sizeof err);
    CHECK(rc == MM_OK);
    char *off = s_variant(four, "moe.moe_enable", "false");
    CHECK(s_cfg(off, &c, err, sizeof err) == MM_OK && !c.moe_enable && c.n_moe_layers == 0 &&
          mm_config_is_moe_layer(&c, 0) == -1);
    free(off);
    rc = s_cfg_var(four, "moe", "[1]", err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "field 'moe' is not an object", NULL, NULL);
    /* Top-level expert_names are found too. */
    char *tl = s_variant(four, "expert_names", "[\"MRI\", \"CT\", \"PATH\", \"XRAY\"]");
    CHECK(s_cfg(tl, &c, err, sizeof err) == MM_OK && c.n_expert_names == 4 &&
          strcmp(c.expert_names[3], "XRAY") == 0);
    free(tl);

    /* Every prefix of a valid config: an error or a valid parse, never a crash. */
    size_t full = strlen(STABLELM_HF);
    for (size_t len = 0; len < full; len++) {
        rc = mm_config_parse(STABLELM_HF, len, "config.json", &c, err, sizeof err);
        CHECK(rc < 0 && strstr(err, "config.json") && c.hidden_size == 0);
    }

    /* Load from a file; a missing file. */
    s_mkdir("cfg");
    s_write_raw(s_path("cfg", "config.json"), PHI_HF, strlen(PHI_HF));
    CHECK(mm_config_load(s_path("cfg", "config.json"), &c, err, sizeof err) == MM_OK &&
          c.arch == MM_ARCH_PHI);
    rc = mm_config_load(s_path("cfg", "nope.json"), &c, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "nope.json", NULL, NULL);
    s_write_raw(s_path("cfg", "config.json"), "{\"model_type\": \"phi\"}", 21);
    rc = mm_config_load(s_path("cfg", "config.json"), &c, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "cfg/config.json: field 'hidden_size' missing", NULL, NULL);
}

static const char *CLIP_VISION =
    "{\"model_type\": \"clip_vision_model\", \"hidden_size\": 1024, \"intermediate_size\": 4096,"
    " \"num_hidden_layers\": 24, \"num_attention_heads\": 16, \"image_size\": 336,"
    " \"patch_size\": 14, \"hidden_act\": \"quick_gelu\", \"layer_norm_eps\": 1e-05}";

static const char *CLIP_FULL =
    "{\"model_type\": \"clip\", \"projection_dim\": 768,"
    " \"text_config\": {\"hidden_size\": 768, \"num_hidden_layers\": 12},"
    " \"vision_config\": {\"hidden_size\": 1024, \"intermediate_size\": 4096,"
    "   \"num_hidden_layers\": 24, \"num_attention_heads\": 16, \"image_size\": 336,"
    "   \"patch_size\": 14, \"num_channels\": 3}}";

static void test_vision_config(void) {
    mm_vision_config v;
    mm_config c;
    char err[512];
    int rc = mm_vision_config_parse(CLIP_VISION, strlen(CLIP_VISION), "config.json", &v, err,
                                    sizeof err);
    CHECK(rc == MM_OK && v.hidden_size == 1024 && v.num_hidden_layers == 24 && v.head_dim == 64);
    CHECK(v.num_patches == 576 && v.num_channels == 3 && v.hidden_act == MM_ACT_QUICK_GELU);
    CHECK(v.layer_norm_eps == 1e-5);
    rc = mm_vision_config_parse(CLIP_FULL, strlen(CLIP_FULL), "config.json", &v, err, sizeof err);
    CHECK(rc == MM_OK && v.hidden_size == 1024 && v.intermediate_size == 4096);
    CHECK(v.image_size == 336 && v.patch_size == 14 && v.layer_norm_eps == 1e-5 &&
          v.hidden_act == MM_ACT_QUICK_GELU);

    char *s = s_variant(CLIP_VISION, "image_size", "330");
    rc = mm_vision_config_parse(s, strlen(s), "config.json", &v, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json",
               "image_size = 330 is not divisible by patch_size = 14", NULL);
    free(s);
    s = s_variant(CLIP_VISION, "num_attention_heads", "15");
    rc = mm_vision_config_parse(s, strlen(s), "config.json", &v, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "hidden_size = 1024 is not divisible", NULL, NULL);
    free(s);
    s = s_variant(CLIP_VISION, "patch_size", NULL);
    rc = mm_vision_config_parse(s, strlen(s), "config.json", &v, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "config.json: field 'patch_size' missing", NULL, NULL);
    free(s);
    s = s_variant(CLIP_FULL, "vision_config", "{\"hidden_size\": 1024}");
    rc = mm_vision_config_parse(s, strlen(s), "config.json", &v, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "field 'vision_config.intermediate_size' missing", NULL, NULL);
    free(s);
    s = s_variant(CLIP_FULL, "vision_config", "7");
    rc = mm_vision_config_parse(s, strlen(s), "config.json", &v, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "'vision_config' is not an object", NULL, NULL);
    free(s);

    /* Cross-checks with the LLM config. */
    mm_vision_config_parse(CLIP_VISION, strlen(CLIP_VISION), "config.json", &v, err, sizeof err);
    CHECK(s_cfg(STABLELM_HF, &c, err, sizeof err) == MM_OK);
    int layers = 0;
    CHECK(mm_config_check_vision(&c, &v, &layers, err, sizeof err) == MM_OK && layers == 23);
    c.mm_vision_select_layer = -25;
    CHECK(mm_config_check_vision(&c, &v, &layers, err, sizeof err) == MM_OK && layers == 0);
    c.mm_vision_select_layer = -26;
    rc = mm_config_check_vision(&c, &v, &layers, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "mm_vision_select_layer = -26", NULL, NULL);
    c.mm_vision_select_layer = 25;
    rc = mm_config_check_vision(&c, &v, &layers, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "mm_vision_select_layer = 25", NULL, NULL);
    c.mm_vision_select_layer = -2;
    c.mm_hidden_size = 768;
    rc = mm_config_check_vision(&c, &v, &layers, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "mm_hidden_size = 768", "1024", NULL);
}

/* ==== SHA-256 and fingerprints ============================================ */

static void test_fingerprint(void) {
    char err[512], a[MM_FINGERPRINT_HEX], b[MM_FINGERPRINT_HEX];
    CHECK(mm_sha256_selftest() == MM_OK);
    mm_sha256_buf_hex("abc", 3, a);
    CHECK(strcmp(a, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);

    /* The same tensors laid out as one file and as two shards. */
    mm_checkpoint *one = NULL, *two = NULL;
    CHECK(mm_checkpoint_open(s_path("single", NULL), &one, err, sizeof err) == MM_OK);
    s_mkdir("sharded2");
    s_write_st(s_path("sharded2", g_shard1), g_specs + 2, NSPECS - 2, NULL);
    s_write_st(s_path("sharded2", g_shard2), g_specs, 2, "{\"other\": \"metadata\"}");
    CHECK(mm_checkpoint_open(s_path("sharded2", NULL), &two, err, sizeof err) == MM_OK);
    if (!one || !two)
        goto out;
    const char *cfg1 = "{\"b\": 1, \"a\": [1.5, {\"y\": null, \"x\": true}]}";
    const char *cfg2 = "{ \"a\" : [ 1.5 , { \"x\" : true , \"y\" : null } ] ,\n \"b\" : 1 }";
    const char *n1[] = {"lm_head.weight", "model.embed_tokens.weight", "scale", "empty"};
    const char *n2[] = {"empty", "scale", "model.embed_tokens.weight", "lm_head.weight"};
    CHECK(mm_fingerprint(cfg1, strlen(cfg1), one, n1, 4, 0, a, err, sizeof err) == MM_OK);
    CHECK(mm_fingerprint(cfg2, strlen(cfg2), two, n2, 4, 0, b, err, sizeof err) == MM_OK);
    CHECK(strlen(a) == 64 && strcmp(a, b) == 0);
    /* Any change in config value, tensor set or flags changes it. */
    const char *cfg3 = "{\"b\": 2, \"a\": [1.5, {\"y\": null, \"x\": true}]}";
    CHECK(mm_fingerprint(cfg3, strlen(cfg3), one, n1, 4, 0, b, err, sizeof err) == MM_OK &&
          strcmp(a, b) != 0);
    CHECK(mm_fingerprint(cfg1, strlen(cfg1), one, n1, 3, 0, b, err, sizeof err) == MM_OK &&
          strcmp(a, b) != 0);
    CHECK(mm_fingerprint(cfg1, strlen(cfg1), one, n1, 4, MM_FINGERPRINT_HEADERS_ONLY, b, err,
                         sizeof err) == MM_OK &&
          strcmp(a, b) != 0);
    CHECK(mm_fingerprint(NULL, 0, one, n1, 4, 0, b, err, sizeof err) == MM_OK && strcmp(a, b) != 0);
    char c0[MM_FINGERPRINT_HEX];
    CHECK(mm_fingerprint(NULL, 0, NULL, NULL, 0, 0, c0, err, sizeof err) == MM_OK);
    /* Errors. */
    const char *dup[] = {"scale", "scale"};
    int rc = mm_fingerprint(cfg1, strlen(cfg1), one, dup, 2, 0, b, err, sizeof err);
    EXPECT_ERR(rc, MM_EINVAL, err, "'scale' given twice", NULL, NULL);
    const char *miss[] = {"scale", "ghost"};
    rc = mm_fingerprint(cfg1, strlen(cfg1), one, miss, 2, 0, b, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "'ghost' not found", NULL, NULL);
    rc = mm_fingerprint("{", 1, one, n1, 4, 0, b, err, sizeof err);
    EXPECT_ERR(rc, MM_EPROTO, err, "not valid JSON", NULL, NULL);

    /* A changed weight byte changes it: rewrite one shard with another value. */
    float w2[6] = {1, 2, 3, 4, 5, -6.25f};
    tspec changed[2] = {g_specs[0], g_specs[1]};
    changed[0].data = w2;
    s_write_st(s_path("sharded2", g_shard2), changed, 2, NULL);
    mm_checkpoint_destroy(&two);
    CHECK(mm_checkpoint_open(s_path("sharded2", NULL), &two, err, sizeof err) == MM_OK);
    if (two) {
        CHECK(mm_fingerprint(cfg2, strlen(cfg2), two, n2, 4, 0, b, err, sizeof err) == MM_OK &&
              strcmp(a, b) != 0);
        CHECK(mm_fingerprint(cfg2, strlen(cfg2), two, n2, 4, MM_FINGERPRINT_HEADERS_ONLY, b, err,
                             sizeof err) == MM_OK);
        CHECK(mm_fingerprint(cfg1, strlen(cfg1), one, n1, 4, MM_FINGERPRINT_HEADERS_ONLY, c0, err,
                             sizeof err) == MM_OK &&
              strcmp(b, c0) == 0);
    }
out:
    mm_checkpoint_destroy(&one);
    mm_checkpoint_destroy(&two);
}

/* Expert fingerprints on a tiny MoE checkpoint: 4 layers, MoE at 0 and 2. */
static void test_expert_fingerprint(void) {
    char err[512];
    const char *cfgjson =
        "{\"model_type\": \"moe_llava_stablelm\", \"hidden_size\": 8, \"intermediate_size\": 4,"
        " \"num_hidden_layers\": 4, \"num_attention_heads\": 1, \"vocab_size\": 10,"
        " \"layer_norm_eps\": 1e-5, \"max_position_embeddings\": 16,"
        " \"moe\": {\"moe_enable\": true, \"moe_layers_idx\": [0, 2], \"num_experts\": [2, 2],"
        " \"top_k_experts\": 1}}";
    s_mkdir("moe");
    s_write_raw(s_path("moe", "config.json"), cfgjson, strlen(cfgjson));
    static uint16_t w[2][2][3][32]; /* [layer][expert][proj][4×8] */
    tspec ts[13];
    static char names[12][128];
    const char *proj[3] = {"gate_proj", "up_proj", "down_proj"};
    size_t k = 0;
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 2; e++)
            for (int p = 0; p < 3; p++) {
                for (int i = 0; i < 32; i++)
                    w[l][e][p][i] = (uint16_t)(0x3c00 + l * 100 + e * 10 + p + i);
                snprintf(names[k], sizeof names[k],
                         "model.layers.%d.mlp.deepspeed_moe.experts.deepspeed_experts.%d.%s.weight",
                         2 * l, e, proj[p]);
                ts[k] =
                    (tspec){names[k], "F16", 2, {p == 2 ? 8 : 4, p == 2 ? 4 : 8}, w[l][e][p], 64};
                k++;
            }
    static float gate[16];
    ts[k++] = (tspec){
        "model.layers.0.mlp.deepspeed_moe.gate.wg.weight", "F32", 2, {2, 8}, gate, sizeof gate};
    s_write_st(s_path("moe", "model.safetensors"), ts, k, NULL);
    mm_config cfg;
    mm_checkpoint *ck = NULL;
    CHECK(mm_config_load(s_path("moe", "config.json"), &cfg, err, sizeof err) == MM_OK);
    CHECK(mm_checkpoint_open(s_path("moe", NULL), &ck, err, sizeof err) == MM_OK);
    if (!ck)
        return;
    const char **nm;
    size_t n;
    CHECK(mm_expert_tensor_names(ck, &cfg, 1, &nm, &n, err, sizeof err) == MM_OK && n == 6);
    for (size_t i = 0; i < n; i++)
        CHECK(strstr(nm[i], "deepspeed_experts.1.") != NULL);
    free(nm);
    char f0[MM_FINGERPRINT_HEX], f1[MM_FINGERPRINT_HEX], f0b[MM_FINGERPRINT_HEX];
    CHECK(mm_fingerprint_expert(s_path("moe", "config.json"), ck, &cfg, 0, 0, f0, err,
                                sizeof err) == MM_OK);
    CHECK(mm_fingerprint_expert(s_path("moe", "config.json"), ck, &cfg, 1, 0, f1, err,
                                sizeof err) == MM_OK);
    CHECK(mm_fingerprint_expert(s_path("moe", "config.json"), ck, &cfg, 0, 0, f0b, err,
                                sizeof err) == MM_OK);
    CHECK(strcmp(f0, f1) != 0 && strcmp(f0, f0b) == 0);
    int rc =
        mm_fingerprint_expert(s_path("moe", "config.json"), ck, &cfg, 2, 0, f0, err, sizeof err);
    EXPECT_ERR(rc, MM_EINVAL, err, "expert 2 out of range", NULL, NULL);
    cfg.moe_layers_idx[1] = 3; /* a layer with no expert tensors */
    rc = mm_fingerprint_expert(s_path("moe", "config.json"), ck, &cfg, 0, 0, f0, err, sizeof err);
    EXPECT_ERR(rc, MM_ENOTFOUND, err, "model.layers.3.mlp.deepspeed_moe", NULL, NULL);
    mm_checkpoint_destroy(&ck);
}

/* --dump DIR: list what the C side reads from a real-layout checkpoint, for
 * tests/data/checkpoint_crosscheck.py to compare with an independent Python
 * parse: one line per tensor, the config, the vision config, one fingerprint
 * per expert. */
static int s_dump(const char *dir) {
    char err[512], path[1100];
    mm_checkpoint *ck;
    int rc = mm_checkpoint_open(dir, &ck, err, sizeof err);
    if (rc != MM_OK) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    for (size_t i = 0; i < mm_checkpoint_count(ck); i++) {
        const mm_st_tensor *t = mm_checkpoint_at(ck, i);
        char hex[MM_SHA256_HEX], sh[128];
        mm_sha256_buf_hex(t->data, t->nbytes, hex);
        const char *base = strrchr(t->file, '/');
        printf("tensor\t%s\t%s\t%s\t%s\t%s\n", t->name, mm_st_dtype_name(t->st_dtype),
               mm_st_shape_str(t, sh, sizeof sh), hex, base ? base + 1 : t->file);
    }
    mm_config c;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((rc = mm_config_load(path, &c, err, sizeof err)) != MM_OK) {
        fprintf(stderr, "%s\n", err);
        mm_checkpoint_destroy(&ck);
        return 1;
    }
    printf("config\tarch=%s hidden=%d inter=%d layers=%d heads=%d kv=%d head_dim=%d rotary=%d "
           "vocab=%d eps=%g theta=%g qkv_bias=%d act=%s mm_hidden=%d topk=%d moe=",
           mm_arch_name(c.arch), c.hidden_size, c.intermediate_size, c.num_hidden_layers,
           c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dims, c.vocab_size,
           c.norm_eps, c.rope_theta, c.use_qkv_bias, mm_act_name(c.hidden_act), c.mm_hidden_size,
           c.top_k_experts);
    for (int m = 0; m < c.n_moe_layers; m++)
        printf("%s%d:%d", m ? "," : "", c.moe_layers_idx[m], c.num_experts[m]);
    printf("\n");
    mm_vision_config v;
    snprintf(path, sizeof path, "%s/clip/config.json", dir);
    if (mm_vision_config_load(path, &v, err, sizeof err) == MM_OK) {
        int run = -1;
        rc = mm_config_check_vision(&c, &v, &run, err, sizeof err);
        printf("vision\thidden=%d layers=%d heads=%d patches=%d run=%d check=%s\n", v.hidden_size,
               v.num_hidden_layers, v.num_attention_heads, v.num_patches, run, mm_status_str(rc));
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    for (int e = 0; c.moe_enable && e < c.num_experts[0]; e++) {
        char fp[MM_FINGERPRINT_HEX];
        rc = mm_fingerprint_expert(path, ck, &c, e, 0, fp, err, sizeof err);
        printf("expert\t%d\t%s\n", e, rc == MM_OK ? fp : err);
    }
    mm_checkpoint_destroy(&ck);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "--dump") == 0)
        return s_dump(argv[2]);
    if (argc > 1) {
        snprintf(g_root, sizeof g_root, "%s", argv[1]);
        mkdir(g_root, 0755);
    } else {
        snprintf(g_root, sizeof g_root, "/tmp/mm_ck_XXXXXX");
        if (!mkdtemp(g_root)) {
            perror("mkdtemp");
            return 2;
        }
    }
    test_single();
    test_sharded();
    test_bad_files();
    test_fuzz();
    test_config();
    test_vision_config();
    test_fingerprint();
    test_expert_fingerprint();
    printf("checkpoint: %d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}

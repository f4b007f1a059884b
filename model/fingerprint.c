/* fingerprint.c — SHA-256 of canonical config + sorted tensors (see header). */
#include "fingerprint.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void s_u64(mm_sha256 *h, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    mm_sha256_update(h, b, 8);
}

static void s_bytes(mm_sha256 *h, const void *p, size_t n) {
    s_u64(h, n);
    mm_sha256_update(h, p, n);
}

static int s_cmp_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int mm_fingerprint(const char *config_json, size_t config_len, const mm_checkpoint *ck,
                   const char *const *tensor_names, size_t n, unsigned flags,
                   char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen) {
    hex_out[0] = '\0';
    if (n > 0 && (!ck || !tensor_names))
        return mm_errorf(err, errlen, MM_EINVAL, "fingerprint: %zu tensor names but no checkpoint",
                         n);
    char *canon = NULL;
    if (config_json) {
        json_error_t jerr;
        json_t *root = json_loadb(config_json, config_len, 0, &jerr);
        if (!root)
            return mm_errorf(err, errlen, MM_EPROTO, "fingerprint: config is not valid JSON: %s",
                             jerr.text);
        canon = json_dumps(root, JSON_SORT_KEYS | JSON_COMPACT | JSON_ENSURE_ASCII |
                                     JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));
        json_decref(root);
        if (!canon)
            return mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: out of memory");
    }
    const char **sorted = malloc((n ? n : 1) * sizeof *sorted);
    if (!sorted) {
        free(canon);
        return mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: out of memory");
    }
    int rc = MM_OK;
    for (size_t i = 0; i < n; i++) {
        if (!tensor_names[i]) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "fingerprint: tensor name %zu is NULL", i);
            goto out;
        }
        sorted[i] = tensor_names[i];
    }
    qsort(sorted, n, sizeof *sorted, s_cmp_name);
    for (size_t i = 1; i < n; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "fingerprint: tensor '%s' given twice",
                           sorted[i]);
            goto out;
        }
    /* Resolve every name before hashing a byte: a missing tensor fails fast. */
    for (size_t i = 0; i < n; i++)
        if (!mm_checkpoint_find(ck, sorted[i])) {
            rc = mm_errorf(err, errlen, MM_ENOTFOUND, "fingerprint: tensor '%s' not found in %s",
                           sorted[i], mm_checkpoint_path(ck));
            goto out;
        }

    mm_sha256 h;
    if (mm_sha256_init(&h) != MM_OK) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: no SHA-256 context (OpenSSL)");
        goto out;
    }
    static const char magic[] = "medmoe-fingerprint-v1\n";
    mm_sha256_update(&h, magic, sizeof magic - 1);
    s_u64(&h, flags);
    s_bytes(&h, canon ? canon : "", canon ? strlen(canon) : 0);
    s_u64(&h, n);
    for (size_t i = 0; i < n; i++) {
        const mm_st_tensor *t = mm_checkpoint_find(ck, sorted[i]);
        const char *dt = mm_st_dtype_name(t->st_dtype);
        s_bytes(&h, t->name, strlen(t->name));
        s_bytes(&h, dt, strlen(dt));
        s_u64(&h, (uint64_t)t->ndim);
        for (int d = 0; d < t->ndim; d++)
            s_u64(&h, t->shape[d]);
        s_u64(&h, t->nbytes);
        if (!(flags & MM_FINGERPRINT_HEADERS_ONLY))
            mm_sha256_update(&h, t->data, t->nbytes);
    }
    uint8_t digest[MM_SHA256_BYTES];
    mm_sha256_final(&h, digest);
    mm_sha256_hex(digest, hex_out);
out:
    free(sorted);
    free(canon);
    return rc;
}

int mm_fingerprint_file(const char *config_path, const mm_checkpoint *ck,
                        const char *const *tensor_names, size_t n, unsigned flags,
                        char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen) {
    hex_out[0] = '\0';
    FILE *fp = fopen(config_path, "rb");
    if (!fp)
        return mm_errorf(err, errlen, errno == ENOENT ? MM_ENOTFOUND : MM_EIO,
                         "%s: cannot open: %s", config_path, strerror(errno));
    size_t cap = 16u << 20;
    char *buf = malloc(cap);
    if (!buf) {
        fclose(fp);
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", config_path);
    }
    size_t len = fread(buf, 1, cap, fp);
    int bad = ferror(fp) || len == cap;
    fclose(fp);
    int rc =
        bad ? mm_errorf(err, errlen, MM_EIO, "%s: read error or larger than 16 MB", config_path)
            : mm_fingerprint(buf, len, ck, tensor_names, n, flags, hex_out, err, errlen);
    free(buf);
    return rc;
}

int mm_expert_tensor_names(const mm_checkpoint *ck, const mm_config *cfg, int expert,
                           const char ***names_out, size_t *n_out, char *err, size_t errlen) {
    *names_out = NULL;
    *n_out = 0;
    if (!cfg->moe_enable || cfg->n_moe_layers == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "fingerprint: the config has no MoE layers");
    for (int m = 0; m < cfg->n_moe_layers; m++)
        if (expert < 0 || expert >= cfg->num_experts[m])
            return mm_errorf(err, errlen, MM_EINVAL,
                             "fingerprint: expert %d out of range (MoE layer %d has %d experts)",
                             expert, cfg->moe_layers_idx[m], cfg->num_experts[m]);
    size_t total = mm_checkpoint_count(ck);
    const char **names = malloc((total ? total : 1) * sizeof *names);
    if (!names)
        return mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: out of memory");
    size_t n = 0;
    for (int m = 0; m < cfg->n_moe_layers; m++) {
        char prefix[160];
        int pl = snprintf(prefix, sizeof prefix,
                          "model.layers.%d.mlp.deepspeed_moe.experts.deepspeed_experts.%d.",
                          cfg->moe_layers_idx[m], expert);
        size_t before = n;
        for (size_t i = 0; i < total; i++) {
            const mm_st_tensor *t = mm_checkpoint_at(ck, i);
            if (strncmp(t->name, prefix, (size_t)pl) == 0)
                names[n++] = t->name;
        }
        if (n == before) {
            free(names);
            return mm_errorf(err, errlen, MM_ENOTFOUND, "fingerprint: no tensor '%s*' in %s",
                             prefix, mm_checkpoint_path(ck));
        }
    }
    *names_out = names;
    *n_out = n;
    return MM_OK;
}

int mm_fingerprint_expert(const char *config_path, const mm_checkpoint *ck, const mm_config *cfg,
                          int expert, unsigned flags, char hex_out[MM_FINGERPRINT_HEX], char *err,
                          size_t errlen) {
    const char **names;
    size_t n;
    hex_out[0] = '\0';
    int rc = mm_expert_tensor_names(ck, cfg, expert, &names, &n, err, errlen);
    if (rc != MM_OK)
        return rc;
    rc = mm_fingerprint_file(config_path, ck, names, n, flags, hex_out, err, errlen);
    free(names);
    return rc;
}

int mm_fingerprint_model(const char *config_path, const mm_checkpoint *ck, unsigned flags,
                         const char (*expert_fps)[MM_FINGERPRINT_HEX], int n_experts,
                         char hex_out[MM_FINGERPRINT_HEX], char *err, size_t errlen) {
    hex_out[0] = '\0';
    if (n_experts < 0 || (n_experts > 0 && !expert_fps))
        return mm_errorf(err, errlen, MM_EINVAL, "fingerprint: %d expert fingerprints", n_experts);
    size_t total = mm_checkpoint_count(ck);
    const char **names = malloc((total ? total : 1) * sizeof *names);
    if (!names)
        return mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: out of memory");
    size_t n = 0;
    for (size_t i = 0; i < total; i++) {
        const char *name = mm_checkpoint_at(ck, i)->name;
        if (!strstr(name, ".mlp.deepspeed_moe.experts.deepspeed_experts."))
            names[n++] = name;
    }
    char trunk[MM_FINGERPRINT_HEX];
    int rc = mm_fingerprint_file(config_path, ck, names, n, flags, trunk, err, errlen);
    free(names);
    if (rc != MM_OK)
        return rc;
    mm_sha256 h;
    if (mm_sha256_init(&h) != MM_OK)
        return mm_errorf(err, errlen, MM_ENOMEM, "fingerprint: no SHA-256 context");
    static const char magic[] = "medmoe-model-fingerprint-v1\n";
    mm_sha256_update(&h, magic, sizeof magic - 1);
    s_bytes(&h, trunk, strlen(trunk));
    s_u64(&h, (uint64_t)n_experts);
    for (int e = 0; e < n_experts; e++)
        s_bytes(&h, expert_fps[e], strlen(expert_fps[e]));
    uint8_t d[MM_SHA256_BYTES];
    mm_sha256_final(&h, d);
    mm_sha256_hex(d, hex_out);
    return MM_OK;
}

int mm_fingerprint_mode_parse(const char *s, unsigned *flags) {
    if (!strcmp(s, "full"))
        *flags = 0;
    else if (!strcmp(s, "headers"))
        *flags = MM_FINGERPRINT_HEADERS_ONLY;
    else
        return MM_EINVAL;
    return MM_OK;
}

/* tenants.c — tenant table, API-key check, quotas (see tenants.h). */
#include "tenants.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "status.h"

typedef struct s_tenant {
    char id[MM_TENANT_ID_MAX];         /* tenant id as configured                 */
    uint8_t key_hash[MM_SHA256_BYTES]; /* sha256 of the API key                   */
    long max_concurrent;               /* cases in flight at most; 0 = unlimited  */
    long cases_per_minute;             /* bucket size and refill; 0 = unlimited   */
    int active;                        /* cases in flight now                      */
    double tokens;                     /* cases the bucket holds now (<= cpm)      */
    double t_refill;                   /* when tokens was last brought up to date */
    int bucket_started;                /* 0 until the first admission (bucket full) */
} s_tenant;

struct mm_tenants {
    s_tenant *t; /* [n] */
    size_t n;
};

static int s_hex_nibble(int c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static int s_quota(json_t *o, const char *key, long *out) {
    json_t *v = json_object_get(o, key);
    *out = 0;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 1000000000)
        return -1;
    *out = (long)json_integer_value(v);
    return 0;
}

int mm_tenants_parse(const char *json, size_t len, const char *name, mm_tenants **out, char *err,
                     size_t errlen) {
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(json, len, 0, &je);
    if (!root)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: line %d: %s", name, je.line, je.text);
    int rc = MM_OK;
    mm_tenants *t = NULL;
    json_t *arr = json_object_get(root, "tenants");
    if (!json_is_array(arr) || json_array_size(arr) == 0) {
        rc = mm_errorf(err, errlen, MM_EINVAL, "%s: 'tenants' must be a non-empty array", name);
        goto done;
    }
    t = calloc(1, sizeof *t);
    if (t)
        t->t = calloc(json_array_size(arr), sizeof *t->t);
    if (!t || !t->t) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", name);
        goto done;
    }
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *o = json_array_get(arr, i);
        s_tenant *x = &t->t[i];
        if (!json_is_object(o)) {
            rc = mm_errorf(err, errlen, MM_EINVAL, "%s: tenants[%zu] is not an object", name, i);
            goto done;
        }
        const char *id = json_string_value(json_object_get(o, "id"));
        if (!id || !*id || strlen(id) >= sizeof x->id) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "%s: tenants[%zu].id must be a string of 1..%d bytes", name, i,
                           MM_TENANT_ID_MAX - 1);
            goto done;
        }
        for (const char *p = id; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) {
                rc = mm_errorf(err, errlen, MM_EINVAL,
                               "%s: tenants[%zu].id holds a control character", name, i);
                goto done;
            }
        for (size_t j = 0; j < i; j++)
            if (!strcmp(t->t[j].id, id)) {
                rc = mm_errorf(err, errlen, MM_EINVAL,
                               "%s: tenants[%zu].id '%s' repeats tenants[%zu]", name, i, id, j);
                goto done;
            }
        snprintf(x->id, sizeof x->id, "%s", id);
        const char *h = json_string_value(json_object_get(o, "key_sha256"));
        if (!h || strlen(h) != 2 * MM_SHA256_BYTES) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "%s: tenants[%zu] (%s).key_sha256 must be 64 hex digits "
                           "(medmoe-keygen --api-key prints one)",
                           name, i, id);
            goto done;
        }
        for (size_t k = 0; k < MM_SHA256_BYTES; k++) {
            int hi = s_hex_nibble(h[2 * k]), lo = s_hex_nibble(h[2 * k + 1]);
            if (hi < 0 || lo < 0) {
                rc = mm_errorf(err, errlen, MM_EINVAL,
                               "%s: tenants[%zu] (%s).key_sha256: '%c' at %zu is not a hex digit",
                               name, i, id, hi < 0 ? h[2 * k] : h[2 * k + 1],
                               hi < 0 ? 2 * k : 2 * k + 1);
                goto done;
            }
            x->key_hash[k] = (uint8_t)(hi << 4 | lo);
        }
        for (size_t j = 0; j < i; j++)
            if (!memcmp(t->t[j].key_hash, x->key_hash, MM_SHA256_BYTES)) {
                rc = mm_errorf(err, errlen, MM_EINVAL,
                               "%s: tenants[%zu] (%s) has the same key_sha256 as tenants[%zu]",
                               name, i, id, j);
                goto done;
            }
        const char *bad = NULL;
        if (s_quota(o, "max_concurrent", &x->max_concurrent))
            bad = "max_concurrent";
        else if (s_quota(o, "cases_per_minute", &x->cases_per_minute))
            bad = "cases_per_minute";
        if (bad) {
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "%s: tenants[%zu] (%s).%s must be an integer >= 0 (0 = unlimited)", name,
                           i, id, bad);
            goto done;
        }
        t->n++;
    }
done:
    json_decref(root);
    if (rc != MM_OK)
        mm_tenants_destroy(&t);
    *out = t;
    return rc;
}

int mm_tenants_load(const char *path, mm_tenants **out, char *err, size_t errlen) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = MM_OK;
    for (;;) {
        if (cap - len < 4096) {
            if (cap > (64u << 20)) {
                rc = mm_errorf(err, errlen, MM_EINVAL, "%s: over 64 MiB", path);
                break;
            }
            char *nb = realloc(buf, cap ? 2 * cap : 8192);
            if (!nb) {
                rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
                break;
            }
            buf = nb;
            cap = cap ? 2 * cap : 8192;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0) {
            if (ferror(f))
                rc = mm_errorf(err, errlen, MM_EIO, "%s: read error", path);
            break;
        }
    }
    fclose(f);
    if (rc == MM_OK)
        rc = mm_tenants_parse(buf, len, path, out, err, errlen);
    free(buf);
    return rc;
}

void mm_tenants_destroy(mm_tenants **t) {
    if (!t || !*t)
        return;
    free((*t)->t);
    free(*t);
    *t = NULL;
}

size_t mm_tenants_count(const mm_tenants *t) { return t->n; }

const char *mm_tenants_id(const mm_tenants *t, int i) {
    return i >= 0 && (size_t)i < t->n ? t->t[i].id : "";
}

int mm_tenants_auth(const mm_tenants *t, const char *key, size_t len) {
    uint8_t d[MM_SHA256_BYTES];
    mm_sha256 h;
    mm_sha256_init(&h);
    mm_sha256_update(&h, key, len);
    mm_sha256_final(&h, d);
    /* no early exit: every byte of every tenant's hash is looked at */
    int found = -1;
    for (size_t i = 0; i < t->n; i++) {
        unsigned diff = 0;
        for (size_t k = 0; k < MM_SHA256_BYTES; k++)
            diff |= (unsigned)(d[k] ^ t->t[i].key_hash[k]);
        /* mask is all ones when diff == 0 (hashes are unique: at most one match) */
        int mask = -(int)(((diff | (0u - diff)) >> 31) ^ 1u);
        found = (found & ~mask) | ((int)i & mask);
    }
    return len ? found : -1;
}

int mm_tenants_admit(mm_tenants *t, int i, double now_ms, char *err, size_t errlen) {
    if (i < 0 || (size_t)i >= t->n)
        return mm_errorf(err, errlen, MM_EINVAL, "no tenant %d", i);
    s_tenant *x = &t->t[i];
    if (x->max_concurrent > 0 && x->active >= x->max_concurrent)
        return mm_errorf(err, errlen, MM_EAGAIN,
                         "tenant %s: max_concurrent %ld cases in flight reached", x->id,
                         x->max_concurrent);
    if (x->cases_per_minute > 0) {
        double cap = (double)x->cases_per_minute, per_ms = cap / 60000.0;
        if (!x->bucket_started) {
            x->tokens = cap;
            x->bucket_started = 1;
        } else if (now_ms > x->t_refill) {
            x->tokens += (now_ms - x->t_refill) * per_ms;
            if (x->tokens > cap)
                x->tokens = cap;
        }
        x->t_refill = now_ms;
        if (x->tokens < 1.0)
            return mm_errorf(err, errlen, MM_EAGAIN,
                             "tenant %s: cases_per_minute %ld used up; next case in %.0f ms", x->id,
                             x->cases_per_minute, (1.0 - x->tokens) / per_ms);
        x->tokens -= 1.0;
    }
    x->active++;
    return MM_OK;
}

void mm_tenants_refund(mm_tenants *t, int i) {
    if (i < 0 || (size_t)i >= t->n || t->t[i].cases_per_minute <= 0)
        return;
    s_tenant *x = &t->t[i];
    x->tokens += 1.0;
    if (x->tokens > (double)x->cases_per_minute)
        x->tokens = (double)x->cases_per_minute;
}

void mm_tenants_release(mm_tenants *t, int i) {
    if (i >= 0 && (size_t)i < t->n && t->t[i].active > 0)
        t->t[i].active--;
}

int mm_tenants_active(const mm_tenants *t, int i) {
    return i >= 0 && (size_t)i < t->n ? t->t[i].active : 0;
}

/* ---- self-test ------------------------------------------------------------- */

#define S_CHECK(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            if (verbose)                                                                           \
                fprintf(stderr, "tenants selftest: %s:%d: %s\n", __FILE__, __LINE__, #cond);       \
            rc = MM_ERR;                                                                           \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

int mm_tenants_selftest(int verbose) {
    int rc = MM_OK;
    char err[512], ha[MM_SHA256_HEX], hb[MM_SHA256_HEX], json[1024];
    mm_tenants *t = NULL;
    mm_sha256_buf_hex("key-a", 5, ha);
    mm_sha256_buf_hex("key-b", 5, hb);
    snprintf(json, sizeof json,
             "{\"tenants\": [{\"id\": \"a\", \"key_sha256\": \"%s\", \"max_concurrent\": 2,"
             " \"cases_per_minute\": 3}, {\"id\": \"b\", \"key_sha256\": \"%s\"}]}",
             ha, hb);
    S_CHECK(mm_tenants_parse(json, strlen(json), "t.json", &t, err, sizeof err) == MM_OK);
    S_CHECK(mm_tenants_count(t) == 2);
    S_CHECK(mm_tenants_auth(t, "key-a", 5) == 0);
    S_CHECK(mm_tenants_auth(t, "key-b", 5) == 1);
    S_CHECK(mm_tenants_auth(t, "key-c", 5) == -1);
    S_CHECK(mm_tenants_auth(t, "", 0) == -1);
    /* concurrency 2, then the bucket of 3 */
    S_CHECK(mm_tenants_admit(t, 0, 1000, err, sizeof err) == MM_OK);
    S_CHECK(mm_tenants_admit(t, 0, 1000, err, sizeof err) == MM_OK);
    S_CHECK(mm_tenants_admit(t, 0, 1000, err, sizeof err) == MM_EAGAIN);
    S_CHECK(strstr(err, "max_concurrent"));
    mm_tenants_release(t, 0);
    mm_tenants_release(t, 0);
    S_CHECK(mm_tenants_admit(t, 0, 1000, err, sizeof err) == MM_OK);
    mm_tenants_release(t, 0);
    S_CHECK(mm_tenants_admit(t, 0, 1000, err, sizeof err) == MM_EAGAIN);
    S_CHECK(strstr(err, "cases_per_minute"));
    S_CHECK(mm_tenants_admit(t, 0, 1000 + 20001, err, sizeof err) == MM_OK); /* 1 refilled */
    mm_tenants_release(t, 0);
    /* a refund gives the unit back (a case refused as invalid), never past the bucket */
    S_CHECK(mm_tenants_admit(t, 0, 21001, err, sizeof err) == MM_EAGAIN);
    mm_tenants_refund(t, 0);
    S_CHECK(mm_tenants_admit(t, 0, 21001, err, sizeof err) == MM_OK);
    mm_tenants_release(t, 0);
    for (int k = 0; k < 10; k++)
        mm_tenants_refund(t, 0);
    for (int k = 0; k < 3; k++) {
        S_CHECK(mm_tenants_admit(t, 0, 21001, err, sizeof err) == MM_OK);
        mm_tenants_release(t, 0);
    }
    S_CHECK(mm_tenants_admit(t, 0, 21001, err, sizeof err) == MM_EAGAIN);
    for (int k = 0; k < 100; k++) { /* b: unlimited */
        S_CHECK(mm_tenants_admit(t, 1, 0, err, sizeof err) == MM_OK);
        mm_tenants_release(t, 1);
    }
    mm_tenants_destroy(&t);
    const char *bad[] = {"{}", "{\"tenants\": []}", "{\"tenants\": [{\"id\": \"a\"}]}",
                         "{\"tenants\": [{\"id\": \"\", \"key_sha256\": \"00\"}]}"};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        S_CHECK(mm_tenants_parse(bad[k], strlen(bad[k]), "bad.json", &t, err, sizeof err) ==
                MM_EINVAL);
        S_CHECK(t == NULL);
    }
    snprintf(json, sizeof json,
             "{\"tenants\": [{\"id\": \"a\", \"key_sha256\": \"%s\"}, {\"id\": \"b\", "
             "\"key_sha256\": \"%s\"}]}",
             ha, ha);
    S_CHECK(mm_tenants_parse(json, strlen(json), "dup.json", &t, err, sizeof err) == MM_EINVAL);
out:
    mm_tenants_destroy(&t);
    return rc;
}

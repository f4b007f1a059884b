/* vk_selftest.c — checks of what is particular to the Vulkan backend, each
 * against the cpu backend on the same inputs: dispatch chains longer than
 * one submission, read-after-write hazards without syncs, tensors freed
 * while their ops are pending, f16/bf16 views at odd element offsets, long
 * attention contexts, and device-selection errors.
 *
 * A plain program: exit 0 pass, 1 fail, 77 no Vulkan device (unless
 * MEDMOE_REQUIRE_VULKAN=1). Registered by tests/vulkan.cmake.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct pair {
    mm_backend *vk, *cpu;
    int fails;
} pair;

/* The same tensor on both backends. */
typedef struct tt {
    mm_tensor *v, *c;
} tt;

static unsigned s_seed = 12345;
static float s_rand(void) {
    s_seed = s_seed * 1103515245u + 12345u;
    return (float)((s_seed >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static void s_check(pair *p, int rc, mm_backend *be, const char *what) {
    if (rc != MM_OK) {
        fprintf(stderr, "FAIL %s: %s: %s\n", what, mm_status_str(rc), mm_backend_error(be));
        p->fails++;
    }
}

static tt s_new(pair *p, mm_dtype dt, int ndim, size_t d0, size_t d1, size_t d2) {
    size_t shape[3] = {d0, d1, d2};
    tt t = {0};
    s_check(p, mm_tensor_new(p->vk, dt, ndim, shape, &t.v), p->vk, "tensor_new vulkan");
    s_check(p, mm_tensor_new(p->cpu, dt, ndim, shape, &t.c), p->cpu, "tensor_new cpu");
    return t;
}

/* Random f32 data uploaded (and narrowed to dt) on both. */
static tt s_rand_t(pair *p, mm_dtype dt, int ndim, size_t d0, size_t d1, size_t d2) {
    tt t = s_new(p, dt, ndim, d0, d1, d2);
    if (!t.v || !t.c)
        return t;
    float *h = malloc(t.v->nelem * sizeof *h);
    for (size_t i = 0; i < t.v->nelem; i++)
        h[i] = s_rand();
    s_check(p, mm_tensor_set(t.v, h, MM_F32), p->vk, "set vulkan");
    s_check(p, mm_tensor_set(t.c, h, MM_F32), p->cpu, "set cpu");
    free(h);
    return t;
}

static tt s_view(pair *p, tt t, size_t row0, size_t n) {
    tt v = {0};
    s_check(p, mm_tensor_view_rows(t.v, row0, n, &v.v), p->vk, "view vulkan");
    s_check(p, mm_tensor_view_rows(t.c, row0, n, &v.c), p->cpu, "view cpu");
    return v;
}

static void s_free(tt *t) {
    mm_tensor_destroy(&t->v);
    mm_tensor_destroy(&t->c);
}

/* Compare a f32 tensor across backends: |v - c| <= tol * (1 + |c|). */
static void s_cmp(pair *p, tt t, float tol, const char *what) {
    if (!t.v || !t.c)
        return;
    size_t n = t.v->nelem;
    float *a = malloc(n * 4), *b = malloc(n * 4);
    s_check(p, mm_tensor_get_f32(t.v, a), p->vk, what);
    s_check(p, mm_tensor_get_f32(t.c, b), p->cpu, what);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (!(fabsf(a[i] - b[i]) <= tol * (1 + fabsf(b[i])))) {
            if (!bad++)
                first = i;
        }
    if (bad) {
        fprintf(stderr, "FAIL %s: %zu of %zu differ, first at %zu: vulkan %g cpu %g\n", what, bad,
                n, first, (double)a[first], (double)b[first]);
        p->fails++;
    } else {
        printf("ok   %s (%zu values)\n", what, n);
    }
    free(a);
    free(b);
}

/* 1500 dependent adds (more than one submission) then a chain of mixed ops. */
static void t_long_chain(pair *p) {
    tt x = s_rand_t(p, MM_F32, 2, 3, 50, 0), y = s_rand_t(p, MM_F32, 2, 1, 50, 0);
    for (int i = 0; i < 1500; i++) {
        s_check(p, mm_add(p->vk, x.v, x.v, y.v), p->vk, "add chain vulkan");
        s_check(p, mm_add(p->cpu, x.c, x.c, y.c), p->cpu, "add chain cpu");
    }
    s_cmp(p, x, 1e-4f, "1500 dependent broadcast adds (several submissions)");
    s_free(&x);
    s_free(&y);
}

/* Ops whose inputs are freed before sync, and new tensors made meanwhile. */
static void t_free_pending(pair *p) {
    tt a = s_rand_t(p, MM_F32, 2, 40, 70, 0), w = s_rand_t(p, MM_F32, 2, 33, 70, 0);
    tt out = s_new(p, MM_F32, 2, 40, 33, 0);
    for (int k = 0; k < 2; k++) {
        tt tmp = s_new(p, MM_F32, 2, 40, 33, 0);
        mm_backend *bes[2] = {p->vk, p->cpu};
        mm_tensor *tm[2] = {tmp.v, tmp.c}, *as[2] = {a.v, a.c}, *ws[2] = {w.v, w.c},
                  *os[2] = {out.v, out.c};
        for (int b = 0; b < 2; b++) {
            s_check(p, mm_matmul(bes[b], tm[b], as[b], ws[b], NULL), bes[b], "matmul");
            s_check(p, mm_unary(bes[b], MM_SILU, tm[b], tm[b]), bes[b], "silu");
            s_check(p, mm_add(bes[b], os[b], os[b], tm[b]), bes[b], "add");
        }
        s_free(&tmp);                              /* pending on vulkan */
        tt fresh = s_new(p, MM_F32, 2, 40, 33, 0); /* must not overlap tmp */
        s_cmp(p, fresh, 0, "new tensor is zero while ops are pending");
        s_free(&fresh);
    }
    s_cmp(p, out, 1e-4f, "matmul -> silu -> accumulate, temporaries freed before sync");
    s_free(&a);
    s_free(&w);
    s_free(&out);
}

/* f16/bf16 weights viewed at odd rows with odd K: odd half offsets. */
static void t_half_views(pair *p) {
    mm_dtype dts[2] = {MM_F16, MM_BF16};
    for (int d = 0; d < 2; d++) {
        size_t K = 67, N = 45;
        tt w = s_rand_t(p, dts[d], 2, N, K, 0);
        tt wv = s_view(p, w, 3, 31); /* element offset 3*67 = 201, odd */
        for (int m = 0; m < 2; m++) {
            size_t M = m ? 37 : 1;
            tt x = s_rand_t(p, MM_F32, 2, M, K, 0), o = s_new(p, MM_F32, 2, M, 31, 0);
            s_check(p, mm_matmul(p->vk, o.v, x.v, wv.v, NULL), p->vk, "matmul view vulkan");
            s_check(p, mm_matmul(p->cpu, o.c, x.c, wv.c, NULL), p->cpu, "matmul view cpu");
            char what[96];
            snprintf(what, sizeof what, "%s weight view at odd offset, M=%zu (%s)",
                     mm_dtype_name(dts[d]), M, m ? "gemm" : "gemv");
            s_cmp(p, o, 1e-4f, what);
            s_free(&x);
            s_free(&o);
        }
        tt idx = s_new(p, MM_I32, 1, 5, 0, 0);
        int32_t iv[5] = {0, 30, 7, 13, 1};
        mm_tensor_set(idx.v, iv, MM_I32);
        mm_tensor_set(idx.c, iv, MM_I32);
        tt g = s_new(p, MM_F32, 2, 5, K, 0);
        s_check(p, mm_get_rows(p->vk, g.v, wv.v, idx.v), p->vk, "get_rows vulkan");
        s_check(p, mm_get_rows(p->cpu, g.c, wv.c, idx.c), p->cpu, "get_rows cpu");
        s_cmp(p, g, 0,
              dts[d] == MM_F16 ? "get_rows f16 view at odd offset"
                               : "get_rows bf16 view at odd offset");
        s_free(&idx);
        s_free(&g);
        s_free(&wv);
        s_free(&w);
    }
}

/* Big GEMM with ragged edges, and a large GEMV. */
static void t_big_matmul(pair *p) {
    tt x = s_rand_t(p, MM_F32, 2, 131, 300, 0), w = s_rand_t(p, MM_F32, 2, 97, 300, 0);
    tt b = s_rand_t(p, MM_F32, 1, 97, 0, 0), o = s_new(p, MM_F32, 2, 131, 97, 0);
    s_check(p, mm_matmul(p->vk, o.v, x.v, w.v, b.v), p->vk, "matmul vulkan");
    s_check(p, mm_matmul(p->cpu, o.c, x.c, w.c, b.c), p->cpu, "matmul cpu");
    s_cmp(p, o, 1e-4f, "gemm 131x300 * 97x300^T + bias");
    s_free(&x);
    s_free(&w);
    s_free(&b);
    s_free(&o);
    x = s_rand_t(p, MM_F32, 2, 1, 1000, 0);
    w = s_rand_t(p, MM_F32, 2, 2000, 1000, 0);
    o = s_new(p, MM_F32, 2, 1, 2000, 0);
    s_check(p, mm_matmul(p->vk, o.v, x.v, w.v, NULL), p->vk, "gemv vulkan");
    s_check(p, mm_matmul(p->cpu, o.c, x.c, w.c, NULL), p->cpu, "gemv cpu");
    s_cmp(p, o, 1e-4f, "gemv 1x1000 * 2000x1000^T");
    s_free(&x);
    s_free(&w);
    s_free(&o);
}

/* Prefill of 150 tokens then decode, GQA, head_dim 128 (two dims per thread). */
static void t_long_attention(pair *p) {
    int H = 4, KVH = 2, hd = 128, ctx = 200;
    size_t T = 150;
    tt kc = s_new(p, MM_F32, 3, 2, (size_t)ctx, (size_t)(KVH * hd));
    tt vc = s_new(p, MM_F32, 3, 2, (size_t)ctx, (size_t)(KVH * hd));
    tt q = s_rand_t(p, MM_F32, 2, T, (size_t)(H * hd), 0);
    tt k = s_rand_t(p, MM_F32, 2, T, (size_t)(KVH * hd), 0);
    tt v = s_rand_t(p, MM_F32, 2, T, (size_t)(KVH * hd), 0);
    tt seq = s_new(p, MM_I32, 2, T, 2, 0), o = s_new(p, MM_F32, 2, T, (size_t)(H * hd), 0);
    int32_t *sv = malloc(T * 2 * sizeof *sv);
    for (size_t t = 0; t < T; t++) {
        sv[2 * t] = 1;
        sv[2 * t + 1] = (int32_t)t + 40;
    }
    mm_tensor_set(seq.v, sv, MM_I32);
    mm_tensor_set(seq.c, sv, MM_I32);
    free(sv);
    mm_backend *bes[2] = {p->vk, p->cpu};
    tt *all[] = {&kc, &vc, &q, &k, &v, &seq, &o};
    for (int b = 0; b < 2; b++) {
        mm_tensor *X[7];
        for (int i = 0; i < 7; i++)
            X[i] = b ? all[i]->c : all[i]->v;
        s_check(p, mm_rope(bes[b], X[2], X[5], H, hd, 64, 10000.0f), bes[b], "rope q");
        s_check(p, mm_rope(bes[b], X[3], X[5], KVH, hd, 64, 10000.0f), bes[b], "rope k");
        s_check(p, mm_kv_store(bes[b], X[0], X[3], X[5]), bes[b], "kv_store k");
        s_check(p, mm_kv_store(bes[b], X[1], X[4], X[5]), bes[b], "kv_store v");
        s_check(
            p,
            mm_attention(bes[b], X[6], X[2], X[0], X[1], X[5], H, KVH, hd, 1.0f / sqrtf((float)hd)),
            bes[b], "attention");
    }
    s_cmp(p, o, 1e-4f, "rope -> kv_store -> attention, 150 tokens at positions 40..189");
    for (int i = 0; i < 7; i++)
        s_free(all[i]);
}

static void t_device_env(pair *p) {
    char err[512];
    mm_backend *be = NULL;
    setenv("MEDMOE_VK_DEVICE", "no-such-device-xyz", 1);
    int rc = mm_backend_new("vulkan", &be, err, sizeof err);
    if (rc == MM_OK || be || !strstr(err, "no-such-device-xyz")) {
        fprintf(stderr, "FAIL MEDMOE_VK_DEVICE naming nothing: rc %d, err '%s'\n", rc, err);
        p->fails++;
        mm_backend_destroy(&be);
    } else {
        printf("ok   MEDMOE_VK_DEVICE naming nothing -> %s: %s\n", mm_status_str(rc), err);
    }
    setenv("MEDMOE_VK_DEVICE", "0", 1);
    rc = mm_backend_new("vulkan", &be, err, sizeof err);
    if (rc != MM_OK) {
        fprintf(stderr, "FAIL MEDMOE_VK_DEVICE=0: %s\n", err);
        p->fails++;
    } else {
        printf("ok   MEDMOE_VK_DEVICE=0 -> %s\n", mm_backend_describe(be));
    }
    mm_backend_destroy(&be);
    unsetenv("MEDMOE_VK_DEVICE");
}

int main(void) {
    char err[512];
    pair p = {0};
    int rc = mm_backend_new("vulkan", &p.vk, err, sizeof err);
    if (rc != MM_OK) {
        const char *req = getenv("MEDMOE_REQUIRE_VULKAN");
        fprintf(stderr, "vulkan backend unavailable: %s: %s\n", mm_status_str(rc), err);
        return req && strcmp(req, "1") == 0 ? 1 : 77;
    }
    if (mm_backend_new("cpu", &p.cpu, err, sizeof err) != MM_OK) {
        fprintf(stderr, "cpu backend: %s\n", err);
        return 1;
    }
    printf("%s; max tensor %zu bytes\n", mm_backend_describe(p.vk),
           mm_backend_max_tensor_bytes(p.vk));
    t_long_chain(&p);
    t_free_pending(&p);
    t_half_views(&p);
    t_big_matmul(&p);
    t_long_attention(&p);
    mm_backend_destroy(&p.vk);
    t_device_env(&p);
    mm_backend_destroy(&p.cpu);
    printf("%s (%d failures)\n", p.fails ? "FAILED" : "passed", p.fails);
    return p.fails ? 1 : 0;
}

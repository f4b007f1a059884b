/* vk_selftest.c — checks of what is particular to the Vulkan backend, each
 * against the cpu backend on the same inputs: dispatch chains longer than
 * one submission, read-after-write hazards without syncs, tensors freed
 * while their ops are pending, f16/bf16 views at odd element offsets, long
 * attention contexts, zeroing of reused memory, descriptor ranges at the
 * device's limit, and device selection (index, name, UUID) and its errors.
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

/* The GEMV paths (M = 1, and 2..16 rows reading the weights once) against the
 * cpu backend for every weight dtype: K a multiple of 8 (16-byte loads) and
 * odd (element loads), N not a multiple of the outputs per workgroup, with
 * and without bias, and a weight view at a row offset that breaks the
 * 8-element alignment. Tolerance 1e-4 relative: f32 sums of up to 1000
 * products of values in [-1, 1] in another order. */
static void t_gemv(pair *p) {
    mm_dtype dts[3] = {MM_F32, MM_F16, MM_BF16};
    size_t Ms[] = {1, 2, 3, 5, 8, 13, 16, 17};
    size_t Ks[] = {8, 256, 1000, 77};
    size_t Ns[] = {1, 7, 130};
    for (int d = 0; d < 3; d++)
        for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
            for (size_t ni = 0; ni < sizeof Ns / sizeof Ns[0]; ni++) {
                size_t K = Ks[ki], N = Ns[ni];
                tt w = s_rand_t(p, dts[d], 2, N + 3, K, 0), b = s_rand_t(p, MM_F32, 1, N, 0, 0);
                tt wv = s_view(p, w, ni == 1 ? 3 : 0, N); /* row 3: offset 3K */
                for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
                    size_t M = Ms[mi];
                    int bias = (mi + ki) % 2;
                    tt x = s_rand_t(p, MM_F32, 2, M, K, 0), o = s_new(p, MM_F32, 2, M, N, 0);
                    s_check(p, mm_matmul(p->vk, o.v, x.v, wv.v, bias ? b.v : NULL), p->vk,
                            "gemv vulkan");
                    s_check(p, mm_matmul(p->cpu, o.c, x.c, wv.c, bias ? b.c : NULL), p->cpu,
                            "gemv cpu");
                    char what[128];
                    snprintf(what, sizeof what, "gemv %s M=%zu K=%zu N=%zu%s%s",
                             mm_dtype_name(dts[d]), M, K, N, bias ? " +bias" : "",
                             ni == 1 ? " (view at row 3)" : "");
                    s_cmp(p, o, 1e-4f, what);
                    s_free(&x);
                    s_free(&o);
                }
                s_free(&wv);
                s_free(&w);
                s_free(&b);
            }
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

/* A new tensor over a range that held data must read as zeros where an op
 * only adds into it (scatter_add reads its destination): the zeroing at first
 * use (vkCmdFillBuffer in staging mode, memset when mapped) is what does it. */
static void t_zero_reuse(pair *p) {
    for (int round = 0; round < 2; round++) {
        tt junk = s_rand_t(p, MM_F32, 2, 64, 96, 0);
        s_free(&junk); /* its range goes back to the free list, dirty */
        tt dst = s_new(p, MM_F32, 2, 64, 96, 0), src = s_rand_t(p, MM_F32, 2, 3, 96, 0);
        tt idx = s_new(p, MM_I32, 1, 3, 0, 0);
        int32_t iv[3] = {5, 0, 63};
        mm_tensor_set(idx.v, iv, MM_I32);
        mm_tensor_set(idx.c, iv, MM_I32);
        s_check(p, mm_scatter_add_rows(p->vk, dst.v, src.v, idx.v, NULL), p->vk, "scatter vulkan");
        s_check(p, mm_scatter_add_rows(p->cpu, dst.c, src.c, idx.c, NULL), p->cpu, "scatter cpu");
        s_cmp(p, dst, 0, "scatter_add into a new tensor over a reused range (zeroed at first use)");
        s_free(&dst);
        s_free(&src);
        s_free(&idx);
    }
}

/* Small uploads between enqueued ops take effect in queue order without a
 * sync (write_queued): y1 = 2x sees the old x, y2 = 3x the new one, for a
 * whole-tensor set and a set of some rows; and (mapped memory, where the
 * host can look) y1 is not computed yet when the second set returns. */
static void t_queued_write(pair *p) {
    tt x = s_rand_t(p, MM_F32, 2, 6, 40, 0);
    tt y1 = s_new(p, MM_F32, 2, 6, 40, 0), y2 = s_new(p, MM_F32, 2, 6, 40, 0);
    tt y3 = s_new(p, MM_F32, 2, 6, 40, 0);
    float h[240], r[80];
    for (int i = 0; i < 240; i++)
        h[i] = (float)i - 100.0f;
    for (int i = 0; i < 80; i++)
        r[i] = 0.5f * (float)i;
    mm_backend *bes[2] = {p->vk, p->cpu};
    for (int b = 0; b < 2; b++) {
        mm_tensor *X = b ? x.c : x.v;
        s_check(p, mm_scale(bes[b], b ? y1.c : y1.v, X, 2.0f), bes[b], "scale 1");
        s_check(p, mm_tensor_set(X, h, MM_F32), bes[b], "queued set");
        s_check(p, mm_scale(bes[b], b ? y2.c : y2.v, X, 3.0f), bes[b], "scale 2");
        s_check(p, mm_tensor_set_rows(X, 2, 2, r, MM_F32), bes[b], "queued set_rows");
        s_check(p, mm_scale(bes[b], b ? y3.c : y3.v, X, -1.0f), bes[b], "scale 3");
    }
    if (y1.v && y1.v->data) {
        float got = ((float *)y1.v->data)[5], want = ((float *)y1.c->data)[5];
        if (got == want) {
            fprintf(stderr, "FAIL small set forced a sync (y1 already computed)\n");
            p->fails++;
        } else {
            printf("ok   small sets between ops queued without a sync\n");
        }
    }
    s_cmp(p, y1, 0, "op before a queued set sees the old data");
    s_cmp(p, y2, 0, "op after a queued set sees the new data");
    s_cmp(p, y3, 0, "op after a queued set_rows sees the new rows");
    s_free(&x);
    s_free(&y1);
    s_free(&y2);
    s_free(&y3);
}

/* flush: the enqueued ops start without a wait; an input freed while they
 * run keeps its memory (a new tensor written at once must not land on it),
 * and what follows waits for them. */
static void t_flush(pair *p) {
    tt x = s_rand_t(p, MM_F32, 2, 300, 257, 0), w = s_rand_t(p, MM_F32, 2, 190, 257, 0);
    tt y = s_new(p, MM_F32, 2, 300, 190, 0);
    s_check(p, mm_matmul(p->vk, y.v, x.v, w.v, NULL), p->vk, "matmul vulkan");
    s_check(p, mm_matmul(p->cpu, y.c, x.c, w.c, NULL), p->cpu, "matmul cpu");
    s_check(p, mm_backend_flush(p->vk), p->vk, "flush");
    s_free(&x); /* in use by the flushed submission */
    tt z = s_rand_t(p, MM_F32, 2, 300, 257, 0);
    tt y2 = s_new(p, MM_F32, 2, 300, 190, 0);
    s_check(p, mm_matmul(p->vk, y2.v, z.v, w.v, NULL), p->vk, "matmul 2 vulkan");
    s_check(p, mm_matmul(p->cpu, y2.c, z.c, w.c, NULL), p->cpu, "matmul 2 cpu");
    s_cmp(p, y, 1e-4f, "matmul flushed, its input freed and a new tensor written meanwhile");
    s_cmp(p, y2, 1e-4f, "matmul enqueued after a flush");
    s_free(&w);
    s_free(&y);
    s_free(&z);
    s_free(&y2);
}

/* 0 when MEDMOE_VK_DEVICE=sel opens a backend whose description holds want. */
static void s_select_ok(pair *p, const char *sel, const char *want) {
    char err[1024];
    mm_backend *be = NULL;
    setenv("MEDMOE_VK_DEVICE", sel, 1);
    int rc = mm_backend_new("vulkan", &be, err, sizeof err);
    if (rc != MM_OK || !strstr(mm_backend_describe(be), want)) {
        fprintf(stderr, "FAIL MEDMOE_VK_DEVICE='%s': rc %d, %s\n", sel, rc,
                rc == MM_OK ? mm_backend_describe(be) : err);
        p->fails++;
    } else {
        printf("ok   MEDMOE_VK_DEVICE='%s' selects the device\n", sel);
    }
    mm_backend_destroy(&be);
    unsetenv("MEDMOE_VK_DEVICE");
}

/* A selector naming nothing fails with the status, the selector and the list
 * of devices (index: name [type] uuid ...). */
static void s_select_bad(pair *p, const char *sel, const char *reason) {
    char err[1024];
    mm_backend *be = NULL;
    setenv("MEDMOE_VK_DEVICE", sel, 1);
    int rc = mm_backend_new("vulkan", &be, err, sizeof err);
    if (rc != MM_ENOTFOUND || be || !strstr(err, sel) || !strstr(err, reason) ||
        !strstr(err, "have: 0: ") || !strstr(err, "uuid GPU-")) {
        fprintf(stderr, "FAIL MEDMOE_VK_DEVICE='%s' (bad): rc %d, err '%s'\n", sel, rc, err);
        p->fails++;
        mm_backend_destroy(&be);
    } else {
        printf("ok   MEDMOE_VK_DEVICE='%s' -> %s: %s\n", sel, mm_status_str(rc), err);
    }
    unsetenv("MEDMOE_VK_DEVICE");
}

/* Selection by index, name, UUID (whole, prefix, with "uuid:"), and errors. */
static void t_device_select(pair *p, const char *desc) {
    /* the default device's name, UUID and index, from its description
     * "vulkan: NAME [type], driver; device I of N (uuid GPU-..., pci ...)" */
    char name[256] = "", uuid[64] = "", idx[16] = "";
    const char *a = desc + strlen("vulkan: "), *b = strstr(a, " [");
    const char *u = strstr(desc, "uuid "), *d = strstr(desc, "; device ");
    if (!b || !u || !d) {
        fprintf(stderr, "FAIL describe() lacks name/uuid/index: %s\n", desc);
        p->fails++;
        return;
    }
    snprintf(name, sizeof name, "%.*s", (int)(b - a), a);
    sscanf(u + 5, "%63[^,]", uuid);
    sscanf(d + 9, "%15[0-9]", idx);
    char want[128], sel[128];
    snprintf(want, sizeof want, "uuid %s", uuid);
    s_select_ok(p, idx, want);
    s_select_ok(p, "index:0", "device 0 of");
    s_select_ok(p, uuid, want);
    snprintf(sel, sizeof sel, "uuid:%s", uuid + 4); /* without "GPU-" */
    s_select_ok(p, sel, want);
    snprintf(sel, sizeof sel, "%.12s", uuid); /* "GPU-" + 8 digits: a prefix */
    s_select_ok(p, sel, want);
    /* a name in another case, a part of it */
    snprintf(sel, sizeof sel, "%.6s", name);
    for (char *c = sel; *c; c++)
        *c = (char)((*c >= 'a' && *c <= 'z') ? *c - 32 : (*c >= 'A' && *c <= 'Z') ? *c + 32 : *c);
    s_select_ok(p, sel, want);
    snprintf(sel, sizeof sel, "name:%s", name);
    s_select_ok(p, sel, want);
    s_select_bad(p, "no-such-device-xyz", "names no device");
    s_select_bad(p, "99", "is not the index of a device");
    s_select_bad(p, "GPU-00000000-dead-beef-0000-000000000000", "is the UUID of no device");
    s_select_bad(p, "uuid:12", "is not a UUID");
    s_select_bad(p, "0000:99:1f.7", "is the PCI bus id of no device");
    s_select_bad(p, "pci:zz", "is not a PCI bus id");
}

/* A tensor of exactly the largest size the backend allows, on a device whose
 * maxStorageBufferRange is not a multiple of its offset alignment (simulated:
 * MEDMOE_VK_TEST_LIMITS): its descriptor range must stay within the limit
 * (run_op refuses a range above it), and ops on it must be right. */
static void t_range_limit(pair *p) {
    setenv("MEDMOE_VK_TEST_LIMITS", "range=1048600,align=256", 1);
    char err[512];
    mm_backend *vk = NULL;
    int rc = mm_backend_new("vulkan", &vk, err, sizeof err);
    unsetenv("MEDMOE_VK_TEST_LIMITS");
    if (rc != MM_OK) {
        fprintf(stderr, "FAIL backend with MEDMOE_VK_TEST_LIMITS: %s\n", err);
        p->fails++;
        return;
    }
    size_t max = mm_backend_max_tensor_bytes(vk); /* 1048592: the limit rounded down by 16 */
    size_t cols = max / 4 / 4;                    /* [4, cols] f32 of exactly max bytes */
    mm_backend *saved = p->vk;
    p->vk = vk;
    if (max != 1048592 || cols * 16 != max) {
        fprintf(stderr, "FAIL max tensor bytes %zu under range=1048600 (want 1048592)\n", max);
        p->fails++;
    } else {
        tt x = s_rand_t(p, MM_F32, 2, 4, cols, 0), o = s_new(p, MM_F32, 2, 4, cols, 0);
        s_check(p, mm_scale(p->vk, o.v, x.v, 3.0f), p->vk, "scale at the range limit vulkan");
        s_check(p, mm_scale(p->cpu, o.c, x.c, 3.0f), p->cpu, "scale cpu");
        s_cmp(p, o, 0, "a tensor of exactly max_tensor_bytes, limit not a multiple of 256");
        s_free(&x);
        s_free(&o);
    }
    p->vk = saved;
    mm_backend_destroy(&vk);
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
    t_gemv(&p);
    t_long_attention(&p);
    t_zero_reuse(&p);
    t_queued_write(&p);
    t_flush(&p);
    char desc[1024];
    snprintf(desc, sizeof desc, "%s", mm_backend_describe(p.vk));
    mm_backend_destroy(&p.vk);
    t_range_limit(&p);
    t_device_select(&p, desc);
    mm_backend_destroy(&p.cpu);
    printf("%s (%d failures)\n", p.fails ? "FAILED" : "passed", p.fails);
    return p.fails ? 1 : 0;
}

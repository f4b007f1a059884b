/* vk_bench.c — the model's real shapes on the vulkan backend, each checked
 * against the cpu backend on the same inputs, then timed (bench/gpu/run).
 *
 *   vk_bench [--small | --decode | --devices]
 *
 * Shapes (full; --small shrinks every one so lavapipe in CI takes seconds;
 * --decode runs only the decode-step GEMVs):
 *   matmul 600x2048 -> 5632 (prefill MLP up), 64x2048 -> 5632 (an expert
 *   batch), 8 and 1 rows x 2048 -> 5632 (batched decode / decode: the GEMV
 *   paths), the 100352-row LM head at M = 1 (split by rows at the backend's
 *   largest tensor, as the model does), the CLIP MLP 577x1024 -> 4096 and
 *   4096 -> 1024; weights bf16 (the checkpoint dtype). Attention: 32 heads x
 *   64, a 600-token prefill and one decode step at position 600.
 * Each line: max |vulkan - cpu| relative to max |cpu| (must be <= 1e-3: f32
 * accumulation of K <= 5632 bf16 products in another order stays near 1e-6;
 * 1e-3 still catches any indexing or reduction error), ms per run, TFLOP/s
 * and weight GB/s, beside the device's nominal peaks when its name is in the
 * table below. Exit 1 when a check fails, 77 without a Vulkan device (unless
 * MEDMOE_REQUIRE_VULKAN=1).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Nominal dense fp16/bf16 matrix peak (TFLOP/s, no sparsity) and memory
 * bandwidth (GB/s) from the vendors' data sheets, matched by name. */
static const struct {
    const char *name;
    double tflops, gbs;
} s_peaks[] = {
    {"H100 PCIe", 756, 2000}, {"H100 NVL", 835, 3900}, {"H100", 989, 3350},  {"H200", 989, 4800},
    {"A100", 312, 2039},      {"L40S", 362, 864},      {"L4", 121, 300},     {"A10", 125, 600},
    {"RTX 4090", 165, 1008},  {"MI300X", 1307, 5300},  {"MI250", 362, 3277},
};

typedef struct bench {
    mm_backend *vk, *cpu;
    double peak_tflops, peak_gbs, budget;
    int fails;
    unsigned seed;
} bench;

static float s_rand(bench *b) {
    b->seed = b->seed * 1103515245u + 12345u;
    return (float)((b->seed >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* The same random data in a tensor on each backend. */
static int s_pair(bench *b, mm_dtype dt, int ndim, const size_t *shape, int random, mm_tensor **v,
                  mm_tensor **c) {
    *v = *c = NULL;
    if (mm_tensor_new(b->vk, dt, ndim, shape, v) != MM_OK ||
        mm_tensor_new(b->cpu, dt, ndim, shape, c) != MM_OK)
        return -1;
    if (!random)
        return 0;
    size_t n = (*v)->nelem;
    float *h = malloc(n * sizeof *h);
    if (!h)
        return -1;
    for (size_t i = 0; i < n; i++)
        h[i] = s_rand(b) * (dt == MM_F32 ? 1.0f : 0.5f);
    int rc = mm_tensor_set(*v, h, MM_F32) != MM_OK || mm_tensor_set(*c, h, MM_F32) != MM_OK;
    free(h);
    return rc ? -1 : 0;
}

/* max |v - c| / max |c| over the tensor pair. */
static double s_rel_err(mm_tensor *v, mm_tensor *c) {
    size_t n = v->nelem;
    float *a = malloc(n * 4), *d = malloc(n * 4);
    double err = INFINITY, maxc = 0, maxd = 0;
    if (a && d && mm_tensor_get_f32(v, a) == MM_OK && mm_tensor_get_f32(c, d) == MM_OK) {
        for (size_t i = 0; i < n; i++) {
            double e = fabs((double)a[i] - d[i]);
            maxd = e > maxd || e != e ? e : maxd;
            maxc = fabs(d[i]) > maxc ? fabs(d[i]) : maxc;
        }
        err = maxd / (maxc > 0 ? maxc : 1);
    }
    free(a);
    free(d);
    return err;
}

static void s_report(bench *b, const char *what, double err, double ms, double flop, double bytes) {
    int ok = err <= 1e-3;
    b->fails += !ok;
    double tf = flop / (ms * 1e-3) / 1e12, gb = bytes / (ms * 1e-3) / 1e9;
    char peak[96] = "";
    if (b->peak_tflops > 0)
        snprintf(peak, sizeof peak, "  (%.1f%% of %.0f TFLOP/s, %.1f%% of %.0f GB/s)",
                 100 * tf / b->peak_tflops, b->peak_tflops, 100 * gb / b->peak_gbs, b->peak_gbs);
    printf("%s %-44s err %.1e  %9.3f ms  %9.4g TFLOP/s  %9.4g GB/s%s\n", ok ? "ok  " : "FAIL", what,
           err, ms, tf, gb, peak);
    fflush(stdout);
}

/* Time fn on vulkan: one warm-up run, then runs until the budget is spent. */
typedef int (*s_run_fn)(bench *b, void *arg);
static double s_time(bench *b, s_run_fn fn, void *arg) {
    if (fn(b, arg) != MM_OK || mm_backend_sync(b->vk) != MM_OK)
        return -1;
    int n = 0;
    double t0 = s_now(), t = t0;
    while (n < 3 || (t - t0 < b->budget && n < 1000)) {
        if (fn(b, arg) != MM_OK || mm_backend_sync(b->vk) != MM_OK)
            return -1;
        n++;
        t = s_now();
    }
    return (t - t0) / n * 1e3;
}

typedef struct mm_args {
    mm_tensor *x, **w; /* vulkan tensors; w: nparts row blocks */
    mm_tensor **ov;    /* output views per row block            */
    size_t nparts;
} mm_args;

static int s_run_mm(bench *b, void *p) {
    mm_args *a = p;
    for (size_t i = 0; i < a->nparts; i++) {
        int rc = mm_matmul(b->vk, a->ov[i], a->x, a->w[i], NULL);
        if (rc != MM_OK)
            return rc;
    }
    return MM_OK;
}

/* out[M,N] = x[M,K] · w[N,K]^T with w bf16, split by rows into blocks that
 * fit the backend's largest tensor (the LM head on most devices). */
static void s_bench_matmul(bench *b, const char *what, size_t M, size_t K, size_t N) {
    size_t max = mm_backend_max_tensor_bytes(b->vk);
    size_t rows = max / (K * 2);
    if (rows > N)
        rows = N;
    size_t nparts = (N + rows - 1) / rows;
    mm_tensor *wv[64], *wc[64], *ovv[64], *ovc[64];
    if (nparts > 64) {
        printf("FAIL %s: %zu row blocks\n", what, nparts);
        b->fails++;
        return;
    }
    size_t xs[2] = {M, K};
    mm_tensor *xv, *xc;
    int bad = s_pair(b, MM_F32, 2, xs, 1, &xv, &xc);
    /* one [M, rows] output per row block */
    for (size_t i = 0; i < nparts && !bad; i++) {
        size_t r = i + 1 < nparts ? rows : N - rows * i;
        size_t ws[2] = {r, K}, bs[2] = {M, r};
        bad = s_pair(b, MM_BF16, 2, ws, 1, &wv[i], &wc[i]) ||
              s_pair(b, MM_F32, 2, bs, 0, &ovv[i], &ovc[i]);
    }
    if (bad) {
        printf("FAIL %s: allocation: %s\n", what, mm_backend_error(b->vk));
        b->fails++;
        return;
    }
    double err = 0;
    for (size_t i = 0; i < nparts; i++) {
        if (mm_matmul(b->vk, ovv[i], xv, wv[i], NULL) != MM_OK ||
            mm_matmul(b->cpu, ovc[i], xc, wc[i], NULL) != MM_OK) {
            err = INFINITY;
            break;
        }
        double e = s_rel_err(ovv[i], ovc[i]);
        err = e > err || e != e ? e : err;
    }
    mm_args a = {xv, wv, ovv, nparts};
    double ms = err <= 1e-3 ? s_time(b, s_run_mm, &a) : 0;
    char name[96];
    snprintf(name, sizeof name, "%s%s", what, nparts > 1 ? " (row blocks)" : "");
    s_report(b, name, err, ms, 2.0 * M * N * K, 2.0 * N * K);
    for (size_t i = 0; i < nparts; i++) {
        mm_tensor_destroy(&wv[i]);
        mm_tensor_destroy(&wc[i]);
        mm_tensor_destroy(&ovv[i]);
        mm_tensor_destroy(&ovc[i]);
    }
    mm_tensor_destroy(&xv);
    mm_tensor_destroy(&xc);
}

typedef struct att_args {
    mm_tensor *o, *q, *k, *v, *seq;
    int H, hd;
} att_args;

static int s_run_att(bench *b, void *p) {
    att_args *a = p;
    return mm_attention(b->vk, a->o, a->q, a->k, a->v, a->seq, a->H, a->H, a->hd,
                        1.0f / sqrtf((float)a->hd));
}

/* Attention of T tokens at positions p0.. over a cache of ctx positions (the
 * cache is filled with random keys/values for every position). */
static void s_bench_attention(bench *b, const char *what, int H, int hd, size_t T, size_t p0,
                              size_t ctx) {
    size_t W = (size_t)H * (size_t)hd;
    size_t qs[2] = {T, W}, cs[3] = {1, ctx, W}, ss[2] = {T, 2};
    mm_tensor *qv, *qc, *kv, *kc, *vv, *vc, *sv, *sc, *ov, *oc;
    int bad = s_pair(b, MM_F32, 2, qs, 1, &qv, &qc) || s_pair(b, MM_F32, 3, cs, 1, &kv, &kc) ||
              s_pair(b, MM_F32, 3, cs, 1, &vv, &vc) || s_pair(b, MM_I32, 2, ss, 0, &sv, &sc) ||
              s_pair(b, MM_F32, 2, qs, 0, &ov, &oc);
    int32_t *seq = malloc(T * 2 * sizeof *seq);
    for (size_t t = 0; t < T && seq; t++) {
        seq[2 * t] = 0;
        seq[2 * t + 1] = (int32_t)(p0 + t);
    }
    if (bad || !seq || mm_tensor_set(sv, seq, MM_I32) != MM_OK ||
        mm_tensor_set(sc, seq, MM_I32) != MM_OK) {
        printf("FAIL %s: setup: %s\n", what, mm_backend_error(b->vk));
        b->fails++;
        free(seq);
        return;
    }
    free(seq);
    float scale = 1.0f / sqrtf((float)hd);
    double err = INFINITY;
    if (mm_attention(b->vk, ov, qv, kv, vv, sv, H, H, hd, scale) == MM_OK &&
        mm_attention(b->cpu, oc, qc, kc, vc, sc, H, H, hd, scale) == MM_OK)
        err = s_rel_err(ov, oc);
    att_args a = {ov, qv, kv, vv, sv, H, hd};
    double ms = err <= 1e-3 ? s_time(b, s_run_att, &a) : 0;
    /* QK^T and PV over the causal prefix: 4 * H * hd flops per (token, key) */
    double keys = 0;
    for (size_t t = 0; t < T; t++)
        keys += (double)(p0 + t + 1);
    s_report(b, what, err, ms, 4.0 * H * hd * keys, 2.0 * 4.0 * W * (double)(p0 + T));
    mm_tensor *all[] = {qv, qc, kv, kc, vv, vc, sv, sc, ov, oc};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        mm_tensor_destroy(&all[i]);
}

/* Every Vulkan device as the backend would open it (MEDMOE_VK_DEVICE=i):
 * name, UUID, PCI bus id and the memory placement it would get. */
static int s_devices(void) {
    char err[1024], sel[16];
    int n = 0;
    for (int i = 0; i < 64; i++) {
        mm_backend *be = NULL;
        snprintf(sel, sizeof sel, "%d", i);
        setenv("MEDMOE_VK_DEVICE", sel, 1);
        int rc = mm_backend_new("vulkan", &be, err, sizeof err);
        if (rc == MM_ENOTFOUND)
            break;
        printf("device %d: %s\n", i, rc == MM_OK ? mm_backend_describe(be) : err);
        mm_backend_destroy(&be);
        n++;
    }
    unsetenv("MEDMOE_VK_DEVICE");
    if (n == 0)
        printf("no Vulkan device: %s\n", err);
    return n ? 0 : 77;
}

int main(int argc, char **argv) {
    int small = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) {
            small = 1;
        } else if (!strcmp(argv[i], "--decode")) {
            small = 2;
        } else if (!strcmp(argv[i], "--devices")) {
            return s_devices();
        } else {
            printf(
                "usage: vk_bench [--small | --decode | --devices]\n  the model's shapes on vulkan, "
                "checked against cpu and timed (see bench/gpu/run);\n  --devices lists "
                "every Vulkan device as the backend sees it\n");
            return !strcmp(argv[i], "-h") || !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    bench b = {.budget = small ? 0.05 : 0.5, .seed = 7};
    char err[1024];
    if (mm_backend_new("vulkan", &b.vk, err, sizeof err) != MM_OK) {
        const char *req = getenv("MEDMOE_REQUIRE_VULKAN");
        fprintf(stderr, "vk_bench: no vulkan backend: %s\n", err);
        return req && !strcmp(req, "1") ? 1 : 77;
    }
    if (mm_backend_new("cpu", &b.cpu, err, sizeof err) != MM_OK) {
        fprintf(stderr, "vk_bench: cpu backend: %s\n", err);
        return 1;
    }
    const char *desc = mm_backend_describe(b.vk);
    printf("device: %s\nlargest tensor: %zu bytes\n", desc, mm_backend_max_tensor_bytes(b.vk));
    for (size_t i = 0; i < sizeof s_peaks / sizeof s_peaks[0]; i++)
        if (strstr(desc, s_peaks[i].name)) {
            b.peak_tflops = s_peaks[i].tflops;
            b.peak_gbs = s_peaks[i].gbs;
            printf("nominal peaks (%s data sheet): %.0f TFLOP/s dense fp16/bf16, %.0f GB/s\n",
                   s_peaks[i].name, b.peak_tflops, b.peak_gbs);
            break;
        }
    if (b.peak_tflops == 0)
        printf("nominal peaks: not known for this device\n");
    printf("weights bf16; err = max |vulkan - cpu| / max |cpu| (limit 1e-3)\n");
    if (small == 2) { /* the decode-step shapes only (lavapipe A/B) */
        s_bench_matmul(&b, "matmul 1x2048 -> 5632 (decode, gemv)", 1, 2048, 5632);
        s_bench_matmul(&b, "matmul 4x2048 -> 5632 (gemv16)", 4, 2048, 5632);
        s_bench_matmul(&b, "matmul 1x2048 -> 100352 (LM head)", 1, 2048, 100352);
    } else if (small) {
        s_bench_matmul(&b, "matmul 37x256 -> 300 (prefill)", 37, 256, 300);
        s_bench_matmul(&b, "matmul 8x256 -> 300 (gemv16)", 8, 256, 300);
        s_bench_matmul(&b, "matmul 1x256 -> 3001 (LM head, gemv)", 1, 256, 3001);
        s_bench_matmul(&b, "matmul 17x64 -> 256 (CLIP MLP)", 17, 64, 256);
        s_bench_attention(&b, "attention 4x32, prefill 40 tokens", 4, 32, 40, 0, 64);
        s_bench_attention(&b, "attention 4x32, decode at 40", 4, 32, 1, 40, 64);
    } else {
        s_bench_matmul(&b, "matmul 600x2048 -> 5632 (prefill MLP)", 600, 2048, 5632);
        s_bench_matmul(&b, "matmul 64x2048 -> 5632 (expert batch)", 64, 2048, 5632);
        s_bench_matmul(&b, "matmul 8x2048 -> 5632 (gemv16)", 8, 2048, 5632);
        s_bench_matmul(&b, "matmul 1x2048 -> 5632 (decode, gemv)", 1, 2048, 5632);
        s_bench_matmul(&b, "matmul 1x2048 -> 100352 (LM head)", 1, 2048, 100352);
        s_bench_matmul(&b, "matmul 577x1024 -> 4096 (CLIP MLP up)", 577, 1024, 4096);
        s_bench_matmul(&b, "matmul 577x4096 -> 1024 (CLIP MLP down)", 577, 4096, 1024);
        s_bench_attention(&b, "attention 32x64, prefill 600 tokens", 32, 64, 600, 0, 640);
        s_bench_attention(&b, "attention 32x64, decode at 600", 32, 64, 1, 600, 640);
    }
    mm_backend_destroy(&b.vk);
    mm_backend_destroy(&b.cpu);
    printf("%s (%d failed)\n", b.fails ? "FAILED" : "passed", b.fails);
    return b.fails ? 1 : 0;
}

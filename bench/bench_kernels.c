/* bench_kernels.c — kernel figures for every backend that can be created,
 * each beside a baseline measured in the same run:
 *
 *   matmul GFLOP/s at M = 1, 16, 576 for N = K = 2048 and the StableLM-2
 *     MLP shapes (2048 -> 5632, 5632 -> 2048), weights f32 and bf16, beside
 *     plain OpenBLAS cblas_sgemm on the same (f32) data;
 *   GEMV (M = 1) weight-read GB/s beside memcpy bandwidth of a 256 MiB copy;
 *   attention (32 heads x 64) ms: a 600-token prefill and one decode step
 *     at position 600; and the vision tower's (16 heads x 64, CLIP ViT-L/14
 *     at 336 px): 577 rows all at position 576 over their own K/V.
 *
 * The backend line prints mm_backend_describe(), the device really used.
 * Loops are time-bounded (longer budget, fewer repetitions on vulkan, where
 * lavapipe is slow). Never fails: errors are printed and skipped, exit 0.
 */
#include <cblas.h>
#include <stdint.h>
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

static void s_fill(float *v, size_t n, uint64_t *st) {
    for (size_t i = 0; i < n; i++) {
        *st = *st * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((*st >> 40) & 0xffffff) / 16777216.0f - 0.5f;
    }
}

/* One timed thing: fn(arg) runs one repetition (and syncs); returns its
 * status. */
typedef int (*s_fn)(void *arg);

/* Mean seconds per call after one warm-up: repeat until `budget` seconds
 * have passed (at least once, at most 10000 times). A warm-up call that
 * alone takes the whole budget is the figure (slow devices: lavapipe).
 * < 0 on error. */
static double s_time(s_fn fn, void *arg, double budget) {
    double t0 = s_now(), t;
    if (fn(arg) != 0)
        return -1;
    t = s_now() - t0;
    if (t >= budget)
        return t;
    int n = 0;
    t0 = s_now();
    do {
        if (fn(arg) != 0)
            return -1;
        n++;
        t = s_now() - t0;
    } while (t < budget && n < 10000);
    return t / n;
}

/* ---- matmul ---------------------------------------------------------------- */

typedef struct mm_args {
    mm_backend *be;
    mm_tensor *out, *x, *w;
    int M, N, K;          /* for the BLAS baseline */
    const float *hx, *hw; /* host data             */
    float *hout;
} mm_args;

static int s_run_matmul(void *p) {
    mm_args *a = p;
    int rc = mm_matmul(a->be, a->out, a->x, a->w, NULL);
    return rc != MM_OK ? rc : mm_backend_sync(a->be);
}

static int s_run_gemv(void *p) {
    mm_args *a = p;
    cblas_sgemv(CblasRowMajor, CblasNoTrans, a->N, a->K, 1.0f, a->hw, a->K, a->hx, 1, 0.0f, a->hout,
                1);
    return 0;
}

static int s_run_blas(void *p) {
    mm_args *a = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->M, a->N, a->K, 1.0f, a->hx, a->K, a->hw,
                a->K, 0.0f, a->hout, a->N);
    return 0;
}

/* The baselines run OpenBLAS on its own threads, one per core (the cpu
 * backend sets it to one thread: it runs sgemm inside its own pool). */
static double s_time_blas(s_fn fn, mm_args *a, double budget) {
    int n = openblas_get_num_threads();
    openblas_set_num_threads(openblas_get_num_procs());
    double t = s_time(fn, a, budget);
    openblas_set_num_threads(n);
    return t;
}

#ifdef MM_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>

/* oneDNN's matmul with bf16 inputs and f32 output (its AMX / AVX-512-BF16 /
 * AVX2 path, picked at run time), on the prefill and vision shapes, beside
 * OpenBLAS sgemm on the same values widened to f32 (the cpu backend's
 * prefill path today). The activations are rounded to bf16 here: a
 * different precision contract (the default path keeps f32 activations). */
static void s_bench_onednn(double budget) {
    static const int shapes[][3] = {{704, 5632, 2048},
                                    {704, 2048, 5632},
                                    {704, 2048, 2048},
                                    {577, 4096, 1024},
                                    {577, 1024, 4096}}; /* M, N, K */
    dnnl_engine_t eng;
    dnnl_stream_t st;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&st, eng, dnnl_stream_default_flags) != dnnl_success) {
        printf("  oneDNN: no cpu engine\n");
        return;
    }
    printf("\noneDNN %d.%d bf16 matmul (f32 out) vs OpenBLAS sgemm (%d threads), GFLOP/s\n",
           dnnl_version()->major, dnnl_version()->minor, openblas_get_num_procs());
    printf("  %5s %5s %5s %10s %10s %7s\n", "M", "N", "K", "oneDNN", "sgemm", "ratio");
    uint64_t seed = 7;
    for (int i = 0; i < 5; i++) {
        int M = shapes[i][0], N = shapes[i][1], K = shapes[i][2];
        float *x = malloc((size_t)M * K * 4), *w = malloc((size_t)N * K * 4);
        float *o = malloc((size_t)M * N * 4);
        uint16_t *xb = malloc((size_t)M * K * 2), *wb = malloc((size_t)N * K * 2);
        if (!x || !w || !o || !xb || !wb) {
            free(x), free(w), free(o), free(xb), free(wb);
            return;
        }
        s_fill(x, (size_t)M * K, &seed);
        s_fill(w, (size_t)N * K, &seed);
        for (size_t j = 0; j < (size_t)M * K; j++)
            xb[j] = mm_f32_to_bf16(x[j]);
        for (size_t j = 0; j < (size_t)N * K; j++)
            wb[j] = mm_f32_to_bf16(w[j]);
        dnnl_memory_desc_t a_md, b_md, c_md;
        dnnl_dims_t ad = {M, K}, bd = {K, N}, cd = {M, N};
        dnnl_memory_desc_init_by_tag(&a_md, 2, ad, dnnl_bf16, dnnl_ab);
        dnnl_memory_desc_init_by_tag(&b_md, 2, bd, dnnl_bf16, dnnl_ba); /* w[N,K] = Bᵀ */
        dnnl_memory_desc_init_by_tag(&c_md, 2, cd, dnnl_f32, dnnl_ab);
        dnnl_matmul_desc_t md;
        dnnl_primitive_desc_t pd = NULL;
        dnnl_primitive_t prim = NULL;
        dnnl_memory_t A = NULL, B = NULL, C = NULL;
        if (dnnl_matmul_desc_init(&md, &a_md, &b_md, NULL, &c_md) != dnnl_success ||
            dnnl_primitive_desc_create(&pd, &md, NULL, eng, NULL) != dnnl_success ||
            dnnl_primitive_create(&prim, pd) != dnnl_success ||
            dnnl_memory_create(&A, &a_md, eng, xb) != dnnl_success ||
            dnnl_memory_create(&B, &b_md, eng, wb) != dnnl_success ||
            dnnl_memory_create(&C, &c_md, eng, o) != dnnl_success) {
            printf("  %5d %5d %5d oneDNN setup failed\n", M, N, K);
        } else {
            dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}};
            double t0 = s_now(), t = 0;
            int n = 0;
            do {
                dnnl_primitive_execute(prim, st, 3, args);
                dnnl_stream_wait(st);
                n++;
                t = s_now() - t0;
            } while (t < budget && n < 1000);
            double td = t / n;
            mm_args a = {NULL, NULL, NULL, NULL, M, N, K, x, w, o};
            double tb = s_time_blas(s_run_blas, &a, budget);
            double flop = 2.0 * M * N * K;
            printf("  %5d %5d %5d %10.1f %10.1f %7.2f\n", M, N, K, flop / td * 1e-9,
                   flop / tb * 1e-9, tb / td);
        }
        dnnl_memory_destroy(A), dnnl_memory_destroy(B), dnnl_memory_destroy(C);
        dnnl_primitive_destroy(prim);
        dnnl_primitive_desc_destroy(pd);
        free(x), free(w), free(o), free(xb), free(wb);
    }
    dnnl_stream_destroy(st);
    dnnl_engine_destroy(eng);
}
#endif

/* Weight of host f32 data w, as dtype dt, in the backend's weight dtype. */
static int s_upload_weight(mm_backend *be, mm_dtype dt, const float *w, size_t N, size_t K,
                           mm_tensor **out) {
    mm_dtype wd = mm_backend_weight_dtype(be, dt);
    int rc = mm_tensor_new_2d(be, wd, N, K, out);
    if (rc != MM_OK)
        return rc;
    if (dt == MM_F32 || dt == MM_Q8 || (wd != MM_F32 && wd != dt))
        return mm_tensor_set(*out, w, MM_F32);
    uint16_t *h = malloc(N * K * 2);
    if (!h)
        return MM_ENOMEM;
    for (size_t i = 0; i < N * K; i++)
        h[i] = dt == MM_F16 ? mm_f32_to_f16(w[i]) : mm_f32_to_bf16(w[i]);
    rc = mm_tensor_set(*out, h, dt);
    free(h);
    return rc;
}

/* GEMV weight-read figures, collected to print beside memcpy. */
typedef struct gemv_fig {
    int N, K;    /* weight shape                          */
    char dt[32]; /* "given (stored)" dtype                */
    double gbs;  /* stored weight bytes / second          */
} gemv_fig;

static void s_bench_matmul(mm_backend *be, double budget, gemv_fig *gv, int *ngv) {
    static const int shapes[][2] = {{2048, 2048}, {5632, 2048}, {2048, 5632}}; /* N, K */
    static const int Ms[] = {1, 4, 16, 576};
    static const mm_dtype dts[] = {MM_F32, MM_BF16, MM_Q8};
    printf("  matmul out[M,N] = x[M,K] w[N,K]^T, GFLOP/s; baseline OpenBLAS cblas_sgemm on the "
           "same f32 values\n");
    printf("  %5s %5s %5s %-11s %9s %10s %7s\n", "M", "N", "K", "w (stored)", "backend", "sgemm",
           "ratio");
    uint64_t st = 42;
    for (int s = 0; s < 3; s++) {
        size_t N = (size_t)shapes[s][0], K = (size_t)shapes[s][1], Mmax = 576;
        float *hw = malloc(N * K * 4), *hx = malloc(Mmax * K * 4), *ho = malloc(Mmax * N * 4);
        if (!hw || !hx || !ho) {
            printf("  out of host memory\n");
            free(hw), free(hx), free(ho);
            return;
        }
        s_fill(hw, N * K, &st);
        s_fill(hx, Mmax * K, &st);
        for (int d = 0; d < 3; d++) {
            mm_tensor *w = NULL;
            if (mm_backend_weight_dtype(be, dts[d]) != dts[d] && dts[d] == MM_Q8)
                continue; /* q8: cpu only */
            int rc = s_upload_weight(be, dts[d], hw, N, K, &w);
            if (rc != MM_OK) {
                printf("  N=%zu K=%zu %s: upload failed: %s\n", N, K, mm_dtype_name(dts[d]),
                       mm_backend_error(be));
                mm_tensor_destroy(&w);
                continue;
            }
            /* the baseline computes on exactly the values the backend holds */
            float *hwd = malloc(N * K * 4);
            if (hwd)
                mm_tensor_get_f32(w, hwd);
            double prev = 0; /* GFLOP/s at the previous M */
            for (int m = 0; m < 4; m++) {
                size_t M = (size_t)Ms[m];
                double est = prev > 0 ? 2.0 * (double)M * (double)N * (double)K / (prev * 1e9) : 0;
                if (est > 5.0) { /* a slow device (lavapipe): keep the run short */
                    printf("  %5zu %5zu %5zu %-11s skipped: about %.0f s per call here\n", M, N, K,
                           mm_dtype_name(dts[d]), est);
                    continue;
                }
                mm_tensor *x = NULL, *o = NULL;
                if (mm_tensor_new_2d(be, MM_F32, M, K, &x) != MM_OK ||
                    mm_tensor_new_2d(be, MM_F32, M, N, &o) != MM_OK ||
                    mm_tensor_set(x, hx, MM_F32) != MM_OK || !hwd) {
                    printf("  M=%zu: setup failed: %s\n", M, mm_backend_error(be));
                    mm_tensor_destroy(&x);
                    mm_tensor_destroy(&o);
                    continue;
                }
                mm_args a = {be, o, x, w, (int)M, (int)N, (int)K, hx, hwd, ho};
                double flop = 2.0 * (double)M * (double)N * (double)K;
                double tb = s_time(s_run_matmul, &a, budget);
                double tc = s_time_blas(s_run_blas, &a, 0.3);
                char wdesc[32];
                snprintf(wdesc, sizeof wdesc, "%s (%s)", mm_dtype_name(dts[d]),
                         mm_dtype_name(w->dtype));
                prev = tb > 0 ? flop / tb * 1e-9 : 0;
                if (tb < 0)
                    printf("  %5zu %5zu %5zu %-10s failed: %s\n", M, N, K, wdesc,
                           mm_backend_error(be));
                else if (M == 1) {
                    /* sgemm is no fair baseline for one row: add sgemv */
                    double tv = s_time_blas(s_run_gemv, &a, 0.3);
                    printf("  %5zu %5zu %5zu %-11s %9.1f %10.1f %7.2f   sgemv %.1f, ratio %.2f\n",
                           M, N, K, wdesc, flop / tb * 1e-9, flop / tc * 1e-9, tc / tb,
                           flop / tv * 1e-9, tv / tb);
                } else
                    printf("  %5zu %5zu %5zu %-11s %9.1f %10.1f %7.2f\n", M, N, K, wdesc,
                           flop / tb * 1e-9, flop / tc * 1e-9, tc / tb);
                if (M == 1 && tb > 0 && *ngv < 16) {
                    gv[*ngv] = (gemv_fig){(int)N, (int)K, "", (double)w->nbytes / tb * 1e-9};
                    snprintf(gv[*ngv].dt, sizeof gv[*ngv].dt, "%s", wdesc);
                    (*ngv)++;
                }
                mm_tensor_destroy(&x);
                mm_tensor_destroy(&o);
            }
            free(hwd);
            mm_tensor_destroy(&w);
        }
        free(hw), free(hx), free(ho);
    }
}

/* Bytes copied per second by memcpy over a 256 MiB buffer (each byte is
 * read once and written once). */
static double s_memcpy_gbs(void) {
    size_t n = (size_t)256 << 20;
    char *a = malloc(n), *b = malloc(n);
    double gbs = 0;
    if (a && b) {
        /* Fault every page in before timing (page faults cost more than
         * the copy here). The empty asm with a "memory" clobber stops the
         * compiler from dropping these stores or the timed copies as dead. */
        memset(a, 1, n);
        memset(b, 2, n);
        __asm__ volatile("" : : "r"(a), "r"(b) : "memory");
        int reps = 0;
        double t0 = s_now(), t;
        do {
            memcpy(b, a, n);
            __asm__ volatile("" : : "r"(b) : "memory");
            reps++;
            t = s_now() - t0;
        } while (t < 0.5 && reps < 100);
        gbs = (double)n * reps / t * 1e-9;
    }
    free(a), free(b);
    return gbs;
}

/* GEMV over a weight far larger than any cache (128 MiB as f32), so the
 * figure is memory bandwidth; beside OpenBLAS sgemv on the same values. */
static void s_bench_gemv_big(mm_backend *be, double budget, double mc) {
    size_t N = 8192, K = 4096;
    static const mm_dtype dts[] = {MM_F32, MM_BF16};
    float *hw = malloc(N * K * 4), *hx = malloc(K * 4), *ho = malloc(N * 4);
    uint64_t st = 9;
    if (!hw || !hx || !ho) {
        printf("  gemv: out of host memory\n");
        free(hw), free(hx), free(ho);
        return;
    }
    s_fill(hw, N * K, &st);
    s_fill(hx, K, &st);
    for (int d = 0; d < 2; d++) {
        mm_tensor *w = NULL, *x = NULL, *o = NULL;
        if (s_upload_weight(be, dts[d], hw, N, K, &w) != MM_OK ||
            mm_tensor_new_2d(be, MM_F32, 1, K, &x) != MM_OK ||
            mm_tensor_new_2d(be, MM_F32, 1, N, &o) != MM_OK || mm_tensor_set(x, hx, MM_F32) ||
            mm_tensor_get_f32(w, hw) != MM_OK) {
            printf("  gemv %zux%zu %s: setup failed: %s\n", N, K, mm_dtype_name(dts[d]),
                   mm_backend_error(be));
        } else {
            mm_args a = {be, o, x, w, 1, (int)N, (int)K, hx, hw, ho};
            double tb = s_time(s_run_matmul, &a, budget), tv = s_time(s_run_gemv, &a, 0.3);
            if (tb < 0)
                printf("  gemv failed: %s\n", mm_backend_error(be));
            else
                printf("  GEMV N=%zu K=%zu w %s (stored %s, %zu MiB): %.2f GB/s weight read, "
                       "memcpy ratio %.2f; OpenBLAS sgemv on f32 %.2f GB/s, ratio %.2f\n",
                       N, K, mm_dtype_name(dts[d]), mm_dtype_name(w->dtype), w->nbytes >> 20,
                       (double)w->nbytes / tb * 1e-9, (double)w->nbytes / tb * 1e-9 / mc,
                       (double)N * K * 4 / tv * 1e-9, tv / tb);
        }
        mm_tensor_destroy(&w);
        mm_tensor_destroy(&x);
        mm_tensor_destroy(&o);
    }
    free(hw), free(hx), free(ho);
}

/* ---- attention ------------------------------------------------------------- */

typedef struct att_args {
    mm_backend *be;
    mm_tensor *out, *q, *kc, *vc, *seq;
    int heads;
} att_args;

static int s_run_att(void *p) {
    att_args *a = p;
    int rc =
        mm_attention(a->be, a->out, a->q, a->kc, a->vc, a->seq, a->heads, a->heads, 64, 0.125f);
    return rc != MM_OK ? rc : mm_backend_sync(a->be);
}

static void s_bench_attention(mm_backend *be, double budget) {
    size_t T = 600, W = 32 * 64, ctx = 608;
    size_t cs[3] = {1, ctx, W};
    float *h = malloc(T * W * 4);
    int32_t *seq = malloc(T * 8);
    mm_tensor *q = NULL, *q1 = NULL, *out = NULL, *out1 = NULL, *kc = NULL, *vc = NULL;
    mm_tensor *st = NULL, *st1 = NULL, *kv = NULL;
    uint64_t rs = 7;
    if (!h || !seq)
        goto done;
    s_fill(h, T * W, &rs);
    for (size_t t = 0; t < T; t++)
        seq[2 * t] = 0, seq[2 * t + 1] = (int32_t)t;
    int32_t seq1[2] = {0, 600};
    if (mm_tensor_new_2d(be, MM_F32, T, W, &q) || mm_tensor_new_2d(be, MM_F32, T, W, &out) ||
        mm_tensor_new_2d(be, MM_F32, T, W, &kv) || mm_tensor_new_2d(be, MM_F32, 1, W, &q1) ||
        mm_tensor_new_2d(be, MM_F32, 1, W, &out1) || mm_tensor_new(be, MM_F32, 3, cs, &kc) ||
        mm_tensor_new(be, MM_F32, 3, cs, &vc) || mm_tensor_new_2d(be, MM_I32, T, 2, &st) ||
        mm_tensor_new_2d(be, MM_I32, 1, 2, &st1) || mm_tensor_set(q, h, MM_F32) ||
        mm_tensor_set(kv, h, MM_F32) || mm_tensor_set_rows(q1, 0, 1, h, MM_F32) ||
        mm_tensor_set(st, seq, MM_I32) || mm_tensor_set(st1, seq1, MM_I32) ||
        mm_kv_store(be, kc, kv, st) || mm_kv_store(be, vc, kv, st) || mm_backend_sync(be)) {
        printf("  attention: setup failed: %s\n", mm_backend_error(be));
        goto done;
    }
    att_args pre = {be, out, q, kc, vc, st, 32}, dec = {be, out1, q1, kc, vc, st1, 32};
    double tp = s_time(s_run_att, &pre, budget);
    double td = s_time(s_run_att, &dec, budget);
    if (tp < 0 || td < 0)
        printf("  attention failed: %s\n", mm_backend_error(be));
    else
        printf("  attention 32 heads x 64: prefill 600 tokens %.2f ms, decode 1 token at 600 "
               "%.3f ms\n",
               tp * 1e3, td * 1e3);
done:
    free(h), free(seq);
    mm_tensor *all[] = {q, q1, out, out1, kc, vc, st, st1, kv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        mm_tensor_destroy(&all[i]);
}

/* The vision tower's attention (model/medmoe.c): every one of the 577 rows
 * (576 patches + class token) sees all 577, i.e. stands at position 576 of
 * a one-slot cache that is the image's own K and V. */
static void s_bench_attention_vision(mm_backend *be, double budget) {
    size_t T = 577, W = 16 * 64;
    size_t cs[3] = {1, T, W};
    float *h = malloc(T * W * 4);
    int32_t *seq = malloc(T * 8);
    mm_tensor *q = NULL, *out = NULL, *kc = NULL, *vc = NULL, *st = NULL;
    uint64_t rs = 11;
    if (!h || !seq)
        goto done;
    for (size_t t = 0; t < T; t++)
        seq[2 * t] = 0, seq[2 * t + 1] = (int32_t)(T - 1);
    if (mm_tensor_new_2d(be, MM_F32, T, W, &q) || mm_tensor_new_2d(be, MM_F32, T, W, &out) ||
        mm_tensor_new(be, MM_F32, 3, cs, &kc) || mm_tensor_new(be, MM_F32, 3, cs, &vc) ||
        mm_tensor_new_2d(be, MM_I32, T, 2, &st) || mm_tensor_set(st, seq, MM_I32)) {
        printf("  attention (vision): setup failed: %s\n", mm_backend_error(be));
        goto done;
    }
    mm_tensor *fill[] = {q, kc, vc};
    for (size_t i = 0; i < 3; i++) {
        s_fill(h, T * W, &rs);
        if (mm_tensor_set(fill[i], h, MM_F32)) {
            printf("  attention (vision): setup failed: %s\n", mm_backend_error(be));
            goto done;
        }
    }
    att_args a = {be, out, q, kc, vc, st, 16};
    double tv = s_time(s_run_att, &a, budget);
    if (tv < 0)
        printf("  attention (vision) failed: %s\n", mm_backend_error(be));
    else
        printf("  attention 16 heads x 64 (vision tower): 577 rows all at position 576 %.2f ms\n",
               tv * 1e3);
done:
    free(h), free(seq);
    mm_tensor *all[] = {q, out, kc, vc, st};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        mm_tensor_destroy(&all[i]);
}

int main(void) {
    static const char *names[] = {"cpu", "vulkan"};
    printf("bench_kernels: openblas %s\n", openblas_get_config());
    double mc = s_memcpy_gbs();
    printf("memcpy 256 MiB: %.2f GB/s (bytes copied per second)\n", mc);
    for (int b = 0; b < 2; b++) {
        mm_backend *be = NULL;
        char err[512];
        if (mm_backend_new(names[b], &be, err, sizeof err) != MM_OK) {
            printf("\nbackend %s: not available: %s\n", names[b], err);
            continue;
        }
        printf("\nbackend %s: %s\n", mm_backend_name(be), mm_backend_describe(be));
        double budget = b == 0 ? 0.3 : 0.5;
        gemv_fig gv[16];
        int ngv = 0;
        s_bench_matmul(be, budget, gv, &ngv);
        printf("  GEMV (M = 1) above, weight read in GB/s of stored bytes (these weights fit in "
               "cache), "
               "beside memcpy %.2f GB/s\n",
               mc);
        for (int i = 0; i < ngv; i++)
            printf("    N=%-5d K=%-5d w %-11s %8.2f GB/s  ratio %.2f\n", gv[i].N, gv[i].K, gv[i].dt,
                   gv[i].gbs, mc > 0 ? gv[i].gbs / mc : 0);
        s_bench_gemv_big(be, budget, mc);
        s_bench_attention(be, budget);
        s_bench_attention_vision(be, budget);
        mm_backend_destroy(&be);
    }
#ifdef MM_HAVE_DNNL
    s_bench_onednn(0.5);
#else
    printf("\noneDNN: not built in (libdnnl-dev missing)\n");
#endif
    return 0;
}

/* cpu_backend.c — the cpu backend: host memory, the kernels of cpu_matmul.c
 * for matmul, OpenBLAS for attention over runs of prefill rows, plain C
 * loops for everything else, all spread over the threads of cpu_pool.c
 * (which sleep when idle; see cpu_pool.h for why not OpenMP).
 *
 * Every op is computed at once inside run_op, so sync() has nothing to do.
 * The front end (ops.c) has validated shapes and dtypes; what only the data
 * can reveal (an index or a cache position out of range) is checked here,
 * before anything is written, and reported as MM_EINVAL naming the op.
 *
 * Weights stay in their checkpoint dtype (f32, f16, bf16): weight_dtype()
 * keeps each, and mm_tensor_new_host() wraps the caller's memory (the mapped
 * checkpoint) without a copy, so RSS holds only the pages a process touches
 * and processes mapping one file share them in the page cache.
 *
 * Memory. Tensors of MM_CPU_MMAP_MIN bytes or more (KV caches, activations
 * of long prompts) are anonymous mappings: zero without a memset, and a page
 * costs memory only once written, so a KV cache sized for the model's whole
 * context holds only the positions cases have reached.
 *
 *     mm_backend *be;  char err[256];
 *     if (mm_cpu_backend_new(&be, err, sizeof err) != MM_OK) { ... }
 *     // or mm_backend_new("cpu", &be, err, sizeof err)
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../backend.h"
#include "cpu_matmul.h"
#include "cpu_pool.h"

/* Loops below this many elements stay on the calling thread: handing work
 * to the pool costs more than it. */
#define S_PAR_MIN 32768

/* Tensors from this size up are anonymous mappings (see the top). */
#define MM_CPU_MMAP_MIN ((size_t)1 << 20)

typedef struct s_cpu {
    char describe[320]; /* "cpu: avx512 kernels, 2 threads, OpenBLAS ..." */
    mm_pool *pool;      /* the threads every op spreads over */
    mm_cpu_isa isa;     /* the matmul kernels' path */
    mm_cpu_dnnl *dnnl;  /* MEDMOE_CPU_PREFILL=bf16: oneDNN prefill; else NULL */
} s_cpu;

/* ---- backend housekeeping ------------------------------------------------ */

static void s_destroy(void *ctx) {
    s_cpu *c = ctx;
    mm_pool_destroy(&c->pool);
    mm_cpu_dnnl_destroy(&c->dnnl);
    free(c);
}

static const char *s_describe(void *ctx) { return ((s_cpu *)ctx)->describe; }

/* Every weight dtype is computed as stored (cpu_matmul.c widens in registers). */
static mm_dtype s_weight_dtype(void *ctx, mm_dtype t) {
    return t == MM_F16 || t == MM_BF16 || t == MM_Q8 ? t : MM_F32;
}

static size_t s_max_tensor_bytes(void *ctx) { return SIZE_MAX / 2; }

static size_t s_map_len(const mm_tensor *t) {
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (t->nbytes + pg - 1) / pg * pg;
}

static int s_tensor_alloc(void *ctx, mm_tensor *t) {
    void *p;
    if (t->nbytes >= MM_CPU_MMAP_MIN) {
        p = mmap(NULL, s_map_len(t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            p = NULL;
    } else {
        /* 64 B: a cache line and an AVX-512 vector; aligned_alloc wants a
         * size that is a multiple of the alignment. Zeroed, so a fresh
         * accumulator never holds garbage. */
        size_t n = (t->nbytes + 63) & ~(size_t)63;
        if ((p = aligned_alloc(64, n)))
            memset(p, 0, n);
    }
    if (!p) {
        char s[96];
        return mm_backend_fail(t->be, MM_ENOMEM, "tensor: out of host memory for %s (%zu bytes)",
                               mm_tensor_str(t, s, sizeof s), t->nbytes);
    }
    t->impl = p;
    t->data = p;
    return MM_OK;
}

/* The caller's memory as is: impl stays NULL, so free has nothing to do. */
static int s_tensor_wrap(void *ctx, mm_tensor *t, const void *host) {
    t->impl = NULL;
    t->data = (void *)host;
    return MM_OK;
}

static void s_tensor_free(void *ctx, mm_tensor *t) {
    if (t->impl && t->nbytes >= MM_CPU_MMAP_MIN)
        munmap(t->impl, s_map_len(t));
    else
        free(t->impl);
    t->impl = NULL;
    t->data = NULL;
}

static int s_write(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n) {
    memcpy((char *)root->impl + off, src, n);
    return MM_OK;
}

static int s_read(void *ctx, mm_tensor *root, size_t off, void *dst, size_t n) {
    memcpy(dst, (const char *)root->impl + off, n);
    return MM_OK;
}

static int s_sync(void *ctx) { return MM_OK; }

/* ---- helpers ------------------------------------------------------------- */

static size_t s_rows(const mm_tensor *t) { return t->nelem / t->shape[t->ndim - 1]; }
static size_t s_cols(const mm_tensor *t) { return t->shape[t->ndim - 1]; }
static float *s_f(const mm_tensor *t) { return (float *)t->data; }
static const int32_t *s_i(const mm_tensor *t) { return (const int32_t *)t->data; }

static float s_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Each token's (slot, pos) must lie inside the cache [slots, max_ctx, ...]. */
static int s_check_seq(const char *name, mm_backend *be, const mm_tensor *seq,
                       const mm_tensor *cache) {
    const int32_t *sp = s_i(seq);
    for (size_t t = 0; t < seq->shape[0]; t++) {
        int32_t slot = sp[2 * t], pos = sp[2 * t + 1];
        if (slot < 0 || (size_t)slot >= cache->shape[0] || pos < 0 ||
            (size_t)pos >= cache->shape[1])
            return mm_backend_fail(be, MM_EINVAL,
                                   "%s: token %zu has (slot %d, pos %d) outside the cache of %zu "
                                   "slots x %zu positions",
                                   name, t, (int)slot, (int)pos, cache->shape[0], cache->shape[1]);
    }
    return MM_OK;
}

/* ---- matmul -------------------------------------------------------------- */

static s_cpu *s_ctx(const mm_op *op) { return op->dst->be->ctx; }

static int s_matmul(const mm_op *op) {
    mm_backend *be = op->dst->be;
    const mm_tensor *x = op->src[0], *w = op->src[1], *bias = op->src[2];
    size_t M = s_rows(x), K = s_cols(x), N = w->shape[0];
    float *out = s_f(op->dst);
    if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
        return mm_backend_fail(be, MM_EUNSUPPORTED,
                               "matmul: M %zu, N %zu or K %zu exceeds the BLAS int range", M, N, K);
    /* The bias is preloaded into out and the product added to it. */
    if (bias)
        for (size_t m = 0; m < M; m++)
            memcpy(out + m * N, bias->data, N * sizeof(float));
    s_cpu *c = s_ctx(op);
    int rc = mm_cpu_matmul(c->pool, c->isa, c->dnnl, M, N, K, s_f(x), w->data, w->dtype, out,
                           bias != NULL);
    if (rc != MM_OK)
        return mm_backend_fail(be, rc,
                               rc == MM_ENOMEM ? "matmul: out of memory widening a %s weight"
                                               : "matmul: oneDNN failed on a %s weight",
                               mm_dtype_name(w->dtype));
    return MM_OK;
}

/* ---- elementwise --------------------------------------------------------- */

/* Each op below is a range function over elements or rows, and a wrapper
 * that spreads it over the pool (the op itself is the range's argument). */
static void s_for(const mm_op *op, size_t n, size_t grain, mm_pool_range_fn fn) {
    mm_pool_for(s_ctx(op)->pool, n, grain ? grain : 1, fn, (void *)op);
}

static void s_binary_r(void *vp, size_t i0, size_t i1) {
    const mm_op *op = vp;
    const mm_tensor *a = op->src[0], *b = op->src[1];
    const float *pa = s_f(a), *pb = s_f(b);
    float *po = s_f(op->dst);
    size_t cols = s_cols(a);
    int bcast = b->nelem != a->nelem; /* b is one row, repeated over a's rows */
    int add = op->type == MM_OP_ADD;
    for (size_t i = i0; i < i1; i++) {
        float bv = pb[bcast ? i % cols : i];
        po[i] = add ? pa[i] + bv : pa[i] * bv;
    }
}

static int s_binary(const mm_op *op) {
    s_for(op, op->src[0]->nelem, S_PAR_MIN, s_binary_r);
    return MM_OK;
}

static void s_scale_r(void *vp, size_t i0, size_t i1) {
    const mm_op *op = vp;
    const float *x = s_f(op->src[0]);
    float *o = s_f(op->dst), s = op->f[0];
    for (size_t i = i0; i < i1; i++)
        o[i] = x[i] * s;
}

static int s_scale(const mm_op *op) {
    s_for(op, op->src[0]->nelem, S_PAR_MIN, s_scale_r);
    return MM_OK;
}

static float s_unary1(mm_unary_op u, float x) {
    switch (u) {
    case MM_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case MM_GELU_TANH: {
        const float c = 0.79788456080286536f; /* √(2/π) */
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    case MM_QUICK_GELU: return x * s_sigmoid(1.702f * x);
    case MM_SILU: return x * s_sigmoid(x);
    default: return x;
    }
}

static void s_unary_r(void *vp, size_t i0, size_t i1) {
    const mm_op *op = vp;
    const float *x = s_f(op->src[0]);
    float *o = s_f(op->dst);
    mm_unary_op u = (mm_unary_op)op->i[0];
    for (size_t i = i0; i < i1; i++)
        o[i] = s_unary1(u, x[i]);
}

static int s_unary(const mm_op *op) {
    s_for(op, op->src[0]->nelem, S_PAR_MIN / 4, s_unary_r);
    return MM_OK;
}

static void s_swiglu_r(void *vp, size_t i0, size_t i1) {
    const mm_op *op = vp;
    const float *g = s_f(op->src[0]), *u = s_f(op->src[1]);
    float *o = s_f(op->dst);
    for (size_t i = i0; i < i1; i++)
        o[i] = g[i] * s_sigmoid(g[i]) * u[i];
}

static int s_swiglu(const mm_op *op) {
    s_for(op, op->src[0]->nelem, S_PAR_MIN / 4, s_swiglu_r);
    return MM_OK;
}

/* ---- row-wise: norms, softmax -------------------------------------------- */

static void s_layernorm_r(void *vp, size_t r0, size_t r1) {
    const mm_op *op = vp;
    const mm_tensor *x = op->src[0];
    const float *w = op->src[1] ? s_f(op->src[1]) : NULL;
    const float *b = op->src[2] ? s_f(op->src[2]) : NULL;
    float eps = op->f[0];
    size_t C = s_cols(x);
    for (size_t r = r0; r < r1; r++) {
        const float *xr = s_f(x) + r * C;
        float *o = s_f(op->dst) + r * C;
        /* Two passes (mean, then squared deviations): no cancellation when
         * the mean is large beside the spread. Stats are read fully before
         * o is written, so out may alias x. */
        float mean = 0.0f, var = 0.0f;
        for (size_t c = 0; c < C; c++)
            mean += xr[c];
        mean /= (float)C;
        for (size_t c = 0; c < C; c++)
            var += (xr[c] - mean) * (xr[c] - mean);
        var /= (float)C;
        float inv = 1.0f / sqrtf(var + eps);
        for (size_t c = 0; c < C; c++) {
            float v = (xr[c] - mean) * inv;
            if (w)
                v *= w[c];
            if (b)
                v += b[c];
            o[c] = v;
        }
    }
}

/* Rows in ranges of at least S_PAR_MIN elements. */
static void s_rows_for(const mm_op *op, mm_pool_range_fn fn) {
    const mm_tensor *x = op->src[0];
    s_for(op, s_rows(x), S_PAR_MIN / s_cols(x), fn);
}

static int s_layernorm(const mm_op *op) {
    s_rows_for(op, s_layernorm_r);
    return MM_OK;
}

static void s_rmsnorm_r(void *vp, size_t r0, size_t r1) {
    const mm_op *op = vp;
    const mm_tensor *x = op->src[0];
    const float *w = op->src[1] ? s_f(op->src[1]) : NULL;
    float eps = op->f[0];
    size_t C = s_cols(x);
    for (size_t r = r0; r < r1; r++) {
        const float *xr = s_f(x) + r * C;
        float *o = s_f(op->dst) + r * C;
        float ss = 0.0f;
        for (size_t c = 0; c < C; c++)
            ss += xr[c] * xr[c];
        float inv = 1.0f / sqrtf(ss / (float)C + eps);
        for (size_t c = 0; c < C; c++)
            o[c] = xr[c] * inv * (w ? w[c] : 1.0f);
    }
}

static int s_rmsnorm(const mm_op *op) {
    s_rows_for(op, s_rmsnorm_r);
    return MM_OK;
}

/* In place on one row of n values: softmax with the max subtracted, so
 * exp never overflows. */
static void s_softmax_row(float *v, size_t n) {
    float mx = v[0];
    for (size_t i = 1; i < n; i++)
        mx = v[i] > mx ? v[i] : mx;
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++) {
        v[i] = expf(v[i] - mx);
        sum += v[i];
    }
    float inv = 1.0f / sum;
    for (size_t i = 0; i < n; i++)
        v[i] *= inv;
}

static void s_softmax_r(void *vp, size_t r0, size_t r1) {
    const mm_op *op = vp;
    const mm_tensor *x = op->src[0];
    size_t C = s_cols(x);
    for (size_t r = r0; r < r1; r++) {
        float *o = s_f(op->dst) + r * C;
        if (o != s_f(x) + r * C)
            memcpy(o, s_f(x) + r * C, C * sizeof(float));
        s_softmax_row(o, C);
    }
}

static int s_softmax(const mm_op *op) {
    s_rows_for(op, s_softmax_r);
    return MM_OK;
}

/* ---- rope, kv cache, attention ------------------------------------------- */

static void s_rope_r(void *vp, size_t t0, size_t t1) {
    const mm_op *op = vp;
    mm_tensor *x = op->dst;
    const int32_t *seq = s_i(op->src[0]);
    size_t H = (size_t)op->i[0], hd = (size_t)op->i[1];
    size_t half = (size_t)op->i[2] / 2;
    float theta = op->f[0];
    for (size_t t = t0; t < t1; t++) {
        float pos = (float)seq[2 * t + 1];
        for (size_t h = 0; h < H; h++) {
            float *v = s_f(x) + t * H * hd + h * hd;
            for (size_t i = 0; i < half; i++) {
                /* fp32 like the reference (HF): inv_freq = 1/θ^(2i/rot),
                 * angle = pos · inv_freq, both rounded to float. */
                float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)(2 * half));
                float ang = pos * inv_freq;
                float c = cosf(ang), s = sinf(ang);
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c - x2 * s;
                v[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

static int s_rope(const mm_op *op) {
    size_t per_row = (size_t)op->i[0] * (size_t)(op->i[2] / 2) + 1;
    s_for(op, s_rows(op->dst), S_PAR_MIN / 8 / per_row, s_rope_r);
    return MM_OK;
}

static int s_kv_store(const mm_op *op) {
    mm_tensor *cache = op->dst;
    const mm_tensor *kv = op->src[0], *seq = op->src[1];
    int rc = s_check_seq("kv_store", cache->be, seq, cache);
    if (rc != MM_OK)
        return rc;
    size_t W = kv->shape[1], C = cache->shape[1];
    const int32_t *sp = s_i(seq);
    for (size_t t = 0; t < kv->shape[0]; t++) {
        size_t slot = (size_t)sp[2 * t], pos = (size_t)sp[2 * t + 1];
        memcpy(s_f(cache) + (slot * C + pos) * W, s_f(kv) + t * W, W * sizeof(float));
    }
    return MM_OK;
}

/* Attention has two paths.
 *
 * A run of consecutive rows of one slot (a prefill chunk; the vision tower,
 * whose 577 rows all stand at the last position) goes through BLAS, per
 * block of S_ATT_BLOCK rows and per head: S = scale·Q·Kᵀ over cache
 * positions 0..n-1 (n = 1 + the block's largest position), a softmax of the
 * first pos_t + 1 entries of each row with the rest zeroed (the causal
 * mask), then O = S·V. K and V are read in place inside the cache (row
 * stride kw) and O is written in place into out (row stride qw). Positions
 * a row must not see cost flops but carry weight exactly 0, so the result
 * is the loop's up to rounding: blocks keep that waste to a triangle of
 * S_ATT_BLOCK² / 2 per block. (Those positions belong to later rows of the
 * same chunk, stored by kv_store before this call; an Inf or NaN there
 * would leak in through 0·Inf, which the loop never multiplies.)
 *
 * Lone rows (decode steps, short runs) take a per-(row, head) loop: one
 * query cannot reuse a key, so it is bound by reading the cache and a
 * vectorised dot product is all it needs.
 *
 * Both are spread over heads and blocks by the pool; each sgemm runs on one
 * BLAS thread (the backend sets OpenBLAS to one thread: its own threads
 * would fight the pool's for the cores, and spin). */

/* Query rows per block: large enough for sgemm to run near its peak, small
 * enough that the masked triangle (S_ATT_BLOCK² / 2 dot products per block)
 * stays a small share of a long chunk. */
#define S_ATT_BLOCK 128

/* Runs shorter than this take the loop: with so few rows per key there is
 * nothing for sgemm to gain. */
#define S_ATT_GEMM_MIN 4

typedef struct s_att {
    const float *q, *k, *v; /* q [T, qw]; caches [slots, C, kw] */
    float *o;               /* [T, qw] */
    const int32_t *sp;      /* seq [T, 2] */
    size_t H, hd, C, qw, kw, group;
    float scale;
} s_att;

/* Rows t0 .. t0 + rows - 1 of one slot; n = 1 + their largest position. */
typedef struct s_att_blk {
    size_t t0, rows, n;
} s_att_blk;

/* GCC keeps every float compare-and-select as a branch while FP exceptions
 * may trap (-ftrapping-math, the default), which stops it vectorising the
 * loops below; nothing here reads FP exception flags. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

/* e^x, vectorisable (glibc's expf is a scalar call the compiler cannot
 * widen without -ffast-math, and was half the time of a 577-token vision
 * attention). Cephes' expf: x = n·ln2 + r, |r| <= ln2/2, e^r by a degree-6
 * polynomial, 2^n put into the exponent bits; within 1 ulp of the exact e^x on
 * [-87.33, 0], the softmax range (checked on every float there). Below
 * -87.33 (where 2^n would leave the normal range) it returns 0, where expf
 * gives a denormal < 1.2e-38 that no softmax sum can notice. The clamps
 * come first so the float -> int conversion never sees NaN or an out-of-
 * range value; NaN comes back as NaN. */
static inline float s_exp_simd(float x) {
    const float lo = -87.33f, hi = 88.37f;
    float xc = x > lo ? x : lo; /* NaN -> lo */
    xc = xc < hi ? xc : hi;
    /* n = round(x·log2 e) by the 1.5·2^23 trick: exact for |n| < 2^22 */
    float nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t n = (int32_t)nf;
    union {
        uint32_t u;
        float f;
    } s = {.u = (uint32_t)(n + 127) << 23}; /* C11 union punning: vectorises, memcpy does not */
    float y = p * s.f;
    y = x < lo ? 0.0f : y;
    return x != x ? x : y;
}

/* s_softmax_row for attention: the same max-subtracted softmax, with the
 * max, the exponentials and the sum vectorised (the sum in a different
 * order, so the last bits differ). */
static void s_att_softmax(float *v, size_t n) {
    /* Eight running maxima: plain lanes that any compiler vectorises. */
    float m[8];
    for (size_t k = 0; k < 8; k++)
        m[k] = v[0];
    size_t i0 = 0;
    for (; i0 + 8 <= n; i0 += 8)
        for (size_t k = 0; k < 8; k++)
            m[k] = v[i0 + k] > m[k] ? v[i0 + k] : m[k];
    for (; i0 < n; i0++)
        m[0] = v[i0] > m[0] ? v[i0] : m[0];
    float mx = m[0];
    for (size_t k = 1; k < 8; k++)
        mx = m[k] > mx ? m[k] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < n; i++) {
        float e = s_exp_simd(v[i] - mx);
        v[i] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (size_t i = 0; i < n; i++)
        v[i] *= inv;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* Row t, head h, by the loop; att holds >= pos_t + 1 floats. */
static void s_att_row(const s_att *a, size_t t, size_t h, float *att) {
    size_t slot = (size_t)a->sp[2 * t], n = (size_t)a->sp[2 * t + 1] + 1, hd = a->hd;
    const float *qv = a->q + t * a->qw + h * hd;
    const float *kb = a->k + slot * a->C * a->kw + (h / a->group) * hd;
    const float *vb = a->v + slot * a->C * a->kw + (h / a->group) * hd;
    for (size_t j = 0; j < n; j++) {
        const float *kv = kb + j * a->kw;
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (size_t i = 0; i < hd; i++)
            d += qv[i] * kv[i];
        att[j] = d * a->scale;
    }
    s_att_softmax(att, n);
    float *o = a->o + t * a->qw + h * hd;
    memset(o, 0, hd * sizeof(float));
    for (size_t j = 0; j < n; j++) {
        const float *vv = vb + j * a->kw;
        float w = att[j];
#pragma omp simd
        for (size_t i = 0; i < hd; i++)
            o[i] += w * vv[i];
    }
}

/* Block b, head h, through sgemm; sc holds >= b->rows · b->n floats. */
static void s_att_block(const s_att *a, const s_att_blk *b, size_t h, float *sc) {
    size_t slot = (size_t)a->sp[2 * b->t0], n = b->n, hd = a->hd;
    const float *kb = a->k + slot * a->C * a->kw + (h / a->group) * hd;
    const float *vb = a->v + slot * a->C * a->kw + (h / a->group) * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)b->rows, (int)n, (int)hd, a->scale,
                a->q + b->t0 * a->qw + h * hd, (int)a->qw, kb, (int)a->kw, 0.0f, sc, (int)n);
    for (size_t r = 0; r < b->rows; r++) {
        float *row = sc + r * n;
        size_t nr = (size_t)a->sp[2 * (b->t0 + r) + 1] + 1;
        s_att_softmax(row, nr);
        memset(row + nr, 0, (n - nr) * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)b->rows, (int)hd, (int)n, 1.0f, sc,
                (int)n, vb, (int)a->kw, 0.0f, a->o + b->t0 * a->qw + h * hd, (int)a->qw);
}

/* The pool's tasks: first (block, head) pairs, largest blocks (last in a
 * causal chunk) first so the run ends on small pieces; then (row, head)
 * pairs four at a time. Each task has its own scratch for the scores. */
typedef struct s_att_job {
    const s_att *a;
    const s_att_blk *blk;
    const size_t *lone;
    size_t nblk, nbt, nlt, need, H;
    int oom;
} s_att_job;

static void s_att_task(void *vp, size_t t) {
    s_att_job *j = vp;
    float *sc = malloc(j->need * sizeof(float));
    if (!sc) {
        __atomic_store_n(&j->oom, 1, __ATOMIC_RELAXED);
        return;
    }
    if (t < j->nbt)
        s_att_block(j->a, &j->blk[j->nblk - 1 - t / j->H], t % j->H, sc);
    else
        for (size_t i = (t - j->nbt) * 4; i < (t - j->nbt) * 4 + 4 && i < j->nlt; i++)
            s_att_row(j->a, j->lone[i / j->H], i % j->H, sc);
    free(sc);
}

static int s_attention(const mm_op *op) {
    mm_backend *be = op->dst->be;
    const mm_tensor *q = op->src[0], *kc = op->src[1], *vc = op->src[2], *seq = op->src[3];
    int rc = s_check_seq("attention", be, seq, kc);
    if (rc != MM_OK)
        return rc;
    size_t T = q->shape[0], H = (size_t)op->i[0], KVH = (size_t)op->i[1], hd = (size_t)op->i[2];
    size_t C = kc->shape[1];
    s_att a = {.q = s_f(q),
               .k = s_f(kc),
               .v = s_f(vc),
               .o = s_f(op->dst),
               .sp = s_i(seq),
               .H = H,
               .hd = hd,
               .C = C,
               .qw = H * hd,
               .kw = KVH * hd,
               .group = H / KVH,
               .scale = op->f[0]};
    /* Split the rows: blocks of runs for sgemm, the rest for the loop. At
     * most T blocks and T lone rows; sgemm takes int sizes (n <= C). */
    if (T == 0)
        return MM_OK;
    int blas_ok = a.qw <= INT_MAX && a.kw <= INT_MAX && C <= INT_MAX;
    s_att_blk *blk = malloc(T * sizeof *blk);
    size_t *lone = malloc(T * sizeof *lone);
    if (!blk || !lone) {
        free(blk);
        free(lone);
        return mm_backend_fail(be, MM_ENOMEM, "attention: out of memory planning %zu rows", T);
    }
    size_t nblk = 0, nlone = 0, nmax_blk = 0, nmax_lone = 0;
    for (size_t t0 = 0; t0 < T;) {
        size_t t1 = t0 + 1;
        while (t1 < T && a.sp[2 * t1] == a.sp[2 * t0])
            t1++;
        if (blas_ok && t1 - t0 >= S_ATT_GEMM_MIN) {
            for (size_t b0 = t0; b0 < t1; b0 += S_ATT_BLOCK) {
                size_t rows = t1 - b0 < S_ATT_BLOCK ? t1 - b0 : S_ATT_BLOCK, n = 0;
                for (size_t t = b0; t < b0 + rows; t++)
                    n = (size_t)a.sp[2 * t + 1] + 1 > n ? (size_t)a.sp[2 * t + 1] + 1 : n;
                blk[nblk++] = (s_att_blk){b0, rows, n};
                nmax_blk = n > nmax_blk ? n : nmax_blk;
            }
        } else {
            for (size_t t = t0; t < t1; t++) {
                lone[nlone++] = t;
                size_t n = (size_t)a.sp[2 * t + 1] + 1;
                nmax_lone = n > nmax_lone ? n : nmax_lone;
            }
        }
        t0 = t1;
    }
    /* Per-thread scratch: the scores of one block or of one lone row. */
    size_t need = S_ATT_BLOCK * nmax_blk > nmax_lone ? S_ATT_BLOCK * nmax_blk : nmax_lone;
    size_t nbt = nblk * H, nlt = nlone * H;
    s_att_job job = {&a, blk, lone, nblk, nbt, nlt, need, H, 0};
    mm_pool_run(s_ctx(op)->pool, nbt + (nlt + 3) / 4, s_att_task, &job);
    int oom = job.oom;
    free(blk);
    free(lone);
    if (oom)
        return mm_backend_fail(be, MM_ENOMEM, "attention: out of memory for %zu scores", need);
    return MM_OK;
}

/* ---- routing and gathering ------------------------------------------------ */

static int s_topk(const mm_op *op) {
    const mm_tensor *x = op->src[0];
    size_t T = x->shape[0], E = x->shape[1], k = (size_t)op->i[0];
    for (size_t t = 0; t < T; t++) {
        const float *xr = s_f(x) + t * E;
        int32_t *ir = (int32_t *)op->dst->data + t * k;
        float *vr = s_f(op->dst2) + t * k;
        /* Insertion into a sorted list of the best k so far; an entry moves
         * ahead only of strictly smaller values, so ties keep the lower
         * index first. */
        size_t cnt = 0;
        for (size_t e = 0; e < E; e++) {
            float v = xr[e];
            size_t p = cnt;
            while (p > 0 && v > vr[p - 1])
                p--;
            if (p >= k)
                continue;
            size_t last = cnt < k ? cnt : k - 1;
            for (size_t m = last; m > p; m--) {
                vr[m] = vr[m - 1];
                ir[m] = ir[m - 1];
            }
            vr[p] = v;
            ir[p] = (int32_t)e;
            if (cnt < k)
                cnt++;
        }
    }
    return MM_OK;
}

static int s_get_rows(const mm_op *op) {
    mm_backend *be = op->dst->be;
    const mm_tensor *src = op->src[0], *idx = op->src[1];
    size_t n = idx->nelem, R = src->shape[0], C = src->shape[1];
    const int32_t *ip = s_i(idx);
    for (size_t i = 0; i < n; i++)
        if (ip[i] < 0 || (size_t)ip[i] >= R)
            return mm_backend_fail(be, MM_EINVAL,
                                   "get_rows: index %d at position %zu is outside the %zu rows of "
                                   "src",
                                   (int)ip[i], i, R);
    size_t es = mm_dtype_size(src->dtype);
    for (size_t i = 0; i < n; i++)
        mm_convert_to_f32(s_f(op->dst) + i * C, (const char *)src->data + (size_t)ip[i] * C * es,
                          src->dtype, C);
    return MM_OK;
}

static int s_scatter_add(const mm_op *op) {
    mm_backend *be = op->dst->be;
    const mm_tensor *src = op->src[0], *idx = op->src[1], *w = op->src[2];
    size_t n = idx->nelem, R = op->dst->shape[0], C = op->dst->shape[1];
    const int32_t *ip = s_i(idx);
    for (size_t i = 0; i < n; i++)
        if (ip[i] < 0 || (size_t)ip[i] >= R)
            return mm_backend_fail(be, MM_EINVAL,
                                   "scatter_add_rows: index %d at position %zu is outside the %zu "
                                   "rows of dst",
                                   (int)ip[i], i, R);
    /* Serial over rows: a repeated index (which the contract forbids) still
     * adds up correctly instead of racing. */
    for (size_t i = 0; i < n; i++) {
        float *d = s_f(op->dst) + (size_t)ip[i] * C;
        const float *s = s_f(src) + i * C;
        float wi = w ? s_f(w)[i] : 1.0f;
        for (size_t c = 0; c < C; c++)
            d[c] += wi * s[c];
    }
    return MM_OK;
}

static void s_im2col_r(void *vp, size_t r0, size_t r1) {
    const mm_op *op = vp;
    const mm_tensor *img = op->src[0];
    size_t Cn = img->shape[0], H = img->shape[1], W = img->shape[2], P = (size_t)op->i[0];
    size_t gw = W / P, pw = Cn * P * P;
    for (size_t r = r0; r < r1; r++) {
        size_t py = r / gw, px = r % gw;
        float *o = s_f(op->dst) + r * pw;
        for (size_t c = 0; c < Cn; c++)
            for (size_t ky = 0; ky < P; ky++)
                memcpy(o + (c * P + ky) * P, s_f(img) + (c * H + py * P + ky) * W + px * P,
                       P * sizeof(float));
    }
}

static int s_im2col(const mm_op *op) {
    size_t P = (size_t)op->i[0], pw = op->src[0]->shape[0] * P * P;
    s_for(op, op->dst->shape[0], S_PAR_MIN / pw + 1, s_im2col_r);
    return MM_OK;
}

static int s_run_op(void *ctx, const mm_op *op) {
    switch (op->type) {
    case MM_OP_MATMUL: return s_matmul(op);
    case MM_OP_ADD:
    case MM_OP_MUL: return s_binary(op);
    case MM_OP_SCALE: return s_scale(op);
    case MM_OP_LAYERNORM: return s_layernorm(op);
    case MM_OP_RMSNORM: return s_rmsnorm(op);
    case MM_OP_UNARY: return s_unary(op);
    case MM_OP_SWIGLU: return s_swiglu(op);
    case MM_OP_SOFTMAX: return s_softmax(op);
    case MM_OP_ROPE: return s_rope(op);
    case MM_OP_KV_STORE: return s_kv_store(op);
    case MM_OP_ATTENTION: return s_attention(op);
    case MM_OP_TOPK: return s_topk(op);
    case MM_OP_GET_ROWS: return s_get_rows(op);
    case MM_OP_SCATTER_ADD: return s_scatter_add(op);
    case MM_OP_IM2COL: return s_im2col(op);
    default:
        return mm_backend_fail(op->dst->be, MM_EUNSUPPORTED, "cpu: unknown op type %d",
                               (int)op->type);
    }
}

static const mm_backend_ops s_cpu_ops = {
    .name = "cpu",
    .destroy = s_destroy,
    .describe = s_describe,
    .weight_dtype = s_weight_dtype,
    .max_tensor_bytes = s_max_tensor_bytes,
    .tensor_alloc = s_tensor_alloc,
    .tensor_free = s_tensor_free,
    .tensor_wrap = s_tensor_wrap,
    .write = s_write,
    .read = s_read,
    .sync = s_sync,
    .run_op = s_run_op,
    .supports = NULL, /* run_op computes every op and dtype the front end lets through */
};

int mm_cpu_backend_new(mm_backend **out, char *err, size_t errlen) {
    *out = NULL;
    mm_backend *be = calloc(1, sizeof *be);
    s_cpu *c = calloc(1, sizeof *c);
    if (!be || !c) {
        free(be);
        free(c);
        return mm_errorf(err, errlen, MM_ENOMEM, "cpu backend: out of host memory");
    }
    /* MEDMOE_THREADS: threads of this backend (default: the cores this
     * process may run on). Several medmoe processes on one host (router +
     * experts) should share the cores between them: the cluster launcher
     * sets it per process. MEDMOE_CPU_ISA forces a kernel path. */
    cpu_set_t cs;
    long n = sched_getaffinity(0, sizeof cs, &cs) == 0 ? CPU_COUNT(&cs) : 1;
    const char *nt = getenv("MEDMOE_THREADS");
    int rc = MM_OK;
    if (nt && *nt) {
        char *end;
        n = strtol(nt, &end, 10);
        if (*end || n < 1 || n > 1024)
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "cpu backend: MEDMOE_THREADS='%s' is not a thread count (1..1024)", nt);
    }
    if (rc == MM_OK)
        rc = mm_cpu_isa_pick(getenv("MEDMOE_CPU_ISA"), &c->isa, err, errlen);
    const char *pf = getenv("MEDMOE_CPU_PREFILL");
    if (rc == MM_OK && pf && *pf && strcmp(pf, "f32") != 0) {
        if (strcmp(pf, "bf16") == 0)
            rc = mm_cpu_dnnl_new(&c->dnnl, err, errlen);
        else
            rc = mm_errorf(err, errlen, MM_EINVAL,
                           "cpu backend: MEDMOE_CPU_PREFILL='%s' (want f32, the default, or bf16)",
                           pf);
    }
    if (rc == MM_OK)
        rc = mm_pool_new((int)n, &c->pool, err, errlen);
    if (rc != MM_OK) {
        mm_cpu_dnnl_destroy(&c->dnnl);
        free(be);
        free(c);
        return rc;
    }
    /* OpenBLAS runs inside the pool's tasks: on one thread each, so its own
     * threads never start (nor spin). Process-wide, like any BLAS setting. */
    openblas_set_num_threads(1);
    const char *cfg = openblas_get_config();
    snprintf(c->describe, sizeof c->describe,
             "cpu: %s kernels, %d threads (idle threads sleep), prefill %s, OpenBLAS %s (core %s)",
             mm_cpu_isa_name(c->isa), mm_pool_threads(c->pool),
             c->dnnl ? "bf16 (oneDNN)" : "f32 (OpenBLAS)", cfg ? cfg : "?",
             openblas_get_corename());
    be->ops = &s_cpu_ops;
    be->ctx = c;
    *out = be;
    return MM_OK;
}

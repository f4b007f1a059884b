/* cpu_matmul.c — streaming kernels for few rows, widened sgemm for many
 * (see cpu_matmul.h for the why).
 *
 * The streaming kernels work on one block of 4 weight rows at a time and run
 * every block of 1, 2 or 4 rows of x over it before moving on, so a weight
 * row comes from memory once per call whatever M is: the 16 KB of a block
 * stays in L1 while the rows of x pass. Each (x row, weight row) pair has its
 * own vector accumulator, reduced once at the end of the row.
 *
 * The ISA-specific functions carry target attributes, so this file builds
 * without -march flags and the choice is made at run time.
 */
#include "cpu_matmul.h"

#include <cblas.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define S_X86 1
#else
#define S_X86 0
#endif

/* Scratch per task when widening weight rows for sgemm. */
#define S_WIDEN_BYTES ((size_t)2 << 20)

static const char *const s_isa_names[MM_ISA_COUNT] = {"c", "avx2", "avx512"};

const char *mm_cpu_isa_name(mm_cpu_isa isa) {
    return isa >= 0 && isa < MM_ISA_COUNT ? s_isa_names[isa] : "?";
}

#if S_X86
/* F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does
 * not know the name. */
static int s_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1u);
}
#endif

int mm_cpu_isa_supported(mm_cpu_isa isa) {
    switch (isa) {
    case MM_ISA_C: return 1;
#if S_X86
    case MM_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && s_has_f16c();
    case MM_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && s_has_f16c();
#endif
    default: return 0;
    }
}

int mm_cpu_isa_pick(const char *want, mm_cpu_isa *out, char *err, size_t errlen) {
    if (!want || !*want) {
        *out = MM_ISA_C;
        for (int i = MM_ISA_COUNT - 1; i > 0; i--)
            if (mm_cpu_isa_supported((mm_cpu_isa)i)) {
                *out = (mm_cpu_isa)i;
                break;
            }
        return MM_OK;
    }
    for (int i = 0; i < MM_ISA_COUNT; i++)
        if (strcmp(want, s_isa_names[i]) == 0) {
            if (!mm_cpu_isa_supported((mm_cpu_isa)i))
                return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                                 "MEDMOE_CPU_ISA=%s: this CPU cannot run the %s kernels", want,
                                 want);
            *out = (mm_cpu_isa)i;
            return MM_OK;
        }
    return mm_errorf(err, errlen, MM_EINVAL,
                     "MEDMOE_CPU_ISA='%s' is not a kernel path (avx512, avx2 or c)", want);
}

/* One block: out[i*ldo + j] (+)= Σ_k x[i*ldx + k]·w_j[k] for i < mr, j < nv.
 * wr holds 4 row pointers; rows past nv repeat a valid row (computed, then
 * dropped), so the inner loops always run 4 wide. */
typedef void (*s_kfn)(size_t K, const float *x, size_t ldx, const void *const *wr, size_t nv,
                      float *out, size_t ldo, int acc);

/* Weight k of a row of K (q8: the scales follow the padded values). */
static inline float s_w1k(const void *w, mm_dtype wt, size_t k, size_t K) {
    if (wt == MM_Q8) {
        size_t kp = (K + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;
        float sc;
        memcpy(&sc, (const char *)w + kp + k / MM_Q8_BLOCK * sizeof(float), sizeof sc);
        return (float)((const int8_t *)w)[k] * sc;
    }
    switch (wt) {
    case MM_F16: return mm_f16_to_f32(((const uint16_t *)w)[k]);
    case MM_BF16: {
        uint32_t u = (uint32_t)((const uint16_t *)w)[k] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    default: return ((const float *)w)[k];
    }
}

static inline void s_store(float *o, float s, int acc) { *o = acc ? *o + s : s; }

/* ---- portable C ---------------------------------------------------------- */

#define S_KC(NAME, WT)                                                                             \
    static void NAME(size_t K, const float *x, size_t ldx, const void *const *wr, size_t nv,       \
                     float *out, size_t ldo, int acc) {                                            \
        for (size_t j = 0; j < nv; j++) {                                                          \
            float s = 0.0f;                                                                        \
            for (size_t k = 0; k < K; k++)                                                         \
                s += x[k] * s_w1k(wr[j], WT, k, K);                                                \
            s_store(out + j, s, acc);                                                              \
        }                                                                                          \
        (void)ldx;                                                                                 \
        (void)ldo;                                                                                 \
    }
S_KC(s_c_f32, MM_F32)
S_KC(s_c_f16, MM_F16)
S_KC(s_c_bf16, MM_BF16)
S_KC(s_c_q8, MM_Q8)

#if S_X86
/* ---- AVX-512 ------------------------------------------------------------- */
#define S_T512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

S_T512 static inline __m512 s_l512_f32(const void *p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
S_T512 static inline __m512 s_l512_f16(const void *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
S_T512 static inline __m512 s_l512_bf16(const void *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define S_K512(NAME, LOAD, ES, MR)                                                                 \
    S_T512 static void NAME(size_t K, const float *x, size_t ldx, const void *const *wr,           \
                            size_t nv, float *out, size_t ldo, int acc) {                          \
        const char *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];                             \
        __m512 a[MR][4];                                                                           \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                                     \
            a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm512_setzero_ps();                           \
        }                                                                                          \
        for (size_t k = 0; k < K; k += 16) {                                                       \
            __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);     \
            __m512 v0 = LOAD(w0 + k * ES, m), v1 = LOAD(w1 + k * ES, m);                           \
            __m512 v2 = LOAD(w2 + k * ES, m), v3 = LOAD(w3 + k * ES, m);                           \
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                                 \
                __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)i * ldx + k);                     \
                a[i][0] = _mm512_fmadd_ps(v0, xv, a[i][0]);                                        \
                a[i][1] = _mm512_fmadd_ps(v1, xv, a[i][1]);                                        \
                a[i][2] = _mm512_fmadd_ps(v2, xv, a[i][2]);                                        \
                a[i][3] = _mm512_fmadd_ps(v3, xv, a[i][3]);                                        \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MR; i++)                                                               \
            for (size_t j = 0; j < nv; j++)                                                        \
                s_store(out + (size_t)i * ldo + j, _mm512_reduce_add_ps(a[i][j]), acc);            \
    }
S_K512(s_512_f32_1, s_l512_f32, 4, 1)
S_K512(s_512_f32_2, s_l512_f32, 4, 2)
S_K512(s_512_f32_4, s_l512_f32, 4, 4)
S_K512(s_512_f16_1, s_l512_f16, 2, 1)
S_K512(s_512_f16_2, s_l512_f16, 2, 2)
S_K512(s_512_f16_4, s_l512_f16, 2, 4)
S_K512(s_512_bf16_1, s_l512_bf16, 2, 1)
S_K512(s_512_bf16_2, s_l512_bf16, 2, 2)
S_K512(s_512_bf16_4, s_l512_bf16, 2, 4)

/* q8: per block of 32, the int8 values of each weight row are widened and
 * multiplied by the block's scale once (shared by every row of x), then
 * used like f32 weights. Rows are zero-padded to the block, so the weight
 * loads never need a mask; only x's tail does. */
S_T512 static inline void s_q8_512(const int8_t *q, float sc, __m512 *lo, __m512 *hi) {
    __m512 s = _mm512_set1_ps(sc);
    __m128i a = _mm_loadu_si128((const __m128i *)q), b = _mm_loadu_si128((const __m128i *)(q + 16));
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), s);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s);
}

S_T512 static inline __mmask16 s_mask16(size_t K, size_t k) {
    return k >= K        ? (__mmask16)0
           : K - k >= 16 ? (__mmask16)0xFFFF
                         : (__mmask16)((1u << (K - k)) - 1u);
}

#define S_K512Q(NAME, MR)                                                                          \
    S_T512 static void NAME(size_t K, const float *x, size_t ldx, const void *const *wr,           \
                            size_t nv, float *out, size_t ldo, int acc) {                          \
        size_t kp = (K + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;                             \
        const int8_t *q[4];                                                                        \
        const char *scp[4];                                                                        \
        for (int j = 0; j < 4; j++) {                                                              \
            q[j] = wr[j];                                                                          \
            scp[j] = (const char *)wr[j] + kp;                                                     \
        }                                                                                          \
        __m512 a[MR][4];                                                                           \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                                     \
            a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm512_setzero_ps();                           \
        }                                                                                          \
        for (size_t k = 0; k < kp; k += MM_Q8_BLOCK) {                                             \
            __m512 l[4], h[4];                                                                     \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                  \
                float sc;                                                                          \
                memcpy(&sc, scp[j] + k / MM_Q8_BLOCK * sizeof(float), sizeof sc);                  \
                s_q8_512(q[j] + k, sc, &l[j], &h[j]);                                              \
            }                                                                                      \
            __mmask16 m0 = s_mask16(K, k), m1 = s_mask16(K, k + 16);                               \
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                                 \
                __m512 x0 = _mm512_maskz_loadu_ps(m0, x + (size_t)i * ldx + k);                    \
                __m512 x1 = _mm512_maskz_loadu_ps(m1, x + (size_t)i * ldx + k + 16);               \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                              \
                    a[i][j] = _mm512_fmadd_ps(l[j], x0, a[i][j]);                                  \
                    a[i][j] = _mm512_fmadd_ps(h[j], x1, a[i][j]);                                  \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MR; i++)                                                               \
            for (size_t j = 0; j < nv; j++)                                                        \
                s_store(out + (size_t)i * ldo + j, _mm512_reduce_add_ps(a[i][j]), acc);            \
    }
S_K512Q(s_512_q8_1, 1)
S_K512Q(s_512_q8_2, 2)
S_K512Q(s_512_q8_4, 4)

/* ---- AVX2 + FMA + F16C (16 registers: at most 2 rows of x per block) ----- */
#define S_T256 __attribute__((target("avx2,fma,f16c")))

/* Loaders: 8 weights of a row from k on as f32 (kp: q8's padded length,
 * where its scales start; unused by the others). */
S_T256 static inline __m256 s_l256_f32(const char *row, size_t k, size_t kp) {
    return _mm256_loadu_ps((const float *)row + k);
}
S_T256 static inline __m256 s_l256_f16(const char *row, size_t k, size_t kp) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * k)));
}
S_T256 static inline __m256 s_l256_bf16(const char *row, size_t k, size_t kp) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
/* q8: the block's scale applied per load. */
S_T256 static inline __m256 s_l256_q8(const char *row, size_t k, size_t kp) {
    float sc;
    memcpy(&sc, row + kp + k / MM_Q8_BLOCK * sizeof(float), sizeof sc);
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(sc));
}
S_T256 static inline float s_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define S_K256(NAME, LOAD, WT, MR)                                                                 \
    S_T256 static void NAME(size_t K, const float *x, size_t ldx, const void *const *wr,           \
                            size_t nv, float *out, size_t ldo, int acc) {                          \
        size_t kp = (K + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;                             \
        const char *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];                             \
        __m256 a[MR][4];                                                                           \
        _Pragma("GCC unroll 2") for (int i = 0; i < MR; i++) {                                     \
            a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm256_setzero_ps();                           \
        }                                                                                          \
        size_t K8 = K & ~(size_t)7;                                                                \
        for (size_t k = 0; k < K8; k += 8) {                                                       \
            __m256 v0 = LOAD(w0, k, kp), v1 = LOAD(w1, k, kp);                                     \
            __m256 v2 = LOAD(w2, k, kp), v3 = LOAD(w3, k, kp);                                     \
            _Pragma("GCC unroll 2") for (int i = 0; i < MR; i++) {                                 \
                __m256 xv = _mm256_loadu_ps(x + (size_t)i * ldx + k);                              \
                a[i][0] = _mm256_fmadd_ps(v0, xv, a[i][0]);                                        \
                a[i][1] = _mm256_fmadd_ps(v1, xv, a[i][1]);                                        \
                a[i][2] = _mm256_fmadd_ps(v2, xv, a[i][2]);                                        \
                a[i][3] = _mm256_fmadd_ps(v3, xv, a[i][3]);                                        \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MR; i++)                                                               \
            for (size_t j = 0; j < nv; j++) {                                                      \
                float s = s_hsum256(a[i][j]);                                                      \
                for (size_t k = K8; k < K; k++)                                                    \
                    s += x[(size_t)i * ldx + k] * s_w1k(wr[j], WT, k, K);                          \
                s_store(out + (size_t)i * ldo + j, s, acc);                                        \
            }                                                                                      \
    }
S_K256(s_256_f32_1, s_l256_f32, MM_F32, 1)
S_K256(s_256_f32_2, s_l256_f32, MM_F32, 2)
S_K256(s_256_f16_1, s_l256_f16, MM_F16, 1)
S_K256(s_256_f16_2, s_l256_f16, MM_F16, 2)
S_K256(s_256_bf16_1, s_l256_bf16, MM_BF16, 1)
S_K256(s_256_bf16_2, s_l256_bf16, MM_BF16, 2)
S_K256(s_256_q8_1, s_l256_q8, MM_Q8, 1)
S_K256(s_256_q8_2, s_l256_q8, MM_Q8, 2)
#endif

/* [isa][dtype f32/f16/bf16/q8][rows of x: 1, 2, 4] */
static s_kfn s_kernel(mm_cpu_isa isa, mm_dtype wt, size_t mr) {
    int d = wt == MM_F16 ? 1 : wt == MM_BF16 ? 2 : wt == MM_Q8 ? 3 : 0;
    int r = mr >= 4 ? 2 : mr >= 2 ? 1 : 0;
#if S_X86
    static const s_kfn k512[4][3] = {{s_512_f32_1, s_512_f32_2, s_512_f32_4},
                                     {s_512_f16_1, s_512_f16_2, s_512_f16_4},
                                     {s_512_bf16_1, s_512_bf16_2, s_512_bf16_4},
                                     {s_512_q8_1, s_512_q8_2, s_512_q8_4}};
    static const s_kfn k256[4][2] = {{s_256_f32_1, s_256_f32_2},
                                     {s_256_f16_1, s_256_f16_2},
                                     {s_256_bf16_1, s_256_bf16_2},
                                     {s_256_q8_1, s_256_q8_2}};
    if (isa == MM_ISA_AVX512)
        return k512[d][r];
    if (isa == MM_ISA_AVX2)
        return k256[d][r > 1 ? 1 : r];
#endif
    static const s_kfn kc[4] = {s_c_f32, s_c_f16, s_c_bf16, s_c_q8};
    return kc[d];
}

/* Rows of x a kernel takes at once on this path. */
static size_t s_max_mr(mm_cpu_isa isa) {
    return isa == MM_ISA_AVX512 ? 4 : isa == MM_ISA_AVX2 ? 2 : 1;
}

void mm_cpu_gemv(mm_cpu_isa isa, mm_dtype wt, size_t M, size_t K, const float *x, const void *w,
                 size_t n0, size_t n1, float *out, size_t ldo, int acc) {
    size_t rb = wt == MM_Q8 ? mm_q8_row_bytes(K) : K * mm_dtype_size(wt), maxr = s_max_mr(isa);
    for (size_t n = n0; n < n1; n += 4) {
        size_t nv = n1 - n < 4 ? n1 - n : 4;
        const void *wr[4];
        for (size_t j = 0; j < 4; j++)
            wr[j] = (const char *)w + (n + (j < nv ? j : nv - 1)) * rb;
        for (size_t m = 0; m < M;) {
            size_t mr = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            if (mr > maxr)
                mr = maxr;
            s_kernel(isa, wt, mr)(K, x + m * K, K, wr, nv, out + m * ldo + n, ldo, acc);
            m += mr;
        }
    }
}

/* ---- over the pool ------------------------------------------------------- */

typedef struct s_mm {
    mm_cpu_isa isa;
    size_t M, N, K, band;
    const float *x;
    const void *w;
    mm_dtype wt;
    float *out;
    int acc;
    int failed; /* a task could not get scratch */
} s_mm;

/* Columns [4·i0, 4·i1) by the streaming kernel. */
static void s_gemv_range(void *vp, size_t i0, size_t i1) {
    const s_mm *a = vp;
    size_t n1 = 4 * i1 < a->N ? 4 * i1 : a->N;
    mm_cpu_gemv(a->isa, a->wt, a->M, a->K, a->x, a->w, 4 * i0, n1, a->out, a->N, a->acc);
}

/* Widen n·K weights to f32 (vectorised: the compiler widens the shift);
 * q8 is widened row by row (n is then rows, k their length). */
static void s_widen(float *dst, const void *src, mm_dtype wt, size_t n, size_t k) {
    if (wt == MM_Q8) {
        size_t rb = mm_q8_row_bytes(k);
        for (size_t r = 0; r < n; r++)
            mm_q8_dequantize_row(dst + r * k, (const char *)src + r * rb, k);
    } else if (wt == MM_BF16) {
        n *= k;
        const uint16_t *h = src;
        uint32_t *d = (uint32_t *)dst;
        for (size_t i = 0; i < n; i++)
            d[i] = (uint32_t)h[i] << 16;
    } else
        mm_convert_to_f32(dst, src, wt, n * k);
}

/* One band of output columns by sgemm (widened first unless f32). */
static void s_gemm_task(void *vp, size_t t) {
    s_mm *a = vp;
    size_t n0 = t * a->band, nb = a->N - n0 < a->band ? a->N - n0 : a->band;
    const float *wf = (const float *)a->w + n0 * a->K;
    float *tmp = NULL;
    if (a->wt != MM_F32) {
        if (!(tmp = malloc(nb * a->K * sizeof(float)))) {
            __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
            return;
        }
        size_t rb = a->wt == MM_Q8 ? mm_q8_row_bytes(a->K) : a->K * mm_dtype_size(a->wt);
        s_widen(tmp, (const char *)a->w + n0 * rb, a->wt, nb, a->K);
        wf = tmp;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)a->M, (int)nb, (int)a->K, 1.0f, a->x,
                (int)a->K, wf, (int)a->K, a->acc ? 1.0f : 0.0f, a->out + n0, (int)a->N);
    free(tmp);
}

int mm_cpu_matmul(mm_pool *pool, mm_cpu_isa isa, mm_cpu_dnnl *dnnl, size_t M, size_t N, size_t K,
                  const float *x, const void *w, mm_dtype wt, float *out, int acc) {
    s_mm a = {isa, M, N, K, 0, x, w, wt, out, acc, 0};
    if (dnnl && M > MM_CPU_GEMV_ROWS && wt == MM_BF16) {
        int rc = mm_cpu_dnnl_matmul(dnnl, M, N, K, x, w, out, acc);
        if (rc != MM_EUNSUPPORTED)
            return rc;
    }
    if (M <= MM_CPU_GEMV_ROWS) {
        /* At least ~256 K multiply-adds a range (8 blocks of 4 rows at
         * K = 2048, one row of x): enough work to pay for handing it to
         * another thread (a few microseconds), so tiny models stay on one. */
        size_t per_block = 4 * K * M;
        mm_pool_for(pool, (N + 3) / 4, ((size_t)1 << 18) / per_block + 1, s_gemv_range, &a);
        return MM_OK;
    }
    /* Bands: a few per thread for balance, at most S_WIDEN_BYTES of widened
     * weights each, at least 16 columns. */
    size_t nt = (size_t)mm_pool_threads(pool);
    size_t band = (N + 2 * nt - 1) / (2 * nt);
    size_t cap = S_WIDEN_BYTES / (K * sizeof(float));
    if (wt != MM_F32 && band > cap)
        band = cap;
    /* and ~1 M multiply-adds at least */
    size_t min_band = ((size_t)1 << 20) / (M * K) + 1;
    if (band < (min_band > 16 ? min_band : 16))
        band = min_band > 16 ? min_band : 16;
    if (band > N)
        band = N;
    a.band = band;
    mm_pool_run(pool, (N + band - 1) / band, s_gemm_task, &a);
    return a.failed ? MM_ENOMEM : MM_OK;
}

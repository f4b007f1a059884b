/* cpu_matmul.h — the cpu backend's matrix products (private to kernels/cpu).
 *
 * Weights are used in the dtype the checkpoint stores them in (f32, f16,
 * bf16), straight from the mapped file. Two regimes:
 *
 *  - Few rows (decode, small expert batches: M <= MM_CPU_GEMV_ROWS): bound by
 *    reading the weights. A hand-written kernel streams each weight row once
 *    for all M rows of x, widens bf16/f16 to f32 in registers and accumulates
 *    in f32. Paths: AVX-512, AVX2+FMA+F16C and portable C, chosen from the
 *    CPU's features at start-up; MEDMOE_CPU_ISA=avx512|avx2|c forces one (so
 *    CI tests the fallbacks on a machine that has everything).
 *  - Many rows (prefill, vision): bound by arithmetic. Blocks of weight rows
 *    are widened into f32 scratch and multiplied by OpenBLAS sgemm, one band
 *    of output columns per task.
 *
 * Both keep the numerical contract of an f32 model: every product is of the
 * exact f32 value of the weight and the f32 activation, accumulated in f32;
 * only the summation order differs between paths. (AVX-512 BF16's dot
 * product instruction would round the activations to bf16 first; it is not
 * used, and decode is bound by memory, not by the FMAs.)
 */
#ifndef MM_CPU_MATMUL_H
#define MM_CPU_MATMUL_H

#include <stddef.h>

#include "cpu_dnnl.h"
#include "cpu_pool.h"
#include "kernels.h"

/* Up to this many rows of x take the streaming kernel. */
#define MM_CPU_GEMV_ROWS 16

typedef enum mm_cpu_isa {
    MM_ISA_C = 0,
    MM_ISA_AVX2 = 1,
    MM_ISA_AVX512 = 2,
    MM_ISA_COUNT
} mm_cpu_isa;

const char *mm_cpu_isa_name(mm_cpu_isa isa); /* "c", "avx2", "avx512" */
/* 1 when this CPU can run the path. */
int mm_cpu_isa_supported(mm_cpu_isa isa);
/* want NULL or "": the best supported path. Otherwise the named one, or an
 * error when it is unknown or this CPU cannot run it. */
int mm_cpu_isa_pick(const char *want, mm_cpu_isa *out, char *err, size_t errlen);

/* The streaming kernel over output columns [n0, n1), on the calling thread:
 * out[m*ldo + n] = (acc ? out[m*ldo + n] : 0) + Σ_k x[m*K + k]·w[n*K + k]
 * for m < M (any M; blocks of 4 rows of x share each weight read). */
void mm_cpu_gemv(mm_cpu_isa isa, mm_dtype wt, size_t M, size_t K, const float *x, const void *w,
                 size_t n0, size_t n1, float *out, size_t ldo, int acc);

/* out[M, N] (+)= x[M, K] · w[N, K]ᵀ over the pool: the streaming kernel for
 * M <= MM_CPU_GEMV_ROWS, widened blocks and sgemm above (or, with dnnl
 * non-NULL and bf16 weights, oneDNN's bf16 matmul: cpu_dnnl.h). acc: add to
 * out (the bias preloaded) rather than overwrite. MM_ENOMEM if scratch
 * fails. */
int mm_cpu_matmul(mm_pool *pool, mm_cpu_isa isa, mm_cpu_dnnl *dnnl, size_t M, size_t N, size_t K,
                  const float *x, const void *w, mm_dtype wt, float *out, int acc);

#endif

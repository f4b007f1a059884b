/* cpu_dnnl.h — an optional faster prefill: oneDNN's bf16 matmul (private to
 * kernels/cpu).
 *
 * Prefill and the vision tower are bound by arithmetic. oneDNN runs a bf16
 * matmul on the CPU's matrix units (AMX where present, AVX-512 BF16 dot
 * products, else AVX2), measured 1.8-5.6x OpenBLAS sgemm on the prefill
 * and vision shapes (bench_kernels prints both in one run). Its inputs are
 * bf16: the weights are, as stored; the activations are rounded to bf16 for
 * it. That loosens the numerical contract (each product's activation carries
 * a relative error up to 2^-9), so it is off by default and taken only when
 * MEDMOE_CPU_PREFILL=bf16 is set; the default keeps f32 activations.
 *
 * Built only where libdnnl is installed (MM_HAVE_DNNL); elsewhere
 * mm_cpu_dnnl_new says so and the backend refuses the setting.
 */
#ifndef MM_CPU_DNNL_H
#define MM_CPU_DNNL_H

#include <stddef.h>

#include "kernels.h"

typedef struct mm_cpu_dnnl mm_cpu_dnnl;

int mm_cpu_dnnl_new(mm_cpu_dnnl **out, char *err, size_t errlen);
void mm_cpu_dnnl_destroy(mm_cpu_dnnl **d);

/* out[M, N] (+)= bf16(x)[M, K] · w[N, K]ᵀ, w bf16; acc adds to out (the
 * bias preloaded). MM_EUNSUPPORTED if oneDNN cannot (then the caller takes
 * its own path), other statuses on failure. Thread-safe. */
int mm_cpu_dnnl_matmul(mm_cpu_dnnl *d, size_t M, size_t N, size_t K, const float *x,
                       const uint16_t *w, float *out, int acc);

#endif

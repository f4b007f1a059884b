/* cpu_dnnl.c — oneDNN bf16 matmul for prefill (see cpu_dnnl.h).
 *
 * One primitive per weight shape (N, K) and accumulate flag, created on first
 * use with M a run-time dimension (prefill chunks vary in length), kept in a
 * small table for the backend's life. Each call rounds x to bf16 into
 * scratch and runs the primitive on its own stream.
 */
#include "cpu_dnnl.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#ifndef MM_HAVE_DNNL

int mm_cpu_dnnl_new(mm_cpu_dnnl **out, char *err, size_t errlen) {
    *out = NULL;
    return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                     "MEDMOE_CPU_PREFILL=bf16: built without oneDNN (install libdnnl-dev)");
}
void mm_cpu_dnnl_destroy(mm_cpu_dnnl **d) { (void)d; }
int mm_cpu_dnnl_matmul(mm_cpu_dnnl *d, size_t M, size_t N, size_t K, const float *x,
                       const uint16_t *w, float *out, int acc) {
    return MM_EUNSUPPORTED;
}

#else
#include <oneapi/dnnl/dnnl.h>

#define S_MAX_PRIMS 64 /* distinct (N, K, acc): a model has about ten */

typedef struct s_prim {
    size_t N, K;
    int acc;
    dnnl_primitive_t p;
} s_prim;

struct mm_cpu_dnnl {
    dnnl_engine_t eng;
    pthread_mutex_t mu; /* guards prims */
    s_prim prims[S_MAX_PRIMS];
    int n;
};

int mm_cpu_dnnl_new(mm_cpu_dnnl **out, char *err, size_t errlen) {
    *out = NULL;
    mm_cpu_dnnl *d = calloc(1, sizeof *d);
    if (!d)
        return mm_errorf(err, errlen, MM_ENOMEM, "oneDNN: out of memory");
    if (dnnl_engine_create(&d->eng, dnnl_cpu, 0) != dnnl_success) {
        free(d);
        return mm_errorf(err, errlen, MM_EUNSUPPORTED, "oneDNN: no cpu engine");
    }
    pthread_mutex_init(&d->mu, NULL);
    *out = d;
    return MM_OK;
}

void mm_cpu_dnnl_destroy(mm_cpu_dnnl **dp) {
    if (!dp || !*dp)
        return;
    mm_cpu_dnnl *d = *dp;
    for (int i = 0; i < d->n; i++)
        dnnl_primitive_destroy(d->prims[i].p);
    dnnl_engine_destroy(d->eng);
    pthread_mutex_destroy(&d->mu);
    free(d);
    *dp = NULL;
}

/* The descriptors of out[M, N] = a[M, K] · b[K, N] with b stored as w[N, K]. */
static void s_mds(int64_t M, size_t N, size_t K, dnnl_memory_desc_t *a, dnnl_memory_desc_t *b,
                  dnnl_memory_desc_t *c) {
    dnnl_dims_t ad = {M, (int64_t)K}, bd = {(int64_t)K, (int64_t)N}, cd = {M, (int64_t)N};
    dnnl_memory_desc_init_by_tag(a, 2, ad, dnnl_bf16, dnnl_ab);
    dnnl_memory_desc_init_by_tag(b, 2, bd, dnnl_bf16, dnnl_ba);
    dnnl_memory_desc_init_by_tag(c, 2, cd, dnnl_f32, dnnl_ab);
}

static dnnl_primitive_t s_prim_get(mm_cpu_dnnl *d, size_t N, size_t K, int acc) {
    dnnl_primitive_t p = NULL;
    pthread_mutex_lock(&d->mu);
    for (int i = 0; i < d->n && !p; i++)
        if (d->prims[i].N == N && d->prims[i].K == K && d->prims[i].acc == acc)
            p = d->prims[i].p;
    if (!p && d->n < S_MAX_PRIMS) {
        dnnl_memory_desc_t a, b, c;
        s_mds(DNNL_RUNTIME_DIM_VAL, N, K, &a, &b, &c);
        dnnl_matmul_desc_t md;
        dnnl_primitive_attr_t attr = NULL;
        dnnl_post_ops_t po = NULL;
        dnnl_primitive_desc_t pd = NULL;
        int ok = dnnl_matmul_desc_init(&md, &a, &b, NULL, &c) == dnnl_success &&
                 dnnl_primitive_attr_create(&attr) == dnnl_success;
        if (ok && acc) /* out += a·b: the bias is already in out */
            ok = dnnl_post_ops_create(&po) == dnnl_success &&
                 dnnl_post_ops_append_sum(po, 1.0f) == dnnl_success &&
                 dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success;
        if (ok && dnnl_primitive_desc_create(&pd, &md, attr, d->eng, NULL) == dnnl_success &&
            dnnl_primitive_create(&p, pd) == dnnl_success)
            d->prims[d->n++] = (s_prim){N, K, acc, p};
        else
            p = NULL;
        dnnl_primitive_desc_destroy(pd);
        dnnl_post_ops_destroy(po);
        dnnl_primitive_attr_destroy(attr);
    }
    pthread_mutex_unlock(&d->mu);
    return p;
}

int mm_cpu_dnnl_matmul(mm_cpu_dnnl *d, size_t M, size_t N, size_t K, const float *x,
                       const uint16_t *w, float *out, int acc) {
    dnnl_primitive_t p = s_prim_get(d, N, K, acc);
    if (!p)
        return MM_EUNSUPPORTED;
    uint16_t *xb = malloc(M * K * sizeof *xb);
    if (!xb)
        return MM_ENOMEM;
    for (size_t i = 0; i < M * K; i++)
        xb[i] = mm_f32_to_bf16(x[i]);
    dnnl_memory_desc_t a, b, c;
    s_mds((int64_t)M, N, K, &a, &b, &c);
    dnnl_memory_t A = NULL, B = NULL, C = NULL;
    dnnl_stream_t st = NULL;
    /* EUNSUPPORTED (the caller computes it instead) only before out is
     * touched; a failed execution may have written part of it. */
    int rc = MM_EUNSUPPORTED;
    if (dnnl_memory_create(&A, &a, d->eng, xb) == dnnl_success &&
        dnnl_memory_create(&B, &b, d->eng, (void *)w) == dnnl_success &&
        dnnl_memory_create(&C, &c, d->eng, out) == dnnl_success &&
        dnnl_stream_create(&st, d->eng, dnnl_stream_default_flags) == dnnl_success) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}};
        rc = dnnl_primitive_execute(p, st, 3, args) == dnnl_success &&
                     dnnl_stream_wait(st) == dnnl_success
                 ? MM_OK
                 : MM_EIO;
    }
    dnnl_stream_destroy(st);
    dnnl_memory_destroy(A);
    dnnl_memory_destroy(B);
    dnnl_memory_destroy(C);
    free(xb);
    return rc;
}
#endif

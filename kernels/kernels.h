/* kernels.h — the one op interface of medmoe, and the backends behind it.
 *
 * Every layer of Med-MoE (vision tower, decoder, experts) is written once,
 * against the functions below; a backend (cpu, vulkan) is a small table of
 * function pointers (kernels/backend.h) that computes the ops. The front-end
 * functions here check shapes and dtypes for every backend alike, so a bad
 * call gets the same error message whatever runs it.
 *
 * Execution model. Ops are *enqueued*: the cpu backend computes each op
 * at once, the vulkan backend records it into one command buffer (with the
 * barriers it needs) and submits the whole sequence at mm_backend_sync().
 * mm_tensor_get() / mm_tensor_set() synchronise first, so a caller that
 * only sets inputs, enqueues ops and gets outputs never sees stale data.
 *
 *     mm_backend *be;  char err[256];
 *     if (mm_backend_new("cpu", &be, err, sizeof err) != MM_OK) { ... }
 *     size_t xs[2] = {M, K}, ws[2] = {N, K}, os[2] = {M, N};
 *     mm_tensor *x, *w, *out;
 *     mm_tensor_new(be, MM_F32, 2, xs, &x);  ... w, out likewise ...
 *     mm_tensor_set(x, host_x, MM_F32);
 *     mm_matmul(be, out, x, w, NULL);            // out = x · wᵀ
 *     mm_tensor_get(out, host_out);              // syncs, then copies
 *     mm_tensor_destroy(&out); ...; mm_backend_destroy(&be);
 *
 * Layout. Tensors are dense and row-major; shape[0] is the outermost
 * dimension ("rows" of a 2-D tensor), shape[ndim-1] the innermost. Weights
 * use the nn.Linear layout [out_features, in_features]. Activations are
 * fp32; weights may be fp32, fp16 or bf16 (ask mm_backend_weight_dtype()
 * which one a backend stores; mm_tensor_set converts on upload). Both
 * backends compute f16 and bf16 weights as stored, accumulating in f32.
 * Weights from a mapped checkpoint go through mm_tensor_new_host(): the cpu
 * backend uses the mapping in place, vulkan copies it to the device.
 *
 * Ownership. A tensor belongs to the backend that made it and must be
 * destroyed before it. A view (mm_tensor_view_rows, mm_tensor_reshape)
 * shares its parent's storage, owns none, and must be destroyed before the
 * parent.
 */
#ifndef MM_KERNELS_H
#define MM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define MM_MAX_DIMS 4

typedef enum mm_dtype {
    MM_F32 = 0,
    MM_F16 = 1,  /* IEEE half                                  */
    MM_BF16 = 2, /* bfloat16: the top 16 bits of an fp32       */
    MM_I32 = 3,  /* indices, positions                         */
    MM_Q8 = 4,   /* int8 weights, 2-D only: each row holds its K
                    values as int8, zero-padded to a multiple of
                    MM_Q8_BLOCK, then one f32 scale per block:
                    w[n][k] = q[n][k] * scale[n][k / MM_Q8_BLOCK]
                    (mm_q8_row_bytes). Made by mm_tensor_set from
                    f32/f16/bf16 (symmetric, scale = max|w| / 127,
                    round to nearest even). Matmul weights only.  */
    MM_DTYPE_COUNT
} mm_dtype;

#define MM_Q8_BLOCK 32

const char *mm_dtype_name(mm_dtype t); /* "f32", "f16", "bf16", "i32", "q8" */
size_t mm_dtype_size(mm_dtype t);      /* bytes per element (q8: 1, plus the
                                          scales: use mm_q8_row_bytes)      */
/* Bytes of one MM_Q8 row of k values: padded int8 values, then the scales. */
size_t mm_q8_row_bytes(size_t k);
/* Quantise k values of src (dtype st: f32/f16/bf16) into one MM_Q8 row. */
void mm_q8_quantize_row(void *row, const void *src, mm_dtype st, size_t k);
/* Dequantise one MM_Q8 row of k values into f32. */
void mm_q8_dequantize_row(float *dst, const void *row, size_t k);

typedef struct mm_backend mm_backend; /* opaque; see backend.h */

typedef struct mm_tensor {
    mm_dtype dtype;            /* element type                          */
    int ndim;                  /* 1..MM_MAX_DIMS                        */
    size_t shape[MM_MAX_DIMS]; /* shape[0] outermost; unused dims are 1 */
    size_t nelem;              /* product of the shape                  */
    size_t nbytes;             /* nelem * mm_dtype_size(dtype)          */
    mm_backend *be;            /* the backend that owns the storage     */
    struct mm_tensor *parent;  /* NULL, or the tensor this one views    */
    size_t offset;             /* byte offset of a view in the storage  */
    void *data;                /* host address of element 0 when the
                                  storage is host-visible (always on
                                  cpu), else NULL. Read it only after
                                  mm_backend_sync().                    */
    void *impl;                /* backend-private storage handle        */
    int readonly;              /* caller's memory (mm_tensor_new_host):
                                  mm_tensor_set refuses to write it     */
} mm_tensor;

/* ---- backends ------------------------------------------------------------ */

/* name: "cpu" or "vulkan". On failure *out is NULL and err says why
 * (e.g. no Vulkan device, or MEDMOE_VK_DEVICE names no device). */
int mm_backend_new(const char *name, mm_backend **out, char *err, size_t errlen);
void mm_backend_destroy(mm_backend **be);

const char *mm_backend_name(const mm_backend *be);     /* "cpu" / "vulkan"  */
const char *mm_backend_describe(const mm_backend *be); /* device, driver... */
const char *mm_backend_error(const mm_backend *be);    /* last error text   */
/* The dtype this backend stores a weight of dtype t in: t itself for f32,
 * f16 and bf16 on both backends (mm_tensor_new_host then wraps or copies
 * without converting). */
mm_dtype mm_backend_weight_dtype(const mm_backend *be, mm_dtype t);
/* Largest single tensor the backend can allocate, in bytes (vulkan: the
 * device's maxStorageBufferRange). Callers split bigger weights by rows. */
size_t mm_backend_max_tensor_bytes(const mm_backend *be);
/* Run everything enqueued so far and wait for it. */
int mm_backend_sync(mm_backend *be);
/* Start running everything enqueued so far without waiting (vulkan; a no-op
 * on cpu, where ops run when enqueued): the device computes while the host
 * does other work. The next enqueue, set, get or sync waits for it. */
int mm_backend_flush(mm_backend *be);

/* ---- tensors ------------------------------------------------------------- */

/* A new tensor reads as zeros on every backend. */
int mm_tensor_new(mm_backend *be, mm_dtype dtype, int ndim, const size_t *shape, mm_tensor **out);
/* Safe with ops using t still enqueued: the backend keeps its storage until
 * they have run (the next sync), so callers free temporaries at once. */
void mm_tensor_destroy(mm_tensor **t);
/* A tensor holding host memory the caller keeps alive and unchanged until
 * the tensor is destroyed (a weight in a mapped checkpoint), of dtype `src`.
 * When the backend stores `src` as is and can compute from host memory
 * (cpu), the tensor uses that memory in place and is read-only; otherwise it
 * is a new tensor of mm_backend_weight_dtype(be, src) holding a converted
 * copy. Either way it reads as the data. */
int mm_tensor_new_host(mm_backend *be, mm_dtype src, int ndim, const size_t *shape,
                       const void *host, mm_tensor **out);
/* 2-D convenience: rows x cols. */
int mm_tensor_new_2d(mm_backend *be, mm_dtype dtype, size_t rows, size_t cols, mm_tensor **out);

/* A view of rows [row0, row0+nrows) of t (rows = shape[0]). */
int mm_tensor_view_rows(mm_tensor *t, size_t row0, size_t nrows, mm_tensor **out);
/* A view of t with another shape of the same element count. */
int mm_tensor_reshape(mm_tensor *t, int ndim, const size_t *shape, mm_tensor **out);

/* Copy host data into the whole tensor. src_dtype may differ from
 * t->dtype only to widen f16/bf16 into an f32 tensor, or to narrow f32 into
 * f16/bf16 (round to nearest even). Synchronises first. */
int mm_tensor_set(mm_tensor *t, const void *src, mm_dtype src_dtype);
/* Copy nrows rows starting at row0 (same conversions as mm_tensor_set). */
int mm_tensor_set_rows(mm_tensor *t, size_t row0, size_t nrows, const void *src,
                       mm_dtype src_dtype);
/* Copy the whole tensor to host memory in its own dtype. Synchronises. */
int mm_tensor_get(mm_tensor *t, void *dst);
/* Copy the whole tensor to host memory as f32 (widening f16/bf16). */
int mm_tensor_get_f32(mm_tensor *t, float *dst);

/* Shape as text, "[577, 1024] f32", into buf; returns buf. */
const char *mm_tensor_str(const mm_tensor *t, char *buf, size_t len);

/* ---- ops ------------------------------------------------------------------
 * All return MM_OK or a negative status; on error mm_backend_error(be) names
 * the op and the shapes. out may alias the input of an elementwise op. */

/* out[M,N] = x[M,K] · w[N,K]ᵀ (+ bias[N]).  x, out f32; w f32/f16/bf16 in
 * the backend's weight dtype; bias f32 or NULL. M == 1 takes the GEMV path. */
int mm_matmul(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w,
              const mm_tensor *bias);

/* out = a + b, out = a * b (f32). b has a's shape, or one row of a's row
 * width (broadcast over a's rows). */
int mm_add(mm_backend *be, mm_tensor *out, const mm_tensor *a, const mm_tensor *b);
int mm_mul(mm_backend *be, mm_tensor *out, const mm_tensor *a, const mm_tensor *b);
/* out = a * s */
int mm_scale(mm_backend *be, mm_tensor *out, const mm_tensor *a, float s);

/* Row-wise over the last dimension. w, b: [cols] f32, either may be NULL. */
int mm_layernorm(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w,
                 const mm_tensor *b, float eps);
int mm_rmsnorm(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w, float eps);

typedef enum mm_unary_op {
    MM_GELU_ERF = 0,   /* x/2 * (1 + erf(x/√2))                       */
    MM_GELU_TANH = 1,  /* x/2 * (1 + tanh(√(2/π) (x + 0.044715 x³)))   */
    MM_QUICK_GELU = 2, /* x * sigmoid(1.702 x)                         */
    MM_SILU = 3,       /* x * sigmoid(x)                                */
    MM_UNARY_COUNT
} mm_unary_op;
int mm_unary(mm_backend *be, mm_unary_op op, mm_tensor *out, const mm_tensor *x);
/* out = silu(gate) * up */
int mm_swiglu(mm_backend *be, mm_tensor *out, const mm_tensor *gate, const mm_tensor *up);
/* Row-wise softmax over the last dimension. */
int mm_softmax(mm_backend *be, mm_tensor *out, const mm_tensor *x);

/* The token descriptor shared by rope, kv_store and attention:
 * seq is I32 [T, 2]; row t = (slot, pos): token t belongs to the sequence
 * held in KV-cache slot `slot` and stands at absolute position `pos`.
 * A prefill chunk is rows (s, p0), (s, p0+1), ...; a decode step of several
 * sequences is one row per sequence. Tokens of one call may mix both. */

/* In place, NeoX style (rotate_half) on the first rot_dims of each head:
 * x is [T, n_heads*head_dim]; pairs (i, i + rot_dims/2) for i < rot_dims/2
 * rotate by angle pos * theta^(-2i/rot_dims). rot_dims even, <= head_dim. */
int mm_rope(mm_backend *be, mm_tensor *x, const mm_tensor *seq, int n_heads, int head_dim,
            int rot_dims, float theta);

/* cache is f32 [n_slots, max_ctx, width]; kv is [T, width]:
 * cache[slot_t][pos_t] = kv[t]. */
int mm_kv_store(mm_backend *be, mm_tensor *cache, const mm_tensor *kv, const mm_tensor *seq);

/* Causal attention over the cache: for token t (slot s, position p), each
 * head h attends to cache positions 0..p of slot s, using KV head
 * h / (n_heads / n_kv_heads):
 *   out[t, h] = Σ_j softmax_j(scale · q[t,h]·k[s,j,kvh]) · v[s,j,kvh]
 * q, out: [T, n_heads*head_dim]; kcache, vcache: [n_slots, max_ctx,
 * n_kv_heads*head_dim]. The keys of positions <= p must already be stored. */
int mm_attention(mm_backend *be, mm_tensor *out, const mm_tensor *q, const mm_tensor *kcache,
                 const mm_tensor *vcache, const mm_tensor *seq, int n_heads, int n_kv_heads,
                 int head_dim, float scale);

/* Per row of x [T, E] (f32): the k largest values, in descending order,
 * ties to the lower index. idx I32 [T, k], val f32 [T, k]. */
int mm_topk(mm_backend *be, mm_tensor *idx, mm_tensor *val, const mm_tensor *x, int k);

/* out[i] = src[idx[i]] (rows). src f32/f16/bf16, out f32 [n, cols],
 * idx I32 [n] with every entry < src rows (checked on cpu; on vulkan an
 * out-of-range index yields a zero row). Embedding lookup and grouping
 * tokens by expert are both this op. */
int mm_get_rows(mm_backend *be, mm_tensor *out, const mm_tensor *src, const mm_tensor *idx);

/* dst[idx[i]] += w[i] * src[i] (rows; w NULL means 1). idx I32 [n] must not
 * repeat an entry within one call. dst f32 [R, cols], src f32 [n, cols],
 * w f32 [n]. Merges an expert's output rows back into token order. */
int mm_scatter_add_rows(mm_backend *be, mm_tensor *dst, const mm_tensor *src, const mm_tensor *idx,
                        const mm_tensor *w);

/* ViT patch extraction: img f32 [C, H, W] -> out f32 [(H/P)*(W/P), C*P*P],
 * patch row-major (py, px), each row ordered (c, ky, kx) — the layout of a
 * Conv2d weight [D, C, P, P] seen as [D, C*P*P], so the patch embedding is
 * mm_im2col then mm_matmul. H and W multiples of P. */
int mm_im2col(mm_backend *be, mm_tensor *out, const mm_tensor *img, int patch);

/* ---- host helpers -------------------------------------------------------- */
float mm_f16_to_f32(uint16_t h);
uint16_t mm_f32_to_f16(float f); /* round to nearest even */
float mm_bf16_to_f32(uint16_t h);
uint16_t mm_f32_to_bf16(float f); /* round to nearest even */
/* Convert n elements of src (dtype st) into f32. */
void mm_convert_to_f32(float *dst, const void *src, mm_dtype st, size_t n);

#endif

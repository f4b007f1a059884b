/* backend.h — what a compute backend implements (private to kernels/).
 *
 * A backend is this table of function pointers plus a void *ctx. The
 * front end (ops.c) validates every op — shapes, dtypes, aliasing — before it
 * calls run_op, so a backend's run_op may assume a well-formed mm_op and only
 * has to say MM_EUNSUPPORTED for what it cannot compute (a dtype, a size).
 * Slots marked optional may be NULL.
 */
#ifndef MM_BACKEND_H
#define MM_BACKEND_H

#include "kernels.h"

typedef enum mm_op_type {
    MM_OP_MATMUL,      /* dst = src0 · src1ᵀ (+ src2 bias)                 */
    MM_OP_ADD,         /* dst = src0 + src1 (src1 maybe one broadcast row)  */
    MM_OP_MUL,         /* dst = src0 * src1 (likewise)                      */
    MM_OP_SCALE,       /* dst = src0 * f[0]                                 */
    MM_OP_LAYERNORM,   /* src0 x, src1 w|NULL, src2 b|NULL, f[0] eps        */
    MM_OP_RMSNORM,     /* src0 x, src1 w|NULL, f[0] eps                     */
    MM_OP_UNARY,       /* i[0] = mm_unary_op                                */
    MM_OP_SWIGLU,      /* dst = silu(src0) * src1                           */
    MM_OP_SOFTMAX,     /* rows of src0                                      */
    MM_OP_ROPE,        /* dst (in place), src0 = seq; i: n_heads, head_dim,
                          rot_dims; f[0] theta                              */
    MM_OP_KV_STORE,    /* dst cache, src0 kv, src1 seq                      */
    MM_OP_ATTENTION,   /* dst out, src0 q, src1 kcache, src2 vcache, src3
                          seq; i: n_heads, n_kv_heads, head_dim; f[0] scale */
    MM_OP_TOPK,        /* dst idx, dst2 val, src0 x, i[0] k                 */
    MM_OP_GET_ROWS,    /* dst out, src0 table, src1 idx                     */
    MM_OP_SCATTER_ADD, /* dst, src0 rows, src1 idx, src2 w|NULL             */
    MM_OP_IM2COL,      /* dst, src0 img [C,H,W], i[0] patch                 */
    MM_OP_COUNT
} mm_op_type;

typedef struct mm_op {
    mm_op_type type;
    mm_tensor *dst;          /* output (in place for ROPE)            */
    mm_tensor *dst2;         /* second output (TOPK values) or NULL    */
    const mm_tensor *src[4]; /* inputs, NULL where unused             */
    int i[4];                /* integer parameters, per type above     */
    float f[2];              /* float parameters, per type above       */
} mm_op;

#define MM_QUEUED_WRITE_MAX 65536 /* vkCmdUpdateBuffer's limit */

typedef struct mm_backend_ops {
    const char *name;
    void (*destroy)(void *ctx);
    const char *(*describe)(void *ctx);
    mm_dtype (*weight_dtype)(void *ctx, mm_dtype t);
    size_t (*max_tensor_bytes)(void *ctx);
    /* Give t storage for t->nbytes bytes: set t->impl (and t->data when the
     * storage is host-visible). Views never reach this. */
    int (*tensor_alloc)(void *ctx, mm_tensor *t);
    void (*tensor_free)(void *ctx, mm_tensor *t);
    /* optional: give t the caller's host memory as storage, no copy (t is
     * read-only; tensor_free is still called and must not free it). Without
     * it, mm_tensor_new_host copies into tensor_alloc'd storage. */
    int (*tensor_wrap)(void *ctx, mm_tensor *t, const void *host);
    /* Copy n bytes at byte offset off of root's storage (the front end has
     * already added a view's t->offset). Called after sync, never mid-queue. */
    int (*write)(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n);
    int (*read)(void *ctx, mm_tensor *root, size_t off, void *dst, size_t n);
    int (*sync)(void *ctx);
    /* optional: write n bytes (n <= MM_QUEUED_WRITE_MAX, off and n multiples
     * of 4) in queue order, without a sync: ops enqueued before see the old
     * bytes, ops enqueued after the new ones; src may be reused at once.
     * (vulkan: vkCmdUpdateBuffer, so small per-layer uploads such as expert
     * row indices do not force a submit-and-wait.) */
    int (*write_queued)(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n);
    /* optional: start what is enqueued without waiting for it */
    int (*flush)(void *ctx);
    /* Enqueue (vulkan) or compute (cpu) one validated op. Tensors may be
     * views: their storage is mm_tensor_root(t) at byte offset t->offset,
     * which need not meet any device alignment (vulkan: pass element
     * offsets as push constants rather than binding at the offset). */
    int (*run_op)(void *ctx, const mm_op *op);
    /* optional: MM_OK when run_op can do op, else MM_EUNSUPPORTED + reason */
    int (*supports)(void *ctx, const mm_op *op, char *why, size_t len);
} mm_backend_ops;

struct mm_backend {
    const mm_backend_ops *ops; /* the table                              */
    void *ctx;                 /* backend state, owned by the backend     */
    char error[512];           /* last error, set by the front end or run_op */
};

/* Set be->error and return status. */
int mm_backend_fail(mm_backend *be, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The root tensor whose storage t uses (t itself when not a view). */
mm_tensor *mm_tensor_root(const mm_tensor *t);

/* Constructors of the two backends (cpu_backend.c, vulkan_backend.c). On
 * failure they return a status, set *out NULL and describe the cause in err. */
int mm_cpu_backend_new(mm_backend **out, char *err, size_t errlen);
int mm_vulkan_backend_new(mm_backend **out, char *err, size_t errlen);

#endif

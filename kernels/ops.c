/* ops.c — the front end of the op interface: tensors, views, host copies,
 * and the validation of every op before a backend sees it.
 *
 * Why validate here and not in each backend: the error a caller gets for a
 * bad shape must not depend on which backend runs, and a backend that can
 * trust its input stays small (kernels/backend.h).
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"

/* ---- dtypes and conversions ---------------------------------------------- */

const char *mm_dtype_name(mm_dtype t) {
    switch (t) {
    case MM_F32: return "f32";
    case MM_F16: return "f16";
    case MM_BF16: return "bf16";
    case MM_I32: return "i32";
    case MM_Q8: return "q8";
    default: return "?";
    }
}

size_t mm_dtype_size(mm_dtype t) {
    switch (t) {
    case MM_F32: return 4;
    case MM_F16: return 2;
    case MM_BF16: return 2;
    case MM_I32: return 4;
    case MM_Q8: return 1;
    default: return 0;
    }
}

size_t mm_q8_row_bytes(size_t k) {
    size_t kp = (k + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;
    return kp + kp / MM_Q8_BLOCK * sizeof(float);
}

void mm_q8_quantize_row(void *row, const void *src, mm_dtype st, size_t k) {
    size_t kp = (k + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;
    int8_t *q = row;
    float v[MM_Q8_BLOCK];
    for (size_t b = 0; b < kp / MM_Q8_BLOCK; b++) {
        size_t k0 = b * MM_Q8_BLOCK, n = k - k0 < MM_Q8_BLOCK ? k - k0 : MM_Q8_BLOCK;
        const char *s = (const char *)src + k0 * mm_dtype_size(st);
        if (st == MM_BF16) /* inline: the generic conversion was most of the load time */
            for (size_t i = 0; i < n; i++) {
                uint32_t u = (uint32_t)((const uint16_t *)s)[i] << 16;
                memcpy(&v[i], &u, sizeof u);
            }
        else
            mm_convert_to_f32(v, s, st, n);
        float amax = 0.0f;
        for (size_t i = 0; i < n; i++)
            amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
        float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        /* Round to nearest even by the 1.5·2^23 trick (exactly nearbyintf
         * for |x| <= 127, and inlined: libm's call was most of the load). */
        for (size_t i = 0; i < MM_Q8_BLOCK; i++)
            q[k0 + i] = i < n ? (int8_t)((v[i] * inv + 12582912.0f) - 12582912.0f) : 0;
        memcpy((char *)row + kp + b * sizeof(float), &scale, sizeof scale);
    }
}

void mm_q8_dequantize_row(float *dst, const void *row, size_t k) {
    size_t kp = (k + MM_Q8_BLOCK - 1) / MM_Q8_BLOCK * MM_Q8_BLOCK;
    const int8_t *q = row;
    for (size_t i = 0; i < k; i++) {
        float scale;
        memcpy(&scale, (const char *)row + kp + i / MM_Q8_BLOCK * sizeof(float), sizeof scale);
        dst[i] = (float)q[i] * scale;
    }
}

static uint32_t s_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float s_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float mm_bf16_to_f32(uint16_t h) { return s_bits_f32((uint32_t)h << 16); }

uint16_t mm_f32_to_bf16(float f) {
    uint32_t u = s_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a quiet NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float mm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: value = man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) /* inf or NaN */
        return s_bits_f32(sign | 0x7f800000u | (man << 13));
    return s_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t mm_f32_to_f16(float f) {
    uint32_t u = s_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t au = u & 0x7fffffffu;
    if (au >= 0x7f800000u) /* inf or NaN */
        return sign | 0x7c00 | (au > 0x7f800000u ? 0x200 : 0);
    if (au >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return sign | 0x7c00;
    if (au < 0x38800000u) { /* below the smallest normal half: subnormal */
        float a = s_bits_f32(au);
        /* a / 2^-24 rounded to nearest even by the FPU's default mode */
        return sign | (uint16_t)nearbyintf(a * 16777216.0f);
    }
    uint32_t exp = (au >> 23) - 112;
    uint32_t man = au & 0x7fffff;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
        h++; /* a carry into the exponent is still correct */
    return sign | (uint16_t)h;
}

void mm_convert_to_f32(float *dst, const void *src, mm_dtype st, size_t n) {
    const uint16_t *h = src;
    switch (st) {
    case MM_F32: memcpy(dst, src, n * 4); break;
    case MM_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = mm_f16_to_f32(h[i]);
        break;
    case MM_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = mm_bf16_to_f32(h[i]);
        break;
    default: break;
    }
}

/* ---- backends ------------------------------------------------------------ */

int mm_backend_fail(mm_backend *be, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(be->error, sizeof be->error, fmt, ap);
    va_end(ap);
    return status;
}

int mm_backend_new(const char *name, mm_backend **out, char *err, size_t errlen) {
    *out = NULL;
    if (name == NULL || strcmp(name, "cpu") == 0)
        return mm_cpu_backend_new(out, err, errlen);
    if (strcmp(name, "vulkan") == 0)
        return mm_vulkan_backend_new(out, err, errlen);
    return mm_errorf(err, errlen, MM_EINVAL, "unknown backend '%s' (expected cpu or vulkan)", name);
}

void mm_backend_destroy(mm_backend **be) {
    if (!be || !*be)
        return;
    (*be)->ops->destroy((*be)->ctx);
    free(*be);
    *be = NULL;
}

const char *mm_backend_name(const mm_backend *be) { return be->ops->name; }
const char *mm_backend_describe(const mm_backend *be) { return be->ops->describe(be->ctx); }
const char *mm_backend_error(const mm_backend *be) { return be->error; }
mm_dtype mm_backend_weight_dtype(const mm_backend *be, mm_dtype t) {
    return be->ops->weight_dtype(be->ctx, t);
}
size_t mm_backend_max_tensor_bytes(const mm_backend *be) {
    return be->ops->max_tensor_bytes(be->ctx);
}
int mm_backend_sync(mm_backend *be) { return be->ops->sync(be->ctx); }
int mm_backend_flush(mm_backend *be) { return be->ops->flush ? be->ops->flush(be->ctx) : MM_OK; }

/* ---- tensors ------------------------------------------------------------- */

mm_tensor *mm_tensor_root(const mm_tensor *t) {
    while (t->parent)
        t = t->parent;
    return (mm_tensor *)t;
}

const char *mm_tensor_str(const mm_tensor *t, char *buf, size_t len) {
    if (!t) {
        snprintf(buf, len, "(null)");
        return buf;
    }
    size_t n = 0;
    n += (size_t)snprintf(buf + n, len - n, "[");
    for (int d = 0; d < t->ndim && n < len; d++)
        n += (size_t)snprintf(buf + n, len - n, d ? ", %zu" : "%zu", t->shape[d]);
    if (n < len)
        snprintf(buf + n, len - n, "] %s", mm_dtype_name(t->dtype));
    return buf;
}

/* Fill shape fields; 0 on success or a status with be->error set. */
static int s_set_shape(mm_backend *be, mm_tensor *t, mm_dtype dtype, int ndim,
                       const size_t *shape) {
    if (dtype < 0 || dtype >= MM_DTYPE_COUNT)
        return mm_backend_fail(be, MM_EINVAL, "tensor: unknown dtype %d", (int)dtype);
    if (ndim < 1 || ndim > MM_MAX_DIMS)
        return mm_backend_fail(be, MM_EINVAL, "tensor: ndim %d outside 1..%d", ndim, MM_MAX_DIMS);
    size_t n = 1;
    for (int d = 0; d < MM_MAX_DIMS; d++) {
        t->shape[d] = d < ndim ? shape[d] : 1;
        if (d < ndim && shape[d] == 0)
            return mm_backend_fail(be, MM_EINVAL, "tensor: dimension %d is zero", d);
        if (!mm_size_mul(n, t->shape[d], &n))
            return mm_backend_fail(be, MM_EINVAL, "tensor: element count overflows");
    }
    size_t bytes;
    if (dtype == MM_Q8 && ndim != 2)
        return mm_backend_fail(be, MM_EINVAL, "tensor: q8 tensors are 2-D (weights)");
    if (!mm_size_mul(dtype == MM_Q8 ? t->shape[0] : n,
                     dtype == MM_Q8 ? mm_q8_row_bytes(t->shape[1]) : mm_dtype_size(dtype), &bytes))
        return mm_backend_fail(be, MM_EINVAL, "tensor: byte size overflows");
    t->dtype = dtype;
    t->ndim = ndim;
    t->nelem = n;
    t->nbytes = bytes;
    return MM_OK;
}

int mm_tensor_new(mm_backend *be, mm_dtype dtype, int ndim, const size_t *shape, mm_tensor **out) {
    *out = NULL;
    mm_tensor *t = calloc(1, sizeof *t);
    if (!t)
        return mm_backend_fail(be, MM_ENOMEM, "tensor: out of host memory");
    int rc = s_set_shape(be, t, dtype, ndim, shape);
    if (rc == MM_OK && t->nbytes > mm_backend_max_tensor_bytes(be)) {
        char s[96];
        rc = mm_backend_fail(be, MM_EUNSUPPORTED,
                             "tensor: %s is %zu bytes, over the %s backend's limit of %zu "
                             "bytes per tensor (split it by rows)",
                             mm_tensor_str(t, s, sizeof s), t->nbytes, be->ops->name,
                             mm_backend_max_tensor_bytes(be));
    }
    if (rc == MM_OK) {
        t->be = be;
        rc = be->ops->tensor_alloc(be->ctx, t);
    }
    if (rc != MM_OK) {
        free(t);
        return rc;
    }
    *out = t;
    return MM_OK;
}

int mm_tensor_new_host(mm_backend *be, mm_dtype src, int ndim, const size_t *shape,
                       const void *host, mm_tensor **out) {
    *out = NULL;
    mm_dtype dt = src == MM_I32 ? MM_I32 : mm_backend_weight_dtype(be, src);
    if (!be->ops->tensor_wrap || dt != src) {
        int rc = mm_tensor_new(be, dt, ndim, shape, out);
        if (rc == MM_OK && (rc = mm_tensor_set(*out, host, src)) != MM_OK)
            mm_tensor_destroy(out);
        return rc;
    }
    mm_tensor *t = calloc(1, sizeof *t);
    if (!t)
        return mm_backend_fail(be, MM_ENOMEM, "tensor: out of host memory");
    int rc = s_set_shape(be, t, src, ndim, shape);
    if (rc == MM_OK) {
        t->be = be;
        t->readonly = 1;
        rc = be->ops->tensor_wrap(be->ctx, t, host);
    }
    if (rc != MM_OK) {
        free(t);
        return rc;
    }
    *out = t;
    return MM_OK;
}

int mm_tensor_new_2d(mm_backend *be, mm_dtype dtype, size_t rows, size_t cols, mm_tensor **out) {
    size_t shape[2] = {rows, cols};
    return mm_tensor_new(be, dtype, 2, shape, out);
}

void mm_tensor_destroy(mm_tensor **tp) {
    if (!tp || !*tp)
        return;
    mm_tensor *t = *tp;
    if (!t->parent)
        t->be->ops->tensor_free(t->be->ctx, t);
    free(t);
    *tp = NULL;
}

static int s_view(mm_tensor *t, size_t byte_off, int ndim, const size_t *shape, mm_tensor **out) {
    *out = NULL;
    mm_tensor *v = calloc(1, sizeof *v);
    if (!v)
        return mm_backend_fail(t->be, MM_ENOMEM, "view: out of host memory");
    int rc = s_set_shape(t->be, v, t->dtype, ndim, shape);
    if (rc != MM_OK) {
        free(v);
        return rc;
    }
    v->be = t->be;
    v->parent = t;
    v->offset = t->offset + byte_off;
    v->impl = t->impl;
    v->readonly = t->readonly;
    v->data = t->data ? (char *)t->data + byte_off : NULL;
    *out = v;
    return MM_OK;
}

int mm_tensor_view_rows(mm_tensor *t, size_t row0, size_t nrows, mm_tensor **out) {
    char s[96];
    if (nrows == 0 || row0 > t->shape[0] || nrows > t->shape[0] - row0) {
        *out = NULL;
        return mm_backend_fail(t->be, MM_EINVAL, "view_rows: rows [%zu, %zu+%zu) outside %s", row0,
                               row0, nrows, mm_tensor_str(t, s, sizeof s));
    }
    size_t shape[MM_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    shape[0] = nrows;
    size_t row_bytes = t->nbytes / t->shape[0];
    return s_view(t, row0 * row_bytes, t->ndim, shape, out);
}

int mm_tensor_reshape(mm_tensor *t, int ndim, const size_t *shape, mm_tensor **out) {
    int rc = s_view(t, 0, ndim, shape, out);
    if (rc != MM_OK)
        return rc;
    if ((*out)->nelem != t->nelem) {
        char a[96], b[96];
        mm_tensor_str(t, a, sizeof a);
        mm_tensor_str(*out, b, sizeof b);
        mm_tensor_destroy(out);
        return mm_backend_fail(t->be, MM_EINVAL, "reshape: %s into %s changes the size", a, b);
    }
    return MM_OK;
}

/* Convert n elements of src (dtype st) into dst (dtype dt). */
static int s_convert(void *dst, mm_dtype dt, const void *src, mm_dtype st, size_t n) {
    if (dt == st) {
        memcpy(dst, src, n * mm_dtype_size(dt));
        return MM_OK;
    }
    if (dt == MM_F32 && (st == MM_F16 || st == MM_BF16)) {
        mm_convert_to_f32(dst, src, st, n);
        return MM_OK;
    }
    if (st == MM_F32 && (dt == MM_F16 || dt == MM_BF16)) {
        const float *f = src;
        uint16_t *h = dst;
        for (size_t i = 0; i < n; i++)
            h[i] = dt == MM_F16 ? mm_f32_to_f16(f[i]) : mm_f32_to_bf16(f[i]);
        return MM_OK;
    }
    return MM_EINVAL;
}

/* Quantising rows into MM_Q8, split over up to S_Q8_THREADS threads. */
#define S_Q8_THREADS 8
typedef struct s_q8_job {
    char *q;
    const void *src;
    mm_dtype st;
    size_t nrows, k, row_bytes;
    size_t r0, r1; /* this thread's rows (set per thread) */
} s_q8_job;

static void *s_q8_rows(void *vp) {
    s_q8_job *j = vp;
    for (size_t r = j->r0; r < j->r1; r++)
        mm_q8_quantize_row(j->q + r * j->row_bytes,
                           (const char *)j->src + r * j->k * mm_dtype_size(j->st), j->st, j->k);
    return NULL;
}

static void s_q8_parallel(s_q8_job *job) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    size_t nt = ncpu > 1 ? (size_t)ncpu : 1;
    if (nt > S_Q8_THREADS)
        nt = S_Q8_THREADS;
    if (job->nrows * job->k < ((size_t)1 << 20)) /* small: not worth a thread */
        nt = 1;
    s_q8_job parts[S_Q8_THREADS];
    pthread_t th[S_Q8_THREADS];
    int started[S_Q8_THREADS] = {0};
    for (size_t i = 0; i < nt; i++) {
        parts[i] = *job;
        parts[i].r0 = job->nrows * i / nt;
        parts[i].r1 = job->nrows * (i + 1) / nt;
        started[i] = i > 0 && pthread_create(&th[i], NULL, s_q8_rows, &parts[i]) == 0;
    }
    for (size_t i = 0; i < nt; i++) /* thread 0, and any that did not start, here */
        if (!started[i])
            s_q8_rows(&parts[i]);
    for (size_t i = 1; i < nt; i++)
        if (started[i])
            pthread_join(th[i], NULL);
}

int mm_tensor_set_rows(mm_tensor *t, size_t row0, size_t nrows, const void *src,
                       mm_dtype src_dtype) {
    mm_backend *be = t->be;
    char s[96];
    if (row0 > t->shape[0] || nrows > t->shape[0] - row0)
        return mm_backend_fail(be, MM_EINVAL, "set_rows: rows [%zu, %zu+%zu) outside %s", row0,
                               row0, nrows, mm_tensor_str(t, s, sizeof s));
    if (t->readonly)
        return mm_backend_fail(be, MM_EINVAL,
                               "set_rows: %s is read-only (it holds the caller's memory)",
                               mm_tensor_str(t, s, sizeof s));
    if (nrows == 0)
        return MM_OK;
    size_t row_elems = t->nelem / t->shape[0];
    size_t n = nrows * row_elems;
    size_t row_bytes = t->nbytes / t->shape[0];
    size_t bytes = nrows * row_bytes;
    size_t off = t->offset + row0 * row_bytes;
    if (src_dtype == t->dtype && be->ops->write_queued && bytes <= MM_QUEUED_WRITE_MAX &&
        off % 4 == 0 && bytes % 4 == 0) /* small upload: in queue order, no sync */
        return be->ops->write_queued(be->ctx, mm_tensor_root(t), off, src, bytes);
    int rc = be->ops->sync(be->ctx);
    if (rc != MM_OK)
        return rc;
    if (t->dtype == MM_Q8 && src_dtype != MM_Q8) {
        if (src_dtype != MM_F32 && src_dtype != MM_F16 && src_dtype != MM_BF16)
            return mm_backend_fail(be, MM_EINVAL, "set: cannot quantise %s data into %s",
                                   mm_dtype_name(src_dtype), mm_tensor_str(t, s, sizeof s));
        /* Host-visible storage (cpu) is written in place; else through a
         * scratch copy. Rows are quantised on several threads: at load the
         * whole decoder goes through here (1.85 G weights at full size). */
        mm_tensor *root = mm_tensor_root(t);
        char *q = root->data ? (char *)root->data + off : malloc(bytes);
        if (!q)
            return mm_backend_fail(be, MM_ENOMEM, "set: out of host memory for %zu bytes", bytes);
        s_q8_job job = {q, src, src_dtype, nrows, row_elems, row_bytes, 0, 0};
        s_q8_parallel(&job);
        rc = root->data ? MM_OK : be->ops->write(be->ctx, root, off, q, bytes);
        if (!root->data)
            free(q);
        return rc;
    }
    if (src_dtype == t->dtype)
        return be->ops->write(be->ctx, mm_tensor_root(t), off, src, bytes);
    void *tmp = malloc(bytes);
    if (!tmp)
        return mm_backend_fail(be, MM_ENOMEM, "set: out of host memory for %zu bytes", bytes);
    rc = s_convert(tmp, t->dtype, src, src_dtype, n);
    if (rc != MM_OK)
        rc = mm_backend_fail(be, MM_EINVAL, "set: cannot convert %s data into %s",
                             mm_dtype_name(src_dtype), mm_tensor_str(t, s, sizeof s));
    else
        rc = be->ops->write(be->ctx, mm_tensor_root(t), off, tmp, bytes);
    free(tmp);
    return rc;
}

int mm_tensor_set(mm_tensor *t, const void *src, mm_dtype src_dtype) {
    return mm_tensor_set_rows(t, 0, t->shape[0], src, src_dtype);
}

int mm_tensor_get(mm_tensor *t, void *dst) {
    mm_backend *be = t->be;
    int rc = be->ops->sync(be->ctx);
    if (rc != MM_OK)
        return rc;
    return be->ops->read(be->ctx, mm_tensor_root(t), t->offset, dst, t->nbytes);
}

int mm_tensor_get_f32(mm_tensor *t, float *dst) {
    if (t->dtype == MM_F32)
        return mm_tensor_get(t, dst);
    if (t->dtype == MM_I32)
        return mm_backend_fail(t->be, MM_EINVAL, "get_f32: tensor is i32");
    void *tmp = malloc(t->nbytes);
    if (!tmp)
        return mm_backend_fail(t->be, MM_ENOMEM, "get_f32: out of host memory");
    int rc = mm_tensor_get(t, tmp);
    if (rc == MM_OK && t->dtype == MM_Q8) {
        size_t rb = t->nbytes / t->shape[0], k = t->shape[1];
        for (size_t r = 0; r < t->shape[0]; r++)
            mm_q8_dequantize_row(dst + r * k, (const char *)tmp + r * rb, k);
    } else if (rc == MM_OK)
        mm_convert_to_f32(dst, tmp, t->dtype, t->nelem);
    free(tmp);
    return rc;
}

/* ---- op validation --------------------------------------------------------
 * Each check writes "<op>: <what> (<shapes>)" into be->error. */

/* A function, not an expression macro: several S() in one argument list
 * would otherwise modify nbuf unsequenced (undefined; in practice they
 * could all share one buffer and print the same shape). */
static const char *s_shape_str(const mm_tensor *t, char (*sbuf)[96], int *nbuf) {
    return mm_tensor_str(t, sbuf[(*nbuf)++ % 6], 96);
}
#define S(t) s_shape_str((t), sbuf, &nbuf)

static size_t s_rows(const mm_tensor *t) { return t->nelem / t->shape[t->ndim - 1]; }
static size_t s_cols(const mm_tensor *t) { return t->shape[t->ndim - 1]; }

static int s_run(mm_backend *be, const mm_op *op, const char *name) {
    if ((op->dst && op->dst->readonly) || (op->dst2 && op->dst2->readonly))
        return mm_backend_fail(be, MM_EINVAL,
                               "%s: the output is a read-only tensor (the caller's memory)", name);
    if (be->ops->supports) {
        char why[256] = "";
        if (be->ops->supports(be->ctx, op, why, sizeof why) != MM_OK)
            return mm_backend_fail(be, MM_EUNSUPPORTED, "%s: not supported by the %s backend: %s",
                                   name, be->ops->name, why);
    }
    return be->ops->run_op(be->ctx, op);
}

/* The tensors given are non-NULL and belong to be. */
static int s_check_owned(mm_backend *be, const char *name, int n, const mm_tensor *const *ts) {
    for (int i = 0; i < n; i++) {
        if (!ts[i])
            return mm_backend_fail(be, MM_EINVAL, "%s: argument %d is NULL", name, i);
        if (ts[i]->be != be)
            return mm_backend_fail(be, MM_EINVAL, "%s: argument %d belongs to another backend",
                                   name, i);
    }
    return MM_OK;
}

#define CHECK_OWNED(name, ...)                                                                     \
    do {                                                                                           \
        const mm_tensor *ts_[] = {__VA_ARGS__};                                                    \
        int rc_ = s_check_owned(be, name, (int)(sizeof ts_ / sizeof ts_[0]), ts_);                 \
        if (rc_ != MM_OK)                                                                          \
            return rc_;                                                                            \
    } while (0)

static int s_same_shape(const mm_tensor *a, const mm_tensor *b) {
    return a->nelem == b->nelem && s_cols(a) == s_cols(b);
}

int mm_matmul(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w,
              const mm_tensor *bias) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("matmul", out, x, w);
    if (bias)
        CHECK_OWNED("matmul", bias);
    if (x->dtype != MM_F32 || out->dtype != MM_F32 || w->ndim != 2 ||
        (w->dtype != MM_F32 && w->dtype != MM_F16 && w->dtype != MM_BF16 && w->dtype != MM_Q8))
        return mm_backend_fail(be, MM_EINVAL,
                               "matmul: want x f32, out f32, w 2-D f32/f16/bf16/q8; got out %s, x "
                               "%s, w %s",
                               S(out), S(x), S(w));
    if (s_cols(x) != w->shape[1] || s_rows(out) != s_rows(x) || s_cols(out) != w->shape[0])
        return mm_backend_fail(be, MM_EINVAL,
                               "matmul: shapes do not fit out[M,N] = x[M,K] w[N,K]^T: out %s, "
                               "x %s, w %s",
                               S(out), S(x), S(w));
    if (bias && (bias->dtype != MM_F32 || bias->nelem != w->shape[0]))
        return mm_backend_fail(be, MM_EINVAL, "matmul: bias %s does not fit w %s (want [%zu] f32)",
                               S(bias), S(w), w->shape[0]);
    if (out == x)
        return mm_backend_fail(be, MM_EINVAL, "matmul: out must not alias x");
    mm_op op = {.type = MM_OP_MATMUL, .dst = out, .src = {x, w, bias}};
    return s_run(be, &op, "matmul");
}

static int s_binary(mm_backend *be, mm_op_type type, const char *name, mm_tensor *out,
                    const mm_tensor *a, const mm_tensor *b) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED(name, out, a, b);
    if (a->dtype != MM_F32 || b->dtype != MM_F32 || out->dtype != MM_F32)
        return mm_backend_fail(be, MM_EINVAL, "%s: want f32 tensors; got out %s, a %s, b %s", name,
                               S(out), S(a), S(b));
    if (!s_same_shape(out, a) || s_cols(a) != s_cols(b) ||
        (b->nelem != a->nelem && b->nelem != s_cols(a)))
        return mm_backend_fail(be, MM_EINVAL,
                               "%s: shapes do not fit (b must match a or be one row): out %s, "
                               "a %s, b %s",
                               name, S(out), S(a), S(b));
    mm_op op = {.type = type, .dst = out, .src = {a, b}};
    return s_run(be, &op, name);
}

int mm_add(mm_backend *be, mm_tensor *out, const mm_tensor *a, const mm_tensor *b) {
    return s_binary(be, MM_OP_ADD, "add", out, a, b);
}

int mm_mul(mm_backend *be, mm_tensor *out, const mm_tensor *a, const mm_tensor *b) {
    return s_binary(be, MM_OP_MUL, "mul", out, a, b);
}

/* out and x: f32 of the same shape. */
static int s_check_elementwise(mm_backend *be, const char *name, const mm_tensor *out,
                               const mm_tensor *x) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED(name, out, x);
    if (x->dtype != MM_F32 || out->dtype != MM_F32 || !s_same_shape(out, x))
        return mm_backend_fail(be, MM_EINVAL,
                               "%s: want f32 out and x of one shape; got out %s, x %s", name,
                               S(out), S(x));
    return MM_OK;
}

int mm_scale(mm_backend *be, mm_tensor *out, const mm_tensor *a, float s) {
    int rc = s_check_elementwise(be, "scale", out, a);
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_SCALE, .dst = out, .src = {a}, .f = {s}};
    return s_run(be, &op, "scale");
}

static int s_check_vec(mm_backend *be, const char *name, const char *what, const mm_tensor *v,
                       size_t n) {
    char sbuf[6][96];
    int nbuf = 0;
    if (!v)
        return MM_OK;
    CHECK_OWNED(name, v);
    if (v->dtype != MM_F32 || v->nelem != n)
        return mm_backend_fail(be, MM_EINVAL, "%s: %s is %s, want [%zu] f32", name, what, S(v), n);
    return MM_OK;
}

int mm_layernorm(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w,
                 const mm_tensor *b, float eps) {
    int rc = s_check_elementwise(be, "layernorm", out, x);
    if (rc == MM_OK)
        rc = s_check_vec(be, "layernorm", "weight", w, s_cols(x));
    if (rc == MM_OK)
        rc = s_check_vec(be, "layernorm", "bias", b, s_cols(x));
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_LAYERNORM, .dst = out, .src = {x, w, b}, .f = {eps}};
    return s_run(be, &op, "layernorm");
}

int mm_rmsnorm(mm_backend *be, mm_tensor *out, const mm_tensor *x, const mm_tensor *w, float eps) {
    int rc = s_check_elementwise(be, "rmsnorm", out, x);
    if (rc == MM_OK)
        rc = s_check_vec(be, "rmsnorm", "weight", w, s_cols(x));
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_RMSNORM, .dst = out, .src = {x, w}, .f = {eps}};
    return s_run(be, &op, "rmsnorm");
}

int mm_unary(mm_backend *be, mm_unary_op u, mm_tensor *out, const mm_tensor *x) {
    if (u < 0 || u >= MM_UNARY_COUNT)
        return mm_backend_fail(be, MM_EINVAL, "unary: unknown op %d", (int)u);
    int rc = s_check_elementwise(be, "unary", out, x);
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_UNARY, .dst = out, .src = {x}, .i = {u}};
    return s_run(be, &op, "unary");
}

int mm_swiglu(mm_backend *be, mm_tensor *out, const mm_tensor *gate, const mm_tensor *up) {
    char sbuf[6][96];
    int nbuf = 0;
    int rc = s_check_elementwise(be, "swiglu", out, gate);
    if (rc != MM_OK)
        return rc;
    CHECK_OWNED("swiglu", up);
    if (up->dtype != MM_F32 || !s_same_shape(up, gate))
        return mm_backend_fail(be, MM_EINVAL, "swiglu: up %s does not match gate %s", S(up),
                               S(gate));
    mm_op op = {.type = MM_OP_SWIGLU, .dst = out, .src = {gate, up}};
    return s_run(be, &op, "swiglu");
}

int mm_softmax(mm_backend *be, mm_tensor *out, const mm_tensor *x) {
    int rc = s_check_elementwise(be, "softmax", out, x);
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_SOFTMAX, .dst = out, .src = {x}};
    return s_run(be, &op, "softmax");
}

static int s_check_seq(mm_backend *be, const char *name, const mm_tensor *seq, size_t T) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED(name, seq);
    if (seq->dtype != MM_I32 || seq->ndim != 2 || seq->shape[1] != 2 || seq->shape[0] != T)
        return mm_backend_fail(be, MM_EINVAL, "%s: seq is %s, want [%zu, 2] i32 (slot, pos)", name,
                               S(seq), T);
    return MM_OK;
}

int mm_rope(mm_backend *be, mm_tensor *x, const mm_tensor *seq, int n_heads, int head_dim,
            int rot_dims, float theta) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("rope", x);
    if (n_heads <= 0 || head_dim <= 0 || rot_dims <= 0 || rot_dims > head_dim || rot_dims % 2 ||
        !(theta > 0))
        return mm_backend_fail(be, MM_EINVAL,
                               "rope: bad parameters n_heads %d head_dim %d rot_dims %d theta %g",
                               n_heads, head_dim, rot_dims, (double)theta);
    if (x->dtype != MM_F32 || s_cols(x) != (size_t)n_heads * (size_t)head_dim)
        return mm_backend_fail(be, MM_EINVAL, "rope: x is %s, want [T, %d] f32", S(x),
                               n_heads * head_dim);
    int rc = s_check_seq(be, "rope", seq, s_rows(x));
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_ROPE,
                .dst = x,
                .src = {seq},
                .i = {n_heads, head_dim, rot_dims},
                .f = {theta}};
    return s_run(be, &op, "rope");
}

static int s_check_cache(mm_backend *be, const char *name, const mm_tensor *cache, size_t width) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED(name, cache);
    if (cache->dtype != MM_F32 || cache->ndim != 3 || cache->shape[2] != width)
        return mm_backend_fail(be, MM_EINVAL, "%s: cache is %s, want [slots, max_ctx, %zu] f32",
                               name, S(cache), width);
    return MM_OK;
}

int mm_kv_store(mm_backend *be, mm_tensor *cache, const mm_tensor *kv, const mm_tensor *seq) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("kv_store", kv);
    if (kv->dtype != MM_F32 || kv->ndim != 2)
        return mm_backend_fail(be, MM_EINVAL, "kv_store: kv is %s, want [T, width] f32", S(kv));
    int rc = s_check_cache(be, "kv_store", cache, kv->shape[1]);
    if (rc == MM_OK)
        rc = s_check_seq(be, "kv_store", seq, kv->shape[0]);
    if (rc != MM_OK)
        return rc;
    mm_op op = {.type = MM_OP_KV_STORE, .dst = cache, .src = {kv, seq}};
    return s_run(be, &op, "kv_store");
}

int mm_attention(mm_backend *be, mm_tensor *out, const mm_tensor *q, const mm_tensor *kcache,
                 const mm_tensor *vcache, const mm_tensor *seq, int n_heads, int n_kv_heads,
                 int head_dim, float scale) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("attention", out, q);
    if (n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || n_heads % n_kv_heads)
        return mm_backend_fail(be, MM_EINVAL,
                               "attention: bad heads: n_heads %d n_kv_heads %d head_dim %d",
                               n_heads, n_kv_heads, head_dim);
    size_t qw = (size_t)n_heads * (size_t)head_dim, kw = (size_t)n_kv_heads * (size_t)head_dim;
    if (q->dtype != MM_F32 || q->ndim != 2 || q->shape[1] != qw || out == q ||
        !s_same_shape(out, q) || out->dtype != MM_F32)
        return mm_backend_fail(be, MM_EINVAL,
                               "attention: want q and out [T, %zu] f32, distinct; got q %s, out %s",
                               qw, S(q), S(out));
    int rc = s_check_cache(be, "attention", kcache, kw);
    if (rc == MM_OK)
        rc = s_check_cache(be, "attention", vcache, kw);
    if (rc == MM_OK)
        rc = s_check_seq(be, "attention", seq, q->shape[0]);
    if (rc != MM_OK)
        return rc;
    if (kcache->shape[0] != vcache->shape[0] || kcache->shape[1] != vcache->shape[1])
        return mm_backend_fail(be, MM_EINVAL, "attention: kcache %s and vcache %s differ",
                               S(kcache), S(vcache));
    mm_op op = {.type = MM_OP_ATTENTION,
                .dst = out,
                .src = {q, kcache, vcache, seq},
                .i = {n_heads, n_kv_heads, head_dim},
                .f = {scale}};
    return s_run(be, &op, "attention");
}

int mm_topk(mm_backend *be, mm_tensor *idx, mm_tensor *val, const mm_tensor *x, int k) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("topk", idx, val, x);
    if (x->dtype != MM_F32 || x->ndim != 2 || k <= 0 || (size_t)k > x->shape[1])
        return mm_backend_fail(be, MM_EINVAL, "topk: x is %s, k %d (want f32 [T, E], 1 <= k <= E)",
                               S(x), k);
    if (idx->dtype != MM_I32 || val->dtype != MM_F32 || idx->ndim != 2 || val->ndim != 2 ||
        idx->shape[0] != x->shape[0] || val->shape[0] != x->shape[0] ||
        idx->shape[1] != (size_t)k || val->shape[1] != (size_t)k)
        return mm_backend_fail(be, MM_EINVAL,
                               "topk: want idx [%zu, %d] i32 and val [%zu, %d] f32; got %s, %s",
                               x->shape[0], k, x->shape[0], k, S(idx), S(val));
    mm_op op = {.type = MM_OP_TOPK, .dst = idx, .dst2 = val, .src = {x}, .i = {k}};
    return s_run(be, &op, "topk");
}

int mm_get_rows(mm_backend *be, mm_tensor *out, const mm_tensor *src, const mm_tensor *idx) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("get_rows", out, src, idx);
    if (src->ndim != 2 || src->dtype == MM_I32 || src->dtype == MM_Q8 || out->dtype != MM_F32 ||
        out->ndim != 2 || idx->dtype != MM_I32 || idx->nelem != out->shape[0] ||
        out->shape[1] != src->shape[1])
        return mm_backend_fail(be, MM_EINVAL,
                               "get_rows: want src [R, C] f32/f16/bf16, idx [n] i32, out [n, C] "
                               "f32; got src %s, idx %s, out %s",
                               S(src), S(idx), S(out));
    mm_op op = {.type = MM_OP_GET_ROWS, .dst = out, .src = {src, idx}};
    return s_run(be, &op, "get_rows");
}

int mm_scatter_add_rows(mm_backend *be, mm_tensor *dst, const mm_tensor *src, const mm_tensor *idx,
                        const mm_tensor *w) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("scatter_add_rows", dst, src, idx);
    if (w)
        CHECK_OWNED("scatter_add_rows", w);
    if (dst->dtype != MM_F32 || src->dtype != MM_F32 || dst->ndim != 2 || src->ndim != 2 ||
        dst->shape[1] != src->shape[1] || idx->dtype != MM_I32 || idx->nelem != src->shape[0] ||
        (w && (w->dtype != MM_F32 || w->nelem != src->shape[0])))
        return mm_backend_fail(be, MM_EINVAL,
                               "scatter_add_rows: want dst [R, C] f32, src [n, C] f32, idx [n] "
                               "i32, w [n] f32; got dst %s, src %s, idx %s, w %s",
                               S(dst), S(src), S(idx), S(w));
    mm_op op = {.type = MM_OP_SCATTER_ADD, .dst = dst, .src = {src, idx, w}};
    return s_run(be, &op, "scatter_add_rows");
}

int mm_im2col(mm_backend *be, mm_tensor *out, const mm_tensor *img, int patch) {
    char sbuf[6][96];
    int nbuf = 0;
    CHECK_OWNED("im2col", out, img);
    if (img->dtype != MM_F32 || img->ndim != 3 || patch <= 0 || img->shape[1] % (size_t)patch ||
        img->shape[2] % (size_t)patch)
        return mm_backend_fail(be, MM_EINVAL,
                               "im2col: img is %s with patch %d (want [C, H, W] f32, H and W "
                               "multiples of the patch)",
                               S(img), patch);
    size_t P = (size_t)patch;
    size_t np = (img->shape[1] / P) * (img->shape[2] / P), pw = img->shape[0] * P * P;
    if (out->dtype != MM_F32 || out->ndim != 2 || out->shape[0] != np || out->shape[1] != pw)
        return mm_backend_fail(be, MM_EINVAL, "im2col: out is %s, want [%zu, %zu] f32", S(out), np,
                               pw);
    mm_op op = {.type = MM_OP_IM2COL, .dst = out, .src = {img}, .i = {patch}};
    return s_run(be, &op, "im2col");
}

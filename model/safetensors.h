/* safetensors.h — read-only, memory-mapped safetensors files and checkpoint
 * directories (single file, sharded with an index, or a loose set of files).
 *
 * Everything in a file's header is untrusted: lengths, offsets, shapes and
 * dtypes are all checked at open time, so a tensor handed out here always
 * lies wholly inside its mapping with nbytes == nelem × element size. Errors
 * name the file and the tensor ("model-00001-of-00002.safetensors: tensor
 * 'lm_head.weight': data_offsets end 4096 beyond the data section (2048
 * bytes)").
 *
 * Memory. Files are mapped PROT_READ / MAP_PRIVATE and nothing is copied:
 * mm_st_tensor.data points into the mapping, and the OS pages bytes in only
 * when they are touched. A process that reads only some tensors (an expert
 * node that serves one expert's FFN) therefore only ever loads those pages,
 * even though every shard of the checkpoint is mapped. Pointers stay valid
 * until the checkpoint (or file) is destroyed. data may be unaligned when a
 * writer did not pad its header to 8 bytes: copy or convert it (mm_tensor_set
 * does), do not cast it to float * and dereference blindly.
 *
 *     mm_checkpoint *ck;  char err[512];
 *     if (mm_checkpoint_open("/models/medmoe", &ck, err, sizeof err) != MM_OK) {
 *         fprintf(stderr, "%s\n", err);  return 1;
 *     }
 *     const mm_st_tensor *w;
 *     size_t want[2] = {2048, 2048};
 *     int rc = mm_checkpoint_get(ck, "model.layers.0.self_attn.q_proj.weight", 2, want, &w,
 *                                err, sizeof err);
 *     if (rc == MM_OK) mm_tensor_set(dev_w, w->data, w->dtype);
 *     mm_checkpoint_destroy(&ck);
 */
#ifndef MM_SAFETENSORS_H
#define MM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "status.h"

/* Largest header we accept: real headers are ~100 KB; this only stops a
 * hostile length from making us parse gigabytes. */
#define MM_ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

/* Wildcard for one entry of an expected shape in mm_checkpoint_get. */
#define MM_ANY_DIM ((size_t)-1)

/* Every dtype string the safetensors format defines. Only F32, F16 and BF16
 * can be computed with; the others can be listed (a CLIP checkpoint may carry
 * an I64 position_ids buffer) but mm_checkpoint_get refuses them. A string
 * outside this list makes the file fail to open. */
typedef enum mm_st_dtype {
    MM_ST_F32,
    MM_ST_F16,
    MM_ST_BF16,
    MM_ST_F64,
    MM_ST_I64,
    MM_ST_I32,
    MM_ST_I16,
    MM_ST_I8,
    MM_ST_U64,
    MM_ST_U32,
    MM_ST_U16,
    MM_ST_U8,
    MM_ST_BOOL,
    MM_ST_F8_E4M3,
    MM_ST_F8_E5M2,
    MM_ST_DTYPE_COUNT
} mm_st_dtype;

const char *mm_st_dtype_name(mm_st_dtype t); /* the header's spelling: "BF16", "I64" */
size_t mm_st_dtype_size(mm_st_dtype t);      /* bytes per element; 0 if out of range */

typedef struct mm_st_tensor {
    const char *name;          /* tensor name from the header (owned by the file)      */
    mm_st_dtype st_dtype;      /* dtype as stored, any of the known ones               */
    mm_dtype dtype;            /* MM_F32/MM_F16/MM_BF16 when usable, MM_I32 for I32,
                                  else MM_DTYPE_COUNT (not representable)               */
    int usable;                /* 1 for F32/F16/BF16: what mm_checkpoint_get accepts   */
    int ndim;                  /* 0..MM_MAX_DIMS (0 = scalar)                          */
    size_t shape[MM_MAX_DIMS]; /* shape[0] outermost; unused entries are 1         */
    size_t nelem;              /* product of the shape (1 for a scalar)                */
    size_t nbytes;             /* nelem × mm_st_dtype_size(st_dtype), checked          */
    const void *data;          /* first byte, inside the read-only mapping             */
    size_t file_offset;        /* byte offset of data within the file                  */
    const char *file;          /* path of the file holding it (owned by the file)      */
} mm_st_tensor;

/* ---- one safetensors file ------------------------------------------------ */

typedef struct mm_st_file mm_st_file; /* opaque */

/* Map and validate path. On failure *out is NULL and err says why. */
int mm_st_open(const char *path, mm_st_file **out, char *err, size_t errlen);
/* Unmap and free; sets *f to NULL; NULL-safe, idempotent. */
void mm_st_destroy(mm_st_file **f);

const char *mm_st_path(const mm_st_file *f);
size_t mm_st_count(const mm_st_file *f);
/* Tensors in name order (strcmp); NULL if i >= count. */
const mm_st_tensor *mm_st_at(const mm_st_file *f, size_t i);
/* NULL when the file has no tensor of that name. */
const mm_st_tensor *mm_st_find(const mm_st_file *f, const char *name);
/* __metadata__ (string → string). NULL if absent. */
const char *mm_st_metadata(const mm_st_file *f, const char *key);
size_t mm_st_metadata_count(const mm_st_file *f);
/* Entry i in key order; 0 on success, MM_EINVAL if i is out of range. */
int mm_st_metadata_at(const mm_st_file *f, size_t i, const char **key, const char **value);

/* ---- a checkpoint: one or more files seen as one set of tensors ---------- */

typedef struct mm_checkpoint mm_checkpoint; /* opaque */

/* Open a checkpoint. path is a directory holding, by priority:
 *   1. model.safetensors.index.json — weight_map: tensor name → shard file.
 *      Each shard name must be a plain file name (no '/', no ".."), must
 *      exist, and must really hold every tensor mapped to it. Tensors a shard
 *      holds but the weight_map does not list are ignored (the index rules).
 *   2. model.safetensors
 *   3. every *.safetensors file in the directory (a name in two files is an
 *      error).
 * path may also name a single .safetensors file.
 * Returns MM_OK, MM_ENOTFOUND (no safetensors found, missing shard), MM_EIO,
 * MM_EPROTO (malformed file or index) or MM_ENOMEM; err names file + tensor. */
int mm_checkpoint_open(const char *path, mm_checkpoint **out, char *err, size_t errlen);
void mm_checkpoint_destroy(mm_checkpoint **ck); /* NULL-safe, idempotent */

const char *mm_checkpoint_path(const mm_checkpoint *ck); /* as given to open */
size_t mm_checkpoint_count(const mm_checkpoint *ck);
/* Tensors in name order (strcmp); NULL if i >= count. */
const mm_st_tensor *mm_checkpoint_at(const mm_checkpoint *ck, size_t i);
/* Binary search; NULL if absent. */
const mm_st_tensor *mm_checkpoint_find(const mm_checkpoint *ck, const char *name);
/* Files making up the checkpoint (one per shard). */
size_t mm_checkpoint_file_count(const mm_checkpoint *ck);
const mm_st_file *mm_checkpoint_file_at(const mm_checkpoint *ck, size_t i);
/* The first file (in file order) whose __metadata__ has key; NULL if none. */
const char *mm_checkpoint_metadata(const mm_checkpoint *ck, const char *key);

/* Checked getter for a tensor the model computes with.
 *   ndim > 0: the tensor must have exactly ndim dims; ndim <= 0: any.
 *   expect_shape: NULL = any shape; else ndim entries, MM_ANY_DIM matches all.
 * Returns MM_OK with *out set, or (with *out NULL):
 *   MM_ENOTFOUND    "tensor 'x' not found in <dir>"
 *   MM_EPROTO       "tensor 'x' in <file> has shape [a, b], expected [c, d]"
 *   MM_EUNSUPPORTED "tensor 'x' in <file> has dtype I64; only F32, F16, BF16 ..." */
int mm_checkpoint_get(const mm_checkpoint *ck, const char *name, int ndim,
                      const size_t *expect_shape, const mm_st_tensor **out, char *err,
                      size_t errlen);

/* "[2048, 5632]" into buf (for messages); returns buf. */
char *mm_st_shape_str(const mm_st_tensor *t, char *buf, size_t len);

#endif

/* vk_internal.h — state shared by the files of the Vulkan backend (private).
 *
 *   vk_device.c      instance, device selection, pipelines, create/destroy
 *   vk_memory.c      device memory blocks, tensor sub-allocation, host copies
 *   vulkan_backend.c command recording, barriers, submission, the ops
 *
 * Memory model: tensors live in a few large VkDeviceMemory blocks (device-
 * local on discrete GPUs, mapped on unified-memory ones: vk_memory.c), each
 * with one VkBuffer; a root tensor
 * is a sub-range of a block (offset aligned to minStorageBufferOffsetAlignment),
 * so it is bound as (block buffer, root offset, root size) and a view adds
 * an element offset in push constants.
 */
#ifndef MM_VK_INTERNAL_H
#define MM_VK_INTERNAL_H

#include <vulkan/vulkan.h>

#include "backend.h"

/* Pipelines, one per shader variant; names in vk_device.c must match the
 * variant names of kernels/vulkan/CMakeLists.txt. */
typedef enum mm_vk_pipe {
    MM_VK_MATMUL_F32,
    MM_VK_MATMUL_F16,
    MM_VK_MATMUL_BF16,
    MM_VK_GEMV_F32, /* gemv: M == 1, shared-memory reduction           */
    MM_VK_GEMV_F16,
    MM_VK_GEMV_BF16,
    MM_VK_GEMV16_F32, /* gemv16: 2 <= M <= 16, weights read once         */
    MM_VK_GEMV16_F16,
    MM_VK_GEMV16_BF16,
    MM_VK_GEMV_SG_F32, /* the same two with subgroup reductions: created */
    MM_VK_GEMV_SG_F16, /* only when the device has subgroup arithmetic   */
    MM_VK_GEMV_SG_BF16,
    MM_VK_GEMV16_SG_F32,
    MM_VK_GEMV16_SG_F16,
    MM_VK_GEMV16_SG_BF16,
    MM_VK_GET_ROWS_F32,
    MM_VK_GET_ROWS_F16,
    MM_VK_GET_ROWS_BF16,
    MM_VK_BINARY,
    MM_VK_UNARY,
    MM_VK_NORM,
    MM_VK_SOFTMAX,
    MM_VK_ROPE,
    MM_VK_KV_STORE,
    MM_VK_ATTENTION,
    MM_VK_TOPK,
    MM_VK_SCATTER_ADD,
    MM_VK_IM2COL,
    MM_VK_PIPE_COUNT
} mm_vk_pipe;

#define MM_VK_BINDINGS 6     /* storage buffers per descriptor set (all pipelines) */
#define MM_VK_PUSH_BYTES 128 /* push-constant range: the guaranteed minimum        */
#define MM_VK_MAX_DISPATCH                                                                         \
    1024                    /* dispatches per submission (drivers reset the device                 \
                               on very long ones); also the descriptor pool size  */
#define MM_VK_MAX_ACCESS 64 /* ranges tracked for hazards since the last barrier  */
#define MM_VK_BLOCK_BYTES ((VkDeviceSize)256 << 20) /* default memory block size      */
/* Bounded wait in sync(): a GPU that takes a minute over one submission is
 * hung; a CPU device (lavapipe) on a loaded host may take that long over a
 * full-width prefill, so it gets ten. */
#define MM_VK_FENCE_TIMEOUT_NS (60ull * 1000 * 1000 * 1000)
#define MM_VK_FENCE_TIMEOUT_CPU_NS (600ull * 1000 * 1000 * 1000)

typedef struct mm_vk_range {
    VkDeviceSize off, size; /* a free byte range of a block */
} mm_vk_range;

typedef struct mm_vk_block {
    VkDeviceMemory mem;  /* the allocation                           */
    VkBuffer buf;        /* one storage buffer over the whole block  */
    VkDeviceSize size;   /* bytes                                    */
    char *map;           /* persistent host mapping (mapped mode)    */
    mm_vk_range *free;   /* free ranges sorted by offset, coalesced  */
    size_t nfree, cfree; /* count and capacity of free               */
    size_t nallocs;      /* live allocations in the block            */
} mm_vk_block;

/* t->impl of a root tensor. */
typedef struct mm_vk_alloc {
    size_t block;       /* index into mm_vk.blocks           */
    VkDeviceSize off;   /* byte offset in the block (aligned) */
    VkDeviceSize size;  /* bytes reserved (rounded up)        */
    VkDeviceSize range; /* descriptor range: <= maxStorageBufferRange */
    int zero;           /* not yet zeroed: zero before the first read */
} mm_vk_alloc;

/* A byte range touched by a recorded dispatch since the last barrier. */
typedef struct mm_vk_access {
    size_t block;
    VkDeviceSize lo, hi; /* [lo, hi) in the block */
    int write;           /* 1 written, 0 read only */
} mm_vk_access;

typedef struct mm_vk {
    mm_backend *be;                /* owner, for be->error                          */
    char desc[1024];               /* describe() text: device, how chosen, memory   */
    char chosen_by[96];            /* "MEDMOE_VK_DEVICE='...'" or the default rule */
    char uuid[48], pci[24];        /* of the chosen device ("n/a" without PCI info) */
    uint32_t dev_index, dev_count; /* its index among the enumerated devices */

    VkInstance inst;
    VkPhysicalDevice phys;
    VkPhysicalDeviceProperties props;
    VkDevice dev;
    uint32_t qfam; /* compute queue family */
    VkQueue queue;

    /* memory */
    int mapped;         /* blocks host-visible and mapped (unified)  */
    uint32_t mem_type;  /* memory type of the blocks                 */
    char mem_desc[320]; /* the placement, for describe()             */
    VkBuffer stage_buf; /* staging mode: host-visible copy buffer    */
    VkDeviceMemory stage_mem;
    char *stage_map;
    VkDeviceSize stage_size;
    uint32_t stage_type;
    int stage_coherent;   /* else flush/invalidate around copies       */
    VkCommandBuffer xcmd; /* staging copies (the queue is idle)        */
    VkFence xfence;
    VkDeviceSize align;     /* root allocation alignment                 */
    VkDeviceSize max_alloc; /* maxMemoryAllocationSize (or heap size)    */
    VkDeviceSize max_range; /* maxStorageBufferRange = max tensor bytes  */
    mm_vk_block *blocks;    /* nblocks entries (mem == NULL: released)   */
    size_t nblocks, cblocks;
    mm_vk_alloc dummy;  /* 16 bytes bound where an op has no tensor  */
    mm_vk_alloc *limbo; /* ranges freed while dispatches were pending:
                           returned to the free lists at the next sync */
    size_t nlimbo, climbo;

    /* pipelines */
    VkDescriptorSetLayout dsl;
    VkPipelineLayout layout;
    VkPipeline pipes[MM_VK_PIPE_COUNT];

    /* execution */
    VkDescriptorPool pool; /* MM_VK_MAX_DISPATCH sets, reset after each submission */
    VkCommandPool cmd_pool;
    VkCommandBuffer cmd;
    VkFence fence;
    int recording; /* cmd is begun and holds ndispatch dispatches */
    int inflight;  /* cmd is submitted (flush) and not yet waited for */
    unsigned ndispatch;
    mm_vk_access acc[MM_VK_MAX_ACCESS];
    unsigned nacc;
    int broken; /* a submission failed or timed out: the device state is unknown */
    uint64_t fence_timeout_ns;
    int subgroup; /* subgroup arithmetic in compute: the _SG pipelines */
    uint32_t subgroup_size;
    /* lanes, for describe()                             */ /* MM_VK_FENCE_TIMEOUT_NS, or
                                                               _CPU_NS on a CPU device */
} mm_vk;

/* Record a failing Vulkan call: "<what>: <call> failed: VK_..." → MM_EDEVICE. */
int mm_vk_fail(mm_vk *vk, VkResult r, const char *what, const char *call);
const char *mm_vk_result_str(VkResult r);

/* vk_memory.c */
int mm_vk_memory_init(mm_vk *vk, char *err, size_t errlen);
void mm_vk_memory_destroy(mm_vk *vk);
/* Only when idle: return limbo ranges, release empty blocks. */
void mm_vk_memory_trim(mm_vk *vk);
int mm_vk_alloc_bytes(mm_vk *vk, VkDeviceSize size, mm_vk_alloc *out);
void mm_vk_free_bytes(mm_vk *vk, const mm_vk_alloc *a);
int mm_vk_tensor_alloc(void *ctx, mm_tensor *t);
void mm_vk_tensor_free(void *ctx, mm_tensor *t);
int mm_vk_write(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n);
int mm_vk_read(void *ctx, mm_tensor *root, size_t off, void *dst, size_t n);
/* Zero a's range before its first read: memset when mapped, else a fill
 * recorded into cmd followed by a transfer->compute barrier. Clears a->zero. */
void mm_vk_zero_record(mm_vk *vk, VkCommandBuffer cmd, mm_vk_alloc *a);

/* vulkan_backend.c */
int mm_vk_exec_init(mm_vk *vk, char *err, size_t errlen);
int mm_vk_sync(void *ctx);
int mm_vk_flush(void *ctx);
int mm_vk_write_queued(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n);
int mm_vk_run_op(void *ctx, const mm_op *op);
int mm_vk_supports(void *ctx, const mm_op *op, char *why, size_t len);

#endif

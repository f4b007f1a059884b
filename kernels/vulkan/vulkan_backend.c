/* vulkan_backend.c — recording ops into one command buffer and running it.
 *
 * run_op binds the op's tensors (each at its root allocation, views by
 * element offsets in push constants), records one dispatch, and inserts a
 * compute->compute barrier only when the dispatch touches a byte range that
 * an earlier dispatch since the last barrier wrote (or writes a range one
 * read), so independent ops may overlap. sync() submits once and waits on a
 * fence for a bounded time. A submission holds at most MM_VK_MAX_DISPATCH
 * dispatches: run_op submits and waits early when it is full, since drivers
 * reset the device on very long submissions. flush() submits without
 * waiting (one submission in flight; the next recording waits for it), and
 * small uploads are recorded in queue order (write_queued) instead of
 * forcing a sync.
 */
#include <stdio.h>
#include <string.h>

#include "vk_internal.h"

int mm_vk_exec_init(mm_vk *vk, char *err, size_t errlen) {
    VkDescriptorPoolSize ps = {.type = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                               .descriptorCount = MM_VK_MAX_DISPATCH * MM_VK_BINDINGS};
    VkDescriptorPoolCreateInfo dpci = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
                                       .maxSets = MM_VK_MAX_DISPATCH,
                                       .poolSizeCount = 1,
                                       .pPoolSizes = &ps};
    VkResult r = vkCreateDescriptorPool(vk->dev, &dpci, NULL, &vk->pool);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateDescriptorPool failed: %s",
                         mm_vk_result_str(r));
    VkCommandPoolCreateInfo cpci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                    .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                    .queueFamilyIndex = vk->qfam};
    r = vkCreateCommandPool(vk->dev, &cpci, NULL, &vk->cmd_pool);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateCommandPool failed: %s",
                         mm_vk_result_str(r));
    VkCommandBufferAllocateInfo cbai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                        .commandPool = vk->cmd_pool,
                                        .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                        .commandBufferCount = 1};
    r = vkAllocateCommandBuffers(vk->dev, &cbai, &vk->cmd);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkAllocateCommandBuffers failed: %s",
                         mm_vk_result_str(r));
    VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    r = vkCreateFence(vk->dev, &fci, NULL, &vk->fence);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateFence failed: %s",
                         mm_vk_result_str(r));
    return MM_OK;
}

/* ---- submission ---------------------------------------------------------- */

static int s_wait(mm_vk *vk);

static int s_begin(mm_vk *vk) {
    if (vk->recording)
        return MM_OK;
    if (vk->inflight) { /* cmd and pool belong to the flushed submission */
        int rc = s_wait(vk);
        if (rc != MM_OK)
            return rc;
    }
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    VkResult r = vkBeginCommandBuffer(vk->cmd, &bi);
    if (r != VK_SUCCESS)
        return mm_vk_fail(vk, r, "record", "vkBeginCommandBuffer");
    vk->recording = 1;
    vk->ndispatch = 0;
    vk->nacc = 0;
    /* Shader and copy writes of earlier submissions -> this one (the host's
     * fence wait orders them in time, but only a barrier makes device writes
     * visible to later device work). */
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask =
                              VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT};
    vkCmdPipelineBarrier(vk->cmd,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    return MM_OK;
}

/* Wait for the submission in flight, then make cmd, pool and fence reusable
 * and return the ranges freed meanwhile. */
static int s_wait(mm_vk *vk) {
    VkResult r = vkWaitForFences(vk->dev, 1, &vk->fence, VK_TRUE, vk->fence_timeout_ns);
    vk->inflight = 0;
    if (r == VK_TIMEOUT) {
        vk->broken = 1;
        return mm_backend_fail(vk->be, MM_ETIMEOUT,
                               "vulkan: sync: a submission of %u dispatches did not finish in "
                               "%llu s on %s",
                               vk->ndispatch,
                               (unsigned long long)(vk->fence_timeout_ns / 1000000000ull),
                               vk->props.deviceName);
    }
    if (r != VK_SUCCESS) {
        vk->broken = 1;
        return mm_vk_fail(vk, r, "sync", "vkWaitForFences");
    }
    r = vkResetFences(vk->dev, 1, &vk->fence);
    if (r == VK_SUCCESS)
        r = vkResetDescriptorPool(vk->dev, vk->pool, 0);
    if (r == VK_SUCCESS)
        r = vkResetCommandBuffer(vk->cmd, 0);
    if (r != VK_SUCCESS) {
        vk->broken = 1;
        return mm_vk_fail(vk, r, "sync", "vkResetFences/DescriptorPool/CommandBuffer");
    }
    vk->ndispatch = 0;
    vk->nacc = 0;
    mm_vk_memory_trim(vk); /* idle now: empty blocks can go */
    return MM_OK;
}

/* End the recording and submit it; the fence signals when it is done. */
static int s_submit(mm_vk *vk) {
    /* Make the shaders' writes visible to the host, which reads results
     * through the mapping once the fence has signalled. */
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_HOST_READ_BIT};
    vkCmdPipelineBarrier(vk->cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                         0, 1, &mb, 0, NULL, 0, NULL);
    VkResult r = vkEndCommandBuffer(vk->cmd);
    vk->recording = 0;
    if (r != VK_SUCCESS) {
        vk->broken = 1;
        return mm_vk_fail(vk, r, "sync", "vkEndCommandBuffer");
    }
    /* Host writes through the coherent mapping before vkQueueSubmit are
     * visible to the device: submission is an implicit host->device
     * dependency, so no barrier is needed for uploads. */
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
                       .commandBufferCount = 1,
                       .pCommandBuffers = &vk->cmd};
    r = vkQueueSubmit(vk->queue, 1, &si, vk->fence);
    if (r != VK_SUCCESS) {
        vk->broken = 1;
        return mm_vk_fail(vk, r, "sync", "vkQueueSubmit");
    }
    vk->inflight = 1;
    return MM_OK;
}

int mm_vk_sync(void *ctx) {
    mm_vk *vk = ctx;
    if (vk->broken)
        return mm_backend_fail(vk->be, MM_EDEVICE,
                               "vulkan: an earlier submission failed; the device is unusable");
    int rc = vk->recording ? s_submit(vk) : MM_OK;
    if (rc == MM_OK && vk->inflight)
        rc = s_wait(vk);
    return rc;
}

/* Submit what is recorded and return without waiting (backend.h flush): the
 * device works while the host does something else (the router waiting for
 * remote experts). The next recording or sync waits for it first. */
int mm_vk_flush(void *ctx) {
    mm_vk *vk = ctx;
    if (vk->broken)
        return mm_backend_fail(vk->be, MM_EDEVICE,
                               "vulkan: an earlier submission failed; the device is unusable");
    return vk->recording ? s_submit(vk) : MM_OK;
}

/* Small uploads in queue order (backend.h write_queued): vkCmdUpdateBuffer
 * between two barriers, so earlier dispatches still read the old bytes and
 * later ones the new. When nothing is recorded, a plain write is cheaper. */
int mm_vk_write_queued(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n) {
    mm_vk *vk = ctx;
    if (!vk->recording) { /* idle (after waiting for a flushed submission) */
        int rc = mm_vk_sync(vk);
        return rc == MM_OK ? mm_vk_write(ctx, root, off, src, n) : rc;
    }
    if (vk->broken)
        return mm_backend_fail(vk->be, MM_EDEVICE,
                               "vulkan: an earlier submission failed; the device is unusable");
    mm_vk_alloc *a = root->impl;
    if (a->zero && !(off == 0 && n >= root->nbytes))
        mm_vk_zero_record(vk, vk->cmd, a);
    a->zero = 0;
    VkMemoryBarrier before = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                              .srcAccessMask =
                                  VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT,
                              .dstAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT};
    vkCmdPipelineBarrier(vk->cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                         VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &before, 0, NULL, 0, NULL);
    vkCmdUpdateBuffer(vk->cmd, vk->blocks[a->block].buf, a->off + off, n, src);
    VkMemoryBarrier after = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                             .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                             .dstAccessMask =
                                 VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT};
    vkCmdPipelineBarrier(vk->cmd, VK_PIPELINE_STAGE_TRANSFER_BIT,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &after, 0, NULL, 0, NULL);
    vk->nacc = 0; /* the barriers order everything recorded so far */
    return MM_OK;
}

/* ---- dispatch ------------------------------------------------------------ */

/* One tensor binding of a dispatch. */
typedef struct s_bind {
    const mm_tensor *t; /* NULL: the dummy buffer                          */
    int write;          /* 1 the shader writes it; 2 writes every element of
                           t without reading it first (no zeroing needed)   */
} s_bind;

/* Zero, before this dispatch, every root that is still unzeroed and that the
 * dispatch may read (any binding but a full overwrite of the whole root);
 * a full overwrite of a whole root just drops the mark. */
static void s_zero_for(mm_vk *vk, const s_bind *binds, int nbinds) {
    for (int i = 0; i < nbinds; i++) {
        const mm_tensor *t = binds[i].t;
        if (!t)
            continue;
        const mm_tensor *root = mm_tensor_root(t);
        mm_vk_alloc *a = root->impl;
        if (a->zero && !(binds[i].write == 2 && t->offset == 0 && t->nbytes == root->nbytes))
            mm_vk_zero_record(vk, vk->cmd, a);
    }
    for (int i = 0; i < nbinds; i++)
        if (binds[i].t)
            ((mm_vk_alloc *)mm_tensor_root(binds[i].t)->impl)->zero = 0;
}

static int s_overlap(const mm_vk_access *a, const mm_vk_access *b) {
    return a->block == b->block && a->lo < b->hi && b->lo < a->hi;
}

/* Element offset of t in its root allocation (what the shaders index from). */
static uint32_t s_eoff(const mm_tensor *t) {
    /* f16/bf16 views index halves, so divide by the element size; row views
     * are always whole elements */
    return (uint32_t)(t->offset / mm_dtype_size(t->dtype));
}

static int s_dispatch(mm_vk *vk, mm_vk_pipe pipe, const s_bind *binds, int nbinds, const void *pc,
                      size_t pcsize, uint32_t gx, uint32_t gy, uint32_t gz) {
    if (vk->broken)
        return mm_backend_fail(vk->be, MM_EDEVICE,
                               "vulkan: an earlier submission failed; the device is unusable");
    if (vk->recording && vk->ndispatch >= MM_VK_MAX_DISPATCH) {
        int rc = mm_vk_sync(vk); /* bound the submission length */
        if (rc != MM_OK)
            return rc;
    }
    int rc = s_begin(vk);
    if (rc != MM_OK)
        return rc;
    s_zero_for(vk, binds, nbinds);

    /* Hazards against what was recorded since the last barrier. */
    mm_vk_access now[MM_VK_BINDINGS];
    int nnow = 0, need = 0;
    for (int i = 0; i < nbinds; i++) {
        if (!binds[i].t)
            continue;
        const mm_vk_alloc *a = mm_tensor_root(binds[i].t)->impl;
        mm_vk_access x = {a->block, a->off + binds[i].t->offset,
                          a->off + binds[i].t->offset + binds[i].t->nbytes, binds[i].write};
        for (unsigned j = 0; j < vk->nacc && !need; j++)
            if ((x.write || vk->acc[j].write) && s_overlap(&x, &vk->acc[j]))
                need = 1;
        now[nnow++] = x;
    }
    if (vk->nacc + (unsigned)nnow > MM_VK_MAX_ACCESS)
        need = 1; /* tracker full: be conservative */
    if (need) {
        /* Read-after-write (and write-after-read/write) between dispatches
         * sharing memory: wait for the earlier shaders and make their
         * writes visible to the later ones. */
        VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                              .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT,
                              .dstAccessMask =
                                  VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT};
        vkCmdPipelineBarrier(vk->cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                             VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
        vk->nacc = 0;
    }
    for (int i = 0; i < nnow; i++)
        vk->acc[vk->nacc++] = now[i];

    VkDescriptorSet set;
    VkDescriptorSetAllocateInfo dsai = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
                                        .descriptorPool = vk->pool,
                                        .descriptorSetCount = 1,
                                        .pSetLayouts = &vk->dsl};
    VkResult r = vkAllocateDescriptorSets(vk->dev, &dsai, &set);
    if (r != VK_SUCCESS)
        return mm_vk_fail(vk, r, "dispatch", "vkAllocateDescriptorSets");
    VkDescriptorBufferInfo bi[MM_VK_BINDINGS];
    VkWriteDescriptorSet w[MM_VK_BINDINGS];
    for (int i = 0; i < MM_VK_BINDINGS; i++) {
        const mm_tensor *t = i < nbinds ? binds[i].t : NULL;
        const mm_vk_alloc *a = t ? mm_tensor_root(t)->impl : &vk->dummy;
        /* the whole root allocation: its offset is aligned, its range at
         * most maxStorageBufferRange (checked: a range over the limit is
         * undefined behaviour that validation layers flag and drivers may
         * clamp) */
        if (a->range > vk->max_range)
            return mm_backend_fail(vk->be, MM_EINVAL,
                                   "vulkan: dispatch: binding %d range %llu bytes exceeds "
                                   "maxStorageBufferRange %llu",
                                   i, (unsigned long long)a->range,
                                   (unsigned long long)vk->max_range);
        bi[i] = (VkDescriptorBufferInfo){vk->blocks[a->block].buf, a->off, a->range};
        w[i] = (VkWriteDescriptorSet){.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET,
                                      .dstSet = set,
                                      .dstBinding = (uint32_t)i,
                                      .descriptorCount = 1,
                                      .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                      .pBufferInfo = &bi[i]};
    }
    vkUpdateDescriptorSets(vk->dev, MM_VK_BINDINGS, w, 0, NULL);
    vkCmdBindPipeline(vk->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vk->pipes[pipe]);
    vkCmdBindDescriptorSets(vk->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vk->layout, 0, 1, &set, 0,
                            NULL);
    vkCmdPushConstants(vk->cmd, vk->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, (uint32_t)pcsize, pc);
    vkCmdDispatch(vk->cmd, gx, gy, gz);
    vk->ndispatch++;
    return MM_OK;
}

/* Split a 1-D grid of n groups over x and y (shaders use mm_group_id()). */
static void s_grid(size_t n, uint32_t *gx, uint32_t *gy) {
    const size_t maxx = 65535; /* the guaranteed minimum of maxComputeWorkGroupCount */
    if (n == 0)
        n = 1;
    *gx = (uint32_t)(n < maxx ? n : maxx);
    *gy = (uint32_t)((n + *gx - 1) / *gx);
}

static size_t s_div_up(size_t a, size_t b) { return (a + b - 1) / b; }
static size_t s_cols(const mm_tensor *t) { return t->shape[t->ndim - 1]; }
static size_t s_rows(const mm_tensor *t) { return t->nelem / s_cols(t); }

#define DISPATCH(pipe, binds, pc, gx, gy, gz)                                                      \
    s_dispatch(vk, pipe, binds, (int)(sizeof binds / sizeof binds[0]), &pc, sizeof pc, gx, gy, gz)

/* ---- ops ----------------------------------------------------------------- */

static int s_matmul(mm_vk *vk, const mm_op *op) {
    const mm_tensor *x = op->src[0], *w = op->src[1], *b = op->src[2];
    struct {
        uint32_t M, N, K, x_off, w_off, b_off, o_off, has_bias;
    } pc = {(uint32_t)s_rows(x), (uint32_t)w->shape[0], (uint32_t)w->shape[1], s_eoff(x),
            s_eoff(w),           b ? s_eoff(b) : 0,     s_eoff(op->dst),       b != NULL};
    s_bind binds[] = {{x, 0}, {w, 0}, {b, 0}, {op->dst, 2}};
    int wt = w->dtype == MM_F16 ? 1 : w->dtype == MM_BF16 ? 2 : 0;
    if (pc.M <= 16) {
        /* gemv: 4 outputs per workgroup (M == 1); gemv16: 2 outputs for
         * all M <= 16 rows, each weight read once */
        int many = pc.M > 1;
        mm_vk_pipe p =
            (mm_vk_pipe)((vk->subgroup ? MM_VK_GEMV_SG_F32 : MM_VK_GEMV_F32) + (many ? 3 : 0) + wt);
        uint32_t gx, gy;
        s_grid(s_div_up(pc.N, many ? 2 : 4), &gx, &gy);
        return DISPATCH(p, binds, pc, gx, gy, 1);
    }
    return DISPATCH((mm_vk_pipe)(MM_VK_MATMUL_F32 + wt), binds, pc, (uint32_t)s_div_up(pc.N, 32),
                    (uint32_t)s_div_up(pc.M, 32), 1);
}

static int s_binary(mm_vk *vk, const mm_op *op, uint32_t kind) {
    const mm_tensor *a = op->src[0], *b = op->src[1];
    struct {
        uint32_t n, cols, a_off, b_off, o_off, op, b_row;
    } pc = {(uint32_t)a->nelem,  (uint32_t)s_cols(a), s_eoff(a), s_eoff(b), s_eoff(op->dst), kind,
            b->nelem != a->nelem};
    s_bind binds[] = {{a, 0}, {b, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid(s_div_up(a->nelem, 256), &gx, &gy);
    return DISPATCH(MM_VK_BINARY, binds, pc, gx, gy, 1);
}

static int s_unary(mm_vk *vk, const mm_op *op, uint32_t kind, float f) {
    const mm_tensor *x = op->src[0];
    struct {
        uint32_t n, x_off, o_off, op;
        float f;
    } pc = {(uint32_t)x->nelem, s_eoff(x), s_eoff(op->dst), kind, f};
    s_bind binds[] = {{x, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid(s_div_up(x->nelem, 256), &gx, &gy);
    return DISPATCH(MM_VK_UNARY, binds, pc, gx, gy, 1);
}

static int s_norm(mm_vk *vk, const mm_op *op, int rms) {
    const mm_tensor *x = op->src[0], *w = op->src[1], *b = rms ? NULL : op->src[2];
    struct {
        uint32_t rows, cols, x_off, w_off, b_off, o_off, flags;
        float eps;
    } pc = {(uint32_t)s_rows(x),
            (uint32_t)s_cols(x),
            s_eoff(x),
            w ? s_eoff(w) : 0,
            b ? s_eoff(b) : 0,
            s_eoff(op->dst),
            (w ? 1u : 0u) | (b ? 2u : 0u) | (rms ? 4u : 0u),
            op->f[0]};
    s_bind binds[] = {{x, 0}, {w, 0}, {b, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid(pc.rows, &gx, &gy);
    return DISPATCH(MM_VK_NORM, binds, pc, gx, gy, 1);
}

static int s_softmax(mm_vk *vk, const mm_op *op) {
    const mm_tensor *x = op->src[0];
    struct {
        uint32_t rows, cols, x_off, o_off;
    } pc = {(uint32_t)s_rows(x), (uint32_t)s_cols(x), s_eoff(x), s_eoff(op->dst)};
    s_bind binds[] = {{x, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid(pc.rows, &gx, &gy);
    return DISPATCH(MM_VK_SOFTMAX, binds, pc, gx, gy, 1);
}

static int s_rope(mm_vk *vk, const mm_op *op) {
    const mm_tensor *x = op->dst, *seq = op->src[0];
    struct {
        uint32_t T, n_heads, head_dim, rot, x_off, s_off;
        float theta;
    } pc = {(uint32_t)s_rows(x),
            (uint32_t)op->i[0],
            (uint32_t)op->i[1],
            (uint32_t)op->i[2],
            s_eoff(x),
            s_eoff(seq),
            op->f[0]};
    s_bind binds[] = {{x, 1}, {seq, 0}};
    uint32_t gx, gy;
    s_grid(s_div_up((size_t)pc.T * pc.n_heads * (pc.rot / 2), 256), &gx, &gy);
    return DISPATCH(MM_VK_ROPE, binds, pc, gx, gy, 1);
}

static int s_kv_store(mm_vk *vk, const mm_op *op) {
    const mm_tensor *c = op->dst, *kv = op->src[0], *seq = op->src[1];
    struct {
        uint32_t T, width, n_slots, max_ctx, c_off, kv_off, s_off;
    } pc = {(uint32_t)kv->shape[0],
            (uint32_t)kv->shape[1],
            (uint32_t)c->shape[0],
            (uint32_t)c->shape[1],
            s_eoff(c),
            s_eoff(kv),
            s_eoff(seq)};
    s_bind binds[] = {{c, 1}, {kv, 0}, {seq, 0}};
    uint32_t gx, gy;
    s_grid(s_div_up(kv->nelem, 256), &gx, &gy);
    return DISPATCH(MM_VK_KV_STORE, binds, pc, gx, gy, 1);
}

static int s_attention(mm_vk *vk, const mm_op *op) {
    const mm_tensor *q = op->src[0], *k = op->src[1], *v = op->src[2], *seq = op->src[3];
    struct {
        uint32_t T, n_heads, n_kv_heads, head_dim, n_slots, max_ctx, q_off, k_off, v_off, s_off,
            o_off;
        float scale;
    } pc = {(uint32_t)q->shape[0],
            (uint32_t)op->i[0],
            (uint32_t)op->i[1],
            (uint32_t)op->i[2],
            (uint32_t)k->shape[0],
            (uint32_t)k->shape[1],
            s_eoff(q),
            s_eoff(k),
            s_eoff(v),
            s_eoff(seq),
            s_eoff(op->dst),
            op->f[0]};
    s_bind binds[] = {{q, 0}, {k, 0}, {v, 0}, {seq, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid((size_t)pc.T * pc.n_heads, &gx, &gy);
    return DISPATCH(MM_VK_ATTENTION, binds, pc, gx, gy, 1);
}

static int s_topk(mm_vk *vk, const mm_op *op) {
    const mm_tensor *x = op->src[0];
    struct {
        uint32_t T, E, k, x_off, i_off, v_off;
    } pc = {(uint32_t)x->shape[0], (uint32_t)x->shape[1], (uint32_t)op->i[0], s_eoff(x),
            s_eoff(op->dst),       s_eoff(op->dst2)};
    s_bind binds[] = {{x, 0}, {op->dst, 2}, {op->dst2, 2}};
    uint32_t gx, gy;
    s_grid(s_div_up(pc.T, 64), &gx, &gy);
    return DISPATCH(MM_VK_TOPK, binds, pc, gx, gy, 1);
}

static int s_get_rows(mm_vk *vk, const mm_op *op) {
    const mm_tensor *src = op->src[0], *idx = op->src[1];
    struct {
        uint32_t n, cols, rows, s_off, i_off, o_off;
    } pc = {(uint32_t)idx->nelem, (uint32_t)src->shape[1], (uint32_t)src->shape[0], s_eoff(src),
            s_eoff(idx),          s_eoff(op->dst)};
    s_bind binds[] = {{src, 0}, {idx, 0}, {op->dst, 2}};
    int st = src->dtype == MM_F16 ? 1 : src->dtype == MM_BF16 ? 2 : 0;
    uint32_t gx, gy;
    s_grid(s_div_up(op->dst->nelem, 256), &gx, &gy);
    return DISPATCH((mm_vk_pipe)(MM_VK_GET_ROWS_F32 + st), binds, pc, gx, gy, 1);
}

static int s_scatter_add(mm_vk *vk, const mm_op *op) {
    const mm_tensor *src = op->src[0], *idx = op->src[1], *w = op->src[2];
    struct {
        uint32_t n, cols, R, d_off, s_off, i_off, w_off, has_w;
    } pc = {(uint32_t)src->shape[0],
            (uint32_t)src->shape[1],
            (uint32_t)op->dst->shape[0],
            s_eoff(op->dst),
            s_eoff(src),
            s_eoff(idx),
            w ? s_eoff(w) : 0,
            w != NULL};
    s_bind binds[] = {{op->dst, 1}, {src, 0}, {idx, 0}, {w, 0}};
    uint32_t gx, gy;
    s_grid(s_div_up(src->nelem, 256), &gx, &gy);
    return DISPATCH(MM_VK_SCATTER_ADD, binds, pc, gx, gy, 1);
}

static int s_im2col(mm_vk *vk, const mm_op *op) {
    const mm_tensor *img = op->src[0];
    struct {
        uint32_t C, H, W, P, i_off, o_off;
    } pc = {(uint32_t)img->shape[0],
            (uint32_t)img->shape[1],
            (uint32_t)img->shape[2],
            (uint32_t)op->i[0],
            s_eoff(img),
            s_eoff(op->dst)};
    s_bind binds[] = {{img, 0}, {op->dst, 2}};
    uint32_t gx, gy;
    s_grid(s_div_up(op->dst->nelem, 256), &gx, &gy);
    return DISPATCH(MM_VK_IM2COL, binds, pc, gx, gy, 1);
}

int mm_vk_supports(void *ctx, const mm_op *op, char *why, size_t len) {
    mm_vk *vk = ctx;
    (void)vk;
    if (op->type == MM_OP_ATTENTION && op->i[2] > 256)
        return mm_errorf(why, len, MM_EUNSUPPORTED,
                         "attention head_dim %d over 256 (shader keeps 4 dims per thread of 64)",
                         op->i[2]);
    if (op->type == MM_OP_MATMUL && op->src[1]->dtype == MM_Q8)
        return mm_errorf(why, len, MM_EUNSUPPORTED, "matmul: q8 weights (cpu backend only)");
    if (op->type == MM_OP_MATMUL && op->src[1]->shape[0] > 65535u * 65535u)
        return mm_errorf(why, len, MM_EUNSUPPORTED, "matmul: too many output columns");
    return MM_OK;
}

int mm_vk_run_op(void *ctx, const mm_op *op) {
    mm_vk *vk = ctx;
    switch (op->type) {
    case MM_OP_MATMUL: return s_matmul(vk, op);
    case MM_OP_ADD: return s_binary(vk, op, 0);
    case MM_OP_MUL: return s_binary(vk, op, 1);
    case MM_OP_SWIGLU: return s_binary(vk, op, 2);
    case MM_OP_SCALE: return s_unary(vk, op, 4, op->f[0]);
    case MM_OP_UNARY: return s_unary(vk, op, (uint32_t)op->i[0], 0.0f);
    case MM_OP_LAYERNORM: return s_norm(vk, op, 0);
    case MM_OP_RMSNORM: return s_norm(vk, op, 1);
    case MM_OP_SOFTMAX: return s_softmax(vk, op);
    case MM_OP_ROPE: return s_rope(vk, op);
    case MM_OP_KV_STORE: return s_kv_store(vk, op);
    case MM_OP_ATTENTION: return s_attention(vk, op);
    case MM_OP_TOPK: return s_topk(vk, op);
    case MM_OP_GET_ROWS: return s_get_rows(vk, op);
    case MM_OP_SCATTER_ADD: return s_scatter_add(vk, op);
    case MM_OP_IM2COL: return s_im2col(vk, op);
    default:
        return mm_backend_fail(vk->be, MM_EUNSUPPORTED, "vulkan: op type %d not implemented",
                               (int)op->type);
    }
}

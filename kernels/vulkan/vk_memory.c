/* vk_memory.c — device memory for tensors: a few large blocks, each with one
 * storage VkBuffer, sub-allocated first-fit from a sorted, coalescing free
 * list; host copies; zeroing of new tensors.
 *
 * Two placements (mm_vk.mapped), chosen once at start-up and reported in
 * describe():
 *  - staging (discrete GPUs): blocks in device-local memory the host cannot
 *    map, so weights, KV cache and activations sit in the GPU's own memory;
 *    uploads and readbacks go through one host-visible staging buffer
 *    (host-cached when the driver offers it, so readbacks are not uncached
 *    reads) and vkCmdCopyBuffer. There is no fallback to system RAM: when
 *    the device-local heap is full, allocation fails and says so.
 *  - mapped (unified memory: lavapipe, integrated GPUs): blocks are
 *    host-visible and persistently mapped; copies are memcpy through the
 *    mapping, since the GPU's memory *is* system RAM and a staging copy
 *    would only double the traffic.
 * MEDMOE_VK_MEMORY=staging|mapped overrides the choice (tests run the staging
 * path on lavapipe this way).
 *
 * Zeroing: a new tensor must read as zeros, but most are fully written by the
 * first op that touches them (matmul outputs, activations). So an allocation
 * only carries a "zero" mark; the first use that may read it (a read binding,
 * a partial write, a host read or partial host write) zeroes it then — on
 * the GPU with vkCmdFillBuffer in staging mode, by memset through the mapping
 * in mapped mode — and a first full overwrite just drops the mark.
 *
 * Why few big blocks: drivers limit the number of allocations
 * (maxMemoryAllocationCount may be 4096) and allocation is slow.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vk_internal.h"

static VkDeviceSize s_round(VkDeviceSize v, VkDeviceSize a) { return (v + a - 1) / a * a; }

static int s_xfer_begin(mm_vk *vk);
static int s_xfer_run(mm_vk *vk, VkAccessFlags dst_access, VkPipelineStageFlags dst_stage);

#define S_STAGE_BYTES ((VkDeviceSize)64 << 20) /* staging buffer: uploads go in chunks of this */

static const char *s_flags_str(VkMemoryPropertyFlags f, char *buf, size_t len) {
    snprintf(buf, len, "%s%s%s%s", f & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT ? "device-local " : "",
             f & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT ? "host-visible " : "",
             f & VK_MEMORY_PROPERTY_HOST_COHERENT_BIT ? "coherent " : "",
             f & VK_MEMORY_PROPERTY_HOST_CACHED_BIT ? "cached " : "");
    size_t n = strlen(buf);
    if (n && buf[n - 1] == ' ')
        buf[n - 1] = 0;
    return buf;
}

/* A memory type allowed by bits having all of `want` and none of `avoid`,
 * on the largest heap; -1 when none. */
static int s_find_type(const VkPhysicalDeviceMemoryProperties *mp, uint32_t bits,
                       VkMemoryPropertyFlags want, VkMemoryPropertyFlags avoid,
                       VkDeviceSize min_heap) {
    int pick = -1;
    for (uint32_t i = 0; i < mp->memoryTypeCount; i++) {
        VkMemoryPropertyFlags f = mp->memoryTypes[i].propertyFlags;
        VkDeviceSize h = mp->memoryHeaps[mp->memoryTypes[i].heapIndex].size;
        if (!(bits & (1u << i)) || (f & want) != want || (f & avoid) || h < min_heap)
            continue;
        if (pick < 0 || h > mp->memoryHeaps[mp->memoryTypes[pick].heapIndex].size)
            pick = (int)i;
    }
    return pick;
}

static int s_stage_init(mm_vk *vk, const VkPhysicalDeviceMemoryProperties *mp, char *err,
                        size_t errlen) {
    VkDeviceSize size = S_STAGE_BYTES < vk->max_alloc ? S_STAGE_BYTES : vk->max_alloc;
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                              .size = size,
                              .usage = VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkResult r = vkCreateBuffer(vk->dev, &bci, NULL, &vk->stage_buf);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateBuffer(staging) failed: %s",
                         mm_vk_result_str(r));
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(vk->dev, vk->stage_buf, &req);
    /* host-cached: readbacks (logits, expert rows) are read by the CPU */
    int t =
        s_find_type(mp, req.memoryTypeBits,
                    VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_CACHED_BIT, 0, 0);
    if (t < 0)
        t = s_find_type(mp, req.memoryTypeBits,
                        VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT,
                        0, 0);
    if (t < 0)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "vulkan: %s has no host-visible memory for a staging buffer",
                         vk->props.deviceName);
    vk->stage_type = (uint32_t)t;
    vk->stage_coherent =
        (mp->memoryTypes[t].propertyFlags & VK_MEMORY_PROPERTY_HOST_COHERENT_BIT) != 0;
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                .allocationSize = req.size,
                                .memoryTypeIndex = vk->stage_type};
    r = vkAllocateMemory(vk->dev, &mai, NULL, &vk->stage_mem);
    if (r == VK_SUCCESS)
        r = vkBindBufferMemory(vk->dev, vk->stage_buf, vk->stage_mem, 0);
    void *map = NULL;
    if (r == VK_SUCCESS)
        r = vkMapMemory(vk->dev, vk->stage_mem, 0, VK_WHOLE_SIZE, 0, &map);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE,
                         "vulkan: allocating the %llu-byte staging buffer failed: %s",
                         (unsigned long long)size, mm_vk_result_str(r));
    vk->stage_map = map;
    vk->stage_size = size;
    VkCommandBufferAllocateInfo cbai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                        .commandPool = vk->cmd_pool,
                                        .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                        .commandBufferCount = 1};
    r = vkAllocateCommandBuffers(vk->dev, &cbai, &vk->xcmd);
    VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    if (r == VK_SUCCESS)
        r = vkCreateFence(vk->dev, &fci, NULL, &vk->xfence);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE,
                         "vulkan: staging command buffer/fence creation failed: %s",
                         mm_vk_result_str(r));
    return MM_OK;
}

int mm_vk_memory_init(mm_vk *vk, char *err, size_t errlen) {
    /* Memory types usable for a storage buffer: ask with a probe buffer. */
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                              .size = 4096,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkBuffer probe;
    VkResult r = vkCreateBuffer(vk->dev, &bci, NULL, &probe);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateBuffer(probe) failed: %s",
                         mm_vk_result_str(r));
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(vk->dev, probe, &req);
    vkDestroyBuffer(vk->dev, probe, NULL);

    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(vk->phys, &mp);
    const VkMemoryPropertyFlags hv =
        VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    const VkMemoryPropertyFlags dl = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
    int unified = vk->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU ||
                  vk->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU;
    const char *force = getenv("MEDMOE_VK_MEMORY");
    if (force && *force && strcmp(force, "mapped") && strcmp(force, "staging"))
        return mm_errorf(err, errlen, MM_EINVAL,
                         "vulkan: MEDMOE_VK_MEMORY='%s': expected 'mapped' or 'staging'", force);
    vk->mapped = force && *force ? strcmp(force, "mapped") == 0 : unified;
    const char *why = force && *force ? "forced by MEDMOE_VK_MEMORY"
                      : unified       ? "unified memory: the GPU's memory is system RAM"
                                      : "discrete GPU";
    int pick = -1;
    if (vk->mapped) {
        /* device-local + host-visible first (lavapipe, integrated GPUs, or a
         * ReBAR heap of at least 1 GiB), else host memory over the bus —
         * only reached when unified or forced, and reported either way */
        pick = s_find_type(&mp, req.memoryTypeBits, hv | dl, 0, 1ull << 30);
        if (pick < 0)
            pick = s_find_type(&mp, req.memoryTypeBits, hv, 0, 0);
        if (pick < 0)
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "vulkan: %s has no host-visible coherent memory for storage buffers "
                             "(unset MEDMOE_VK_MEMORY=mapped)",
                             vk->props.deviceName);
    } else {
        /* the GPU's own memory: prefer a type the host cannot map (the big
         * VRAM heap, not a BAR window), any device-local type otherwise */
        pick = s_find_type(&mp, req.memoryTypeBits, dl, VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT, 0);
        if (pick < 0)
            pick = s_find_type(&mp, req.memoryTypeBits, dl, 0, 0);
        if (pick < 0)
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "vulkan: %s offers no device-local memory for storage buffers (set "
                             "MEDMOE_VK_MEMORY=mapped to run from system RAM over the bus)",
                             vk->props.deviceName);
    }
    vk->mem_type = (uint32_t)pick;
    uint32_t heap_i = mp.memoryTypes[pick].heapIndex;
    VkDeviceSize heap = mp.memoryHeaps[heap_i].size;

    VkPhysicalDeviceMaintenance3Properties m3 = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                      .pNext = &m3};
    vkGetPhysicalDeviceProperties2(vk->phys, &p2);
    vk->max_alloc = m3.maxMemoryAllocationSize ? m3.maxMemoryAllocationSize : heap;
    if (vk->max_alloc > heap)
        vk->max_alloc = heap;
    vk->max_range = vk->props.limits.maxStorageBufferRange;
    vk->align = vk->props.limits.minStorageBufferOffsetAlignment;
    if (vk->align < 16)
        vk->align = 16;
    /* Test hook: pretend to stricter limits (a smaller range, a coarser
     * alignment) so the edge cases of real GPUs run on lavapipe. Stricter
     * values are always legal, so this cannot make the device misbehave. */
    const char *lim = getenv("MEDMOE_VK_TEST_LIMITS");
    if (lim && *lim) {
        unsigned long long range = 0, align = 0;
        if (sscanf(lim, "range=%llu,align=%llu", &range, &align) != 2 || range < 4096 ||
            align < 16 || (align & (align - 1)))
            return mm_errorf(err, errlen, MM_EINVAL,
                             "vulkan: MEDMOE_VK_TEST_LIMITS='%s': expected "
                             "'range=N,align=M' (N >= 4096, M a power of two >= 16)",
                             lim);
        if (range < vk->max_range)
            vk->max_range = range;
        if (align > vk->align)
            vk->align = align;
    }
    char f1[96], f2[96] = "";
    s_flags_str(mp.memoryTypes[pick].propertyFlags, f1, sizeof f1);
    if (!vk->mapped) {
        int rc = s_stage_init(vk, &mp, err, errlen);
        if (rc != MM_OK)
            return rc;
        s_flags_str(mp.memoryTypes[vk->stage_type].propertyFlags, f2, sizeof f2);
    }
    if (vk->mapped)
        snprintf(vk->mem_desc, sizeof vk->mem_desc,
                 "memory: mapped (%s): tensors in type %d [%s] of heap %u (%.1f GiB)", why, pick,
                 f1, heap_i, (double)heap / (1 << 30));
    else
        snprintf(vk->mem_desc, sizeof vk->mem_desc,
                 "memory: staging (%s): tensors in type %d [%s] of heap %u (%.1f GiB), "
                 "%llu MiB staging in type %u [%s]",
                 why, pick, f1, heap_i, (double)heap / (1 << 30),
                 (unsigned long long)(vk->stage_size >> 20), vk->stage_type, f2);
    int rc = mm_vk_alloc_bytes(vk, 16, &vk->dummy);
    if (rc != MM_OK)
        return mm_errorf(err, errlen, rc, "%s", vk->be->error);
    if (vk->mapped) {
        mm_vk_zero_record(vk, VK_NULL_HANDLE, &vk->dummy);
    } else if ((rc = s_xfer_begin(vk)) == MM_OK) {
        mm_vk_zero_record(vk, vk->xcmd, &vk->dummy);
        rc = s_xfer_run(vk, VK_ACCESS_SHADER_READ_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT);
    }
    if (rc != MM_OK)
        return mm_errorf(err, errlen, rc, "%s", vk->be->error);
    return MM_OK;
}

static void s_block_release(mm_vk *vk, mm_vk_block *b) {
    if (b->map)
        vkUnmapMemory(vk->dev, b->mem);
    if (b->buf)
        vkDestroyBuffer(vk->dev, b->buf, NULL);
    if (b->mem)
        vkFreeMemory(vk->dev, b->mem, NULL);
    free(b->free);
    memset(b, 0, sizeof *b);
}

void mm_vk_memory_destroy(mm_vk *vk) {
    for (size_t i = 0; i < vk->nblocks; i++)
        s_block_release(vk, &vk->blocks[i]);
    free(vk->blocks);
    free(vk->limbo);
    vk->limbo = NULL;
    vk->blocks = NULL;
    vk->nblocks = vk->cblocks = 0;
    if (vk->xfence)
        vkDestroyFence(vk->dev, vk->xfence, NULL);
    if (vk->stage_map)
        vkUnmapMemory(vk->dev, vk->stage_mem);
    if (vk->stage_buf)
        vkDestroyBuffer(vk->dev, vk->stage_buf, NULL);
    if (vk->stage_mem)
        vkFreeMemory(vk->dev, vk->stage_mem, NULL);
    vk->xfence = VK_NULL_HANDLE;
    vk->stage_map = NULL;
    vk->stage_buf = VK_NULL_HANDLE;
    vk->stage_mem = VK_NULL_HANDLE;
}

void mm_vk_memory_trim(mm_vk *vk) {
    for (size_t i = 0; i < vk->nlimbo; i++)
        mm_vk_free_bytes(vk, &vk->limbo[i]);
    vk->nlimbo = 0;
    /* Keep block 0 (it holds the dummy); release other empty blocks so a
     * freed model gives its memory back. Callers ensure the device is idle. */
    for (size_t i = 1; i < vk->nblocks; i++)
        if (vk->blocks[i].mem && vk->blocks[i].nallocs == 0)
            s_block_release(vk, &vk->blocks[i]);
}

static int s_block_new(mm_vk *vk, VkDeviceSize size, size_t *index) {
    size_t slot = vk->nblocks;
    for (size_t i = 0; i < vk->nblocks; i++)
        if (!vk->blocks[i].mem) {
            slot = i;
            break;
        }
    if (slot == vk->nblocks && vk->nblocks == vk->cblocks) {
        size_t c = vk->cblocks ? vk->cblocks * 2 : 8;
        mm_vk_block *nb = realloc(vk->blocks, c * sizeof *nb);
        if (!nb)
            return mm_backend_fail(vk->be, MM_ENOMEM, "vulkan: out of host memory");
        vk->blocks = nb;
        vk->cblocks = c;
    }
    mm_vk_block b = {.size = size};
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                              .size = size,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkResult r = vkCreateBuffer(vk->dev, &bci, NULL, &b.buf);
    if (r != VK_SUCCESS)
        return mm_vk_fail(vk, r, "memory block", "vkCreateBuffer");
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(vk->dev, b.buf, &req);
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                .allocationSize = req.size,
                                .memoryTypeIndex = vk->mem_type};
    r = vkAllocateMemory(vk->dev, &mai, NULL, &b.mem);
    if (r == VK_SUCCESS)
        r = vkBindBufferMemory(vk->dev, b.buf, b.mem, 0);
    void *map = NULL;
    if (r == VK_SUCCESS && vk->mapped)
        r = vkMapMemory(vk->dev, b.mem, 0, VK_WHOLE_SIZE, 0, &map);
    b.map = map;
    b.free = malloc(8 * sizeof *b.free);
    if (r != VK_SUCCESS || !b.free) {
        int st = !b.free ? mm_backend_fail(vk->be, MM_ENOMEM, "vulkan: out of host memory")
                         : mm_backend_fail(vk->be,
                                           r == VK_ERROR_OUT_OF_DEVICE_MEMORY ||
                                                   r == VK_ERROR_OUT_OF_HOST_MEMORY
                                               ? MM_ENOMEM
                                               : MM_EDEVICE,
                                           "vulkan: allocating a %llu-byte memory block in "
                                           "memory type %u failed: %s (%s)",
                                           (unsigned long long)size, vk->mem_type,
                                           mm_vk_result_str(r), vk->mem_desc);
        if (r != VK_SUCCESS)
            b.map = NULL; /* not mapped */
        s_block_release(vk, &b);
        return st;
    }
    b.cfree = 8;
    b.nfree = 1;
    b.free[0] = (mm_vk_range){0, size};
    vk->blocks[slot] = b;
    if (slot == vk->nblocks)
        vk->nblocks++;
    *index = slot;
    return MM_OK;
}

/* First fit in block b; 1 when placed. */
static int s_block_take(mm_vk_block *b, VkDeviceSize size, VkDeviceSize *off) {
    for (size_t i = 0; i < b->nfree; i++) {
        if (b->free[i].size < size)
            continue;
        *off = b->free[i].off;
        b->free[i].off += size;
        b->free[i].size -= size;
        if (b->free[i].size == 0) {
            memmove(&b->free[i], &b->free[i + 1], (b->nfree - i - 1) * sizeof b->free[0]);
            b->nfree--;
        }
        b->nallocs++;
        return 1;
    }
    return 0;
}

int mm_vk_alloc_bytes(mm_vk *vk, VkDeviceSize size, mm_vk_alloc *out) {
    /* Sizes and offsets stay multiples of the alignment so every root
     * allocation can be bound at its own offset. */
    VkDeviceSize want = size ? size : 1;
    size = s_round(want, vk->align);
    /* The descriptor range: the reserved size, but never above the device's
     * limit (a tensor of exactly maxStorageBufferRange bytes is reserved
     * rounded up to the alignment, past the limit). */
    VkDeviceSize range = size < vk->max_range ? size : s_round(want, 4);
    for (size_t i = 0; i < vk->nblocks; i++) {
        VkDeviceSize off;
        if (vk->blocks[i].mem && s_block_take(&vk->blocks[i], size, &off)) {
            *out = (mm_vk_alloc){i, off, size, range, 1};
            return MM_OK;
        }
    }
    VkDeviceSize bsize = size > MM_VK_BLOCK_BYTES ? size : MM_VK_BLOCK_BYTES;
    if (bsize > vk->max_alloc)
        bsize = size; /* a device with small allocations: one per tensor */
    size_t bi;
    int rc = s_block_new(vk, bsize, &bi);
    if (rc == MM_ENOMEM && bsize > size) /* the heap is short: try an exact fit */
        rc = s_block_new(vk, size, &bi);
    if (rc != MM_OK)
        return rc;
    VkDeviceSize off;
    s_block_take(&vk->blocks[bi], size, &off);
    *out = (mm_vk_alloc){bi, off, size, range, 1};
    return MM_OK;
}

void mm_vk_free_bytes(mm_vk *vk, const mm_vk_alloc *a) {
    mm_vk_block *b = &vk->blocks[a->block];
    size_t i = 0;
    while (i < b->nfree && b->free[i].off < a->off)
        i++;
    int merge_prev = i > 0 && b->free[i - 1].off + b->free[i - 1].size == a->off;
    int merge_next = i < b->nfree && a->off + a->size == b->free[i].off;
    if (merge_prev && merge_next) {
        b->free[i - 1].size += a->size + b->free[i].size;
        memmove(&b->free[i], &b->free[i + 1], (b->nfree - i - 1) * sizeof b->free[0]);
        b->nfree--;
    } else if (merge_prev) {
        b->free[i - 1].size += a->size;
    } else if (merge_next) {
        b->free[i].off = a->off;
        b->free[i].size += a->size;
    } else {
        if (b->nfree == b->cfree) {
            mm_vk_range *nf = realloc(b->free, 2 * b->cfree * sizeof *nf);
            if (!nf) /* cannot record it: leak the range rather than corrupt the list */
                goto done;
            b->free = nf;
            b->cfree *= 2;
        }
        memmove(&b->free[i + 1], &b->free[i], (b->nfree - i) * sizeof b->free[0]);
        b->free[i] = (mm_vk_range){a->off, a->size};
        b->nfree++;
    }
done:
    b->nallocs--;
}

int mm_vk_tensor_alloc(void *ctx, mm_tensor *t) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = malloc(sizeof *a);
    if (!a)
        return mm_backend_fail(vk->be, MM_ENOMEM, "vulkan: out of host memory");
    int rc = mm_vk_alloc_bytes(vk, t->nbytes, a);
    if (rc != MM_OK) {
        free(a);
        return rc;
    }
    t->impl = a;
    /* host-visible only in mapped mode; zeroed at first use (a->zero) */
    t->data = vk->mapped ? vk->blocks[a->block].map + a->off : NULL;
    return MM_OK;
}

void mm_vk_tensor_free(void *ctx, mm_tensor *t) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = t->impl;
    if (!a)
        return;
    /* Recorded but unsubmitted dispatches may still use the range: keep it
     * out of reach until the next sync, so no new tensor (zeroed and written
     * by the host at once) can overlap pending work. */
    if (vk->recording || vk->inflight) {
        if (vk->nlimbo == vk->climbo) {
            size_t c = vk->climbo ? 2 * vk->climbo : 64;
            mm_vk_alloc *nl = realloc(vk->limbo, c * sizeof *nl);
            if (!nl) { /* cannot defer: leak the range rather than risk reuse */
                free(a);
                t->impl = NULL;
                t->data = NULL;
                return;
            }
            vk->limbo = nl;
            vk->climbo = c;
        }
        vk->limbo[vk->nlimbo++] = *a;
    } else {
        mm_vk_free_bytes(vk, a);
    }
    free(a);
    t->impl = NULL;
    t->data = NULL;
}

/* ---- staging transfers (the queue is idle: the front end syncs first) --- */

static int s_xfer_begin(mm_vk *vk) {
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    VkResult r = vkBeginCommandBuffer(vk->xcmd, &bi);
    if (r != VK_SUCCESS)
        return mm_vk_fail(vk, r, "staging copy", "vkBeginCommandBuffer");
    /* earlier submissions' shader writes -> this copy */
    VkMemoryBarrier mb = {
        .sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
        .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
        .dstAccessMask = VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT};
    vkCmdPipelineBarrier(vk->xcmd,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                         VK_PIPELINE_STAGE_TRANSFER_BIT, 0, 1, &mb, 0, NULL, 0, NULL);
    return MM_OK;
}

/* End, submit, wait (bounded), reset. dst_access/stage: who consumes the copy. */
static int s_xfer_run(mm_vk *vk, VkAccessFlags dst_access, VkPipelineStageFlags dst_stage) {
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                          .dstAccessMask = dst_access};
    vkCmdPipelineBarrier(vk->xcmd, VK_PIPELINE_STAGE_TRANSFER_BIT, dst_stage, 0, 1, &mb, 0, NULL, 0,
                         NULL);
    VkResult r = vkEndCommandBuffer(vk->xcmd);
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
                       .commandBufferCount = 1,
                       .pCommandBuffers = &vk->xcmd};
    if (r == VK_SUCCESS)
        r = vkQueueSubmit(vk->queue, 1, &si, vk->xfence);
    if (r == VK_SUCCESS)
        r = vkWaitForFences(vk->dev, 1, &vk->xfence, VK_TRUE, vk->fence_timeout_ns);
    if (r == VK_SUCCESS)
        r = vkResetFences(vk->dev, 1, &vk->xfence);
    if (r == VK_SUCCESS)
        r = vkResetCommandBuffer(vk->xcmd, 0);
    if (r != VK_SUCCESS) {
        vk->broken = 1;
        return mm_vk_fail(vk, r, "staging copy", "submit/wait");
    }
    return MM_OK;
}

/* Zero a's range now: memset when mapped, else vkCmdFillBuffer recorded into
 * cmd (a transfer, made visible to later shaders by a barrier). */
void mm_vk_zero_record(mm_vk *vk, VkCommandBuffer cmd, mm_vk_alloc *a) {
    a->zero = 0;
    mm_vk_block *b = &vk->blocks[a->block];
    if (vk->mapped) {
        memset(b->map + a->off, 0, a->size);
        return;
    }
    vkCmdFillBuffer(cmd, b->buf, a->off, a->size, 0);
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                                           VK_ACCESS_TRANSFER_WRITE_BIT};
    vkCmdPipelineBarrier(cmd, VK_PIPELINE_STAGE_TRANSFER_BIT,
                         VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, 0,
                         1, &mb, 0, NULL, 0, NULL);
}

int mm_vk_write(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = root->impl;
    int whole = off == 0 && n >= root->nbytes;
    if (vk->mapped) {
        /* coherent memory, and the queue is idle (ops.c syncs first) */
        if (a->zero && !whole)
            memset(vk->blocks[a->block].map + a->off, 0, a->size);
        a->zero = 0;
        memcpy(vk->blocks[a->block].map + a->off + off, src, n);
        return MM_OK;
    }
    mm_vk_block *b = &vk->blocks[a->block];
    int first = 1;
    for (size_t done = 0; done < n || first;) {
        size_t chunk = n - done < vk->stage_size ? n - done : (size_t)vk->stage_size;
        memcpy(vk->stage_map, (const char *)src + done, chunk);
        if (!vk->stage_coherent) {
            VkMappedMemoryRange mr = {.sType = VK_STRUCTURE_TYPE_MAPPED_MEMORY_RANGE,
                                      .memory = vk->stage_mem,
                                      .offset = 0,
                                      .size = VK_WHOLE_SIZE};
            vkFlushMappedMemoryRanges(vk->dev, 1, &mr);
        }
        int rc = s_xfer_begin(vk);
        if (rc != MM_OK)
            return rc;
        if (first && a->zero && !whole)
            mm_vk_zero_record(vk, vk->xcmd, a);
        a->zero = 0;
        first = 0;
        if (chunk) {
            VkBufferCopy c = {0, a->off + off + done, chunk};
            vkCmdCopyBuffer(vk->xcmd, vk->stage_buf, b->buf, 1, &c);
        }
        rc = s_xfer_run(vk, VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT,
                        VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT);
        if (rc != MM_OK)
            return rc;
        done += chunk;
    }
    return MM_OK;
}

int mm_vk_read(void *ctx, mm_tensor *root, size_t off, void *dst, size_t n) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = root->impl;
    if (a->zero) { /* never written: reads as zeros without touching the GPU */
        memset(dst, 0, n);
        return MM_OK;
    }
    if (vk->mapped) {
        memcpy(dst, vk->blocks[a->block].map + a->off + off, n);
        return MM_OK;
    }
    mm_vk_block *b = &vk->blocks[a->block];
    for (size_t done = 0; done < n;) {
        size_t chunk = n - done < vk->stage_size ? n - done : (size_t)vk->stage_size;
        int rc = s_xfer_begin(vk);
        if (rc != MM_OK)
            return rc;
        VkBufferCopy c = {a->off + off + done, 0, chunk};
        vkCmdCopyBuffer(vk->xcmd, b->buf, vk->stage_buf, 1, &c);
        rc = s_xfer_run(vk, VK_ACCESS_HOST_READ_BIT, VK_PIPELINE_STAGE_HOST_BIT);
        if (rc != MM_OK)
            return rc;
        if (!vk->stage_coherent) {
            VkMappedMemoryRange mr = {.sType = VK_STRUCTURE_TYPE_MAPPED_MEMORY_RANGE,
                                      .memory = vk->stage_mem,
                                      .offset = 0,
                                      .size = VK_WHOLE_SIZE};
            vkInvalidateMappedMemoryRanges(vk->dev, 1, &mr);
        }
        memcpy((char *)dst + done, vk->stage_map, chunk);
        done += chunk;
    }
    return MM_OK;
}

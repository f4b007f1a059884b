/* vk_memory.c — device memory for tensors: a few large host-visible blocks,
 * each with one storage VkBuffer and a persistent mapping, sub-allocated
 * first-fit from a sorted, coalescing free list.
 *
 * Why host-visible: weights and activations are written and read with
 * memcpy through the mapping (no staging copies); on lavapipe and on
 * integrated GPUs all memory is host-visible anyway. Why few big blocks:
 * drivers limit the number of allocations (maxMemoryAllocationCount may be
 * 4096) and allocation is slow.
 */
#include <stdlib.h>
#include <string.h>

#include "vk_internal.h"

static VkDeviceSize s_round(VkDeviceSize v, VkDeviceSize a) { return (v + a - 1) / a * a; }

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
    /* Prefer device-local + host-visible (lavapipe, integrated GPUs, ReBAR),
     * else plain host memory the device reads over the bus. */
    int pick = -1;
    for (int pass = 0; pass < 2 && pick < 0; pass++) {
        VkMemoryPropertyFlags want = hv | (pass == 0 ? VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT : 0);
        for (uint32_t i = 0; i < mp.memoryTypeCount && pick < 0; i++) {
            if (!(req.memoryTypeBits & (1u << i)) ||
                (mp.memoryTypes[i].propertyFlags & want) != want)
                continue;
            /* a small BAR heap (256 MiB on GPUs without ReBAR) is too small for weights */
            if (pass == 0 && mp.memoryHeaps[mp.memoryTypes[i].heapIndex].size < (1ull << 30))
                continue;
            pick = (int)i;
        }
    }
    if (pick < 0)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "vulkan: %s has no host-visible coherent memory for storage buffers",
                         vk->props.deviceName);
    vk->mem_type = (uint32_t)pick;
    VkDeviceSize heap = mp.memoryHeaps[mp.memoryTypes[pick].heapIndex].size;

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
    int rc = mm_vk_alloc_bytes(vk, 16, &vk->dummy);
    if (rc != MM_OK)
        return mm_errorf(err, errlen, rc, "%s", vk->be->error);
    memset(vk->blocks[vk->dummy.block].map + vk->dummy.off, 0, 16);
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
    if (r == VK_SUCCESS)
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
                                           "vulkan: allocating a %llu-byte memory block "
                                           "failed: %s",
                                           (unsigned long long)size, mm_vk_result_str(r));
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
    size = s_round(size ? size : 1, vk->align);
    for (size_t i = 0; i < vk->nblocks; i++) {
        VkDeviceSize off;
        if (vk->blocks[i].mem && s_block_take(&vk->blocks[i], size, &off)) {
            *out = (mm_vk_alloc){i, off, size};
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
    *out = (mm_vk_alloc){bi, off, size};
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
    t->data = vk->blocks[a->block].map + a->off;
    /* New tensors read as zeros (as on cpu). The range is not used by any
     * pending dispatch (see limbo), so the host may write it now. */
    memset(t->data, 0, t->nbytes);
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
    if (vk->recording) {
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

int mm_vk_write(void *ctx, mm_tensor *root, size_t off, const void *src, size_t n) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = root->impl;
    /* coherent memory, and the queue is idle (ops.c syncs first) */
    memcpy(vk->blocks[a->block].map + a->off + off, src, n);
    return MM_OK;
}

int mm_vk_read(void *ctx, mm_tensor *root, size_t off, void *dst, size_t n) {
    mm_vk *vk = ctx;
    mm_vk_alloc *a = root->impl;
    memcpy(dst, vk->blocks[a->block].map + a->off + off, n);
    return MM_OK;
}

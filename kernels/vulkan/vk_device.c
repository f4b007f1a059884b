/* vk_device.c — the Vulkan backend's instance, device, pipelines and the
 * mm_backend_ops table: one linear walk from vkCreateInstance to a ready
 * backend, each step returning a status with the failing call named.
 *
 * Device choice: MEDMOE_VK_DEVICE (an index, or a substring of the device
 * name) when set, else the first discrete GPU, then integrated, virtual,
 * and CPU (lavapipe) devices.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vk_internal.h"
#include "vk_spirv.h"

/* Variant names of kernels/vulkan/CMakeLists.txt, in mm_vk_pipe order. */
static const char *const s_pipe_names[MM_VK_PIPE_COUNT] = {
    [MM_VK_MATMUL_F32] = "matmul_f32",
    [MM_VK_MATMUL_F16] = "matmul_f16",
    [MM_VK_MATMUL_BF16] = "matmul_bf16",
    [MM_VK_GEMV_F32] = "gemv_f32",
    [MM_VK_GEMV_F16] = "gemv_f16",
    [MM_VK_GEMV_BF16] = "gemv_bf16",
    [MM_VK_GET_ROWS_F32] = "get_rows_f32",
    [MM_VK_GET_ROWS_F16] = "get_rows_f16",
    [MM_VK_GET_ROWS_BF16] = "get_rows_bf16",
    [MM_VK_BINARY] = "binary",
    [MM_VK_UNARY] = "unary",
    [MM_VK_NORM] = "norm",
    [MM_VK_SOFTMAX] = "softmax",
    [MM_VK_ROPE] = "rope",
    [MM_VK_KV_STORE] = "kv_store",
    [MM_VK_ATTENTION] = "attention",
    [MM_VK_TOPK] = "topk",
    [MM_VK_SCATTER_ADD] = "scatter_add",
    [MM_VK_IM2COL] = "im2col",
};

const char *mm_vk_result_str(VkResult r) {
    switch (r) {
#define R(x)                                                                                       \
    case x: return #x;
        R(VK_SUCCESS)
        R(VK_NOT_READY)
        R(VK_TIMEOUT)
        R(VK_INCOMPLETE)
        R(VK_ERROR_OUT_OF_HOST_MEMORY)
        R(VK_ERROR_OUT_OF_DEVICE_MEMORY)
        R(VK_ERROR_INITIALIZATION_FAILED)
        R(VK_ERROR_DEVICE_LOST)
        R(VK_ERROR_MEMORY_MAP_FAILED)
        R(VK_ERROR_LAYER_NOT_PRESENT)
        R(VK_ERROR_EXTENSION_NOT_PRESENT)
        R(VK_ERROR_FEATURE_NOT_PRESENT)
        R(VK_ERROR_INCOMPATIBLE_DRIVER)
        R(VK_ERROR_TOO_MANY_OBJECTS)
        R(VK_ERROR_FORMAT_NOT_SUPPORTED)
        R(VK_ERROR_FRAGMENTED_POOL)
        R(VK_ERROR_OUT_OF_POOL_MEMORY)
        R(VK_ERROR_INVALID_SHADER_NV)
#undef R
    default: return "VK_ERROR_(unknown)";
    }
}

int mm_vk_fail(mm_vk *vk, VkResult r, const char *what, const char *call) {
    return mm_backend_fail(vk->be, MM_EDEVICE, "vulkan: %s: %s failed: %s (%d)", what, call,
                           mm_vk_result_str(r), (int)r);
}

/* ---- device selection ---------------------------------------------------- */

static const char *s_type_name(VkPhysicalDeviceType t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete";
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "cpu";
    default: return "other";
    }
}

/* Lower is preferred. */
static int s_type_rank(VkPhysicalDeviceType t) {
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 0;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 1;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 3;
    default: return 4;
    }
}

/* A queue family with compute, or -1. */
static int s_compute_family(VkPhysicalDevice pd) {
    uint32_t n = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, NULL);
    VkQueueFamilyProperties q[32];
    if (n > 32)
        n = 32;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, q);
    /* prefer a compute family without graphics (a dedicated compute queue) */
    for (uint32_t i = 0; i < n; i++)
        if ((q[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && !(q[i].queueFlags & VK_QUEUE_GRAPHICS_BIT))
            return (int)i;
    for (uint32_t i = 0; i < n; i++)
        if (q[i].queueFlags & VK_QUEUE_COMPUTE_BIT)
            return (int)i;
    return -1;
}

static int s_pick_device(mm_vk *vk, char *err, size_t errlen) {
    uint32_t n = 0;
    VkResult r = vkEnumeratePhysicalDevices(vk->inst, &n, NULL);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkEnumeratePhysicalDevices failed: %s",
                         mm_vk_result_str(r));
    if (n == 0)
        return mm_errorf(err, errlen, MM_EDEVICE,
                         "vulkan: no Vulkan device found (no GPU driver; for CPU-only "
                         "machines install mesa-vulkan-drivers for lavapipe)");
    VkPhysicalDevice pds[16];
    if (n > 16)
        n = 16;
    r = vkEnumeratePhysicalDevices(vk->inst, &n, pds);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkEnumeratePhysicalDevices failed: %s",
                         mm_vk_result_str(r));
    VkPhysicalDeviceProperties props[16];
    char list[512] = "";
    size_t ln = 0;
    for (uint32_t i = 0; i < n; i++) {
        vkGetPhysicalDeviceProperties(pds[i], &props[i]);
        if (ln < sizeof list)
            ln += (size_t)snprintf(list + ln, sizeof list - ln, "%s%u: %s [%s]", i ? "; " : "", i,
                                   props[i].deviceName, s_type_name(props[i].deviceType));
    }
    int pick = -1;
    const char *want = getenv("MEDMOE_VK_DEVICE");
    if (want && *want) {
        int digits = 1;
        for (const char *p = want; *p; p++)
            digits &= isdigit((unsigned char)*p) != 0;
        if (digits) {
            long i = strtol(want, NULL, 10);
            if (i >= 0 && i < (long)n)
                pick = (int)i;
        } else {
            for (uint32_t i = 0; i < n && pick < 0; i++)
                if (strcasestr(props[i].deviceName, want))
                    pick = (int)i;
        }
        if (pick < 0)
            return mm_errorf(err, errlen, MM_ENOTFOUND,
                             "vulkan: MEDMOE_VK_DEVICE='%s' names no device (have: %s)", want,
                             list);
        if (s_compute_family(pds[pick]) < 0)
            return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: device %d (%s) has no compute queue",
                             pick, props[pick].deviceName);
    } else {
        for (uint32_t i = 0; i < n; i++) {
            if (props[i].apiVersion < VK_API_VERSION_1_1 || s_compute_family(pds[i]) < 0)
                continue;
            if (pick < 0 || s_type_rank(props[i].deviceType) < s_type_rank(props[pick].deviceType))
                pick = (int)i;
        }
        if (pick < 0)
            return mm_errorf(err, errlen, MM_EDEVICE,
                             "vulkan: no device with Vulkan 1.1 and a compute queue (have: %s)",
                             list);
    }
    vk->phys = pds[pick];
    vk->props = props[pick];
    vk->qfam = (uint32_t)s_compute_family(pds[pick]);
    return MM_OK;
}

static void s_describe(mm_vk *vk) {
    char driver[256] = "";
    if (vk->props.apiVersion >= VK_API_VERSION_1_2) {
        VkPhysicalDeviceDriverProperties dp = {
            .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
        VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                          .pNext = &dp};
        vkGetPhysicalDeviceProperties2(vk->phys, &p2);
        /* Mesa's driverInfo is "Mesa 22.3.6 (LLVM 15.0.6)": keep the part
         * before " (" since the device name already names LLVM. */
        snprintf(driver, sizeof driver, "%s", dp.driverInfo[0] ? dp.driverInfo : dp.driverName);
        char *paren = strstr(driver, " (");
        if (paren)
            *paren = 0;
    }
    if (!driver[0]) {
        uint32_t v = vk->props.driverVersion;
        snprintf(driver, sizeof driver, "driver %u.%u.%u", VK_API_VERSION_MAJOR(v),
                 VK_API_VERSION_MINOR(v), VK_API_VERSION_PATCH(v));
    }
    snprintf(vk->desc, sizeof vk->desc, "vulkan: %s [%s], %s", vk->props.deviceName,
             s_type_name(vk->props.deviceType), driver);
}

/* ---- pipelines ----------------------------------------------------------- */

static int s_create_pipelines(mm_vk *vk, char *err, size_t errlen) {
    VkDescriptorSetLayoutBinding b[MM_VK_BINDINGS];
    for (uint32_t i = 0; i < MM_VK_BINDINGS; i++)
        b[i] = (VkDescriptorSetLayoutBinding){.binding = i,
                                              .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                              .descriptorCount = 1,
                                              .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT};
    VkDescriptorSetLayoutCreateInfo dci = {.sType =
                                               VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                           .bindingCount = MM_VK_BINDINGS,
                                           .pBindings = b};
    VkResult r = vkCreateDescriptorSetLayout(vk->dev, &dci, NULL, &vk->dsl);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateDescriptorSetLayout failed: %s",
                         mm_vk_result_str(r));
    VkPushConstantRange pcr = {
        .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = MM_VK_PUSH_BYTES};
    VkPipelineLayoutCreateInfo plci = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                       .setLayoutCount = 1,
                                       .pSetLayouts = &vk->dsl,
                                       .pushConstantRangeCount = 1,
                                       .pPushConstantRanges = &pcr};
    r = vkCreatePipelineLayout(vk->dev, &plci, NULL, &vk->layout);
    if (r != VK_SUCCESS)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreatePipelineLayout failed: %s",
                         mm_vk_result_str(r));
    for (int p = 0; p < MM_VK_PIPE_COUNT; p++) {
        const mm_vk_spirv *sp = NULL;
        for (size_t i = 0; i < mm_vk_spirv_count; i++)
            if (strcmp(mm_vk_spirv_table[i].name, s_pipe_names[p]) == 0)
                sp = &mm_vk_spirv_table[i];
        if (!sp) /* the CMake variant list and s_pipe_names disagree */
            return mm_errorf(err, errlen, MM_ERR, "vulkan: shader variant '%s' is not embedded",
                             s_pipe_names[p]);
        VkShaderModuleCreateInfo smci = {.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                         .codeSize = sp->size,
                                         .pCode = sp->code};
        VkShaderModule mod;
        r = vkCreateShaderModule(vk->dev, &smci, NULL, &mod);
        if (r != VK_SUCCESS)
            return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateShaderModule(%s) failed: %s",
                             sp->name, mm_vk_result_str(r));
        VkComputePipelineCreateInfo cpci = {
            .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
            .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                      .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                      .module = mod,
                      .pName = "main"},
            .layout = vk->layout};
        r = vkCreateComputePipelines(vk->dev, VK_NULL_HANDLE, 1, &cpci, NULL, &vk->pipes[p]);
        vkDestroyShaderModule(vk->dev, mod, NULL);
        if (r != VK_SUCCESS)
            return mm_errorf(err, errlen, MM_EDEVICE,
                             "vulkan: vkCreateComputePipelines(%s) failed: %s", sp->name,
                             mm_vk_result_str(r));
    }
    return MM_OK;
}

/* ---- the ops table ------------------------------------------------------- */

static void s_destroy(void *ctx) {
    mm_vk *vk = ctx;
    if (!vk)
        return;
    if (vk->dev) {
        /* pending work must finish before its buffers go away */
        vkDeviceWaitIdle(vk->dev);
        if (vk->fence)
            vkDestroyFence(vk->dev, vk->fence, NULL);
        if (vk->cmd_pool)
            vkDestroyCommandPool(vk->dev, vk->cmd_pool, NULL);
        if (vk->pool)
            vkDestroyDescriptorPool(vk->dev, vk->pool, NULL);
        for (int p = 0; p < MM_VK_PIPE_COUNT; p++)
            if (vk->pipes[p])
                vkDestroyPipeline(vk->dev, vk->pipes[p], NULL);
        if (vk->layout)
            vkDestroyPipelineLayout(vk->dev, vk->layout, NULL);
        if (vk->dsl)
            vkDestroyDescriptorSetLayout(vk->dev, vk->dsl, NULL);
        mm_vk_memory_destroy(vk);
        vkDestroyDevice(vk->dev, NULL);
    }
    if (vk->inst)
        vkDestroyInstance(vk->inst, NULL);
    free(vk);
}

static const char *s_describe_cb(void *ctx) { return ((mm_vk *)ctx)->desc; }

/* f16 and bf16 weights are read packed in uints by the shaders. */
/* f32, f16, bf16 as stored; no shader takes q8 (int8 weights are cpu-only). */
static mm_dtype s_weight_dtype(void *ctx, mm_dtype t) { return t == MM_Q8 ? MM_F32 : t; }

static size_t s_max_tensor_bytes(void *ctx) {
    mm_vk *vk = ctx;
    VkDeviceSize m = vk->max_range < vk->max_alloc ? vk->max_range : vk->max_alloc;
    m &= ~(VkDeviceSize)15; /* allocations are rounded up to 16 bytes */
    return m > SIZE_MAX ? SIZE_MAX : (size_t)m;
}

static const mm_backend_ops s_ops = {
    .name = "vulkan",
    .destroy = s_destroy,
    .describe = s_describe_cb,
    .weight_dtype = s_weight_dtype,
    .max_tensor_bytes = s_max_tensor_bytes,
    .tensor_alloc = mm_vk_tensor_alloc,
    .tensor_free = mm_vk_tensor_free,
    .write = mm_vk_write,
    .read = mm_vk_read,
    .sync = mm_vk_sync,
    .run_op = mm_vk_run_op,
    .supports = mm_vk_supports,
};

int mm_vulkan_backend_new(mm_backend **out, char *err, size_t errlen) {
    *out = NULL;
    mm_backend *be = calloc(1, sizeof *be);
    mm_vk *vk = calloc(1, sizeof *vk);
    if (!be || !vk) {
        free(be);
        free(vk);
        return mm_errorf(err, errlen, MM_ENOMEM, "vulkan: out of host memory");
    }
    be->ops = &s_ops;
    be->ctx = vk;
    vk->be = be;

    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                             .pApplicationName = "medmoe",
                             .pEngineName = "medmoe",
                             .apiVersion = VK_API_VERSION_1_2};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
                                .pApplicationInfo = &app};
    VkResult r = vkCreateInstance(&ici, NULL, &vk->inst);
    int rc = MM_OK;
    if (r != VK_SUCCESS) {
        vk->inst = VK_NULL_HANDLE;
        rc = mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateInstance failed: %s%s",
                       mm_vk_result_str(r),
                       r == VK_ERROR_INCOMPATIBLE_DRIVER
                           ? " (no Vulkan driver/ICD installed: install mesa-vulkan-drivers "
                             "for lavapipe, or a GPU driver)"
                           : "");
    }
    if (rc == MM_OK)
        rc = s_pick_device(vk, err, errlen);
    if (rc == MM_OK) {
        float prio = 1.0f;
        VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                       .queueFamilyIndex = vk->qfam,
                                       .queueCount = 1,
                                       .pQueuePriorities = &prio};
        VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                                  .queueCreateInfoCount = 1,
                                  .pQueueCreateInfos = &qci};
        r = vkCreateDevice(vk->phys, &dci, NULL, &vk->dev);
        if (r != VK_SUCCESS) {
            vk->dev = VK_NULL_HANDLE;
            rc = mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkCreateDevice(%s) failed: %s",
                           vk->props.deviceName, mm_vk_result_str(r));
        } else {
            vkGetDeviceQueue(vk->dev, vk->qfam, 0, &vk->queue);
        }
    }
    if (rc == MM_OK) {
        s_describe(vk);
        rc = mm_vk_memory_init(vk, err, errlen);
    }
    if (rc == MM_OK)
        rc = s_create_pipelines(vk, err, errlen);
    if (rc == MM_OK)
        rc = mm_vk_exec_init(vk, err, errlen);
    if (rc != MM_OK) {
        s_destroy(vk);
        free(be);
        return rc;
    }
    *out = be;
    return MM_OK;
}

/* vk_device.c — the Vulkan backend's instance, device, pipelines and the
 * mm_backend_ops table: one linear walk from vkCreateInstance to a ready
 * backend, each step returning a status with the failing call named.
 *
 * Device choice: MEDMOE_VK_DEVICE when set — an index, a UUID (as
 * nvidia-smi -L prints it, "GPU-..."), a PCI bus id ("0000:3b:00.0"), or a
 * substring of the name (s_select) — else the first discrete GPU, then
 * integrated, virtual, and CPU (lavapipe) devices. The choice, the rule that
 * made it, and the memory in use are in describe(), which every program logs
 * at start-up. A selector naming nothing is an error listing every device:
 * a process pinned to a GPU never silently runs on another.
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
    [MM_VK_GEMV16_F32] = "gemv16_f32",
    [MM_VK_GEMV16_F16] = "gemv16_f16",
    [MM_VK_GEMV16_BF16] = "gemv16_bf16",
    [MM_VK_GEMV_SG_F32] = "gemv_sg_f32",
    [MM_VK_GEMV_SG_F16] = "gemv_sg_f16",
    [MM_VK_GEMV_SG_BF16] = "gemv_sg_bf16",
    [MM_VK_GEMV16_SG_F32] = "gemv16_sg_f32",
    [MM_VK_GEMV16_SG_F16] = "gemv16_sg_f16",
    [MM_VK_GEMV16_SG_BF16] = "gemv16_sg_bf16",
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

#define S_MAX_DEVICES 32

/* What a selector can match on, per physical device. */
typedef struct s_devinfo {
    VkPhysicalDeviceProperties props;
    uint8_t uuid[VK_UUID_SIZE]; /* VkPhysicalDeviceIDProperties (== nvidia-smi's GPU UUID) */
    int has_pci;                /* VK_EXT_pci_bus_info offered                           */
    uint32_t pci_domain, pci_bus, pci_dev, pci_fn;
    int qfam; /* compute queue family or -1 */
} s_devinfo;

static int s_has_extension(VkPhysicalDevice pd, const char *name) {
    uint32_t n = 0;
    if (vkEnumerateDeviceExtensionProperties(pd, NULL, &n, NULL) != VK_SUCCESS || n == 0)
        return 0;
    VkExtensionProperties *e = malloc(n * sizeof *e);
    int found = 0;
    if (e && vkEnumerateDeviceExtensionProperties(pd, NULL, &n, e) == VK_SUCCESS)
        for (uint32_t i = 0; i < n && !found; i++)
            found = strcmp(e[i].extensionName, name) == 0;
    free(e);
    return found;
}

static void s_devinfo_get(VkPhysicalDevice pd, s_devinfo *d) {
    memset(d, 0, sizeof *d);
    vkGetPhysicalDeviceProperties(pd, &d->props);
    d->qfam = s_compute_family(pd);
    if (d->props.apiVersion < VK_API_VERSION_1_1)
        return; /* no properties2 / ID properties */
    VkPhysicalDevicePCIBusInfoPropertiesEXT pci = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PCI_BUS_INFO_PROPERTIES_EXT};
    VkPhysicalDeviceIDProperties id = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_ID_PROPERTIES};
    d->has_pci = s_has_extension(pd, VK_EXT_PCI_BUS_INFO_EXTENSION_NAME);
    if (d->has_pci)
        id.pNext = &pci;
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                      .pNext = &id};
    vkGetPhysicalDeviceProperties2(pd, &p2);
    memcpy(d->uuid, id.deviceUUID, VK_UUID_SIZE);
    d->pci_domain = pci.pciDomain;
    d->pci_bus = pci.pciBus;
    d->pci_dev = pci.pciDevice;
    d->pci_fn = pci.pciFunction;
}

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi -L and the NVIDIA
 * device plugin print it, so an operator can paste either. */
static void s_fmt_uuid(const uint8_t *u, char out[48]) {
    int o = sprintf(out, "GPU-");
    for (unsigned i = 0; i < VK_UUID_SIZE; i++)
        o += sprintf(out + o, "%s%02x", i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "", u[i]);
}

static void s_fmt_pci(const s_devinfo *d, char *out, size_t len) {
    if (!d->has_pci)
        snprintf(out, len, "n/a");
    else
        snprintf(out, len, "%04x:%02x:%02x.%x", d->pci_domain, d->pci_bus, d->pci_dev, d->pci_fn);
}

/* Hex digits of s (dashes skipped) into hex[]; -1 when s holds anything else. */
static int s_hex_digits(const char *s, char *hex, size_t cap) {
    size_t n = 0;
    for (; *s; s++) {
        if (*s == '-')
            continue;
        if (!isxdigit((unsigned char)*s) || n + 1 >= cap)
            return -1;
        hex[n++] = (char)tolower((unsigned char)*s);
    }
    hex[n] = 0;
    return (int)n;
}

/* "[domain:]bus:device.function" in hex (nvidia-smi prints an 8-digit domain). */
static int s_parse_pci(const char *s, uint32_t *dom, uint32_t *bus, uint32_t *dev, uint32_t *fn) {
    unsigned a, b, c, d;
    char tail;
    if (sscanf(s, "%x:%x:%x.%x%c", &a, &b, &c, &d, &tail) == 4) {
        *dom = a, *bus = b, *dev = c, *fn = d;
        return 1;
    }
    if (sscanf(s, "%x:%x.%x%c", &b, &c, &d, &tail) == 3) {
        *dom = 0, *bus = b, *dev = c, *fn = d;
        return 1;
    }
    return 0;
}

/* The device a MEDMOE_VK_DEVICE value names, or -1 with *why set. Forms:
 * "3" (index), "uuid:..."/"GPU-..."/bare hex (a UUID or a prefix of at least
 * 8 digits, unique), "pci:..."/"0000:3b:00.0"/"3b:00.0", "name:..." or any
 * other text (first device whose name contains it, case-insensitive). */
static int s_select(const s_devinfo *di, uint32_t n, const char *want, const char **why) {
    const char *v = want;
    enum { ANY, INDEX, UUID, PCI, NAME } kind = ANY;
    if (!strncasecmp(v, "index:", 6))
        kind = INDEX, v += 6;
    else if (!strncasecmp(v, "uuid:", 5))
        kind = UUID, v += 5;
    else if (!strncasecmp(v, "pci:", 4))
        kind = PCI, v += 4;
    else if (!strncasecmp(v, "name:", 5))
        kind = NAME, v += 5;
    *why = "names no device";
    int digits = *v != 0;
    for (const char *p = v; *p; p++)
        digits &= isdigit((unsigned char)*p) != 0;
    if (kind == INDEX || (kind == ANY && digits)) {
        char *end;
        long i = strtol(v, &end, 10);
        if (!digits || *end || i < 0 || i >= (long)n) {
            *why = "is not the index of a device";
            return -1;
        }
        return (int)i;
    }
    uint32_t dom, bus, dev, fn;
    if (kind == PCI || (kind == ANY && s_parse_pci(v, &dom, &bus, &dev, &fn))) {
        if (!s_parse_pci(v, &dom, &bus, &dev, &fn)) {
            *why = "is not a PCI bus id ([domain:]bus:device.function)";
            return -1;
        }
        for (uint32_t i = 0; i < n; i++)
            if (di[i].has_pci && di[i].pci_domain == dom && di[i].pci_bus == bus &&
                di[i].pci_dev == dev && di[i].pci_fn == fn)
                return (int)i;
        *why = "is the PCI bus id of no device";
        return -1;
    }
    const char *u = !strncasecmp(v, "GPU-", 4) ? v + 4 : v;
    char hex[64];
    int nh = s_hex_digits(u, hex, sizeof hex);
    if (kind == UUID || (kind == ANY && (u != v || nh >= 8))) {
        if (nh < 8 || nh > 2 * (int)VK_UUID_SIZE) {
            *why = "is not a UUID (at least 8 of its 32 hex digits)";
            return -1;
        }
        int hit = -1, hits = 0;
        for (uint32_t i = 0; i < n; i++) {
            char mine[48], mh[64];
            s_fmt_uuid(di[i].uuid, mine);
            s_hex_digits(mine + 4, mh, sizeof mh);
            if (strncmp(mh, hex, (size_t)nh) == 0) {
                if (hit < 0)
                    hit = (int)i;
                hits++;
            }
        }
        if (hits == 1)
            return hit;
        if (hits > 1) {
            *why = "is a UUID prefix of several devices";
            return -1;
        }
        if (kind == UUID || u != v) {
            *why = "is the UUID of no device";
            return -1;
        }
        /* bare hex that is no UUID: try it as a name below */
    }
    for (uint32_t i = 0; i < n; i++)
        if (*v && strcasestr(di[i].props.deviceName, v))
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
    VkPhysicalDevice pds[S_MAX_DEVICES];
    if (n > S_MAX_DEVICES)
        n = S_MAX_DEVICES;
    r = vkEnumeratePhysicalDevices(vk->inst, &n, pds);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE)
        return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: vkEnumeratePhysicalDevices failed: %s",
                         mm_vk_result_str(r));
    s_devinfo di[S_MAX_DEVICES];
    char list[1024] = "";
    size_t ln = 0;
    for (uint32_t i = 0; i < n; i++) {
        s_devinfo_get(pds[i], &di[i]);
        char uuid[48], pci[24];
        s_fmt_uuid(di[i].uuid, uuid);
        s_fmt_pci(&di[i], pci, sizeof pci);
        if (ln < sizeof list)
            ln += (size_t)snprintf(list + ln, sizeof list - ln, "%s%u: %s [%s] uuid %s pci %s",
                                   i ? "; " : "", i, di[i].props.deviceName,
                                   s_type_name(di[i].props.deviceType), uuid, pci);
    }
    int pick = -1;
    const char *want = getenv("MEDMOE_VK_DEVICE");
    if (want && *want) {
        const char *why = NULL;
        pick = s_select(di, n, want, &why);
        if (pick < 0)
            return mm_errorf(err, errlen, MM_ENOTFOUND,
                             "vulkan: MEDMOE_VK_DEVICE='%s' %s (an index, a name substring, a "
                             "UUID as 'GPU-xxxxxxxx-...' or a PCI bus id as '0000:3b:00.0'; "
                             "have: %s)",
                             want, why, list);
        if (di[pick].qfam < 0)
            return mm_errorf(err, errlen, MM_EDEVICE, "vulkan: device %d (%s) has no compute queue",
                             pick, di[pick].props.deviceName);
        if (di[pick].props.apiVersion < VK_API_VERSION_1_1)
            return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                             "vulkan: device %d (%s) supports only Vulkan %u.%u (1.1 needed)", pick,
                             di[pick].props.deviceName,
                             VK_API_VERSION_MAJOR(di[pick].props.apiVersion),
                             VK_API_VERSION_MINOR(di[pick].props.apiVersion));
        snprintf(vk->chosen_by, sizeof vk->chosen_by, "MEDMOE_VK_DEVICE='%.60s'", want);
    } else {
        for (uint32_t i = 0; i < n; i++) {
            if (di[i].props.apiVersion < VK_API_VERSION_1_1 || di[i].qfam < 0)
                continue;
            if (pick < 0 ||
                s_type_rank(di[i].props.deviceType) < s_type_rank(di[pick].props.deviceType))
                pick = (int)i;
        }
        if (pick < 0)
            return mm_errorf(err, errlen, MM_EDEVICE,
                             "vulkan: no device with Vulkan 1.1 and a compute queue (have: %s)",
                             list);
        snprintf(vk->chosen_by, sizeof vk->chosen_by, "default: first %s device",
                 s_type_name(di[pick].props.deviceType));
    }
    vk->phys = pds[pick];
    vk->props = di[pick].props;
    vk->qfam = (uint32_t)di[pick].qfam;
    vk->dev_index = (uint32_t)pick;
    vk->fence_timeout_ns = di[pick].props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU
                               ? MM_VK_FENCE_TIMEOUT_CPU_NS
                               : MM_VK_FENCE_TIMEOUT_NS;
    vk->dev_count = n;
    s_fmt_uuid(di[pick].uuid, vk->uuid);
    s_fmt_pci(&di[pick], vk->pci, sizeof vk->pci);
    return MM_OK;
}

/* Subgroup arithmetic in compute shaders (Vulkan 1.1 properties), unless
 * MEDMOE_VK_SUBGROUPS=0 turns it off (tests run the shared-memory shaders on
 * lavapipe this way). */
static void s_subgroups(mm_vk *vk) {
    VkPhysicalDeviceSubgroupProperties sg = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                      .pNext = &sg};
    vkGetPhysicalDeviceProperties2(vk->phys, &p2);
    const char *off = getenv("MEDMOE_VK_SUBGROUPS");
    vk->subgroup_size = sg.subgroupSize;
    vk->subgroup = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) &&
                   (sg.supportedOperations & VK_SUBGROUP_FEATURE_BASIC_BIT) &&
                   (sg.supportedOperations & VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) &&
                   sg.subgroupSize >= 1 && !(off && strcmp(off, "0") == 0);
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
    snprintf(vk->desc, sizeof vk->desc,
             "vulkan: %s [%s], %s; device %u of %u (uuid %s, pci %s; %s)", vk->props.deviceName,
             s_type_name(vk->props.deviceType), driver, vk->dev_index, vk->dev_count, vk->uuid,
             vk->pci, vk->chosen_by);
    size_t n = strlen(vk->desc);
    snprintf(vk->desc + n, sizeof vk->desc - n, "; %s; subgroups: %s (%u lanes)", vk->mem_desc,
             vk->subgroup ? "arithmetic" : "off", vk->subgroup_size);
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
        if (p >= MM_VK_GEMV_SG_F32 && p <= MM_VK_GEMV16_SG_BF16 && !vk->subgroup)
            continue; /* their SPIR-V declares capabilities the device lacks */
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
    .write_queued = mm_vk_write_queued,
    .flush = mm_vk_flush,
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
    if (rc == MM_OK) /* command pool first: staging copies use it */
        rc = mm_vk_exec_init(vk, err, errlen);
    if (rc == MM_OK)
        rc = mm_vk_memory_init(vk, err, errlen);
    if (rc == MM_OK) {
        s_subgroups(vk);
        s_describe(vk);
        rc = s_create_pipelines(vk, err, errlen);
    }
    if (rc != MM_OK) {
        s_destroy(vk);
        free(be);
        return rc;
    }
    *out = be;
    return MM_OK;
}

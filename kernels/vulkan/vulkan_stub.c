/* vulkan_stub.c — mm_vulkan_backend_new for builds with MEDMOE_VULKAN=OFF:
 * asking for the vulkan backend then fails with a clear message instead of
 * a link error. */
#include "backend.h"

int mm_vulkan_backend_new(mm_backend **out, char *err, size_t errlen) {
    *out = NULL;
    return mm_errorf(
        err, errlen, MM_EUNSUPPORTED,
        "vulkan: this build has no Vulkan backend (configured with MEDMOE_VULKAN=OFF)");
}

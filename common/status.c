/* status.c — names of the status codes and the error-formatting helper. */
#include "status.h"

#include <stdint.h>
#include <stdio.h>

const char *mm_status_str(int status) {
    switch (status) {
    case MM_OK: return "OK";
    case MM_ERR: return "ERR";
    case MM_EINVAL: return "EINVAL";
    case MM_ENOMEM: return "ENOMEM";
    case MM_EIO: return "EIO";
    case MM_EPROTO: return "EPROTO";
    case MM_EDEVICE: return "EDEVICE";
    case MM_ETIMEOUT: return "ETIMEOUT";
    case MM_EUNSUPPORTED: return "EUNSUPPORTED";
    case MM_EAGAIN: return "EAGAIN";
    case MM_ENOTFOUND: return "ENOTFOUND";
    case MM_ECANCELLED: return "ECANCELLED";
    default: return "UNKNOWN";
    }
}

int mm_verrorf(char *buf, size_t len, int status, const char *fmt, va_list ap) {
    if (buf && len > 0)
        vsnprintf(buf, len, fmt, ap);
    return status;
}

int mm_errorf(char *buf, size_t len, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_verrorf(buf, len, status, fmt, ap);
    va_end(ap);
    return status;
}

int mm_size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

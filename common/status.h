/* status.h — the closed set of return codes every medmoe module uses.
 *
 * Functions return MM_OK (0) or one of the negative codes below, and write
 * the detail (file, tensor, shape, peer) into a caller's buffer or into the
 * object's last-error string. mm_status_str() names a code for logs:
 *
 *     int rc = mm_matmul(be, out, x, w, NULL);
 *     if (rc != MM_OK)
 *         fprintf(stderr, "%s: %s\n", mm_status_str(rc), mm_backend_error(be));
 */
#ifndef MM_STATUS_H
#define MM_STATUS_H

#include <stdarg.h>
#include <stddef.h>

typedef enum mm_status {
    MM_OK = 0,
    MM_ERR = -1,          /* anything not covered below                      */
    MM_EINVAL = -2,       /* bad argument: shape, dtype, size, value          */
    MM_ENOMEM = -3,       /* allocation failed (host or device)               */
    MM_EIO = -4,          /* file or socket I/O failed                        */
    MM_EPROTO = -5,       /* malformed input from outside: file, peer, client */
    MM_EDEVICE = -6,      /* the compute device failed or is missing          */
    MM_ETIMEOUT = -7,     /* a bounded wait ran out                           */
    MM_EUNSUPPORTED = -8, /* valid, but this backend/build cannot do it       */
    MM_EAGAIN = -9,       /* busy or not ready: retry later                   */
    MM_ENOTFOUND = -10,   /* a named thing (tensor, file, expert) is absent   */
    MM_ECANCELLED = -11,  /* the caller (or its client) cancelled the work      */
} mm_status;

/* Short upper-case name of a status code ("EINVAL"); never NULL. */
const char *mm_status_str(int status);

/* snprintf into buf (when buf != NULL and len > 0) and return status, so an
 * error path is one line:  return mm_errorf(err, errlen, MM_EINVAL, "...");  */
int mm_errorf(char *buf, size_t len, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int mm_verrorf(char *buf, size_t len, int status, const char *fmt, va_list ap);

/* a * b into *out; returns 0 when it would overflow size_t. */
int mm_size_mul(size_t a, size_t b, size_t *out);

#endif

/* audit.c — append-only JSON lines (see audit.h). */
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "status.h"

struct mm_audit {
    int fd;          /* O_APPEND                      */
    int sync;        /* 1: fsync after each record    */
    size_t count;    /* records written               */
    char path[1024]; /* for messages                */
};

int mm_audit_open(const char *path, int sync, mm_audit **out, char *err, size_t errlen) {
    *out = NULL;
    mm_audit *a = calloc(1, sizeof *a);
    if (!a)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    a->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (a->fd < 0) {
        int e = errno;
        free(a);
        return mm_errorf(err, errlen, MM_EIO, "audit log %s: %s", path, strerror(e));
    }
    a->sync = sync;
    snprintf(a->path, sizeof a->path, "%s", path);
    *out = a;
    return MM_OK;
}

void mm_audit_close(mm_audit **a) {
    if (!a || !*a)
        return;
    fsync((*a)->fd);
    close((*a)->fd);
    free(*a);
    *a = NULL;
}

int mm_audit_write(mm_audit *a, const json_t *record, char *err, size_t errlen) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[64];
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (long)(ts.tv_nsec / 1000000) % 1000);
    json_t *o = json_object();
    if (!o || json_object_set_new(o, "time", json_string(when)) ||
        json_object_update(o, (json_t *)record)) {
        json_decref(o);
        return mm_errorf(err, errlen, MM_ENOMEM, "audit: out of memory");
    }
    /* JSON_COMPACT escapes newlines inside strings: one record, one line */
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    if (!s)
        return mm_errorf(err, errlen, MM_ENOMEM, "audit: out of memory");
    size_t n = strlen(s);
    s[n] = '\n'; /* json_dumps' NUL becomes the newline: one write for the whole line */
    size_t off = 0;
    int rc = MM_OK;
    while (off < n + 1) {
        ssize_t w = write(a->fd, s + off, n + 1 - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            rc = mm_errorf(err, errlen, MM_EIO, "audit log %s: %s", a->path,
                           w < 0 ? strerror(errno) : "short write");
            break;
        }
        off += (size_t)w;
    }
    free(s);
    if (rc == MM_OK && a->sync && fsync(a->fd) != 0)
        rc = mm_errorf(err, errlen, MM_EIO, "audit log %s: fsync: %s", a->path, strerror(errno));
    if (rc == MM_OK)
        a->count++;
    return rc;
}

size_t mm_audit_count(const mm_audit *a) { return a ? a->count : 0; }

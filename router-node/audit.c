/* audit.c — append-only JSON lines, and the start-up scan for cases a dead
 * run left unfinished (see audit.h). */
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "status.h"

struct mm_audit {
    int fd;             /* O_APPEND                                  */
    int sync;           /* 1: fsync after each record                */
    size_t count;       /* records written                           */
    uint64_t seq;       /* the last case number handed out           */
    char run[17];       /* this open's id: 16 hex digits, random     */
    char path[1024];    /* for messages                              */
    uint8_t salt[4096]; /* mm_audit_hash's salt                      */
    size_t salt_len;    /* bytes of salt in use                      */
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
    /* a torn last line (the process died in a write): end it, so that our
     * first record is a line of its own */
    struct stat st;
    char last = '\n';
    if (fstat(a->fd, &st) == 0 && st.st_size > 0) {
        int rfd = open(path, O_RDONLY | O_CLOEXEC);
        if (rfd >= 0) {
            if (pread(rfd, &last, 1, st.st_size - 1) != 1)
                last = '\n';
            close(rfd);
        }
        if (last != '\n' && write(a->fd, "\n", 1) != 1) {
            int e = errno;
            close(a->fd);
            free(a);
            return mm_errorf(err, errlen, MM_EIO, "audit log %s: %s", path, strerror(e));
        }
    }
    /* random, not pid + time: a restarted container has the same pid and
     * maybe a clock that went back */
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        id =
            ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 40);
    }
    snprintf(a->run, sizeof a->run, "%016llx", (unsigned long long)id);
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

const char *mm_audit_run(const mm_audit *a) { return a->run; }

uint64_t mm_audit_next_seq(mm_audit *a) { return ++a->seq; }

/* ---- recovery ------------------------------------------------------------- */

/* "run/seq" of a record, or 0 when it has none. */
static int s_case_key(const json_t *r, char *key, size_t n) {
    const char *run = json_string_value(json_object_get(r, "run"));
    json_t *seq = json_object_get(r, "seq");
    if (!run || !json_is_integer(seq))
        return 0;
    snprintf(key, n, "%.32s/%lld", run, (long long)json_integer_value(seq));
    return 1;
}

int mm_audit_recover(mm_audit *a, size_t scan_bytes, mm_audit_unfinished_fn fn, void *ctx,
                     size_t *n_out, char *err, size_t errlen) {
    if (n_out)
        *n_out = 0;
    int fd = open(a->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mm_errorf(err, errlen, MM_EIO, "audit log %s: %s", a->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return mm_errorf(err, errlen, MM_EIO, "audit log %s: %s", a->path, strerror(e));
    }
    size_t size = (size_t)st.st_size, n = size < scan_bytes ? size : scan_bytes;
    off_t from = (off_t)(size - n);
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return mm_errorf(err, errlen, MM_ENOMEM, "audit log %s: out of memory", a->path);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, from + (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    buf[got] = 0;
    /* admitted records without an end so far, by "run/seq" (insertion order
     * kept: reported oldest first) */
    json_t *open_cases = json_object();
    char *p = buf;
    if (from > 0) { /* the scan starts inside a line: skip to the next one */
        char *nl = memchr(p, '\n', got);
        p = nl ? nl + 1 : buf + got;
    }
    while (open_cases && p < buf + got) {
        char *nl = memchr(p, '\n', (size_t)(buf + got - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(buf + got - p);
        json_t *r = json_loadb(p, len, 0, NULL);
        p += len + 1;
        char key[64];
        if (!r || !s_case_key(r, key, sizeof key) ||
            !strcmp(json_string_value(json_object_get(r, "run")), a->run)) {
            json_decref(r);
            continue;
        }
        const char *ev = json_string_value(json_object_get(r, "event"));
        if (ev && !strcmp(ev, "admitted"))
            json_object_set(open_cases, key, r);
        else if (ev && (!strcmp(ev, "end") || !strcmp(ev, "unfinished")))
            json_object_del(open_cases, key);
        json_decref(r);
    }
    free(buf);
    if (!open_cases)
        return mm_errorf(err, errlen, MM_ENOMEM, "audit log %s: out of memory", a->path);
    int rc = MM_OK;
    size_t count = 0;
    const char *key;
    json_t *r;
    json_object_foreach(open_cases, key, r) {
        if (fn)
            fn(ctx, r);
        json_t *u = json_object();
        json_object_set_new(u, "event", json_string("unfinished"));
        static const char *const keep[] = {"run", "seq", "tenant", "case_id", "method", "peer"};
        for (size_t k = 0; k < sizeof keep / sizeof *keep; k++)
            if (json_object_get(r, keep[k]))
                json_object_set(u, keep[k], json_object_get(r, keep[k]));
        json_object_set(u, "admitted_at", json_object_get(r, "time"));
        rc = mm_audit_write(a, u, err, errlen);
        json_decref(u);
        if (rc != MM_OK)
            break;
        count++;
    }
    json_decref(open_cases);
    if (n_out)
        *n_out = count;
    return rc;
}

/* ---- self-test ------------------------------------------------------------ */

static void s_count_cb(void *ctx, const json_t *admitted) {
    (void)admitted;
    (*(int *)ctx)++;
}

#define S_CHECK(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            if (verbose)                                                                           \
                fprintf(stderr, "audit selftest: %s:%d: %s\n", __FILE__, __LINE__, #cond);         \
            rc = MM_ERR;                                                                           \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)

int mm_audit_selftest(const char *dir, int verbose) {
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/audit-selftest-%d.jsonl", dir, (int)getpid());
    unlink(path);
    int rc = MM_OK, seen = 0;
    size_t n = 0;
    mm_audit *a = NULL, *b = NULL;
    S_CHECK(mm_audit_open(path, 0, &a, err, sizeof err) == MM_OK);
    S_CHECK(strlen(mm_audit_run(a)) == 16);
    /* run A: cases 1 and 2 admitted, 1 ends, then A "dies" (2 never ends) */
    for (int k = 1; k <= 2; k++) {
        json_t *r =
            json_pack("{s:s, s:s, s:I, s:s}", "event", "admitted", "run", mm_audit_run(a), "seq",
                      (json_int_t)mm_audit_next_seq(a), "case_id", k == 1 ? "done" : "lost");
        S_CHECK(mm_audit_write(a, r, err, sizeof err) == MM_OK);
        json_decref(r);
    }
    json_t *e =
        json_pack("{s:s, s:s, s:I}", "event", "end", "run", mm_audit_run(a), "seq", (json_int_t)1);
    S_CHECK(mm_audit_write(a, e, err, sizeof err) == MM_OK);
    json_decref(e);
    /* A's own recover sees nothing: its cases are its own */
    S_CHECK(mm_audit_recover(a, MM_AUDIT_SCAN_BYTES, s_count_cb, &seen, &n, err, sizeof err) ==
            MM_OK);
    S_CHECK(n == 0 && seen == 0);
    /* a torn last line, as a kill during a write could leave */
    S_CHECK(write(a->fd, "{\"event\": \"adm", 14) == 14);
    mm_audit_close(&a);
    /* run B: finds case 2, once; a second scan (or run C) finds nothing */
    S_CHECK(mm_audit_open(path, 0, &b, err, sizeof err) == MM_OK);
    S_CHECK(mm_audit_recover(b, MM_AUDIT_SCAN_BYTES, s_count_cb, &seen, &n, err, sizeof err) ==
            MM_OK);
    S_CHECK(n == 1 && seen == 1);
    mm_audit_close(&b);
    S_CHECK(mm_audit_open(path, 0, &b, err, sizeof err) == MM_OK);
    S_CHECK(mm_audit_recover(b, MM_AUDIT_SCAN_BYTES, s_count_cb, &seen, &n, err, sizeof err) ==
            MM_OK);
    S_CHECK(n == 0 && seen == 1);
    /* a scan window that starts mid-file skips its first partial line */
    S_CHECK(mm_audit_recover(b, 100, s_count_cb, &seen, &n, err, sizeof err) == MM_OK);
out:
    mm_audit_close(&a);
    mm_audit_close(&b);
    unlink(path);
    return rc;
}

int mm_audit_set_salt(mm_audit *a, const char *salt_path, char *err, size_t errlen) {
    if (!salt_path) {
        if (getrandom(a->salt, 32, 0) != 32)
            return mm_errorf(err, errlen, MM_EIO, "audit salt: getrandom: %s", strerror(errno));
        a->salt_len = 32;
        return MM_OK;
    }
    FILE *f = fopen(salt_path, "rb");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "audit salt %s: %s", salt_path, strerror(errno));
    size_t n = fread(a->salt, 1, sizeof a->salt, f);
    int more = fgetc(f) != EOF, bad = ferror(f);
    fclose(f);
    if (bad || more || n < 16)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "audit salt %s: %s (want 16 to %zu bytes, e.g. head -c 32 /dev/urandom)",
                         salt_path,
                         bad    ? "read error"
                         : more ? "too long"
                                : "too short",
                         sizeof a->salt);
    a->salt_len = n;
    return MM_OK;
}

void mm_audit_hash(const mm_audit *a, const void *data, size_t len, char hex[MM_SHA256_HEX]) {
    mm_sha256 h;
    uint8_t d[MM_SHA256_BYTES];
    if (mm_sha256_init(&h) == MM_OK) {
        mm_sha256_update(&h, a->salt, a->salt_len);
        mm_sha256_update(&h, data, len);
    }
    mm_sha256_final(&h, d);
    mm_sha256_hex(d, hex);
}

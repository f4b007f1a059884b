/* log.c — see log.h. */
#include "log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "status.h"

#define S_LINE_MAX 4096 /* a longer message is cut (with "...") */

struct mm_log {
    char *component;    /* program name, e.g. "medmoe-router"        */
    FILE *out;          /* where lines go (not owned)                */
    mm_log_format fmt;  /* text or JSON                              */
    mm_log_level level; /* lines below it are dropped                */
    pthread_mutex_t mu; /* one whole line at a time                  */
};

static const char *const s_names[] = {"debug", "info", "warn", "error"};
static const char *const s_upper[] = {"DEBUG", "INFO", "WARN", "ERROR"};

int mm_log_new(const char *component, FILE *out, mm_log_format format, mm_log_level level,
               mm_log **lg) {
    if (!lg || !component || (unsigned)format > MM_LOG_JSON || (unsigned)level > MM_LOG_ERROR)
        return MM_EINVAL;
    *lg = NULL;
    mm_log *l = calloc(1, sizeof *l);
    if (!l || !(l->component = strdup(component))) {
        free(l);
        return MM_ENOMEM;
    }
    l->out = out;
    l->fmt = format;
    l->level = level;
    pthread_mutex_init(&l->mu, NULL);
    *lg = l;
    return MM_OK;
}

void mm_log_destroy(mm_log **lg) {
    if (!lg || !*lg)
        return;
    pthread_mutex_destroy(&(*lg)->mu);
    free((*lg)->component);
    free(*lg);
    *lg = NULL;
}

int mm_log_enabled(const mm_log *lg, mm_log_level level) { return !lg || level >= lg->level; }

const char *mm_log_level_str(mm_log_level level) {
    return (unsigned)level <= MM_LOG_ERROR ? s_names[level] : "?";
}

int mm_log_level_parse(const char *s, mm_log_level *out) {
    if (!s)
        return MM_EINVAL;
    for (int i = 0; i <= MM_LOG_ERROR; i++)
        if (!strcmp(s, s_names[i])) {
            *out = (mm_log_level)i;
            return MM_OK;
        }
    if (!strcmp(s, "warning")) {
        *out = MM_LOG_WARN;
        return MM_OK;
    }
    return MM_EINVAL;
}

int mm_log_format_parse(const char *s, mm_log_format *out) {
    if (s && !strcmp(s, "text"))
        *out = MM_LOG_TEXT;
    else if (s && !strcmp(s, "json"))
        *out = MM_LOG_JSON;
    else
        return MM_EINVAL;
    return MM_OK;
}

/* Appends one byte if it fits (keeping room for the NUL). */
static void s_put(char *buf, size_t len, size_t *used, char c) {
    if (*used + 1 < len)
        buf[(*used)++] = c;
    buf[*used] = 0;
}

static void s_puts(char *buf, size_t len, size_t *used, const char *s) {
    while (*s)
        s_put(buf, len, used, *s++);
}

/* s as the inside of a JSON string (json != 0) or as text with control
 * characters escaped, so one event is one line either way. An escape is
 * written whole or not at all. */
static void s_escape(char *buf, size_t len, size_t *used, const char *s, int json) {
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char tmp[8];
        const char *e = NULL;
        if (*p == '\n')
            e = "\\n";
        else if (*p == '\r')
            e = "\\r";
        else if (*p == '\t')
            e = json ? "\\t" : "\t";
        else if (json && *p == '"')
            e = "\\\"";
        else if (json && *p == '\\')
            e = "\\\\";
        else if (*p < 0x20 || *p == 0x7f) {
            snprintf(tmp, sizeof tmp, json ? "\\u%04x" : "\\x%02x", *p);
            e = tmp;
        }
        if (!e) {
            s_put(buf, len, used, (char)*p);
            continue;
        }
        if (*used + strlen(e) + 1 >= len)
            return;
        s_puts(buf, len, used, e);
    }
}

void mm_vlogf(mm_log *lg, mm_log_level level, const char *case_id, const char *fmt, va_list ap) {
    if (!mm_log_enabled(lg, level) || (unsigned)level > MM_LOG_ERROR)
        return;
    char msg[S_LINE_MAX];
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    if (n >= (int)sizeof msg)
        memcpy(msg + sizeof msg - 4, "...", 4);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[80];
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L);

    const char *comp = lg ? lg->component : "medmoe";
    int json = lg && lg->fmt == MM_LOG_JSON;
    /* Room for the message escaped (up to 6 bytes per byte in the worst case
     * is not needed: an over-long line is cut, the prefix always fits). */
    char line[S_LINE_MAX + 512];
    size_t u = 0;
    line[0] = 0;
    if (json) {
        s_puts(line, sizeof line, &u, "{\"ts\":\"");
        s_puts(line, sizeof line, &u, when);
        s_puts(line, sizeof line, &u, "\",\"level\":\"");
        s_puts(line, sizeof line, &u, s_names[level]);
        s_puts(line, sizeof line, &u, "\",\"component\":\"");
        s_escape(line, sizeof line, &u, comp, 1);
        if (case_id) {
            s_puts(line, sizeof line, &u, "\",\"case\":\"");
            s_escape(line, sizeof line, &u, case_id, 1);
        }
        s_puts(line, sizeof line, &u, "\",\"msg\":\"");
        /* keep room for the closing "}\n */
        s_escape(line, sizeof line - 4, &u, msg, 1);
        s_puts(line, sizeof line, &u, "\"}\n");
    } else {
        s_puts(line, sizeof line, &u, when);
        s_put(line, sizeof line, &u, ' ');
        s_puts(line, sizeof line, &u, s_upper[level]);
        s_put(line, sizeof line, &u, ' ');
        s_escape(line, sizeof line, &u, comp, 0);
        s_puts(line, sizeof line, &u, ": ");
        if (case_id) {
            s_puts(line, sizeof line, &u, "case ");
            s_escape(line, sizeof line, &u, case_id, 0);
            s_puts(line, sizeof line, &u, ": ");
        }
        s_escape(line, sizeof line - 2, &u, msg, 0);
        s_put(line, sizeof line, &u, '\n');
    }
    FILE *out = lg && lg->out ? lg->out : stderr;
    if (lg)
        pthread_mutex_lock(&lg->mu);
    fwrite(line, 1, u, out);
    fflush(out);
    if (lg)
        pthread_mutex_unlock(&lg->mu);
}

void mm_logf(mm_log *lg, mm_log_level level, const char *case_id, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    mm_vlogf(lg, level, case_id, fmt, ap);
    va_end(ap);
}

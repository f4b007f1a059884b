/* log.h — one line per event for medmoe's programs (router, experts).
 *
 * Each line carries the time (UTC, milliseconds), a level, the component
 * (the program's name), an optional case id and the message, either as text
 *
 *     2025-06-01T10:00:00.123Z INFO medmoe-router: case c-17: answered in 412 ms
 *
 * or, with --log-format json, as one JSON object per line
 *
 *     {"ts":"2025-06-01T10:00:00.123Z","level":"info","component":"medmoe-router",
 *      "case":"c-17","msg":"answered in 412 ms"}
 *
 * Lines below the logger's level are dropped. A logger is safe to share
 * between threads: each line is written whole under a mutex. A NULL logger
 * writes text at every level to stderr, so library code can log before (or
 * without) the program creating one.
 *
 *     mm_log *lg = NULL;
 *     mm_log_new("medmoe-expert", stderr, MM_LOG_TEXT, MM_LOG_INFO, &lg);
 *     mm_logf(lg, MM_LOG_INFO, NULL, "loaded expert %d", k);
 *     mm_logf(lg, MM_LOG_WARN, case_id, "expert %d slow: %.0f ms", k, ms);
 *     mm_log_destroy(&lg);
 */
#ifndef MM_LOG_H
#define MM_LOG_H

#include <stdarg.h>
#include <stdio.h>

typedef enum mm_log_level {
    MM_LOG_DEBUG = 0,
    MM_LOG_INFO = 1,
    MM_LOG_WARN = 2,
    MM_LOG_ERROR = 3,
} mm_log_level;

typedef enum mm_log_format {
    MM_LOG_TEXT = 0, /* time LEVEL component: [case ID: ]message */
    MM_LOG_JSON = 1, /* one JSON object per line                 */
} mm_log_format;

typedef struct mm_log mm_log;

/* A logger writing to out (not owned, not closed; stderr when NULL).
 * component is copied. Returns MM_OK, MM_EINVAL or MM_ENOMEM. */
int mm_log_new(const char *component, FILE *out, mm_log_format format, mm_log_level level,
               mm_log **lg);
/* Frees *lg (NULL is fine) and clears the pointer. */
void mm_log_destroy(mm_log **lg);

/* Writes one line when level >= the logger's level. case_id may be NULL.
 * Newlines inside the message are escaped so the line stays one line. */
void mm_logf(mm_log *lg, mm_log_level level, const char *case_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void mm_vlogf(mm_log *lg, mm_log_level level, const char *case_id, const char *fmt, va_list ap);

/* 1 when a line at level would be written (skip costly formatting otherwise). */
int mm_log_enabled(const mm_log *lg, mm_log_level level);

/* "debug|info|warn|error" (also "warning") and "text|json" -> value; MM_OK or
 * MM_EINVAL. For command-line flags. */
int mm_log_level_parse(const char *s, mm_log_level *out);
int mm_log_format_parse(const char *s, mm_log_format *out);
/* "debug", "info", "warn", "error". */
const char *mm_log_level_str(mm_log_level level);

#endif

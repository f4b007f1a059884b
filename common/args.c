/* args.c — command-line helpers (see args.h). */
#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "status.h"

int mm_arg_int(const char *prog, const char *opt, const char *v, int min, int *out) {
    char *end = NULL;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!*v || *end || errno || x < min || x > 1000000000) {
        fprintf(stderr, "%s: %s wants an integer >= %d, got '%s'\n", prog, opt, min, v);
        return 2;
    }
    *out = (int)x;
    return 0;
}

int mm_arg_log_format(const char *prog, const char *v, mm_log_format *out) {
    if (mm_log_format_parse(v, out) == MM_OK)
        return 0;
    fprintf(stderr, "%s: --log-format wants text or json\n", prog);
    return 2;
}

int mm_arg_log_level(const char *prog, const char *v, mm_log_level *out) {
    if (mm_log_level_parse(v, out) == MM_OK)
        return 0;
    fprintf(stderr, "%s: --log-level wants debug, info, warn or error\n", prog);
    return 2;
}

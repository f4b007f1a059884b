/* args.c — command-line helpers (see args.h). */
#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

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

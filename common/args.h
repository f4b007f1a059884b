/* args.h — the command-line helpers every medmoe program shares.
 *
 *     int n;
 *     if (mm_arg_int("medmoe-expert", "--capacity", optarg, 0, &n)) return 2;
 */
#ifndef MM_ARGS_H
#define MM_ARGS_H

#include "log.h"

/* Parse v as a decimal integer in [min, 1e9] into *out. On a bad value,
 * prints "PROG: OPT wants an integer >= MIN, got 'V'" to stderr and returns
 * 2 (the usage exit status); 0 on success. */
int mm_arg_int(const char *prog, const char *opt, const char *v, int min, int *out);

/* --log-format text|json and --log-level debug|info|warn|error, with the
 * same message-and-2 contract as mm_arg_int. */
int mm_arg_log_format(const char *prog, const char *v, mm_log_format *out);
int mm_arg_log_level(const char *prog, const char *v, mm_log_level *out);

#endif

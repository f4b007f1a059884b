/* fuzz_file.h — for the fuzz targets whose parser takes a path (safetensors
 * maps a file; the tokenizer picks its format from the file name): write the
 * input to a file in a private directory under /dev/shm (else $TMPDIR, /tmp)
 * made once per process, and hand back its path. Harness code only: a
 * libFuzzer process runs one input at a time, so the one static path is fine. */
#ifndef MM_FUZZ_FILE_H
#define MM_FUZZ_FILE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char s_fuzz_dir[256];

static void s_fuzz_cleanup(void) {
    if (s_fuzz_dir[0])
        rmdir(s_fuzz_dir); /* the file itself is unlinked after each input */
}

/* Path of `name` in the private directory, holding exactly data[0..len). */
static const char *mm_fuzz_file(const char *name, const uint8_t *data, size_t len) {
    static char path[512];
    if (!s_fuzz_dir[0]) {
        const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
        snprintf(s_fuzz_dir, sizeof s_fuzz_dir, "%s/mm-fuzz-XXXXXX", base ? base : "/tmp");
        if (!mkdtemp(s_fuzz_dir)) {
            perror("mkdtemp");
            abort();
        }
        atexit(s_fuzz_cleanup);
    }
    snprintf(path, sizeof path, "%s/%s", s_fuzz_dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (len && fwrite(data, 1, len, f) != len) || fclose(f) != 0) {
        perror(path);
        abort();
    }
    return path;
}

#endif

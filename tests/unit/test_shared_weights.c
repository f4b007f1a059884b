/* test_shared_weights.c — the cpu backend computes from the mapped
 * checkpoint: no copy, no widening, pages shared between processes.
 *
 *     test_shared_weights <model_dir>   (a bf16 checkpoint, its tower in <model_dir>/clip)
 *
 * Two processes (this one and a forked child, each loading the model on its
 * own after the fork) run a forward step, which reads every weight of the
 * trunk. Then, with both alive:
 *  - no page of the checkpoint's mappings is private-dirty (nothing wrote
 *    to, or copied, the weights);
 *  - each process's PSS of those mappings is about half its RSS of them:
 *    the two share the page cache (the issue: RSS vs PSS);
 *  - loading added at least the file's size less anonymous memory than a
 *    --weights f32 load in the same process (a widened copy: twice the bf16
 *    bytes).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "medmoe.h"

static int s_fail(const char *what) {
    fprintf(stderr, "FAIL: %s\n", what);
    return 1;
}

/* Sums over this process's mappings whose path ends in ".safetensors":
 * kB of Rss, Pss, Private_Dirty; anon: kB of Anonymous over all mappings. */
typedef struct s_mem {
    long rss, pss, priv_dirty, anon, file_bytes;
} s_mem;

static int s_read_smaps(s_mem *m) {
    memset(m, 0, sizeof *m);
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return -1;
    char line[1024];
    int in_ck = 0;
    while (fgets(line, sizeof line, f)) {
        long v;
        unsigned long a, b;
        /* A mapping's header: "start-end perms offset dev inode [path]",
         * addresses in lowercase hex; its fields follow as "Name: n kB". */
        if (((line[0] >= '0' && line[0] <= '9') || (line[0] >= 'a' && line[0] <= 'f')) &&
            sscanf(line, "%lx-%lx ", &a, &b) == 2) {
            size_t n = strlen(line);
            while (n && (line[n - 1] == '\n' || line[n - 1] == ' '))
                line[--n] = '\0';
            in_ck = n > 12 && strcmp(line + n - 12, ".safetensors") == 0;
            if (in_ck)
                m->file_bytes += (long)(b - a);
            continue;
        }
        if (sscanf(line, "Anonymous: %ld kB", &v) == 1)
            m->anon += v;
        if (!in_ck)
            continue;
        if (sscanf(line, "Rss: %ld kB", &v) == 1)
            m->rss += v;
        else if (sscanf(line, "Pss: %ld kB", &v) == 1)
            m->pss += v;
        else if (sscanf(line, "Private_Dirty: %ld kB", &v) == 1)
            m->priv_dirty += v;
    }
    fclose(f);
    return 0;
}

/* Load, run one step of 8 tokens; the model is returned for the caller to
 * keep alive while measuring. */
static int s_load_and_run(const char *dir, mm_weights w, mm_backend **be, mm_model **m,
                          long *anon_added) {
    char err[512];
    s_mem before, after;
    if (mm_backend_new("cpu", be, err, sizeof err) != MM_OK) {
        fprintf(stderr, "backend: %s\n", err);
        return 1;
    }
    s_read_smaps(&before);
    mm_model_options o;
    mm_model_options_default(&o);
    o.max_ctx = 64;
    o.weights = w;
    char vision[1024];
    snprintf(vision, sizeof vision, "%s/clip", dir);
    o.vision_dir = vision;
    if (mm_model_load(dir, *be, &o, m, err, sizeof err) != MM_OK) {
        fprintf(stderr, "load: %s\n", err);
        return 1;
    }
    s_read_smaps(&after);
    *anon_added = after.anon - before.anon;
    int32_t tok[8], slot[8], pos[8];
    uint8_t want[8] = {0, 0, 0, 0, 0, 0, 0, 1};
    for (int i = 0; i < 8; i++)
        tok[i] = 1 + i, slot[i] = 0, pos[i] = i;
    mm_step s = {.n = 8, .token = tok, .slot = slot, .pos = pos, .want_logits = want};
    size_t V = (size_t)mm_model_config(*m)->vocab_size;
    float *logits = malloc(V * sizeof(float));
    int rc = logits ? mm_model_forward(*m, &s, logits, NULL, err, sizeof err) : MM_ENOMEM;
    free(logits);
    if (rc != MM_OK) {
        fprintf(stderr, "forward: %s\n", err);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test_shared_weights <model_dir>\n");
        return 2;
    }
    int ready[2], done[2];
    if (pipe(ready) || pipe(done))
        return s_fail("pipe");
    pid_t pid = fork();
    if (pid < 0)
        return s_fail("fork");
    mm_backend *be = NULL;
    mm_model *m = NULL;
    long anon_added = 0;
    if (pid == 0) {
        char c = s_load_and_run(argv[1], MM_WEIGHTS_STORED, &be, &m, &anon_added) ? 'x' : 'k';
        if (write(ready[1], &c, 1) != 1)
            _exit(1);
        if (read(done[0], &c, 1) != 1) /* parent measured */
            _exit(1);
        mm_model_destroy(&m);
        mm_backend_destroy(&be);
        _exit(0);
    }
    int fails = 0;
    if (s_load_and_run(argv[1], MM_WEIGHTS_STORED, &be, &m, &anon_added))
        fails += s_fail("parent could not load and run the model");
    char c = 0;
    if (read(ready[0], &c, 1) != 1 || c != 'k')
        fails += s_fail("child could not load and run the model");
    s_mem mem;
    s_read_smaps(&mem);
    printf("checkpoint mappings: %ld kB mapped, RSS %ld kB, PSS %ld kB, private dirty %ld kB; "
           "anonymous memory added by the load: %ld kB\n",
           mem.file_bytes / 1024, mem.rss, mem.pss, mem.priv_dirty, anon_added);
    if (mem.rss <= 0)
        fails += s_fail("the checkpoint is not mapped (or never read)");
    if (mem.priv_dirty != 0)
        fails += s_fail("pages of the checkpoint mapping were written (copied on write)");
    /* Both processes read the same pages: PSS = RSS / 2 exactly for pages
     * both touched; 0.6 leaves room for pages only one touched (headers). */
    if (mem.pss * 10 > mem.rss * 6)
        fails += s_fail("PSS of the checkpoint is not about half its RSS: pages not shared");
    /* The baseline, in this process after the stored load: --weights f32,
     * a widened copy (2x the bf16 bytes). The stored load must add at least
     * the file's size less (allocator overheads, ASan's included, are alike
     * in both). */
    mm_backend *be2 = NULL;
    mm_model *m2 = NULL;
    long anon_f32 = 0;
    if (s_load_and_run(argv[1], MM_WEIGHTS_F32, &be2, &m2, &anon_f32))
        fails += s_fail("could not load and run the model with --weights f32");
    printf("anonymous memory added by a --weights f32 load: %ld kB\n", anon_f32);
    if ((anon_f32 - anon_added) * 1024 < mem.file_bytes)
        fails += s_fail("the stored load did not save the checkpoint's size in anonymous memory "
                        "beside --weights f32: weights were copied");
    mm_model_destroy(&m2);
    mm_backend_destroy(&be2);
    c = 'd';
    if (write(done[1], &c, 1) != 1)
        fails += s_fail("pipe write");
    int st;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fails += s_fail("child exited badly");
    mm_model_destroy(&m);
    mm_backend_destroy(&be);
    printf("%s\n", fails ? "FAILED" : "ok");
    return fails ? 1 : 0;
}

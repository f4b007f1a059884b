/* test_audit — runs the audit module's self-test in a scratch directory (records, a torn
 * last line, the start-up scan for cases a dead run left unfinished, reported once). */
#include <stdio.h>
#include <stdlib.h>

#include "audit.h"

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    int rc = mm_audit_selftest(dir, 1);
    printf("audit self-test: %s\n", rc == 0 ? "ok" : "FAILED");
    return rc == 0 ? 0 : 1;
}

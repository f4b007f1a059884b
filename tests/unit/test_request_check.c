/* test_request_check — runs the request_check module's self-test (NUL bytes,
 * UTF-8 well-formedness, case id length and control characters, the wire walk). */
#include <stdio.h>

#include "request_check.h"

int main(void) {
    int rc = mm_request_check_selftest(1); /* what failed, on stderr */
    printf("request_check self-test: %s\n", rc == 0 ? "ok" : "FAILED");
    return rc == 0 ? 0 : 1;
}

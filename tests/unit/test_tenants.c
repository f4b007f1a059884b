/* test_tenants — runs the tenants module's self-test (key hashing, quotas,
 * config parsing and its error messages). */
#include <stdio.h>

#include "tenants.h"

int main(int argc, char **argv) {
    int verbose = argc > 1;
    int rc = mm_tenants_selftest(verbose);
    printf("tenants self-test: %s\n", rc == 0 ? "ok" : "FAILED");
    return rc == 0 ? 0 : 1;
}

/* medmoe-keygen PREFIX — a CurveZMQ key pair for the router or an expert:
 * PREFIX.key (secret, Z85, mode 0600) and PREFIX.pub (public, Z85).
 * The router reads its .key with --curve-secret-key and the experts' .pub
 * files with --curve-allow; an expert reads its .key with --curve-key and
 * the router's .pub with --curve-server-key.
 *
 * medmoe-keygen --api-key — a tenant API key for the gRPC front door: 32
 * random bytes as hex on line 1 (give it to the tenant), its sha256 hex on
 * line 2 (the key_sha256 of the router's --tenants file, which never holds
 * the key itself).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "hash.h"

static int s_api_key(void) {
    unsigned char raw[32];
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "medmoe-keygen: getrandom: %s\n", strerror(errno));
            return 1;
        }
        got += (size_t)n;
    }
    char key[2 * sizeof raw + 1], hash[MM_SHA256_HEX];
    for (size_t i = 0; i < sizeof raw; i++)
        snprintf(key + 2 * i, 3, "%02x", raw[i]);
    mm_sha256_buf_hex(key, strlen(key), hash);
    printf("%s\n%s\n", key, hash);
    return fflush(stdout) == 0 ? 0 : 1;
}

static int s_write(const char *path, const char *key, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0 || fchmod(fd, mode) != 0) { /* an existing file keeps its mode otherwise */
        fprintf(stderr, "medmoe-keygen: %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return 1;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "%s\n", key);
    int ok = write(fd, line, (size_t)n) == n;
    ok &= close(fd) == 0;
    if (!ok) {
        fprintf(stderr, "medmoe-keygen: %s: write failed\n", path);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fprintf(argc == 2 ? stdout : stderr,
                "usage: medmoe-keygen PREFIX\n"
                "       medmoe-keygen --api-key\n"
                "\n"
                "Write a CurveZMQ key pair: PREFIX.key (secret, Z85, mode 0600) and\n"
                "PREFIX.pub (public, Z85).\n"
                "--api-key: print a new tenant API key (64 hex digits) on line 1 and\n"
                "its sha256 (hex, for the router's --tenants file) on line 2.\n");
        return argc == 2 ? 0 : 2;
    }
    if (!strcmp(argv[1], "--api-key"))
        return s_api_key();
    if (argv[1][0] == '-') { /* an option we do not know, not a prefix */
        fprintf(stderr,
                "medmoe-keygen: unknown option '%s' (usage: medmoe-keygen PREFIX; "
                "./-x for a prefix that starts with '-')\n",
                argv[1]);
        return 2;
    }
    char pub[41], sec[41];
    if (zmq_curve_keypair(pub, sec) != 0) {
        fprintf(stderr, "medmoe-keygen: zmq_curve_keypair: %s (libzmq without CURVE?)\n",
                zmq_strerror(zmq_errno()));
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s.key", argv[1]);
    if (s_write(path, sec, 0600))
        return 1;
    snprintf(path, sizeof path, "%s.pub", argv[1]);
    if (s_write(path, pub, 0644))
        return 1;
    printf("%s\n", pub);
    return 0;
}

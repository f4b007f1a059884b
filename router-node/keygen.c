/* medmoe-keygen PREFIX — a CurveZMQ key pair for the router or an expert:
 * PREFIX.key (secret, Z85, mode 0600) and PREFIX.pub (public, Z85).
 * The router reads its .key with --curve-secret-key and the experts' .pub
 * files with --curve-allow; an expert reads its .key with --curve-key and
 * the router's .pub with --curve-server-key.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

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
                "\n"
                "Write a CurveZMQ key pair: PREFIX.key (secret, Z85, mode 0600) and\n"
                "PREFIX.pub (public, Z85).\n");
        return argc == 2 ? 0 : 2;
    }
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

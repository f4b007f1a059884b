/* bench_zmq_rtt — the floor under the router's per-MoE-layer dispatch: a bare
 * ZeroMQ DEALER -> ROUTER -> DEALER round trip over TCP loopback carrying the
 * same bytes as one Work/Result exchange (a ~40-byte header frame plus a
 * rows x width f32 tensor frame each way), echo in another thread so that
 * every hop wakes a sleeping peer as the router and an expert do.
 *
 *     bench_zmq_rtt [--width 64] [--rows 1,16,135] [--iters 2000]
 *
 * Prints one line per row count: median / p90 / mean microseconds.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define HEADER_BYTES 40

typedef struct echo_args {
    void *ctx;
    char endpoint[256];
    int ready;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} echo_args;

static double s_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* ROUTER echo: identity, header, tensor in; the same frames back. An empty
 * header frame ends the thread. */
static void *s_echo(void *p) {
    echo_args *a = p;
    void *s = zmq_socket(a->ctx, ZMQ_ROUTER);
    int linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(s, "tcp://127.0.0.1:*") != 0) {
        fprintf(stderr, "bench_zmq_rtt: bind: %s\n", zmq_strerror(zmq_errno()));
        exit(1);
    }
    size_t len = sizeof a->endpoint;
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, a->endpoint, &len);
    pthread_mutex_lock(&a->mu);
    a->ready = 1;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
    for (;;) {
        zmq_msg_t f[3];
        int n = 0, more = 1;
        while (more && n < 3) {
            zmq_msg_init(&f[n]);
            if (zmq_msg_recv(&f[n], s, 0) < 0)
                goto out;
            more = zmq_msg_more(&f[n]);
            n++;
        }
        int stop = n >= 2 && zmq_msg_size(&f[1]) == 0;
        for (int i = 0; i < n; i++)
            zmq_msg_send(&f[i], s, i + 1 < n ? ZMQ_SNDMORE : 0);
        if (stop)
            break;
    }
out:
    zmq_close(s);
    return NULL;
}

static int s_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int width = 64, iters = 2000;
    const char *rows_arg = "1,16,135";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--width") && i + 1 < argc)
            width = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
            rows_arg = argv[++i];
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else {
            printf("usage: bench_zmq_rtt [--width W] [--rows R1,R2,...] [--iters N]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (width <= 0 || iters <= 0) {
        fprintf(stderr, "bench_zmq_rtt: --width and --iters must be > 0\n");
        return 2;
    }
    void *ctx = zmq_ctx_new();
    echo_args ea = {.ctx = ctx};
    pthread_mutex_init(&ea.mu, NULL);
    pthread_cond_init(&ea.cv, NULL);
    pthread_t th;
    pthread_create(&th, NULL, s_echo, &ea);
    pthread_mutex_lock(&ea.mu);
    while (!ea.ready)
        pthread_cond_wait(&ea.cv, &ea.mu);
    pthread_mutex_unlock(&ea.mu);

    void *d = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(d, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(d, ea.endpoint);
    double *t = malloc(sizeof(double) * (size_t)iters);
    char header[HEADER_BYTES];
    memset(header, 0x5a, sizeof header);
    char *rows_copy = strdup(rows_arg);
    printf("bare ZeroMQ DEALER->ROUTER->DEALER round trip, tcp loopback, %d-byte header + "
           "rows x %d f32 each way, %d iterations (libzmq %d.%d.%d)\n",
           HEADER_BYTES, width, iters, ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH);
    for (char *tok = strtok(rows_copy, ","); tok; tok = strtok(NULL, ",")) {
        int rows = atoi(tok);
        if (rows <= 0)
            continue;
        size_t bytes = (size_t)rows * (size_t)width * 4;
        char *payload = calloc(1, bytes);
        char *back = malloc(bytes);
        for (int i = -100; i < iters; i++) { /* 100 warm-up trips */
            double t0 = s_now_us();
            zmq_send(d, header, sizeof header, ZMQ_SNDMORE);
            zmq_send(d, payload, bytes, 0);
            zmq_recv(d, header, sizeof header, 0);
            zmq_recv(d, back, bytes, 0);
            if (i >= 0)
                t[i] = s_now_us() - t0;
        }
        double sum = 0;
        for (int i = 0; i < iters; i++)
            sum += t[i];
        qsort(t, (size_t)iters, sizeof *t, s_cmp);
        printf("  rows %4d (%8zu B): median %7.1f us  p90 %7.1f us  mean %7.1f us\n", rows, bytes,
               t[iters / 2], t[iters * 9 / 10], sum / iters);
        free(payload);
        free(back);
    }
    zmq_send(d, "", 0, ZMQ_SNDMORE);
    zmq_send(d, "", 0, 0);
    pthread_join(th, NULL);
    free(rows_copy);
    free(t);
    zmq_close(d);
    zmq_ctx_term(ctx);
    return 0;
}

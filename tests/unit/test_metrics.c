/* test_metrics.c — common/metrics.c and common/log.c: the exposition text
 * byte for byte, label escaping, registration errors, the series limit, the
 * HTTP endpoint scraped over a real socket (200/404/405/400), updates from
 * several threads while scraping, and both log formats. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "clock.h"
#include "log.h"
#include "metrics.h"
#include "status.h"

static const char s_dropped[] =
    "# HELP medmoe_metrics_dropped_total Metric updates dropped: a family reached its series "
    "limit or memory ran out.\n"
    "# TYPE medmoe_metrics_dropped_total counter\n";

static char *s_render(mm_metrics *reg) {
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(mm_metrics_render(reg, &text, &len), MM_OK);
    assert_non_null(text);
    assert_int_equal(strlen(text), len);
    return text;
}

static void test_render_format(void **state) {
    (void)state;
    mm_metrics *reg = NULL;
    assert_int_equal(mm_metrics_new(&reg), MM_OK);
    mm_metric *c = mm_metrics_counter(reg, "medmoe_cases_total", "Cases.", "tenant,status");
    mm_metric *g = mm_metrics_gauge(reg, "medmoe_queue_depth", "Waiting\\cases\nnow.", NULL);
    static const double b[] = {0.005, 0.1, 1};
    mm_metric *h = mm_metrics_histogram(reg, "medmoe_ttft_seconds", "TTFT.", "tenant", b, 3);
    assert_non_null(c);
    assert_non_null(g);
    assert_non_null(h);
    assert_int_equal(mm_metric_add(c, 1, "a", "ok"), MM_OK);
    assert_int_equal(mm_metric_add(c, 2, "a", "ok"), MM_OK);
    assert_int_equal(mm_metric_add(c, 1, "b\"\\\n", "error"), MM_OK);
    assert_int_equal(mm_metric_set(g, 7, 0), MM_OK);
    assert_int_equal(mm_metric_add(g, -2.5), MM_OK);
    assert_int_equal(mm_metric_observe(h, 0.005, "a"), MM_OK); /* le is inclusive */
    assert_int_equal(mm_metric_observe(h, 0.05, "a"), MM_OK);
    assert_int_equal(mm_metric_observe(h, 5, "a"), MM_OK);
    char *text = s_render(reg);
    char want[4096];
    snprintf(want, sizeof want,
             "%smedmoe_metrics_dropped_total 0\n"
             "# HELP medmoe_cases_total Cases.\n"
             "# TYPE medmoe_cases_total counter\n"
             "medmoe_cases_total{tenant=\"a\",status=\"ok\"} 3\n"
             "medmoe_cases_total{tenant=\"b\\\"\\\\\\n\",status=\"error\"} 1\n"
             "# HELP medmoe_queue_depth Waiting\\\\cases\\nnow.\n"
             "# TYPE medmoe_queue_depth gauge\n"
             "medmoe_queue_depth 4.5\n"
             "# HELP medmoe_ttft_seconds TTFT.\n"
             "# TYPE medmoe_ttft_seconds histogram\n"
             "medmoe_ttft_seconds_bucket{tenant=\"a\",le=\"0.005\"} 1\n"
             "medmoe_ttft_seconds_bucket{tenant=\"a\",le=\"0.1\"} 2\n"
             "medmoe_ttft_seconds_bucket{tenant=\"a\",le=\"1\"} 2\n"
             "medmoe_ttft_seconds_bucket{tenant=\"a\",le=\"+Inf\"} 3\n"
             "medmoe_ttft_seconds_sum{tenant=\"a\"} 5.0549999999999997\n"
             "medmoe_ttft_seconds_count{tenant=\"a\"} 3\n",
             s_dropped);
    assert_string_equal(text, want);
    free(text);

    /* removal of a series; same registration returns the same family */
    assert_int_equal(mm_metric_remove(c, "a", "ok"), MM_OK);
    assert_int_equal(mm_metric_remove(c, "a", "ok"), MM_ENOTFOUND);
    assert_ptr_equal(mm_metrics_counter(reg, "medmoe_cases_total", "x", "tenant,status"), c);
    text = s_render(reg);
    assert_null(strstr(text, "status=\"ok\""));
    assert_non_null(strstr(text, "status=\"error\"} 1\n"));
    free(text);
    mm_metrics_destroy(&reg);
    assert_null(reg);
}

static void test_errors(void **state) {
    (void)state;
    mm_metrics *reg = NULL;
    assert_int_equal(mm_metrics_new(&reg), MM_OK);
    static const double b[] = {1, 2}, bad[] = {2, 1};
    assert_null(mm_metrics_counter(reg, "9bad", "", NULL));
    assert_non_null(strstr(mm_metrics_error(reg), "9bad"));
    assert_null(mm_metrics_counter(reg, "ok_name", "", "a,,b"));
    assert_null(mm_metrics_counter(reg, "ok_name", "", "__x"));
    assert_null(mm_metrics_histogram(reg, "h", "", "le", b, 2));
    assert_null(mm_metrics_histogram(reg, "h", "", NULL, bad, 2));
    assert_null(mm_metrics_histogram(reg, "h", "", NULL, b, 0));
    mm_metric *c = mm_metrics_counter(reg, "c_total", "", "x");
    assert_non_null(c);
    assert_null(mm_metrics_gauge(reg, "c_total", "", "x"));   /* other type */
    assert_null(mm_metrics_counter(reg, "c_total", "", "y")); /* other labels */
    assert_int_equal(mm_metric_add(c, -1, "a"), MM_EINVAL);
    assert_int_equal(mm_metric_set(c, 1, "a"), MM_EINVAL);
    assert_int_equal(mm_metric_observe(c, 1, "a"), MM_EINVAL);
    assert_int_equal(mm_metric_add(NULL, 1), MM_OK); /* a failed registration is harmless */
    /* the series limit: further tuples are dropped and counted */
    char v[32];
    for (int i = 0; i < MM_METRICS_MAX_SERIES; i++) {
        snprintf(v, sizeof v, "%d", i);
        assert_int_equal(mm_metric_add(c, 1, v), MM_OK);
    }
    assert_int_equal(mm_metric_add(c, 1, "one-too-many"), MM_ENOMEM);
    assert_int_equal(mm_metric_add(c, 1, "0"), MM_OK); /* existing tuples still count */
    char *text = s_render(reg);
    assert_non_null(strstr(text, "\nmedmoe_metrics_dropped_total 1\n"));
    assert_non_null(strstr(text, "\nc_total{x=\"0\"} 2\n"));
    assert_null(strstr(text, "one-too-many"));
    free(text);
    mm_metrics_destroy(&reg);
}

/* ---- HTTP ---------------------------------------------------------------- */

/* A TCP connection to 127.0.0.1:port from the local address src (another
 * loopback address is another client to the server), or -1. */
static int s_connect_from(const char *src, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in me = {.sin_family = AF_INET};
    assert_int_equal(inet_pton(AF_INET, src, &me.sin_addr), 1);
    assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof me), 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends req raw to 127.0.0.1:port from src, returns the whole answer
 * (malloc'd; "" when the server closed the connection unanswered). */
static char *s_http_from(const char *src, int port, const char *req) {
    int fd = s_connect_from(src, port);
    assert_true(fd >= 0);
    size_t n = strlen(req);
    assert_int_equal(write(fd, req, n), (ssize_t)n);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    for (;;) {
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    buf[len] = 0;
    close(fd);
    return buf;
}

static char *s_http(int port, const char *req) { return s_http_from("127.0.0.1", port, req); }

static void s_expect_status(int port, const char *req, const char *status) {
    char *a = s_http(port, req);
    /* the server answers HTTP/1.1 whatever the request's version: compare the code */
    if (strncmp(a, "HTTP/1.", 7) || strncmp(a + 8, status, strlen(status)))
        fail_msg("request %.40s...: want '%s', got '%.200s'", req, status, a);
    free(a);
}

static void s_collect(mm_metrics *reg, void *ctx) {
    mm_metric_set(ctx, mm_metrics_process_rss_bytes());
    (void)reg;
}

static void test_http(void **state) {
    (void)state;
    mm_metrics *reg = NULL;
    char err[256] = "";
    assert_int_equal(mm_metrics_new(&reg), MM_OK);
    mm_metric *c = mm_metrics_counter(reg, "x_total", "X.", "k");
    mm_metric *rss = mm_metrics_gauge(reg, "x_memory_bytes", "RSS.", NULL);
    mm_metrics_on_collect(reg, s_collect, rss);
    mm_metric_add(c, 5, "v");
    mm_metrics_server *srv = NULL;
    assert_int_equal(mm_metrics_serve(reg, "127.0.0.1:99999", &srv, err, sizeof err), MM_EINVAL);
    assert_int_equal(mm_metrics_serve(reg, "nocolon", &srv, err, sizeof err), MM_EINVAL);
    assert_int_equal(mm_metrics_serve(reg, "127.0.0.1:0", &srv, err, sizeof err), MM_OK);
    int port = mm_metrics_server_port(srv);
    assert_true(port > 0);
    /* a second server on the same port: a precise bind error */
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    mm_metrics_server *srv2 = NULL;
    assert_int_equal(mm_metrics_serve(reg, addr, &srv2, err, sizeof err), MM_EIO);
    assert_non_null(strstr(err, "in use"));

    char *a = s_http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_non_null(strstr(a, "HTTP/1.1 200"));
    assert_non_null(strstr(a, "text/plain; version=0.0.4"));
    assert_non_null(strstr(a, "\r\n\r\n# HELP medmoe_metrics_dropped_total"));
    assert_non_null(strstr(a, "\nx_total{k=\"v\"} 5\n"));
    const char *m = strstr(a, "\nx_memory_bytes ");
    assert_non_null(m);
    assert_true(strtod(m + 16, NULL) > 1e6); /* the collect hook ran: a real RSS */
    free(a);
    a = s_http(port, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_non_null(strstr(a, " 200 "));
    assert_non_null(strstr(a, "\r\n\r\nok\n"));
    free(a);
    a = s_http(port, "HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_non_null(strstr(a, " 200 "));
    assert_null(strstr(a, "x_total")); /* no body for HEAD */
    free(a);
    s_expect_status(port, "GET /nope HTTP/1.0\r\n\r\n", " 404");
    s_expect_status(port, "GET /metrics/x HTTP/1.0\r\n\r\n", " 404");
    a = s_http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "Content-Length: 5\r\n\r\nhello");
    assert_non_null(strstr(a, "HTTP/1.1 405"));
    assert_non_null(strstr(a, "Allow: GET, HEAD"));
    free(a);
    s_expect_status(port, "DELETE /healthz HTTP/1.0\r\n\r\n", " 405");
    /* not HTTP: libmicrohttpd answers 400 or just closes; either way no crash */
    a = s_http(port, "garbage\r\n\r\n");
    assert_true(!*a || strstr(a, " 400 "));
    free(a);
    /* still serving after the bad ones */
    s_expect_status(port, "GET /healthz HTTP/1.0\r\n\r\n", " 200");

    char path[] = "/tmp/mm-metrics-port-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(mm_metrics_server_write_port(srv, path, err, sizeof err), MM_OK);
    FILE *f = fopen(path, "r");
    int got = 0;
    assert_int_equal(fscanf(f, "%d", &got), 1);
    fclose(f);
    unlink(path);
    assert_int_equal(got, port);

    mm_metrics_server_stop(&srv);
    assert_null(srv);
    mm_metrics_server_stop(&srv); /* idempotent */
    mm_metrics_destroy(&reg);
}

/* ---- concurrency --------------------------------------------------------- */

#define S_THREADS 4
#define S_ITERS 20000

typedef struct s_ctx {
    mm_metric *c, *h, *g; /* shared families */
    int port;             /* for the scraper */
    volatile int stop;    /* scraper: quit   */
    int scrapes;          /* scraper: done   */
} s_ctx;

static void *s_updater(void *arg) {
    s_ctx *x = arg;
    for (int i = 0; i < S_ITERS; i++) {
        mm_metric_add(x->c, 1, i % 2 ? "odd" : "even");
        mm_metric_observe(x->h, (double)(i % 3));
        mm_metric_add(x->g, 1);
    }
    return NULL;
}

static void *s_scraper(void *arg) {
    s_ctx *x = arg;
    while (!x->stop) {
        char *a = s_http(x->port, "GET /metrics HTTP/1.0\r\n\r\n");
        if (strstr(a, " 200 "))
            x->scrapes++;
        free(a);
    }
    return NULL;
}

static void test_concurrency(void **state) {
    (void)state;
    mm_metrics *reg = NULL;
    char err[256];
    assert_int_equal(mm_metrics_new(&reg), MM_OK);
    static const double b[] = {0.5, 1.5};
    s_ctx x = {.c = mm_metrics_counter(reg, "c_total", "", "parity"),
               .h = mm_metrics_histogram(reg, "h_seconds", "", NULL, b, 2),
               .g = mm_metrics_gauge(reg, "g", "", NULL)};
    mm_metrics_server *srv = NULL;
    assert_int_equal(mm_metrics_serve(reg, ":0", &srv, err, sizeof err), MM_OK);
    x.port = mm_metrics_server_port(srv);
    pthread_t t[S_THREADS], sc;
    assert_int_equal(pthread_create(&sc, NULL, s_scraper, &x), 0);
    for (int i = 0; i < S_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, s_updater, &x), 0);
    for (int i = 0; i < S_THREADS; i++)
        pthread_join(t[i], NULL);
    x.stop = 1;
    pthread_join(sc, NULL);
    assert_true(x.scrapes >= 1);
    char *text = s_render(reg);
    char want[256];
    snprintf(want, sizeof want, "\nc_total{parity=\"even\"} %d\n", S_THREADS * S_ITERS / 2);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "\nh_seconds_count %d\n", S_THREADS * S_ITERS);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "\nh_seconds_bucket{le=\"+Inf\"} %d\n", S_THREADS * S_ITERS);
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof want, "\ng %d\n", S_THREADS * S_ITERS);
    assert_non_null(strstr(text, want));
    free(text);
    mm_metrics_server_stop(&srv);
    mm_metrics_destroy(&reg);
}

/* ---- logs ---------------------------------------------------------------- */

static char *s_slurp(FILE *f) {
    fflush(f);
    long n = ftell(f);
    rewind(f);
    char *s = calloc(1, (size_t)n + 1);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    return s;
}

static void test_log(void **state) {
    (void)state;
    mm_log_level lv;
    mm_log_format fm;
    assert_int_equal(mm_log_level_parse("warn", &lv), MM_OK);
    assert_int_equal(lv, MM_LOG_WARN);
    assert_int_equal(mm_log_level_parse("loud", &lv), MM_EINVAL);
    assert_int_equal(mm_log_format_parse("json", &fm), MM_OK);
    assert_int_equal(fm, MM_LOG_JSON);
    assert_int_equal(mm_log_format_parse("xml", &fm), MM_EINVAL);

    FILE *f = tmpfile();
    mm_log *lg = NULL;
    assert_int_equal(mm_log_new("medmoe-test", f, MM_LOG_TEXT, MM_LOG_INFO, &lg), MM_OK);
    mm_logf(lg, MM_LOG_DEBUG, NULL, "hidden");
    mm_logf(lg, MM_LOG_INFO, NULL, "joined: expert %d", 3);
    mm_logf(lg, MM_LOG_ERROR, "c-1", "two\nlines");
    char *s = s_slurp(f);
    fclose(f);
    assert_null(strstr(s, "hidden"));
    /* 2025-06-01T10:00:00.123Z INFO medmoe-test: joined: expert 3 */
    assert_int_equal(s[4], '-');
    assert_int_equal(s[10], 'T');
    assert_int_equal(s[23], 'Z');
    assert_non_null(strstr(s, "Z INFO medmoe-test: joined: expert 3\n"));
    assert_non_null(strstr(s, "Z ERROR medmoe-test: case c-1: two\\nlines\n"));
    free(s);
    mm_log_destroy(&lg);
    assert_null(lg);

    f = tmpfile();
    assert_int_equal(mm_log_new("medmoe-test", f, MM_LOG_JSON, MM_LOG_DEBUG, &lg), MM_OK);
    mm_logf(lg, MM_LOG_DEBUG, "c\"2", "say \"hi\"\\\t\x01");
    mm_logf(lg, MM_LOG_WARN, NULL, "plain");
    s = s_slurp(f);
    fclose(f);
    assert_non_null(strstr(s, "\",\"level\":\"debug\",\"component\":\"medmoe-test\","
                              "\"case\":\"c\\\"2\",\"msg\":\"say \\\"hi\\\"\\\\\\t\\u0001\"}\n"));
    assert_non_null(
        strstr(s, "\"level\":\"warn\",\"component\":\"medmoe-test\",\"msg\":\"plain\"}\n"));
    assert_int_equal(strncmp(s, "{\"ts\":\"", 7), 0);
    free(s);
    mm_log_destroy(&lg);

    /* an over-long message is cut, the line still ends properly */
    f = tmpfile();
    assert_int_equal(mm_log_new("t", f, MM_LOG_JSON, MM_LOG_INFO, &lg), MM_OK);
    char big[10000];
    memset(big, '"', sizeof big - 1);
    big[sizeof big - 1] = 0;
    mm_logf(lg, MM_LOG_INFO, NULL, "%s", big);
    s = s_slurp(f);
    fclose(f);
    size_t n = strlen(s);
    assert_true(n > 100);
    assert_string_equal(s + n - 3, "\"}\n");
    assert_null(strchr(s, '\n') + 1 < s + n ? strchr(strchr(s, '\n') + 1, '\n') : NULL);
    free(s);
    mm_log_destroy(&lg);
    mm_logf(NULL, MM_LOG_DEBUG, NULL, "a NULL logger writes to stderr (expected in the output)");
}

/* 48 idle connections from one client (127.0.0.1: it connects, never
 * sends) do not keep another client (127.0.0.2) from scraping: the server
 * holds at most MM_METRICS_PER_IP of them and closes the rest at once; the
 * other client's scrape takes at most its baseline (measured here, before
 * the idle connections) + 1 s. Before the per-address limit, 32 idle
 * connections filled the server and scrapes failed for their 10 s. */
static void test_idle_connections(void **state) {
    (void)state;
    mm_metrics *reg = NULL;
    assert_int_equal(mm_metrics_new(&reg), MM_OK);
    mm_metric *g = mm_metrics_gauge(reg, "medmoe_test", "A gauge.", NULL);
    mm_metric_set(g, 1);
    mm_metrics_server *srv = NULL;
    char err[256];
    assert_int_equal(mm_metrics_serve(reg, "127.0.0.1:0", &srv, err, sizeof err), MM_OK);
    int port = mm_metrics_server_port(srv);
    static const char get[] = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    double base = 0;
    for (int i = 0; i < 3; i++) { /* the baseline: the slowest of 3 */
        double t0 = mm_now_ms();
        char *a = s_http_from("127.0.0.2", port, get);
        double dt = mm_now_ms() - t0;
        assert_non_null(strstr(a, "medmoe_test 1"));
        free(a);
        base = dt > base ? dt : base;
    }
    enum { IDLE = 48 };
    int fds[IDLE], open_n = 0;
    for (int i = 0; i < IDLE; i++)
        fds[i] = s_connect_from("127.0.0.1", port);
    /* the connections over the limit are closed by the server: they turn
     * readable (EOF) at once; the ones it holds stay silent (300 ms here, far
     * below the server's idle timeout) */
    struct pollfd pf[IDLE];
    for (int i = 0; i < IDLE; i++)
        pf[i] = (struct pollfd){.fd = fds[i], .events = POLLIN};
    double until = mm_now_ms() + 300;
    while (mm_now_ms() < until)
        poll(pf, IDLE, (int)(until - mm_now_ms()) + 1);
    for (int i = 0; i < IDLE; i++)
        open_n += fds[i] >= 0 && !(pf[i].revents & (POLLIN | POLLHUP | POLLERR));
    double t0 = mm_now_ms();
    char *a = s_http_from("127.0.0.2", port, get);
    double dt = mm_now_ms() - t0;
    printf("     idle connections held: %d of %d; scrape beside them %.1f ms (baseline %.1f ms)\n",
           open_n, IDLE, dt, base);
    if (!strstr(a, "medmoe_test 1"))
        fail_msg("scrape beside %d idle connections: got '%.200s'", IDLE, a);
    free(a);
    assert_true(dt <= base + 1000);
    assert_true(open_n <= MM_METRICS_PER_IP);
    for (int i = 0; i < IDLE; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    mm_metrics_server_stop(&srv);
    mm_metrics_destroy(&reg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render_format), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_http),          cmocka_unit_test(test_concurrency),
        cmocka_unit_test(test_log),           cmocka_unit_test(test_idle_connections),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

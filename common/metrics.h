/* metrics.h — a small Prometheus registry served over HTTP.
 *
 * Offers counters, gauges and histograms (fixed bucket bounds), each a family
 * with a fixed list of label names and one series per distinct tuple of label
 * values; the registry renders them in the Prometheus text exposition format
 * (version 0.0.4) and an optional server (libmicrohttpd, its own thread)
 * answers GET /metrics and GET /healthz.
 *
 * Every update takes the registry's mutex, so any thread may update while the
 * server renders. Label values are passed as varargs strings, exactly as many
 * as the family has label names:
 *
 *     mm_metrics *reg = NULL;
 *     mm_metrics_new(&reg);
 *     mm_metric *cases = mm_metrics_counter(reg, "medmoe_cases_total", "Cases answered.",
 *                                           "tenant,status");
 *     static const double b[] = {0.01, 0.1, 1, 10};
 *     mm_metric *ttft = mm_metrics_histogram(reg, "medmoe_ttft_seconds", "Time to first token.",
 *                                            NULL, b, 4);
 *     mm_metric_add(cases, 1, "hospital-a", "ok");
 *     mm_metric_observe(ttft, 0.42);
 *
 *     mm_metrics_server *srv = NULL;
 *     char err[256];
 *     if (mm_metrics_serve(reg, "0.0.0.0:9090", &srv, err, sizeof err) != MM_OK) ...
 *     ... mm_metrics_server_port(srv) ...   (the bound port: useful with ":0")
 *     mm_metrics_server_stop(&srv);         (before the registry goes)
 *     mm_metrics_destroy(&reg);
 *
 * Families are owned by the registry (never freed separately). A family
 * keeps at most MM_METRICS_MAX_SERIES series; updates to further label tuples
 * are dropped (and counted in medmoe_metrics_dropped_total) so a label fed
 * from outside can not grow memory without bound.
 */
#ifndef MM_METRICS_H
#define MM_METRICS_H

#include <stddef.h>

#define MM_METRICS_MAX_SERIES 4096 /* per family                      */
#define MM_METRICS_MAX_LABELS 8    /* label names per family           */
#define MM_METRICS_MAX_BUCKETS 64  /* bucket bounds per histogram      */
/* The HTTP endpoint's bounds: idle connections of one client cannot keep
 * another's scrapes out. */
#define MM_METRICS_PER_IP 8       /* connections per client address   */
#define MM_METRICS_CONNECTIONS 64 /* connections in all               */
#define MM_METRICS_IDLE_S 10      /* a silent connection is closed    */

typedef struct mm_metrics mm_metrics;
typedef struct mm_metric mm_metric;
typedef struct mm_metrics_server mm_metrics_server;

/* An empty registry. MM_OK or MM_ENOMEM. */
int mm_metrics_new(mm_metrics **reg);
/* Frees the registry and every family (NULL fine); clears the pointer. Stop
 * any server on it first. */
void mm_metrics_destroy(mm_metrics **reg);

/* Register a family. name: [a-zA-Z_:][a-zA-Z0-9_:]*; labels: comma-separated
 * names ("tenant,status"), NULL or "" for none; histogram bounds strictly
 * increasing and finite (the +Inf bucket is implicit). Registering a name
 * twice returns the existing family when its type and labels agree. NULL on a
 * bad argument or out of memory (see mm_metrics_error). A family without
 * labels shows its single series (0) from the start; a labelled one shows
 * the tuples updated so far. */
mm_metric *mm_metrics_counter(mm_metrics *reg, const char *name, const char *help,
                              const char *labels);
mm_metric *mm_metrics_gauge(mm_metrics *reg, const char *name, const char *help,
                            const char *labels);
mm_metric *mm_metrics_histogram(mm_metrics *reg, const char *name, const char *help,
                                const char *labels, const double *bounds, size_t n_bounds);
/* Why the last registration failed. */
const char *mm_metrics_error(const mm_metrics *reg);

/* Updates; the varargs are the label values (const char *, as many as the
 * family has labels). NULL m is a no-op (so a failed registration does not
 * crash its users). MM_OK, MM_EINVAL (wrong type, negative counter add,
 * NaN) or MM_ENOMEM (series limit or allocation; the update is dropped). */
int mm_metric_add(mm_metric *m, double v, ...);     /* counter or gauge */
int mm_metric_set(mm_metric *m, double v, ...);     /* gauge            */
int mm_metric_observe(mm_metric *m, double v, ...); /* histogram        */
/* Removes one series (e.g. a replica that left). MM_OK or MM_ENOTFOUND. */
int mm_metric_remove(mm_metric *m, ...);

/* Called (from the rendering thread, before the registry's lock is taken)
 * at every render: a hook that samples values such as the RSS. fn must be
 * thread-safe. One hook per registry; NULL removes it. */
void mm_metrics_on_collect(mm_metrics *reg, void (*fn)(mm_metrics *reg, void *ctx), void *ctx);

/* The text exposition of every family, in registration order: a malloc'd
 * NUL-terminated string in *text (caller frees), its length in *len. */
int mm_metrics_render(mm_metrics *reg, char **text, size_t *len);

/* Serve reg on listen ("HOST:PORT", "[V6]:PORT" or ":PORT"; port 0 picks a
 * free one) from a thread of libmicrohttpd: GET|HEAD /metrics (the
 * exposition), GET|HEAD /healthz ("ok"); other paths 404, other methods 405.
 * MM_OK, MM_EINVAL (bad address), MM_EIO (cannot bind; err says why). */
int mm_metrics_serve(mm_metrics *reg, const char *listen, mm_metrics_server **srv, char *err,
                     size_t errlen);
/* The bound TCP port. */
int mm_metrics_server_port(const mm_metrics_server *srv);
/* Writes the bound port (decimal + newline) to path atomically (a temporary
 * file then rename), for tests and launchers that listen on port 0. */
int mm_metrics_server_write_port(const mm_metrics_server *srv, const char *path, char *err,
                                 size_t errlen);
/* Stops the thread, closes the socket, frees; NULL fine; clears the pointer. */
void mm_metrics_server_stop(mm_metrics_server **srv);

/* The resident set size of this process in bytes (from /proc/self/statm),
 * -1 when unknown. For a medmoe_*_memory_bytes gauge in a collect hook. */
double mm_metrics_process_rss_bytes(void);

#endif

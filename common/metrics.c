/* metrics.c — see metrics.h. One mutex per registry guards every family and
 * series; the HTTP thread renders under it into a fresh buffer, so a scrape
 * sees one consistent snapshot and never blocks an update for long. */
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "status.h"

typedef enum s_type { S_COUNTER, S_GAUGE, S_HISTOGRAM } s_type;

static const char *const s_type_names[] = {"counter", "gauge", "histogram"};

/* One tuple of label values and its value(s). */
typedef struct s_series {
    struct s_series *next; /* family's list, in creation order                 */
    char **values;         /* [n_labels] label values (owned)                   */
    double value;          /* counter / gauge                                   */
    double sum;            /* histogram: sum of observations                    */
    uint64_t count;        /* histogram: observations                           */
    uint64_t *buckets;     /* histogram: [n_bounds + 1] per bucket, not cumulative */
} s_series;

struct mm_metric {
    mm_metric *next;                     /* registry's list, registration order */
    mm_metrics *reg;                     /* owner (its mutex guards everything) */
    s_type type;                         /* counter, gauge or histogram         */
    char *name, *help;                   /* owned                               */
    char *labels[MM_METRICS_MAX_LABELS]; /* label names (owned)                 */
    size_t n_labels;                     /* used entries of labels              */
    double *bounds;                      /* [n_bounds] histogram upper bounds   */
    size_t n_bounds;                     /* 0 for counters and gauges           */
    s_series *series, *series_tail;      /* the tuples seen so far              */
    size_t n_series;                     /* length of series                    */
};

struct mm_metrics {
    pthread_mutex_t mu;                    /* guards everything below           */
    mm_metric *families, *tail;            /* registration order                */
    mm_metric *dropped;                    /* medmoe_metrics_dropped_total      */
    void (*collect)(mm_metrics *, void *); /* render hook (or NULL)             */
    void *collect_ctx;                     /* its argument                      */
    char err[256];                         /* why the last registration failed  */
};

struct mm_metrics_server {
    mm_metrics *reg;        /* what is served (not owned)    */
    struct MHD_Daemon *mhd; /* the daemon and its thread     */
    int port;               /* bound TCP port                */
};

/* ---- registry ------------------------------------------------------------ */

static void s_series_free(s_series *s, size_t n_labels) {
    if (!s)
        return;
    if (s->values)
        for (size_t i = 0; i < n_labels; i++)
            free(s->values[i]);
    free(s->values);
    free(s->buckets);
    free(s);
}

static void s_family_free(mm_metric *m) {
    for (s_series *s = m->series, *next; s; s = next) {
        next = s->next;
        s_series_free(s, m->n_labels);
    }
    for (size_t i = 0; i < m->n_labels; i++)
        free(m->labels[i]);
    free(m->bounds);
    free(m->name);
    free(m->help);
    free(m);
}

int mm_metrics_new(mm_metrics **reg) {
    if (!reg)
        return MM_EINVAL;
    *reg = NULL;
    mm_metrics *r = calloc(1, sizeof *r);
    if (!r)
        return MM_ENOMEM;
    pthread_mutex_init(&r->mu, NULL);
    r->dropped = mm_metrics_counter(r, "medmoe_metrics_dropped_total",
                                    "Metric updates dropped: a family reached its series limit "
                                    "or memory ran out.",
                                    NULL);
    if (!r->dropped) {
        mm_metrics_destroy(&r);
        return MM_ENOMEM;
    }
    *reg = r;
    return MM_OK;
}

void mm_metrics_destroy(mm_metrics **reg) {
    if (!reg || !*reg)
        return;
    mm_metrics *r = *reg;
    for (mm_metric *m = r->families, *next; m; m = next) {
        next = m->next;
        s_family_free(m);
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
    *reg = NULL;
}

const char *mm_metrics_error(const mm_metrics *reg) { return reg ? reg->err : "no registry"; }

static int s_name_ok(const char *s, int colon) {
    if (!s || !*s || (*s >= '0' && *s <= '9'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || (colon && *s == ':')))
            return 0;
    return 1;
}

/* A new series for the given label values (copied); NULL when out of memory. */
static s_series *s_series_new(const mm_metric *m, const char *const *values) {
    s_series *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (m->n_labels && !(s->values = calloc(m->n_labels, sizeof *s->values)))
        goto oom;
    for (size_t i = 0; i < m->n_labels; i++)
        if (!(s->values[i] = strdup(values[i])))
            goto oom;
    if (m->type == S_HISTOGRAM && !(s->buckets = calloc(m->n_bounds + 1, sizeof *s->buckets)))
        goto oom;
    return s;
oom:
    s_series_free(s, m->n_labels);
    return NULL;
}

static void s_append(mm_metric *m, s_series *s) {
    if (m->series_tail)
        m->series_tail->next = s;
    else
        m->series = s;
    m->series_tail = s;
    m->n_series++;
}

/* Registration; the registry's lock is held by the caller. */
static mm_metric *s_register(mm_metrics *r, s_type type, const char *name, const char *help,
                             const char *labels, const double *bounds, size_t n_bounds) {
    char names[MM_METRICS_MAX_LABELS][128];
    size_t n_labels = 0;
    if (!s_name_ok(name, 1)) {
        snprintf(r->err, sizeof r->err, "metric name '%s' is not [a-zA-Z_:][a-zA-Z0-9_:]*",
                 name ? name : "(null)");
        return NULL;
    }
    for (const char *p = labels && *labels ? labels : NULL; p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (n_labels == MM_METRICS_MAX_LABELS || len == 0 || len >= sizeof names[0]) {
            snprintf(r->err, sizeof r->err, "%s: bad label list '%s' (at most %d names)", name,
                     labels, MM_METRICS_MAX_LABELS);
            return NULL;
        }
        memcpy(names[n_labels], p, len);
        names[n_labels][len] = 0;
        /* "le" is the histogram's own; "__" names are reserved by Prometheus */
        if (!s_name_ok(names[n_labels], 0) || !strncmp(names[n_labels], "__", 2) ||
            (type == S_HISTOGRAM && !strcmp(names[n_labels], "le"))) {
            snprintf(r->err, sizeof r->err, "%.100s: bad label name '%.100s'", name,
                     names[n_labels]);
            return NULL;
        }
        n_labels++;
        p = comma ? comma + 1 : NULL;
    }
    if (type == S_HISTOGRAM) {
        if (!bounds || n_bounds == 0 || n_bounds > MM_METRICS_MAX_BUCKETS) {
            snprintf(r->err, sizeof r->err, "%s: a histogram needs 1..%d bucket bounds", name,
                     MM_METRICS_MAX_BUCKETS);
            return NULL;
        }
        for (size_t i = 0; i < n_bounds; i++)
            if (!isfinite(bounds[i]) || (i && bounds[i] <= bounds[i - 1])) {
                snprintf(r->err, sizeof r->err,
                         "%s: bucket bounds must be finite and strictly increasing (bound %zu)",
                         name, i);
                return NULL;
            }
    }
    for (mm_metric *m = r->families; m; m = m->next) {
        if (strcmp(m->name, name))
            continue;
        int same = m->type == type && m->n_labels == n_labels;
        for (size_t i = 0; same && i < n_labels; i++)
            same = !strcmp(m->labels[i], names[i]);
        if (same)
            return m;
        snprintf(r->err, sizeof r->err, "%s: registered before with another type or labels", name);
        return NULL;
    }
    mm_metric *m = calloc(1, sizeof *m);
    if (!m)
        goto oom;
    m->reg = r;
    m->type = type;
    if (!(m->name = strdup(name)) || !(m->help = strdup(help ? help : "")))
        goto oom;
    for (; m->n_labels < n_labels; m->n_labels++)
        if (!(m->labels[m->n_labels] = strdup(names[m->n_labels])))
            goto oom;
    if (type == S_HISTOGRAM) {
        if (!(m->bounds = malloc(n_bounds * sizeof *m->bounds)))
            goto oom;
        memcpy(m->bounds, bounds, n_bounds * sizeof *m->bounds);
        m->n_bounds = n_bounds;
    }
    if (n_labels == 0) { /* the one series exists from the start: 0 is a value */
        s_series *s = s_series_new(m, NULL);
        if (!s)
            goto oom;
        s_append(m, s);
    }
    if (r->tail)
        r->tail->next = m;
    else
        r->families = m;
    r->tail = m;
    return m;
oom:
    if (m)
        s_family_free(m);
    snprintf(r->err, sizeof r->err, "%s: out of memory", name);
    return NULL;
}

static mm_metric *s_register_locked(mm_metrics *r, s_type type, const char *name, const char *help,
                                    const char *labels, const double *bounds, size_t n_bounds) {
    if (!r)
        return NULL;
    pthread_mutex_lock(&r->mu);
    mm_metric *m = s_register(r, type, name, help, labels, bounds, n_bounds);
    pthread_mutex_unlock(&r->mu);
    return m;
}

mm_metric *mm_metrics_counter(mm_metrics *reg, const char *name, const char *help,
                              const char *labels) {
    return s_register_locked(reg, S_COUNTER, name, help, labels, NULL, 0);
}

mm_metric *mm_metrics_gauge(mm_metrics *reg, const char *name, const char *help,
                            const char *labels) {
    return s_register_locked(reg, S_GAUGE, name, help, labels, NULL, 0);
}

mm_metric *mm_metrics_histogram(mm_metrics *reg, const char *name, const char *help,
                                const char *labels, const double *bounds, size_t n_bounds) {
    return s_register_locked(reg, S_HISTOGRAM, name, help, labels, bounds, n_bounds);
}

void mm_metrics_on_collect(mm_metrics *reg, void (*fn)(mm_metrics *, void *), void *ctx) {
    if (!reg)
        return;
    pthread_mutex_lock(&reg->mu);
    reg->collect = fn;
    reg->collect_ctx = ctx;
    pthread_mutex_unlock(&reg->mu);
}

/* ---- updates ------------------------------------------------------------- */

/* The series for the label values in ap (created when new); lock held.
 * NULL: over the series limit or out of memory (counted as dropped). */
static s_series *s_find(mm_metric *m, va_list ap, s_series **prev_out) {
    const char *values[MM_METRICS_MAX_LABELS];
    for (size_t i = 0; i < m->n_labels; i++) {
        values[i] = va_arg(ap, const char *);
        if (!values[i])
            values[i] = "";
    }
    s_series *prev = NULL;
    for (s_series *s = m->series; s; prev = s, s = s->next) {
        size_t i = 0;
        while (i < m->n_labels && !strcmp(s->values[i], values[i]))
            i++;
        if (i == m->n_labels) {
            if (prev_out)
                *prev_out = prev;
            return s;
        }
    }
    if (prev_out) /* a removal: do not create */
        return NULL;
    s_series *s = m->n_series < MM_METRICS_MAX_SERIES ? s_series_new(m, values) : NULL;
    if (!s) {
        if (m->reg->dropped && m->reg->dropped->series)
            m->reg->dropped->series->value += 1;
        return NULL;
    }
    s_append(m, s);
    return s;
}

typedef enum s_op { S_ADD, S_SET, S_OBSERVE } s_op;

static int s_update(mm_metric *m, s_op op, double v, va_list ap) {
    if (!m)
        return MM_OK;
    if (isnan(v) || (op == S_ADD && m->type == S_HISTOGRAM) ||
        (op == S_ADD && m->type == S_COUNTER && v < 0) || (op == S_SET && m->type != S_GAUGE) ||
        (op == S_OBSERVE && m->type != S_HISTOGRAM))
        return MM_EINVAL;
    pthread_mutex_lock(&m->reg->mu);
    s_series *s = s_find(m, ap, NULL);
    if (s) {
        if (op == S_ADD)
            s->value += v;
        else if (op == S_SET)
            s->value = v;
        else {
            size_t b = 0; /* first bound >= v; n_bounds is the +Inf bucket */
            while (b < m->n_bounds && v > m->bounds[b])
                b++;
            s->buckets[b]++;
            s->count++;
            s->sum += v;
        }
    }
    pthread_mutex_unlock(&m->reg->mu);
    return s ? MM_OK : MM_ENOMEM;
}

int mm_metric_add(mm_metric *m, double v, ...) {
    va_list ap;
    va_start(ap, v);
    int rc = s_update(m, S_ADD, v, ap);
    va_end(ap);
    return rc;
}

int mm_metric_set(mm_metric *m, double v, ...) {
    va_list ap;
    va_start(ap, v);
    int rc = s_update(m, S_SET, v, ap);
    va_end(ap);
    return rc;
}

int mm_metric_observe(mm_metric *m, double v, ...) {
    va_list ap;
    va_start(ap, v);
    int rc = s_update(m, S_OBSERVE, v, ap);
    va_end(ap);
    return rc;
}

int mm_metric_remove(mm_metric *m, ...) {
    if (!m)
        return MM_ENOTFOUND;
    if (m->n_labels == 0)
        return MM_EINVAL; /* the unlabelled series always exists */
    va_list ap;
    va_start(ap, m);
    pthread_mutex_lock(&m->reg->mu);
    s_series *prev = NULL, *s = s_find(m, ap, &prev);
    if (s) {
        if (prev)
            prev->next = s->next;
        else
            m->series = s->next;
        if (m->series_tail == s)
            m->series_tail = prev;
        m->n_series--;
    }
    pthread_mutex_unlock(&m->reg->mu);
    va_end(ap);
    if (!s)
        return MM_ENOTFOUND;
    s_series_free(s, m->n_labels);
    return MM_OK;
}

/* ---- rendering ----------------------------------------------------------- */

typedef struct s_buf {
    char *p;    /* malloc'd, NUL-terminated */
    size_t len; /* bytes used               */
    size_t cap; /* bytes allocated          */
    int oom;    /* an append failed         */
} s_buf;

static void s_cat(s_buf *b, const char *s, size_t n) {
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) {
            if (cap > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void s_str(s_buf *b, const char *s) { s_cat(b, s, strlen(s)); }

/* s escaped for a label value (\\, \", \n) or HELP text (\\, \n). */
static void s_escaped(s_buf *b, const char *s, int quote) {
    for (; *s; s++) {
        if (*s == '\\')
            s_cat(b, "\\\\", 2);
        else if (*s == '\n')
            s_cat(b, "\\n", 2);
        else if (quote && *s == '"')
            s_cat(b, "\\\"", 2);
        else
            s_cat(b, s, 1);
    }
}

/* A sample value: integers exactly, others round-trip (%.17g), and the
 * exposition format's spellings of the special values. */
static void s_num(s_buf *b, double v, int bound) {
    char t[64];
    if (isnan(v))
        snprintf(t, sizeof t, "NaN");
    else if (isinf(v))
        snprintf(t, sizeof t, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 1e15)
        snprintf(t, sizeof t, "%.0f", v);
    else
        snprintf(t, sizeof t, bound ? "%.15g" : "%.17g", v); /* bounds: as written */
    s_str(b, t);
}

/* name{a="x",b="y"[,le="..."]} */
static void s_labels(s_buf *b, const mm_metric *m, const s_series *s, const char *le) {
    if (!m->n_labels && !le)
        return;
    s_str(b, "{");
    for (size_t i = 0; i < m->n_labels; i++) {
        if (i)
            s_str(b, ",");
        s_str(b, m->labels[i]);
        s_str(b, "=\"");
        s_escaped(b, s->values[i], 1);
        s_str(b, "\"");
    }
    if (le) {
        if (m->n_labels)
            s_str(b, ",");
        s_str(b, "le=\"");
        s_str(b, le);
        s_str(b, "\"");
    }
    s_str(b, "}");
}

static void s_render_family(s_buf *b, const mm_metric *m) {
    s_str(b, "# HELP ");
    s_str(b, m->name);
    s_str(b, " ");
    s_escaped(b, m->help, 0);
    s_str(b, "\n# TYPE ");
    s_str(b, m->name);
    s_str(b, " ");
    s_str(b, s_type_names[m->type]);
    s_str(b, "\n");
    for (const s_series *s = m->series; s; s = s->next) {
        if (m->type != S_HISTOGRAM) {
            s_str(b, m->name);
            s_labels(b, m, s, NULL);
            s_str(b, " ");
            s_num(b, s->value, 0);
            s_str(b, "\n");
            continue;
        }
        uint64_t cum = 0;
        for (size_t i = 0; i <= m->n_bounds; i++) {
            char le[64];
            s_buf lb = {0};
            if (i < m->n_bounds) {
                s_num(&lb, m->bounds[i], 1);
                snprintf(le, sizeof le, "%s", lb.p ? lb.p : "?");
                free(lb.p);
            } else {
                snprintf(le, sizeof le, "+Inf");
            }
            cum += s->buckets[i];
            s_str(b, m->name);
            s_str(b, "_bucket");
            s_labels(b, m, s, le);
            s_str(b, " ");
            s_num(b, (double)cum, 0);
            s_str(b, "\n");
        }
        s_str(b, m->name);
        s_str(b, "_sum");
        s_labels(b, m, s, NULL);
        s_str(b, " ");
        s_num(b, s->sum, 0);
        s_str(b, "\n");
        s_str(b, m->name);
        s_str(b, "_count");
        s_labels(b, m, s, NULL);
        s_str(b, " ");
        s_num(b, (double)s->count, 0);
        s_str(b, "\n");
    }
}

int mm_metrics_render(mm_metrics *reg, char **text, size_t *len) {
    if (!reg || !text)
        return MM_EINVAL;
    *text = NULL;
    pthread_mutex_lock(&reg->mu);
    void (*fn)(mm_metrics *, void *) = reg->collect;
    void *ctx = reg->collect_ctx;
    pthread_mutex_unlock(&reg->mu);
    if (fn) /* outside the lock: the hook updates through the same API */
        fn(reg, ctx);
    s_buf b = {0};
    s_str(&b, ""); /* an empty registry still renders "" rather than NULL */
    pthread_mutex_lock(&reg->mu);
    for (const mm_metric *m = reg->families; m; m = m->next)
        s_render_family(&b, m);
    pthread_mutex_unlock(&reg->mu);
    if (b.oom) {
        free(b.p);
        return MM_ENOMEM;
    }
    *text = b.p;
    if (len)
        *len = b.len;
    return MM_OK;
}

double mm_metrics_process_rss_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    unsigned long size = 0, resident = 0;
    int n = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    long page = sysconf(_SC_PAGESIZE);
    return n == 2 && page > 0 ? (double)resident * (double)page : -1;
}

/* ---- HTTP ---------------------------------------------------------------- */

static enum MHD_Result s_respond(struct MHD_Connection *c, unsigned code, const char *type,
                                 char *body, size_t len, int owned, const char *allow) {
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (owned)
            free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (allow)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result s_handle(void *cls, struct MHD_Connection *c, const char *url,
                                const char *method, const char *version, const char *upload,
                                size_t *upload_size, void **con_cls) {
    mm_metrics_server *srv = cls;
    static const char text_plain[] = "text/plain; charset=utf-8";
    int metrics = !strcmp(url, "/metrics"), health = !strcmp(url, "/healthz");
    int get = !strcmp(method, MHD_HTTP_METHOD_GET) || !strcmp(method, MHD_HTTP_METHOD_HEAD);
    (void)upload;
    (void)con_cls;
    if (*upload_size) { /* a body nobody asked for: the answer is already queued */
        *upload_size = 0;
        return MHD_YES;
    }
    if (!metrics && !health) {
        static char nf[] = "not found: try /metrics or /healthz\n";
        return s_respond(c, MHD_HTTP_NOT_FOUND, text_plain, nf, sizeof nf - 1, 0, NULL);
    }
    if (!get) {
        static char na[] = "method not allowed: GET or HEAD\n";
        return s_respond(c, MHD_HTTP_METHOD_NOT_ALLOWED, text_plain, na, sizeof na - 1, 0,
                         "GET, HEAD");
    }
    if (health) {
        static char ok[] = "ok\n";
        return s_respond(c, MHD_HTTP_OK, text_plain, ok, sizeof ok - 1, 0, NULL);
    }
    char *text = NULL;
    size_t len = 0;
    if (mm_metrics_render(srv->reg, &text, &len) != MM_OK) {
        static char oom[] = "out of memory\n";
        return s_respond(c, MHD_HTTP_INTERNAL_SERVER_ERROR, text_plain, oom, sizeof oom - 1, 0,
                         NULL);
    }
    return s_respond(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, len, 1,
                     NULL);
}

/* "HOST:PORT", "[V6]:PORT", ":PORT" -> a bound, listening socket. */
static int s_listen(const char *listen_at, int *fd_out, int *port_out, int *v6, char *err,
                    size_t errlen) {
    char host[256], port[16];
    const char *colon;
    if (!listen_at || !*listen_at)
        return mm_errorf(err, errlen, MM_EINVAL, "empty metrics address");
    if (listen_at[0] == '[') {
        const char *close_br = strchr(listen_at, ']');
        if (!close_br || close_br[1] != ':')
            return mm_errorf(err, errlen, MM_EINVAL, "'%s': want [V6ADDR]:PORT", listen_at);
        colon = close_br + 1;
        snprintf(host, sizeof host, "%.*s", (int)(close_br - listen_at - 1), listen_at + 1);
    } else {
        colon = strrchr(listen_at, ':');
        if (!colon)
            return mm_errorf(err, errlen, MM_EINVAL, "'%s': want HOST:PORT", listen_at);
        if ((size_t)(colon - listen_at) >= sizeof host)
            return mm_errorf(err, errlen, MM_EINVAL, "'%s': host too long", listen_at);
        snprintf(host, sizeof host, "%.*s", (int)(colon - listen_at), listen_at);
    }
    char *end = NULL;
    long p = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || p < 0 || p > 65535)
        return mm_errorf(err, errlen, MM_EINVAL, "'%s': port must be 0..65535", listen_at);
    snprintf(port, sizeof port, "%ld", p);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                    *ai = NULL;
    int g = getaddrinfo(host[0] ? host : NULL, port, &hints, &ai);
    if (g != 0)
        return mm_errorf(err, errlen, MM_EINVAL, "'%s': %s", listen_at, gai_strerror(g));
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        freeaddrinfo(ai);
        return mm_errorf(err, errlen, MM_EIO, "socket: %s", strerror(errno));
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    *v6 = ai->ai_family == AF_INET6;
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 64) != 0) {
        int e = errno;
        freeaddrinfo(ai);
        close(fd);
        return mm_errorf(err, errlen, MM_EIO, "metrics listen %s: %s", listen_at, strerror(e));
    }
    freeaddrinfo(ai);
    struct sockaddr_storage sa;
    socklen_t sl = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        close(fd);
        return mm_errorf(err, errlen, MM_EIO, "getsockname: %s", strerror(errno));
    }
    *port_out = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                               : ((struct sockaddr_in *)&sa)->sin_port);
    *fd_out = fd;
    return MM_OK;
}

int mm_metrics_serve(mm_metrics *reg, const char *listen_at, mm_metrics_server **srv, char *err,
                     size_t errlen) {
    if (!reg || !srv)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_metrics_serve: no registry");
    *srv = NULL;
    int fd = -1, port = 0, v6 = 0;
    int rc = s_listen(listen_at, &fd, &port, &v6, err, errlen);
    if (rc != MM_OK)
        return rc;
    mm_metrics_server *s = calloc(1, sizeof *s);
    if (!s) {
        close(fd);
        return mm_errorf(err, errlen, MM_ENOMEM, "out of memory");
    }
    s->reg = reg;
    s->port = port;
    /* One polling thread: scrapes are rare and rendering is quick; an idle
     * connection costs a socket, not the thread. The limits bound what one
     * client can hold so that others' scrapes are still answered: at most
     * MM_METRICS_PER_IP connections per client address (more are closed at
     * accept), MM_METRICS_CONNECTIONS in all, each closed after
     * MM_METRICS_IDLE_S without a byte, 64 KiB of buffers each. */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | (v6 ? MHD_USE_IPv6 : 0);
    s->mhd = MHD_start_daemon(flags, 0, NULL, NULL, s_handle, s, MHD_OPTION_LISTEN_SOCKET, fd,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)MM_METRICS_CONNECTIONS,
                              MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)MM_METRICS_PER_IP,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)MM_METRICS_IDLE_S,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536, MHD_OPTION_END);
    if (!s->mhd) {
        close(fd);
        free(s);
        return mm_errorf(err, errlen, MM_EIO, "metrics %s: libmicrohttpd did not start", listen_at);
    }
    *srv = s;
    return MM_OK;
}

int mm_metrics_server_port(const mm_metrics_server *srv) { return srv ? srv->port : -1; }

int mm_metrics_server_write_port(const mm_metrics_server *srv, const char *path, char *err,
                                 size_t errlen) {
    if (!srv || !path)
        return mm_errorf(err, errlen, MM_EINVAL, "no server or path");
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: path too long", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return mm_errorf(err, errlen, MM_EIO, "%s: %s", tmp, strerror(errno));
    int bad = fprintf(f, "%d\n", srv->port) < 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return mm_errorf(err, errlen, MM_EIO, "%s: %s", path, strerror(e));
    }
    return MM_OK;
}

void mm_metrics_server_stop(mm_metrics_server **srv) {
    if (!srv || !*srv)
        return;
    if ((*srv)->mhd)
        MHD_stop_daemon((*srv)->mhd); /* joins the thread, closes the socket */
    free(*srv);
    *srv = NULL;
}

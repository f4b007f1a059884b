/* router_metrics.h — the router's case-level Prometheus families, shared by
 * the gRPC front door (grpc_server.c) and the --cases loop (main_router.c)
 * so both register them with the same help, labels and buckets (a second
 * registration returns the same family).
 *
 *     mm_router_case_metrics cm;
 *     if (mm_router_case_metrics_init(reg, &cm) != MM_OK) ...
 *     mm_metric_add(cm.cases, 1, "hospital-a", "OK");
 *     mm_metric_observe(cm.ttft, 0.120);
 *
 * With reg == NULL every handle is NULL and updates are no-ops.
 */
#ifndef MM_ROUTER_METRICS_H
#define MM_ROUTER_METRICS_H

#include "metrics.h"
#include "status.h"

typedef struct mm_router_case_metrics {
    mm_metric *cases;         /* medmoe_cases_total{tenant,status} (status: gRPC code name) */
    mm_metric *ttft;          /* medmoe_ttft_seconds: arrival -> first generated token      */
    mm_metric *token_latency; /* medmoe_token_latency_seconds: between generated tokens    */
    mm_metric *queue;         /* medmoe_queue_depth: cases waiting in the scheduler         */
    mm_metric *active;        /* medmoe_active_cases: cases holding a slot                  */
} mm_router_case_metrics;

static inline int mm_router_case_metrics_init(mm_metrics *reg, mm_router_case_metrics *cm) {
    static const double ttft_b[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
    static const double tok_b[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
    cm->cases = cm->ttft = cm->token_latency = cm->queue = cm->active = NULL;
    if (!reg)
        return MM_OK;
    cm->cases = mm_metrics_counter(reg, "medmoe_cases_total",
                                   "Cases finished, by tenant and status (gRPC code name).",
                                   "tenant,status");
    cm->ttft = mm_metrics_histogram(reg, "medmoe_ttft_seconds",
                                    "Time to first token: case arrival to its first generated "
                                    "token.",
                                    NULL, ttft_b, sizeof ttft_b / sizeof *ttft_b);
    cm->token_latency = mm_metrics_histogram(reg, "medmoe_token_latency_seconds",
                                             "Time between consecutive generated tokens of a "
                                             "case.",
                                             NULL, tok_b, sizeof tok_b / sizeof *tok_b);
    cm->queue = mm_metrics_gauge(reg, "medmoe_queue_depth",
                                 "Cases waiting in the scheduler for a slot.", NULL);
    cm->active =
        mm_metrics_gauge(reg, "medmoe_active_cases", "Cases holding a scheduler slot.", NULL);
    return cm->cases && cm->ttft && cm->token_latency && cm->queue && cm->active ? MM_OK
                                                                                 : MM_EINVAL;
}

#endif

/* scheduler.h — continuous batching: many cases from many tenants share one
 * model, one forward step at a time.
 *
 * Offers a queue of cases (image + question, or candidate labels) that the
 * caller drives with mm_sched_step(). Each step
 *   1. fails cases whose deadline has passed (MM_ETIMEOUT),
 *   2. admits waiting cases into free KV-cache slots, round-robin over the
 *      tenants that have cases waiting (FIFO within a tenant), so a tenant
 *      that floods the queue cannot starve another, and runs the vision
 *      tower of each newly admitted case,
 *   3. runs ONE mm_model_forward over the decode row of every generating case
 *      plus prompt chunks of the cases still prefilling (at most
 *      prefill_chunk rows of one case, max_step_rows rows in all; the
 *      prefill share rotates between cases from step to step),
 *   4. picks each case's next token (greedy, or its own seeded sampler, over
 *      the first mm_tokenizer_size ids), streams it, and finishes a case at
 *      EOS or max_tokens; its slot is free for the next step.
 * A case's tokens, routing and candidates equal what mm_case_answer returns
 * for the same request alone (up to the last bits of batched matmuls, which
 * the tiny test checkpoints' margins absorb).
 *
 * Classification (candidates): the case is prefilled and generates its
 * max_tokens (often 0) like any other, then its candidates are scored with
 * mm_classify in its own slot, synchronously inside that step (one forward
 * per candidate, exactly as mm_case_answer does): simple and exact, at the
 * cost of holding the other cases for those forwards.
 *
 * Threading: none. The scheduler is single-threaded by design: the caller's
 * one engine thread calls submit, cancel and step (the gRPC server does so
 * from its engine loop), and every callback runs on that thread, inside
 * mm_sched_step / mm_sched_cancel / mm_sched_destroy. Callbacks must not call
 * back into the scheduler (such calls fail with MM_EAGAIN).
 *
 * Every accepted case gets exactly one on_done call:
 *   MM_OK           result holds the answer (keys below)
 *   MM_ETIMEOUT     "deadline exceeded" (waiting or running)
 *   MM_ECANCELLED   "cancelled" (from mm_sched_cancel, called before it returns)
 *   MM_EAGAIN       "shutting down" (mm_sched_destroy)
 *   anything else   the model's error for the step the case was in (e.g.
 *                   MM_ETIMEOUT from a distributed expert runner); the
 *                   other cases carry on
 * Rejected submissions (mm_sched_submit != MM_OK) get no callback.
 *
 * The result (borrowed: valid during on_done; json_incref to keep it) has
 * mm_case_answer's keys — answer, tokens, prompt_len, image_start,
 * image_len, routing, expert_summary, vision_ms, prefill_ms,
 * decode_ms_per_token, and with candidates: candidates [{text, logprob,
 * prob}] ranked, classify_ms — plus case_id, tenant, client_case_id,
 * queue_ms (submit to admission), ttft_ms (submit to first token; 0 when
 * none), total_ms, steps (forward steps the case took part in).
 *
 *     mm_sched_options so;  mm_sched_options_default(&so);
 *     mm_sched *s;  char err[512];
 *     if (mm_sched_new(model, tok, &so, &s, err, sizeof err)) {...}
 *     mm_sched_request r;  mm_sched_request_default(&r);
 *     r.tenant = "hospital-a";  r.question = "Is there a lesion?";
 *     r.image_bytes = png;  r.image_len = n;  r.media_type = "image/png";
 *     r.on_token = my_token;  r.on_done = my_done;  r.user = call;
 *     uint64_t id;
 *     if (mm_sched_submit(s, &r, &id, err, sizeof err)) {... reject ...}
 *     while (mm_sched_pending(s) + mm_sched_active(s) > 0)
 *         mm_sched_step(s, err, sizeof err);
 *     mm_sched_destroy(&s);
 */
#ifndef MM_SCHEDULER_H
#define MM_SCHEDULER_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "medmoe.h"
#include "tokenizer.h"

typedef struct mm_sched mm_sched;

typedef struct mm_sched_options {
    size_t max_step_rows; /* token rows per forward step (default 512); must be
                             >= mm_model_n_slots (every decode row fits)       */
    size_t prefill_chunk; /* prompt rows of one case per step (default 256)    */
    size_t max_queued;    /* waiting cases at most (default 256); each holds
                             its preprocessed image, 3*S*S floats (1.3 MiB at
                             S = 336), until it is admitted                    */
} mm_sched_options;

void mm_sched_options_default(mm_sched_options *o);

/* Streaming: called once per generated token with the text that became
 * complete UTF-8 at it (maybe len 0; not NUL-terminated; valid during the
 * call). The EOS token comes with len 0. When the case finishes, bytes still
 * held back (an unfinished character) come in one last call with token -1.
 * The pieces concatenate to the answer before mm_case_answer's strip of
 * leading/trailing whitespace. */
typedef void (*mm_sched_token_fn)(void *user, uint64_t case_id, const char *piece, size_t len,
                                  int32_t token);
/* status: see above; message: "" on MM_OK; result: NULL unless MM_OK. */
typedef void (*mm_sched_done_fn)(void *user, uint64_t case_id, int status, const char *message,
                                 json_t *result);

typedef struct mm_sched_request {
    const char *tenant;                /* required, non-empty; copied               */
    const char *client_case_id;        /* echoed in the result; may be NULL; copied */
    const void *image_bytes;           /* encoded PNG/JPEG, or NULL for text only    */
    size_t image_len;                  /* bytes at image_bytes                       */
    const char *media_type;            /* "image/png", "image/jpeg", NULL = sniff    */
    size_t max_pixels;                 /* 0 = image.c's default                      */
    int no_pad;                        /* 1: plain resize + centre crop              */
    const char *question;              /* must not be empty                          */
    const char *conv_mode;             /* NULL: the backbone's training template     */
    const char *candidates;            /* "a,b,c": classify after generating         */
    const char *const *candidate_list; /* or the candidates as an array (wins;
                                          entries may contain ',')               */
    size_t n_candidate_list;           /* entries in candidate_list                    */
    int max_tokens;                    /* default 64; 0 with candidates: classify only */
    float temperature;                 /* 0 = greedy                                 */
    float top_p;                       /* default 1                                  */
    uint64_t seed;                     /* sampling seed                              */
    double deadline_ms;                /* on mm_now_ms()'s clock; 0 = none           */
    mm_sched_token_fn on_token;        /* may be NULL                                */
    mm_sched_done_fn on_done;          /* required                                   */
    void *user;                        /* passed to both callbacks                   */
} mm_sched_request;

/* max_tokens 64, top_p 1, everything else 0 / NULL. */
void mm_sched_request_default(mm_sched_request *r);

/* The scheduler uses all mm_model_n_slots(m) slots of m; m and tok must
 * outlive it, and nothing else may run m while it exists. */
int mm_sched_new(mm_model *m, const mm_tokenizer *tok, const mm_sched_options *o, mm_sched **out,
                 char *err, size_t errlen);

/* Finishes every outstanding case with MM_EAGAIN "shutting down", frees the
 * scheduler and sets *s = NULL; NULL and *s == NULL are fine. */
void mm_sched_destroy(mm_sched **s);

/* Validate and queue a case: the question is tokenised, the image decoded
 * and preprocessed, the candidates tokenised now, so a bad request is
 * rejected here and never reaches a step. Errors: MM_EINVAL naming the
 * field (tenant, question, image, conv_mode, candidates, max_tokens,
 * temperature, top_p, on_done; a prompt longer than the model's context),
 * MM_ETIMEOUT when the deadline has already passed, MM_EAGAIN when
 * max_queued cases are waiting, MM_ENOMEM. *case_id (> 0) names the case. */
int mm_sched_submit(mm_sched *s, const mm_sched_request *r, uint64_t *case_id, char *err,
                    size_t errlen);

/* Drop a waiting or running case at once: its slot (and so its KV cache) is
 * free for the next step's admission; on_done(MM_ECANCELLED, "cancelled") is called
 * before this returns. MM_ENOTFOUND when no such case is outstanding. */
int mm_sched_cancel(mm_sched *s, uint64_t case_id);

/* One scheduling step (see the top). Returns MM_OK also when cases failed
 * (their on_done says why); an error only when the scheduler itself could not
 * run the step (then no case was touched). Does nothing without work. */
int mm_sched_step(mm_sched *s, char *err, size_t errlen);

/* Cases waiting for a slot / holding a slot. */
size_t mm_sched_pending(const mm_sched *s);
size_t mm_sched_active(const mm_sched *s);

/* One tenant's waiting and running cases (for quotas); 0, 0 if unknown. */
void mm_sched_tenant_load(const mm_sched *s, const char *tenant, size_t *waiting, size_t *active);

/* Forward steps run so far (failed ones included). */
uint64_t mm_sched_steps(const mm_sched *s);

#endif

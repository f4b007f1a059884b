/* scheduler.h — the one engine: continuous batching of many cases from many
 * tenants over one model. medmoe-run, the router's --cases path and its gRPC
 * front door all run cases through it, so every test exercises production
 * code.
 *
 * A case goes through three stages:
 *   image   decode, pad/resize/normalise and the vision tower + projector, on
 *           a bounded pool of image workers (options.image_workers) under a
 *           memory budget in decoded pixels (options.pixel_budget), taken
 *           round-robin over tenants. Nothing here waits for the model's
 *           step loop, and the step loop never waits for an image: a 30 s
 *           encode delays that case only. (With image_workers 0 the image is
 *           decoded in submit and encoded at admission, on the caller's
 *           thread: the single-threaded mode of medmoe-run and the unit tests.)
 *           The vision tower runs on a worker only when the backend allows
 *           concurrent use (cpu); on vulkan it runs on the engine thread
 *           between steps.
 *   waiting a KV-cache slot: admission round-robin over the tenants that have
 *           cases ready (FIFO within a tenant), so a tenant that floods the
 *           queue cannot starve another.
 *   running each step runs ONE mm_model_forward over the decode row of every
 *           generating case plus prompt chunks of the cases still prefilling
 *           (prefill_chunk prompt rows in all, the prompt with the fewest rows
 *           left first — a prompt that got nothing last step goes first —
 *           max_step_rows rows in all), and the rows of the candidate being
 *           scored (classification: the candidate's tokens at positions P..
 *           of the case's own slot, reusing the prompt's KV cache); each case
 *           picks its next token (greedy, or its own seeded sampler, over the
 *           first mm_tokenizer_size ids), streams it, and finishes at EOS or
 *           max_tokens; candidates are then scored, one a step.
 * A step that fails (e.g. an expert with no live replica) is retried for each
 * of its cases alone, so only the cases that needed the failing part fail:
 * rows are idempotent (a row writes the KV cache at its own position).
 *
 * Threads: mm_sched_start() runs the step loop on an engine thread of its own;
 * without it the caller drives mm_sched_step(). submit, cancel, the counters
 * and destroy may be called from any thread. Callbacks run on the engine
 * thread, an image worker (a case whose image fails) or the thread calling
 * cancel/destroy — never with the scheduler's lock held and never two at once
 * for the same case. A callback must not call mm_sched_step or
 * mm_sched_destroy; submit and cancel from a callback are fine.
 *
 * Every accepted case gets exactly one on_done call:
 *   MM_OK           result holds the answer (borrowed, valid during the call;
 *                   mm_case_result_copy to keep it)
 *   MM_ETIMEOUT     "deadline exceeded" (waiting or running)
 *   MM_ECANCELLED   "cancelled" (mm_sched_cancel)
 *   MM_EAGAIN       "shutting down" (mm_sched_destroy)
 *   MM_EINVAL       the image could not be decoded (message names it)
 *   anything else   the model's error for the step the case was in (e.g.
 *                   MM_ETIMEOUT from a distributed expert runner, naming the
 *                   expert); the other cases carry on
 * Rejected submissions (mm_sched_submit != MM_OK) get no callback.
 *
 *     mm_sched_options so;  mm_sched_options_default(&so);
 *     mm_sched *s;  char err[512];
 *     if (mm_sched_new(model, tok, &so, &s, err, sizeof err)) {...}
 *     if (mm_sched_start(s, err, sizeof err)) {...}        // engine thread
 *     mm_sched_request r;  mm_sched_request_default(&r);
 *     r.tenant = "hospital-a";  r.question = "Is there a lesion?";
 *     r.image_bytes = png;  r.image_len = n;  r.media_type = "image/png";
 *     r.on_token = my_token;  r.on_done = my_done;  r.user = call;
 *     uint64_t id;
 *     if (mm_sched_submit(s, &r, &id, err, sizeof err)) {... reject ...}
 *     ...
 *     mm_sched_destroy(&s);   // stops the threads, ends what is left
 */
#ifndef MM_SCHEDULER_H
#define MM_SCHEDULER_H

#include <stddef.h>
#include <stdint.h>

#include "dicom.h"
#include "medmoe.h"
#include "result.h"
#include "tokenizer.h"

typedef struct mm_sched mm_sched;

typedef struct mm_sched_options {
    size_t max_step_rows;         /* token rows per forward step (default 512); must be
                                     >= mm_model_n_slots (every decode row fits)       */
    size_t prefill_chunk;         /* prompt rows per step, all cases together (default
                                     256): bounds how long a step makes the decoding
                                     cases wait; the prompt closest to done goes first */
    size_t max_queued;            /* cases not yet running at most (default 256); each
                                     holds its image bytes, then its embeddings
                                     (image_tokens * hidden floats) until admitted      */
    int image_workers;            /* image threads (default 1); 0: inline (see top)    */
    size_t pixel_budget;          /* decoded source pixels in the image stage at once
                                     (default 64 Mi = 256 MiB of RGBA-sized buffers);
                                     an image larger than the budget alone runs when
                                     nothing else is in the stage                      */
    int jpeg_downscale;           /* 1: decode large JPEGs at 1/2, 1/4 or 1/8 size
                                     in libjpeg (short side kept >= 2x the tower's
                                     336): much less time and memory for a
                                     4000 x 3000 photo, pixels within a few 8-bit
                                     steps of Pillow's full decode. Default 0: the
                                     exact pipeline of the numerical contract     */
    double debug_vision_delay_ms; /* tests: sleep this long in each vision
                                     encode (default 0)                         */
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
                                 const mm_case_result *result);

typedef struct mm_sched_request {
    const char *tenant;                /* required, non-empty; copied               */
    const char *client_case_id;        /* echoed in the result; may be NULL; copied */
    const void *image_bytes;           /* encoded PNG/JPEG, or NULL for text only;
                                          copied                                   */
    size_t image_len;                  /* bytes at image_bytes                       */
    const char *media_type;            /* "image/png", "image/jpeg",
                                          "application/dicom", NULL = sniff         */
    mm_dicom_options dicom;            /* DICOM only: window preset and frame
                                          (dicom.h); zero = the file's window, the
                                          middle frame. Checked at submit.         */
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
    int keep_logits;                   /* 1: result.logits holds each token's row   */
    mm_sched_token_fn on_token;        /* may be NULL                                */
    mm_sched_done_fn on_done;          /* required                                   */
    void *user;                        /* passed to both callbacks                   */
} mm_sched_request;

/* max_tokens 64, top_p 1, everything else 0 / NULL. */
void mm_sched_request_default(mm_sched_request *r);

/* The scheduler uses all mm_model_n_slots(m) slots of m; m and tok must
 * outlive it, and nothing else may run m while it exists. Starts the image
 * workers (not the engine thread: mm_sched_start). */
int mm_sched_new(mm_model *m, const mm_tokenizer *tok, const mm_sched_options *o, mm_sched **out,
                 char *err, size_t errlen);

/* Run the step loop on an engine thread of its own until destroy. After
 * this, mm_sched_step must not be called. MM_EINVAL if already started. */
int mm_sched_start(mm_sched *s, char *err, size_t errlen);

/* Stops the engine thread and the image workers (a step in progress ends
 * first), finishes every outstanding case with MM_EAGAIN "shutting down",
 * frees the scheduler and sets *s = NULL; NULL and *s == NULL are fine. */
void mm_sched_destroy(mm_sched **s);

/* Validate and queue a case: the question is tokenised, the candidates
 * tokenised, the image header checked (format, size, max_pixels) now, so a
 * bad request is rejected here and never reaches a step (with image_workers
 * 0 the image is also decoded here). Errors: MM_EINVAL naming the field
 * (tenant, question, image, conv_mode, candidates, max_tokens, temperature,
 * top_p, on_done; a prompt longer than the model's context), MM_ETIMEOUT
 * when the deadline has already passed, MM_EAGAIN when max_queued cases are
 * not yet running, MM_ENOMEM. *case_id (> 0) names the case. */
int mm_sched_submit(mm_sched *s, const mm_sched_request *r, uint64_t *case_id, char *err,
                    size_t errlen);

/* Drop a case: its slot (and so its KV cache) is free for the next step's
 * admission. A case that is idle (queued, waiting for a slot) gets
 * on_done(MM_ECANCELLED, "cancelled") before this returns; one that is in a
 * step or an image worker right now gets it as soon as that ends. MM_OK, or
 * MM_ENOTFOUND when no such case is outstanding. */
int mm_sched_cancel(mm_sched *s, uint64_t case_id);

/* One scheduling step (see the top), for callers without mm_sched_start.
 * Returns MM_OK also when cases failed (their on_done says why); an error
 * only when the scheduler itself could not run the step. Does nothing
 * without work. */
int mm_sched_step(mm_sched *s, char *err, size_t errlen);

/* Block until a case is ready to run or running, or ms pass (engine-less
 * callers: the image workers may be busy). Returns 1 when there is step work. */
int mm_sched_wait_work(mm_sched *s, int ms);

/* Cases not yet running (image stage + waiting for a slot) / holding a slot. */
size_t mm_sched_pending(const mm_sched *s);
size_t mm_sched_active(const mm_sched *s);

/* One tenant's cases not yet running and running (for quotas); 0, 0 if
 * unknown. */
void mm_sched_tenant_load(const mm_sched *s, const char *tenant, size_t *waiting, size_t *active);

/* Forward steps run so far (failed ones included). */
uint64_t mm_sched_steps(const mm_sched *s);

#endif

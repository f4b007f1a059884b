/* sched_internal.h — the scheduler's own types, shared by its three files
 * (not an interface: include scheduler.h):
 *   scheduler.c     new/destroy, cancel and counters, the step, the engine thread
 *   sched_cases.c   case and tenant bookkeeping, delivering on_done, the result
 *   sched_intake.c  submit, the image stage and its workers
 * The locking rules are at the top of scheduler.c. */
#ifndef MM_SCHED_INTERNAL_H
#define MM_SCHED_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "prompt.h"
#include "sample.h"
#include "scheduler.h"

typedef enum { S_IMAGE, S_WAITING, S_PREFILL, S_DECODE, S_CLASSIFY } s_state;

typedef enum { R_DECODE, R_PREFILL, R_CLASSIFY } s_row_kind;

/* Wanted logits rows per step beyond one per slot: candidate scoring. */
#define S_CLASSIFY_ROWS 64

/* A failed step's cases are re-run one by one within this many ms in all
 * (scheduler.c, s_isolate). */
#define S_ISOLATE_MS 2000.0

typedef struct s_case {
    uint64_t id;
    struct s_case *next; /* tenant FIFO link (image stage or ready) */
    char *tenant, *client_id;
    s_state state;
    int slot;
    int busy;      /* an image worker has it                          */
    int cancelled; /* cancel asked while busy or in a step             */
    int finishing; /* done: finish after this step                    */
    int starved;   /* prefilling, and got no rows in the last step     */
    int fail_rc;   /* finish with this status instead of MM_OK          */
    char fail_msg[1024];
    /* image stage */
    unsigned char *bytes;
    size_t nbytes, max_pixels, cost;
    char media_type[64];
    int is_dicom;           /* decode with dicom (dicom.h)  */
    mm_dicom_options dicom; /* its window and frame         */
    int no_pad;
    /* the prompt: before ids, image embeddings, after ids */
    int32_t *before, *after;
    size_t n_before, n_after;
    float *pixels; /* [3, S, S] when the engine encodes */
    float *img;    /* [n_img, H] */
    size_t n_img, P, n_prefilled;
    /* generation */
    size_t max_new;
    int truncated;
    mm_gen_params g;
    uint64_t rng;
    int32_t *tokens;
    size_t n_tokens;
    int32_t *routing; /* [L][cap][K] */
    size_t cap, n_pos;
    int32_t next_tok; /* fed back at position n_pos in the next step */
    mm_detok *dt;
    float *logits; /* [max_new][V] when keep_logits */
    int keep_logits;
    /* classification */
    char *cand_buf;
    size_t n_cands, max_cand;
    int32_t **cand_ids;
    size_t *cand_n;
    double *cand_lp;
    uint8_t *cand_done; /* [n_cands] scored                                  */
    int *lent;          /* [n_cands] idle slots lent for candidate rows       */
    size_t n_lent;
    double t_cls0, t_cls1;
    /* callbacks */
    mm_sched_token_fn on_token;
    mm_sched_done_fn on_done;
    void *user;
    /* times (mm_now_ms) */
    double deadline, t_submit, t_admit, t_first, t_last, t_prefill0, t_prefill1;
    double image_ms, vision_ms;
    uint64_t steps;
} s_case;

typedef struct s_tenant {
    char *name;
    s_case *img_head, *img_tail; /* image stage, not taken by a worker */
    s_case *head, *tail;         /* ready for a slot                   */
    size_t n_img, waiting, active;
} s_tenant;

typedef struct s_worker {
    struct mm_sched *s;
    int index; /* into img_busy */
} s_worker;

/* A finished case on its way to its on_done (fired outside the lock). */
typedef struct s_done {
    s_case *c;
    int status;
    const char *message;
    mm_case_result *result;
} s_done;

struct mm_sched {
    mm_model *m;
    const mm_tokenizer *tok;
    mm_sched_options o;
    size_t H, V, L, K, S, n_scored, n_experts;
    int n_slots, max_ctx, pad, vision_on_worker;
    int32_t eos;
    mm_conv_mode default_mode;

    pthread_mutex_t mu;
    pthread_cond_t work_cv;  /* engine: a case became ready / was cancelled */
    pthread_cond_t image_cv; /* workers: image work or budget freed         */
    atomic_int stop;
    pthread_t engine;
    int engine_started;
    pthread_t *workers;
    struct s_worker *worker_args;
    int n_workers;

    s_case **slots;
    s_case **img_busy; /* [n_workers] cases in the image workers        */
    size_t n_image, n_active, n_waiting;
    size_t pixels_in_flight;
    s_tenant *tenants;
    size_t n_tenants, cap_tenants, rr, img_rr;
    size_t prefill_rr;
    uint64_t next_id, n_steps;
    int stepping; /* a step owns the slot cases right now */

    /* step buffers (the engine's own) */
    int32_t *row_tok, *row_slot, *row_pos, *step_routing, *order;
    uint8_t *row_want, *row_kind;
    float *row_embed, *logits, *work;
    s_case **row_case;
    s_case **row_order; /* [n_slots] the step's prefill/classify order */
    int32_t *row_cand;  /* [B] candidate of a R_CLASSIFY row, and its token */
    int32_t *row_ctok;
    s_case **lent_to; /* [n_slots] a slot lent to a case scoring candidates */
    size_t max_want;
    s_done *done;
    size_t n_done, cap_done;
};

/* sched_cases.c */
void sched_case_free(s_case *c);
s_tenant *sched_tenant_find(const mm_sched *s, const char *name, size_t *idx);
s_tenant *sched_tenant_get(mm_sched *s, const char *name);
void sched_tenant_release(mm_sched *s, const char *name);
int sched_fifo_remove(s_case **head, s_case **tail, s_case *c);
void sched_fifo_push(s_case **head, s_case **tail, s_case *c);
/* Take c out of every structure (locked). It is then the caller's alone. */
void sched_detach(mm_sched *s, s_case *c);
/* on_done, then free: outside the lock. */
void sched_deliver(s_done *d);
/* Queue a detached case's on_done for the next sched_deliver_all. */
void sched_push_done(mm_sched *s, s_case *c, int status, const char *message,
                     mm_case_result *result);
/* Deliver the queued on_done calls (outside the lock; re-entrant). */
void sched_deliver_all(mm_sched *s);
/* The typed result of a finished, detached case (engine thread). */
int sched_result(mm_sched *s, s_case *c, mm_case_result **outp, char *err, size_t errlen);

/* sched_intake.c */
/* Decode + preprocess c's image into c->pixels (any thread, unlocked). */
int sched_preprocess(mm_sched *s, s_case *c, char *err, size_t errlen);
/* Vision tower + projector: c->pixels -> c->img (unlocked). */
int sched_encode(mm_sched *s, s_case *c, char *err, size_t errlen);
/* An image worker's loop (arg: its s_worker). */
void *sched_worker_main(void *arg);

#endif

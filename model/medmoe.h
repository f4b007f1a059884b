/* medmoe.h — the Med-MoE model: weights, vision tower, decoder, MoE layers.
 *
 * One implementation of each layer, shared by medmoe-run, the router and the
 * expert nodes. The model is written against the op interface (kernels.h),
 * so it runs on the cpu or the vulkan backend unchanged.
 *
 * A forward step takes any set of token rows — a prefill chunk of one
 * sequence, decode steps of several, or both — each tagged with its KV-cache
 * slot and position (continuous batching needs nothing more), and returns
 * the logits of the rows that ask for them plus the expert each MoE layer
 * chose for every row.
 *
 *     mm_model_options o;  mm_model_options_default(&o);
 *     o.vision_dir = "/models/clip-336";
 *     mm_model *m;  char err[512];
 *     if (mm_model_load("/models/medmoe", be, &o, &m, err, sizeof err)) {...}
 *     float *img_emb = malloc(...);          // [n_patches, hidden]
 *     mm_model_encode_image(m, pixels, img_emb, err, sizeof err);
 *     mm_step s = {.n = n, .token = ids, .embed = rows, .slot = slots,
 *                  .pos = positions, .want_logits = flags};
 *     mm_model_forward(m, &s, logits, routing, err, sizeof err);
 *
 * MoE layers follow docs/MODEL.md, "Gating at inference", exactly:
 * p = softmax(Wg·x + b) in fp32, top-k with ties to the lower index, top-1
 * scales the expert output by p[e*] (not renormalised), top-2 by
 * p[e_i] / (p[e1] + p[e2]); the meta expert's output is added. Where the
 * routed experts are computed is pluggable (mm_expert_runner): in this
 * process by default, on expert nodes in the router.
 */
#ifndef MM_MEDMOE_H
#define MM_MEDMOE_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "kernels.h"
#include "safetensors.h"

typedef struct mm_model mm_model;

/* How the model holds its 2-D weights. */
typedef enum mm_weights {
    MM_WEIGHTS_STORED = 0, /* as the checkpoint stores them (bf16, f16, f32),
                              used in place from the mapping on cpu         */
    MM_WEIGHTS_F32 = 1,    /* widened to f32 at load: a private copy; the
                              numerical and speed baseline                  */
    MM_WEIGHTS_INT8 = 2,   /* the decoder's weights (attention, MLPs, experts,
                              projector, LM head) quantised at load to int8
                              with a scale per 32 values (MM_Q8); the vision
                              tower stays as stored. cpu backend only       */
    MM_WEIGHTS_COUNT
} mm_weights;

/* "stored", "f32", "int8"; parse returns 0 on success, -1 if unknown. */
const char *mm_weights_name(mm_weights w);
int mm_weights_parse(const char *s, mm_weights *out);

typedef struct mm_model_options {
    const char *vision_dir; /* CLIP tower dir (config.json + safetensors); NULL:
                               the model has no vision part or it is inside
                               the LLM checkpoint (then vision_dir still gives
                               the tower's config.json if present)            */
    int load_trunk;         /* 1: embeddings, attention, dense MLPs, gates,
                               meta experts, LM head, vision (router, run)    */
    uint64_t experts_mask;  /* bit e: load routed expert e of every MoE layer  */
    int n_slots;            /* KV-cache slots = sequences in flight (>= 1)     */
    int max_ctx;            /* positions per slot; 0 = max_position_embeddings */
    mm_weights weights;     /* how 2-D weights are held (below)                */
} mm_model_options;

/* load_trunk 1, all experts, 1 slot, max_ctx from the config. */
void mm_model_options_default(mm_model_options *o);

/* Load config.json and the tensors the options ask for from model_dir onto
 * be (which must outlive the model). Every tensor's shape is checked
 * against the config; errors name the file and the tensor. */
int mm_model_load(const char *model_dir, mm_backend *be, const mm_model_options *o, mm_model **out,
                  char *err, size_t errlen);
void mm_model_destroy(mm_model **m);

const mm_config *mm_model_config(const mm_model *m);
const mm_vision_config *mm_model_vision_config(const mm_model *m); /* NULL: none */
mm_backend *mm_model_backend(const mm_model *m);
const mm_checkpoint *mm_model_checkpoint(const mm_model *m);
int mm_model_n_slots(const mm_model *m);
int mm_model_max_ctx(const mm_model *m);
/* Human-readable variant, e.g. "Med-MoE (stablelm, 4 experts top-1, meta
 * expert, gate bias)" or "MoE-LLaVA (... no meta expert)". */
const char *mm_model_variant(const mm_model *m);
/* Things worth a log line that do not stop loading (e.g. MoE layers whose
 * gates differ); "" when none. */
const char *mm_model_warnings(const mm_model *m);
/* Image embeddings per image (576 for ViT-L/14-336); 0 without a tower. */
size_t mm_model_image_tokens(const mm_model *m);
/* Side of the square input image (336). */
size_t mm_model_image_size(const mm_model *m);

/* Vision tower + projector: pixels f32 [3, S, S] (CLIP-normalised) ->
 * embeds f32 [image_tokens, hidden] on the host. */
int mm_model_encode_image(mm_model *m, const float *pixels, float *embeds, char *err,
                          size_t errlen);

/* One forward step over n token rows. Row i is token[i] (an id) or, when
 * token[i] < 0, the input embedding embed[i * hidden ...] (image rows). */
typedef struct mm_step {
    size_t n;                   /* rows                                        */
    const int32_t *token;       /* [n] ids, < 0 where embed supplies the row    */
    const float *embed;         /* [n, hidden] or NULL when every token >= 0    */
    const int32_t *slot;        /* [n] KV-cache slot of each row                */
    const int32_t *pos;         /* [n] absolute position of each row            */
    const uint8_t *want_logits; /* [n] 1: return this row's logits              */
    double deadline_ms;         /* absolute, on mm_now_ms()'s clock: the earliest
                                   deadline of the step's cases; 0 = none. Copied
                                   into every mm_expert_job (remote experts drop
                                   work past it)                               */
} mm_step;

/* logits: [count of want_logits, vocab_size] f32, in row order (may be NULL
 * when no row wants logits). routing: NULL, or [n_moe_layers, n, top_k]
 * int32 expert indices. */
int mm_model_forward(mm_model *m, const mm_step *s, float *logits, int32_t *routing, char *err,
                     size_t errlen);

/* Copy positions [0, n_pos) of every layer's KV cache from slot src to slot
 * dst (on the backend, enqueued like a forward step): a prompt computed once
 * can then be continued in several slots (candidate scoring). */
int mm_model_kv_copy(mm_model *m, int src_slot, int dst_slot, size_t n_pos, char *err,
                     size_t errlen);

/* ---- the routed experts: where they run ---------------------------------- */

/* One expert's share of one MoE layer. */
typedef struct mm_expert_job {
    int layer;          /* decoder layer index                          */
    int moe;            /* MoE ordinal (index into config num_experts)  */
    int expert;         /* expert index within the layer                */
    size_t n;           /* token rows                                   */
    mm_tensor *x;       /* [n, hidden] f32 input rows (normalised)      */
    mm_tensor *y;       /* [n, hidden] f32 output rows, to be filled    */
    double deadline_ms; /* absolute (mm_now_ms() clock), the step's; 0 = none */
} mm_expert_job;

/* start() is called with all jobs of a layer, then the model computes the
 * meta expert, then finish() must have filled every y. The default runner
 * computes the jobs in this process with the loaded expert weights. */
typedef struct mm_expert_runner {
    void *ctx;
    int (*start)(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err, size_t errlen);
    int (*finish)(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err, size_t errlen);
} mm_expert_runner;

/* NULL restores the in-process runner. */
void mm_model_set_expert_runner(mm_model *m, const mm_expert_runner *r);

/* Compute expert `expert` of MoE layer `moe` on x -> y with this process's
 * weights (MM_ENOTFOUND if that expert was not loaded). Enqueued: the
 * caller syncs or reads y. */
int mm_model_expert_forward(mm_model *m, int moe, int expert, const mm_tensor *x, mm_tensor *y,
                            char *err, size_t errlen);

#endif

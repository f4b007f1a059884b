/* seq_case.h — TEST ORACLE (see seq_generate.h): one case (image + question, or candidate labels)
 * answered end to end: image decode and preprocessing, vision tower, prompt, generation or
 * classification, and the JSON answer. medmoe-run and medmoe-router's
 * file/CLI path both call this, so their outputs compare key by key.
 *
 *     mm_case_request q;  mm_case_request_default(&q);
 *     q.image_path = "scan.png";  q.question = "Is there a lesion?";
 *     json_t *answer = NULL;
 *     if (mm_case_answer(m, tok, &q, &answer, err, sizeof err) == MM_OK) {
 *         puts(json_string_value(json_object_get(answer, "answer")));
 *         json_decref(answer);
 *     }
 *
 * The JSON object: answer, tokens, prompt_len, image_start, image_len,
 * routing [{layer, experts: [[e...] per position]}], expert_summary
 * [{layer, image_tokens_per_expert, text_tokens_per_expert}], timings
 * {load_ms?, vision_ms, prefill_ms, decode_ms_per_token}; with candidates:
 * candidates [{text, logprob, prob}] ranked, answer = the first.
 */
#ifndef MM_SEQ_CASE_H
#define MM_SEQ_CASE_H

#include <jansson.h>

#include "result.h"
#include <stddef.h>
#include <stdint.h>

#include "medmoe.h"
#include "seq_generate.h"
#include "tokenizer.h"

typedef struct mm_case_request {
    const char *image_path;  /* PNG/JPEG file, or NULL                         */
    const void *image_bytes; /* or the encoded image in memory (wins if set)   */
    size_t image_len;        /* bytes at image_bytes                           */
    const char *media_type;  /* "image/png", "image/jpeg", NULL = sniff        */
    size_t max_pixels;       /* 0 = image.c's default                          */
    int no_pad;              /* 1: plain resize + centre crop                  */
    const char *question;    /* must not be empty                              */
    const char *conv_mode;   /* NULL: the backbone's training template         */
    const char *candidates;  /* "a,b,c": classify instead of generating        */
    int max_tokens;          /* default 64                                     */
    float temperature;       /* 0 = greedy                                     */
    float top_p;             /* default 1                                      */
    uint64_t seed;           /* sampling seed                                  */
    const char *dump_logits; /* write each step's logits here (float32)        */
    int slot;                /* KV-cache slot to use (default 0)               */
} mm_case_request;

void mm_case_request_default(mm_case_request *q);

/* Answer one case; *out is a new JSON object (caller json_decref's it).
 * Errors: MM_EINVAL (empty question, bad image, prompt too long...) with the
 * field named, or whatever the model returned. */
int mm_case_answer(mm_model *m, const mm_tokenizer *tok, const mm_case_request *q, json_t **out,
                   char *err, size_t errlen);

/* Pieces of the answer object, shared with the scheduler so every path
 * writes the same JSON. */

/* "routing" and "expert_summary" from routing[L][stride][top_k] (positions
 * 0..n_pos-1 of each layer's stride); image positions are
 * [image_start, image_start + n_img). */
void mm_case_routing_json(const mm_config *c, const int32_t *routing, size_t stride, size_t n_pos,
                          size_t image_start, size_t n_img, json_t *out);
/* Sort cands by logprob (descending) and write "candidates" and
 * "classify_ms". */
void mm_case_candidates_json(mm_candidate *cands, size_t n, double classify_ms, json_t *out);

#endif

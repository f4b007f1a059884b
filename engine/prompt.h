/* prompt.h — Med-MoE's conversation templates and the token ids around the image.
 *
 * Offers the prompt text exactly as Med-MoE builds it (moellava/conversation.py
 * and model_vqa_med.py), and its tokenisation split at "<image>": the caller
 * puts the 576 projected image embeddings between `before` and `after`.
 *
 *     mm_conv_mode mode;
 *     mm_conv_mode_parse("phi", &mode, err, sizeof err);     // --conv-mode
 *     mm_prompt_ids p = {0};
 *     if (mm_prompt_tokenize(tok, mode, q, strlen(q), 1, &p, err, sizeof err) == MM_OK) {
 *         // embed p.before, then the image embeddings, then p.after
 *         mm_prompt_ids_clear(&p);
 *     }
 *
 * Templates (question q with "<image>" removed and surrounding whitespace
 * stripped, as the evaluation script does; msg = "<image>\n" + q, or q alone
 * without an image):
 *   phi, stablelm (training templates, SeparatorStyle.TWO, stop "<|endoftext|>"):
 *     "A chat between a curious user and an artificial intelligence assistant.
 *      The assistant gives helpful, detailed, and polite answers to the user's
 *      questions. USER: {msg} ASSISTANT:"
 *   simple (simple_conv_med, the VQA script's --conv-mode simple; SINGLE, stop "###"):
 *     "{LLaVA-Med system}###Human: Hi!###Assistant: Hi there!  How can I help
 *      you today?\n###Human: {msg}###Assistant:"
 * Each piece is tokenised on its own and no BOS is added (none of Med-MoE's
 * tokenizers adds one); tests/reference/bpe_ref.py's prompt_ids is the same.
 */
#ifndef MM_PROMPT_H
#define MM_PROMPT_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

typedef enum mm_conv_mode {
    MM_CONV_PHI = 0,      /* Phi-2 backbone's training template            */
    MM_CONV_STABLELM = 1, /* StableLM-2 backbone's (same text as phi)      */
    MM_CONV_SIMPLE = 2,   /* simple_conv_med, --conv-mode simple           */
} mm_conv_mode;

/* "phi" | "stablelm" | "simple" -> mode; MM_EINVAL naming the choices otherwise. */
int mm_conv_mode_parse(const char *name, mm_conv_mode *out, char *err, size_t errlen);
const char *mm_conv_mode_name(mm_conv_mode mode);

/* Text that ends the assistant's answer: "<|endoftext|>" or "###" (simple). */
const char *mm_conv_stop_string(mm_conv_mode mode);

/* The whole prompt, malloc'd and NUL-terminated (caller frees). The question
 * must be valid UTF-8 (checked when it is tokenised). */
int mm_prompt_render(mm_conv_mode mode, const char *question, size_t qlen, int with_image,
                     char **out, size_t *outlen, char *err, size_t errlen);

/* Token ids of a rendered prompt; both arrays malloc'd (may be NULL when empty). */
typedef struct mm_prompt_ids {
    int32_t *before; /* [n_before] ids of the text before "<image>" (all of it without image) */
    size_t n_before; /* count                                                        */
    int32_t *after;  /* [n_after] ids of the text after "<image>"; none without image */
    size_t n_after;  /* count                                                        */
    int has_image;   /* 1 when the image embeddings go between before and after     */
} mm_prompt_ids;

int mm_prompt_tokenize(const mm_tokenizer *tok, mm_conv_mode mode, const char *question,
                       size_t qlen, int with_image, mm_prompt_ids *out, char *err, size_t errlen);

/* Free both arrays and zero *p. */
void mm_prompt_ids_clear(mm_prompt_ids *p);

#endif

/* prompt.c — Med-MoE conversation templates (see prompt.h). */
#include "prompt.h"

#include <stdlib.h>
#include <string.h>

#define S_IMAGE "<image>"

static const char s_system_chat[] =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.";
/* simple_conv_med's system text: its Python string pieces join without spaces. */
static const char s_system_simple[] =
    "You are LLaVA-Med, a large language and vision assistant trained by a group of researchers "
    "at Microsoft, based on the general domain LLaVA architecture.You are designed to assist "
    "human with a variety of medical and clinical research tasks using natural language.Follow "
    "the instructions carefully.";

int mm_conv_mode_parse(const char *name, mm_conv_mode *out, char *err, size_t errlen) {
    static const char *names[] = {"phi", "stablelm", "simple"};
    for (int i = 0; i < 3; i++)
        if (name && out && strcmp(name, names[i]) == 0) {
            *out = (mm_conv_mode)i;
            return MM_OK;
        }
    return mm_errorf(err, errlen, MM_EINVAL,
                     "conv mode \"%s\" is not one of: phi, stablelm, simple", name ? name : "");
}

const char *mm_conv_mode_name(mm_conv_mode mode) {
    switch (mode) {
    case MM_CONV_PHI: return "phi";
    case MM_CONV_STABLELM: return "stablelm";
    case MM_CONV_SIMPLE: return "simple";
    }
    return "?";
}

const char *mm_conv_stop_string(mm_conv_mode mode) {
    return mode == MM_CONV_SIMPLE ? "###" : "<|endoftext|>";
}

/* Length of the whitespace character (Python's str.isspace) at p[0..n), or 0. */
static size_t s_space_at(const unsigned char *p, size_t n) {
    if (n >= 1 && ((p[0] >= 0x09 && p[0] <= 0x0D) || (p[0] >= 0x1C && p[0] <= 0x20)))
        return 1;
    if (n >= 2 && p[0] == 0xC2 && (p[1] == 0x85 || p[1] == 0xA0))
        return 2;
    if (n >= 3 && p[0] == 0xE1 && p[1] == 0x9A && p[2] == 0x80) /* U+1680 */
        return 3;
    if (n >= 3 && p[0] == 0xE2 && p[1] == 0x80 &&
        ((p[2] >= 0x80 && p[2] <= 0x8A) || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF))
        return 3;                                               /* U+2000..200A, 2028, 2029, 202F */
    if (n >= 3 && p[0] == 0xE2 && p[1] == 0x81 && p[2] == 0x9F) /* U+205F */
        return 3;
    if (n >= 3 && p[0] == 0xE3 && p[1] == 0x80 && p[2] == 0x80) /* U+3000 */
        return 3;
    return 0;
}

/* Is the character ending at p[n) whitespace? Returns its length or 0. */
static size_t s_space_before(const unsigned char *p, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++)
        if (s_space_at(p + n - k, k) == k)
            return k;
    return 0;
}

int mm_prompt_render(mm_conv_mode mode, const char *question, size_t qlen, int with_image,
                     char **out, size_t *outlen, char *err, size_t errlen) {
    if ((!question && qlen) || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_prompt_render: NULL argument");
    if (mode != MM_CONV_PHI && mode != MM_CONV_STABLELM && mode != MM_CONV_SIMPLE)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_prompt_render: bad conv mode %d", (int)mode);
    *out = NULL;
    /* q = question.replace("<image>", "").strip() */
    char *q = malloc(qlen + 1);
    if (!q)
        return mm_errorf(err, errlen, MM_ENOMEM, "prompt: out of memory");
    size_t m = 0, il = strlen(S_IMAGE);
    for (size_t i = 0; i < qlen;) {
        if (qlen - i >= il && memcmp(question + i, S_IMAGE, il) == 0) {
            i += il;
            continue;
        }
        q[m++] = question[i++];
    }
    size_t b = 0, e = m, k;
    while (b < e && (k = s_space_at((unsigned char *)q + b, e - b)) > 0)
        b += k;
    while (e > b && (k = s_space_before((unsigned char *)q + b, e - b)) > 0)
        e -= k;

    const char *pre, *post;
    const char *sys = mode == MM_CONV_SIMPLE ? s_system_simple : s_system_chat;
    if (mode == MM_CONV_SIMPLE) {
        pre = "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###Human: ";
        post = "###Assistant:";
    } else {
        pre = " USER: ";
        post = " ASSISTANT:";
    }
    const char *img = with_image ? S_IMAGE "\n" : "";
    size_t total = strlen(sys) + strlen(pre) + strlen(img) + (e - b) + strlen(post);
    char *s = malloc(total + 1);
    if (!s) {
        free(q);
        return mm_errorf(err, errlen, MM_ENOMEM, "prompt: out of memory");
    }
    size_t o = 0;
    const char *parts[] = {sys, pre, img};
    for (int i = 0; i < 3; i++) {
        memcpy(s + o, parts[i], strlen(parts[i]));
        o += strlen(parts[i]);
    }
    memcpy(s + o, q + b, e - b);
    o += e - b;
    memcpy(s + o, post, strlen(post));
    o += strlen(post);
    s[o] = '\0';
    free(q);
    *out = s;
    if (outlen)
        *outlen = o;
    return MM_OK;
}

int mm_prompt_tokenize(const mm_tokenizer *tok, mm_conv_mode mode, const char *question,
                       size_t qlen, int with_image, mm_prompt_ids *out, char *err, size_t errlen) {
    if (!tok || !out)
        return mm_errorf(err, errlen, MM_EINVAL, "mm_prompt_tokenize: NULL argument");
    memset(out, 0, sizeof *out);
    char *text;
    size_t len;
    int rc = mm_prompt_render(mode, question, qlen, with_image, &text, &len, err, errlen);
    if (rc != MM_OK)
        return rc;
    /* The question has no "<image>" left, so the first one is the placeholder. */
    const char *img = with_image ? strstr(text, S_IMAGE) : NULL;
    size_t n1 = img ? (size_t)(img - text) : len;
    rc = mm_tokenizer_encode(tok, text, n1, &out->before, &out->n_before, err, errlen);
    if (rc == MM_OK && img) {
        const char *rest = img + strlen(S_IMAGE);
        rc = mm_tokenizer_encode(tok, rest, len - (size_t)(rest - text), &out->after, &out->n_after,
                                 err, errlen);
        out->has_image = 1;
    }
    free(text);
    if (rc != MM_OK)
        mm_prompt_ids_clear(out);
    return rc;
}

void mm_prompt_ids_clear(mm_prompt_ids *p) {
    if (!p)
        return;
    free(p->before);
    free(p->after);
    memset(p, 0, sizeof *p);
}

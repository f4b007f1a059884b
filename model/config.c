/* config.c — config.json → mm_config / mm_vision_config, with validation.
 *
 * Sections: field readers (aliases, types, defaults) · the LLM config ·
 * the MoE block · the CLIP vision config · cross-checks.
 */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *mm_arch_name(mm_arch a) {
    switch (a) {
    case MM_ARCH_STABLELM: return "stablelm";
    case MM_ARCH_PHI: return "phi";
    default: return "?";
    }
}

const char *mm_act_name(mm_act a) {
    switch (a) {
    case MM_ACT_SILU: return "silu";
    case MM_ACT_GELU: return "gelu";
    case MM_ACT_GELU_TANH: return "gelu_tanh";
    case MM_ACT_QUICK_GELU: return "quick_gelu";
    default: return "?";
    }
}

/* ==== field readers ======================================================= */

/* Where a field is read from, for messages: file name and object prefix
 * ("" for the top level, "moe." inside the MoE block). */
typedef struct s_ctx {
    const char *file;   /* file name for messages */
    const char *prefix; /* "" or "moe." / "vision_config." */
    char *err;
    size_t errlen;
} s_ctx;

/* First of the NULL-terminated alias list present with a non-null value;
 * *which gets the key found. JSON null counts as absent (HF writes nulls). */
static json_t *s_find(json_t *obj, const char *const *keys, const char **which) {
    for (; *keys; keys++) {
        json_t *v = json_object_get(obj, *keys);
        if (v && !json_is_null(v)) {
            if (which)
                *which = *keys;
            return v;
        }
    }
    return NULL;
}

#define KEYS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* Integer field. required: missing is an error; else *out = dflt. A real with
 * an integral value (2048.0) is accepted: some writers emit those. */
static int s_int(const s_ctx *cx, json_t *obj, const char *const *keys, int required, int dflt,
                 int *out) {
    const char *k = keys[0];
    json_t *v = s_find(obj, keys, &k);
    if (!v) {
        if (required)
            return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' missing", cx->file,
                             cx->prefix, keys[0]);
        *out = dflt;
        return MM_OK;
    }
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);
    else
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not an integer",
                         cx->file, cx->prefix, k);
    if (d < INT_MIN || d > INT_MAX)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' = %.0f out of range",
                         cx->file, cx->prefix, k, d);
    *out = (int)d;
    return MM_OK;
}

static int s_num(const s_ctx *cx, json_t *obj, const char *const *keys, int required, double dflt,
                 double *out, const char **which) {
    const char *k = keys[0];
    json_t *v = s_find(obj, keys, &k);
    if (which)
        *which = k;
    if (!v) {
        if (required)
            return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' missing", cx->file,
                             cx->prefix, keys[0]);
        *out = dflt;
        return MM_OK;
    }
    if (!json_is_number(v))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not a number",
                         cx->file, cx->prefix, k);
    *out = json_number_value(v);
    if (!isfinite(*out))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not finite", cx->file,
                         cx->prefix, k);
    return MM_OK;
}

/* Boolean: true/false, or 0/1 (older configs). */
static int s_bool(const s_ctx *cx, json_t *obj, const char *const *keys, int dflt, int *out) {
    const char *k = keys[0];
    json_t *v = s_find(obj, keys, &k);
    if (!v) {
        *out = dflt;
        return MM_OK;
    }
    if (json_is_boolean(v))
        *out = json_is_true(v);
    else if (json_is_integer(v) && (json_integer_value(v) == 0 || json_integer_value(v) == 1))
        *out = (int)json_integer_value(v);
    else
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not a boolean",
                         cx->file, cx->prefix, k);
    return MM_OK;
}

/* String into a fixed buffer; too long is an error (these are short names;
 * a path that does not fit is truncated, see s_str_trunc). */
static int s_str(const s_ctx *cx, json_t *obj, const char *const *keys, const char *dflt, char *out,
                 size_t cap) {
    const char *k = keys[0];
    json_t *v = s_find(obj, keys, &k);
    if (!v) {
        snprintf(out, cap, "%s", dflt);
        return MM_OK;
    }
    if (!json_is_string(v))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not a string",
                         cx->file, cx->prefix, k);
    if (strlen(json_string_value(v)) >= cap)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                         "%s: field '%s%s' is longer than %zu characters", cx->file, cx->prefix, k,
                         cap - 1);
    snprintf(out, cap, "%s", json_string_value(v));
    return MM_OK;
}

/* Informational strings (an author's absolute path): keep what fits. */
static int s_str_trunc(const s_ctx *cx, json_t *obj, const char *const *keys, char *out,
                       size_t cap) {
    const char *k = keys[0];
    json_t *v = s_find(obj, keys, &k);
    out[0] = '\0';
    if (!v)
        return MM_OK;
    if (!json_is_string(v))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' is not a string",
                         cx->file, cx->prefix, k);
    snprintf(out, cap, "%s", json_string_value(v));
    return MM_OK;
}

/* Token id: absent or null → -1; a list (some configs list several EOS ids)
 * → its first entry. */
static int s_token(const s_ctx *cx, json_t *obj, const char *key, int *out) {
    json_t *v = json_object_get(obj, key);
    *out = -1;
    if (!v || json_is_null(v))
        return MM_OK;
    if (json_is_array(v)) {
        if (json_array_size(v) == 0)
            return MM_OK;
        v = json_array_get(v, 0);
    }
    if (!json_is_integer(v) || json_integer_value(v) < -1 || json_integer_value(v) > INT_MAX)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                         "%s: field '%s%s' is not a token id (integer or null)", cx->file,
                         cx->prefix, key);
    *out = (int)json_integer_value(v);
    return MM_OK;
}

static int s_act(const s_ctx *cx, const char *field, const char *s, mm_act *out) {
    if (!strcmp(s, "silu") || !strcmp(s, "swish"))
        *out = MM_ACT_SILU;
    else if (!strcmp(s, "gelu"))
        *out = MM_ACT_GELU;
    else if (!strcmp(s, "gelu_new") || !strcmp(s, "gelu_pytorch_tanh") || !strcmp(s, "gelu_fast"))
        *out = MM_ACT_GELU_TANH;
    else if (!strcmp(s, "quick_gelu"))
        *out = MM_ACT_QUICK_GELU;
    else
        return mm_errorf(cx->err, cx->errlen, MM_EUNSUPPORTED,
                         "%s: field '%s%s' = \"%s\" is not a supported activation", cx->file,
                         cx->prefix, field, s);
    return MM_OK;
}

static int s_positive(const s_ctx *cx, const char *field, long long v) {
    if (v <= 0)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s%s' = %lld must be > 0",
                         cx->file, cx->prefix, field, v);
    return MM_OK;
}

/* Parse a JSON text into an object; messages name the file. */
static int s_load_root(const char *json, size_t len, const char *name, json_t **root, char *err,
                       size_t errlen) {
    json_error_t jerr;
    *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!*root)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: not valid JSON: %s (line %d)", name,
                         jerr.text, jerr.line);
    if (!json_is_object(*root)) {
        json_decref(*root);
        *root = NULL;
        return mm_errorf(err, errlen, MM_EPROTO, "%s: top level is not a JSON object", name);
    }
    return MM_OK;
}

/* Whole file into a malloc'd buffer (configs are small: cap at 16 MB). */
static int s_read_file(const char *path, char **buf, size_t *len, char *err, size_t errlen) {
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return mm_errorf(err, errlen, errno == ENOENT ? MM_ENOTFOUND : MM_EIO,
                         "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 16u << 20, n = 0;
    char *b = malloc(cap);
    if (!b) {
        fclose(fp);
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    }
    n = fread(b, 1, cap, fp);
    int bad = ferror(fp), big = n == cap;
    fclose(fp);
    if (bad || big) {
        free(b);
        return mm_errorf(err, errlen, bad ? MM_EIO : MM_EPROTO, "%s: %s", path,
                         bad ? "read error" : "larger than 16 MB");
    }
    *buf = b;
    *len = n;
    return MM_OK;
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != MM_OK)                                                                          \
            return rc_;                                                                            \
    } while (0)

/* ==== the MoE block ======================================================= */

static int s_parse_moe(const s_ctx *top, json_t *root, mm_config *c) {
    json_t *moe = json_object_get(root, "moe");
    if (!moe || json_is_null(moe))
        return MM_OK;
    if (!json_is_object(moe))
        return mm_errorf(top->err, top->errlen, MM_EPROTO, "%s: field 'moe' is not an object",
                         top->file);
    s_ctx cx = {top->file, "moe.", top->err, top->errlen};
    TRY(s_bool(&cx, moe, KEYS("moe_enable"), 0, &c->moe_enable));
    TRY(s_str(&cx, moe, KEYS("moe_mode"), "", c->moe_mode, sizeof c->moe_mode));
    if (!c->moe_enable)
        return MM_OK;

    json_t *idx = json_object_get(moe, "moe_layers_idx");
    if (!idx || json_is_null(idx))
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO, "%s: field 'moe.moe_layers_idx' missing",
                         cx.file);
    if (!json_is_array(idx))
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: field 'moe.moe_layers_idx' is not an array", cx.file);
    size_t n = json_array_size(idx);
    if (n == 0)
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: moe.moe_enable is true but moe.moe_layers_idx is empty", cx.file);
    if (n > (size_t)c->num_hidden_layers)
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: moe.moe_layers_idx has %zu entries but num_hidden_layers = %d",
                         cx.file, n, c->num_hidden_layers);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(idx, i);
        if (!json_is_integer(v))
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: moe.moe_layers_idx[%zu] is not an integer", cx.file, i);
        long long l = json_integer_value(v);
        if (l < 0 || l >= c->num_hidden_layers)
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: moe.moe_layers_idx[%zu] = %lld but num_hidden_layers = %d",
                             cx.file, i, l, c->num_hidden_layers);
        if (i > 0 && l <= c->moe_layers_idx[i - 1])
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: moe.moe_layers_idx[%zu] = %lld is not greater than the entry "
                             "before (%d): must be strictly increasing",
                             cx.file, i, l, c->moe_layers_idx[i - 1]);
        c->moe_layers_idx[i] = (int)l;
    }
    c->n_moe_layers = (int)n;

    /* num_experts: one per MoE layer, or one int for all of them. */
    json_t *ne = json_object_get(moe, "num_experts");
    if (!ne || json_is_null(ne))
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO, "%s: field 'moe.num_experts' missing",
                         cx.file);
    if (json_is_array(ne) && json_array_size(ne) != n)
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: moe.num_experts has %zu entries but moe.moe_layers_idx has %zu",
                         cx.file, json_array_size(ne), n);
    if (!json_is_array(ne) && !json_is_integer(ne))
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: field 'moe.num_experts' is neither an integer nor an array", cx.file);
    int min_e = MM_CONFIG_MAX_EXPERTS;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_is_array(ne) ? json_array_get(ne, i) : ne;
        if (!json_is_integer(v))
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: moe.num_experts[%zu] is not an integer", cx.file, i);
        long long e = json_integer_value(v);
        if (e < 1 || e > MM_CONFIG_MAX_EXPERTS)
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: moe.num_experts[%zu] = %lld outside 1..%d", cx.file, i, e,
                             MM_CONFIG_MAX_EXPERTS);
        c->num_experts[i] = (int)e;
        if (e < min_e)
            min_e = (int)e;
    }

    TRY(s_int(&cx, moe, KEYS("top_k_experts"), 1, 0, &c->top_k_experts));
    if (c->top_k_experts < 1 || c->top_k_experts > 2)
        return mm_errorf(cx.err, cx.errlen, MM_EUNSUPPORTED,
                         "%s: moe.top_k_experts = %d; only 1 and 2 are supported", cx.file,
                         c->top_k_experts);
    if (c->top_k_experts > min_e)
        return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                         "%s: moe.top_k_experts = %d but a MoE layer has only %d experts", cx.file,
                         c->top_k_experts, min_e);
    TRY(s_bool(&cx, moe, KEYS("use_residual"), 0, &c->use_residual));

    /* Optional class name of each expert (MRI, CT, ...). */
    const char *where = "moe.";
    json_t *names = json_object_get(moe, "expert_names");
    if (!names || json_is_null(names)) {
        names = json_object_get(root, "expert_names");
        where = "";
    }
    if (names && !json_is_null(names)) {
        if (!json_is_array(names))
            return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                             "%s: field '%sexpert_names' is not an array", cx.file, where);
        size_t k = json_array_size(names);
        for (size_t i = 0; i < n; i++)
            if ((size_t)c->num_experts[i] != k)
                return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                                 "%s: %sexpert_names has %zu names but moe.num_experts[%zu] = %d",
                                 cx.file, where, k, i, c->num_experts[i]);
        for (size_t i = 0; i < k; i++) {
            json_t *s = json_array_get(names, i);
            if (!json_is_string(s) || strlen(json_string_value(s)) >= MM_CONFIG_STR)
                return mm_errorf(cx.err, cx.errlen, MM_EPROTO,
                                 "%s: %sexpert_names[%zu] is not a string shorter than %d", cx.file,
                                 where, i, MM_CONFIG_STR);
            snprintf(c->expert_names[i], MM_CONFIG_STR, "%s", json_string_value(s));
        }
        c->n_expert_names = (int)k;
    }
    return MM_OK;
}

/* ==== the LLM config ====================================================== */

static int s_parse_llm(const s_ctx *cx, json_t *root, mm_config *c) {
    TRY(s_str(cx, root, KEYS("model_type"), "", c->model_type, sizeof c->model_type));
    if (!c->model_type[0])
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field 'model_type' missing",
                         cx->file);
    /* "stablelm" is tested first: no known Phi type contains it. */
    if (strstr(c->model_type, "stablelm"))
        c->arch = MM_ARCH_STABLELM;
    else if (strstr(c->model_type, "phi"))
        c->arch = MM_ARCH_PHI;
    else
        return mm_errorf(cx->err, cx->errlen, MM_EUNSUPPORTED,
                         "%s: field 'model_type' = \"%s\": not a StableLM or Phi backbone",
                         cx->file, c->model_type);
    int phi = c->arch == MM_ARCH_PHI;

    /* Sizes (old Phi "n_embd" style names accepted as aliases). */
    TRY(s_int(cx, root, KEYS("hidden_size", "n_embd"), 1, 0, &c->hidden_size));
    TRY(s_positive(cx, "hidden_size", c->hidden_size));
    TRY(s_int(cx, root, KEYS("num_hidden_layers", "n_layer"), 1, 0, &c->num_hidden_layers));
    TRY(s_positive(cx, "num_hidden_layers", c->num_hidden_layers));
    if (c->num_hidden_layers > MM_CONFIG_MAX_LAYERS)
        return mm_errorf(cx->err, cx->errlen, MM_EUNSUPPORTED,
                         "%s: field 'num_hidden_layers' = %d, at most %d supported", cx->file,
                         c->num_hidden_layers, MM_CONFIG_MAX_LAYERS);
    TRY(s_int(cx, root, KEYS("num_attention_heads", "n_head"), 1, 0, &c->num_attention_heads));
    TRY(s_positive(cx, "num_attention_heads", c->num_attention_heads));
    if (c->hidden_size % c->num_attention_heads != 0)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                         "%s: hidden_size = %d is not divisible by num_attention_heads = %d",
                         cx->file, c->hidden_size, c->num_attention_heads);
    c->head_dim = c->hidden_size / c->num_attention_heads;
    TRY(s_int(cx, root, KEYS("num_key_value_heads"), 0, c->num_attention_heads,
              &c->num_key_value_heads));
    TRY(s_positive(cx, "num_key_value_heads", c->num_key_value_heads));
    if (c->num_attention_heads % c->num_key_value_heads != 0)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                         "%s: num_attention_heads = %d is not a multiple of num_key_value_heads "
                         "= %d",
                         cx->file, c->num_attention_heads, c->num_key_value_heads);
    /* Phi's old configs leave n_inner null meaning 4 × hidden. */
    int inner_default = 0;
    if (phi && !s_find(root, KEYS("intermediate_size", "n_inner"), NULL) &&
        json_object_get(root, "n_inner"))
        inner_default = 4 * c->hidden_size;
    TRY(s_int(cx, root, KEYS("intermediate_size", "n_inner"), !inner_default, inner_default,
              &c->intermediate_size));
    TRY(s_positive(cx, "intermediate_size", c->intermediate_size));
    TRY(s_int(cx, root, KEYS("vocab_size"), 1, 0, &c->vocab_size));
    TRY(s_positive(cx, "vocab_size", c->vocab_size));
    TRY(s_int(cx, root, KEYS("max_position_embeddings", "n_positions"), 1, 0,
              &c->max_position_embeddings));
    TRY(s_positive(cx, "max_position_embeddings", c->max_position_embeddings));

    /* Rotary: an explicit rotary_dim, else a fraction of head_dim (HF's
     * class defaults when absent: StableLM 0.25, Phi 0.5). */
    int rd = 0;
    TRY(s_int(cx, root, KEYS("rotary_dim"), 0, 0, &rd));
    if (rd == 0) {
        double pct;
        const char *k;
        TRY(s_num(cx, root, KEYS("partial_rotary_factor", "rope_pct"), 0, phi ? 0.5 : 0.25, &pct,
                  &k));
        if (!(pct > 0.0 && pct <= 1.0))
            return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                             "%s: field '%s' = %g must be in (0, 1]", cx->file, k, pct);
        /* int(pct × head_dim) as HF does; the epsilon keeps 0.4 × 80 at 32. */
        rd = (int)floor(pct * c->head_dim + 1e-9);
        rd &= ~1;
    }
    if (rd < 2 || rd > c->head_dim || rd % 2)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO,
                         "%s: rotary dims = %d must be even and within 2..head_dim (%d)", cx->file,
                         rd, c->head_dim);
    c->rotary_dims = rd;
    TRY(s_num(cx, root, KEYS("rope_theta", "rotary_emb_base"), 0, 10000.0, &c->rope_theta, NULL));
    if (!(c->rope_theta > 0))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: rope_theta = %g must be > 0",
                         cx->file, c->rope_theta);
    const char *ek;
    TRY(s_num(cx, root, KEYS("norm_eps", "layer_norm_eps", "layer_norm_epsilon"), 1, 0,
              &c->norm_eps, &ek));
    if (!(c->norm_eps > 0 && c->norm_eps < 1))
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field '%s' = %g must be in (0, 1)",
                         cx->file, ek, c->norm_eps);

    TRY(s_bool(cx, root, KEYS("use_qkv_bias"), phi, &c->use_qkv_bias));
    TRY(s_bool(cx, root, KEYS("qk_layernorm"), 0, &c->qk_layernorm));
    TRY(s_bool(cx, root, KEYS("use_parallel_residual"), phi, &c->use_parallel_residual));
    if (phi) {
        c->use_qkv_bias = 1; /* Phi's q/k/v/dense always carry biases */
        c->use_parallel_residual = 1;
    }
    TRY(s_str(cx, root, KEYS("hidden_act", "activation_function"), phi ? "gelu_new" : "silu",
              c->hidden_act_name, sizeof c->hidden_act_name));
    TRY(s_act(cx, "hidden_act", c->hidden_act_name, &c->hidden_act));

    TRY(s_token(cx, root, "bos_token_id", &c->bos_token_id));
    TRY(s_token(cx, root, "eos_token_id", &c->eos_token_id));
    TRY(s_token(cx, root, "pad_token_id", &c->pad_token_id));
    TRY(s_bool(cx, root, KEYS("tie_word_embeddings"), 0, &c->tie_word_embeddings));
    TRY(s_str(cx, root, KEYS("torch_dtype"), "", c->torch_dtype, sizeof c->torch_dtype));

    /* Multimodal part (absent in a plain LLM config). */
    TRY(s_int(cx, root, KEYS("mm_hidden_size"), 0, 0, &c->mm_hidden_size));
    if (c->mm_hidden_size < 0)
        return mm_errorf(cx->err, cx->errlen, MM_EPROTO, "%s: field 'mm_hidden_size' = %d < 0",
                         cx->file, c->mm_hidden_size);
    TRY(s_str(cx, root, KEYS("mm_projector_type", "image_projector_type"), "", c->mm_projector_type,
              sizeof c->mm_projector_type));
    TRY(s_int(cx, root, KEYS("mm_vision_select_layer"), 0, -2, &c->mm_vision_select_layer));
    TRY(s_str(cx, root, KEYS("mm_vision_select_feature"), "patch", c->mm_vision_select_feature,
              sizeof c->mm_vision_select_feature));
    TRY(s_str(cx, root, KEYS("image_aspect_ratio"), "pad", c->image_aspect_ratio,
              sizeof c->image_aspect_ratio));
    TRY(s_str_trunc(cx, root, KEYS("mm_image_tower", "image_tower", "mm_vision_tower"),
                    c->image_tower, sizeof c->image_tower));
    return s_parse_moe(cx, root, c);
}

int mm_config_parse(const char *json, size_t len, const char *name, mm_config *out, char *err,
                    size_t errlen) {
    memset(out, 0, sizeof *out);
    json_t *root;
    name = name ? name : "config.json";
    TRY(s_load_root(json, len, name, &root, err, errlen));
    s_ctx cx = {name, "", err, errlen};
    int rc = s_parse_llm(&cx, root, out);
    json_decref(root);
    if (rc != MM_OK)
        memset(out, 0, sizeof *out);
    return rc;
}

int mm_config_load(const char *path, mm_config *out, char *err, size_t errlen) {
    char *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    TRY(s_read_file(path, &buf, &len, err, errlen));
    int rc = mm_config_parse(buf, len, path, out, err, errlen);
    free(buf);
    return rc;
}

int mm_config_is_moe_layer(const mm_config *c, int layer) {
    if (!c->moe_enable)
        return -1;
    for (int m = 0; m < c->n_moe_layers; m++)
        if (c->moe_layers_idx[m] == layer)
            return m;
    return -1;
}

/* ==== the CLIP vision config ============================================== */

int mm_vision_config_parse(const char *json, size_t len, const char *name, mm_vision_config *out,
                           char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    json_t *root;
    name = name ? name : "config.json";
    TRY(s_load_root(json, len, name, &root, err, errlen));
    s_ctx cx = {name, "", err, errlen};
    json_t *obj = root;
    json_t *vc = json_object_get(root, "vision_config");
    int rc = MM_OK;
    if (vc && !json_is_null(vc)) {
        if (!json_is_object(vc)) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "%s: field 'vision_config' is not an object",
                           name);
            goto out;
        }
        obj = vc;
        cx.prefix = "vision_config.";
    }
    mm_vision_config *v = out;
#define V(x)                                                                                       \
    do {                                                                                           \
        if ((rc = (x)) != MM_OK)                                                                   \
            goto out;                                                                              \
    } while (0)
    V(s_int(&cx, obj, KEYS("hidden_size"), 1, 0, &v->hidden_size));
    V(s_positive(&cx, "hidden_size", v->hidden_size));
    V(s_int(&cx, obj, KEYS("intermediate_size"), 1, 0, &v->intermediate_size));
    V(s_positive(&cx, "intermediate_size", v->intermediate_size));
    V(s_int(&cx, obj, KEYS("num_hidden_layers"), 1, 0, &v->num_hidden_layers));
    V(s_positive(&cx, "num_hidden_layers", v->num_hidden_layers));
    V(s_int(&cx, obj, KEYS("num_attention_heads"), 1, 0, &v->num_attention_heads));
    V(s_positive(&cx, "num_attention_heads", v->num_attention_heads));
    V(s_int(&cx, obj, KEYS("image_size"), 1, 0, &v->image_size));
    V(s_positive(&cx, "image_size", v->image_size));
    V(s_int(&cx, obj, KEYS("patch_size"), 1, 0, &v->patch_size));
    V(s_positive(&cx, "patch_size", v->patch_size));
    V(s_int(&cx, obj, KEYS("num_channels"), 0, 3, &v->num_channels));
    V(s_positive(&cx, "num_channels", v->num_channels));
    V(s_num(&cx, obj, KEYS("layer_norm_eps"), 0, 1e-5, &v->layer_norm_eps, NULL));
    if (!(v->layer_norm_eps > 0 && v->layer_norm_eps < 1)) {
        rc =
            mm_errorf(err, errlen, MM_EPROTO, "%s: field '%slayer_norm_eps' = %g must be in (0, 1)",
                      name, cx.prefix, v->layer_norm_eps);
        goto out;
    }
    char act[MM_CONFIG_STR];
    V(s_str(&cx, obj, KEYS("hidden_act"), "quick_gelu", act, sizeof act));
    V(s_act(&cx, "hidden_act", act, &v->hidden_act));
#undef V
    if (v->hidden_size % v->num_attention_heads != 0) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "%s: %shidden_size = %d is not divisible by num_attention_heads = %d", name,
                       cx.prefix, v->hidden_size, v->num_attention_heads);
        goto out;
    }
    if (v->image_size % v->patch_size != 0) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "%s: %simage_size = %d is not divisible by patch_size = %d", name, cx.prefix,
                       v->image_size, v->patch_size);
        goto out;
    }
    v->head_dim = v->hidden_size / v->num_attention_heads;
    v->num_patches = (v->image_size / v->patch_size) * (v->image_size / v->patch_size);
out:
    json_decref(root);
    if (rc != MM_OK)
        memset(out, 0, sizeof *out);
    return rc;
}

int mm_vision_config_load(const char *path, mm_vision_config *out, char *err, size_t errlen) {
    char *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    TRY(s_read_file(path, &buf, &len, err, errlen));
    int rc = mm_vision_config_parse(buf, len, path, out, err, errlen);
    free(buf);
    return rc;
}

/* ==== cross-checks ======================================================== */

int mm_config_check_vision(const mm_config *c, const mm_vision_config *v, int *layers_to_run,
                           char *err, size_t errlen) {
    if (c->mm_hidden_size != v->hidden_size)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "config: mm_hidden_size = %d but the vision tower's hidden_size = %d",
                         c->mm_hidden_size, v->hidden_size);
    /* CLIP returns num_hidden_layers + 1 hidden states (embeddings first);
     * Python-style negative indices count from the end. */
    int nstates = v->num_hidden_layers + 1, s = c->mm_vision_select_layer;
    if (s < -nstates || s >= nstates)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "config: mm_vision_select_layer = %d outside the %d hidden states of a "
                         "%d-layer vision tower",
                         s, nstates, v->num_hidden_layers);
    if (strcmp(c->mm_vision_select_feature, "patch") != 0 &&
        strcmp(c->mm_vision_select_feature, "cls_patch") != 0)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "config: mm_vision_select_feature = \"%s\" (want \"patch\" or "
                         "\"cls_patch\")",
                         c->mm_vision_select_feature);
    if (layers_to_run)
        *layers_to_run = s < 0 ? nstates + s : s;
    return MM_OK;
}

/* medmoe.c — Med-MoE's forward pass, written out once for every process.
 *
 * Sections: weights (structs and loading), scratch tensors, the MLP, the
 * vision tower and projector, the decoder step with its MoE layers, the LM
 * head. The math is in the order docs/MODEL.md states it; each op is one
 * call of the op interface (kernels.h), so a reader sees the whole layer
 * here.
 *
 * Why one file of ~1250 lines: it is the model, meant to be read in one
 * sitting from weights to logits; split by layer, one computation would be
 * spread over files that would all need the weight structs below.
 */
#include "medmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- weights ------------------------------------------------------------- */

typedef struct mm_linear {
    mm_tensor *w; /* [out, in] in the backend's weight dtype */
    mm_tensor *b; /* [out] f32, or NULL                       */
} mm_linear;

typedef struct mm_norm {
    mm_tensor *w; /* [width] f32 */
    mm_tensor *b; /* [width] f32, or NULL */
} mm_norm;

/* A feed-forward block: SwiGLU (StableLM: gate, up, down) or two linears
 * with an activation between (Phi: fc1, fc2; CLIP likewise). */
typedef struct mm_mlp {
    int loaded;         /* 0: not in this process                         */
    int swiglu;         /* 1: down(silu(gate x) * up x); 0: fc2(act(fc1 x)) */
    mm_unary_op act;    /* activation of the fc1/fc2 form                 */
    mm_linear gate, up; /* [inter, hidden] (swiglu)                       */
    mm_linear down;     /* [hidden, inter] (swiglu)                       */
    mm_linear fc1;      /* [inter, hidden]                                */
    mm_linear fc2;      /* [hidden, inter]                                */
} mm_mlp;

typedef struct mm_moe {
    int n_experts;                         /* E                                    */
    mm_tensor *gate_w;                     /* [E, hidden] f32 (gating is fp32)     */
    mm_tensor *gate_b;                     /* [E] f32 or NULL (MoE-TinyMed: none)  */
    mm_mlp meta;                           /* always-active meta expert (may be
                                              absent: MoE-LLaVA)                   */
    mm_mlp experts[MM_CONFIG_MAX_EXPERTS]; /* routed experts, loaded per mask      */
    mm_linear coef;                        /* use_residual: Linear(H, 2) [2, hidden] */
    mm_mlp res;                            /* use_residual: the dense residual MLP  */
} mm_moe;

/* What a transformer block holds, in the decoder and in the vision tower. */
typedef struct mm_block {
    mm_norm ln1;       /* input_layernorm / layer_norm1                      */
    mm_norm ln2;       /* post_attention_layernorm / layer_norm2 (sequential
                          blocks only)                                       */
    mm_linear q, k, v; /* [heads*hd, hidden], [kv*hd, hidden] ×2             */
    mm_linear o;       /* o_proj / dense / out_proj [hidden, heads*hd]       */
    mm_mlp mlp;        /* dense FFN (decoder: non-MoE layers only)           */
} mm_block;

typedef struct mm_layer {
    mm_block b;        /* norms, attention, dense FFN                        */
    mm_moe *moe;       /* MoE FFN, or NULL                                   */
    mm_tensor *kcache; /* [slots, max_ctx, kv*hd] f32                        */
    mm_tensor *vcache; /* [slots, max_ctx, kv*hd] f32                        */
} mm_layer;

typedef struct mm_vision {
    mm_vision_config cfg;
    int n_run;              /* encoder layers producing the selected state  */
    int keep_cls;           /* select_feature "cls_patch"                    */
    mm_tensor *patch_w;     /* [D, C*P*P] (Conv2d weight seen as a matrix)   */
    float *class_emb;       /* [D] host                                      */
    mm_tensor *pos_emb;     /* [np+1, D] f32                                 */
    mm_norm pre_ln;         /* pre_layrnorm (sic)                            */
    mm_block *layers;       /* [n_run]; mlp: fc1 -> quick_gelu -> fc2         */
    mm_linear proj0, proj2; /* projector mlp2x_gelu: [H, D], [H, H]          */
} mm_vision;

struct mm_model {
    mm_config cfg;             /* config.json                                       */
    char dir[1024];            /* model directory                                   */
    mm_backend *be;            /* not owned                                         */
    mm_checkpoint *ck;         /* the LLM checkpoint (mapped)                        */
    mm_checkpoint *vck;        /* the vision checkpoint, or NULL                     */
    mm_model_options opt;      /* as loaded                                         */
    int max_ctx;               /* positions per slot                                */
    int parallel;              /* attention and MLP read the same norm (Phi)         */
    int has_meta;              /* MoE layers have a meta expert                      */
    int has_gate_bias;         /* gates have a bias                                  */
    char variant[256];         /* mm_model_variant                                   */
    char warnings[512];        /* mm_model_warnings: odd but usable things seen      */
    const mm_st_tensor *embed; /* model.embed_tokens.weight [V, H] (host, mapped)  */
    mm_layer *layers;          /* [num_hidden_layers]                               */
    mm_norm final_norm;        /* model.norm / model.final_layernorm                 */
    mm_tensor **head;          /* lm_head split in row chunks: [n_head][rows, H]     */
    mm_tensor *head_bias;      /* [V] f32 or NULL                                    */
    size_t n_head;             /* chunks                                            */
    size_t head_rows;          /* rows per chunk (last may be shorter)               */
    mm_vision *vision;         /* NULL without a tower                              */
    mm_expert_runner runner;   /* where routed experts run                          */
};

void mm_model_options_default(mm_model_options *o) {
    memset(o, 0, sizeof *o);
    o->load_trunk = 1;
    o->experts_mask = ~(uint64_t)0;
    o->n_slots = 1;
}

/* Loading state: which checkpoint and the error buffer. */
typedef struct s_loader {
    mm_model *m;
    const mm_checkpoint *ck;
    char *err;
    size_t errlen;
} s_loader;

static const char *const s_weights_names[MM_WEIGHTS_COUNT] = {"stored", "f32", "int8"};

const char *mm_weights_name(mm_weights w) {
    return w >= 0 && w < MM_WEIGHTS_COUNT ? s_weights_names[w] : "?";
}

int mm_weights_parse(const char *s, mm_weights *out) {
    for (int i = 0; s && i < MM_WEIGHTS_COUNT; i++)
        if (strcmp(s, s_weights_names[i]) == 0) {
            *out = (mm_weights)i;
            return 0;
        }
    return -1;
}

/* A 2-D weight from the mapped checkpoint: in place (cpu) or copied in its
 * dtype (vulkan) as stored; or a converted copy, f32 or (decoder weights
 * only: `decoder`) int8, when the options ask for one. */
static int s_weight_new(mm_model *m, int decoder, mm_dtype src, const size_t *shape,
                        const void *data, mm_tensor **out) {
    mm_dtype dt = m->opt.weights == MM_WEIGHTS_F32               ? MM_F32
                  : m->opt.weights == MM_WEIGHTS_INT8 && decoder ? MM_Q8
                                                                 : src;
    if (dt == src)
        return mm_tensor_new_host(m->be, src, 2, shape, data, out);
    int rc = mm_tensor_new(m->be, dt, 2, shape, out);
    if (rc == MM_OK && (rc = mm_tensor_set(*out, data, src)) != MM_OK)
        mm_tensor_destroy(out);
    return rc;
}

/* Upload tensor `name` of shape (d0[, d1]) as a new backend tensor. 2-D
 * weights keep the backend's weight dtype; vectors become f32. optional:
 * a missing tensor leaves *out NULL and is not an error. */
static int s_upload(s_loader *L, const char *name, size_t d0, size_t d1, int optional,
                    mm_tensor **out) {
    *out = NULL;
    const mm_st_tensor *st;
    int ndim = d1 ? 2 : 1;
    size_t shape[2] = {d0, d1};
    if (optional && !mm_checkpoint_find(L->ck, name))
        return MM_OK;
    int rc = mm_checkpoint_get(L->ck, name, ndim, shape, &st, L->err, L->errlen);
    if (rc != MM_OK)
        return rc;
    mm_backend *be = L->m->be;
    /* 2-D weights are used in place (cpu) or copied in their dtype (vulkan);
     * vectors (norms, biases) are few and small, and the ops take them f32. */
    if (ndim == 2)
        rc = s_weight_new(L->m, L->ck == L->m->ck, st->dtype, shape, st->data, out);
    else if ((rc = mm_tensor_new(be, MM_F32, ndim, shape, out)) == MM_OK)
        rc = mm_tensor_set(*out, st->data, st->dtype);
    if (rc != MM_OK) {
        mm_tensor_destroy(out);
        return mm_errorf(L->err, L->errlen, rc, "tensor '%s' in %s: %s", name, st->file,
                         mm_backend_error(be));
    }
    return MM_OK;
}

static int s_linear(s_loader *L, const char *prefix, size_t out, size_t in, int bias,
                    mm_linear *lin) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    int rc = s_upload(L, name, out, in, 0, &lin->w);
    if (rc != MM_OK)
        return rc;
    snprintf(name, sizeof name, "%s.bias", prefix);
    /* bias: 1 required, 0 optional (taken when the checkpoint has it) */
    return s_upload(L, name, out, 0, !bias, &lin->b);
}

static int s_norm(s_loader *L, const char *prefix, size_t width, mm_norm *n) {
    char name[512];
    snprintf(name, sizeof name, "%s.weight", prefix);
    int rc = s_upload(L, name, width, 0, 0, &n->w);
    if (rc != MM_OK)
        return rc;
    snprintf(name, sizeof name, "%s.bias", prefix);
    return s_upload(L, name, width, 0, 1, &n->b);
}

static mm_unary_op s_unary_of(mm_act a) {
    switch (a) {
    case MM_ACT_SILU: return MM_SILU;
    case MM_ACT_GELU: return MM_GELU_ERF;
    case MM_ACT_GELU_TANH: return MM_GELU_TANH;
    default: return MM_QUICK_GELU;
    }
}

/* An LLM-side MLP at prefix (".../mlp", ".../meta_moe", an expert). */
static int s_mlp(s_loader *L, const char *prefix, mm_mlp *mlp) {
    const mm_config *c = &L->m->cfg;
    size_t H = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    char name[512];
    int rc;
    memset(mlp, 0, sizeof *mlp);
    mlp->act = s_unary_of(c->hidden_act);
    if (c->arch == MM_ARCH_STABLELM) {
        mlp->swiglu = 1;
        snprintf(name, sizeof name, "%s.gate_proj", prefix);
        if ((rc = s_linear(L, name, I, H, 0, &mlp->gate)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.up_proj", prefix);
        if ((rc = s_linear(L, name, I, H, 0, &mlp->up)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.down_proj", prefix);
        if ((rc = s_linear(L, name, H, I, 0, &mlp->down)) != MM_OK)
            return rc;
    } else {
        snprintf(name, sizeof name, "%s.fc1", prefix);
        if ((rc = s_linear(L, name, I, H, 1, &mlp->fc1)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.fc2", prefix);
        if ((rc = s_linear(L, name, H, I, 1, &mlp->fc2)) != MM_OK)
            return rc;
    }
    mlp->loaded = 1;
    return MM_OK;
}

static void s_linear_free(mm_linear *l) {
    mm_tensor_destroy(&l->w);
    mm_tensor_destroy(&l->b);
}

static void s_norm_free(mm_norm *n) {
    mm_tensor_destroy(&n->w);
    mm_tensor_destroy(&n->b);
}

static void s_mlp_free(mm_mlp *m) {
    s_linear_free(&m->gate);
    s_linear_free(&m->up);
    s_linear_free(&m->down);
    s_linear_free(&m->fc1);
    s_linear_free(&m->fc2);
    m->loaded = 0;
}

static void s_block_free(mm_block *b) {
    s_norm_free(&b->ln1);
    s_norm_free(&b->ln2);
    s_linear_free(&b->q);
    s_linear_free(&b->k);
    s_linear_free(&b->v);
    s_linear_free(&b->o);
    s_mlp_free(&b->mlp);
}

static int s_load_layer(s_loader *L, int l) {
    mm_model *m = L->m;
    const mm_config *c = &m->cfg;
    mm_layer *ly = &m->layers[l];
    size_t H = (size_t)c->hidden_size, hd = (size_t)c->head_dim;
    size_t qw = (size_t)c->num_attention_heads * hd, kw = (size_t)c->num_key_value_heads * hd;
    char p[64], name[512];
    int rc, moe = mm_config_is_moe_layer(c, l);
    snprintf(p, sizeof p, "model.layers.%d", l);

    if (m->opt.load_trunk) {
        snprintf(name, sizeof name, "%s.input_layernorm", p);
        if ((rc = s_norm(L, name, H, &ly->b.ln1)) != MM_OK)
            return rc;
        if (!m->parallel) {
            snprintf(name, sizeof name, "%s.post_attention_layernorm", p);
            if ((rc = s_norm(L, name, H, &ly->b.ln2)) != MM_OK)
                return rc;
        }
        int qkv_bias = c->arch == MM_ARCH_PHI || c->use_qkv_bias;
        snprintf(name, sizeof name, "%s.self_attn.q_proj", p);
        if ((rc = s_linear(L, name, qw, H, qkv_bias, &ly->b.q)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.self_attn.k_proj", p);
        if ((rc = s_linear(L, name, kw, H, qkv_bias, &ly->b.k)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.self_attn.v_proj", p);
        if ((rc = s_linear(L, name, kw, H, qkv_bias, &ly->b.v)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.self_attn.%s", p,
                 c->arch == MM_ARCH_PHI ? "dense" : "o_proj");
        if ((rc = s_linear(L, name, H, qw, c->arch == MM_ARCH_PHI, &ly->b.o)) != MM_OK)
            return rc;
        size_t cshape[3] = {(size_t)m->opt.n_slots, (size_t)m->max_ctx, kw};
        if ((rc = mm_tensor_new(m->be, MM_F32, 3, cshape, &ly->kcache)) != MM_OK ||
            (rc = mm_tensor_new(m->be, MM_F32, 3, cshape, &ly->vcache)) != MM_OK)
            return mm_errorf(L->err, L->errlen, rc, "layer %d: KV cache: %s", l,
                             mm_backend_error(m->be));
        if (moe < 0) {
            snprintf(name, sizeof name, "%s.mlp", p);
            if ((rc = s_mlp(L, name, &ly->b.mlp)) != MM_OK)
                return rc;
        }
    }
    if (moe < 0)
        return MM_OK;

    ly->moe = calloc(1, sizeof *ly->moe);
    if (!ly->moe)
        return mm_errorf(L->err, L->errlen, MM_ENOMEM, "layer %d: out of memory", l);
    mm_moe *mo = ly->moe;
    mo->n_experts = c->num_experts[moe];
    if (m->opt.load_trunk) {
        /* The gate is computed in fp32 whatever the weights are stored in. */
        const mm_st_tensor *st;
        size_t gshape[2] = {(size_t)mo->n_experts, H};
        snprintf(name, sizeof name, "%s.mlp.deepspeed_moe.gate.wg.weight", p);
        if ((rc = mm_checkpoint_get(L->ck, name, 2, gshape, &st, L->err, L->errlen)) != MM_OK)
            return rc;
        if ((rc = mm_tensor_new(m->be, MM_F32, 2, gshape, &mo->gate_w)) != MM_OK ||
            (rc = mm_tensor_set(mo->gate_w, st->data, st->dtype)) != MM_OK)
            return mm_errorf(L->err, L->errlen, rc, "%s: %s", name, mm_backend_error(m->be));
        snprintf(name, sizeof name, "%s.mlp.deepspeed_moe.gate.wg.bias", p);
        if ((rc = s_upload(L, name, (size_t)mo->n_experts, 0, 1, &mo->gate_b)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.mlp.meta_moe", p);
        /* the meta expert exists in Med-MoE, not in MoE-LLaVA/MoE-TinyMed */
        char probe[600];
        snprintf(probe, sizeof probe, "%s.%s.weight", name,
                 c->arch == MM_ARCH_STABLELM ? "up_proj" : "fc1");
        if (mm_checkpoint_find(L->ck, probe)) {
            if ((rc = s_mlp(L, name, &mo->meta)) != MM_OK)
                return rc;
        }
        /* residual MoE (DeepSpeed use_residual): out = moe·coef0 + mlp·coef1 */
        if (c->use_residual) {
            snprintf(name, sizeof name, "%s.mlp.coefficient", p);
            if ((rc = s_linear(L, name, 2, H, 1, &mo->coef)) != MM_OK)
                return rc;
            snprintf(name, sizeof name, "%s.mlp.mlp", p);
            if ((rc = s_mlp(L, name, &mo->res)) != MM_OK)
                return rc;
        }
    }
    for (int e = 0; e < mo->n_experts; e++) {
        if (!(m->opt.experts_mask >> e & 1))
            continue;
        snprintf(name, sizeof name, "%s.mlp.deepspeed_moe.experts.deepspeed_experts.%d", p, e);
        if ((rc = s_mlp(L, name, &mo->experts[e])) != MM_OK)
            return rc;
    }
    return MM_OK;
}

/* The CLIP tower and the projector. Tensors come from the LLM checkpoint
 * when it embeds the tower, else from the vision checkpoint. */
static int s_load_vision(s_loader *L, const char *vision_dir) {
    mm_model *m = L->m;
    const mm_config *c = &m->cfg;
    char path[1200], name[512], prefix[128];
    int rc;
    mm_vision *v = calloc(1, sizeof *v);
    if (!v)
        return mm_errorf(L->err, L->errlen, MM_ENOMEM, "vision: out of memory");
    m->vision = v;
    if (!vision_dir)
        return mm_errorf(L->err, L->errlen, MM_EINVAL,
                         "%s: the model has a vision part (mm_hidden_size %d): give the CLIP "
                         "vision tower directory (--vision DIR)",
                         m->dir, c->mm_hidden_size);
    snprintf(path, sizeof path, "%s/config.json", vision_dir);
    if ((rc = mm_vision_config_load(path, &v->cfg, L->err, L->errlen)) != MM_OK)
        return rc;
    if ((rc = mm_config_check_vision(c, &v->cfg, &v->n_run, L->err, L->errlen)) != MM_OK)
        return rc;
    v->keep_cls = strcmp(c->mm_vision_select_feature, "cls_patch") == 0;

    const char *embedded = "model.image_tower.image_tower.vision_model";
    snprintf(name, sizeof name, "%s.embeddings.patch_embedding.weight", embedded);
    if (mm_checkpoint_find(m->ck, name)) {
        snprintf(prefix, sizeof prefix, "%s", embedded);
    } else {
        if ((rc = mm_checkpoint_open(vision_dir, &m->vck, L->err, L->errlen)) != MM_OK)
            return rc;
        L->ck = m->vck;
        snprintf(prefix, sizeof prefix, "vision_model");
    }
    const mm_vision_config *vc = &v->cfg;
    size_t D = (size_t)vc->hidden_size, I = (size_t)vc->intermediate_size;
    size_t P = (size_t)vc->patch_size, C = (size_t)vc->num_channels;
    size_t np = (size_t)vc->num_patches;

    /* patch embedding: Conv2d [D, C, P, P] without bias, used as [D, C*P*P] */
    const mm_st_tensor *st;
    size_t pshape[4] = {D, C, P, P};
    snprintf(name, sizeof name, "%s.embeddings.patch_embedding.weight", prefix);
    if ((rc = mm_checkpoint_get(L->ck, name, 4, pshape, &st, L->err, L->errlen)) != MM_OK)
        return rc;
    size_t wshape[2] = {D, C * P * P};
    if ((rc = s_weight_new(m, 0, st->dtype, wshape, st->data, &v->patch_w)) != MM_OK)
        return mm_errorf(L->err, L->errlen, rc, "%s: %s", name, mm_backend_error(m->be));
    snprintf(name, sizeof name, "%s.embeddings.class_embedding", prefix);
    size_t cshape[1] = {D};
    if ((rc = mm_checkpoint_get(L->ck, name, 1, cshape, &st, L->err, L->errlen)) != MM_OK)
        return rc;
    if (!(v->class_emb = malloc(D * sizeof(float))))
        return mm_errorf(L->err, L->errlen, MM_ENOMEM, "vision: out of memory");
    mm_convert_to_f32(v->class_emb, st->data, st->dtype, D);
    snprintf(name, sizeof name, "%s.embeddings.position_embedding.weight", prefix);
    size_t posshape[2] = {np + 1, D};
    if ((rc = mm_checkpoint_get(L->ck, name, 2, posshape, &st, L->err, L->errlen)) != MM_OK)
        return rc;
    if ((rc = mm_tensor_new(m->be, MM_F32, 2, posshape, &v->pos_emb)) != MM_OK ||
        (rc = mm_tensor_set(v->pos_emb, st->data, st->dtype)) != MM_OK)
        return mm_errorf(L->err, L->errlen, rc, "%s: %s", name, mm_backend_error(m->be));
    snprintf(name, sizeof name, "%s.pre_layrnorm", prefix);
    if ((rc = s_norm(L, name, D, &v->pre_ln)) != MM_OK)
        return rc;

    v->layers = calloc((size_t)v->n_run, sizeof *v->layers);
    if (!v->layers)
        return mm_errorf(L->err, L->errlen, MM_ENOMEM, "vision: out of memory");
    for (int l = 0; l < v->n_run; l++) {
        mm_block *ly = &v->layers[l];
        char p[256];
        snprintf(p, sizeof p, "%s.encoder.layers.%d", prefix, l);
        snprintf(name, sizeof name, "%s.layer_norm1", p);
        if ((rc = s_norm(L, name, D, &ly->ln1)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.layer_norm2", p);
        if ((rc = s_norm(L, name, D, &ly->ln2)) != MM_OK)
            return rc;
        static const char *const proj[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
        mm_linear *lin[4] = {&ly->q, &ly->k, &ly->v, &ly->o};
        for (int i = 0; i < 4; i++) {
            snprintf(name, sizeof name, "%s.self_attn.%s", p, proj[i]);
            if ((rc = s_linear(L, name, D, D, 1, lin[i])) != MM_OK)
                return rc;
        }
        ly->mlp.act = s_unary_of(vc->hidden_act);
        snprintf(name, sizeof name, "%s.mlp.fc1", p);
        if ((rc = s_linear(L, name, I, D, 1, &ly->mlp.fc1)) != MM_OK)
            return rc;
        snprintf(name, sizeof name, "%s.mlp.fc2", p);
        if ((rc = s_linear(L, name, D, I, 1, &ly->mlp.fc2)) != MM_OK)
            return rc;
        ly->mlp.loaded = 1;
    }

    /* projector (mlp2x_gelu) lives in the LLM checkpoint */
    L->ck = m->ck;
    if (strcmp(c->mm_projector_type, "mlp2x_gelu") != 0 && c->mm_projector_type[0])
        return mm_errorf(L->err, L->errlen, MM_EUNSUPPORTED,
                         "%s/config.json: mm_projector_type '%s' is not supported (only "
                         "mlp2x_gelu)",
                         m->dir, c->mm_projector_type);
    const char *pp = "model.mm_projector.image_spatial_proj";
    snprintf(name, sizeof name, "%s.0.weight", pp);
    if (!mm_checkpoint_find(m->ck, name))
        pp = "model.mm_projector"; /* plain LLaVA naming */
    size_t H = (size_t)c->hidden_size;
    snprintf(name, sizeof name, "%s.0", pp);
    if ((rc = s_linear(L, name, H, D, 1, &v->proj0)) != MM_OK)
        return rc;
    snprintf(name, sizeof name, "%s.2", pp);
    return s_linear(L, name, H, H, 1, &v->proj2);
}

static void s_vision_free(mm_vision *v) {
    if (!v)
        return;
    mm_tensor_destroy(&v->patch_w);
    mm_tensor_destroy(&v->pos_emb);
    free(v->class_emb);
    s_norm_free(&v->pre_ln);
    for (int l = 0; v->layers && l < v->n_run; l++)
        s_block_free(&v->layers[l]);
    free(v->layers);
    s_linear_free(&v->proj0);
    s_linear_free(&v->proj2);
    free(v);
}

/* The LM head, cut into row chunks that fit one backend tensor. */
static int s_load_head(s_loader *L) {
    mm_model *m = L->m;
    const mm_config *c = &m->cfg;
    size_t V = (size_t)c->vocab_size, H = (size_t)c->hidden_size;
    const char *hname = c->tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    size_t shape[2] = {V, H};
    const mm_st_tensor *st;
    int rc = mm_checkpoint_get(m->ck, hname, 2, shape, &st, L->err, L->errlen);
    if (rc != MM_OK)
        return rc;
    mm_dtype dt = mm_backend_weight_dtype(m->be, st->dtype);
    size_t row_bytes = m->opt.weights == MM_WEIGHTS_INT8
                           ? mm_q8_row_bytes(H)
                           : H * mm_dtype_size(m->opt.weights == MM_WEIGHTS_F32 ? MM_F32 : dt);
    size_t max_rows = mm_backend_max_tensor_bytes(m->be) / row_bytes;
    if (max_rows == 0)
        return mm_errorf(L->err, L->errlen, MM_EUNSUPPORTED,
                         "lm_head: one row exceeds the "
                         "backend's tensor limit");
    m->head_rows = max_rows < V ? max_rows : V;
    m->n_head = (V + m->head_rows - 1) / m->head_rows;
    m->head = calloc(m->n_head, sizeof *m->head);
    if (!m->head)
        return mm_errorf(L->err, L->errlen, MM_ENOMEM, "lm_head: out of memory");
    size_t src_row = H * mm_st_dtype_size(st->st_dtype);
    for (size_t i = 0; i < m->n_head; i++) {
        size_t r0 = i * m->head_rows, nr = V - r0 < m->head_rows ? V - r0 : m->head_rows;
        size_t hshape[2] = {nr, H};
        if ((rc = s_weight_new(m, 1, st->dtype, hshape, (const char *)st->data + r0 * src_row,
                               &m->head[i])) != MM_OK)
            return mm_errorf(L->err, L->errlen, rc, "%s rows %zu..%zu: %s", hname, r0, r0 + nr,
                             mm_backend_error(m->be));
    }
    return s_upload(L, "lm_head.bias", V, 0, 1, &m->head_bias);
}

/* Med-MoE copies the stage-2 modality router into the gate of every MoE
 * layer and freezes it, so a released checkpoint's gates are identical.
 * Different gates are legal (MoE-LLaVA trains them) but worth a warning. */
static void s_check_gates(mm_model *m) {
    const mm_config *c = &m->cfg;
    const mm_st_tensor *first = NULL;
    char name[128];
    for (int i = 0; c->moe_enable && i < c->n_moe_layers; i++) {
        snprintf(name, sizeof name, "model.layers.%d.mlp.deepspeed_moe.gate.wg.weight",
                 c->moe_layers_idx[i]);
        const mm_st_tensor *g = mm_checkpoint_find(m->ck, name);
        if (!g)
            return;
        if (!first) {
            first = g;
        } else if (g->nbytes != first->nbytes || g->st_dtype != first->st_dtype ||
                   memcmp(g->data, first->data, g->nbytes) != 0) {
            snprintf(m->warnings, sizeof m->warnings,
                     "the gates of MoE layers %d and %d differ (a released Med-MoE copies one "
                     "modality router into every MoE layer)",
                     c->moe_layers_idx[0], c->moe_layers_idx[i]);
            return;
        }
    }
}

int mm_model_load(const char *model_dir, mm_backend *be, const mm_model_options *o, mm_model **out,
                  char *err, size_t errlen) {
    *out = NULL;
    mm_model *m = calloc(1, sizeof *m);
    if (!m)
        return mm_errorf(err, errlen, MM_ENOMEM, "model: out of memory");
    m->be = be;
    if (o)
        m->opt = *o;
    else
        mm_model_options_default(&m->opt);
    if (m->opt.n_slots < 1)
        m->opt.n_slots = 1;
    snprintf(m->dir, sizeof m->dir, "%s", model_dir);
    if (m->opt.weights < 0 || m->opt.weights >= MM_WEIGHTS_COUNT) {
        int w = (int)m->opt.weights;
        free(m);
        return mm_errorf(err, errlen, MM_EINVAL, "model: unknown weights mode %d", w);
    }
    /* Ask, do not assume: only a backend that keeps q8 as q8 computes it. */
    if (m->opt.weights == MM_WEIGHTS_INT8 && mm_backend_weight_dtype(be, MM_Q8) != MM_Q8) {
        free(m);
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "model: int8 weights need the cpu backend (the %s backend computes "
                         "f32, f16 and bf16 weights only)",
                         mm_backend_name(be));
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    int rc = mm_config_load(path, &m->cfg, err, errlen);
    if (rc == MM_OK)
        rc = mm_checkpoint_open(model_dir, &m->ck, err, errlen);
    if (rc != MM_OK) {
        mm_model_destroy(&m);
        return rc;
    }
    const mm_config *c = &m->cfg;
    m->max_ctx = m->opt.max_ctx > 0 ? m->opt.max_ctx : c->max_position_embeddings;
    m->parallel = c->arch == MM_ARCH_PHI || c->use_parallel_residual;
    if (c->qk_layernorm) {
        mm_model_destroy(&m);
        return mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: qk_layernorm is not supported", path);
    }
    s_loader L = {.m = m, .ck = m->ck, .err = err, .errlen = errlen};
    m->layers = calloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    if (!m->layers)
        rc = mm_errorf(err, errlen, MM_ENOMEM, "model: out of memory");
    if (rc == MM_OK && m->opt.load_trunk) {
        size_t eshape[2] = {(size_t)c->vocab_size, (size_t)c->hidden_size};
        rc = mm_checkpoint_get(m->ck, "model.embed_tokens.weight", 2, eshape, &m->embed, err,
                               errlen);
    }
    for (int l = 0; rc == MM_OK && l < c->num_hidden_layers; l++)
        rc = s_load_layer(&L, l);
    if (rc == MM_OK && m->opt.load_trunk) {
        rc = s_norm(&L, c->arch == MM_ARCH_PHI ? "model.final_layernorm" : "model.norm",
                    (size_t)c->hidden_size, &m->final_norm);
        if (rc == MM_OK)
            rc = s_load_head(&L);
        if (rc == MM_OK && c->mm_hidden_size > 0)
            rc = s_load_vision(&L, m->opt.vision_dir);
    }
    if (rc != MM_OK) {
        mm_model_destroy(&m);
        return rc;
    }
    /* Which variant: Med-MoE has a meta expert and gate biases. */
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (m->layers[l].moe) {
            m->has_meta = m->layers[l].moe->meta.loaded;
            m->has_gate_bias = m->layers[l].moe->gate_b != NULL;
            break;
        }
    }
    s_check_gates(m);
    if (c->moe_enable)
        snprintf(m->variant, sizeof m->variant, "%s (%s, %d MoE layers, %d experts, top-%d%s%s)",
                 m->has_meta ? "Med-MoE" : "MoE-LLaVA", mm_arch_name(c->arch), c->n_moe_layers,
                 c->num_experts[0], c->top_k_experts, m->has_meta ? ", meta expert" : "",
                 m->has_gate_bias ? ", gate bias" : "");
    else
        snprintf(m->variant, sizeof m->variant, "dense (%s)", mm_arch_name(c->arch));
    mm_model_set_expert_runner(m, NULL);
    *out = m;
    return MM_OK;
}

void mm_model_destroy(mm_model **mp) {
    if (!mp || !*mp)
        return;
    mm_model *m = *mp;
    for (int l = 0; m->layers && l < m->cfg.num_hidden_layers; l++) {
        mm_layer *ly = &m->layers[l];
        s_block_free(&ly->b);
        mm_tensor_destroy(&ly->kcache);
        mm_tensor_destroy(&ly->vcache);
        if (ly->moe) {
            mm_tensor_destroy(&ly->moe->gate_w);
            mm_tensor_destroy(&ly->moe->gate_b);
            s_mlp_free(&ly->moe->meta);
            s_mlp_free(&ly->moe->res);
            s_linear_free(&ly->moe->coef);
            for (int e = 0; e < ly->moe->n_experts; e++)
                s_mlp_free(&ly->moe->experts[e]);
            free(ly->moe);
        }
    }
    free(m->layers);
    s_norm_free(&m->final_norm);
    for (size_t i = 0; m->head && i < m->n_head; i++)
        mm_tensor_destroy(&m->head[i]);
    free(m->head);
    mm_tensor_destroy(&m->head_bias);
    s_vision_free(m->vision);
    mm_checkpoint_destroy(&m->vck);
    mm_checkpoint_destroy(&m->ck);
    free(m);
    *mp = NULL;
}

const mm_config *mm_model_config(const mm_model *m) { return &m->cfg; }
const mm_vision_config *mm_model_vision_config(const mm_model *m) {
    return m->vision ? &m->vision->cfg : NULL;
}
mm_backend *mm_model_backend(const mm_model *m) { return m->be; }
const mm_checkpoint *mm_model_checkpoint(const mm_model *m) { return m->ck; }
int mm_model_n_slots(const mm_model *m) { return m->opt.n_slots; }
int mm_model_max_ctx(const mm_model *m) { return m->max_ctx; }
const char *mm_model_variant(const mm_model *m) { return m->variant; }
const char *mm_model_warnings(const mm_model *m) { return m->warnings; }
size_t mm_model_image_tokens(const mm_model *m) {
    if (!m->vision)
        return 0;
    return (size_t)m->vision->cfg.num_patches + (m->vision->keep_cls ? 1 : 0);
}
size_t mm_model_image_size(const mm_model *m) {
    return m->vision ? (size_t)m->vision->cfg.image_size : 0;
}

/* ---- scratch tensors ------------------------------------------------------
 * A forward step makes its temporaries here and frees them all at the end,
 * in one place, whatever path it leaves by. */

#define S_MAX_TMP 512

typedef struct s_scratch {
    mm_backend *be;
    mm_tensor *t[S_MAX_TMP];
    int n;
} s_scratch;

/* NULL on failure (the backend's error says why). */
static mm_tensor *s_keep(s_scratch *s, mm_tensor *t) {
    if (!t)
        return NULL;
    if (s->n == S_MAX_TMP) { /* a programming error: steps need far fewer */
        fprintf(stderr, "medmoe: more than %d temporaries in one step\n", S_MAX_TMP);
        mm_tensor_destroy(&t);
        return NULL;
    }
    s->t[s->n++] = t;
    return t;
}

static mm_tensor *s_tmp(s_scratch *s, mm_dtype dt, size_t rows, size_t cols) {
    mm_tensor *t = NULL;
    mm_tensor_new_2d(s->be, dt, rows, cols, &t);
    return s_keep(s, t);
}

static mm_tensor *s_rows(s_scratch *s, mm_tensor *t, size_t row0, size_t n) {
    mm_tensor *v = NULL;
    mm_tensor_view_rows(t, row0, n, &v);
    return s_keep(s, v);
}

static void s_scratch_free(s_scratch *s) {
    /* views first: they must go before their parents */
    for (int i = s->n - 1; i >= 0; i--)
        mm_tensor_destroy(&s->t[i]);
    s->n = 0;
}

/* Evaluate an op; on failure jump to `fail` with rc set. */
#define TRY(expr)                                                                                  \
    do {                                                                                           \
        if ((rc = (expr)) != MM_OK)                                                                \
            goto fail;                                                                             \
    } while (0)
/* Make a temporary; on failure jump to `fail`. */
#define TMP(var, expr)                                                                             \
    do {                                                                                           \
        if (!((var) = (expr))) {                                                                   \
            rc = MM_ENOMEM;                                                                        \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

/* ---- the MLP --------------------------------------------------------------
 * y[n, hidden] = mlp(x[n, hidden]). */
static int s_mlp_forward(s_scratch *s, const mm_mlp *mlp, const mm_tensor *x, mm_tensor *y) {
    mm_backend *be = s->be;
    size_t n = x->shape[0];
    int rc;
    mm_tensor *a, *b;
    if (mlp->swiglu) {
        size_t I = mlp->gate.w->shape[0];
        TMP(a, s_tmp(s, MM_F32, n, I));
        TMP(b, s_tmp(s, MM_F32, n, I));
        TRY(mm_matmul(be, a, x, mlp->gate.w, mlp->gate.b));
        TRY(mm_matmul(be, b, x, mlp->up.w, mlp->up.b));
        TRY(mm_swiglu(be, a, a, b));
        TRY(mm_matmul(be, y, a, mlp->down.w, mlp->down.b));
    } else {
        size_t I = mlp->fc1.w->shape[0];
        TMP(a, s_tmp(s, MM_F32, n, I));
        TRY(mm_matmul(be, a, x, mlp->fc1.w, mlp->fc1.b));
        TRY(mm_unary(be, mlp->act, a, a));
        TRY(mm_matmul(be, y, a, mlp->fc2.w, mlp->fc2.b));
    }
    return MM_OK;
fail:
    return rc;
}

int mm_model_expert_forward(mm_model *m, int moe, int expert, const mm_tensor *x, mm_tensor *y,
                            char *err, size_t errlen) {
    const mm_config *c = &m->cfg;
    if (moe < 0 || moe >= c->n_moe_layers || expert < 0 || expert >= c->num_experts[moe])
        return mm_errorf(err, errlen, MM_EINVAL, "expert %d of MoE layer %d does not exist", expert,
                         moe);
    mm_moe *mo = m->layers[c->moe_layers_idx[moe]].moe;
    if (!mo || !mo->experts[expert].loaded)
        return mm_errorf(err, errlen, MM_ENOTFOUND,
                         "expert %d of MoE layer %d (decoder layer %d) is not loaded here", expert,
                         moe, c->moe_layers_idx[moe]);
    s_scratch s = {.be = m->be};
    int rc = s_mlp_forward(&s, &mo->experts[expert], x, y);
    if (rc != MM_OK)
        mm_errorf(err, errlen, rc, "expert %d of MoE layer %d: %s", expert, moe,
                  mm_backend_error(m->be));
    s_scratch_free(&s);
    return rc;
}

/* The in-process runner: compute each job with the local weights. */
static int s_local_start(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                         size_t errlen) {
    for (size_t i = 0; i < n; i++) {
        int rc = mm_model_expert_forward(m, jobs[i].moe, jobs[i].expert, jobs[i].x, jobs[i].y, err,
                                         errlen);
        if (rc != MM_OK)
            return rc;
    }
    return MM_OK;
}

static int s_local_finish(void *ctx, mm_model *m, mm_expert_job *jobs, size_t n, char *err,
                          size_t errlen) {
    return MM_OK;
}

void mm_model_set_expert_runner(mm_model *m, const mm_expert_runner *r) {
    if (r) {
        m->runner = *r;
    } else {
        m->runner.ctx = NULL;
        m->runner.start = s_local_start;
        m->runner.finish = s_local_finish;
    }
}

/* ---- attention --------------------------------------------------------------
 * out[T, n_heads*hd] = attention of x's rows; writes their K/V into the
 * caches first (positions come from seq). Used by the decoder (causal, over
 * the cache) and by the vision tower (cache = this image's own K/V). */
static int s_qkv(s_scratch *s, const mm_linear *q, const mm_linear *k, const mm_linear *v,
                 const mm_tensor *xn, mm_tensor **qo, mm_tensor **ko, mm_tensor **vo) {
    mm_backend *be = s->be;
    size_t T = xn->shape[0];
    int rc;
    TMP(*qo, s_tmp(s, MM_F32, T, q->w->shape[0]));
    TMP(*ko, s_tmp(s, MM_F32, T, k->w->shape[0]));
    TMP(*vo, s_tmp(s, MM_F32, T, v->w->shape[0]));
    TRY(mm_matmul(be, *qo, xn, q->w, q->b));
    TRY(mm_matmul(be, *ko, xn, k->w, k->b));
    TRY(mm_matmul(be, *vo, xn, v->w, v->b));
    return MM_OK;
fail:
    return rc;
}

/* ---- vision tower and projector -------------------------------------------- */

int mm_model_encode_image(mm_model *m, const float *pixels, float *embeds, char *err,
                          size_t errlen) {
    mm_vision *v = m->vision;
    if (!v)
        return mm_errorf(err, errlen, MM_EINVAL, "%s: this model has no vision tower", m->dir);
    const mm_vision_config *vc = &v->cfg;
    mm_backend *be = m->be;
    s_scratch s = {.be = be};
    size_t S = (size_t)vc->image_size, C = (size_t)vc->num_channels, P = (size_t)vc->patch_size;
    size_t D = (size_t)vc->hidden_size, np = (size_t)vc->num_patches, T = np + 1;
    int heads = vc->num_attention_heads, hd = vc->head_dim;
    int rc;
    mm_tensor *img = NULL, *cols, *emb, *patches, *h, *hn, *q, *k, *vv, *att, *o, *f1, *f2, *seq;
    mm_tensor *kc = NULL, *vcache = NULL, *feat, *p1, *p2;

    size_t ishape[3] = {C, S, S};
    TRY(mm_tensor_new(be, MM_F32, 3, ishape, &img));
    TMP(img, s_keep(&s, img));
    TRY(mm_tensor_set(img, pixels, MM_F32));
    /* patch embedding = im2col then one matmul, written into rows 1.. of emb */
    TMP(cols, s_tmp(&s, MM_F32, np, C * P * P));
    TRY(mm_im2col(be, cols, img, (int)P));
    TMP(emb, s_tmp(&s, MM_F32, T, D));
    TMP(patches, s_rows(&s, emb, 1, np));
    TRY(mm_matmul(be, patches, cols, v->patch_w, NULL));
    TRY(mm_tensor_set_rows(emb, 0, 1, v->class_emb, MM_F32)); /* CLS first */
    TRY(mm_add(be, emb, emb, v->pos_emb));
    TMP(h, s_tmp(&s, MM_F32, T, D));
    TRY(mm_layernorm(be, h, emb, v->pre_ln.w, v->pre_ln.b, (float)vc->layer_norm_eps));

    /* Full (non-causal) attention: every query stands at the last position
     * of a one-slot "cache" that is simply this image's K and V. */
    TMP(seq, s_tmp(&s, MM_I32, T, 2));
    {
        int32_t *sp = malloc(T * 2 * sizeof *sp);
        if (!sp) {
            rc = MM_ENOMEM;
            goto fail;
        }
        for (size_t t = 0; t < T; t++) {
            sp[2 * t] = 0;
            sp[2 * t + 1] = (int32_t)(T - 1);
        }
        rc = mm_tensor_set(seq, sp, MM_I32);
        free(sp);
        if (rc != MM_OK)
            goto fail;
    }
    TMP(hn, s_tmp(&s, MM_F32, T, D));
    TMP(att, s_tmp(&s, MM_F32, T, D));
    TMP(o, s_tmp(&s, MM_F32, T, D));
    TMP(f2, s_tmp(&s, MM_F32, T, D));
    TMP(f1, s_tmp(&s, MM_F32, T, (size_t)vc->intermediate_size));
    size_t cshape[3] = {1, T, D};
    for (int l = 0; l < v->n_run; l++) {
        mm_block *ly = &v->layers[l];
        TRY(mm_layernorm(be, hn, h, ly->ln1.w, ly->ln1.b, (float)vc->layer_norm_eps));
        TRY(s_qkv(&s, &ly->q, &ly->k, &ly->v, hn, &q, &k, &vv));
        TRY(mm_tensor_reshape(k, 3, cshape, &kc));
        TMP(kc, s_keep(&s, kc));
        TRY(mm_tensor_reshape(vv, 3, cshape, &vcache));
        TMP(vcache, s_keep(&s, vcache));
        TRY(mm_attention(be, att, q, kc, vcache, seq, heads, heads, hd, 1.0f / sqrtf((float)hd)));
        TRY(mm_matmul(be, o, att, ly->o.w, ly->o.b));
        TRY(mm_add(be, h, h, o));
        TRY(mm_layernorm(be, hn, h, ly->ln2.w, ly->ln2.b, (float)vc->layer_norm_eps));
        TRY(mm_matmul(be, f1, hn, ly->mlp.fc1.w, ly->mlp.fc1.b));
        TRY(mm_unary(be, ly->mlp.act, f1, f1));
        TRY(mm_matmul(be, f2, f1, ly->mlp.fc2.w, ly->mlp.fc2.b));
        TRY(mm_add(be, h, h, f2));
    }
    /* select_feature "patch": drop CLS (row 0) */
    size_t nf = mm_model_image_tokens(m), H = (size_t)m->cfg.hidden_size;
    TMP(feat, s_rows(&s, h, v->keep_cls ? 0 : 1, nf));
    TMP(p1, s_tmp(&s, MM_F32, nf, H));
    TMP(p2, s_tmp(&s, MM_F32, nf, H));
    TRY(mm_matmul(be, p1, feat, v->proj0.w, v->proj0.b));
    TRY(mm_unary(be, MM_GELU_ERF, p1, p1));
    TRY(mm_matmul(be, p2, p1, v->proj2.w, v->proj2.b));
    TRY(mm_tensor_get(p2, embeds));
    s_scratch_free(&s);
    return MM_OK;
fail:
    mm_errorf(err, errlen, rc, "vision tower: %s", mm_backend_error(be));
    s_scratch_free(&s);
    return rc;
}

/* ---- the decoder step ------------------------------------------------------- */

/* The FFN of an MoE layer: y = meta(xn) + Σ_{e in topk} w_e · expert_e(xn).
 * Gate logits, softmax and top-k run on the device; the choices come back to
 * the host to group rows by expert (the router sends one batch per expert). */
static int s_moe_forward(mm_model *m, s_scratch *s, int l, const mm_tensor *xn, mm_tensor *y,
                         int32_t *routing, double deadline_ms, char *err, size_t errlen) {
    const mm_config *c = &m->cfg;
    mm_backend *be = m->be;
    mm_moe *mo = m->layers[l].moe;
    int moe = mm_config_is_moe_layer(c, l);
    size_t T = xn->shape[0], H = (size_t)c->hidden_size, E = (size_t)mo->n_experts;
    int k = c->top_k_experts;
    int rc = MM_OK;
    int32_t *idx = NULL, *rows = NULL, *iota = NULL;
    float *val = NULL, *wts = NULL, *coef = NULL;
    size_t *count = NULL;
    mm_expert_job jobs[MM_CONFIG_MAX_EXPERTS];
    size_t njobs = 0;
    mm_tensor *logits, *probs, *tidx, *tval;

    TMP(logits, s_tmp(s, MM_F32, T, E));
    TMP(probs, s_tmp(s, MM_F32, T, E));
    TMP(tidx, s_tmp(s, MM_I32, T, (size_t)k));
    TMP(tval, s_tmp(s, MM_F32, T, (size_t)k));
    TRY(mm_matmul(be, logits, xn, mo->gate_w, mo->gate_b));
    TRY(mm_softmax(be, probs, logits));
    TRY(mm_topk(be, tidx, tval, probs, k));
    idx = malloc(T * (size_t)k * sizeof *idx);
    val = malloc(T * (size_t)k * sizeof *val);
    rows = malloc(T * (size_t)k * sizeof *rows);
    wts = malloc(T * (size_t)k * sizeof *wts);
    count = calloc(E + 1, sizeof *count);
    if (!idx || !val || !rows || !wts || !count) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "MoE layer %d: out of memory", l);
        goto out;
    }
    TRY(mm_tensor_get(tidx, idx));
    TRY(mm_tensor_get(tval, val));
    if (routing)
        memcpy(routing, idx, T * (size_t)k * sizeof *idx);

    /* DeepSpeed-MoE's weights: top-1 keeps p[e*]; top-2 renormalises. */
    if (k == 2) {
        for (size_t t = 0; t < T; t++) {
            float sum = val[2 * t] + val[2 * t + 1];
            val[2 * t] /= sum;
            val[2 * t + 1] /= sum;
        }
    }
    /* Residual MoE: coef = softmax(Linear(H, 2)(x)); the routed part is
     * scaled by coef0 (folded into the expert weights), the residual MLP by
     * coef1 (added below). */
    mm_tensor *cl = NULL, *cidx = NULL, *c1 = NULL, *ry = NULL;
    if (mo->coef.w) {
        TMP(cl, s_tmp(s, MM_F32, T, 2));
        TRY(mm_matmul(be, cl, xn, mo->coef.w, mo->coef.b));
        TRY(mm_softmax(be, cl, cl));
        coef = malloc(T * 2 * sizeof *coef);
        iota = malloc(T * sizeof *iota);
        if (!coef || !iota) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "MoE layer %d: out of memory", l);
            goto out;
        }
        TRY(mm_tensor_get(cl, coef));
        for (size_t t = 0; t < T; t++) {
            iota[t] = (int32_t)t;
            for (size_t j = 0; j < (size_t)k; j++)
                val[t * (size_t)k + j] *= coef[2 * t];
            coef[t] = coef[2 * t + 1]; /* coef1, compacted in place (t <= 2t+1) */
        }
        TMP(cidx, s_tmp(s, MM_I32, T, 1));
        TMP(c1, s_tmp(s, MM_F32, T, 1));
        TMP(ry, s_tmp(s, MM_F32, T, H));
        TRY(mm_tensor_set(cidx, iota, MM_I32));
        TRY(mm_tensor_set(c1, coef, MM_F32));
    }
    /* Group (row, weight) pairs by expert: counting sort keeps row order. */
    for (size_t i = 0; i < T * (size_t)k; i++) {
        if (idx[i] < 0 || (size_t)idx[i] >= E) {
            rc = mm_errorf(err, errlen, MM_EDEVICE, "MoE layer %d: top-k returned expert %d of %zu",
                           l, idx[i], E);
            goto out;
        }
        count[idx[i] + 1]++;
    }
    for (size_t e = 0; e < E; e++)
        count[e + 1] += count[e];
    {
        size_t fill[MM_CONFIG_MAX_EXPERTS];
        memcpy(fill, count, E * sizeof *fill);
        for (size_t i = 0; i < T * (size_t)k; i++) {
            size_t at = fill[idx[i]]++;
            rows[at] = (int32_t)(i / (size_t)k);
            wts[at] = val[i];
        }
    }
    /* One job per expert that has rows; its input rows gathered. */
    mm_tensor *jidx[MM_CONFIG_MAX_EXPERTS], *jw[MM_CONFIG_MAX_EXPERTS];
    for (size_t e = 0; e < E; e++) {
        size_t n = count[e + 1] - count[e];
        if (n == 0)
            continue;
        mm_expert_job *j = &jobs[njobs];
        j->layer = l;
        j->moe = moe;
        j->expert = (int)e;
        j->n = n;
        j->deadline_ms = deadline_ms;
        TMP(jidx[njobs], s_tmp(s, MM_I32, n, 1));
        TMP(jw[njobs], s_tmp(s, MM_F32, n, 1));
        TMP(j->x, s_tmp(s, MM_F32, n, H));
        TMP(j->y, s_tmp(s, MM_F32, n, H));
        TRY(mm_tensor_set(jidx[njobs], rows + count[e], MM_I32));
        TRY(mm_tensor_set(jw[njobs], wts + count[e], MM_F32));
        TRY(mm_get_rows(be, j->x, xn, jidx[njobs]));
        njobs++;
    }
    rc = m->runner.start(m->runner.ctx, m, jobs, njobs, err, errlen);
    if (rc != MM_OK)
        goto out;
    /* The meta expert runs here while the routed experts work elsewhere. */
    if (mo->meta.loaded) {
        TRY(s_mlp_forward(s, &mo->meta, xn, y));
    } else {
        /* no meta expert (MoE-LLaVA): start from zero */
        TRY(mm_scale(be, y, xn, 0.0f));
    }
    if (ry) {
        TRY(s_mlp_forward(s, &mo->res, xn, ry));
        TRY(mm_scatter_add_rows(be, y, ry, cidx, c1));
    }
    /* Remote experts: start the meta expert on the device now, so it runs
     * while finish() waits for their rows (else it would run only at the
     * next sync, after them). In process, finish() adds nothing to wait for. */
    if (m->runner.finish != s_local_finish)
        TRY(mm_backend_flush(be));
    rc = m->runner.finish(m->runner.ctx, m, jobs, njobs, err, errlen);
    if (rc != MM_OK)
        goto out;
    for (size_t i = 0; i < njobs; i++)
        TRY(mm_scatter_add_rows(be, y, jobs[i].y, jidx[i], jw[i]));
    goto out;
fail:
    mm_errorf(err, errlen, rc, "MoE layer %d: %s", l, mm_backend_error(be));
out:
    free(idx);
    free(val);
    free(rows);
    free(wts);
    free(count);
    free(coef);
    free(iota);
    return rc;
}

/* Row t's input embedding into dst[H]: a token's row of the (mapped)
 * embedding table, converted to f32, or the caller's embedding. */
static int s_embed_rows(mm_model *m, const mm_step *st, float *dst, char *err, size_t errlen) {
    size_t H = (size_t)m->cfg.hidden_size, V = (size_t)m->cfg.vocab_size;
    size_t esz = mm_st_dtype_size(m->embed->st_dtype);
    for (size_t t = 0; t < st->n; t++) {
        int32_t id = st->token[t];
        if (id < 0) {
            if (!st->embed)
                return mm_errorf(err, errlen, MM_EINVAL,
                                 "forward: row %zu has no token id and no embedding", t);
            memcpy(dst + t * H, st->embed + t * H, H * sizeof(float));
        } else if ((size_t)id >= V) {
            return mm_errorf(err, errlen, MM_EINVAL,
                             "forward: token id %d in row %zu is outside the vocabulary (%zu)", id,
                             t, V);
        } else {
            mm_convert_to_f32(dst + t * H, (const char *)m->embed->data + (size_t)id * H * esz,
                              m->embed->dtype, H);
        }
    }
    return MM_OK;
}

int mm_model_forward(mm_model *m, const mm_step *st, float *logits, int32_t *routing, char *err,
                     size_t errlen) {
    const mm_config *c = &m->cfg;
    mm_backend *be = m->be;
    size_t T = st->n, H = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    int nh = c->num_attention_heads, nkv = c->num_key_value_heads, hd = c->head_dim;
    int k = c->top_k_experts > 0 ? c->top_k_experts : 1;
    int rc = MM_OK;
    s_scratch s = {.be = be};
    float *host = NULL;
    int32_t *seqh = NULL, *want = NULL;
    mm_tensor *x, *xn, *xn2, *q, *kk, *vv, *att, *o, *f, *seq, *widx, *xf, *xfn, *part;

    if (!m->opt.load_trunk)
        return mm_errorf(err, errlen, MM_EINVAL, "forward: this model holds experts only");
    if (T == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "forward: no rows");
    size_t nwant = 0;
    for (size_t t = 0; t < T; t++) {
        if (st->slot[t] < 0 || st->slot[t] >= m->opt.n_slots || st->pos[t] < 0 ||
            st->pos[t] >= m->max_ctx)
            return mm_errorf(err, errlen, MM_EINVAL,
                             "forward: row %zu: slot %d / position %d outside %d slots x %d "
                             "positions",
                             t, st->slot[t], st->pos[t], m->opt.n_slots, m->max_ctx);
        nwant += st->want_logits && st->want_logits[t];
    }
    host = malloc(T * H * sizeof *host);
    seqh = malloc(T * 2 * sizeof *seqh);
    want = malloc((nwant ? nwant : 1) * sizeof *want);
    if (!host || !seqh || !want) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "forward: out of memory for %zu rows", T);
        goto out;
    }
    if ((rc = s_embed_rows(m, st, host, err, errlen)) != MM_OK)
        goto out;
    for (size_t t = 0, w = 0; t < T; t++) {
        seqh[2 * t] = st->slot[t];
        seqh[2 * t + 1] = st->pos[t];
        if (st->want_logits && st->want_logits[t])
            want[w++] = (int32_t)t;
    }

    TMP(x, s_tmp(&s, MM_F32, T, H));
    TMP(seq, s_tmp(&s, MM_I32, T, 2));
    TRY(mm_tensor_set(x, host, MM_F32));
    TRY(mm_tensor_set(seq, seqh, MM_I32));
    size_t qw = (size_t)nh * (size_t)hd;
    TMP(xn, s_tmp(&s, MM_F32, T, H));
    TMP(xn2, s_tmp(&s, MM_F32, T, H));
    TMP(att, s_tmp(&s, MM_F32, T, qw));
    TMP(o, s_tmp(&s, MM_F32, T, H));
    TMP(f, s_tmp(&s, MM_F32, T, H));
    float eps = (float)c->norm_eps;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        mm_layer *ly = &m->layers[l];
        int scratch_mark = s.n;
        /* attention: norm -> q,k,v -> rotary -> cache -> attend -> project */
        TRY(mm_layernorm(be, xn, x, ly->b.ln1.w, ly->b.ln1.b, eps));
        TRY(s_qkv(&s, &ly->b.q, &ly->b.k, &ly->b.v, xn, &q, &kk, &vv));
        TRY(mm_rope(be, q, seq, nh, hd, c->rotary_dims, (float)c->rope_theta));
        TRY(mm_rope(be, kk, seq, nkv, hd, c->rotary_dims, (float)c->rope_theta));
        TRY(mm_kv_store(be, ly->kcache, kk, seq));
        TRY(mm_kv_store(be, ly->vcache, vv, seq));
        TRY(mm_attention(be, att, q, ly->kcache, ly->vcache, seq, nh, nkv, hd,
                         1.0f / sqrtf((float)hd)));
        TRY(mm_matmul(be, o, att, ly->b.o.w, ly->b.o.b));
        /* FFN input: the same norm (parallel block, Phi) or a second one */
        const mm_tensor *fin = xn;
        if (!m->parallel) {
            TRY(mm_add(be, x, x, o));
            TRY(mm_layernorm(be, xn2, x, ly->b.ln2.w, ly->b.ln2.b, eps));
            fin = xn2;
        }
        if (ly->moe) {
            int mi = mm_config_is_moe_layer(c, l);
            rc = s_moe_forward(m, &s, l, fin, f, routing ? routing + (size_t)mi * T * k : NULL,
                               st->deadline_ms, err, errlen);
            if (rc != MM_OK)
                goto out;
        } else {
            TRY(s_mlp_forward(&s, &ly->b.mlp, fin, f));
        }
        if (m->parallel)
            TRY(mm_add(be, x, x, o));
        TRY(mm_add(be, x, x, f));
        /* Per-layer temporaries go now; a backend keeps the storage of a
         * tensor destroyed with work still queued until that work has run
         * (kernels.h), so a dense layer costs no submission of its own. */
        for (int i = s.n - 1; i >= scratch_mark; i--)
            mm_tensor_destroy(&s.t[i]);
        s.n = scratch_mark;
    }

    /* LM head on the rows that want logits: gather, final norm, head chunks. */
    if (nwant > 0) {
        TMP(widx, s_tmp(&s, MM_I32, nwant, 1));
        TMP(xf, s_tmp(&s, MM_F32, nwant, H));
        TMP(xfn, s_tmp(&s, MM_F32, nwant, H));
        TRY(mm_tensor_set(widx, want, MM_I32));
        TRY(mm_get_rows(be, xf, x, widx));
        TRY(mm_layernorm(be, xfn, xf, m->final_norm.w, m->final_norm.b, eps));
        float *buf = NULL;
        for (size_t i = 0; i < m->n_head; i++) {
            size_t r0 = i * m->head_rows, nr = m->head[i]->shape[0];
            mm_tensor *hb = NULL;
            if (m->head_bias)
                TMP(hb, s_rows(&s, m->head_bias, r0, nr));
            TMP(part, s_tmp(&s, MM_F32, nwant, nr));
            TRY(mm_matmul(be, part, xfn, m->head[i], hb));
            if (m->n_head == 1) {
                TRY(mm_tensor_get(part, logits));
                break;
            }
            if (!buf && !(buf = malloc(nwant * m->head_rows * sizeof *buf))) {
                rc = mm_errorf(err, errlen, MM_ENOMEM, "forward: out of memory for logits");
                goto out;
            }
            rc = mm_tensor_get(part, buf);
            if (rc != MM_OK) {
                free(buf);
                goto fail;
            }
            for (size_t w = 0; w < nwant; w++)
                memcpy(logits + w * V + r0, buf + w * nr, nr * sizeof *buf);
        }
        free(buf);
    }
    TRY(mm_backend_sync(be));
    goto out;
fail:
    mm_errorf(err, errlen, rc, "forward: %s", mm_backend_error(be));
out:
    s_scratch_free(&s);
    free(host);
    free(seqh);
    free(want);
    return rc;
}

/* ---- KV-cache copy ----------------------------------------------------------- */

int mm_model_kv_copy(mm_model *m, int src_slot, int dst_slot, size_t n_pos, char *err,
                     size_t errlen) {
    int S = m->opt.n_slots;
    if (src_slot < 0 || src_slot >= S || dst_slot < 0 || dst_slot >= S || src_slot == dst_slot ||
        n_pos > (size_t)m->max_ctx)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "kv_copy: slots %d -> %d of %d, %zu positions of %d", src_slot, dst_slot,
                         S, n_pos, m->max_ctx);
    if (n_pos == 0)
        return MM_OK;
    mm_backend *be = m->be;
    mm_tensor *idx = NULL, *seq = NULL, *tmp = NULL, *flat = NULL;
    int32_t *host = malloc(n_pos * 2 * sizeof *host);
    int rc = host ? MM_OK : MM_ENOMEM;
    /* rows src*ctx + i of the flattened cache -> (dst, i) */
    for (size_t i = 0; rc == MM_OK && i < n_pos; i++)
        host[i] = (int32_t)((size_t)src_slot * (size_t)m->max_ctx + i);
    if (rc == MM_OK)
        rc = mm_tensor_new_2d(be, MM_I32, n_pos, 1, &idx);
    if (rc == MM_OK)
        rc = mm_tensor_set(idx, host, MM_I32);
    for (size_t i = 0; rc == MM_OK && i < n_pos; i++) {
        host[2 * i] = dst_slot;
        host[2 * i + 1] = (int32_t)i;
    }
    if (rc == MM_OK)
        rc = mm_tensor_new_2d(be, MM_I32, n_pos, 2, &seq);
    if (rc == MM_OK)
        rc = mm_tensor_set(seq, host, MM_I32);
    for (int l = 0; rc == MM_OK && l < m->cfg.num_hidden_layers; l++) {
        mm_tensor *caches[2] = {m->layers[l].kcache, m->layers[l].vcache};
        for (int c = 0; rc == MM_OK && c < 2; c++) {
            if (!caches[c])
                return mm_errorf(err, errlen, MM_EINVAL, "kv_copy: this model has no KV cache");
            size_t kw = caches[c]->shape[2];
            size_t shape[2] = {(size_t)S * (size_t)m->max_ctx, kw};
            if (!tmp)
                rc = mm_tensor_new_2d(be, MM_F32, n_pos, kw, &tmp);
            if (rc == MM_OK)
                rc = mm_tensor_reshape(caches[c], 2, shape, &flat);
            if (rc == MM_OK)
                rc = mm_get_rows(be, tmp, flat, idx);
            if (rc == MM_OK)
                rc = mm_kv_store(be, caches[c], tmp, seq);
            mm_tensor_destroy(&flat);
        }
    }
    if (rc != MM_OK)
        mm_errorf(err, errlen, rc, "kv_copy: %s", mm_backend_error(be));
    mm_tensor_destroy(&idx);
    mm_tensor_destroy(&seq);
    mm_tensor_destroy(&tmp);
    free(host);
    return rc;
}

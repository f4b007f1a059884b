/* config.h — hyper-parameters of Med-MoE read from config.json files.
 *
 * mm_config holds everything the LLM side needs (backbone, sizes, rotary,
 * norms, multimodal projector settings, the MoE block), parsed from the
 * checkpoint's config.json; mm_vision_config holds the CLIP vision tower's,
 * from a CLIPVisionConfig or a CLIPConfig's nested "vision_config". Nothing is
 * hard-coded: both StableLM-2 and Phi-2 spellings of each key are accepted
 * (rope_pct / partial_rotary_factor, norm_eps / layer_norm_eps /
 * layer_norm_epsilon, rotary_emb_base / rope_theta, ...). Both structs are
 * plain values (fixed arrays, no heap): copy them freely, nothing to free.
 *
 * Every error names the file and the field:
 *   "config.json: field 'hidden_size' missing"
 *   "config.json: moe.moe_layers_idx[2] = 9 but num_hidden_layers = 4"
 *
 *     mm_config c;  char err[256];
 *     if (mm_config_load("/models/medmoe/config.json", &c, err, sizeof err) != MM_OK) {...}
 *     for (int l = 0; l < c.num_hidden_layers; l++) {
 *         int m = mm_config_is_moe_layer(&c, l);   // MoE ordinal or -1
 *         if (m >= 0) ... c.num_experts[m] experts, top c.top_k_experts ...
 *     }
 */
#ifndef MM_CONFIG_H
#define MM_CONFIG_H

#include <stddef.h>

#include "status.h"

#define MM_CONFIG_MAX_LAYERS 256 /* decoder layers we accept (Phi-2: 32)   */
#define MM_CONFIG_MAX_EXPERTS 64 /* experts per MoE layer (Med-MoE: 4)     */
#define MM_CONFIG_STR 128        /* room for each informational string      */

typedef enum mm_arch {
    MM_ARCH_STABLELM = 1, /* pre-LN, sequential attn then SwiGLU MLP (gate/up/down) */
    MM_ARCH_PHI = 2,      /* one LN feeding attention and fc1/fc2 MLP in parallel   */
} mm_arch;

typedef enum mm_act {
    MM_ACT_SILU = 1,       /* x·σ(x)                                    */
    MM_ACT_GELU = 2,       /* exact, erf form ("gelu")                  */
    MM_ACT_GELU_TANH = 3,  /* tanh approximation ("gelu_new", "gelu_pytorch_tanh") */
    MM_ACT_QUICK_GELU = 4, /* x·σ(1.702x) (CLIP)                        */
} mm_act;

const char *mm_arch_name(mm_arch a); /* "stablelm", "phi" */
const char *mm_act_name(mm_act a);   /* "silu", "gelu", "gelu_tanh", "quick_gelu" */

typedef struct mm_config {
    /* -- backbone -- */
    mm_arch arch;                        /* from model_type (contains "stablelm" / "phi")      */
    char model_type[MM_CONFIG_STR];      /* model_type as written                            */
    int hidden_size;                     /* H: residual stream width (StableLM-2 2048)         */
    int intermediate_size;               /* FFN inner width, also each expert's (5632)          */
    int num_hidden_layers;               /* decoder layers (24)                                */
    int num_attention_heads;             /* query heads (32)                                   */
    int num_key_value_heads;             /* key/value heads; = heads unless the file says else */
    int head_dim;                        /* hidden_size / num_attention_heads (64)             */
    int rotary_dims;                     /* leading dims of each head that get RoPE: rope_pct /
                                            partial_rotary_factor × head_dim rounded down to
                                            even, or an explicit rotary_dim (StableLM-2: 16)    */
    double rope_theta;                   /* RoPE base (rope_theta / rotary_emb_base; 10000)     */
    double norm_eps;                     /* LayerNorm epsilon (norm_eps / layer_norm_eps / ...) */
    int use_qkv_bias;                    /* q/k/v projections have biases (Phi: always 1)       */
    int qk_layernorm;                    /* per-head LayerNorm on q and k (not in Med-MoE)      */
    int use_parallel_residual;           /* StableLM's parallel attn+MLP flag (Phi: always 1)   */
    mm_act hidden_act;                   /* MLP activation (StableLM silu, Phi gelu_tanh)       */
    char hidden_act_name[MM_CONFIG_STR]; /* hidden_act as written                      */
    int vocab_size;                      /* embedding / LM head rows in the checkpoint          */
    int max_position_embeddings;         /* context limit (4096 / 2048)                         */
    int bos_token_id;                    /* -1 when absent or null                              */
    int eos_token_id;                    /* -1 when absent or null                              */
    int pad_token_id;                    /* -1 when absent or null                              */
    int tie_word_embeddings;             /* LM head shares embed_tokens (default 0)             */
    char torch_dtype[MM_CONFIG_STR];     /* "bfloat16", "float16", ... ("" if absent)       */

    /* -- multimodal (LLaVA) -- */
    int mm_hidden_size;                    /* vision feature width into the projector (1024); 0 if
                                              the config has no vision part                        */
    char mm_projector_type[MM_CONFIG_STR]; /* mm_projector_type / image_projector_type
                                              ("mlp2x_gelu"; "" if absent)              */
    int mm_vision_select_layer;            /* hidden-state index taken from CLIP (default -2)     */
    char mm_vision_select_feature[MM_CONFIG_STR]; /* "patch" (drop CLS) or "cls_patch" */
    char image_aspect_ratio[MM_CONFIG_STR];       /* "pad" (default) or "square"...    */
    char image_tower[MM_CONFIG_STR];              /* mm_image_tower / image_tower / mm_vision_tower:
                                                     informational (an author's path)                */

    /* -- MoE block ("moe" object; all zero when absent) -- */
    int moe_enable;               /* moe.moe_enable                                      */
    char moe_mode[MM_CONFIG_STR]; /* "sparse", "dense", ... (informational)            */
    int n_moe_layers;             /* entries in moe_layers_idx                           */
    int moe_layers_idx[MM_CONFIG_MAX_LAYERS]; /* decoder layers with an MoE FFN,
                                                 strictly increasing                   */
    int num_experts[MM_CONFIG_MAX_LAYERS];    /* experts of the m-th MoE layer (1..64) */
    int top_k_experts;  /* 1 or 2, ≤ every num_experts                         */
    int use_residual;   /* residual MoE (coef = softmax(Linear(H,2)))          */
    int n_expert_names; /* entries in expert_names (0 when not given)          */
    char expert_names[MM_CONFIG_MAX_EXPERTS][MM_CONFIG_STR]; /* class of each expert,
                                    from moe.expert_names or top-level expert_names     */
} mm_config;

/* Parse the LLM config. name is used in messages only ("config.json"). */
int mm_config_parse(const char *json, size_t len, const char *name, mm_config *out, char *err,
                    size_t errlen);
/* Read and parse a file; messages use its path. MM_ENOTFOUND if absent. */
int mm_config_load(const char *path, mm_config *out, char *err, size_t errlen);

/* MoE ordinal m of decoder layer `layer` (index into num_experts), or -1 when
 * the layer is dense or MoE is disabled. */
int mm_config_is_moe_layer(const mm_config *c, int layer);

typedef struct mm_vision_config {
    int hidden_size;         /* CLIP width (ViT-L: 1024)                      */
    int intermediate_size;   /* MLP inner width (4096)                        */
    int num_hidden_layers;   /* encoder layers (24)                           */
    int num_attention_heads; /* heads (16)                                    */
    int head_dim;            /* hidden_size / num_attention_heads (64)        */
    int image_size;          /* input side in pixels (336)                    */
    int patch_size;          /* patch side (14)                               */
    int num_patches;         /* (image_size / patch_size)² (576)              */
    int num_channels;        /* input channels (3)                            */
    double layer_norm_eps;   /* default 1e-5                                  */
    mm_act hidden_act;       /* default quick_gelu                            */
} mm_vision_config;

/* Parse a CLIP config: a CLIPVisionConfig at top level, or a CLIPConfig with a
 * nested "vision_config" (which wins when present). */
int mm_vision_config_parse(const char *json, size_t len, const char *name, mm_vision_config *out,
                           char *err, size_t errlen);
int mm_vision_config_load(const char *path, mm_vision_config *out, char *err, size_t errlen);

/* Cross-check the LLM config against its vision tower: mm_hidden_size equals
 * the tower width, mm_vision_select_layer indexes CLIP's num_hidden_layers + 1
 * hidden states. On success *layers_to_run (may be NULL) is how many encoder
 * layers produce the selected hidden state (-2 of 24 → 23). */
int mm_config_check_vision(const mm_config *c, const mm_vision_config *v, int *layers_to_run,
                           char *err, size_t errlen);

#endif

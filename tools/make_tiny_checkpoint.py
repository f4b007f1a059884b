#!/usr/bin/python3
"""Writes a tiny random Med-MoE checkpoint in the real Hugging Face layout.

    make_tiny_checkpoint.py --out DIR --backbone stablelm|phi --dtype f32|bf16
                            [--top-k 1|2] [--shards N] [--seed S] [--residual] [--lm-head-bias]
                            [size overrides: --hidden --layers --heads --intermediate
                             --vocab-size --max-pos --clip-hidden --clip-intermediate
                             --clip-layers --clip-heads --clip-image-size --clip-patch-size]

DIR gets config.json (MoE-LLaVA style), model.safetensors (or N shards plus
model.safetensors.index.json), the tokenizer (tools/make_tokenizer.py: StableLM → the
"cl100k" flavour, Phi → "gpt2") and DIR/clip/, a separate CLIP vision tower
(config.json as HF CLIPVisionConfig + model.safetensors with vision_model.* tensors).
Tensor names follow docs/MODEL.md, "Tensor names and config keys".

The weights are random but NOT degenerate, so that a numerical bug changes the answer:
  * modality structure: the projector's last bias adds a large "image" direction u_img
    to every image embedding, the token embeddings carry a "text" direction u_txt, and
    the gate rows of experts 0,1 lean towards u_img, those of 2,3 towards u_txt. Image
    tokens and text tokens therefore tend to go to different experts, and the random
    part of the gate splits each modality between two experts;
  * the lm_head rows past len(tokenizer) (padding to a multiple of 64) are scaled ×8, so
    an argmax that forgets to skip them picks a padding id;
  * scales keep attention, MLP and gate away from saturation; the reference
    (tests/reference/medmoe_ref.py --min-margin) checks top-1/top-2 margins.
Same arguments → same bytes (numpy RandomState, fixed tensor order, no timestamps).

The size overrides make bigger checkpoints of the same construction (bench/model uses
the real StableLM-2-1.6B dimensions: --hidden 2048 --heads 32 --intermediate 5632
--vocab-size 100352 --max-pos 4096, fewer layers, and a ViT-L/14-336 shaped tower).
MoE layers are always 0, 2, 4, ... (every other layer, as in Med-MoE). Without overrides
the defaults below apply and the bytes are those of the test fixtures.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from safetensors_io import f32_to_bf16_bits, write_safetensors  # noqa: E402

HIDDEN = 64
LAYERS = 4
HEADS = 4
MOE_LAYERS = [0, 2]
NUM_EXPERTS = 4
MAX_POS = 256
TOKENIZER_MERGES = 300
CHUNK = 1 << 22  # elements: bigger tensors are generated and converted in blocks (memory)

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8, num_channels=3)
_DEFAULTS = dict(HIDDEN=HIDDEN, LAYERS=LAYERS, HEADS=HEADS, MAX_POS=MAX_POS, CLIP=dict(CLIP))


class Gen:
    """Deterministic tensor factory; records tensors in creation order."""

    def __init__(self, seed):
        self.rng = np.random.RandomState(seed)
        self.tensors = {}

    def normal(self, shape, std, mean=0.0):
        shape = tuple(np.atleast_1d(shape))
        if len(shape) < 2 or np.prod(shape) <= CHUNK:
            return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)
        # Big tensors in row blocks: the same random stream in the same order (so the same
        # values), without float64 temporaries of the whole tensor.
        out = np.empty(shape, np.float32)
        step = max(1, CHUNK // int(np.prod(shape[1:])))
        for r in range(0, shape[0], step):
            blk = out[r:r + step]
            blk[...] = mean + std * self.rng.standard_normal(blk.shape)
        return out

    def add(self, name, arr):
        assert name not in self.tensors, name
        self.tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)

    def linear(self, prefix, n_out, n_in, bias=True, gain=1.0, bias_std=0.05):
        self.add(prefix + ".weight", self.normal((n_out, n_in), gain / np.sqrt(n_in)))
        if bias:
            self.add(prefix + ".bias", self.normal((n_out,), bias_std))

    def layernorm(self, prefix, n):
        self.add(prefix + ".weight", self.normal((n,), 0.1, mean=1.0))
        self.add(prefix + ".bias", self.normal((n,), 0.05))


def mlp_tensors(g, prefix, backbone, hidden, inter):
    if backbone == "stablelm":
        g.linear(prefix + ".gate_proj", inter, hidden, bias=False, gain=1.5)
        g.linear(prefix + ".up_proj", inter, hidden, bias=False, gain=1.5)
        g.linear(prefix + ".down_proj", hidden, inter, bias=False, gain=1.5)
    else:
        g.linear(prefix + ".fc1", inter, hidden, gain=1.5, bias_std=0.1)
        g.linear(prefix + ".fc2", hidden, inter, gain=1.0, bias_std=0.05)


def llm_tensors(g, backbone, vocab, n_tok, inter, mm_hidden, residual, lm_head_bias):
    H = HIDDEN
    # Two orthonormal "modality" directions (see the module docstring).
    q, _ = np.linalg.qr(g.normal((H, H), 1.0))
    u_img, u_txt = q[:, 0].astype(np.float32), q[:, 1].astype(np.float32)

    emb = g.normal((vocab, H), 1.0) + 5.0 * u_txt[None, :]
    g.add("model.embed_tokens.weight", emb)
    for i in range(LAYERS):
        p = "model.layers.%d" % i
        g.layernorm(p + ".input_layernorm", H)
        if backbone == "stablelm":
            g.layernorm(p + ".post_attention_layernorm", H)
            for n in ("q_proj", "k_proj", "v_proj"):
                g.linear(p + ".self_attn." + n, H, H, bias=True, gain=1.5, bias_std=0.1)
            g.linear(p + ".self_attn.o_proj", H, H, bias=False)
        else:
            for n in ("q_proj", "k_proj", "v_proj"):
                g.linear(p + ".self_attn." + n, H, H, bias=True, gain=1.5, bias_std=0.1)
            g.linear(p + ".self_attn.dense", H, H, bias=True)
        if i in MOE_LAYERS:
            m = p + ".mlp"
            # Gate: modality lean (experts 0,1 → image, 2,3 → text) + random part.
            wg = g.normal((NUM_EXPERTS, H), 3.0 / np.sqrt(H))
            wg[0] += 1.0 * u_img
            wg[1] += 1.0 * u_img
            wg[2] += 1.0 * u_txt
            wg[3] += 1.0 * u_txt
            g.add(m + ".deepspeed_moe.gate.wg.weight", wg)
            g.add(m + ".deepspeed_moe.gate.wg.bias", g.normal((NUM_EXPERTS,), 0.2))
            for e in range(NUM_EXPERTS):
                mlp_tensors(g, m + ".deepspeed_moe.experts.deepspeed_experts.%d" % e, backbone, H, inter)
            mlp_tensors(g, m + ".meta_moe", backbone, H, inter)
            if residual:
                # DeepSpeed MoE(use_residual=True): self.mlp (dense residual expert) and
                # self.coefficient = Linear(hidden, 2).
                mlp_tensors(g, m + ".mlp", backbone, H, inter)
                g.linear(m + ".coefficient", 2, H, bias=True, gain=1.0, bias_std=0.2)
        else:
            mlp_tensors(g, p + ".mlp", backbone, H, inter)
    g.layernorm("model.norm" if backbone == "stablelm" else "model.final_layernorm", H)
    head = g.normal((vocab, H), 3.0 / np.sqrt(H))
    head[n_tok:] *= 8.0  # padding rows must never win: make them win if not skipped
    g.add("lm_head.weight", head)
    if lm_head_bias:
        g.add("lm_head.bias", g.normal((vocab,), 0.5))
    # Projector mlp2x_gelu: Linear(mm_hidden → H), GELU, Linear(H → H) + image direction.
    g.linear("model.mm_projector.image_spatial_proj.0", H, mm_hidden, gain=1.5, bias_std=0.1)
    g.add("model.mm_projector.image_spatial_proj.2.weight", g.normal((H, H), 1.0 / np.sqrt(H)))
    g.add("model.mm_projector.image_spatial_proj.2.bias", g.normal((H,), 0.05) + 6.0 * u_img)


def clip_tensors(g):
    c = CLIP
    D = c["hidden_size"]
    npos = (c["image_size"] // c["patch_size"]) ** 2 + 1
    p = "vision_model"
    g.add(p + ".embeddings.class_embedding", g.normal((D,), 0.5))
    g.add(p + ".embeddings.patch_embedding.weight",
          g.normal((D, c["num_channels"], c["patch_size"], c["patch_size"]),
                   2.0 / np.sqrt(c["num_channels"] * c["patch_size"] ** 2)))
    g.add(p + ".embeddings.position_embedding.weight", g.normal((npos, D), 0.5))
    g.layernorm(p + ".pre_layrnorm", D)
    for i in range(c["num_hidden_layers"]):
        lp = p + ".encoder.layers.%d" % i
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            g.linear(lp + ".self_attn." + n, D, D, gain=1.5)
        g.layernorm(lp + ".layer_norm1", D)
        g.linear(lp + ".mlp.fc1", c["intermediate_size"], D, gain=1.5)
        g.linear(lp + ".mlp.fc2", D, c["intermediate_size"])
        g.layernorm(lp + ".layer_norm2", D)
    g.layernorm(p + ".post_layernorm", D)
    return npos


def stored(tensors, dtype):
    """Converts to the stored dtype; empties `tensors` as it goes (big checkpoints would
    otherwise hold the fp32 and the bf16 copy of every tensor at once)."""
    st = "BF16" if dtype == "bf16" else "F32"
    out = {}
    for k in list(tensors):
        v = tensors.pop(k)
        if st == "F32":
            out[k] = ("F32", v)
        elif v.size <= CHUNK:
            out[k] = (st, f32_to_bf16_bits(v))
        else:  # elementwise, so converting in blocks gives the same bits with less memory
            bits = np.empty(v.shape, np.uint16)
            flat, fb = v.reshape(-1), bits.reshape(-1)
            for i in range(0, flat.size, CHUNK):
                fb[i:i + CHUNK] = f32_to_bf16_bits(flat[i:i + CHUNK])
            out[k] = (st, bits)
    return out


def write_shards(out_dir, tensors, n_shards):
    meta = {"format": "pt"}
    if n_shards <= 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, meta)
        return
    names = list(tensors)
    sizes = [tensors[n][1].nbytes for n in names]
    total = sum(sizes)
    weight_map, shard_of, acc, s = {}, {}, 0, 0
    for n, sz in zip(names, sizes):
        # Close the shard once it holds its share of the bytes (last shard takes the rest).
        if s < n_shards - 1 and acc >= total * (s + 1) / n_shards:
            s += 1
        shard_of[n] = s
        acc += sz
    for s in range(n_shards):
        fname = "model-%05d-of-%05d.safetensors" % (s + 1, n_shards)
        part = {n: tensors[n] for n in names if shard_of[n] == s}
        if not part:
            raise SystemExit("shard %d would be empty; use fewer shards" % (s + 1))
        write_safetensors(os.path.join(out_dir, fname), part, meta)
        for n in part:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def llm_config(backbone, dtype, vocab, eos_id, inter, top_k, residual, mm_hidden):
    torch_dtype = "bfloat16" if dtype == "bf16" else "float32"
    c = {}
    if backbone == "stablelm":
        c.update({
            "architectures": ["MoELLaVAStablelmForCausalLM"],
            "model_type": "moe_llava_stablelm",
            "hidden_act": "silu",
            "hidden_size": HIDDEN,
            "intermediate_size": inter,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "rope_pct": 0.25,
            "rope_theta": 10000,
            "norm_eps": 1e-05,
            "use_qkv_bias": True,
        })
    else:
        c.update({
            "architectures": ["MoELLaVAPhiForCausalLM"],
            "model_type": "moe_llava_phi",
            "hidden_act": "gelu_new",
            "hidden_size": HIDDEN,
            "intermediate_size": inter,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "partial_rotary_factor": 0.4,
            "rope_theta": 10000.0,
            "layer_norm_eps": 1e-05,
            "qk_layernorm": False,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
        })
    c.update({
        "vocab_size": vocab,
        "max_position_embeddings": MAX_POS,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "initializer_range": 0.02,
        "transformers_version": "4.36.2",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": mm_hidden,
        "mm_image_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "tokenizer_model_max_length": MAX_POS,
        "tokenizer_padding_side": "right",
        "moe": {
            "moe_enable": True,
            "moe_mode": "sparse",
            "moe_layers_idx": MOE_LAYERS,
            "num_experts": [NUM_EXPERTS] * len(MOE_LAYERS),
            "ep_size": 1,
            "top_k_experts": top_k,
            "capacity_factor": 1.5,
            "eval_capacity_factor": 2.0,
            "min_capacity": 0,
            "use_residual": bool(residual),
            "router_aux_loss_coef": 0.01,
            "train_modules": [],
        },
    })
    return c


def clip_config(dtype):
    c = {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "projection_dim": 16,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "transformers_version": "4.36.2",
    }
    c.update(CLIP)
    return c


def dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def default_seed(backbone, dtype, top_k, residual):
    """Seeds picked by scanning with tests/reference/medmoe_ref.py on tests' case.png and
    question: smallest top1-top2 logit gap >= 0.05 and gate-logit gap >= 2e-3 for BOTH
    dtypes (so f32 and bf16 are the same model), all four experts used. The golden tests
    re-check this (--min-margin 0.02 --min-gate-gap 1e-3)."""
    if residual:  # stablelm seed 2 also ends with <|endoftext|> after 3 tokens (tests EOS)
        return 3 if backbone == "phi" else 2
    if backbone == "phi":
        return 12
    if top_k == 2:
        return 2
    return 3


def apply_sizes(a):
    """Size overrides (None = keep the default) → the module's size constants."""
    global HIDDEN, LAYERS, HEADS, MOE_LAYERS, MAX_POS
    # From the pristine defaults, so that a second main() in one process starts clean.
    HIDDEN, LAYERS, HEADS, MAX_POS = (a.hidden or _DEFAULTS["HIDDEN"], a.layers or _DEFAULTS["LAYERS"],
                                      a.heads or _DEFAULTS["HEADS"], a.max_pos or _DEFAULTS["MAX_POS"])
    MOE_LAYERS = list(range(0, LAYERS, 2))
    CLIP.clear()
    CLIP.update(_DEFAULTS["CLIP"])
    for key, v in (("hidden_size", a.clip_hidden), ("intermediate_size", a.clip_intermediate),
                   ("num_hidden_layers", a.clip_layers), ("num_attention_heads", a.clip_heads),
                   ("image_size", a.clip_image_size), ("patch_size", a.clip_patch_size)):
        if v:
            CLIP[key] = v
    if HIDDEN % HEADS or CLIP["hidden_size"] % CLIP["num_attention_heads"] \
            or CLIP["image_size"] % CLIP["patch_size"]:
        raise SystemExit("sizes: heads must divide hidden, patch must divide image size")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbone", choices=("stablelm", "phi"), required=True)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--top-k", type=int, choices=(1, 2), default=1)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--residual", action="store_true", help="use_residual MoE (coefficient + mlp)")
    ap.add_argument("--lm-head-bias", action="store_true", help="add lm_head.bias (HF Phi-2 style)")
    for opt in ("hidden", "layers", "heads", "intermediate", "vocab-size", "max-pos",
                "clip-hidden", "clip-intermediate", "clip-layers", "clip-heads",
                "clip-image-size", "clip-patch-size"):
        ap.add_argument("--" + opt, type=int, default=None, help="size override")
    a = ap.parse_args(argv)
    apply_sizes(a)
    seed = a.seed if a.seed is not None else default_seed(a.backbone, a.dtype, a.top_k, a.residual)

    os.makedirs(os.path.join(a.out, "clip"), exist_ok=True)
    for old in os.listdir(a.out):  # a re-run with other --shards must not leave stale files
        if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".index.json")):
            os.remove(os.path.join(a.out, old))

    sys.path.insert(0, HERE)
    from make_tokenizer import write_tokenizer
    n_tok = write_tokenizer(a.out, "cl100k" if a.backbone == "stablelm" else "gpt2",
                            tiktoken=False, merges=TOKENIZER_MERGES)
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "reference"))
    from bpe_ref import BPETokenizer
    tok = BPETokenizer.from_dir(a.out)
    assert len(tok) == n_tok, (len(tok), n_tok)
    eos_id = tok.token_id("<|endoftext|>")
    vocab = (n_tok + 63) // 64 * 64
    if vocab == n_tok:
        vocab += 64  # always keep padding rows, so the test can catch an unmasked argmax
    if a.vocab_size:
        if a.vocab_size <= n_tok:
            raise SystemExit("--vocab-size %d must exceed len(tokenizer) = %d" % (a.vocab_size, n_tok))
        vocab = a.vocab_size
    inter = a.intermediate or (128 if a.backbone == "stablelm" else 256)

    g = Gen(seed)
    llm_tensors(g, a.backbone, vocab, n_tok, inter, CLIP["hidden_size"], a.residual, a.lm_head_bias)
    write_shards(a.out, stored(g.tensors, a.dtype), a.shards)
    dump_json(os.path.join(a.out, "config.json"),
              llm_config(a.backbone, a.dtype, vocab, eos_id, inter, a.top_k, a.residual, CLIP["hidden_size"]))

    gc = Gen(seed + 7919)
    npos = clip_tensors(gc)
    ct = stored(gc.tensors, a.dtype)
    ct["vision_model.embeddings.position_ids"] = ("I64", np.arange(npos, dtype=np.int64)[None, :])
    write_safetensors(os.path.join(a.out, "clip", "model.safetensors"), ct, {"format": "pt"})
    dump_json(os.path.join(a.out, "clip", "config.json"), clip_config(a.dtype))
    print("wrote %s: %s %s top-%d, vocab %d (tokenizer %d, eos %d), seed %d, %d shard(s)%s"
          % (a.out, a.backbone, a.dtype, a.top_k, vocab, n_tok, eos_id, seed, max(a.shards, 1),
             ", residual" if a.residual else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Independent PyTorch oracle for the Med-MoE forward pass (written from docs/MODEL.md).

    medmoe_ref.py --model DIR --vision DIR --image FILE --question TEXT
                  [--max-tokens 16] [--candidates a,b,c] [--no-pad] [--template T]
                  --json OUT.json [--dump-logits OUT.f32] [--min-margin X] [--min-gate-gap Y]

Weights of any stored dtype (F32/F16/BF16) are upcast to fp32 and ALL math is fp32
(the C engine does the same: low-precision weights, fp32 activations). Attention is
written out (no SDPA), causal, recomputed over the whole sequence at every step (no KV
cache: simpler, and an independent path from the engine's cache).

JSON written (medmoe-run --json prints the same keys; tests/reference/compare.py diffs):
  prompt_len   positions in the prompt, image tokens included
  image_start  position of the first image token;  image_len  number of image tokens
  tokens       generated ids (greedy; includes the final <|endoftext|> when generated)
  answer       decode(tokens without the final eos).strip()
  routing      [{"layer": L, "experts": [[e] or [e1, e2] per processed position]}] for each
               MoE layer: the prompt positions, then every generated token fed back
               (all generated tokens but the last)
  candidates   (with --candidates) [{"text", "logprob", "prob"}] ranked by logprob desc
--dump-logits: little-endian float32, one row of vocab_size logits (all lm_head rows,
padding rows included) per generated token.
--min-margin X / --min-gate-gap Y: exit 3 if the smallest top1-top2 logit gap over the
generated steps is below X, or the smallest gap between the gate logits of the last chosen
and the best non-chosen expert is below Y (guards the fixtures against near-ties that would
make the comparison flaky).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools"))
from safetensors_io import load_checkpoint_dir, to_float32  # noqa: E402

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {
    # conversation.py `stablelm` / `phi`: SeparatorStyle.TWO, sep " ", sep2 "<|endoftext|>"
    "train": SYSTEM + " USER: <image>\n{question} ASSISTANT:",
}

torch.set_grad_enabled(False)
# Compute dtype: fp32 (the contract). --f64 recomputes everything in float64, to measure
# how far fp32 itself is from the exact result (README: tolerance).
DT = torch.float32


def cfg_get(cfg, *names, default=None):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def load_tensors(d):
    return {k: torch.from_numpy(np.array(to_float32(dt, a), dtype=np.float32)).to(DT)
            for k, (dt, a) in load_checkpoint_dir(d).items()}


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def linear(x, W, b=None):
    y = x @ W.t()
    return y + b if b is not None else y


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, causal):
    """q,k,v: [heads, T, d] → [heads, T, d]; softmax written out."""
    d = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if causal:
        T = s.shape[-1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        s = s.masked_fill(mask, float("-inf"))
    s = s - s.max(-1, keepdim=True).values
    p = torch.exp(s)
    p = p / p.sum(-1, keepdim=True)
    return p @ v


# ---------------------------------------------------------------- vision tower
class Clip:
    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        vc = c.get("vision_config", c)
        self.D = vc["hidden_size"]
        self.L = vc["num_hidden_layers"]
        self.heads = vc["num_attention_heads"]
        self.patch = vc["patch_size"]
        self.size = vc["image_size"]
        self.eps = vc.get("layer_norm_eps", 1e-5)
        act = vc.get("hidden_act", "quick_gelu")
        self.act = {"quick_gelu": quick_gelu, "gelu": gelu_erf}[act]
        t = load_tensors(d)
        self.t = {k[len("vision_model."):]: v for k, v in t.items() if k.startswith("vision_model.")}

    def hidden_states(self, pixels):
        """pixels [3,S,S] → list of L+1 hidden states [T, D] (index 0 = after pre_layrnorm)."""
        t = self.t
        W = t["embeddings.patch_embedding.weight"]  # [D, 3, p, p], no bias
        p = self.patch
        g = self.size // p
        x = pixels.reshape(3, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
        patches = x @ W.reshape(self.D, -1).t()  # row-major over (row, col) of the grid
        h = torch.cat([t["embeddings.class_embedding"][None, :], patches], 0)
        h = h + t["embeddings.position_embedding.weight"][: h.shape[0]]
        h = layer_norm(h, t["pre_layrnorm.weight"], t["pre_layrnorm.bias"], self.eps)
        states = [h]
        T = h.shape[0]
        dh = self.D // self.heads
        for i in range(self.L):
            P = "encoder.layers.%d." % i
            a = layer_norm(h, t[P + "layer_norm1.weight"], t[P + "layer_norm1.bias"], self.eps)
            q = linear(a, t[P + "self_attn.q_proj.weight"], t[P + "self_attn.q_proj.bias"])
            k = linear(a, t[P + "self_attn.k_proj.weight"], t[P + "self_attn.k_proj.bias"])
            v = linear(a, t[P + "self_attn.v_proj.weight"], t[P + "self_attn.v_proj.bias"])
            sh = lambda z: z.reshape(T, self.heads, dh).transpose(0, 1)  # noqa: E731
            o = attention(sh(q), sh(k), sh(v), causal=False).transpose(0, 1).reshape(T, self.D)
            h = h + linear(o, t[P + "self_attn.out_proj.weight"], t[P + "self_attn.out_proj.bias"])
            m = layer_norm(h, t[P + "layer_norm2.weight"], t[P + "layer_norm2.bias"], self.eps)
            m = self.act(linear(m, t[P + "mlp.fc1.weight"], t[P + "mlp.fc1.bias"]))
            h = h + linear(m, t[P + "mlp.fc2.weight"], t[P + "mlp.fc2.bias"])
            states.append(h)
        return states


# ---------------------------------------------------------------- language model
class MedMoE:
    def __init__(self, d):
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        self.cfg = c
        self.t = load_tensors(d)
        t = self.t
        mt = c.get("model_type", "")
        if "phi" in mt or "model.final_layernorm.weight" in t:
            self.backbone = "phi"
        else:
            self.backbone = "stablelm"
        self.H = c["hidden_size"]
        self.L = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.dh = self.H // self.heads
        frac = cfg_get(c, "partial_rotary_factor", "rope_pct", default=1.0)
        self.rot = int(frac * self.dh)
        self.theta = float(cfg_get(c, "rope_theta", "rotary_emb_base", default=10000.0))
        self.eps = float(cfg_get(c, "layer_norm_eps", "norm_eps", default=1e-5))
        self.vocab = c["vocab_size"]
        moe = c.get("moe", {}) or {}
        self.moe_layers = list(moe.get("moe_layers_idx", [])) if moe.get("moe_enable", True) else []
        self.top_k = int(moe.get("top_k_experts", 1))
        self.select_layer = int(c.get("mm_vision_select_layer", -2))
        self.select_feature = c.get("mm_vision_select_feature", "patch")
        self.proj = "model.mm_projector.image_spatial_proj."
        if self.proj + "0.weight" not in t:
            self.proj = "model.mm_projector."

    # --- pieces
    def project(self, feats):
        t, p = self.t, self.proj
        h = gelu_erf(linear(feats, t[p + "0.weight"], t[p + "0.bias"]))
        return linear(h, t[p + "2.weight"], t[p + "2.bias"])

    def mlp(self, x, prefix):
        t = self.t
        if self.backbone == "stablelm":
            g = linear(x, t[prefix + ".gate_proj.weight"])
            u = linear(x, t[prefix + ".up_proj.weight"])
            return linear(torch.nn.functional.silu(g) * u, t[prefix + ".down_proj.weight"])
        h = gelu_tanh(linear(x, t[prefix + ".fc1.weight"], t[prefix + ".fc1.bias"]))
        return linear(h, t[prefix + ".fc2.weight"], t[prefix + ".fc2.bias"])

    def moe(self, x, i, route_log, gate_gaps):
        """docs/MODEL.md 'Gating at inference'. x [T, H] (normalised hidden state)."""
        t = self.t
        P = "model.layers.%d.mlp." % i
        wg = t[P + "deepspeed_moe.gate.wg.weight"]
        bg = t.get(P + "deepspeed_moe.gate.wg.bias")
        E = wg.shape[0]
        gl = linear(x, wg, bg)
        p = torch.softmax(gl, dim=-1)
        y_moe = torch.zeros_like(x)
        for r in range(x.shape[0]):
            pr = p[r]
            e1 = int(torch.argmax(pr))  # first maximum → ties go to the lower index
            rest = pr.clone()
            rest[e1] = float("-inf")
            e2 = int(torch.argmax(rest))
            if self.top_k == 1:
                chosen, weights = [e1], [pr[e1]]
                gate_gaps.append(float(gl[r, e1] - gl[r, e2]))
            else:
                chosen = [e1, e2]
                s = pr[e1] + pr[e2]
                weights = [pr[e1] / s, pr[e2] / s]
                rest[e2] = float("-inf")
                e3 = int(torch.argmax(rest))
                gate_gaps.append(float(min(gl[r, e1] - gl[r, e2], gl[r, e2] - gl[r, e3])) if E > 2
                                 else float(gl[r, e1] - gl[r, e2]))
            route_log.append(chosen)
            for e, w in zip(chosen, weights):
                y_moe[r] += w * self.mlp(x[r:r + 1], P + "deepspeed_moe.experts.deepspeed_experts.%d" % e)[0]
        if P + "coefficient.weight" in t:  # use_residual
            coef = torch.softmax(linear(x, t[P + "coefficient.weight"], t[P + "coefficient.bias"]), -1)
            y_moe = y_moe * coef[:, 0:1] + self.mlp(x, P + "mlp") * coef[:, 1:2]
        if P + "meta_moe." + ("gate_proj.weight" if self.backbone == "stablelm" else "fc1.weight") in t:
            y_moe = y_moe + self.mlp(x, P + "meta_moe")
        return y_moe

    def ffn(self, x, i, routes, gate_gaps):
        if i in self.moe_layers:
            return self.moe(x, i, routes[i], gate_gaps[i])
        return self.mlp(x, "model.layers.%d.mlp" % i)

    def rope(self, x, pos):
        """x [heads, T, dh]: NeoX rotate-half on the first self.rot dims of each head."""
        r = self.rot
        if r == 0:
            return x
        inv = 1.0 / (self.theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        ang = torch.outer(pos.to(torch.float64), inv)  # [T, r/2]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(DT)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(DT)
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        rot = torch.cat([-x2, x1], -1)
        return torch.cat([xr * cos + rot * sin, xp], -1)

    def attn(self, x, i, pos):
        t = self.t
        P = "model.layers.%d.self_attn." % i
        T = x.shape[0]
        q = linear(x, t[P + "q_proj.weight"], t.get(P + "q_proj.bias"))
        k = linear(x, t[P + "k_proj.weight"], t.get(P + "k_proj.bias"))
        v = linear(x, t[P + "v_proj.weight"], t.get(P + "v_proj.bias"))
        q = self.rope(q.reshape(T, self.heads, self.dh).transpose(0, 1), pos)
        k = self.rope(k.reshape(T, self.kv_heads, self.dh).transpose(0, 1), pos)
        v = v.reshape(T, self.kv_heads, self.dh).transpose(0, 1)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, 0)
            v = v.repeat_interleave(rep, 0)
        o = attention(q, k, v, causal=True).transpose(0, 1).reshape(T, self.H)
        if self.backbone == "stablelm":
            return linear(o, t[P + "o_proj.weight"], t.get(P + "o_proj.bias"))
        return linear(o, t[P + "dense.weight"], t.get(P + "dense.bias"))

    def forward(self, h):
        """h [T, H] input embeddings → (logits [T, vocab], routes {layer: [[e..] per pos]}, gate gaps)."""
        t = self.t
        pos = torch.arange(h.shape[0])
        routes = {i: [] for i in self.moe_layers}
        gaps = {i: [] for i in self.moe_layers}
        for i in range(self.L):
            P = "model.layers.%d." % i
            a = layer_norm(h, t[P + "input_layernorm.weight"], t[P + "input_layernorm.bias"], self.eps)
            if self.backbone == "stablelm":
                h = h + self.attn(a, i, pos)
                m = layer_norm(h, t[P + "post_attention_layernorm.weight"],
                               t[P + "post_attention_layernorm.bias"], self.eps)
                h = h + self.ffn(m, i, routes, gaps)
            else:  # Phi: parallel block
                h = h + self.attn(a, i, pos) + self.ffn(a, i, routes, gaps)
        fn = "model.norm" if self.backbone == "stablelm" else "model.final_layernorm"
        h = layer_norm(h, t[fn + ".weight"], t[fn + ".bias"], self.eps)
        return linear(h, t["lm_head.weight"], t.get("lm_head.bias")), routes, gaps


# ---------------------------------------------------------------- driver
def image_features(clip, model, pixels):
    states = clip.hidden_states(torch.from_numpy(np.asarray(pixels, dtype=np.float32)).to(DT))
    f = states[model.select_layer]  # python negative index = HF hidden_states[-2]
    if model.select_feature == "patch":
        f = f[1:]
    return model.project(f)


def build_prompt(tok, model, img_emb, question, template):
    text = TEMPLATES.get(template, template).replace("{question}", question)
    pieces = text.split("<image>")
    if len(pieces) != 2:
        raise SystemExit("template must contain exactly one <image>")
    ids0, ids1 = tok.encode(pieces[0]), tok.encode(pieces[1])
    E = model.t["model.embed_tokens.weight"]
    emb = torch.cat([E[torch.tensor(ids0, dtype=torch.long)], img_emb,
                     E[torch.tensor(ids1, dtype=torch.long)]], 0)
    return emb, len(ids0), img_emb.shape[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Med-MoE PyTorch oracle")
    ap.add_argument("--model", required=True)
    ap.add_argument("--vision", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--candidates", default=None)
    ap.add_argument("--no-pad", action="store_true")
    ap.add_argument("--template", default="train")
    ap.add_argument("--json", required=True)
    ap.add_argument("--dump-logits", default=None)
    ap.add_argument("--min-margin", type=float, default=None)
    ap.add_argument("--min-gate-gap", type=float, default=None)
    ap.add_argument("--f64", action="store_true", help="compute in float64 (tolerance study only)")
    a = ap.parse_args(argv)
    global DT
    DT = torch.float64 if a.f64 else torch.float32

    from bpe_ref import BPETokenizer
    from image_ref import preprocess

    model = MedMoE(a.model)
    clip = Clip(a.vision)
    tok = BPETokenizer.from_dir(a.model)
    n_tok = len(tok)
    eos = model.cfg.get("eos_token_id")
    if eos is None:
        eos = tok.token_id("<|endoftext|>")
    pixels = preprocess(a.image, clip.size, pad=not a.no_pad)
    img = image_features(clip, model, pixels)
    prompt, image_start, image_len = build_prompt(tok, model, img, a.question, a.template)
    prompt_len = prompt.shape[0]
    E = model.t["model.embed_tokens.weight"]

    # Greedy generation (full recompute each step).
    seq = prompt
    tokens, rows, margins = [], [], []
    routing = {i: [] for i in model.moe_layers}
    gate_gaps_all = []
    for step in range(a.max_tokens):
        logits, routes, gaps = model.forward(seq)
        last = logits[-1]
        valid = last[:n_tok]
        top2 = torch.topk(valid, 2).values
        margins.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(valid))
        rows.append(last.to(torch.float32).numpy().astype("<f4"))
        # positions processed in this step: the whole prompt on step 0, then the fed-back token
        for i in model.moe_layers:
            routing[i].extend(routes[i] if step == 0 else routes[i][-1:])
            gate_gaps_all.extend(gaps[i] if step == 0 else gaps[i][-1:])
        tokens.append(nxt)
        if nxt == eos or prompt_len + len(tokens) >= model.cfg.get("max_position_embeddings", 1 << 30):
            break
        seq = torch.cat([seq, E[nxt][None, :]], 0)
    if a.max_tokens == 0:
        _, routes, gaps = model.forward(seq)
        for i in model.moe_layers:
            routing[i].extend(routes[i])
            gate_gaps_all.extend(gaps[i])

    ans_ids = tokens[:-1] if tokens and tokens[-1] == eos else tokens
    out = {
        "prompt_len": prompt_len,
        "image_start": image_start,
        "image_len": image_len,
        "tokens": tokens,
        "answer": tok.decode(ans_ids).strip(),
        "routing": [{"layer": i, "experts": routing[i]} for i in model.moe_layers],
    }

    if a.candidates is not None:
        cands = [c for c in a.candidates.split(",")]
        scored = []
        for c in cands:
            ids = tok.encode(" " + c)
            seq = torch.cat([prompt, E[torch.tensor(ids, dtype=torch.long)]], 0)
            logits, _, _ = model.forward(seq)
            lp = torch.log_softmax(logits[:, :n_tok], -1)
            ll = sum(float(lp[prompt_len - 1 + j, tid]) for j, tid in enumerate(ids))
            scored.append((c, ll))
        lls = torch.tensor([s for _, s in scored], dtype=torch.float64)
        probs = torch.softmax(lls, 0).tolist()
        ranked = sorted(zip(scored, probs), key=lambda z: -z[0][1])  # stable: ties keep input order
        out["candidates"] = [{"text": c, "logprob": ll, "prob": p} for (c, ll), p in ranked]

    for path in (a.json, a.dump_logits):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    if a.dump_logits:
        with open(a.dump_logits, "wb") as f:
            for r in rows:
                f.write(r.tobytes())

    # Diagnostics: how far the fixture is from a tie (see --min-margin).
    min_logit = min(margins) if margins else float("inf")
    min_gate = min(gate_gaps_all) if gate_gaps_all else float("inf")
    pad_max = float(max(r[n_tok:].max() for r in rows)) if rows and model.vocab > n_tok else float("-inf")
    valid_max = float(min(r[:n_tok].max() for r in rows)) if rows else float("-inf")
    use = {}
    for i in model.moe_layers:
        for ch in routing[i]:
            for e in ch:
                use[e] = use.get(e, 0) + 1
    img_sets = {i: sorted({tuple(x) for x in routing[i][image_start:image_start + image_len]})
                for i in model.moe_layers}
    txt_sets = {i: sorted({tuple(x) for x in routing[i][:image_start] + routing[i][image_start + image_len:]})
                for i in model.moe_layers}
    print("prompt_len %d image %d+%d, %d tokens: %s -> %r" % (prompt_len, image_start, image_len,
                                                             len(tokens), tokens, out["answer"]))
    print("min top1-top2 logit margin %.4f; min gate logit gap %.4f; max padding logit %.2f vs "
          "smallest chosen max %.2f; expert use %s" % (min_logit, min_gate, pad_max, valid_max,
                                                        dict(sorted(use.items()))))
    print("image-token experts %s; text-token experts %s" % (img_sets, txt_sets))
    if "candidates" in out:
        print("candidates: " + ", ".join("%s %.4f (p %.3f)" % (c["text"], c["logprob"], c["prob"])
                                         for c in out["candidates"]))
    if a.min_margin is not None and min_logit < a.min_margin:
        print("FAIL: top1-top2 logit margin %g below %g: this fixture is too close to a tie"
              % (min_logit, a.min_margin), file=sys.stderr)
        return 3
    if a.min_gate_gap is not None and min_gate < a.min_gate_gap:
        print("FAIL: gate logit gap %g below %g: routing too close to a tie"
              % (min_gate, a.min_gate_gap), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

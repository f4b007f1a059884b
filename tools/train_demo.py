#!/usr/bin/python3
"""train_demo.py — trains the demo Med-MoE (demo/model) in the paper's three stages.

    /usr/bin/python3 tools/train_demo.py --out demo/model [--dtype bf16|f32]
        [--train-images 2000] [--steps1 N --steps2 N --steps3 N] [--batch 32] [--seed 0]
        [--threads 1] [--slot-questions]
Same arguments -> same weights (fixed seeds, one thread; checked: two runs on this
machine wrote identical files).

Debian's torch 1.13, CPU. One torch thread by default (--threads): on this shared 2-core
machine two OpenMP threads ran ~10x SLOWER per step than one (spin-waiting against the
other engineers' builds). Data: tools/demo_data.py (train seed 1; a separate
validation seed 4 for the progress lines; the held-out seed 2 is never seen here).

Architecture (the real Med-MoE layout at a small size; config.json as
tools/make_tiny_checkpoint.py writes it):
  CLIP-style tower   40x40 px input (the 64x64 images resized), patch 8 (25 patches
                     + CLS), hidden 96, 4 layers, 4 heads, quick_gelu, pre_layrnorm;
                     features from layer -2 (so 3 layers are used), CLS dropped
  projector          mlp2x_gelu: Linear(96,128) GELU(erf) Linear(128,128)
  LM (StableLM-2)    hidden 128, 4 layers, 4 heads x 32, rotary on 25 % (8 dims), SwiGLU
                     MLP 256, LayerNorm with bias, q/k/v biases, vocab = tokenizer (cl100k
                     flavour of tools/make_tokenizer.py) padded to a multiple of 64
  MoE                layers [0, 2]: gate Linear(128, 4) with bias, 4 domain experts + meta
                     expert (same SwiGLU shape), top-1; y = meta(x) + p[e*] * expert_e*(x)
                     (docs/MODEL.md "Gating at inference": un-renormalised softmax probability)
  Expert e is modality e in demo_data.MODALITIES order: ct, mri, x-ray, pathology
  (config.json moe.expert_names).

Stages (docs/MODEL.md "What the experts are"; nothing is pretrained here, so every stage
trains the LM too, unlike the paper where stage 1 trains only the projector):
  1 alignment      tower + projector + LM on captions ("This is a CT image with ...")
  2 instruction    dense model on the VQA data (3 question draws per image); a router Linear(128, 4) with bias learns
                   the modality from the MLP inputs (post_attention_layernorm outputs) of
                   layers 0 and 2: mean-pooled over the image and question positions AND
                   per token there (the gate is applied per token at inference); its
                   gradient also reaches the LM, which makes the modality linearly visible
  3 MoE tuning     the router is copied into the gate of both MoE layers and FROZEN;
                   4 domain experts and the meta expert start as copies of the dense MLP;
                   everything else trains on the VQA data. The router loss stays as an
                   auxiliary term on the frozen gate's logits (gradient reaches the LM
                   only), so the hidden states keep routing by modality.
Loss: cross-entropy on the answer tokens (+ <|endoftext|>) only, over the tokenizer's
rows (padding rows of lm_head stay zero and are never scored).
The training forward is the inference math of tests/reference/medmoe_ref.py, batched;
the check that counts is medmoe-run (tests/demo_model.cmake compares them).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import demo_data  # noqa: E402
from safetensors_io import f32_to_bf16_bits, write_safetensors  # noqa: E402

H, LAYERS, HEADS, INTER = 128, 4, 4, 256
MOE_LAYERS, E = [0, 2], 4
MAX_POS = 256
ROPE_PCT, THETA, EPS = 0.25, 10000.0, 1e-5
CLIP = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            image_size=40, patch_size=8, num_channels=3)
CLIP_USED = CLIP["num_hidden_layers"] - 1  # mm_vision_select_layer -2
TOKENIZER_MERGES = 400
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CAPTION_QUESTIONS = ["Describe the image.", "What does this image show?", "Give a caption."]
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def pixels(u8):
    """tests/reference/image_ref.preprocess (pad: a no-op for square images; PIL bicubic
    resize 64 -> 40; centre crop; CLIP normalisation) of [N,64,64,3] uint8 images
    -> [N,3,40,40] float32: the engine's exact input."""
    from PIL import Image
    from image_ref import clip_uint8
    S = CLIP["image_size"]
    out = []
    for a in u8:
        x = (clip_uint8(Image.fromarray(a, "RGB"), S) * (1 / 255)).astype(np.float32)
        out.append((x - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------ model
def lin(n_out, n_in, bias=True, std=None):
    w = torch.randn(n_out, n_in) * (std if std is not None else 1.0 / math.sqrt(n_in))
    return [w.requires_grad_(), torch.zeros(n_out).requires_grad_() if bias else None]


class Demo:
    """All parameters in a dict keyed by their checkpoint names (f32 master copy)."""

    def __init__(self, vocab, n_tok, seed):
        torch.manual_seed(seed)
        self.vocab, self.n_tok = vocab, n_tok
        p = {}

        def add_lin(name, n_out, n_in, bias=True, std=None):
            w, b = lin(n_out, n_in, bias, std)
            p[name + ".weight"] = w
            if b is not None:
                p[name + ".bias"] = b

        def add_ln(name, n):
            p[name + ".weight"] = torch.ones(n).requires_grad_()
            p[name + ".bias"] = torch.zeros(n).requires_grad_()

        D, I = CLIP["hidden_size"], CLIP["intermediate_size"]
        ps = CLIP["patch_size"]
        npos = (CLIP["image_size"] // ps) ** 2 + 1
        v = "vision_model."
        p[v + "embeddings.class_embedding"] = (torch.randn(D) * 0.1).requires_grad_()
        p[v + "embeddings.patch_embedding.weight"] = (
            torch.randn(D, 3, ps, ps) / math.sqrt(3 * ps * ps)).requires_grad_()
        p[v + "embeddings.position_embedding.weight"] = (torch.randn(npos, D) * 0.1).requires_grad_()
        add_ln(v + "pre_layrnorm", D)
        for i in range(CLIP["num_hidden_layers"]):
            lp = v + "encoder.layers.%d." % i
            for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
                add_lin(lp + "self_attn." + n, D, D)
            add_ln(lp + "layer_norm1", D)
            add_lin(lp + "mlp.fc1", I, D)
            add_lin(lp + "mlp.fc2", D, I)
            add_ln(lp + "layer_norm2", D)
        add_ln(v + "post_layernorm", D)

        add_lin("model.mm_projector.image_spatial_proj.0", H, D)
        add_lin("model.mm_projector.image_spatial_proj.2", H, H)
        p["model.embed_tokens.weight"] = (torch.randn(vocab, H) * 0.3).requires_grad_()
        for i in range(LAYERS):
            lp = "model.layers.%d." % i
            add_ln(lp + "input_layernorm", H)
            add_ln(lp + "post_attention_layernorm", H)
            for n in ("q_proj", "k_proj", "v_proj"):
                add_lin(lp + "self_attn." + n, H, H)
            add_lin(lp + "self_attn.o_proj", H, H, bias=False, std=0.5 / math.sqrt(H))
            self.add_mlp(p, lp + "mlp")
        add_ln("model.norm", H)
        head = torch.randn(vocab, H) / math.sqrt(H)
        head[n_tok:] = 0.0  # padding rows: never trained, never scored
        p["lm_head.weight"] = head.requires_grad_()
        self.p = p
        self.router = None
        self.moe = False

    @staticmethod
    def add_mlp(p, prefix):
        for n, (o, i) in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER))):
            p["%s.%s.weight" % (prefix, n)] = (torch.randn(o, i) / math.sqrt(i)).requires_grad_()

    # --- stage transitions
    def add_router(self):
        w, b = lin(E, H)
        self.router = {"weight": w, "bias": b}

    def to_moe(self):
        """Stage 3: router -> frozen gate of every MoE layer; experts + meta from the MLP."""
        p = self.p
        for i in MOE_LAYERS:
            m = "model.layers.%d.mlp" % i
            dense = {n: p.pop("%s.%s.weight" % (m, n)).detach() for n in ("gate_proj", "up_proj", "down_proj")}
            for e in range(E):
                for n, t in dense.items():
                    p["%s.deepspeed_moe.experts.deepspeed_experts.%d.%s.weight" % (m, e, n)] = \
                        t.clone().requires_grad_()
            for n, t in dense.items():
                p["%s.meta_moe.%s.weight" % (m, n)] = t.clone().requires_grad_()
            p[m + ".deepspeed_moe.gate.wg.weight"] = self.router["weight"].detach().clone()
            p[m + ".deepspeed_moe.gate.wg.bias"] = self.router["bias"].detach().clone()
        self.moe = True

    def trainable(self):
        out = [t for k, t in self.p.items() if ".gate.wg." not in k]
        if self.router is not None and not self.moe:
            out += [self.router["weight"], self.router["bias"]]
        return out

    # --- forward (the math of tests/reference/medmoe_ref.py, batched)
    def tower(self, px):
        p, v = self.p, "vision_model."
        D, ps, nh = CLIP["hidden_size"], CLIP["patch_size"], CLIP["num_attention_heads"]
        B = px.shape[0]
        g = CLIP["image_size"] // ps
        x = px.reshape(B, 3, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * ps * ps)
        x = x @ p[v + "embeddings.patch_embedding.weight"].reshape(D, -1).t()
        cls = p[v + "embeddings.class_embedding"].expand(B, 1, D)
        h = torch.cat([cls, x], 1) + p[v + "embeddings.position_embedding.weight"][None]
        h = F.layer_norm(h, (D,), p[v + "pre_layrnorm.weight"], p[v + "pre_layrnorm.bias"], EPS)
        T = h.shape[1]
        for i in range(CLIP_USED):
            lp = v + "encoder.layers.%d." % i
            a = F.layer_norm(h, (D,), p[lp + "layer_norm1.weight"], p[lp + "layer_norm1.bias"], EPS)
            q, k, vv = (F.linear(a, p[lp + "self_attn.%s.weight" % n], p[lp + "self_attn.%s.bias" % n])
                        .reshape(B, T, nh, D // nh).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
            s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // nh), -1)
            o = (s @ vv).transpose(1, 2).reshape(B, T, D)
            h = h + F.linear(o, p[lp + "self_attn.out_proj.weight"], p[lp + "self_attn.out_proj.bias"])
            m = F.layer_norm(h, (D,), p[lp + "layer_norm2.weight"], p[lp + "layer_norm2.bias"], EPS)
            m = F.linear(m, p[lp + "mlp.fc1.weight"], p[lp + "mlp.fc1.bias"])
            m = m * torch.sigmoid(1.702 * m)
            h = h + F.linear(m, p[lp + "mlp.fc2.weight"], p[lp + "mlp.fc2.bias"])
        f = h[:, 1:]
        pp = "model.mm_projector.image_spatial_proj."
        f = F.gelu(F.linear(f, p[pp + "0.weight"], p[pp + "0.bias"]))
        return F.linear(f, p[pp + "2.weight"], p[pp + "2.bias"])

    def mlp(self, x, prefix):
        p = self.p
        g = F.linear(x, p[prefix + ".gate_proj.weight"])
        u = F.linear(x, p[prefix + ".up_proj.weight"])
        return F.linear(F.silu(g) * u, p[prefix + ".down_proj.weight"])

    def moe_ffn(self, x, i):
        p = self.p
        m = "model.layers.%d.mlp" % i
        gl = F.linear(x, p[m + ".deepspeed_moe.gate.wg.weight"], p[m + ".deepspeed_moe.gate.wg.bias"])
        prob = torch.softmax(gl, -1)
        top = prob.argmax(-1, keepdim=True)  # first maximum: ties -> lower index
        w = prob.gather(-1, top)
        y = torch.zeros_like(x)
        for e in range(E):
            sel = (top[..., 0] == e)
            if bool(sel.any()):
                y[sel] = self.mlp(x[sel], "%s.deepspeed_moe.experts.deepspeed_experts.%d" % (m, e))
        return self.mlp(x, m + ".meta_moe") + w * y, gl

    def rope_tables(self, T):
        dh = H // HEADS
        r = int(ROPE_PCT * dh)
        inv = 1.0 / (THETA ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()
        return r, cos, sin

    @staticmethod
    def rope(x, r, cos, sin):
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        return torch.cat([xr * cos + torch.cat([-x2, x1], -1) * sin, xp], -1)

    def lm(self, h0, h):
        """h0 [1,P,H] the shared prompt prefix (system text: identical for every sample and,
        the attention being causal, never attending to anything after it, so computed once),
        h [B,R,H] the rest (image + question + answer) -> final hidden states of the rest
        [B,R,H], MLP inputs of the MoE layers {i: [B,R,H]}, gate logits {i: [B,R,E]}."""
        p = self.p
        B, R, _ = h.shape
        P = h0.shape[1]
        dh = H // HEADS
        r, cos, sin = self.rope_tables(P + R)
        mask = torch.cat([torch.zeros(R, P), torch.triu(torch.full((R, R), float("-inf")), 1)], 1)
        mask0 = torch.triu(torch.full((P, P), float("-inf")), 1)
        feats, gates = {}, {}
        for i in range(LAYERS):
            lp = "model.layers.%d." % i

            def qkv(x, c, s_):
                a = F.layer_norm(x, (H,), p[lp + "input_layernorm.weight"], p[lp + "input_layernorm.bias"], EPS)
                q, k, v = (F.linear(a, p[lp + "self_attn.%s.weight" % n], p[lp + "self_attn.%s.bias" % n])
                           .reshape(x.shape[0], x.shape[1], HEADS, dh).transpose(1, 2)
                           for n in ("q_proj", "k_proj", "v_proj"))
                return self.rope(q, r, c, s_), self.rope(k, r, c, s_), v

            q0, k0, v0 = qkv(h0, cos[:P], sin[:P])
            q, k, v = qkv(h, cos[P:], sin[P:])
            o0 = torch.softmax(q0 @ k0.transpose(-1, -2) / math.sqrt(dh) + mask0, -1) @ v0
            kk = torch.cat([k0.expand(B, -1, -1, -1), k], 2)
            vv = torch.cat([v0.expand(B, -1, -1, -1), v], 2)
            o = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh) + mask, -1) @ vv
            h0 = h0 + F.linear(o0.transpose(1, 2).reshape(1, P, H), p[lp + "self_attn.o_proj.weight"])
            h = h + F.linear(o.transpose(1, 2).reshape(B, R, H), p[lp + "self_attn.o_proj.weight"])
            ln = lambda x: F.layer_norm(x, (H,), p[lp + "post_attention_layernorm.weight"],  # noqa: E731
                                        p[lp + "post_attention_layernorm.bias"], EPS)
            m0, m = ln(h0), ln(h)
            if i in MOE_LAYERS:
                feats[i] = m
            if self.moe and i in MOE_LAYERS:
                y0, _ = self.moe_ffn(m0, i)
                y, gates[i] = self.moe_ffn(m, i)
                h0, h = h0 + y0, h + y
            else:
                h0, h = h0 + self.mlp(m0, lp + "mlp"), h + self.mlp(m, lp + "mlp")
        h = F.layer_norm(h, (H,), p["model.norm.weight"], p["model.norm.bias"], EPS)
        return h, feats, gates

    def logits(self, h):
        return F.linear(h, self.p["lm_head.weight"][: self.n_tok])


# ------------------------------------------------------------------ data
class Batcher:
    def __init__(self, tok, samples, caption_mode, seed):
        self.tok = tok
        self.eos = tok.token_id("<|endoftext|>")
        self.cache = {}
        self.ids0 = tok.encode(SYSTEM + " USER: ")
        self.px = pixels(np.stack([s.image for s in samples]))
        self.mod = torch.tensor([demo_data.MODALITIES.index(s.modality) for s in samples])
        self.items = []  # (image index, question, answer, qtype)
        for j, s in enumerate(samples):
            if caption_mode:
                for q in CAPTION_QUESTIONS:
                    self.items.append((j, q, demo_data.caption(s), "caption"))
            else:
                for qa in s.qas:
                    self.items.append((j, qa["question"], qa["answer"], qa["qtype"]))
        self.rng = np.random.RandomState(seed)
        self.order, self.pos = self.rng.permutation(len(self.items)), 0

    def enc(self, s):
        if s not in self.cache:
            self.cache[s] = self.tok.encode(s)
        return self.cache[s]

    def next_indices(self, n):
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.items)), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def batch(self, idx):
        """-> pixels, text tail ids [B,Tt] (question + answer + eos, padded), target
        mask [B,Tt] (positions whose NEXT token is an answer token), targets, image ids."""
        rows = []
        for n in idx:
            j, q, a, _ = self.items[n]
            qi = self.enc("\n" + q + " ASSISTANT:")
            ai = self.enc(" " + a) + [self.eos]
            rows.append((j, qi, ai))
        Tt = max(len(qi) + len(ai) for _, qi, ai in rows)
        ids = torch.zeros(len(rows), Tt, dtype=torch.long)
        tmask = torch.zeros(len(rows), Tt, dtype=torch.bool)  # predicts an answer token
        valid = torch.zeros(len(rows), Tt, dtype=torch.bool)
        tgt = torch.zeros(len(rows), Tt, dtype=torch.long)
        for b, (j, qi, ai) in enumerate(rows):
            seq = qi + ai
            ids[b, : len(seq)] = torch.tensor(seq)
            valid[b, : len(seq)] = True
            for t in range(len(qi) - 1, len(seq) - 1):
                tmask[b, t] = True
                tgt[b, t] = seq[t + 1]
        imgs = torch.tensor([r[0] for r in rows])
        return self.px[imgs], ids, valid, tmask, tgt, self.mod[imgs]


def forward_batch(model, bt, batch):
    px, ids, valid, tmask, tgt, mod = batch
    B = px.shape[0]
    emb = model.p["model.embed_tokens.weight"]
    e0 = emb[torch.tensor(bt.ids0)][None]
    img = model.tower(px)
    hs, feats, gates = model.lm(e0, torch.cat([img, emb[ids]], 1))
    # Text position t (in the question + answer tail) predicts token t + 1; tmask marks
    # the positions whose next token is an answer token (the last question token first).
    lt = model.logits(hs[:, img.shape[1]:][tmask])
    loss = F.cross_entropy(lt, tgt[tmask])
    with torch.no_grad():
        wrong = torch.zeros(tmask.shape, dtype=torch.bool)
        wrong[tmask] = lt.argmax(-1) != tgt[tmask]
        ok = ~wrong.any(1)
    # Router / gate modality loss on the image + text positions (MoE layers' MLP inputs).
    pos_mask = torch.cat([torch.ones(B, img.shape[1], dtype=torch.bool), valid], 1)
    return loss, ok, feats, gates, pos_mask, mod


def router_loss(logit_fn, feats, pos_mask, mod):
    total = 0.0
    acc = []
    for i, f in feats.items():
        lg = logit_fn(i, f)  # [B,T,E]
        m = pos_mask.float()[..., None]
        pooled = (f * m).sum(1) / m.sum(1)
        total = total + F.cross_entropy(logit_fn(i, pooled), mod)
        per_tok = lg[pos_mask]
        lab = mod[:, None].expand(-1, lg.shape[1])[pos_mask]
        total = total + F.cross_entropy(per_tok, lab)
        with torch.no_grad():
            acc.append(float((per_tok.argmax(-1) == lab).float().mean()))
    return total, float(np.mean(acc)) if acc else float("nan")


def evaluate(model, bt, n=256):
    """Teacher-forced whole-answer accuracy (= greedy answer correct) on a fixed subset,
    per question type."""
    idx = list(range(min(n, len(bt.items))))
    res = {}
    with torch.no_grad():
        for s in range(0, len(idx), 64):
            chunk = idx[s:s + 64]
            _, ok, _, _, _, _ = forward_batch(model, bt, bt.batch(chunk))
            for n_, o in zip(chunk, ok.tolist()):
                res.setdefault(bt.items[n_][3], []).append(o)
    return {k: sum(v) / len(v) for k, v in sorted(res.items())}


def run_stage(name, model, bt, steps, batch, lr, router_w, val, log):
    params = model.trainable()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    t0 = time.time()
    for step in range(steps):
        f = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        loss, ok, feats, gates, pos_mask, mod = forward_batch(model, bt, bt.batch(bt.next_indices(batch)))
        racc = float("nan")
        if router_w:
            if model.moe:
                rl, racc = router_loss(lambda i, f: gates[i] if f.dim() == 3 else
                                       F.linear(f, model.p["model.layers.%d.mlp.deepspeed_moe.gate.wg.weight" % i],
                                                model.p["model.layers.%d.mlp.deepspeed_moe.gate.wg.bias" % i]),
                                       feats, pos_mask, mod)
            else:
                rl, racc = router_loss(lambda i, f: F.linear(f, model.router["weight"], model.router["bias"]),
                                       feats, pos_mask, mod)
            loss = loss + router_w * rl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log("%s step %d/%d loss %.4f batch-acc %.3f router-acc %.3f  (%.0fs)"
                % (name, step, steps, float(loss), float(ok.float().mean()), racc, time.time() - t0))
    if val is not None:
        log("%s validation (teacher-forced answer accuracy): %s" % (name, json.dumps(evaluate(model, val))))


# ------------------------------------------------------------------ saving
def save(model, out, dtype, n_tok, eos_id):
    from make_tiny_checkpoint import clip_config, dump_json, llm_config
    import make_tiny_checkpoint as mtc
    st = "BF16" if dtype == "bf16" else "F32"

    def conv(t):
        a = np.ascontiguousarray(t.detach().float().numpy())
        return (st, f32_to_bf16_bits(a)) if st == "BF16" else ("F32", a)

    llm = {k: conv(v) for k, v in sorted(model.p.items()) if not k.startswith("vision_model.")}
    vis = {k: conv(v) for k, v in sorted(model.p.items()) if k.startswith("vision_model.")}
    npos = model.p["vision_model.embeddings.position_embedding.weight"].shape[0]
    vis["vision_model.embeddings.position_ids"] = ("I64", np.arange(npos, dtype=np.int64)[None, :])
    meta = {"format": "pt", "expert_names": ",".join(demo_data.MODALITIES)}
    os.makedirs(os.path.join(out, "clip"), exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), llm, meta)
    write_safetensors(os.path.join(out, "clip", "model.safetensors"), vis, {"format": "pt"})
    # Same keys as make_tiny_checkpoint.py, with this model's sizes.
    mtc.HIDDEN, mtc.LAYERS, mtc.HEADS, mtc.MOE_LAYERS, mtc.MAX_POS = H, LAYERS, HEADS, MOE_LAYERS, MAX_POS
    mtc.NUM_EXPERTS = E
    mtc.CLIP.clear()
    mtc.CLIP.update(CLIP)
    cfg = llm_config("stablelm", dtype, model.vocab, eos_id, INTER, 1, False, CLIP["hidden_size"])
    cfg["moe"]["expert_names"] = list(demo_data.MODALITIES)
    cfg["moe"]["router_aux_loss_coef"] = 0.0
    cfg["mm_image_tower"] = "clip"
    dump_json(os.path.join(out, "config.json"), cfg)
    dump_json(os.path.join(out, "clip", "config.json"), clip_config(dtype))


def load(model_dir):
    """A trained checkpoint back into Demo (f32), for the check that the training forward
    is the served math (tests/demo_model.py trainfwd)."""
    from safetensors_io import load_checkpoint_dir, to_float32
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    from bpe_ref import BPETokenizer
    n_tok = len(BPETokenizer.from_dir(model_dir))
    m = Demo.__new__(Demo)
    m.vocab, m.n_tok, m.router, m.moe = cfg["vocab_size"], n_tok, None, True
    m.p = {}
    for d in (model_dir, os.path.join(model_dir, "clip")):
        for k, (dt, arr) in load_checkpoint_dir(d).items():
            if not k.endswith("position_ids"):
                m.p[k] = torch.from_numpy(np.array(to_float32(dt, arr), dtype=np.float32))
    return m


def prompt_logits(model, tok, px, question):
    """Logits (tokenizer rows) after the prompt of one case: px [3,S,S] float32."""
    with torch.no_grad():
        emb = model.p["model.embed_tokens.weight"]
        e0 = emb[torch.tensor(tok.encode(SYSTEM + " USER: "))][None]
        tail = emb[torch.tensor(tok.encode("\n" + question + " ASSISTANT:"))][None]
        hs, _, _ = model.lm(e0, torch.cat([model.tower(px[None]), tail], 1))
        return model.logits(hs[0, -1])


# ------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="bf16")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=64)
    ap.add_argument("--steps1", type=int, default=200)
    ap.add_argument("--steps2", type=int, default=1200)
    ap.add_argument("--steps3", type=int, default=900)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--slot-questions", action="store_true",
                    help="add demo_data.slot_questions to the training set (tried: it did not "
                         "help, see demo/README.md; off for demo/model)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    logf = []

    def log(s):
        line = "[%5.0fs] %s" % (time.time() - t_start, s)
        print(line, flush=True)
        logf.append(line)

    os.makedirs(a.out, exist_ok=True)
    from make_tokenizer import write_tokenizer
    from bpe_ref import BPETokenizer
    n_tok = write_tokenizer(a.out, "cl100k", tiktoken=False, merges=TOKENIZER_MERGES)
    tok = BPETokenizer.from_dir(a.out)
    eos = tok.token_id("<|endoftext|>")
    vocab = (n_tok + 63) // 64 * 64
    log("tokenizer: %d tokens (vocab rows %d), eos %d" % (n_tok, vocab, eos))

    train = demo_data.samples(a.train_images, demo_data.SEEDS["train"], "tr", draws=3)
    if a.slot_questions:  # "is there a lesion on the <side>?" for every image (training only)
        srng = np.random.RandomState(a.seed + 3)
        for s in train:
            s.qas = s.qas + demo_data.slot_questions(srng, s.slots)
    val = demo_data.samples(a.val_images, 4, "va")
    log("data: %d train images, %d val images" % (len(train), len(val)))
    model = Demo(vocab, n_tok, a.seed)

    cap = Batcher(tok, train, True, a.seed + 1)
    vqa = Batcher(tok, train, False, a.seed + 2)
    vval = Batcher(tok, val, False, 0)
    log("stage 1 (alignment): %d caption items" % len(cap.items))
    run_stage("stage1", model, cap, a.steps1, a.batch, a.lr, 0.0, None, log)
    model.add_router()
    log("stage 2 (instruction tuning + router): %d VQA items" % len(vqa.items))
    run_stage("stage2", model, vqa, a.steps2, a.batch, a.lr, 0.3, vval, log)
    model.to_moe()
    log("stage 3 (MoE tuning, frozen gate)")
    run_stage("stage3", model, vqa, a.steps3, a.batch, a.lr * 0.5, 0.1, vval, log)
    save(model, a.out, a.dtype, n_tok, eos)
    n_par = sum(v.numel() for v in model.p.values())
    log("saved %s (%s): %d parameters; total %.0fs wall, %.0fs CPU"
        % (a.out, a.dtype, n_par, time.time() - t_start, time.process_time()))
    with open(os.path.join(a.out, "training_log.txt"), "w") as f:
        f.write("\n".join(logf) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

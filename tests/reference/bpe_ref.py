"""bpe_ref.py — an independent pure-Python byte-level BPE tokenizer.

The reference the C tokenizer (model/tokenizer.c) is tested against, and the
tokenizer the PyTorch reference model uses for its prompts. It follows the
Hugging Face `tokenizers` semantics for tokenizer.json and tiktoken's for a
*.tiktoken file; nothing here is shared with the C code.

    tok = BPETokenizer.from_dir("testdata/tok_gpt2")   # tokenizer.json or *.tiktoken
    ids = tok.encode("Is there a lesion in the left lung?")
    assert tok.decode(ids) == "Is there a lesion in the left lung?"
    eos = tok.token_id("<|endoftext|>")                 # None when absent
    before, after = prompt_ids(tok, "What is shown?", conv_mode="phi")

Encoding, as HF does it:
  1. added tokens (special or not) are found first, leftmost-longest, and
     become their own ids, never split;
  2. the text between them goes through the pre-tokenizer: each Split(Regex,
     Isolated) stage cuts every piece into matches and the gaps between them,
     then ByteLevel (optional prefix space, optional GPT-2 regex split);
  3. each piece's UTF-8 bytes start as byte tokens and the adjacent pair of
     lowest merge rank is merged (leftmost on ties) until none is left.
     For a *.tiktoken file the rank of a pair is the rank of its concatenated
     bytes (tiktoken's rule).
Decoding joins token bytes (added tokens as their text) and decodes UTF-8 with
U+FFFD for invalid sequences (HF's from_utf8_lossy, Python's errors="replace").
No BOS is added: none of Med-MoE's tokenizers adds one.
"""

import base64
import glob
import json
import os

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class TokenizerError(ValueError):
    pass


class BPETokenizer:
    def __init__(self):
        self.vocab = {}          # token bytes -> id (the BPE model's vocabulary)
        self.id_bytes = {}       # id -> bytes (vocab and added tokens)
        self.merges = {}         # (id_a, id_b) -> (rank, id_merged); HF mode
        self.tiktoken = False    # rank of a pair = rank of its concatenation
        self.ignore_merges = False
        self.split_patterns = []  # compiled Split(Isolated) stages, in order
        self.byte_level_regex = False
        self.add_prefix_space = False
        self.added = {}          # content -> (id, special)
        self.special_ids = set()
        self.size = 0
        self.byte_ids = []
        self.eos_token = EOT     # tokenizer_config.json's eos_token when from_dir finds one

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path):
        """tokenizer.json, else the first *.tiktoken; eos from tokenizer_config.json."""
        tj = os.path.join(path, "tokenizer.json")
        tk = sorted(glob.glob(os.path.join(path, "*.tiktoken")))
        if os.path.exists(tj):
            self = cls.from_tokenizer_json(tj)
        elif tk:
            self = cls.from_tiktoken(tk[0])
        else:
            raise TokenizerError("%s: no tokenizer.json and no *.tiktoken file" % path)
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                self.eos_token = eos
        return self

    @classmethod
    def from_tokenizer_json(cls, path):
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        self = cls()
        model = doc.get("model")
        if not isinstance(model, dict):
            raise TokenizerError("%s: field 'model' missing" % path)
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError("%s: model.type %r is not BPE" % (path, model.get("type")))
        self.ignore_merges = bool(model.get("ignore_merges") or False)
        u2b = {u: b for b, u in bytes_to_unicode().items()}
        for tok, i in model["vocab"].items():
            try:
                b = bytes(u2b[c] for c in tok)
            except KeyError:
                raise TokenizerError("%s: model.vocab token %r is not byte-level" % (path, tok))
            if i in self.id_bytes:
                raise TokenizerError("%s: model.vocab id %d is used twice" % (path, i))
            self.vocab[b] = i
            self.id_bytes[i] = b
        for rank, m in enumerate(model["merges"]):
            a, b = m.split(" ") if isinstance(m, str) else m
            ab = [bytes(u2b[c] for c in x) for x in (a, b)]
            try:
                ia, ib, im = self.vocab[ab[0]], self.vocab[ab[1]], self.vocab[ab[0] + ab[1]]
            except KeyError:
                raise TokenizerError("%s: model.merges[%d] %r uses an unknown token" % (path, rank, m))
            self.merges[(ia, ib)] = (rank, im)  # HF: a repeated pair keeps its last rank
        for t in doc.get("added_tokens") or []:
            self._add(t["content"], t["id"], bool(t.get("special")))
        self._pre_tokenizer(path, doc.get("pre_tokenizer"))
        self._finish(path)
        return self

    def _pre_tokenizer(self, path, pt):
        stages = pt.get("pretokenizers", []) if pt and pt.get("type") == "Sequence" else [pt]
        seen_bl = False
        for st in stages:
            if st is None:
                continue
            if st["type"] == "Split":
                if seen_bl or st.get("behavior") != "Isolated" or st.get("invert"):
                    raise TokenizerError("%s: unsupported Split pre_tokenizer" % path)
                self.split_patterns.append(regex.compile(st["pattern"]["Regex"]))
            elif st["type"] == "ByteLevel":
                seen_bl = True
                self.byte_level_regex = st.get("use_regex", True)
                self.add_prefix_space = st.get("add_prefix_space", False)
            else:
                raise TokenizerError("%s: unsupported pre_tokenizer %r" % (path, st["type"]))
        if not seen_bl:
            raise TokenizerError("%s: pre_tokenizer has no ByteLevel step" % path)
        self._gpt2 = regex.compile(GPT2_PATTERN)

    @classmethod
    def from_tiktoken(cls, path):
        self = cls()
        self.tiktoken = True
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                tok, rank = line.split()
                b, r = base64.b64decode(tok, validate=True), int(rank)
                if b in self.vocab or r in self.id_bytes:
                    raise TokenizerError("%s:%d: duplicate token or rank" % (path, lineno))
                self.vocab[b] = r
                self.id_bytes[r] = b
        self.split_patterns = [regex.compile(CL100K_PATTERN)]
        self.byte_level_regex = False
        self._add(EOT, max(self.id_bytes) + 1, True)
        self._finish(path)
        return self

    def _add(self, content, i, special):
        self.added[content] = (i, special)
        self.id_bytes[i] = content.encode("utf-8")
        if special:
            self.special_ids.add(i)

    def _finish(self, path):
        self.size = max(self.id_bytes) + 1
        try:
            self.byte_ids = [self.vocab[bytes([c])] for c in range(256)]
        except KeyError:
            raise TokenizerError("%s: the vocabulary lacks some of the 256 byte tokens" % path)
        self._added_sorted = sorted(self.added, key=lambda s: -len(s))

    # ---------------------------------------------------------------- queries
    def __len__(self):
        return self.size

    def token_id(self, s):
        """Id of an added token or of a vocabulary token given by its text; None if absent."""
        if s in self.added:
            return self.added[s][0]
        return self.vocab.get(s.encode("utf-8"))

    @property
    def eos_id(self):
        """Id of the end-of-text token (None when absent)."""
        return self.token_id(self.eos_token)

    # ---------------------------------------------------------------- encode
    def _split_added(self, text):
        """[(segment, None) | (None, id)] — added tokens found leftmost-longest."""
        out, start, i = [], 0, 0
        while i < len(text) and self.added:
            hit = None
            for s in self._added_sorted:
                if text.startswith(s, i):
                    hit = s
                    break
            if hit is None:
                i += 1
                continue
            if i > start:
                out.append((text[start:i], None))
            out.append((None, self.added[hit][0]))
            i += len(hit)
            start = i
        if start < len(text):
            out.append((text[start:], None))
        return out

    @staticmethod
    def _isolate(pattern, pieces):
        out = []
        for p in pieces:
            last = 0
            for m in pattern.finditer(p):
                if m.start() > last:
                    out.append(p[last:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                last = m.end()
            if last < len(p):
                out.append(p[last:])
        return out

    def pre_tokenize(self, text):
        pieces = [text]
        for pat in self.split_patterns:
            pieces = self._isolate(pat, pieces)
        if self.add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if self.byte_level_regex:
            pieces = self._isolate(self._gpt2, pieces)
        return pieces

    def _pair(self, a, b):
        if self.tiktoken:
            r = self.vocab.get(self.id_bytes[a] + self.id_bytes[b])
            return None if r is None else (r, r)
        return self.merges.get((a, b))

    def _bpe(self, b):
        if self.ignore_merges and b in self.vocab:
            return [self.vocab[b]]
        syms = [self.byte_ids[c] for c in b]
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                r = self._pair(syms[i], syms[i + 1])
                if r is not None and (best is None or r[0] < best[0]):
                    best = (r[0], i, r[1])
            if best is None:
                break
            _, i, new = best
            syms[i:i + 2] = [new]
        return syms

    def encode(self, text):
        ids = []
        for seg, tid in self._split_added(text):
            if tid is not None:
                ids.append(tid)
                continue
            for piece in self.pre_tokenize(seg):
                ids.extend(self._bpe(piece.encode("utf-8")))
        return ids

    # ---------------------------------------------------------------- decode
    def token_bytes(self, i):
        if i not in self.id_bytes:
            raise TokenizerError("token id %d is not in the tokenizer (size %d)" % (i, self.size))
        return self.id_bytes[i]

    def decode(self, ids, skip_special_tokens=False):
        parts = [self.token_bytes(i) for i in ids
                 if not (skip_special_tokens and i in self.special_ids)]
        return b"".join(parts).decode("utf-8", errors="replace")


# -------------------------------------------------------------------- prompts
# Med-MoE's conversation templates (moellava/conversation.py): "phi" and
# "stablelm" are the training templates (SeparatorStyle.TWO, sep " ",
# sep2 <|endoftext|>); "simple" is simple_conv_med (SINGLE, sep "###") that
# the VQA evaluation script runs with --conv-mode simple.
_SYSTEM_CHAT = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_SYSTEM_SIMPLE = ("You are LLaVA-Med, a large language and vision assistant trained by a group of "
                  "researchers at Microsoft, based on the general domain LLaVA architecture."
                  "You are designed to assist human with a variety of medical and clinical research "
                  "tasks using natural language."
                  "Follow the instructions carefully.")
CONV_MODES = ("phi", "stablelm", "simple")
IMAGE_TOKEN = "<image>"


def render_prompt(question, conv_mode="phi", image=True):
    """The prompt text exactly as Med-MoE's model_vqa_med.py builds it."""
    q = question.replace(IMAGE_TOKEN, "").strip()
    msg = IMAGE_TOKEN + "\n" + q if image else q
    if conv_mode in ("phi", "stablelm"):
        return _SYSTEM_CHAT + " " + "USER: " + msg + " " + "ASSISTANT:"
    if conv_mode == "simple":
        return (_SYSTEM_SIMPLE + "###" + "Human: Hi!###" +
                "Assistant: Hi there!  How can I help you today?\n###" +
                "Human: " + msg + "###" + "Assistant:")
    raise ValueError("unknown conv_mode %r (one of %s)" % (conv_mode, ", ".join(CONV_MODES)))


def stop_string(conv_mode="phi"):
    return "###" if conv_mode == "simple" else EOT


def prompt_ids(tok, question, conv_mode="phi", image=True):
    """(ids before <image>, ids after it): each piece tokenised on its own, no BOS.
    Without an image the whole prompt is in `before` and `after` is empty."""
    text = render_prompt(question, conv_mode, image)
    if not image:
        return tok.encode(text), []
    before, after = text.split(IMAGE_TOKEN, 1)
    return tok.encode(before), tok.encode(after)

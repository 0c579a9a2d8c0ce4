"""Rebuild an mmjax unified DualToken export in PyTorch and run one generation step.

Needs torch, safetensors and transformers (tokenizers for text prompts). The export
(``python launch/tpu.py --config configs/dualtoken.py:demo_unified --mode export``, or
``mmjax.systems.dualtoken.export.export_unified``) holds ``lm/`` (a transformers
``Qwen2ForCausalLM`` directory with ``tokenizer.json``), ``visual.safetensors`` and
``visual_config.json``. The visual parts, written here in plain torch:

  * ``VisualEmbedding``: one ``[K, e]`` code-embedding table per vocabulary (pixel,
    semantic); a visual position's LM input is ``proj(concat(sum_d E_pix[c_d],
    sum_d E_sem[c_d]))``.
  * ``DepthHead`` (one per vocabulary): the final hidden state ``h`` of the LM at position
    ``t`` (after its norm) gives the codes of visual position ``t + 1``. Depth 0 reads
    ``from_hidden(h)``, depth ``d >= 1`` reads ``from_codes(sum of E[c_j], j < d)`` (the
    vocabulary's own table), each ``fc2(gelu_tanh(fc1 x))``, plus ``depth_embed[d]``; then
    pre-norm layers (RMSNorm in fp32, causal attention over the depths with scale
    1/sqrt(head_dim), no RoPE, GQA, SwiGLU MLP), a final RMSNorm and one bias-free
    ``classifiers[d]`` per depth.

Generation step (``generation_step``): the conditional prompts ``[bos] caption <boi>`` and
the blank ones ``[bos] <boi>`` (left padded, one batch, conditional rows first; RoPE
positions count real tokens) are prefilled; at the first visual position the pixel head and
then the semantic head run all depths, each depth's logits guided ``u + s (c - u)``, then
greedy (temperature 0) or temperature / top-k / top-p sampling; the position's embedding is
fed back to the LM (KV cache) for the next position's hidden state.

    import sys; sys.path.insert(0, "scripts")
    from dualtoken_unified_to_torch import load, generation_prompts, generation_step
    lm, model, config, tok = load("/tmp/u/export_unified")
    ids, mask = generation_prompts(config, tok, ["a red circle"])
    out = generation_step(lm, model, ids, mask, cfg_scale=3.0, temperature=0.0)
    out["pixel"], out["semantic"]            # [1, D] codes of the first visual position

    python scripts/dualtoken_unified_to_torch.py /tmp/u/export_unified --prompt "a red circle"
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

FORMAT = "mmjax-dualtoken-unified"
VOCABS = ("pixel", "semantic")


class RMSNorm(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

  def forward(self, x):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return y.to(x.dtype) * self.weight


class InputMlp(nn.Module):
  """``fc2(gelu_tanh(fc1 x))``, with biases."""

  def __init__(self, d_in, hidden, d_out):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
  """Causal self-attention over the depths (GQA, no RoPE)."""

  def __init__(self, c):
    super().__init__()
    w, hd = c["width"], c["head_dim"]
    self.heads, self.kv_heads, self.head_dim = c["num_heads"], c["num_key_value_heads"], hd
    self.q_proj = nn.Linear(w, self.heads * hd, bias=c["qkv_bias"])
    self.k_proj = nn.Linear(w, self.kv_heads * hd, bias=c["qkv_bias"])
    self.v_proj = nn.Linear(w, self.kv_heads * hd, bias=c["qkv_bias"])
    self.o_proj = nn.Linear(self.heads * hd, w, bias=c["o_bias"])

  def forward(self, x):
    b, n, _ = x.shape
    q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
    rep = self.heads // self.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
    return self.o_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
  def __init__(self, c):
    super().__init__()
    w, m, bias = c["width"], c["intermediate_size"], c["mlp_bias"]
    self.gate_proj, self.up_proj = nn.Linear(w, m, bias=bias), nn.Linear(w, m, bias=bias)
    self.down_proj = nn.Linear(m, w, bias=bias)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.input_layernorm = RMSNorm(c["width"], c["rms_norm_eps"])
    self.self_attn = Attention(c)
    self.post_attention_layernorm = RMSNorm(c["width"], c["rms_norm_eps"])
    self.mlp = Mlp(c)

  def forward(self, x):
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class DepthHead(nn.Module):
  """One vocabulary's depth transformer (see the module docstring)."""

  def __init__(self, c, hidden_size, code_embed_dim):
    super().__init__()
    if c.get("mlp_act", "swiglu") != "swiglu" or c.get("norm", "rms") != "rms":
      raise NotImplementedError(f"depth head with {c['mlp_act']} / {c['norm']}")
    w, m = c["width"], c["input_mlp_dim"]
    self.depths = c["depths"]
    self.from_hidden = InputMlp(hidden_size, m, w)
    self.from_codes = InputMlp(code_embed_dim, m, w)
    self.depth_embed = nn.Parameter(torch.zeros(self.depths, w))
    self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_layers"]))
    self.norm = RMSNorm(w, c["rms_norm_eps"])
    self.classifiers = nn.ModuleList(nn.Linear(w, c["codebook_size"], bias=False)
                                     for _ in range(self.depths))

  def first_input(self, hidden):
    """``[n, H]`` LM states -> the input of depth 0 ``[n, W]``."""
    return self.from_hidden(hidden) + self.depth_embed[0]

  def code_input(self, prefix_sum, depth):
    """``[n, e]`` sum of the code embeddings of depths < ``depth`` -> its input ``[n, W]``."""
    return self.from_codes(prefix_sum) + self.depth_embed[depth]

  def stack(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)

  def forward(self, hidden, prefix_sums):
    """Teacher-forced logits ``[n, D, K]``: ``hidden [n, H]``, ``prefix_sums [n, D-1, e]``."""
    x = torch.cat([self.first_input(hidden)[:, None],
                   self.from_codes(prefix_sums) + self.depth_embed[1:]], dim=1)
    y = self.stack(x)
    return torch.stack([self.classifiers[d](y[:, d]) for d in range(self.depths)], 1).float()


class VisualEmbedding(nn.Module):
  def __init__(self, config):
    super().__init__()
    e, h = config["code_embed_dim"], config["hidden_size"]
    self.pixel_embed = nn.Embedding(config["pixel_head"]["codebook_size"], e)
    self.semantic_embed = nn.Embedding(config["semantic_head"]["codebook_size"], e)
    self.proj = nn.Linear(2 * e, h)

  def table(self, vocab):
    return self.pixel_embed if vocab == "pixel" else self.semantic_embed

  def forward(self, pixel_codes, semantic_codes):
    """``[..., D]`` codes of both vocabularies -> LM input embeddings ``[..., H]``."""
    pix = self.pixel_embed(pixel_codes).sum(-2)
    sem = self.semantic_embed(semantic_codes).sum(-2)
    return self.proj(torch.cat([pix, sem], -1))


class UnifiedVisual(nn.Module):
  """Everything of the export but the LM: ``visual``, ``pixel_head``, ``semantic_head``."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    self.visual = VisualEmbedding(config)
    h, e = config["hidden_size"], config["code_embed_dim"]
    self.pixel_head = DepthHead(config["pixel_head"], h, e)
    self.semantic_head = DepthHead(config["semantic_head"], h, e)

  def head(self, vocab):
    return self.pixel_head if vocab == "pixel" else self.semantic_head

  @classmethod
  def from_dir(cls, path):
    with open(os.path.join(path, "visual_config.json")) as f:
      config = json.load(f)
    if config.get("format") != FORMAT:
      raise ValueError(f"{path}/visual_config.json is not a {FORMAT} export")
    model = cls(config)
    model.load_state_dict(load_file(os.path.join(path, "visual.safetensors")), strict=True)
    return model.float().eval()


def load(path, attn_implementation="eager"):
  """``(lm, visual model, config, text tokenizer or None)`` of an export directory."""
  from transformers import Qwen2ForCausalLM   # pylint: disable=import-outside-toplevel
  model = UnifiedVisual.from_dir(path)
  lm_dir = os.path.join(path, model.config.get("lm", "lm"))
  lm = Qwen2ForCausalLM.from_pretrained(lm_dir, dtype=torch.float32,
                                        attn_implementation=attn_implementation).eval()
  tok = None
  if os.path.isfile(os.path.join(lm_dir, "tokenizer.json")):
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer.from_file(os.path.join(lm_dir, "tokenizer.json"))
  return lm, model, model.config, tok


def generation_prompts(config, tokenizer, captions, uncond=True):
  """``(ids, mask)`` ``[2b, P]`` (``[b, P]`` without ``uncond``): ``[bos] caption <boi>``
  rows, then the blank ``[bos] <boi>`` ones, left padded to ``P = |bos| + text_len + 1``."""
  t, p = config["token_ids"], config["prompt"]
  head = [] if t["bos"] is None else [t["bos"]]
  seqs = [head + tokenizer.encode(c, add_special_tokens=False).ids[:p["text_len"]] + [t["boi"]]
          if c else head + [t["boi"]] for c in captions]
  if uncond:
    seqs += [head + [t["boi"]]] * len(captions)
  length = len(head) + p["text_len"] + 1
  ids = torch.full((len(seqs), length), t["pad"], dtype=torch.long)
  mask = torch.zeros((len(seqs), length), dtype=torch.long)
  for i, s in enumerate(seqs):
    ids[i, length - len(s):], mask[i, length - len(s):] = torch.tensor(s), 1
  return ids, mask


def sample(logits, temperature, top_k, top_p, generator=None):
  """One id per row: greedy at temperature 0, else temperature, top-k, then top-p (keep the
  smallest prefix of the sorted candidates whose probability reaches ``top_p``)."""
  if temperature <= 0:
    return logits.argmax(-1)
  k = logits.shape[-1] if top_k <= 0 else min(int(top_k), logits.shape[-1])
  vals, idx = torch.topk(logits.float() / max(temperature, 1e-6), k, dim=-1)
  if top_p < 1.0:
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    vals = vals.masked_fill(before >= top_p, float("-inf"))
  pick = torch.multinomial(vals.softmax(-1), 1, generator=generator)
  return idx.gather(-1, pick)[:, 0]


@torch.no_grad()
def sample_position(model, hidden, *, cfg, cfg_scale, temperature=0.0, top_k=0, top_p=1.0,
                    generator=None):
  """Both heads at one visual position from ``hidden [rows, H]`` (rows = 2b with ``cfg``):
  ``{vocab: codes [b, D], vocab + '_logits': guided logits [b, D, K]}``."""
  out = {}
  for vocab in VOCABS:
    head, table = model.head(vocab), model.visual.table(vocab)
    xs = [head.first_input(hidden)]
    psum = torch.zeros(hidden.shape[0], table.embedding_dim, dtype=torch.float32)
    codes, logits_d = [], []
    for d in range(head.depths):
      y = head.stack(torch.stack(xs, 1))[:, -1]            # causal: the last depth so far
      logits = head.classifiers[d](y).float()
      if cfg:
        c, u = logits.chunk(2, 0)
        logits = u + cfg_scale * (c - u)
      code = sample(logits, temperature, top_k, top_p, generator)
      codes.append(code)
      logits_d.append(logits)
      if d + 1 < head.depths:
        both = code.repeat(2) if cfg else code
        psum = psum + table(both).float()
        xs.append(head.code_input(psum, d + 1))
    out[vocab], out[vocab + "_logits"] = torch.stack(codes, 1), torch.stack(logits_d, 1)
  return out


@torch.no_grad()
def generation_step(lm, model, ids, mask, *, cfg_scale=3.0, temperature=0.0, top_k=0,
                    top_p=1.0, seed=None):
  """Prefill ``ids``/``mask`` (``generation_prompts``; CFG when ``cfg_scale`` > 0: the
  blank rows in the second half), sample the first visual position, feed it back.

  Returns ``text_logits [rows, P, V]`` (the prompt's LM logits), ``hidden [rows, H]`` (the
  state that predicts position 1), ``pixel`` / ``semantic`` codes ``[b, D]``, their guided
  logits ``pixel_logits`` / ``semantic_logits [b, D, K]`` and ``next_hidden [rows, H]``
  (after the position's embedding went through the LM)."""
  cfg = bool(cfg_scale)
  gen = None if seed is None else torch.Generator().manual_seed(int(seed))
  pos = (mask.cumsum(-1) - 1).clamp(min=0)
  out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
  states = out.last_hidden_state
  result = {"text_logits": lm.lm_head(states).float(), "hidden": states[:, -1]}
  result.update(sample_position(model, states[:, -1], cfg=cfg, cfg_scale=cfg_scale,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=gen))
  both = {v: result[v].repeat(2, 1) if cfg else result[v] for v in VOCABS}
  e = model.visual(both["pixel"], both["semantic"])[:, None]
  mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
  nxt = lm.model(inputs_embeds=e, attention_mask=mask2, position_ids=mask.sum(-1, keepdim=True),
                 past_key_values=out.past_key_values, use_cache=True)
  result["next_hidden"] = nxt.last_hidden_state[:, -1]
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("export", help="the export directory (lm/, visual.safetensors, ...)")
  ap.add_argument("--prompt", default="a red circle")
  ap.add_argument("--cfg-scale", type=float, default=None, help="default: the export's")
  ap.add_argument("--sample", action="store_true",
                  help="temperature / top-k / top-p sampling (the export's settings), "
                       "seeded by --seed; default greedy")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  lm, model, config, tok = load(args.export)
  if tok is None:
    raise SystemExit(f"{args.export}/lm has no tokenizer.json: no text prompts")
  s = config["sampling"]
  scale = s["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
  ids, mask = generation_prompts(config, tok, [args.prompt], uncond=bool(scale))
  kw = (dict(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=args.seed)
        if args.sample else dict(temperature=0.0))
  out = generation_step(lm, model, ids, mask, cfg_scale=scale, **kw)
  print(f"prompt {args.prompt!r} -> ids {ids[0][mask[0].bool()].tolist()}")
  print(f"first visual position ({'sampled, seed %d' % args.seed if args.sample else 'greedy'}"
        f", CFG {scale}): pixel codes {out['pixel'][0].tolist()}, semantic codes "
        f"{out['semantic'][0].tolist()}")
  return out


if __name__ == "__main__":
  main()

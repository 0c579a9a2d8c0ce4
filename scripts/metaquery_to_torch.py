"""Rebuild an mmjax MetaQuery export in PyTorch: the query bridge and the Sana DiT.

Needs torch and safetensors; diffusers for the DiT, transformers for running the MLLM.
The export (``python launch/tpu.py --config ... --mode export``, or
``mmjax.systems.metaquery.export.export``) holds ``bridge/`` (queries, markers, connector
+ config.json), ``transformer/`` (diffusers) and possibly ``vae/`` and ``mllm/``.

    import sys; sys.path.insert(0, "scripts")
    from metaquery_to_torch import load
    bridge, transformer = load("/tmp/mq/export")
    states = bridge.query_states(mllm, prompt_ids, prompt_mask)   # [b, N, D] (transformers LM)
    cond = bridge.condition_from_hidden(states)                    # [b, N, C]
    v = transformer(latents_nchw, encoder_hidden_states=cond, timestep=sigma * 1000).sample

The connector (bridge/config.json ``connector``):
  * encoder ("Qwen2-style", width D for kind ``enc_proj``, C for ``proj_enc``): per layer
    ``x += o_proj(attn(input_layernorm(x)))``, ``x += down(silu(gate(h)) * up(h))`` with
    ``h = post_attention_layernorm(x)``; RMSNorm (eps ``rms_norm_eps``, normalise in fp32);
    q/k/v biases; RoPE (rotate-half, ``rope_theta``) over positions 0..N-1; then QK-norm:
    L2-normalise each head, times a learnable per-head gain, times sqrt(head_dim);
    bidirectional softmax attention with scale 1/sqrt(head_dim); no final norm.
  * projection: ``fc2(gelu_tanh(fc1(x)))`` (fc1: D -> C, fc2: C -> C);
  * ``out_norm``: RMSNorm(C, eps 1e-5).
  enc_proj: out_norm(projection(encoder(x))); proj_enc: out_norm(encoder(projection(x))).

Run as a script it loads an export and runs every part once on random inputs:
    python scripts/metaquery_to_torch.py /tmp/mq/export
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


class RMSNorm(nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

  def forward(self, x):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return y.to(x.dtype) * self.weight


def rope(x, theta):
  """Rotate-half RoPE over positions 0..len-1 of ``x [b, heads, len, head_dim]``."""
  d, n = x.shape[-1], x.shape[-2]
  inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
  ang = torch.arange(n, dtype=torch.float32, device=x.device)[:, None] * inv
  cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
  x1, x2 = x.chunk(2, dim=-1)
  return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
  def __init__(self, c):
    super().__init__()
    w, h, hd = c["width"], c["num_heads"], c["head_dim"]
    self.h, self.hd, self.theta, self.eps = h, hd, c["rope_theta"], c["qk_norm_eps"]
    for n in "qkv":
      setattr(self, f"{n}_proj", nn.Linear(w, h * hd, bias=c["qkv_bias"]))
    self.o_proj = nn.Linear(h * hd, w, bias=c["o_bias"])
    self.q_gain, self.k_gain = nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))

  def forward(self, x):
    b, s, _ = x.shape
    q, k, v = (getattr(self, f"{n}_proj")(x).view(b, s, self.h, self.hd).transpose(1, 2)
               for n in "qkv")
    scale = math.sqrt(self.hd)
    q = F.normalize(rope(q, self.theta), dim=-1, eps=self.eps) * (self.q_gain[:, None, None] * scale)
    k = F.normalize(rope(k, self.theta), dim=-1, eps=self.eps) * (self.k_gain[:, None, None] * scale)
    out = F.scaled_dot_product_attention(q, k, v)            # no mask: bidirectional
    return self.o_proj(out.transpose(1, 2).reshape(b, s, self.h * self.hd))


class EncoderLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    w, m, eps, bias = c["width"], c["intermediate_size"], c["rms_norm_eps"], c["mlp_bias"]
    self.input_layernorm, self.post_attention_layernorm = RMSNorm(w, eps), RMSNorm(w, eps)
    self.self_attn = Attention(c)
    self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(w, m, bias=bias),
                              "up_proj": nn.Linear(w, m, bias=bias),
                              "down_proj": nn.Linear(m, w, bias=bias)})

  def forward(self, x):
    x = x + self.self_attn(self.input_layernorm(x))
    h, mlp = self.post_attention_layernorm(x), self.mlp
    return x + mlp["down_proj"](F.silu(mlp["gate_proj"](h)) * mlp["up_proj"](h))


class Connector(nn.Module):
  """``[b, N, D] -> [b, N, C]`` (module docstring)."""

  def __init__(self, cfg):
    super().__init__()
    c, d, out = cfg["connector"], cfg["hidden_size"], cfg["caption_channels"]
    if c["kind"] not in ("enc_proj", "proj_enc") or c["qk_norm"] != "l2_after_rope":
      raise ValueError(f"unsupported connector {c['kind']!r} / qk_norm {c['qk_norm']!r}")
    self.kind = c["kind"]
    self.encoder = nn.Module()
    self.encoder.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c["num_layers"]))
    self.projection = nn.Module()
    self.projection.fc1, self.projection.fc2 = nn.Linear(d, out), nn.Linear(out, out)
    self.out_norm = RMSNorm(out, c["out_norm_eps"])

  def _encode(self, x):
    for layer in self.encoder.layers:
      x = layer(x)
    return x

  def _project(self, x):
    return self.projection.fc2(F.gelu(self.projection.fc1(x), approximate="tanh"))

  def forward(self, x):
    x = self._project(self._encode(x)) if self.kind == "enc_proj" else self._encode(self._project(x))
    return self.out_norm(x)


class MetaQueryBridge(nn.Module):
  """Queries ``[N, D]``, markers ``[2, D]`` (begin, end of image) and the connector."""

  def __init__(self, cfg):
    super().__init__()
    self.config = cfg
    n, d = cfg["num_queries"], cfg["hidden_size"]
    self.queries, self.markers = nn.Parameter(torch.zeros(n, d)), nn.Parameter(torch.zeros(2, d))
    self.connector = Connector(cfg)

  @classmethod
  def from_dir(cls, path, dtype=torch.float32):
    with open(os.path.join(path, "config.json")) as f:
      cfg = json.load(f)
    if cfg.get("format") != "mmjax-metaquery-bridge":
      raise ValueError(f"{path}/config.json is not an mmjax MetaQuery bridge")
    bridge = cls(cfg)
    bridge.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    return bridge.to(dtype).eval()

  def condition_from_hidden(self, query_states):
    """MLLM states at the query positions ``[b, N, D]`` -> the DiT's condition ``[b, N, C]``."""
    return self.connector(query_states.to(self.queries.dtype))

  def prompt_ids(self, caption_ids):
    """Caption token ids -> left-padded ``(ids, mask)`` ``[max_len]`` (the export's layout)."""
    p = self.config["prompt"]
    if p["head_ids"] is None:
      raise ValueError("the export has no prompt ids (no tokenizer was configured)")
    seq = (p["head_ids"] + list(caption_ids)[:p["caption_tokens"]] + p["tail_ids"])[-p["max_len"]:]
    pad = p["max_len"] - len(seq)
    return (torch.tensor([p["pad_id"]] * pad + seq), torch.tensor([False] * pad + [True] * len(seq)))

  def query_states(self, lm, prompt_ids, prompt_mask):
    """Left-padded prompts ``[b, P]`` through a transformers LM (causal LM or base model):
    ``prompt | begin q_0..q_{N-1} end | suffix``, RoPE positions counting real tokens,
    -> final hidden states (after the final norm) at the query positions ``[b, N, D]``."""
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    embed = lm.get_input_embeddings()
    b, p = prompt_ids.shape
    suffix = torch.tensor(self.config["prompt"]["suffix_ids"], device=prompt_ids.device)
    block = torch.cat([self.markers[:1], self.queries, self.markers[1:]]).to(embed.weight.dtype)
    x = torch.cat([embed(prompt_ids), block.expand(b, -1, -1), embed(suffix).expand(b, -1, -1)], 1)
    mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(b, x.shape[1] - p).bool()], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    h = base(inputs_embeds=x, attention_mask=mask.long(), position_ids=pos).last_hidden_state
    return h[:, p + 1:p + 1 + self.config["num_queries"]]


def load(out_dir, dtype=torch.float32):
  """``(MetaQueryBridge, diffusers SanaTransformer2DModel)`` from an export directory."""
  from diffusers import SanaTransformer2DModel  # pylint: disable=import-outside-toplevel
  bridge = MetaQueryBridge.from_dir(os.path.join(out_dir, "bridge"), dtype)
  transformer = SanaTransformer2DModel.from_pretrained(os.path.join(out_dir, "transformer"),
                                                       torch_dtype=dtype).eval()
  return bridge, transformer


def main(out_dir):
  bridge, transformer = load(out_dir)
  cfg = bridge.config
  with torch.no_grad():
    states = torch.randn(2, cfg["num_queries"], cfg["hidden_size"])
    cond = bridge.condition_from_hidden(states)
    h, w, c = cfg["decoder"]["latent_shape_hwc"]
    v = transformer(torch.randn(2, c, h, w), encoder_hidden_states=cond,
                    timestep=torch.tensor([500.0, 10.0])).sample
  print(f"bridge: {sum(p.numel() for p in bridge.parameters())} params, condition "
        f"{tuple(cond.shape)}; transformer output {tuple(v.shape)}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "export")

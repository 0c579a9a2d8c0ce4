"""Rebuild an mmjax MetaQuery export in PyTorch and generate images with it.

Needs torch, safetensors, tokenizers, transformers (the MLLM) and diffusers (the DiT or
UNet, its scheduler and the autoencoder). The export (``python launch/tpu.py --config ...
--mode export``, or ``mmjax.systems.metaquery.export.export``) holds ``bridge/`` (queries,
markers, connector + config.json), ``transformer/`` (diffusers: Sana DiT, or SD1.5's UNet),
``vae/`` (unless pixel latents) and ``mllm/`` (unless the run named a checkpoint).

Generate (the same image as mmjax's sample from the same noise; ``--noise`` takes mmjax's
``[b, h, w, c]`` latent noise as .npy, else ``--seed`` draws it with torch)::

    python scripts/metaquery_to_torch.py /tmp/mq/export --prompt "a red circle" --out x.png

In Python::

    import sys; sys.path.insert(0, "scripts")
    from metaquery_to_torch import Pipeline
    pipe = Pipeline("/tmp/mq/export")
    images = pipe(["a red circle"], noise=noise_nhwc)       # float [b, R, R, 3] in [-1, 1]

The parts (``Pipeline`` composes them; ``load`` gives the bridge and the decoder alone)::

    states = bridge.query_states(mllm, prompt_ids, prompt_mask)   # [b, N, D] (transformers LM)
    cond = bridge.condition_from_hidden(states)                    # [b, N, C]
    v = transformer(latents_nchw, encoder_hidden_states=cond, timestep=sigma * 1000).sample

The connector (bridge/config.json ``connector``):
  * encoder ("Qwen2-style", width D for kind ``enc_proj``, C for ``proj_enc``): per layer
    ``x += o_proj(attn(input_layernorm(x)))``, ``x += down(silu(gate(h)) * up(h))`` with
    ``h = post_attention_layernorm(x)``; RMSNorm (eps ``rms_norm_eps``, normalise in fp32);
    q/k/v biases; RoPE (rotate-half, ``rope_theta``) over positions 0..N-1; then QK-norm:
    L2-normalise each head, times a learnable gain per head and dimension
    (``self_attn.{q,k}_norm.gamma [heads, 1, head_dim]``), times sqrt(head_dim);
    bidirectional softmax attention with scale 1/sqrt(head_dim); no final norm.
  * projection: ``fc2(gelu_tanh(fc1(x)))`` (fc1: D -> C, fc2: C -> C);
  * ``out_norm``: RMSNorm(C, eps 1e-5).
  enc_proj: out_norm(projection(encoder(x))); proj_enc: out_norm(encoder(projection(x))).
  Bridges of format version 1 (a scalar gain per head, ``{q,k}_gain [heads]``) are
  broadcast to every dimension on load.

Without ``--prompt`` it loads an export and runs the bridge and the decoder once on random
inputs: ``python scripts/metaquery_to_torch.py /tmp/mq/export``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
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


class QKNorm(nn.Module):
  """L2-normalise each head of ``[b, heads, len, head_dim]``, times ``gamma [heads, 1,
  head_dim]``, times sqrt(head_dim)."""

  def __init__(self, heads, head_dim, eps):
    super().__init__()
    self.gamma, self.eps = nn.Parameter(torch.ones(heads, 1, head_dim)), eps

  def forward(self, x):
    return F.normalize(x, dim=-1, eps=self.eps) * self.gamma * math.sqrt(x.shape[-1])


class Attention(nn.Module):
  def __init__(self, c):
    super().__init__()
    w, h, hd = c["width"], c["num_heads"], c["head_dim"]
    self.h, self.hd, self.theta = h, hd, c["rope_theta"]
    for n in "qkv":
      setattr(self, f"{n}_proj", nn.Linear(w, h * hd, bias=c["qkv_bias"]))
    self.o_proj = nn.Linear(h * hd, w, bias=c["o_bias"])
    self.q_norm, self.k_norm = QKNorm(h, hd, c["qk_norm_eps"]), QKNorm(h, hd, c["qk_norm_eps"])

  def forward(self, x):
    b, s, _ = x.shape
    q, k, v = (getattr(self, f"{n}_proj")(x).view(b, s, self.h, self.hd).transpose(1, 2)
               for n in "qkv")
    q, k = self.q_norm(rope(q, self.theta)), self.k_norm(rope(k, self.theta))
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
    state = load_file(os.path.join(path, "model.safetensors"))
    if cfg.get("version", 1) < 2:      # a scalar QK gain per head: the same on every dim
      hd = cfg["connector"]["head_dim"]
      state = {re.sub(r"\.([qk])_gain$", r".\1_norm.gamma", k):
               v[:, None, None].expand(-1, 1, hd).contiguous() if k.endswith("_gain") else v
               for k, v in state.items()}
    bridge.load_state_dict(state, strict=True)
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


def _decoder_class(kind):
  import diffusers  # pylint: disable=import-outside-toplevel
  return diffusers.UNet2DConditionModel if kind == "sd15" else diffusers.SanaTransformer2DModel


def load(out_dir, dtype=torch.float32):
  """``(MetaQueryBridge, diffusers decoder)`` from an export directory: the decoder is a
  ``SanaTransformer2DModel`` (SD1.5 runs: ``UNet2DConditionModel``)."""
  bridge = MetaQueryBridge.from_dir(os.path.join(out_dir, "bridge"), dtype)
  cls = _decoder_class(bridge.config["decoder"].get("kind", "sana"))
  transformer = cls.from_pretrained(os.path.join(out_dir, "transformer"),
                                    torch_dtype=dtype).eval()
  return bridge, transformer


def load_mllm(path, family, dtype=torch.float32):
  """The frozen MLLM of a transformers directory (a Qwen2 causal LM, or LLaVA-OneVision)."""
  import transformers  # pylint: disable=import-outside-toplevel
  cls = (transformers.LlavaOnevisionForConditionalGeneration if family == "llava_onevision"
         else transformers.AutoModelForCausalLM)
  return cls.from_pretrained(path, dtype=dtype).eval()


class Pipeline:
  """Caption -> image in PyTorch from an export: prompt ids (the export's layout), the MLLM's
  query states, the connector, the sampler with two-way CFG (the empty prompt is the
  unconditional branch), the autoencoder (or pixel latents).

  Sana: ``DPMSolverMultistepScheduler`` over flow sigmas (``flow_shift``), the DiT's timestep
  on the 0..1000 scale. SD1.5: the export's solver (``dpm_solver_2m`` | ``ddim``) on the
  DDPM schedule with epsilon prediction.
  """

  def __init__(self, out_dir, mllm_dir=None, dtype=torch.float32):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.bridge, self.transformer = load(out_dir, dtype)
    cfg = self.bridge.config
    self.config, dec, m = cfg, cfg["decoder"], cfg["mllm"]
    self.kind = dec.get("kind", "sana")
    self.vae = None
    if dec.get("vae"):
      import diffusers  # pylint: disable=import-outside-toplevel
      cls = diffusers.AutoencoderKL if dec["autoencoder"] == "kl" else diffusers.AutoencoderDC
      self.vae = cls.from_pretrained(os.path.join(out_dir, dec["vae"]), torch_dtype=dtype).eval()
    mllm_dir = mllm_dir or (os.path.join(out_dir, m["exported"]) if m.get("exported")
                            else m["path"])
    if not mllm_dir or not os.path.isdir(mllm_dir):
      raise FileNotFoundError(f"the MLLM directory {mllm_dir!r} is not here: pass --mllm DIR "
                              f"(the export names {m['path']!r})")
    self.lm = load_mllm(mllm_dir, m["family"], dtype)
    tok_dir = next((d for d in (mllm_dir, m.get("tokenizer_dir"), m.get("path"))
                    if d and os.path.isfile(os.path.join(d, "tokenizer.json"))), None)
    if tok_dir is None:
      raise FileNotFoundError(f"no tokenizer.json in {mllm_dir!r} or the export's "
                              f"tokenizer_dir / path")
    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))

  def prompts(self, captions):
    """Left-padded ``(ids, mask)`` ``[b, max_len]`` of ``captions``."""
    pairs = [self.bridge.prompt_ids(self.tokenizer.encode(c, add_special_tokens=False).ids
                                     if c else []) for c in captions]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

  @torch.no_grad()
  def condition(self, captions):
    ids, mask = self.prompts(captions)
    return self.bridge.condition_from_hidden(self.bridge.query_states(self.lm, ids, mask))

  def scheduler(self, num_steps):
    import diffusers  # pylint: disable=import-outside-toplevel
    s = self.config["sampling"]
    if self.kind != "sd15":
      sched = diffusers.DPMSolverMultistepScheduler(
          use_flow_sigmas=True, flow_shift=s["flow_shift"], prediction_type="flow_prediction")
    else:
      kw = dict(beta_schedule=s["beta_schedule"], beta_start=s["beta_start"],
                beta_end=s["beta_end"], num_train_timesteps=s["num_train_timesteps"],
                steps_offset=s["steps_offset"], prediction_type="epsilon")
      if s.get("timestep_spacing"):
        kw["timestep_spacing"] = s["timestep_spacing"]
      if s["solver"] == "ddim":
        sched = diffusers.DDIMScheduler(clip_sample=False,
                                        set_alpha_to_one=s["set_alpha_to_one"], **kw)
      else:
        sched = diffusers.DPMSolverMultistepScheduler(**kw)
    sched.set_timesteps(num_steps)
    return sched

  @torch.no_grad()
  def sample_latents(self, cond, uncond, noise, guidance=None, num_steps=None):
    """DPM-Solver++ / DDIM from ``noise`` ``[b, c, h, w]`` (fp32) with two-way CFG."""
    s = self.config["sampling"]
    guidance = s["guidance"] if guidance is None else guidance
    sched = self.scheduler(num_steps or s["num_steps"])
    ctx = torch.cat([uncond, cond])
    x = noise.float()
    for t in sched.timesteps:
      xx = torch.cat([x, x]).to(ctx.dtype)
      if self.kind == "sd15":
        out = self.transformer(xx, t, encoder_hidden_states=ctx).sample
      else:
        out = self.transformer(xx, encoder_hidden_states=ctx, timestep=t.expand(len(xx))).sample
      o_u, o_c = out.float().chunk(2)
      x = sched.step(o_u + guidance * (o_c - o_u), t, x).prev_sample
    return x

  @torch.no_grad()
  def decode(self, latents):
    """Latents ``[b, c, h, w]`` -> images ``[b, 3, R, R]`` in [-1, 1] (not clipped)."""
    if self.vae is None:
      p = self.config["decoder"]["pixel_patch"]
      return F.pixel_shuffle(latents, p) if p > 1 else latents
    c = self.vae.config
    z = latents / c.scaling_factor + (getattr(c, "shift_factor", None) or 0.0)
    return self.vae.decode(z.to(self.vae.dtype)).sample.float()

  def latent_shape(self):
    return tuple(self.config["decoder"]["latent_shape_hwc"])

  @torch.no_grad()
  def __call__(self, captions, noise=None, seed=0, guidance=None, num_steps=None):
    """Captions -> float images ``[b, R, R, 3]`` (numpy, [-1, 1]). ``noise``: mmjax's latent
    noise ``[b, h, w, c]``; default ``torch.randn`` from ``seed``."""
    b = len(captions)
    if noise is None:
      h, w, c = self.latent_shape()
      noise = torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(seed))
    else:
      noise = torch.as_tensor(noise, dtype=torch.float32).permute(0, 3, 1, 2)
    conds = self.condition([""] * b + list(captions))
    uncond, cond = conds[:b], conds[b:]
    z = self.sample_latents(cond, uncond, noise, guidance, num_steps)
    return self.decode(z).permute(0, 2, 3, 1).numpy()


def to_uint8(images):
  """[-1, 1] floats -> uint8 (as mmjax's ``data.image.to_uint8``)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  x = (np.asarray(images, np.float32) + 1.0) / 2.0
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def save_png(images, path):
  """uint8 ``[b, R, R, 3]`` side by side in one PNG."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.concatenate(list(images), axis=1)).save(path)


def check(out_dir):
  """Loads an export and runs the bridge and the decoder once on random inputs."""
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("export", nargs="?", default="export", help="the mmjax export directory")
  p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
  p.add_argument("--out", default="image.png", help="PNG path (several prompts: side by side)")
  p.add_argument("--seed", type=int, default=0, help="torch seed of the noise (no --noise)")
  p.add_argument("--noise", help=".npy latent noise [b, h, w, c], as mmjax draws it")
  p.add_argument("--guidance", type=float, help="CFG scale (default: the export's)")
  p.add_argument("--steps", type=int, help="solver steps (default: the export's)")
  p.add_argument("--mllm", help="the MLLM directory when the export does not carry it")
  args = p.parse_args(argv)
  if not args.prompt:
    check(args.export)
    return None
  import numpy as np  # pylint: disable=import-outside-toplevel
  noise = np.load(args.noise) if args.noise else None
  if noise is not None and len(noise) != len(args.prompt):
    raise SystemExit(f"--noise holds {len(noise)} latents for {len(args.prompt)} prompts")
  images = Pipeline(args.export, args.mllm)(args.prompt, noise, args.seed, args.guidance,
                                            args.steps)
  save_png(to_uint8(images), args.out)
  print(f"{args.out}: {len(images)} image(s) {images.shape[1]}x{images.shape[2]}")
  return images


if __name__ == "__main__":
  main()

"""Analytic training FLOPs of MetaQuery (the trainer's MFU), from the model configs alone.

Counted with the one counter (``mmjax.train.flops``): what trains at ``TRAINED`` passes,
the frozen MLLM at ``THROUGH`` (forward + backward to its inputs, no weight gradients), the
frozen vision tower at ``FORWARD`` (its features are a ``stop_gradient``: SigLIP, or
Qwen2.5-VL's windowed ViT, ``qwen25vl_vision_flops``); the MLLM's text stack is Qwen2 /
Qwen2.5-VL's LM alike (M-RoPE costs no multiply-adds); the frozen
autoencoder's encoder (forward) and SD1.5's UNet from XLA's cost analysis (the UNet at
``THROUGH`` when frozen, as in the paper's SD1.5 setting).

Example::

    flops = train_flops_per_example(mllm_cfg.text, conn_cfg, dit_cfg, num_queries=256,
                                    seq_len=320 + 256 + 3, latent_shape=(16, 16, 32))
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.models import autoencoder_kl, dc_ae, sana_dit, unet2d
from mmjax.train import flops as fl


def stack_flops_per_token(c: core.TransformerConfig, seq: int) -> float:
  """Multiply-adds per token of one pass of a core stack over ``seq`` keys
  (``mmjax.train.flops.stack_macs``)."""
  return fl.stack_macs(c, 1, seq)


def dit_flops_per_sample(d: sana_dit.SanaConfig, latent_shape: tuple, ctx: int) -> float:
  """Multiply-adds of one Sana DiT forward on one latent with ``ctx`` condition tokens."""
  h, w, c = latent_shape
  n = (h // d.patch_size) * (w // d.patch_size)
  dim, hid = d.inner_dim, d.ffn_dim
  cross = d.num_cross_attention_heads * d.cross_attention_head_dim
  per_token = (3 * dim * dim + dim * dim                        # linear self-attn q k v, out
               + 2 * dim * d.attention_head_dim                 # relu(k)^T v and q . kv
               + dim * cross + cross * dim + 2 * cross * ctx    # cross q, out, scores, values
               + dim * 2 * hid + 9 * 2 * hid + hid * dim)       # Mix-FFN
  per_ctx = 2 * dim * cross                                     # cross k, v of the condition
  layers = d.num_layers * (n * per_token + ctx * per_ctx)
  io = n * (d.patch_size ** 2) * (c * dim + dim * c) + ctx * (d.caption_channels * dim
                                                               + dim * dim)
  return float(layers + io)


def vision_flops(vision, d_model: int, num_images: int, num_views: int) -> float:
  """Forward FLOPs per example of the frozen SigLIP tower (``vision``: its config) and the
  projector to the MLLM width ``d_model`` on ``num_images x num_views`` views."""
  n, dv = vision.num_patches, vision.stack.d_model
  per_view = (n * stack_flops_per_token(vision.stack, n) + n * vision.patch_size ** 2 * 3 * dv
              + n * (dv * d_model + d_model * d_model))
  return fl.flops(num_images * num_views * per_view, fl.FORWARD)


def qwen25vl_vision_macs(v, grid) -> float:
  """Multiply-adds of Qwen2.5-VL's tower (``v``: its ``VisionConfig``) on one image of patch
  ``grid`` ``(t, h, w)``: patch embedding, the window-attention layers (keys: a window's
  patches), the full-attention layers (keys: the frame's patches), the 2x2 merger."""
  t, h, w = grid
  p, s = t * h * w, v.stack
  window = min(h * w, (v.window_tokens * v.merge_size) ** 2)
  n_full = len([i for i in v.fullatt_blocks if i < s.num_layers])
  one = dataclasses.replace(s, num_layers=1)
  blocks = (n_full * fl.stack_macs(one, p, h * w)
            + (s.num_layers - n_full) * fl.stack_macs(one, p, window))
  wide = s.d_model * v.merge_size ** 2
  merger = (p // v.merge_size ** 2) * (wide * wide + wide * v.out_dim)
  return float(p * v.patch_dim * s.d_model + blocks + merger)


def qwen25vl_vision_flops(v, grid, num_images: int) -> float:
  """Forward FLOPs per example of the frozen Qwen2.5-VL tower on ``num_images`` images of
  patch ``grid`` (no backward: the features are a ``stop_gradient``)."""
  return fl.flops(num_images * qwen25vl_vision_macs(v, grid), fl.FORWARD)


def _xla_flops(fn, *args) -> float:
  """XLA's FLOP count of ``fn`` on abstract ``args`` (lowered, never compiled)."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


@functools.lru_cache(maxsize=4)
def ae_encode_flops(ae_cfg, resolution: int) -> float:
  """FLOPs of the autoencoder's encoder (``dc_ae.DCAEConfig`` or ``autoencoder_kl.
  AutoencoderKLConfig``) on one ``resolution`` image (XLA's cost analysis); 0 without one."""
  if ae_cfg is None:
    return 0.0
  kl = isinstance(ae_cfg, autoencoder_kl.AutoencoderKLConfig)
  ae = autoencoder_kl.AutoencoderKL(ae_cfg) if kl else dc_ae.AutoencoderDC(ae_cfg)
  img = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  p = jax.eval_shape(ae.init, jax.random.key(0), img)
  return _xla_flops(functools.partial(ae.apply, method=ae.encode), p, img)


@functools.lru_cache(maxsize=4)
def unet_macs_per_sample(cfg: unet2d.UNetConfig, latent_shape: tuple, ctx: int) -> float:
  """Multiply-adds of one UNet forward on one latent with ``ctx`` condition tokens (XLA's
  FLOP count / 2)."""
  unet = unet2d.UNet2DConditionModel(cfg)
  args = (jax.ShapeDtypeStruct((1,) + tuple(latent_shape), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1, ctx, cfg.cross_attention_dim), jnp.float32))
  p = jax.eval_shape(unet.init, jax.random.key(0), *args)
  return _xla_flops(unet.apply, p, *args) / 2


def train_flops_per_example(text: core.TransformerConfig, conn, dit, *, num_queries: int,
                            seq_len: int, latent_shape: tuple, ae_flops: float = 0.0,
                            vis_flops: float = 0.0, dit_trained: bool = True) -> float:
  """One example's training FLOPs: the frozen MLLM's text stack ``text`` over ``seq_len``
  tokens (prompt, markers, queries, suffix) at 4x, the connector ``conn`` (a
  ``bridge.ConnectorConfig``) at 6x, the denoiser ``dit`` (``sana_dit.SanaConfig`` or
  ``unet2d.UNetConfig``) at 6x (4x unless ``dit_trained``), plus the frozen encoders'
  forward FLOPs ``ae_flops`` and ``vis_flops``."""
  n, s = num_queries, seq_len
  mllm_f = fl.flops(fl.stack_macs(text, s, s), fl.THROUGH)
  conn_f = fl.flops(fl.stack_macs(conn.encoder(), n, n)
                    + fl.dense_macs(n, conn.in_dim, conn.out_dim)
                    + fl.dense_macs(n, conn.out_dim, conn.out_dim), fl.TRAINED)
  dit_macs = (unet_macs_per_sample(dit, tuple(latent_shape), n)
              if isinstance(dit, unet2d.UNetConfig) else dit_flops_per_sample(dit, latent_shape, n))
  dit_f = fl.flops(dit_macs, fl.TRAINED if dit_trained else fl.THROUGH)
  return mllm_f + conn_f + dit_f + ae_flops + vis_flops

"""Qwen2.5-VL's vision tower: patches of 14 px x 2 frames, a pre-RMSNorm SwiGLU encoder with
window attention (full attention at a few layers) and 2-D rotary positions, and the 2x2 patch
merger that makes one LLM token of every 4 neighbouring patches.

Input is what the processor produces (``qwen2_5_vl.preprocess_image``): every image's
patches flattened ``[patches, C * T * P * P]`` (an image is its own frame twice), images one
after another, and the static patch grid ``(t, h, w)`` of each. Patches of one image are in
*merge-block order*: the ``merge x merge`` patches that become one token are consecutive,
blocks row-major, so merging is a reshape.

Attention never crosses an image (or a frame): images of equal grids are batched and every
group runs through the same scanned core stack with two masks -- "same window" (windows of
``window_size`` pixels, in merged tokens: 112 px = 4 x 4 tokens = 8 x 8 patches) and "same
frame" -- picked per layer (``fullatt_blocks`` get the second), via
``TransformerStack(mask_choice=...)``. The tokens stay in image order: a window is a mask,
not a permutation, so the result is the reference's without its reordering.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import qwen2_5_vl_vision as qv
    cfg = qv.from_hf_config({"depth": 2, "hidden_size": 32, "intermediate_size": 48,
                             "num_heads": 4, "out_hidden_size": 40, "window_size": 56,
                             "fullatt_block_indexes": [1]})
    tower = qv.VisionTower(cfg)
    grids = ((1, 4, 6), (1, 8, 4))                          # two images, in patches
    patches = jnp.zeros((24 + 32, cfg.patch_dim))
    params = tower.init(jax.random.key(0), patches, grids)["params"]
    tokens = tower.apply({"params": params}, patches, grids)   # [6 + 8, 40]
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.interop.tables import FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, OUT_LAST, Part, Rule

NORM_EPS = 1e-6   # the reference fixes the tower's RMSNorm epsilon (blocks and merger)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Patch geometry, window attention and the encoder stack of the tower."""
  stack: core.TransformerConfig      # 2-D axial RoPE: rope_sections (hd/4, hd/4)
  out_dim: int                       # merger output = the LLM width
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  window_size: int = 112             # pixels per window side
  fullatt_blocks: tuple = (7, 15, 23, 31)   # layers with full (per-frame) attention
  in_channels: int = 3
  hf_extra: str = "{}"               # JSON of reference-config fields carried to export

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch ``C * T * P * P``."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def window_tokens(self) -> int:
    """Window side in merged tokens (112 px / 14 px / 2 = 4)."""
    return max(self.window_size // self.merge_size // self.patch_size, 1)

  @property
  def mask_choice(self) -> tuple:
    """Per layer: 0 = window attention, 1 = full attention."""
    return tuple(int(i in self.fullatt_blocks) for i in range(self.stack.num_layers))

  def num_tokens(self, grid: Sequence[int]) -> int:
    """LLM tokens of one image / video of patch grid ``(t, h, w)``."""
    t, h, w = grid
    return t * h * w // self.merge_size ** 2


# ----------------------------------------------------------------------------- geometry
def _check_grid(grid, merge: int) -> tuple:
  t, h, w = (int(v) for v in grid)
  if h % merge or w % merge or min(t, h, w) < 1:
    raise ValueError(f"patch grid {grid} must be positive with h, w multiples of {merge}")
  return t, h, w


def _block_order(values, h: int, w: int, merge: int):
  """A ``[h, w]`` patch map in merge-block order ``[h * w]``."""
  return values.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)


def patch_positions(grid, merge: int) -> np.ndarray:
  """RoPE positions ``[2, t*h*w]`` (row, column of each patch) in merge-block order."""
  t, h, w = _check_grid(grid, merge)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([np.tile(_block_order(a, h, w, merge), t) for a in (rows, cols)])


def window_ids(grid, merge: int, window_tokens: int) -> np.ndarray:
  """Window of each patch ``[t*h*w]`` (distinct per frame): windows are ``window_tokens``
  merged tokens square, tiled from the top-left corner (the last ones may be partial)."""
  t, h, w = _check_grid(grid, merge)
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  span = merge * window_tokens                          # window side in patches
  per_row = -(-w // span)
  per_frame = -(-h // span) * per_row
  win = _block_order((rows // span) * per_row + cols // span, h, w, merge)
  return np.concatenate([win + f * per_frame for f in range(t)])


def frame_ids(grid, merge: int) -> np.ndarray:
  """Frame of each patch ``[t*h*w]`` (full attention stays inside a frame)."""
  t, h, w = _check_grid(grid, merge)
  return np.repeat(np.arange(t), h * w)


# ----------------------------------------------------------------------------- modules
class PatchMerger(nn.Module):
  """RMSNorm (``ln_q``), then every ``merge**2`` consecutive patches concatenated and a
  GELU MLP ``[4 * width] -> [4 * width] -> [out_dim]`` (params ln_q, mlp/fc1, mlp/fc2)."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):                                          # [b, patches, width]
    c = self.cfg.stack
    x = core.RMSNorm(eps=NORM_EPS, dtype=c.dtype, param_dtype=c.param_dtype, name="ln_q")(x)
    b, n, d = x.shape
    unit = self.cfg.merge_size ** 2
    x = x.reshape(b, n // unit, unit * d)
    return core.Mlp(unit * d, act="gelu", use_bias=True, out_dim=self.cfg.out_dim,
                    dtype=c.dtype, param_dtype=c.param_dtype, init_std=c.init_std,
                    name="mlp")(x)                                # [b, tokens, out_dim]


class VisionTower(nn.Module):
  """``apply({'params': p}, patches [N, patch_dim], grids)`` -> image tokens ``[sum of
  num_tokens(grid), out_dim]``, images in the order of ``grids`` (static ``(t, h, w)``
  tuples, the reference's ``image_grid_thw``). Params ``patch_embed_kernel [C, T, P, P,
  width]``, ``encoder/...`` (core stack), ``merger/...``."""
  config: VisionConfig

  @nn.compact
  def __call__(self, patches, grids: Sequence[Sequence[int]]):
    cfg, c = self.config, self.config.stack
    grids = tuple(_check_grid(g, cfg.merge_size) for g in grids)
    sizes = [t * h * w for t, h, w in grids]
    if patches.shape != (sum(sizes), cfg.patch_dim):
      raise ValueError(f"patches {patches.shape} do not match grids {grids}: expected "
                       f"({sum(sizes)}, {cfg.patch_dim})")
    kernel = self.param("patch_embed_kernel", nn.with_logical_partitioning(
        nn.initializers.normal(c.init_std), (None, None, None, None, "embed")),
        (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, c.d_model),
        c.param_dtype)
    # the stride == kernel Conv3d: one matmul per flattened (C, T, P, P) patch
    x = patches.astype(c.dtype) @ kernel.reshape(-1, c.d_model).astype(c.dtype)  # [N, width]
    encoder = core.TransformerStack(c, name="encoder")
    merger = PatchMerger(cfg, name="merger")
    starts = np.cumsum([0] + sizes)
    out = [None] * len(grids)
    for grid in dict.fromkeys(grids):                # images of one grid run as a batch
      idx = [i for i, g in enumerate(grids) if g == grid]
      xs = jnp.stack([x[starts[i]:starts[i] + sizes[i]] for i in idx])   # [g, n, width]
      win = jnp.asarray(window_ids(grid, cfg.merge_size, cfg.window_tokens))
      frame = jnp.asarray(frame_ids(grid, cfg.merge_size))
      masks = jnp.stack([win[:, None] == win[None, :],
                         frame[:, None] == frame[None, :]])[:, None, None]  # [2, 1, 1, n, n]
      pos = jnp.asarray(patch_positions(grid, cfg.merge_size))[:, None]     # [2, 1, n]
      h = encoder(xs, mask=masks, positions=pos, mask_choice=cfg.mask_choice)
      merged = merger(h)                                                    # [g, tokens, out]
      for j, i in enumerate(idx):
        out[i] = merged[j]
    return jnp.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- interop
KEEP = ("tokens_per_second", "initializer_range")


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> VisionConfig:
  """``VisionConfig`` from a ``Qwen2_5_VLVisionConfig`` dict (hub or transformers 5 names)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"vision hidden_act {hf['hidden_act']!r} (Qwen2.5-VL uses silu)")
  rp = hf.get("rope_parameters") or {}
  if rp.get("rope_type", "axial") != "axial":
    raise NotImplementedError(f"vision rope_type {rp['rope_type']!r} (only 'axial')")
  width, heads = hf["hidden_size"], hf["num_heads"]
  head_dim = width // heads
  if head_dim % 4:
    raise ValueError(f"2-D rotary needs head_dim divisible by 4, got {head_dim}")
  stack = core.TransformerConfig(
      num_layers=hf["depth"], d_model=width, num_heads=heads, mlp_dim=hf["intermediate_size"],
      mlp_act="swiglu", norm="rms", norm_eps=NORM_EPS,
      rope_theta=float(rp.get("rope_theta", 10000.0)),
      rope_sections=(head_dim // 4, head_dim // 4), rope_axial=True, qkv_bias=True,
      out_bias=True, mlp_bias=True, dtype=dtype, param_dtype=param_dtype,
      scan_layers=scan_layers, remat_policy=remat_policy, attention_impl=attention_impl,
      init_std=hf.get("initializer_range", 0.02))
  patch = hf.get("patch_size", hf.get("spatial_patch_size", 14))
  return VisionConfig(
      stack=stack, out_dim=hf.get("out_hidden_size", width), patch_size=patch,
      temporal_patch_size=hf.get("temporal_patch_size", 2),
      merge_size=hf.get("spatial_merge_size", 2), window_size=hf.get("window_size", 112),
      fullatt_blocks=tuple(hf.get("fullatt_block_indexes", (7, 15, 23, 31))),
      in_channels=hf.get("in_channels", hf.get("in_chans", 3)),
      hf_extra=json.dumps({k: hf[k] for k in KEEP if k in hf}, sort_keys=True))


def to_hf_config(cfg: VisionConfig) -> dict:
  """The ``Qwen2_5_VLVisionConfig`` dict of ``cfg``."""
  s = cfg.stack
  hf = json.loads(cfg.hf_extra)
  hf.update({"model_type": "qwen2_5_vl_vision", "depth": s.num_layers, "hidden_size": s.d_model,
             "hidden_act": "silu", "intermediate_size": s.mlp_dim, "num_heads": s.num_heads,
             "in_channels": cfg.in_channels, "patch_size": cfg.patch_size,
             "spatial_merge_size": cfg.merge_size,
             "temporal_patch_size": cfg.temporal_patch_size, "window_size": cfg.window_size,
             "out_hidden_size": cfg.out_dim, "fullatt_block_indexes": list(cfg.fullatt_blocks),
             "rope_parameters": {"rope_type": "axial", "rope_theta": s.rope_theta}})
  return hf


def hf_table(cfg: VisionConfig, prefix: str = "visual.") -> list:
  """Reference names of the tower (``visual.*`` as stored) -> ours (tower-relative)."""
  L = prefix + "blocks.{i}."
  E = "encoder/layers" if cfg.stack.scan_layers else "encoder/layers_{i}"
  table = [Rule(prefix + "patch_embed.proj.weight", "patch_embed_kernel", OUT_LAST)]
  for k, n in enumerate(("q", "k", "v")):   # one fused qkv projection: q | k | v rows
    table += [Rule(L + "attn.qkv.weight", f"{E}/self_attn/{n}_proj/kernel", Part(LINEAR, k, 3)),
              Rule(L + "attn.qkv.bias", f"{E}/self_attn/{n}_proj/bias", Part(FLATTEN, k, 3))]
  table += [Rule(L + "attn.proj.weight", f"{E}/self_attn/o_proj/kernel", LINEAR_OUT),
            Rule(L + "attn.proj.bias", f"{E}/self_attn/o_proj/bias", IDENTITY),
            Rule(L + "norm1.weight", f"{E}/input_norm/scale", IDENTITY),
            Rule(L + "norm2.weight", f"{E}/post_attention_norm/scale", IDENTITY)]
  for n in ("gate_proj", "up_proj", "down_proj"):
    table += [Rule(f"{L}mlp.{n}.weight", f"{E}/mlp/{n}/kernel", LINEAR),
              Rule(f"{L}mlp.{n}.bias", f"{E}/mlp/{n}/bias", IDENTITY)]
  m = prefix + "merger."
  table += [Rule(m + "ln_q.weight", "merger/ln_q/scale", IDENTITY),
            Rule(m + "mlp.0.weight", "merger/mlp/fc1/kernel", LINEAR),
            Rule(m + "mlp.0.bias", "merger/mlp/fc1/bias", IDENTITY),
            Rule(m + "mlp.2.weight", "merger/mlp/fc2/kernel", LINEAR),
            Rule(m + "mlp.2.bias", "merger/mlp/fc2/bias", IDENTITY)]
  return table

"""Token embeddings (with a tied output head), rotary embeddings, 2-D sin-cos and timestep
embeddings.

Example::

    import jax, jax.numpy as jnp
    from mmjax.core import Embed, apply_rope, sincos_2d, timestep_embedding
    embed = Embed(vocab=100, d_model=16)
    ids = jnp.array([[1, 2, 3]])
    params = embed.init(jax.random.key(0), ids)
    x = embed.apply(params, ids)                          # [1, 3, 16]
    logits = embed.apply(params, x, method=Embed.attend)  # [1, 3, 100], tied head
    q = apply_rope(jnp.ones((1, 3, 2, 8)), jnp.arange(3)[None], theta=10000.0)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Embed(nn.Module):
  """A ``[vocab, embed]`` table; ``attend(x)`` is the tied output projection ``x @ table.T``."""
  vocab: int
  d_model: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                  ("vocab", "embed")),
        (self.vocab, self.d_model), self.param_dtype)

  def __call__(self, ids):
    """``[batch, len]`` int ids -> ``[batch, len, d_model]``."""
    x = jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

  def attend(self, x):
    """``[batch, len, d_model]`` -> logits ``[batch, len, vocab]`` with the same table."""
    logits = jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
    return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


# ----------------------------------------------------------------------------- rotary
def rope_inv_freq(head_dim: int, theta: float):
  """``1 / theta ** (2i / head_dim)`` for i < head_dim/2, fp32 (HF's ``inv_freq``)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_angles(positions, head_dim: int, theta: float, sections=None, axial: bool = False):
  """Rotation angles ``[batch, len, head_dim/2]`` (fp32), one per rotary frequency.

  Plain RoPE: ``positions [batch, len]`` times ``rope_inv_freq(head_dim, theta)``.
  Multi-axis RoPE (``sections``, a tuple summing to ``head_dim/2``): ``positions [axes, batch,
  len]`` with ``axes = len(sections)`` (a ``[batch, len]`` array is used on every axis); the
  first ``sections[0]`` frequencies turn with axis 0's positions, the next ``sections[1]`` with
  axis 1's, ... -- Qwen2-VL's M-RoPE over (temporal, height, width). ``axial`` gives every
  section its own ladder ``rope_inv_freq(2 * section)`` instead of slicing the one over
  ``head_dim`` -- the 2-D (height, width) rotary of Qwen2.5-VL's vision tower.
  """
  if sections is None:
    return positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
  sections = tuple(int(n) for n in sections)
  if 2 * sum(sections) != head_dim:
    raise ValueError(f"rope sections {sections} must sum to head_dim/2 = {head_dim // 2}")
  positions = jnp.asarray(positions).astype(jnp.float32)
  if positions.ndim == 2:
    positions = jnp.broadcast_to(positions, (len(sections),) + positions.shape)
  if positions.shape[0] != len(sections):
    raise ValueError(f"positions {positions.shape} need a leading axis of {len(sections)} "
                     f"(one per rope section {sections})")
  full = rope_inv_freq(head_dim, theta)
  out, start = [], 0
  for axis, n in enumerate(sections):
    inv = rope_inv_freq(2 * n, theta) if axial else full[start:start + n]
    out.append(positions[axis][..., None] * inv)
    start += n
  return jnp.concatenate(out, axis=-1)


def rope_cos_sin(positions, head_dim: int, theta: float, sections=None, axial: bool = False):
  """cos, sin ``[batch, len, head_dim]`` in fp32 for integer (or float) ``positions``
  (``[batch, len]``, or ``[axes, batch, len]`` with ``sections``: see ``rope_angles``)."""
  freqs = rope_angles(positions, head_dim, theta, sections, axial)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x):
  """``[x1, x2] -> [-x2, x1]`` on the last axis split into halves (HF convention)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta: float, sections=None, axial: bool = False):
  """Rotates ``x [batch, len, heads, head_dim]`` by ``positions [batch, len]`` (or ``[axes,
  batch, len]`` with multi-axis ``sections``, see ``rope_angles``).

  HF "rotate_half" convention: dimension i pairs with i + head_dim/2. cos/sin are computed
  in fp32 and cast to ``x.dtype`` before the rotation, as in HF.
  """
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta, sections, axial)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- sin-cos
def sincos_1d(dim: int, pos):
  """MAE's 1-D table: ``[sin(pos * w), cos(pos * w)]`` with w_i = 10000^(-2i/dim)."""
  if dim % 2:
    raise ValueError(f"sincos_1d needs an even dim, got {dim}")
  omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
  out = jnp.reshape(pos, (-1,)).astype(jnp.float32)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, *, scale: float = 1.0):
  """Fixed 2-D position table ``[grid_h * grid_w, dim]`` in row-major patch order.

  The first half of the channels encodes the column (x), the second half the row (y), as
  in MAE and diffusers' ``get_2d_sincos_pos_embed``; coordinates are multiplied by ``scale``
  (diffusers' ``base_size / interpolation_scale`` adjustments are a scale).

  Example::

    sincos_2d(64, 4).shape   # (16, 64)
  """
  grid_w = grid_h if grid_w is None else grid_w
  if dim % 4:
    raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
  ys, xs = jnp.meshgrid(jnp.arange(grid_h, dtype=jnp.float32) * scale,
                        jnp.arange(grid_w, dtype=jnp.float32) * scale, indexing="ij")
  return jnp.concatenate([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], axis=1)


def timestep_embedding(t, dim: int, *, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0):
  """Sinusoidal embedding ``[batch, dim]`` of (float) timesteps ``t [batch]``.

  Same formula and flags as diffusers' ``get_timestep_embedding``: frequencies
  ``exp(-log(max_period) * i / (half - downscale_freq_shift))``, output ``[sin, cos]`` or
  ``[cos, sin]`` with ``flip_sin_to_cos`` (the DiT / Sana setting), zero-padded to odd dims.

  Example::

    timestep_embedding(jnp.array([0.0, 500.0]), 256).shape   # (2, 256)
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = scale * jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb

"""The blocks Stable Diffusion's UNet and KL autoencoder are built from, NHWC, with the
weight-table pieces that name them.

Same math and weights as diffusers' classes of the same role:

* ``ResnetBlock2D``: GroupNorm, SiLU, 3x3 conv, (+ a projection of ``silu(temb)``, UNet
  only), GroupNorm, SiLU, 3x3 conv, plus the input (through a 1x1 ``conv_shortcut`` when the
  width changes), divided by ``output_scale_factor``;
* ``Downsample2D``: a stride-2 3x3 conv (``padding`` 1, or 0 after padding the bottom and
  right edges by one: the autoencoder's form); ``Upsample2D``: nearest-neighbour resize (to
  the skip connection's size) then a 3x3 conv;
* ``Transformer2D`` (diffusers' ``Transformer2DModel`` on a feature map): GroupNorm (eps
  1e-6), ``proj_in`` (1x1 conv, or a linear layer with ``use_linear_projection``), blocks of
  [LayerNorm, self-attention, LayerNorm, cross-attention to the caption, LayerNorm, GEGLU
  feed-forward (4x, exact GELU on the gate half)], each residual, ``proj_out``, residual;
* ``SpatialSelfAttention``: the autoencoder's mid-block attention (GroupNorm, one head over
  all positions with q/k/v/out biases, residual).

Parameter names follow the reference modules (``resnets_0/conv1``, ``attentions_0/
transformer_blocks_0/attn2/to_k``); ``rules`` turns a walk of (reference path, our path, kind)
into the ``interop.tables`` rules, so each family's table reads like its module.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import unet_blocks as ub
    blk = ub.Transformer2D(heads=2, head_dim=8, num_layers=1, groups=4)
    x, ctx = jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 7, 12))
    p = blk.init(jax.random.key(0), x, ctx)["params"]    # norm, proj_in, transformer_blocks_0..
    y = blk.apply({"params": p}, x, ctx)                  # [1, 4, 4, 16]
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.core import HeadDense, conv
from mmjax.interop.tables import CONV, FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Rule
from mmjax.models.vqgan import GroupNorm

AXES = ("conv_in", "conv_out")   # logical names of every conv kernel's in / out channels
TOKENS = ("act_batch", "act_length", "act_embed")


def _dense(features: int, axes: tuple, name: str, dtype, param_dtype, use_bias: bool = True):
  return core.dense(features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    init_std=0.02, name=name)


def resize_nearest(x, size: tuple):
  """torch ``interpolate(mode='nearest', size=size)`` on NHWC: source index
  ``floor(i * in / out)``; an exact 2x is a repeat."""
  _, h, w, _ = x.shape
  if tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32), h - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32), w - 1)
  return x[:, rows][:, :, cols]


# ----------------------------------------------------------------------------- conv blocks
class ResnetBlock2D(nn.Module):
  """``(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) /
  output_scale_factor``; ``temb [b, T]`` or None (the autoencoder has no time embedding)."""
  out: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gn = dict(num_groups=self.groups, eps=self.eps, **kw)
    h = conv(self.out, 3, AXES, name="conv1", **kw)(jax.nn.silu(GroupNorm(name="norm1", **gn)(x)))
    if temb is not None:
      t = _dense(self.out, ("mlp", AXES[1]), "time_emb_proj", **kw)(jax.nn.silu(temb))
      h = h + t[:, None, None, :]
    h = conv(self.out, 3, AXES, name="conv2", **kw)(jax.nn.silu(GroupNorm(name="norm2", **gn)(h)))
    if x.shape[-1] != self.out:
      x = conv(self.out, 1, AXES, name="conv_shortcut", **kw)(x)
    y = x + h
    return y if self.output_scale_factor == 1.0 else y / self.output_scale_factor


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv named ``conv``; ``padding`` 1 (UNet) or 0 (autoencoder: the input is
  first padded by one row / column at the bottom / right)."""
  out: int
  padding: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.padding
    pad = ((p, p), (p, p)) if p else ((0, 1), (0, 1))
    return nn.Conv(self.out, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="conv",
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None) + AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (AXES[1],)))(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour resize to ``size`` (default 2x) then a 3x3 conv named ``conv``."""
  out: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size: Optional[tuple] = None):
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
    return conv(self.out, 3, AXES, name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)(resize_nearest(x, size))


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
  """diffusers' ``Attention`` without norms: ``to_q`` on ``x``, ``to_k`` / ``to_v`` on
  ``context`` (default ``x``), softmax over ``heads x head_dim``, ``to_out`` (with bias).
  Kernels ``[embed, heads, head_dim]`` / ``[heads, head_dim, embed]``."""
  heads: int
  head_dim: int
  qkv_bias: bool = False
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ctx = x if context is None else context

    def proj(name, inp):
      return HeadDense(in_axes=(-1,), in_names=("embed",), out_shape=(self.heads, self.head_dim),
                       out_names=("heads", "head_dim"), use_bias=self.qkv_bias, name=name,
                       **kw)(inp)

    heads = ("act_batch", "act_length", "act_heads", None)
    q, k, v = (core.constrain(proj(n, i), heads)
               for n, i in (("to_q", x), ("to_k", ctx), ("to_v", ctx)))
    o = core.dot_product_attention(q, k, v, impl=self.impl)
    return HeadDense(in_axes=(-2, -1), in_names=("heads", "head_dim"), out_shape=(x.shape[-1],),
                     out_names=("embed",), use_bias=True, name="to_out", **kw)(o)


class SpatialSelfAttention(nn.Module):
  """The autoencoder's mid-block attention: ``x + to_out(attn(group_norm(x)))``, one head of
  width C over all H*W positions, biases on q / k / v."""
  groups: int = 32
  eps: float = 1e-6
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, h * w, c)
    y = Attention(1, c, qkv_bias=True, impl=self.impl, name="attn", **kw)(y)
    return x + y.reshape(b, h, w, c)


class FeedForward(nn.Module):
  """GEGLU: ``proj`` to 2 x inner, ``value * gelu(gate)`` (exact GELU; value is the first
  half), ``out`` back to the width."""
  inner: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    value, gate = jnp.split(_dense(2 * self.inner, ("embed", "mlp"), "proj", **kw)(x), 2, axis=-1)
    h = core.constrain(value * jax.nn.gelu(gate, approximate=False),
                       ("act_batch", "act_length", "act_mlp"))
    return _dense(x.shape[-1], ("mlp", "embed"), "out", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm (eps 1e-5) self-attention, cross-attention to the caption, GEGLU FF."""
  heads: int
  head_dim: int
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim, impl=self.impl, **kw)
    norm = lambda name: core.LayerNorm(eps=1e-5, name=name, **kw)  # noqa: E731
    x = x + Attention(name="attn1", **attn)(norm("norm1")(x))
    x = x + Attention(name="attn2", **attn)(norm("norm2")(x), context)
    x = x + FeedForward(4 * x.shape[-1], name="ff", **kw)(norm("norm3")(x))
    return core.constrain(x, TOKENS)


class Transformer2D(nn.Module):
  """diffusers' ``Transformer2DModel`` on ``x [b, h, w, C]`` with the caption ``context
  [b, n, ctx_dim]``: GroupNorm, ``proj_in`` to ``heads * head_dim``, ``num_layers``
  ``BasicTransformerBlock``s over the h*w tokens, ``proj_out`` back to C, residual."""
  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      y = _dense(inner, (AXES[0], "embed"), "proj_in", **kw)(y.reshape(b, h * w, c))
    else:
      y = conv(inner, 1, (AXES[0], "embed"), name="proj_in", **kw)(y).reshape(b, h * w, inner)
    y = core.constrain(y, TOKENS)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(self.heads, self.head_dim, self.impl,
                                name=f"transformer_blocks_{i}", **kw)(y, context)
    if self.use_linear_projection:
      y = _dense(c, ("embed", AXES[1]), "proj_out", **kw)(y).reshape(b, h, w, c)
    else:
      y = conv(c, 1, ("embed", AXES[1]), name="proj_out", **kw)(y.reshape(b, h, w, inner))
    return y + x


# ----------------------------------------------------------------------------- interop
LEAVES = {   # layer kind -> (reference leaf, our leaf, transform)
    "conv": [("weight", "kernel", CONV), ("bias", "bias", IDENTITY)],
    "norm": [("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)],
    "linear": [("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY)],
    "heads_in": [("weight", "kernel", LINEAR)],                          # to_q / to_k / to_v
    "heads_in_bias": [("weight", "kernel", LINEAR), ("bias", "bias", FLATTEN)],
    "heads_out": [("weight", "kernel", LINEAR_OUT), ("bias", "bias", IDENTITY)],   # to_out.0
}


def resnet_layers(theirs: str, ours: str, cin: int, cout: int, temb: bool) -> list:
  """(reference path, our path, kind) of one ``ResnetBlock2D``."""
  out = [(f"{theirs}.norm1", f"{ours}/norm1", "norm"), (f"{theirs}.conv1", f"{ours}/conv1", "conv")]
  if temb:
    out.append((f"{theirs}.time_emb_proj", f"{ours}/time_emb_proj", "linear"))
  out += [(f"{theirs}.norm2", f"{ours}/norm2", "norm"),
          (f"{theirs}.conv2", f"{ours}/conv2", "conv")]
  if cin != cout:
    out.append((f"{theirs}.conv_shortcut", f"{ours}/conv_shortcut", "conv"))
  return out


def _attention_layers(theirs: str, ours: str, bias: bool) -> list:
  kind = "heads_in_bias" if bias else "heads_in"
  return [(f"{theirs}.to_{n}", f"{ours}/to_{n}", kind) for n in "qkv"] + [
      (f"{theirs}.to_out.0", f"{ours}/to_out", "heads_out")]


def transformer_layers(theirs: str, ours: str, num_layers: int, linear: bool) -> list:
  """(reference path, our path, kind) of one ``Transformer2D``."""
  proj = "linear" if linear else "conv"
  out = [(f"{theirs}.norm", f"{ours}/norm", "norm"),
         (f"{theirs}.proj_in", f"{ours}/proj_in", proj)]
  for i in range(num_layers):
    t, o = f"{theirs}.transformer_blocks.{i}", f"{ours}/transformer_blocks_{i}"
    for n in (1, 2, 3):
      out.append((f"{t}.norm{n}", f"{o}/norm{n}", "norm"))
    for n in ("attn1", "attn2"):
      out += _attention_layers(f"{t}.{n}", f"{o}/{n}", bias=False)
    out += [(f"{t}.ff.net.0.proj", f"{o}/ff/proj", "linear"),
            (f"{t}.ff.net.2", f"{o}/ff/out", "linear")]
  return out + [(f"{theirs}.proj_out", f"{ours}/proj_out", proj)]


def spatial_attention_layers(theirs: str, ours: str) -> list:
  """(reference path, our path, kind) of one ``SpatialSelfAttention``."""
  return ([(f"{theirs}.group_norm", f"{ours}/group_norm", "norm")]
          + _attention_layers(theirs, f"{ours}/attn", bias=True))


def rules(layers) -> list:
  """``interop.tables`` rules, one per tensor, of a list of (reference path, our path, kind)."""
  return [Rule(f"{theirs}.{leaf}", f"{ours}/{our_leaf}", t)
          for theirs, ours, kind in layers for leaf, our_leaf, t in LEAVES[kind]]

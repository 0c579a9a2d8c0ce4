"""VQGAN-style pixel decoder (taming-transformers / RQ-VAE layout), as DualToken uses it.

``Decoder``: ``conv_in`` -> mid (ResBlock, self-attention, ResBlock) -> up levels from the
deepest (channels ``ch * ch_mult[i]``, ``num_res_blocks + 1`` ResBlocks each, attention after
every block of a level whose resolution is in ``attn_resolutions``, nearest 2x upsampling +
3x3 conv between levels) -> GroupNorm + SiLU + ``conv_out``. ResBlocks are GroupNorm, SiLU,
conv3x3, GroupNorm, SiLU, conv3x3 plus a 1x1 ``nin_shortcut`` when the width changes; no
time embedding, no dropout, and the output is not squashed (no tanh).

``PixelDecoder`` is DualToken's decode path after the up-projection: a token grid (27x27 x
1152) is resized bilinearly (half-pixel, no antialias) to ``decoder_latent_shape`` (24x24),
passed through ``post_quant_conv`` (a ResBlock whose first conv is 1x1, 1152 -> 1024) and the
decoder (24 -> 384 px with ``ch_mult`` (1, 1, 4, 4, 8)).

Parameter paths mirror the reference names (``decoder.up.3.block.1.conv2.weight`` <->
``decoder/up_3_block_1/conv2/kernel``); ``torch_table`` is the data table. Also here, shared
with ``lpips`` / ``patchgan``: ``GroupNorm`` (torch semantics, fp32 statistics),
``resize_bilinear`` (torch ``interpolate(mode='bilinear')``), ``read_state_dict`` (a
``.pth`` / ``.safetensors`` / ``.npz`` file as numpy) and ``load_state_dict`` (an in-memory
torch state dict -> our params through a family's table, every name and shape checked).

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import vqgan
    cfg = vqgan.DecoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                              resolution=16, decoder_in_channels=16, num_groups=8,
                              hidden_size=24, decoder_latent_shape=(8, 8))
    dec = vqgan.PixelDecoder(cfg)
    tokens = jnp.zeros((2, 10 * 10, 24))                    # a 10x10 grid of up-projected codes
    params = dec.init(jax.random.key(0), tokens)["params"]  # {post_quant_conv, decoder}
    img = dec.apply({"params": params}, tokens)             # [2, 16, 16, 3], not squashed
    sd = vqgan.to_state_dict(cfg, params)                   # {'decoder.conv_in.weight': ...}
    params = vqgan.from_state_dict(cfg, sd)                 # and back
    # the paper's decoder: vqgan.DecoderConfig() (27x27x1152 -> 384x384x3)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.core import conv
from mmjax.errors import MmjaxError
from mmjax.interop.tables import CONV, IDENTITY, Family, Rule

AXES = ("conv_in", "conv_out")   # logical names of every conv kernel's in / out channels
ACT = ("act_batch", None, None, "act_embed")   # logical names of feature maps between blocks


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder hyper-parameters; names follow the release's ``ddconfig`` (taming's ``Decoder``
  arguments). ``num_res_blocks`` has taming's meaning: every up level holds
  ``num_res_blocks + 1`` ResBlocks (2 -> the paper's 3). ``hidden_size`` /
  ``decoder_latent_shape`` describe DualToken's resize + ``post_quant_conv`` in front
  (None: the input goes straight to ``conv_in``, at its own size)."""
  ch: int = 128
  ch_mult: tuple = (1, 1, 4, 4, 8)
  num_res_blocks: int = 2
  attn_resolutions: tuple = (24,)
  resolution: int = 384                  # output size; lowest level = resolution / 2**(L-1)
  decoder_in_channels: int = 1024        # conv_in's input width (taming's z_channels)
  out_ch: int = 3
  resamp_with_conv: bool = True          # the 3x3 conv after each nearest 2x upsampling
  hidden_size: Optional[int] = 1152      # post_quant_conv input width (None: no such block)
  decoder_latent_shape: Optional[tuple] = (24, 24)   # bilinear resize target (None: none)
  num_groups: int = 32                   # GroupNorm groups (must divide every width)
  eps: float = 1e-6                      # GroupNorm epsilon
  remat: bool = False                    # rematerialise each ResBlock in the backward pass
  attention_impl: str = "xla"            # core.dot_product_attention impl
  dtype: Any = jnp.float32               # compute dtype; params stay param_dtype
  param_dtype: Any = jnp.float32
  family: str = "vqgan_decoder"

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if self.decoder_latent_shape is not None:
      object.__setattr__(self, "decoder_latent_shape",
                         tuple(int(s) for s in self.decoder_latent_shape))
    widths = [self.ch * m for m in self.ch_mult] + [self.decoder_in_channels]
    widths += [] if self.hidden_size is None else [self.hidden_size]
    bad = sorted({w for w in widths if w % self.num_groups})
    if bad:
      raise ValueError(f"GroupNorm groups {self.num_groups} do not divide widths {bad}")
    if self.resolution % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(f"resolution {self.resolution} is not a multiple of "
                       f"2**{len(self.ch_mult) - 1}")

  @property
  def lowest_resolution(self) -> int:
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def from_release_config(cls, rq: dict, **overrides) -> "DecoderConfig":
    """From the release's ``rqvaesiglip`` config dict (``ddconfig``, ``hidden_size``,
    ``decoder_latent_shape``); image-encoder-only ``ddconfig`` keys are ignored."""
    dd = dict(rq["ddconfig"])
    if float(dd.get("dropout", 0.0)) != 0.0:
      raise NotImplementedError("decoder dropout is not implemented (the release uses 0.0)")
    keep = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
            "decoder_in_channels", "out_ch", "resamp_with_conv")
    kw = {k: dd[k] for k in keep if k in dd}
    kw["hidden_size"] = rq.get("hidden_size", cls.hidden_size)
    kw["decoder_latent_shape"] = rq.get("decoder_latent_shape")
    return cls(**{**kw, **overrides})


# ----------------------------------------------------------------------------- layers
def resize_bilinear(x, size: tuple):
  """``[b, h, w, c]`` -> ``[b, *size, c]`` like torch ``F.interpolate(mode='bilinear',
  align_corners=False)`` (half-pixel centres, no antialias); the identity at equal size."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "linear",
                          antialias=False).astype(x.dtype)


def upsample_nearest(x, factor: int = 2):
  """torch ``interpolate(scale_factor=2, mode='nearest')`` on NHWC."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class GroupNorm(nn.Module):
  """torch ``GroupNorm(num_groups, C, eps, affine=True)`` on ``[..., C]`` (channels last):
  statistics over the spatial axes and each group's channels, in fp32."""
  num_groups: int = 32
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, g = x.shape[-1], self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: {g} groups do not divide {c} channels")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (c,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (c,), self.param_dtype)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ResnetBlock(nn.Module):
  """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; ``conv1_kernel`` 1 makes
  DualToken's ``post_quant_conv``; the shortcut is a 1x1 ``nin_shortcut`` when widths differ."""
  out: int
  num_groups: int = 32
  eps: float = 1e-6
  conv1_kernel: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gn = dict(num_groups=self.num_groups, eps=self.eps, **kw)
    h = conv(self.out, self.conv1_kernel, AXES, name="conv1", **kw)(
        jax.nn.silu(GroupNorm(name="norm1", **gn)(x)))
    h = conv(self.out, 3, AXES, name="conv2", **kw)(
        jax.nn.silu(GroupNorm(name="norm2", **gn)(h)))
    if x.shape[-1] != self.out:
      x = conv(self.out, 1, AXES, name="nin_shortcut", **kw)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions: GroupNorm, 1x1 convs ``q``/``k``/``v``,
  softmax(q k^T / sqrt(C)) v, 1x1 ``proj_out``, residual."""
  num_groups: int = 32
  eps: float = 1e-6
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.num_groups, self.eps, name="norm", **kw)(x)
    q, k, v = (conv(c, 1, AXES, name=n, **kw)(h).reshape(b, hgt * wid, 1, c)
               for n in ("q", "k", "v"))
    o = core.dot_product_attention(q, k, v, impl=self.impl).reshape(b, hgt, wid, c)
    return x + conv(c, 1, AXES, name="proj_out", **kw)(o.astype(self.dtype))


def _constrain(x):
  return core.constrain(x, ACT)


class Decoder(nn.Module):
  """Feature map ``[b, r, r, decoder_in_channels]`` (r = ``cfg.lowest_resolution``) ->
  image ``[b, r * 2**(L-1), ..., out_ch]``. Submodules: ``conv_in``, ``mid_block_1``,
  ``mid_attn_1``, ``mid_block_2``, ``up_{level}_block_{j}``, ``up_{level}_attn_{j}``,
  ``up_{level}_upsample``, ``norm_out``, ``conv_out``."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    gn = dict(num_groups=c.num_groups, eps=c.eps, **kw)
    block = nn.remat(ResnetBlock) if c.remat else ResnetBlock
    attn = lambda name: AttnBlock(impl=c.attention_impl, name=name, **gn)  # noqa: E731
    width = c.ch * c.ch_mult[-1]
    h = conv(width, 3, AXES, name="conv_in", **kw)(z.astype(c.dtype))
    h = block(width, name="mid_block_1", **gn)(h)
    h = attn("mid_attn_1")(h)
    h = _constrain(block(width, name="mid_block_2", **gn)(h))
    res = c.lowest_resolution
    for i in reversed(range(len(c.ch_mult))):
      width = c.ch * c.ch_mult[i]
      for j in range(c.num_res_blocks + 1):
        h = block(width, name=f"up_{i}_block_{j}", **gn)(h)
        if res in c.attn_resolutions:
          h = attn(f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = upsample_nearest(h)
        if c.resamp_with_conv:
          h = conv(width, 3, AXES, name=f"up_{i}_upsample", **kw)(h)
        res *= 2
      h = _constrain(h)
    h = jax.nn.silu(GroupNorm(name="norm_out", **gn)(h))
    return conv(c.out_ch, 3, AXES, name="conv_out", **kw)(h)


class PixelDecoder(nn.Module):
  """DualToken's pixel decoder: tokens ``[b, L, hidden]`` (L a square) or a map ``[b, h, w,
  hidden]`` -> bilinear resize to ``decoder_latent_shape`` -> ``post_quant_conv`` ->
  ``decoder`` -> ``[b, H, W, out_ch]`` (in [-1, 1] once trained; not squashed)."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    if x.ndim == 3:
      side = int(round(x.shape[1] ** 0.5))
      if side * side != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens are not a square grid")
      x = x.reshape(x.shape[0], side, side, x.shape[-1])
    x = x.astype(c.dtype)
    if c.decoder_latent_shape is not None:
      x = resize_bilinear(x, c.decoder_latent_shape)
    if c.hidden_size is not None:
      x = ResnetBlock(c.decoder_in_channels, c.num_groups, c.eps, conv1_kernel=1,
                      dtype=c.dtype, param_dtype=c.param_dtype, name="post_quant_conv")(x)
    return Decoder(c, name="decoder")(_constrain(x))


# ----------------------------------------------------------------------------- interop
LEAVES = {"conv": [("weight", "kernel", CONV), ("bias", "bias", IDENTITY)],
          "norm": [("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)]}


def resblock_layers(theirs: str, ours: str, cin: int, cout: int) -> list:
  """(reference path, our path, kind) of one ResBlock."""
  out = [(f"{theirs}.norm1", f"{ours}/norm1", "norm"), (f"{theirs}.conv1", f"{ours}/conv1", "conv"),
         (f"{theirs}.norm2", f"{ours}/norm2", "norm"), (f"{theirs}.conv2", f"{ours}/conv2", "conv")]
  if cin != cout:
    out.append((f"{theirs}.nin_shortcut", f"{ours}/nin_shortcut", "conv"))
  return out


def _attn_layers(theirs: str, ours: str) -> list:
  return [(f"{theirs}.norm", f"{ours}/norm", "norm")] + [
      (f"{theirs}.{n}", f"{ours}/{n}", "conv") for n in ("q", "k", "v", "proj_out")]


def decoder_layers(cfg: DecoderConfig) -> list:
  """Every layer of ``Decoder`` as (taming name under ``decoder.``, our path, kind), walked
  from the config exactly as the module builds it."""
  width = cfg.ch * cfg.ch_mult[-1]
  out = [("conv_in", "conv_in", "conv")]
  out += resblock_layers("mid.block_1", "mid_block_1", width, width)
  out += _attn_layers("mid.attn_1", "mid_attn_1")
  out += resblock_layers("mid.block_2", "mid_block_2", width, width)
  res = cfg.lowest_resolution
  for i in reversed(range(len(cfg.ch_mult))):
    cout = cfg.ch * cfg.ch_mult[i]
    for j in range(cfg.num_res_blocks + 1):
      out += resblock_layers(f"up.{i}.block.{j}", f"up_{i}_block_{j}", width, cout)
      width = cout
      if res in cfg.attn_resolutions:
        out += _attn_layers(f"up.{i}.attn.{j}", f"up_{i}_attn_{j}")
    if i != 0:
      if cfg.resamp_with_conv:
        out.append((f"up.{i}.upsample.conv", f"up_{i}_upsample", "conv"))
      res *= 2
  return out + [("norm_out", "norm_out", "norm"), ("conv_out", "conv_out", "conv")]


def torch_table(cfg: DecoderConfig) -> list:
  """Reference (``post_quant_conv.*``, ``decoder.*``) names -> our ``PixelDecoder`` paths."""
  layers = [(f"decoder.{a}", f"decoder/{b}", k) for a, b, k in decoder_layers(cfg)]
  if cfg.hidden_size is not None:
    layers = resblock_layers("post_quant_conv", "post_quant_conv", cfg.hidden_size,
                             cfg.decoder_in_channels) + layers
  return [Rule(f"{theirs}.{leaf}", f"{ours}/{our_leaf}", t)
          for theirs, ours, kind in layers for leaf, our_leaf, t in LEAVES[kind]]


def init_args(cfg: DecoderConfig) -> tuple:
  """An input ``init`` accepts (shapes only)."""
  side = cfg.decoder_latent_shape or (cfg.lowest_resolution,) * 2
  width = cfg.decoder_in_channels if cfg.hidden_size is None else cfg.hidden_size
  return (jnp.zeros((1, *side, width), jnp.float32),)


def _config_dict(cfg: DecoderConfig) -> dict:
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ("dtype", "param_dtype")}


FAMILY = Family(
    name="vqgan_decoder", model_types=(), architectures=(),
    from_hf_config=lambda d, **o: DecoderConfig(**{**d, **o}), to_hf_config=_config_dict,
    make_model=PixelDecoder, init_args=init_args, table=torch_table)


# ----------------------------------------------------------------------------- state dicts
class TorchMissing(MmjaxError, ImportError):
  """A ``.pth`` / ``.pt`` file was given and torch is not installed."""


class StateDict:
  """An in-memory ``{name: array}`` seen through the ``Checkpoint`` interface that
  ``interop.hf.load_params`` reads (names, shapes, one-tensor reads)."""

  def __init__(self, tensors: dict, renames=()):
    import re
    self.tensors = {}
    for key, value in tensors.items():
      name = key
      for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
      if name in self.tensors:
        raise ValueError(f"state dict names {key!r} and another key both mean {name!r}")
      self.tensors[name] = value
    self.shapes = {k: tuple(np.shape(v)) for k, v in self.tensors.items()}

  def keys(self) -> set:
    return set(self.shapes)

  def read(self, name: str, keep: bool = False) -> np.ndarray:
    del keep
    return np.asarray(self.tensors[name])

  def forget(self) -> None:
    pass


def read_state_dict(path: str) -> dict:
  """``{name: numpy}`` of a torch ``.pth`` / ``.pt`` / ``.bin`` file (torch is imported here,
  only for these), a ``.safetensors`` or an ``.npz`` file. A pickle holding
  ``{'state_dict': ...}`` is unwrapped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path!r}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:
    raise TorchMissing(f"reading {path!r} needs PyTorch (pip install torch), or convert it "
                       "to .safetensors / .npz first") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  return {k: (v.detach().float().numpy() if v.is_floating_point() else v.numpy())
          for k, v in sd.items() if hasattr(v, "detach")}


def load_state_dict(family: Family, cfg, tensors: dict, *, mesh=None, rules=None,
                    allow_extra: bool = False):
  """Our params of ``family`` / ``cfg`` from a torch-named ``{name: array}``. Missing,
  unexpected (unless ``allow_extra`` or ``family.ignore``) and mis-shaped names are one
  ``CheckpointMismatchError``; with a ``mesh`` each leaf lands on its logical sharding."""
  from mmjax.interop import hf
  if allow_extra:
    family = dataclasses.replace(family, ignore=lambda c: (".*",))
  _, params = hf.load_params(family, cfg, StateDict(tensors, tuple(family.renames(cfg))),
                             mesh=mesh, rules=rules)
  return params


def to_state_dict(cfg: DecoderConfig, params) -> dict:
  """Our ``PixelDecoder`` params -> the reference ``{name: numpy}`` (``post_quant_conv.*``,
  ``decoder.*``)."""
  from mmjax.interop import hf
  return hf.state_dict(FAMILY, cfg, params)


def from_state_dict(cfg: DecoderConfig, tensors: dict, **kw):
  """Inverse of ``to_state_dict`` (``load_state_dict`` with this family)."""
  return load_state_dict(FAMILY, cfg, tensors, **kw)

"""The KL autoencoder of Stable Diffusion (SD1.5's VAE: 8x downsampling, 4 latent channels).

Same math and weights as diffusers' ``AutoencoderKL``, NHWC (blocks: `unet_blocks`):

* encoder: ``conv_in``; per stage ``layers_per_block`` ResNets (GroupNorm eps 1e-6, no time
  embedding) and, but for the last stage, a stride-2 conv after padding the bottom / right
  edge by one; mid block (ResNet, one-head self-attention, ResNet); GroupNorm, SiLU,
  ``conv_out`` to ``2 * latent_channels`` = the posterior's mean and log-variance, through
  the 1x1 ``quant_conv``;
* decoder: the 1x1 ``post_quant_conv``; ``conv_in``; mid block; per stage (deepest first)
  ``layers_per_block + 1`` ResNets and, but for the last, nearest 2x upsampling + conv;
  GroupNorm, SiLU, ``conv_out``.

The posterior is a diagonal Gaussian: log-variance clipped to [-30, 20], ``sample = mean +
exp(logvar / 2) * N(0, 1)`` (what SD training encodes), ``mode = mean``. The diffusion model
sees ``scale_latents(z)`` = ``(z - shift_factor) * scaling_factor`` (SD1.5: ``0.18215 z``).
The autoencoder is frozen in every mmjax system.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import autoencoder_kl as akl
    cfg = akl.AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1,
                                  down_block_types=(akl.DOWN,) * 2,
                                  up_block_types=(akl.UP,) * 2, norm_num_groups=8)
    vae = akl.AutoencoderKL(cfg)
    images = jnp.zeros((1, 16, 16, 3))                              # in [-1, 1]
    params = vae.init(jax.random.key(0), images)["params"]
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)   # [1, 8, 8, 4] each
    z = akl.scale_latents(akl.sample(mean, logvar, jax.random.key(1)), cfg)  # what the UNet sees
    x = vae.apply({"params": params}, akl.unscale_latents(z, cfg), method=vae.decode)
    # real checkpoints: mmjax.interop.load("/ckpt/stable-diffusion-v1-5/vae")
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.core import conv
from mmjax.interop.tables import Family
from mmjax.models import dc_ae, unet_blocks as ub
from mmjax.models.vqgan import GroupNorm

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
EPS = 1e-6                                    # every GroupNorm of the autoencoder
OURS_ONLY = ("dtype", "param_dtype", "attention_impl", "family")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """Hyper-parameters of the KL autoencoder; field names are diffusers', defaults SD1.5's
  (``stable-diffusion-v1-5/vae/config.json``)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = (DOWN,) * 4
  up_block_types: tuple = (UP,) * 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512                      # image side the model was trained at (metadata)
  scaling_factor: float = 0.18215             # latent scaling for the diffusion model
  shift_factor: Optional[float] = None        # subtracted before scaling (None: none)
  latents_mean: Optional[tuple] = None        # carried for export (pipelines of other models)
  latents_std: Optional[tuple] = None
  force_upcast: bool = True                   # carried for export (fp32 VAE in pipelines)
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32                    # compute dtype
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  family: str = "autoencoder_kl"

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                 "latents_std"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if self.down_block_types != (DOWN,) * n or self.up_block_types != (UP,) * n:
      raise NotImplementedError(f"AutoencoderKL block types must be {n} x {DOWN} / {UP} (one "
                                f"per block_out_channels), got {self.down_block_types} / "
                                f"{self.up_block_types}")
    if self.act_fn != "silu":
      raise NotImplementedError(f"act_fn {self.act_fn!r}; supported: 'silu'")

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers_config(cls, d: dict, **overrides) -> "AutoencoderKLConfig":
    """From an ``AutoencoderKL`` ``config.json`` dict; unknown fields are errors.

    Example::

      AutoencoderKLConfig.from_diffusers_config({"scaling_factor": 0.13025}).latent_channels  # 4
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - set(OURS_ONLY))
    if unknown:
      raise ValueError(f"unknown AutoencoderKL config fields: {unknown}")
    return cls(**{**d, **overrides})

  def to_diffusers_config(self) -> dict:
    """The ``config.json`` dict ``AutoencoderKL.from_pretrained`` reads."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in OURS_ONLY}
    out["_class_name"] = "AutoencoderKL"
    return out


# The diffusion model's latents: ``(z - shift_factor) * scaling_factor`` and back; the same
# rule as DC-AE's (both configs carry ``scaling_factor`` and ``shift_factor``).
scale_latents, unscale_latents = dc_ae.scale_latents, dc_ae.unscale_latents


def sample(mean, logvar, rng):
  """A posterior sample ``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)`` (fp32)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps


# ----------------------------------------------------------------------------- the model
class MidBlock(nn.Module):
  """ResNet, one-head self-attention (unless disabled), ResNet, at constant width."""
  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    res = dict(groups=c.norm_num_groups, eps=EPS, **kw)
    x = ub.ResnetBlock2D(x.shape[-1], name="resnets_0", **res)(x)
    if c.mid_block_add_attention:
      x = ub.SpatialSelfAttention(c.norm_num_groups, EPS, c.attention_impl, name="attentions_0",
                                  **kw)(x)
    return ub.ResnetBlock2D(x.shape[-1], name="resnets_1", **res)(x)


class Encoder(nn.Module):
  """Image ``[b, H, W, in]`` -> ``[b, H/r, W/r, 2 * latent]`` (before ``quant_conv``)."""
  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    chans = c.block_out_channels
    x = conv(chans[0], 3, ub.AXES, name="conv_in", **kw)(x.astype(c.dtype))
    for i, ch in enumerate(chans):
      for j in range(c.layers_per_block):
        x = ub.ResnetBlock2D(ch, c.norm_num_groups, EPS, name=f"down_blocks_{i}_resnets_{j}",
                             **kw)(x)
      if i < len(chans) - 1:
        x = ub.Downsample2D(ch, padding=0, name=f"down_blocks_{i}_downsamplers_0", **kw)(x)
    x = MidBlock(c, name="mid_block")(x)
    x = jax.nn.silu(GroupNorm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(x))
    return conv(2 * c.latent_channels, 3, ub.AXES, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latent ``[b, h, w, latent]`` (after ``post_quant_conv``) -> image ``[b, h*r, w*r, out]``."""
  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    chans = tuple(reversed(c.block_out_channels))
    x = conv(chans[0], 3, ub.AXES, name="conv_in", **kw)(z.astype(c.dtype))
    x = MidBlock(c, name="mid_block")(x)
    for i, ch in enumerate(chans):
      for j in range(c.layers_per_block + 1):
        x = ub.ResnetBlock2D(ch, c.norm_num_groups, EPS, name=f"up_blocks_{i}_resnets_{j}",
                             **kw)(x)
      if i < len(chans) - 1:
        x = ub.Upsample2D(ch, name=f"up_blocks_{i}_upsamplers_0", **kw)(x)
    x = jax.nn.silu(GroupNorm(c.norm_num_groups, EPS, name="conv_norm_out", **kw)(x))
    return conv(c.out_channels, 3, ub.AXES, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """``apply(..., images, method=encode)`` -> ``(mean, logvar)``; ``method=decode`` ->
  images; calling the module reconstructs from the posterior mode (and initialises both
  halves)."""
  config: AutoencoderKLConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    if c.use_quant_conv:
      self.quant_conv = conv(2 * c.latent_channels, 1, ub.AXES, name="quant_conv", **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = conv(c.latent_channels, 1, ub.AXES, name="post_quant_conv", **kw)

  def encode(self, images):
    """``[b, H, W, in_channels]`` in [-1, 1] -> the posterior's ``(mean, logvar)``, each
    ``[b, H/r, W/r, latent_channels]`` (fp32; logvar clipped to [-30, 20])."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    """Unscaled latent -> ``[b, H, W, out_channels]``."""
    z = latents.astype(self.config.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images):
    return self.decode(self.encode(images)[0])


# ----------------------------------------------------------------------------- interop
def _layers(c: AutoencoderKLConfig) -> list:
  """Every layer as (reference path, our path, kind), walked as the model builds them."""
  chans = c.block_out_channels

  def mid(side):
    out = ub.resnet_layers(f"{side}.mid_block.resnets.0", f"{side}/mid_block/resnets_0",
                           chans[-1], chans[-1], False)
    if c.mid_block_add_attention:
      out += ub.spatial_attention_layers(f"{side}.mid_block.attentions.0",
                                         f"{side}/mid_block/attentions_0")
    return out + ub.resnet_layers(f"{side}.mid_block.resnets.1", f"{side}/mid_block/resnets_1",
                                  chans[-1], chans[-1], False)

  out = [("encoder.conv_in", "encoder/conv_in", "conv")]
  cin = chans[0]
  for i, ch in enumerate(chans):
    for j in range(c.layers_per_block):
      out += ub.resnet_layers(f"encoder.down_blocks.{i}.resnets.{j}",
                              f"encoder/down_blocks_{i}_resnets_{j}", cin, ch, False)
      cin = ch
    if i < len(chans) - 1:
      out.append((f"encoder.down_blocks.{i}.downsamplers.0.conv",
                  f"encoder/down_blocks_{i}_downsamplers_0/conv", "conv"))
  out += mid("encoder") + [("encoder.conv_norm_out", "encoder/conv_norm_out", "norm"),
                           ("encoder.conv_out", "encoder/conv_out", "conv"),
                           ("decoder.conv_in", "decoder/conv_in", "conv")]
  out += mid("decoder")
  cin = chans[-1]
  for i, ch in enumerate(reversed(chans)):
    for j in range(c.layers_per_block + 1):
      out += ub.resnet_layers(f"decoder.up_blocks.{i}.resnets.{j}",
                              f"decoder/up_blocks_{i}_resnets_{j}", cin, ch, False)
      cin = ch
    if i < len(chans) - 1:
      out.append((f"decoder.up_blocks.{i}.upsamplers.0.conv",
                  f"decoder/up_blocks_{i}_upsamplers_0/conv", "conv"))
  out += [("decoder.conv_norm_out", "decoder/conv_norm_out", "norm"),
          ("decoder.conv_out", "decoder/conv_out", "conv")]
  if c.use_quant_conv:
    out.append(("quant_conv", "quant_conv", "conv"))
  if c.use_post_quant_conv:
    out.append(("post_quant_conv", "post_quant_conv", "conv"))
  return out


def diffusers_table(cfg: AutoencoderKLConfig) -> list:
  """diffusers ``AutoencoderKL`` names -> ours, one rule per tensor."""
  return ub.rules(_layers(cfg))


def init_args(cfg: AutoencoderKLConfig) -> tuple:
  """Smallest image ``init`` accepts (shapes only; used under ``jax.eval_shape``)."""
  r = cfg.spatial_compression_ratio
  return (jnp.zeros((1, r, r, cfg.in_channels)),)


DIFFUSERS_FAMILY = Family(
    name="autoencoder_kl", model_types=(), architectures=("AutoencoderKL",),
    from_hf_config=AutoencoderKLConfig.from_diffusers_config,
    to_hf_config=AutoencoderKLConfig.to_diffusers_config, make_model=AutoencoderKL,
    init_args=init_args, table=diffusers_table)

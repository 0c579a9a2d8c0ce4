"""Stable Diffusion's UNet: the epsilon-prediction denoiser of MetaQuery's SD1.5 decoder.

Same math and weights as diffusers' ``UNet2DConditionModel`` in the SD1.x / SD2.x
configuration, NHWC (blocks: `unet_blocks`):

* timestep -> sinusoid of width ``block_out_channels[0]`` (cos first, ``freq_shift``) ->
  ``time_embedding`` (Linear, SiLU, Linear; width 4x) = ``temb``, which every ResNet block
  adds (after its own SiLU + Linear) between its two convolutions;
* ``conv_in``; down blocks (``CrossAttnDownBlock2D``: ResNet + ``Transformer2D`` pairs,
  ``DownBlock2D``: ResNets only; a stride-2 conv after every block but the last), keeping
  each output as a skip connection; mid block (``UNetMidBlock2DCrossAttn``: ResNet,
  ``Transformer2D``, ResNet); up blocks (``CrossAttnUpBlock2D`` / ``UpBlock2D`` with one
  layer more than the down blocks, each ResNet reading ``concat(h, skip)``; nearest 2x
  upsampling + conv after every block but the last); GroupNorm, SiLU, ``conv_out``;
* cross-attention everywhere reads the caption ``encoder_hidden_states [b, n,
  cross_attention_dim]`` (SD1.5: CLIP's 77 x 768; MetaQuery: the connector's 77 x 768).

diffusers' ``attention_head_dim`` is, for these configs, the number of heads per block (8 for
SD1.5; a per-block tuple for SD2); each head is ``channels / heads`` wide. Parameter names
follow diffusers' modules (``down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k``), so
``diffusers_table`` reads line by line. Features outside SD1.x / SD2.x (class or added
embeddings, other block types, dual or only cross-attention, ...) are refused by name.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import unet2d
    cfg = unet2d.UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                            cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
    unet = unet2d.UNet2DConditionModel(cfg)
    x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.array([999.0]), jnp.zeros((1, 77, 24))
    params = unet.init(jax.random.key(0), x, t, ctx)["params"]
    eps = unet.apply({"params": params}, x, t, ctx)                 # [1, 8, 8, 4]
    # real checkpoints: mmjax.interop.load("/ckpt/stable-diffusion-v1-5/unet")
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.core import conv
from mmjax.interop.tables import Family
from mmjax.models import unet_blocks as ub
from mmjax.models.vqgan import GroupNorm

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
OURS_ONLY = ("dtype", "param_dtype", "remat_policy", "attention_impl", "family")
# diffusers fields whose non-default values select features SD1.x / SD2.x do not use
UNSUPPORTED = dict(
    only_cross_attention=False, dropout=0.0, encoder_hid_dim=None, encoder_hid_dim_type=None,
    num_attention_heads=None, dual_cross_attention=False, class_embed_type=None,
    addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    resnet_time_scale_shift="default", resnet_skip_time_act=False,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, projection_class_embeddings_input_dim=None,
    attention_type="default", class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None, reverse_transformer_layers_per_block=None, act_fn="silu")
IGNORED = ("addition_embed_type_num_heads",)   # only read with addition embeddings


def _tuple(v):
  return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the UNet; field names are diffusers', defaults are SD1.5's
  (``stable-diffusion-v1-5/unet/config.json``). Per-block fields take one value or a tuple
  (one per down block; up blocks read them reversed)."""
  sample_size: Any = 64                 # latent side the model was trained at (metadata)
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False     # x -> 2x - 1 first
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
  mid_block_type: Optional[str] = MID
  up_block_types: tuple = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: Any = 2             # ResNets per down block (up blocks: one more)
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768        # caption width C
  transformer_layers_per_block: Any = 1
  attention_head_dim: Any = 8           # heads per block (diffusers' name)
  use_linear_projection: bool = False   # proj_in / proj_out: Linear (SD2) or 1x1 conv (SD1)
  upcast_attention: bool = False        # fp32 attention logits (ours always are)
  resnet_out_scale_factor: float = 1.0
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  dtype: Any = jnp.float32              # compute dtype; GroupNorm / softmax statistics in fp32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"            # none | core.remat_policy name: per ResNet / transformer
  attention_impl: str = "xla"           # core.dot_product_attention impl
  family: str = "unet2d"

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"{n} block_out_channels need {n} down and {n} up block types")
    for kinds, known in ((self.down_block_types, (CROSS_DOWN, DOWN)),
                         (self.up_block_types, (CROSS_UP, UP))):
      bad = [k for k in kinds if k not in known]
      if bad:
        raise NotImplementedError(f"UNet block types {bad}; supported: {known}")
    if self.mid_block_type not in (MID, None):
      raise NotImplementedError(f"mid_block_type {self.mid_block_type!r}; supported: {MID}")
    for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      if isinstance(getattr(self, name), tuple) and len(getattr(self, name)) != n:
        raise ValueError(f"{name} needs one value per block ({n})")
    if any(isinstance(v, tuple) for v in self._per_block("transformer_layers_per_block")):
      raise NotImplementedError("per-layer transformer_layers_per_block (SDXL) is not supported")

  def _per_block(self, name: str) -> tuple:
    v = getattr(self, name)
    return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

  @property
  def heads(self) -> tuple:
    """Attention heads of each down block (head width = block channels / heads)."""
    return self._per_block("attention_head_dim")

  @property
  def layers(self) -> tuple:
    return self._per_block("layers_per_block")

  @property
  def transformer_layers(self) -> tuple:
    return self._per_block("transformer_layers_per_block")

  @property
  def temb_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def caption_channels(self) -> int:
    """Width of the condition the UNet reads (the name MetaQuery reads for every decoder)."""
    return self.cross_attention_dim

  def replace(self, **changes) -> "UNetConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers_config(cls, d: dict, **overrides) -> "UNetConfig":
    """From a ``UNet2DConditionModel`` ``config.json`` dict; ``overrides`` set our own fields.
    Unknown fields and features outside SD1.x / SD2.x are errors.

    Example::

      UNetConfig.from_diffusers_config({"cross_attention_dim": 1024}).cross_attention_dim
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    for name, default in UNSUPPORTED.items():
      value = _tuple(d.pop(name, default))
      if name == "only_cross_attention" and isinstance(value, tuple):
        value = any(value)
      if value != default:
        raise NotImplementedError(f"UNet2DConditionModel {name}={value!r} is not supported "
                                  f"(SD1.x / SD2.x use {default!r})")
    for name in IGNORED:
      d.pop(name, None)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - set(OURS_ONLY))
    if unknown:
      raise ValueError(f"unknown UNet2DConditionModel config fields: {unknown}")
    return cls(**{**d, **overrides})

  def to_diffusers_config(self) -> dict:
    """The ``config.json`` dict ``UNet2DConditionModel.from_pretrained`` reads."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in OURS_ONLY}
    out.update(UNSUPPORTED)
    out["_class_name"] = "UNet2DConditionModel"
    return out


# ----------------------------------------------------------------------------- blocks
def _blocks(c: UNetConfig):
  """The ResNet and transformer module classes (rematerialised when configured)."""
  if c.remat_policy == "none":
    return ub.ResnetBlock2D, ub.Transformer2D
  policy = core.remat_policy(c.remat_policy)
  return (nn.remat(ub.ResnetBlock2D, policy=policy), nn.remat(ub.Transformer2D, policy=policy))


class UNetBlock(nn.Module):
  """One down, mid or up block: ``num_layers`` ResNets, each followed by a ``Transformer2D``
  when ``cross``; then the down- / up-sampler. Down blocks return ``(h, skips)``; up blocks
  consume ``num_layers`` skips (the last one first) and upsample to ``upsample_size``."""
  cfg: UNetConfig
  kind: str                 # 'down' | 'mid' | 'up'
  out: int
  num_layers: int
  heads: int
  transformer_layers: int
  cross: bool
  resample: bool            # down: stride-2 conv at the end; up: upsample at the end
  scale: float = 1.0        # ResNet output_scale_factor

  @nn.compact
  def __call__(self, x, temb, ctx, skips=(), upsample_size=None):
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    resnet, transformer = _blocks(c)
    outputs, skips = [], list(skips)

    def attn(i, h):
      return transformer(self.heads, self.out // self.heads, self.transformer_layers,
                         c.norm_num_groups, c.use_linear_projection, c.attention_impl,
                         name=f"attentions_{i}", **kw)(h, ctx)

    for i in range(self.num_layers):
      if self.kind == "mid" and i > 0:
        x = attn(i - 1, x)                          # mid: resnet, (attention, resnet)*
      if self.kind == "up":
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = resnet(self.out, c.norm_num_groups, c.norm_eps, self.scale, name=f"resnets_{i}",
                 **kw)(x, temb)
      if self.cross and self.kind != "mid":
        x = attn(i, x)
      outputs.append(x)
    if self.resample and self.kind == "down":
      x = ub.Downsample2D(self.out, c.downsample_padding, name="downsamplers_0", **kw)(x)
      outputs.append(x)
    if self.resample and self.kind == "up":
      x = ub.Upsample2D(self.out, name="upsamplers_0", **kw)(x, upsample_size)
    x = core.constrain(x, ("act_batch", None, None, "act_embed"))
    return (x, outputs) if self.kind == "down" else x


class TimestepEmbedding(nn.Module):
  """``linear_2(silu(linear_1(sinusoid)))``."""
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, init_std=0.02)
    h = core.dense(self.dim, (None, "mlp"), name="linear_1", **kw)(x)
    return core.dense(self.dim, ("mlp", None), name="linear_2", **kw)(jax.nn.silu(h))


# ----------------------------------------------------------------------------- the model
class UNet2DConditionModel(nn.Module):
  """``apply({'params': p}, sample [b, h, w, in_channels], timestep [b] or scalar (0..999),
  encoder_hidden_states [b, n, cross_attention_dim])`` -> ``[b, h, w, out_channels]``
  (SD1.5: the predicted noise epsilon). Any latent size works; sizes that do not halve evenly
  are upsampled back to each skip connection's size, as the reference does."""
  config: UNetConfig

  @nn.compact
  def __call__(self, sample, timestep, encoder_hidden_states):
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    b, chans, n = sample.shape[0], c.block_out_channels, len(c.block_out_channels)
    x = sample.astype(c.dtype)
    if c.center_input_sample:
      x = 2 * x - 1.0
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
    t = core.timestep_embedding(t, chans[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                downscale_freq_shift=c.freq_shift)
    temb = TimestepEmbedding(c.temb_dim, name="time_embedding", **kw)(t.astype(c.dtype))
    ctx = encoder_hidden_states.astype(c.dtype)

    x = conv(chans[0], c.conv_in_kernel, ub.AXES, name="conv_in", **kw)(x)
    skips = [x]
    for i, kind in enumerate(c.down_block_types):
      x, out = UNetBlock(c, "down", chans[i], c.layers[i], c.heads[i], c.transformer_layers[i],
                         kind == CROSS_DOWN, i < n - 1, c.resnet_out_scale_factor,
                         name=f"down_blocks_{i}")(x, temb, ctx)
      skips += out
    if c.mid_block_type is not None:
      x = UNetBlock(c, "mid", chans[-1], 2, c.heads[-1], c.transformer_layers[-1], True, False,
                    c.mid_block_scale_factor, name="mid_block")(x, temb, ctx)
    for i, kind in enumerate(c.up_block_types):
      j = n - 1 - i                                       # the matching down block
      layers = c.layers[j] + 1
      block_skips, skips = skips[len(skips) - layers:], skips[:len(skips) - layers]
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = UNetBlock(c, "up", chans[j], layers, c.heads[j], c.transformer_layers[j],
                    kind == CROSS_UP, i < n - 1, c.resnet_out_scale_factor,
                    name=f"up_blocks_{i}")(x, temb, ctx, block_skips, size)
    x = jax.nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(x))
    return conv(c.out_channels, c.conv_out_kernel, ub.AXES, name="conv_out", **kw)(x)


# ----------------------------------------------------------------------------- interop
def _layers(c: UNetConfig) -> list:
  """Every layer as (reference path, our path, kind), walked as the model builds them."""
  chans, n = c.block_out_channels, len(c.block_out_channels)
  out = [("conv_in", "conv_in", "conv"),
         ("time_embedding.linear_1", "time_embedding/linear_1", "linear"),
         ("time_embedding.linear_2", "time_embedding/linear_2", "linear")]

  def layer(theirs, ours, i, cin, cout, attention_layers):
    """ResNet i of a block (cin -> cout) and, with ``attention_layers``, its transformer."""
    parts = ub.resnet_layers(f"{theirs}.resnets.{i}", f"{ours}/resnets_{i}", cin, cout, True)
    if attention_layers:
      parts += ub.transformer_layers(f"{theirs}.attentions.{i}", f"{ours}/attentions_{i}",
                                     attention_layers, c.use_linear_projection)
    return parts

  for bi, kind in enumerate(c.down_block_types):
    cout, depth = chans[bi], c.transformer_layers[bi] if kind == CROSS_DOWN else 0
    for i in range(c.layers[bi]):
      cin = (chans[bi - 1] if bi else chans[0]) if i == 0 else cout
      out += layer(f"down_blocks.{bi}", f"down_blocks_{bi}", i, cin, cout, depth)
    if bi < n - 1:
      out.append((f"down_blocks.{bi}.downsamplers.0.conv",
                  f"down_blocks_{bi}/downsamplers_0/conv", "conv"))
  if c.mid_block_type is not None:            # resnet 0, attention 0, resnet 1
    out += layer("mid_block", "mid_block", 0, chans[-1], chans[-1], c.transformer_layers[-1])
    out += layer("mid_block", "mid_block", 1, chans[-1], chans[-1], 0)
  for ui, kind in enumerate(c.up_block_types):
    bi = n - 1 - ui                           # the matching down block
    prev, cout, skip_in = chans[min(bi + 1, n - 1)], chans[bi], chans[max(bi - 1, 0)]
    layers, depth = c.layers[bi] + 1, c.transformer_layers[bi] if kind == CROSS_UP else 0
    for i in range(layers):
      cin = (prev if i == 0 else cout) + (skip_in if i == layers - 1 else cout)
      out += layer(f"up_blocks.{ui}", f"up_blocks_{ui}", i, cin, cout, depth)
    if ui < n - 1:
      out.append((f"up_blocks.{ui}.upsamplers.0.conv", f"up_blocks_{ui}/upsamplers_0/conv",
                  "conv"))
  return out + [("conv_norm_out", "conv_norm_out", "norm"), ("conv_out", "conv_out", "conv")]


def diffusers_table(cfg: UNetConfig) -> list:
  """diffusers ``UNet2DConditionModel`` names -> ours, one rule per tensor."""
  return ub.rules(_layers(cfg))


def init_args(cfg: UNetConfig) -> tuple:
  """Smallest inputs ``init`` accepts (shapes only; used under ``jax.eval_shape``)."""
  side = 2 ** (len(cfg.block_out_channels) - 1)
  return (jnp.zeros((1, side, side, cfg.in_channels)), jnp.zeros((1,)),
          jnp.zeros((1, 1, cfg.cross_attention_dim)))


DIFFUSERS_FAMILY = Family(
    name="unet2d", model_types=(), architectures=("UNet2DConditionModel",),
    from_hf_config=UNetConfig.from_diffusers_config,
    to_hf_config=UNetConfig.to_diffusers_config, make_model=UNet2DConditionModel,
    init_args=init_args, table=diffusers_table)

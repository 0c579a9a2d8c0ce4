"""LaViDa's network: SigLIP anyres vision, the projector, pooling, newlines, the splice, the LM.

Every view of the image (base view + anyres grid crops, ``data.VisionGeometry``) goes through
SigLIP cut at its penultimate layer; the features are projected by the mlp2x_gelu projector
*before* pooling, then bilinearly resized from ``g x g`` to ``ceil(g/2)`` per side (27 -> 14 at
384px); the views' tokens are arranged as base view, then the grid picture with a learned
``image_newline`` after each row, and spliced at the image slots of the chat prompt (LLaVA
style; the slots hold LaViDa's ``IMAGE_TOKEN_INDEX`` sentinel, -200, not a vocabulary id).
The language model is a bidirectional LLaDA (or Dream, with shifted logits) ``DecoderLM``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import dream, llada, siglip
from mmjax.models.image_tokens import splice
from mmjax.models.lm import DecoderLM, LMConfig
from mmjax.systems.lavida.data import IMAGE_TOKEN_INDEX, VisionGeometry

BACKBONES = {"llada": llada, "dream": dream}     # model.backbone -> the LM's family module


@dataclasses.dataclass(frozen=True)
class LavidaConfig:
  """Vision tower (cut at the feature layer, no head), language model, view geometry."""
  vision: siglip.SiglipConfig
  text: LMConfig
  geometry: VisionGeometry
  image_token_id: int = IMAGE_TOKEN_INDEX   # the prompt's image slots (LaViDa's sentinel)
  projector_bias: bool = True
  hf_extra: str = "{}"                 # reference-config fields carried to export
  family: str = "lavida"


class LavidaModel(nn.Module):
  """``apply({'params': p}, tokens [b, T], images [b, V, S, S, 3], image_index [b, N])`` ->
  logits ``[b, T, vocab]`` (full bidirectional pass; training and sampling use ``embed`` and
  the ``DiffusionLM`` view of ``language_model``). Params: ``vision_tower``, ``projector``
  (fc1, fc2), ``image_newline``, ``language_model``."""
  config: LavidaConfig

  def setup(self):
    c = self.config
    s = c.text.stack
    self.vision_tower = siglip.SiglipVision(c.vision)
    self.projector = Projector(s.d_model, use_bias=c.projector_bias, dtype=s.dtype,
                               param_dtype=s.param_dtype)
    self.image_newline = self.param(
        "image_newline", nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(s.d_model)), ("embed",)),
        (s.d_model,), s.param_dtype)
    self.language_model = DecoderLM(c.text)

  def view_features(self, views):
    """Views ``[n, S, S, 3]`` -> ``[n, grid^2, d_model]``: penultimate SigLIP features,
    projected, then bilinearly pooled (``g -> ceil(g/2)`` per side) when the geometry pools."""
    geo = self.config.geometry
    feats = self.vision_tower(views)["encoder_output"]   # the tower ends at the feature layer
    feats = self.projector(feats)                                   # before pooling
    return pool_features(feats, geo.grid) if geo.pool else feats

  def image_tokens(self, images, image_index):
    """``images [b, V, S, S, 3]``, ``image_index [b, N]`` -> image tokens ``[b, N, d]``: a
    gather from ``[V * grid^2 view features, image_newline]`` (``data.VisionGeometry``)."""
    b, v = images.shape[:2]
    feats = self.view_features(images.reshape((b * v,) + images.shape[2:]))
    feats = feats.reshape(b, v * feats.shape[1], feats.shape[2])
    newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (b, 1, feats.shape[2]))
    table = jnp.concatenate([feats, newline], axis=1)
    index = jnp.where(image_index < 0, table.shape[1] - 1, image_index)   # pads: any row
    return jnp.take_along_axis(table, index[..., None], axis=1)

  def embed(self, tokens, images, image_index):
    """Token embeddings with the image tokens spliced at the placeholders ``[b, T, d]``
    (the placeholder need not be a vocabulary id: its slots are looked up as id 0)."""
    is_image = tokens == self.config.image_token_id
    x = self.language_model.embed(jnp.where(is_image, 0, tokens))
    img = self.image_tokens(images, image_index).astype(x.dtype)
    return splice(x, is_image, img.reshape(-1, img.shape[-1]))

  def __call__(self, tokens, images, image_index, attention_mask=None):
    x = self.embed(tokens, images, image_index)
    return self.language_model(None, attention_mask, inputs_embeds=x)


class Projector(nn.Module):
  """LLaVA's ``mlp2x_gelu``: fc1, exact GELU, fc2 (params as ``core.Mlp``'s), initialised as
  the reference's freshly built ``nn.Linear`` layers: kernel and bias U(+-1/sqrt(fan_in))."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for name, axes in (("fc1", ("embed", "mlp")), ("fc2", ("mlp", "embed"))):
      bound = x.shape[-1] ** -0.5
      x = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), axes),
                   bias_init=nn.with_logical_partitioning(
                       lambda k, shape, dtype, b=bound: jax.random.uniform(k, shape, dtype, -b, b),
                       axes[1:]))(x)
      x = jax.nn.gelu(x, approximate=False) if name == "fc1" else x
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


def pool_features(feats, out_side: int):
  """``[n, g*g, d]`` -> ``[n, out_side^2, d]`` by bilinear resizing of each ``g x g`` grid:
  half-pixel sampling without antialiasing, i.e. torch's ``F.interpolate(mode='bilinear',
  align_corners=False)`` that LaViDa's ``get_2dPool`` uses (27 -> 14)."""
  n, tokens, d = feats.shape
  g = math.isqrt(tokens)
  out = jax.image.resize(feats.reshape(n, g, g, d), (n, out_side, out_side, d), "linear",
                         antialias=False)
  return out.reshape(n, out_side * out_side, d)


def vision_tower_config(hf: dict, **kw) -> siglip.SiglipConfig:
  """SigLIP without its head, at the tile size (384: 27 x 27 patches, a VALID stride-14
  patch convolution as in the reference)."""
  return siglip.from_hf_config(dict(hf, vision_use_head=False), **kw)

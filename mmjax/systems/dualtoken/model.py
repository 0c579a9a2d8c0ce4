"""The DualToken tokenizer as one Flax module: a SigLIP tower whose shallow and deep layers
feed two residual-VQ vocabularies, a pixel decoder, and (for training) the frozen teacher
tower, LPIPS and the discriminator.

    pixel path:    tower layer 6 (+ 0.6 x prequant_shortcut(layer 4)) -> prequant_pix -> RVQ_pix
                   -> postquant_pix (causal) -> resize 27->24 -> post_quant_conv -> decoder
    semantic path: tower layer 26 -> prequant_sem -> RVQ_sem -> postquant_sem (causal)
                   -> tower layer 27, post-LN, MAP head (vs the frozen teacher)

Parameters: ``tokenizer/{tower, prequant_pix, prequant_sem, prequant_shortcut,
postquant_pix, postquant_sem, decoder}`` (the decoder's ``post_quant_conv`` and ``decoder``
inside), ``teacher`` (a copy of the initial tower, frozen), ``lpips`` (frozen; absent when
the LPIPS weight is 0) and ``disc``. The two codebooks are the mutable collection
``codebook`` (``tokenizer/quantizer_pix``, ``tokenizer/quantizer_sem``).

Example::

    model = DualTokenModel(cfg)                                # cfg: DualTokenConfig
    v = model.init(key, images)                                # params + codebook
    codes = model.apply(v, images, method=DualTokenModel.encode)
    images = model.apply(v, codes["pixel_codes"], method=DualTokenModel.decode)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import lpips as lpips_lib, patchgan, rvq, vqgan
from mmjax.models.siglip import SiglipConfig
from mmjax.systems.dualtoken.projections import ProjectionConfig, QuantProjection
from mmjax.systems.dualtoken.tower import DualTokenTower


@dataclasses.dataclass(frozen=True)
class DualTokenConfig:
  """Everything the tokenizer's modules need (built from the config file's ``model``)."""
  vision: SiglipConfig
  pixel: rvq.RVQConfig
  semantic: rvq.RVQConfig
  decoder: vqgan.DecoderConfig
  disc: patchgan.PatchGANConfig
  pixel_layer: int = 6
  shortcut_layer: Optional[int] = 4        # None: no shortcut (the first release)
  shortcut_scale: float = 0.6
  semantic_layer: int = 26
  use_lpips: bool = True
  dtype: Any = jnp.float32

  @property
  def width(self) -> int:
    return self.vision.stack.d_model

  def projection(self, down: bool, dim: int) -> ProjectionConfig:
    w = self.width
    return ProjectionConfig(in_dim=w if down else dim, out_dim=dim if down else w,
                            dtype=self.dtype)


class Tokenizer(nn.Module):
  """Tower, projections, the two quantisers and the pixel decoder."""
  cfg: DualTokenConfig

  def setup(self):
    c = self.cfg
    self.tower = DualTokenTower(c.vision, pixel_layer=c.pixel_layer,
                                shortcut_layer=c.shortcut_layer,
                                semantic_layer=c.semantic_layer)
    self.prequant_pix = QuantProjection(c.projection(True, c.pixel.dim))
    self.prequant_sem = QuantProjection(c.projection(True, c.semantic.dim))
    if c.shortcut_layer is not None:
      self.prequant_shortcut = QuantProjection(c.projection(True, c.pixel.dim))
    self.quantizer_pix = rvq.ResidualVQ(c.pixel)
    self.quantizer_sem = rvq.ResidualVQ(c.semantic)
    self.postquant_pix = QuantProjection(c.projection(False, c.pixel.dim), causal=True)
    self.postquant_sem = QuantProjection(c.projection(False, c.semantic.dim), causal=True)
    self.decoder = vqgan.PixelDecoder(c.decoder)

  def pre_quant(self, images):
    """``(pixel [b, n, dp], semantic [b, n, ds], semantic layer output [b, n, width])``."""
    f = self.tower.features(images)
    pix = self.prequant_pix(f["pixel"])
    if self.cfg.shortcut_layer is not None:
      pix = pix + self.cfg.shortcut_scale * self.prequant_shortcut(f["shortcut"])
    return pix, self.prequant_sem(f["semantic"]), f["semantic"]

  def forward(self, images, update: bool = False, rng=None):
    """The training forward: reconstructions, semantic outputs, codes and commitment."""
    pix, sem, _ = self.pre_quant(images)
    k_pix, k_sem = (None, None) if rng is None else tuple(jax.random.split(rng))
    qp = self.quantizer_pix(pix, update=update, rng=k_pix)
    qs = self.quantizer_sem(sem, update=update, rng=k_sem)
    sem_up = self.postquant_sem(qs["quantized"])
    _, pooled = self.tower.head(sem_up)
    recon = self.decoder(self.postquant_pix(qp["quantized"]))
    return {"recon": recon.astype(jnp.float32), "semantic": sem_up, "pooled": pooled,
            "pixel_codes": qp["codes"], "semantic_codes": qs["codes"],
            "commit_pix": qp["loss"], "commit_sem": qs["loss"]}

  def encode(self, images):
    pix, sem, _ = self.pre_quant(images)
    qp, qs = self.quantizer_pix(pix), self.quantizer_sem(sem)
    sem_up = self.postquant_sem(qs["quantized"])
    _, pooled = self.tower.head(sem_up)
    return {"pixel_codes": qp["codes"], "semantic_codes": qs["codes"],
            "semantic_features": sem_up, "pooled": pooled}

  def decode(self, pixel_codes):
    q = self.quantizer_pix.decode(pixel_codes).astype(self.cfg.dtype)
    return self.decoder(self.postquant_pix(q)).astype(jnp.float32)

  def __call__(self, images):
    out = self.forward(images)
    self.decode(out["pixel_codes"])
    return out


class DualTokenModel(nn.Module):
  """The tokenizer plus what trains it: ``teacher`` (the tower's frozen initial copy),
  ``lpips`` (frozen) and ``disc``."""
  cfg: DualTokenConfig

  def setup(self):
    c = self.cfg
    self.tokenizer = Tokenizer(c)
    self.teacher = DualTokenTower(c.vision, pixel_layer=c.pixel_layer, shortcut_layer=None,
                                  semantic_layer=c.semantic_layer)
    if c.use_lpips:
      self.lpips = lpips_lib.LPIPS(lpips_lib.LPIPSConfig(dtype=c.dtype))
    self.disc = patchgan.PatchGAN(c.disc)

  def forward(self, images, update: bool = False, rng=None):
    return self.tokenizer.forward(images, update=update, rng=rng)

  def targets(self, images):
    """The frozen teacher's semantic-layer features and pooled output (gradient stopped)."""
    f = self.teacher.features(images)
    _, pooled = self.teacher.head(f["semantic"])
    return jax.lax.stop_gradient(f["semantic"]), jax.lax.stop_gradient(pooled)

  def perceptual(self, x, y):
    return self.lpips(x, y)

  def discriminate(self, images):
    return self.disc(images)

  def encode(self, images):
    return self.tokenizer.encode(images)

  def decode(self, pixel_codes):
    return self.tokenizer.decode(pixel_codes)

  def __call__(self, images):
    out = self.tokenizer(images)
    self.targets(images)
    if self.cfg.use_lpips:
      self.perceptual(images, images)
    self.discriminate(images)
    return out

"""DualToken's tokenizer (arXiv 2503.14324) as an mmjax system: one SigLIP tower, two
residual-VQ vocabularies, a pixel decoder, trained by two objectives in one step.

The method, in the order the loss computes it (``generator_loss``):

1. The tower (which trains) reads the image. Its layer-6 output (+ 0.6 x the projected
   layer-4 output, the newer release's shortcut) is projected to the pixel code dimension;
   its layer-26 output to the semantic one (attention blocks with heads averaged).
2. Each goes through its own residual VQ (8 depths sharing one codebook per vocabulary,
   fp32 distances, straight-through); the codebooks follow the batch by EMA (decay 0.99)
   with dead codes restarted from the batch. Their new values are the loss's ``mutables``.
3. The quantised semantic features are projected back (causal attention over raster order)
   and replace layer 26's output: layer 27, the post-LayerNorm and the MAP head follow. The
   semantic loss pulls them toward a **frozen copy of the initial tower**:
   ``5 (MSE - cos)`` on the layer-26 features plus ``(MSE - cos)`` on the pooled output.
4. The quantised pixel features are projected back and decoded to the image (bilinear
   27 -> 24, ``post_quant_conv``, a VQGAN decoder): ``5 MSE + 1 LPIPS``.
5. ``5 (commit_pix + commit_sem)``: the commitment of the encoder to its cumulative codes.
6. From ``loss.gan_start`` on, ``g x 0.75 x (-mean D(recon))``, with the adaptive weight
   ``g = |grad(MSE + LPIPS)| / |grad(L_gen)|`` at the decoder's last convolution, clamped to
   [0.3, 10].

The second objective, ``disc`` (its own Adam, betas (0.5, 0.9)), trains the discriminator
with the leaky hinge loss on the images against the reconstructions the first objective
handed on, scaled by 0.75, from the same step.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import BadRecord, image as image_ops
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.models import lpips as lpips_lib, patchgan, rvq, siglip, vqgan
from mmjax.systems.base import System
from mmjax.systems.dualtoken import eval as dt_eval
from mmjax.systems.dualtoken.model import DualTokenConfig, DualTokenModel
from mmjax.train.objectives import Objective, layer_grads, starts_at

INITS = ("random", "siglip", "release")
LAST_LAYER = "tokenizer/decoder/decoder/conv_out/kernel"   # where the adaptive weight is taken


def build_config(config) -> DualTokenConfig:
  """``DualTokenConfig`` from the config file's ``model`` section."""
  m, dtype = config.model, jnp.dtype(config.dtype)
  vision = siglip.from_hf_config(m.vision_config.to_dict(), dtype=dtype,
                                 scan_layers=config.scan_layers,
                                 remat_policy=config.remat_policy)
  if vision.image_size != config.data.resolution:
    raise ConfigError(f"data.resolution = {config.data.resolution} but the tower reads "
                      f"{vision.image_size} px images (model.vision_config.image_size)")
  def quantizer(q, schedule):
    return rvq.RVQConfig(depths=m.depths, codebook_size=q.codebook_size, dim=q.dim,
                         decay=m.decay, eps=m.eps, restart_dead_codes=m.restart_dead_codes,
                         ema_schedule=schedule, distance_chunk=m.distance_chunk,
                         search_block=m.search_block)
  d = m.decoder
  decoder = vqgan.DecoderConfig(
      ch=d.ch, ch_mult=tuple(d.ch_mult), num_res_blocks=d.num_res_blocks,
      attn_resolutions=tuple(d.attn_resolutions), resolution=config.data.resolution,
      decoder_in_channels=d.in_channels, hidden_size=vision.stack.d_model,
      decoder_latent_shape=(d.latent, d.latent), num_groups=d.num_groups, dtype=dtype,
      remat=config.remat_policy != "none")
  disc = patchgan.PatchGANConfig(ndf=m.disc.ndf, n_layers=m.disc.n_layers,
                                 num_groups=m.disc.num_groups, dtype=dtype)
  return DualTokenConfig(
      vision=vision, pixel=quantizer(m.pixel, m.pixel.ema_schedule),
      semantic=quantizer(m.semantic, m.semantic.ema_schedule), decoder=decoder, disc=disc,
      pixel_layer=m.pixel_layer, shortcut_layer=m.shortcut_layer if m.shortcut_scale else None,
      shortcut_scale=m.shortcut_scale, semantic_layer=m.semantic_layer,
      use_lpips=config.loss.lpips > 0, dtype=dtype)


def mse_minus_cos(x, y):
  """``MSE(x, y) - mean cos(x, y)`` over the last axis (fp32)."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-8)
  return jnp.mean((x - y) ** 2) - jnp.mean(cos)


class DualToken(System):
  """The tokenizer system; see the module docstring."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if m.init not in INITS:
      raise ConfigError(f"model.init = {m.init!r}; expected one of {INITS}")
    self.cfg = build_config(config)
    self.model = DualTokenModel(self.cfg)
    self.resolution = config.data.resolution
    self._check_checkpoints()

  def _check_checkpoints(self):
    m, missing = self.config.model, {}
    need = {"siglip": ["siglip_path"], "release": ["release_path"]}.get(m.init, [])
    if self.cfg.use_lpips and (m.init != "random" or m.lpips_vgg_path):
      need += ["lpips_vgg_path"]    # init=random without it: a random VGG (AOT, smoke tests)
    for field in need:
      path = m[field]
      if not path or not os.path.exists(path):
        missing[f"model.{field}"] = path
    if missing:
      raise MissingCheckpoint(missing, "use configs/dualtoken.py:demo for a self-contained "
                              "CPU run, or --config.model.init=random --config.loss.lpips=0")

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    image = image_ops.decode_image(record["image"])
    lo, hi = self.config.model.crop_scale
    if hi > 0:
      image = random_resized_crop(image, self.resolution, (lo, hi), rng)
    elif image.shape[:2] != (self.resolution, self.resolution):
      image = image_ops.resize_crop(image, self.resolution)
    return {"images": image_ops.to_float(image)}

  def dummy_batch(self, batch_size):
    r = self.resolution
    return {"images": np.zeros((batch_size, r, r, 3), np.float32)}

  # -- parameters ---------------------------------------------------------------------------
  def init(self, rng, batch):
    variables = self.model.init(rng, batch["images"][:1])
    params = dict(variables["params"])
    tok = dict(params["tokenizer"])
    m = self.config.model
    if m.init == "random":
      tok["tower"] = siglip.reference_init(tok["tower"], jax.random.fold_in(rng, 1))
    elif m.init == "siglip":
      from mmjax.systems.dualtoken import checkpoint  # pylint: disable=import-outside-toplevel
      tok["tower"] = checkpoint.tower_from_siglip_dir(tok["tower"], m.siglip_path,
                                                     self.cfg.semantic_layer)
    params["tokenizer"] = tok
    if m.init == "release":
      from mmjax.systems.dualtoken import checkpoint  # pylint: disable=import-outside-toplevel
      params, codebook = checkpoint.load_into_params(self, params, m.release_path)
      variables = {**variables, "codebook": codebook}
    params["teacher"] = tok["tower"] if m.init != "release" else params["tokenizer"]["tower"]
    if self.cfg.use_lpips and m.lpips_vgg_path:   # ~15M frozen params read on the host
      loaded = lpips_lib.load_lpips(m.lpips_vgg_path, m.lpips_lin_path or None)
      params["lpips"] = jax.tree.map(
          lambda box, v: box.replace_boxed(jnp.asarray(v)) if isinstance(box, nn.Partitioned)
          else jnp.asarray(v), params["lpips"], loaded,
          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {**variables, "params": params}

  def init_variables(self, rng):
    """Unboxed params and codebooks of a fresh init (the trainer's seed gives step 0)."""
    return nn.unbox(self._init_jit(rng, self.dummy_batch(1)))

  @functools.cached_property
  def _init_jit(self):
    return jax.jit(self.init)

  def trainable_mask(self, params):
    """The teacher and LPIPS are frozen; the tokenizer and the discriminator train."""
    return {k: jax.tree.map(lambda _, k=k: k in ("tokenizer", "disc"), v)
            for k, v in params.items()}

  def objectives(self):
    return [Objective("main", self.generator_loss),
            Objective("disc", self.disc_loss, params=r"disc/.*")]

  # -- the method ---------------------------------------------------------------------------
  def generator_loss(self, params, batch, rng, ctx):
    w, x = self.config.loss, batch["images"]
    model = self.model

    def terms(p):
      out, new = model.apply({"params": p, **ctx.mutables}, x, update=True, rng=rng,
                             method=DualTokenModel.forward, mutable=["codebook"])
      rec = jnp.mean((out["recon"] - x) ** 2)
      perc = (jnp.mean(model.apply({"params": p}, out["recon"], x,
                                   method=DualTokenModel.perceptual))
              if self.cfg.use_lpips else jnp.zeros((), jnp.float32))
      gen = patchgan.generator_loss(model.apply({"params": p}, out["recon"],
                                                method=DualTokenModel.discriminate))
      return (rec + w.lpips * perc, gen), (out, new, rec, perc)

    (nll, gen), (g_nll, g_gen), (out, new, rec, perc) = layer_grads(
        terms, params, LAST_LAYER, has_aux=True)
    weight = patchgan.adaptive_weight(g_nll, g_gen, lo=w.adaptive_min, hi=w.adaptive_max)
    gan_on = starts_at(ctx.step, w.gan_start)
    t_sem, t_pool = model.apply({"params": params}, x, method=DualTokenModel.targets)
    sem_feature = mse_minus_cos(out["semantic"], t_sem)
    sem_pooled = (mse_minus_cos(out["pooled"], t_pool) if out["pooled"] is not None
                  else jnp.zeros((), jnp.float32))
    loss = (w.semantic_feature * sem_feature + w.semantic_pooled * sem_pooled
            + w.commit * (out["commit_pix"] + out["commit_sem"])
            + w.recon * rec + w.lpips * perc + gan_on * weight * w.gan * gen)
    del nll
    return loss, {
        "recon_mse": rec, "lpips": perc, "semantic_feature": sem_feature,
        "semantic_pooled": sem_pooled, "commit_pix": out["commit_pix"],
        "commit_sem": out["commit_sem"], "gan_generator": gen, "gan_weight": weight,
        "gan_on": gan_on,
        "usage_pix": jnp.min(rvq.usage(out["pixel_codes"], self.cfg.pixel.codebook_size)),
        "usage_sem": jnp.min(rvq.usage(out["semantic_codes"],
                                       self.cfg.semantic.codebook_size)),
        "mutables": new, "carry": {"recon": out["recon"]}}

  def disc_loss(self, params, batch, rng, ctx):
    del rng
    w = self.config.loss
    disc = lambda images: self.model.apply({"params": params}, images,  # noqa: E731
                                           method=DualTokenModel.discriminate)
    real, fake = disc(batch["images"]), disc(ctx.carry["main"]["recon"])
    hinge = patchgan.hinge_d_loss(real, fake, negative_slope=w.hinge_slope)
    return starts_at(ctx.step, w.gan_start) * w.disc * hinge, {
        "hinge": hinge, "logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake)}

  # -- FLOPs --------------------------------------------------------------------------------
  def flops_per_step(self, batch_size):
    """``mmjax.train.flops``: tower, projections, decoder and discriminator train; the
    teacher runs forward only; LPIPS passes gradients to the reconstruction."""
    from mmjax.systems.dualtoken import flops  # pylint: disable=import-outside-toplevel
    return flops.train_flops(self.cfg, batch_size)

  # -- tokenizer API ------------------------------------------------------------------------
  @functools.cached_property
  def _encode(self):
    return jax.jit(functools.partial(self.model.apply, method=DualTokenModel.encode))

  @functools.cached_property
  def _decode(self):
    return jax.jit(functools.partial(self.model.apply, method=DualTokenModel.decode))

  def encode(self, variables, images):
    """``images [b, H, W, 3]`` in [-1, 1] -> ``pixel_codes``, ``semantic_codes`` ``[b, n,
    D]``, ``semantic_features [b, n, width]``, ``pooled [b, width]``."""
    return self._encode(variables, jnp.asarray(images, jnp.float32))

  def decode(self, variables, pixel_codes):
    """``pixel_codes [b, n, D]`` -> images ``[b, H, W, 3]`` (in [-1, 1] once trained)."""
    return self._decode(variables, jnp.asarray(pixel_codes, jnp.int32))

  def modes(self):
    return {"sample": functools.partial(dt_eval.sample_mode, self),
            "eval": functools.partial(dt_eval.eval_mode, self),
            "export": functools.partial(dt_eval.export_mode, self)}


def random_resized_crop(image: np.ndarray, size: int, scale: tuple, rng) -> np.ndarray:
  """A square crop covering a uniform ``scale`` fraction of the area (aspect 1), at a
  uniform position, resized to ``size`` (torchvision's RandomResizedCrop with ratio 1)."""
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  h, w = image.shape[:2]
  area = h * w * rng.uniform(*scale)
  side = int(min(round(np.sqrt(area)), h, w))
  if side < 1:
    raise BadRecord(f"image {image.shape} too small to crop")
  top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  return image_ops.resize(image[top:top + side, left:left + side], size)


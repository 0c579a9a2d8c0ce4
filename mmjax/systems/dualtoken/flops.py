"""Analytic training FLOPs of the DualToken tokenizer with the one counter
(``mmjax.train.flops``): the tower, projections and pixel decoder train (``TRAINED``; the
patch convolution needs no input gradient), the teacher tower and the quantisers' nearest-code
search run forward only (``FORWARD``), LPIPS and the discriminator pass gradients to the
reconstruction in the generator objective (``THROUGH`` on the reconstruction, ``FORWARD`` on
the real image), the discriminator trains on both in its own objective.

Example::

    flops = train_flops(system.cfg, batch_size=256)
"""
from __future__ import annotations

from mmjax.models import lpips, vqgan
from mmjax.train import flops as fl


def projection_macs(in_dim: int, out_dim: int, tokens: float, keys: int,
                    mlp_ratio: float = 2.0) -> float:
  """One ``QuantProjection``: linear shortcut, q/k/v at the wider width, attention products,
  ``attn.proj``, the GeGLU MLP at ``out_dim``."""
  wide, narrow = max(in_dim, out_dim), min(in_dim, out_dim)
  hidden = int(out_dim * mlp_ratio)
  proj_out = narrow if in_dim > out_dim else wide
  return (fl.dense_macs(tokens, in_dim, out_dim) + fl.dense_macs(tokens, in_dim, 3 * wide)
          + 2.0 * tokens * keys * wide + fl.dense_macs(tokens, proj_out, proj_out)
          + 3 * fl.dense_macs(tokens, out_dim, hidden))


def _resblock(hw: float, cin: int, cout: int, k1: int = 3) -> float:
  macs = fl.conv_macs(hw, k1, cin, cout) + fl.conv_macs(hw, 3, cout, cout)
  return macs + (fl.conv_macs(hw, 1, cin, cout) if cin != cout else 0.0)


def _attn(hw: float, c: int) -> float:
  return 4 * fl.dense_macs(hw, c, c) + 2.0 * hw * hw * c


def decoder_macs(c: vqgan.DecoderConfig) -> float:
  """One image through ``PixelDecoder``: ``post_quant_conv``, ``conv_in``, the mid block,
  every up level (ResBlocks, attention where configured, upsampling conv), ``conv_out``."""
  res = c.lowest_resolution
  macs = 0.0
  if c.hidden_size is not None:
    macs += _resblock(res * res, c.hidden_size, c.decoder_in_channels, k1=1)
  ch = c.ch * c.ch_mult[-1]
  macs += fl.conv_macs(res * res, 3, c.decoder_in_channels, ch)
  macs += 2 * _resblock(res * res, ch, ch) + _attn(res * res, ch)
  for level in reversed(range(len(c.ch_mult))):
    out = c.ch * c.ch_mult[level]
    for _ in range(c.num_res_blocks + 1):
      macs += _resblock(res * res, ch, out)
      ch = out
      if res in c.attn_resolutions:
        macs += _attn(res * res, ch)
    if level:
      res *= 2
      if c.resamp_with_conv:
        macs += fl.conv_macs(res * res, 3, ch, ch)
  return macs + fl.conv_macs(res * res, 3, ch, c.out_ch)


def vgg_macs(size: int) -> float:
  """LPIPS's VGG16 features (13 3x3 convolutions, max-pool between stages) on one image,
  plus the 1x1 heads."""
  macs, cin, hw = 0.0, 3, size * size
  for stage, width in zip(lpips.STAGES, lpips.WIDTHS):
    for _ in stage:
      macs += fl.conv_macs(hw, 3, cin, width)
      cin = width
    macs += fl.dense_macs(hw, width, 1)
    hw //= 4
  return macs


def disc_macs(c, size: int) -> float:
  """The discriminator on one image: stride-2 ``conv_in``, one-conv blocks with a 1x1
  shortcut, ``conv_out``."""
  w = c.widths
  side = -(-size // 2)
  macs = fl.conv_macs(side * side, 3, c.in_channels, w[0])
  for n in range(1, c.n_layers + 1):
    if n < c.n_layers:
      side = -(-side // 2)
    macs += fl.conv_macs(side * side, 3, w[n - 1], w[n]) + fl.conv_macs(side * side, 1,
                                                                         w[n - 1], w[n])
  return macs + fl.conv_macs(side * side, 3, w[-1], 1)


def train_flops(cfg, batch_size: int) -> float:
  """One training step of both objectives for ``batch_size`` images."""
  v, b = cfg.vision, batch_size
  n, s = v.num_patches, v.stack
  tokens = b * n
  low = fl.stack_macs(s.replace(num_layers=cfg.semantic_layer), tokens, n)
  top = fl.stack_macs(s.replace(num_layers=s.num_layers - cfg.semantic_layer), tokens, n)
  head = fl.dense_macs(tokens, s.d_model, s.d_model) * 3 if v.use_head else 0.0   # MAP k/v/mlp
  patch = fl.dense_macs(tokens, v.patch_size ** 2 * v.num_channels, s.d_model)
  w = cfg.width
  proj = (projection_macs(w, cfg.pixel.dim, tokens, n) + projection_macs(w, cfg.semantic.dim,
                                                                         tokens, n)
          + projection_macs(cfg.pixel.dim, w, tokens, n)
          + projection_macs(cfg.semantic.dim, w, tokens, n))
  if cfg.shortcut_layer is not None:
    proj += projection_macs(w, cfg.pixel.dim, tokens, n)
  search = sum(tokens * q.depths * q.codebook_size * q.dim for q in (cfg.pixel, cfg.semantic))
  size = cfg.decoder.resolution
  trained = low + top + head + proj + b * decoder_macs(cfg.decoder)
  total = (fl.flops(trained, fl.TRAINED) + fl.flops(patch, fl.THROUGH)
           + fl.flops(search + patch + low + top + head, fl.FORWARD))        # the teacher
  if cfg.use_lpips:
    total += fl.flops(b * vgg_macs(size), fl.THROUGH) + fl.flops(b * vgg_macs(size),
                                                                 fl.FORWARD)
  d = disc_macs(cfg.disc, size)
  total += fl.flops(b * d, fl.THROUGH)                     # generator objective, on recon
  total += fl.flops(2 * b * d, fl.TRAINED)                 # discriminator objective
  return total


def encode_macs(cfg, images: float) -> float:
  """The frozen tokenizer's encoder (tower, pre-projections, both searches, the semantic
  up-projection and head) on ``images`` images: what the unified model runs per step when
  it tokenizes on the fly."""
  v = cfg.vision
  n, s = v.num_patches, v.stack
  tokens = images * n
  low = fl.stack_macs(s.replace(num_layers=cfg.semantic_layer), tokens, n)
  top = fl.stack_macs(s.replace(num_layers=s.num_layers - cfg.semantic_layer), tokens, n)
  head = fl.dense_macs(tokens, s.d_model, s.d_model) * 3 if v.use_head else 0.0
  patch = fl.dense_macs(tokens, v.patch_size ** 2 * v.num_channels, s.d_model)
  w = cfg.width
  proj = (projection_macs(w, cfg.pixel.dim, tokens, n) + projection_macs(w, cfg.semantic.dim,
                                                                         tokens, n)
          + projection_macs(cfg.semantic.dim, w, tokens, n))
  if cfg.shortcut_layer is not None:
    proj += projection_macs(w, cfg.pixel.dim, tokens, n)
  search = sum(tokens * q.depths * q.codebook_size * q.dim for q in (cfg.pixel, cfg.semantic))
  return patch + low + top + head + proj + search


def unified_train_flops(system, batch_size: int) -> float:
  """One unified-model step: the LM over the sequence (and its head over every row), the
  visual embedding, both depth heads over the ``N x D`` visual targets, all trained; the
  frozen tokenizer forward only (unless the batch is pre-tokenised)."""
  c, b = system.cfg, batch_size
  length, n, depths = system.prompter.length, c.positions, c.depths
  lm = c.lm.stack
  tokens = b * length
  trained = (fl.stack_macs(lm, tokens, length) + fl.dense_macs(tokens, lm.d_model,
                                                               c.lm.vocab_size)
             + fl.dense_macs(b * n, 2 * c.code_embed_dim, lm.d_model))
  for head in (c.pixel_head, c.semantic_head):
    s, rows = head.stack, b * n
    trained += (fl.dense_macs(rows, lm.d_model, s.mlp_dim) + fl.dense_macs(rows, s.mlp_dim,
                                                                            s.d_model)
                + fl.dense_macs(rows * (depths - 1), c.code_embed_dim, s.mlp_dim)
                + fl.dense_macs(rows * (depths - 1), s.mlp_dim, s.d_model)
                + fl.stack_macs(s, rows * depths, depths)
                + fl.dense_macs(rows * depths, s.d_model, head.codebook_size))
  total = fl.flops(trained, fl.TRAINED)
  if not system.config.data.pretokenized:
    total += fl.flops(encode_macs(c.tokenizer, b), fl.FORWARD)
  return total

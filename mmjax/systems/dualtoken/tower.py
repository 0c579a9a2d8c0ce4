"""DualToken's vision tower: SigLIP / SigLIP2 (``mmjax.models.siglip``) split at the semantic
layer.

* ``features(images)``: one pass of the first ``semantic_layer`` layers (the ``encoder``
  stack) returning only the requested layer outputs, by ``TransformerStack``'s ``tap_layers``
  (no stack of every layer): ``pixel`` = output after ``pixel_layer`` layers (6), ``shortcut``
  after ``shortcut_layer`` (4, the newer release; None = off), ``semantic`` after
  ``semantic_layer`` (26). Layer counts follow transformers' ``hidden_states[k]``.
* ``head(semantic_like)``: the remaining layers (the ``encoder_top`` stack: layers
  ``semantic_layer .. L-1``, i.e. so400m's 27th), ``post_layernorm`` and the MAP head:
  ``(last_hidden_state, pooled)``. The tokenizer passes the up-projected quantised semantic
  features here; passing ``features(...)['semantic']`` unchanged gives SigLIP's own outputs.
* Parameters: SigLIP's names, with the encoder's layers split in two (scanned: the stacked
  ``layers`` axis cut at ``semantic_layer``; unrolled: ``layers_N`` renumbered in the top
  stack). ``tower_params_from_siglip`` / ``siglip_params_from_tower`` convert, so a
  transformers ``SiglipVisionModel``, our ``siglip`` params, or the release's
  ``siglip_model.vision_model.*`` tensors (read through ``siglip.hf_table(cfg,
  prefix='siglip_model.vision_model.')``) load into the tower; ``siglip.reference_init``
  re-draws a fresh tower's params the transformers way (it reads SigLIP's leaf names, which
  the tower keeps).
* Frozen teacher: the semantic loss compares with a frozen copy of the initial tower. Nothing
  here is stateful: keep the initial params tree (outside the optimizer) and call
  ``features`` / ``head`` with it under ``jax.lax.stop_gradient``.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import siglip
    from mmjax.systems.dualtoken.tower import DualTokenTower
    cfg = siglip.from_hf_config({"hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 5, "num_attention_heads": 4,
                                 "image_size": 28, "patch_size": 7})
    tower = DualTokenTower(cfg, pixel_layer=2, shortcut_layer=1, semantic_layer=4)
    images = jnp.zeros((1, 28, 28, 3))
    params = tower.init(jax.random.key(0), images)["params"]
    f = tower.apply({"params": params}, images, method="features")
    f["pixel"].shape, f["shortcut"].shape, f["semantic"].shape     # (1, 16, 32) each
    last, pooled = tower.apply({"params": params}, f["semantic"], method="head")
    teacher = jax.lax.stop_gradient(params)                        # the frozen copy
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.core.transformer import LAYERS
from mmjax.models.siglip import MapHead, SiglipConfig, embed_patches

PARTS = ("all", "features", "head")
ACT = ("act_batch", "act_length", "act_embed")


class DualTokenTower(nn.Module):
  """SigLIP split at ``semantic_layer``; see the module docstring.

  ``__call__(x, part='all')``: ``'features'`` (images -> dict ``pixel``, ``shortcut`` when
  set, ``semantic``), ``'head'`` (``[b, n, width]`` -> ``(last_hidden_state, pooled)``;
  pooled is None without a MAP head), ``'all'`` (images -> the features plus
  ``last_hidden_state`` and ``pooler_output`` of the semantic features; ``init`` uses this).
  """
  config: SiglipConfig
  pixel_layer: int = 6
  shortcut_layer: Optional[int] = 4
  semantic_layer: int = 26

  def _check(self):
    L = self.config.stack.num_layers
    taps = {"pixel_layer": self.pixel_layer, "shortcut_layer": self.shortcut_layer}
    if not 1 <= self.semantic_layer <= L:
      raise ValueError(f"semantic_layer={self.semantic_layer} outside 1..{L}")
    bad = {k: v for k, v in taps.items() if v is not None and not 0 <= v <= self.semantic_layer}
    if bad:
      raise ValueError(f"{bad} must lie in 0..semantic_layer={self.semantic_layer}")

  @property
  def top_layers(self) -> int:
    """Layers after the semantic layer (``encoder_top``)."""
    return self.config.stack.num_layers - self.semantic_layer

  def features(self, images, deterministic: bool = True) -> dict:
    """``images [b, H, W, C]`` (SigLIP-normalised) -> ``{'pixel', 'shortcut'?, 'semantic'}``,
    each ``[b, patches, width]``, from one pass of the ``encoder`` stack."""
    return self(images, part="features", deterministic=deterministic)

  def head(self, semantic_like, deterministic: bool = True):
    """``[b, patches, width]`` in place of the semantic layer's output -> ``(last_hidden_state
    [b, patches, width], pooled [b, width])`` through ``encoder_top``, post-LN, MAP head."""
    return self(semantic_like, part="head", deterministic=deterministic)

  def _embed(self, images):
    """SigLIP's patch embedding plus positions (``siglip.embed_patches``: its names, maths)."""
    return embed_patches(self, self.config, images)

  @nn.compact
  def __call__(self, x, part: str = "all", deterministic: bool = True):
    if part not in PARTS:
      raise ValueError(f"part {part!r} is not one of {PARTS}")
    self._check()
    c = self.config.stack
    out = {}
    if part != "head":
      taps = (self.pixel_layer,) + (() if self.shortcut_layer is None else
                                    (self.shortcut_layer,))
      h, tapped = core.TransformerStack(c.replace(num_layers=self.semantic_layer),
                                        name="encoder")(
          self._embed(x), mask=None, deterministic=deterministic, tap_layers=taps)
      out = {"pixel": tapped[0], "semantic": h}
      if self.shortcut_layer is not None:
        out["shortcut"] = tapped[1]
      if part == "features":
        return out
      x = h
    h = nn.with_logical_constraint(x.astype(c.dtype), ACT)
    if self.top_layers:
      h = core.TransformerStack(c.replace(num_layers=self.top_layers), name="encoder_top")(
          h, mask=None, deterministic=deterministic)
    last = core.LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                          name="post_layernorm")(h)
    pooled = MapHead(c, name="head")(last) if self.config.use_head else None
    if part == "head":
      return last, pooled
    return {**out, "last_hidden_state": last, "pooler_output": pooled}


# ----------------------------------------------------------------------------- params
def _map_leaves(fn, tree):
  """``fn`` on every array of a (boxed or plain) tree, boxes kept."""
  def one(leaf):
    if isinstance(leaf, nn.meta.AxisMetadata):
      return leaf.replace_boxed(fn(leaf.unbox(apply_constraint=False)
                                   if isinstance(leaf, nn.Partitioned) else leaf.unbox()))
    return fn(leaf)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _layer_names(stack: dict) -> list:
  return sorted((k for k in stack if k.startswith(LAYERS + "_")), key=lambda k: int(k[7:]))


def tower_params_from_siglip(siglip_params: dict, semantic_layer: int = 26) -> dict:
  """Our ``SiglipVision`` params (scanned ``encoder/layers`` or unrolled ``layers_N``; boxed
  or not) -> ``DualTokenTower`` params: layers ``< semantic_layer`` stay in ``encoder``, the
  rest go to ``encoder_top`` (renumbered from 0 when unrolled). Nothing is copied twice.

  Example::

    tower_p = tower_params_from_siglip(siglip_p, semantic_layer=26)   # so400m: 26 + 1 layers
  """
  params = dict(siglip_params)
  enc = params.pop("encoder")
  s = semantic_layer
  if LAYERS in enc:
    n = jax.tree.leaves(_map_leaves(lambda a: a, enc[LAYERS]),
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    n = (n.unbox(apply_constraint=False) if isinstance(n, nn.Partitioned) else n).shape[0]
    bottom = {LAYERS: _map_leaves(lambda a: a[:s], enc[LAYERS])}
    top = {LAYERS: _map_leaves(lambda a: a[s:], enc[LAYERS])}
  else:
    names = _layer_names(enc)
    n = len(names)
    bottom = {f"{LAYERS}_{i}": enc[f"{LAYERS}_{i}"] for i in range(min(s, n))}
    top = {f"{LAYERS}_{i - s}": enc[f"{LAYERS}_{i}"] for i in range(s, n)}
  if not 1 <= s <= n:
    raise ValueError(f"semantic_layer={s} outside 1..{n} (layers of these params)")
  params["encoder"] = bottom
  if s < n:
    params["encoder_top"] = top
  return params


def siglip_params_from_tower(tower_params: dict) -> dict:
  """Inverse of ``tower_params_from_siglip``: the ``SiglipVision`` params (layers joined)."""
  params = dict(tower_params)
  bottom, top = params.pop("encoder"), params.pop("encoder_top", None)
  if top is None:
    params["encoder"] = bottom
  elif LAYERS in bottom:
    params["encoder"] = {LAYERS: jax.tree.map(
        lambda a, b: (a.replace_boxed(jnp.concatenate([a.unbox(apply_constraint=False),
                                                       b.unbox(apply_constraint=False)]))
                      if isinstance(a, nn.Partitioned) else jnp.concatenate([a, b])),
        bottom[LAYERS], top[LAYERS], is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  else:
    s = len(_layer_names(bottom))
    params["encoder"] = {**bottom, **{f"{LAYERS}_{i + s}": top[f"{LAYERS}_{i}"]
                                      for i in range(len(_layer_names(top)))}}
  return params

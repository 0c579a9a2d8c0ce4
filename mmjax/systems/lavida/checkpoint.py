"""LaViDa's checkpoint layout (what the release's ``save_pretrained`` writes), as interop data.

``config.json``: ``model_type`` ``llava_llada`` / ``llava_dream``, the LM's fields plus
LLaVA's ``mm_*`` fields; tensors: the LM's own names (LLaDA ``model.transformer.*``, Dream
Qwen2 names), ``model.mm_projector.{0,2}.*``, ``model.image_newline`` and the SigLIP tower
under ``model.vision_tower.vision_tower.vision_model.*``. ``HF_FAMILY`` is the
``interop.tables.Family`` that ``mmjax.interop.hf`` finds under the family name ``lavida``
(its ``FAMILIES`` / ``MODEL_TYPES`` tables name this module); `export` writes the layout
(``--mode export``), `load_export` reads it back.

Our export differs from the release in two documented ways: it carries a ``vision_config``
(the tower, already cut to the feature layer: ``mm_vision_select_layer: -1``) and the image
placeholder id (``image_token_index``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.interop import hf as hf_io
from mmjax.interop.tables import IDENTITY, LINEAR, Family, Rule, prefixed
from mmjax.models import siglip
from mmjax.systems.lavida.data import BASE_TILE, GRID_PINPOINTS, VisionGeometry
from mmjax.systems.lavida.model import (BACKBONES, LavidaConfig, LavidaModel,
                                        vision_tower_config)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."   # LaViDa's checkpoint names


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> LavidaConfig:
  """``LavidaConfig`` from an exported LaViDa ``config.json`` (``llava_llada`` /
  ``llava_dream``); its vision tower already ends at the feature layer."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
            attention_impl=attention_impl)
  backbone = {"llava_llada": "llada", "llava_dream": "dream"}[hf["model_type"]]
  text = BACKBONES[backbone].from_hf_config(hf, scan_layers=scan_layers, **kw)
  vision = vision_tower_config(hf["vision_config"], **kw)
  tile = hf["vision_config"]["image_size"]
  pins = tuple((h * BASE_TILE // tile, w * BASE_TILE // tile)
               for h, w in hf.get("image_grid_pinpoints") or ())
  geometry = VisionGeometry(tile=tile, patch=vision.patch_size,
                            anyres=hf.get("image_aspect_ratio") == "anyres",
                            pool=hf.get("mm_spatial_pool_mode") == "bilinear",
                            pinpoints=pins or GRID_PINPOINTS)
  return LavidaConfig(vision=vision, text=text, geometry=geometry,
                      image_token_id=hf["image_token_index"],
                      projector_bias=hf.get("mm_projector_bias", True))


def to_hf_config(cfg: LavidaConfig) -> dict:
  """LaViDa's ``config.json``: the LLaDA (or Dream) fields plus the LLaVA multimodal ones."""
  backbone = cfg.text.family
  hf = BACKBONES[backbone].to_hf_config(cfg.text)
  geo, v = cfg.geometry, siglip.to_hf_config(cfg.vision)
  v.update(vision_use_head=False)
  hf.update(json.loads(cfg.hf_extra))
  hf.update({
      "architectures": ["LlavaLladaForMaskedDiffusion" if backbone == "llada"
                        else "LlavaDreamForMaskedDiffusion"],
      "model_type": f"llava_{backbone}", "vision_config": v,
      "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": cfg.vision.stack.d_model,
      "mm_projector_bias": cfg.projector_bias,
      "mm_vision_select_layer": -1,            # the exported tower ends at the feature layer
      "mm_vision_select_feature": "patch",
      "image_aspect_ratio": "anyres" if geo.anyres else "pad",
      "image_grid_pinpoints": [list(r) for r in geo.resolutions],
      "mm_patch_merge_type": "spatial_unpad" if geo.anyres else "flat",
      "mm_spatial_pool_mode": "bilinear" if geo.pool else None, "mm_spatial_pool_stride": 2,
      "image_token_index": cfg.image_token_id,
  })
  return hf


def hf_table(cfg: LavidaConfig) -> list:
  """LaViDa's stored names -> ours."""
  p = "model.mm_projector."
  text = hf_io.get_family(cfg.text.family).table(cfg.text)
  return (prefixed(text, "language_model/")
          + prefixed(siglip.hf_table(cfg.vision, VISION_PREFIX), "vision_tower/")
          + [Rule(p + "0.weight", "projector/fc1/kernel", LINEAR),
             Rule(p + "0.bias", "projector/fc1/bias", IDENTITY),
             Rule(p + "2.weight", "projector/fc2/kernel", LINEAR),
             Rule(p + "2.bias", "projector/fc2/bias", IDENTITY),
             Rule("model.image_newline", "image_newline", IDENTITY)])


def hf_ignore(cfg: LavidaConfig) -> tuple:
  return (siglip.hf_ignore(cfg.vision, VISION_PREFIX)
          + tuple(hf_io.get_family(cfg.text.family).ignore(cfg.text)))


def init_args(cfg: LavidaConfig) -> tuple:
  s = cfg.geometry.tile
  return (jnp.array([[cfg.image_token_id, 0]], jnp.int32), jnp.zeros((1, 1, s, s, 3)),
          jnp.zeros((1, 1), jnp.int32))


HF_FAMILY = Family(
    name="lavida", model_types=("llava_llada", "llava_dream"),
    architectures=("LlavaLladaForMaskedDiffusion", "LlavaDreamForMaskedDiffusion"),
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, make_model=LavidaModel,
    init_args=init_args, table=hf_table, ignore=hf_ignore)


def export(system, params, workdir: str) -> str:
  """WORKDIR/export: ``config.json`` + safetensors in LaViDa's layout and the tokenizer
  (``--mode export``); returns the directory."""
  path = os.path.join(workdir, "export")
  files = hf_io.save_hf(system.model, params, path)
  if system.prompter is not None and jax.process_index() == 0:
    system.prompter.tokenizer.save(os.path.join(path, "tokenizer.json"))
  print(f"export: {path} ({', '.join(files)})", flush=True)
  return path


def load_export(path: str, **overrides):
  """``(LavidaModel, params)`` from a directory written by ``--mode export``.

  Example::

    model, params = load_export("/tmp/lavida/export")
  """
  return hf_io.load_hf(path, **overrides)

"""LaViDa's checkpoint layout as released (what its ``save_pretrained`` writes), as interop data.

``config.json``: ``model_type`` ``llava_llada`` / ``llava_dream``, the LM's fields plus
LLaVA's ``mm_*`` fields (``mm_vision_tower`` a path or hub name, ``mm_projector_type:
mlp2x_gelu``, ``mm_vision_select_layer: -2``, ``image_aspect_ratio: anyres``,
``image_grid_pinpoints``, ``mm_patch_merge_type: spatial_unpad``, ``mm_spatial_pool_mode:
bilinear``). No ``vision_config``: LaViDa's code builds SigLIP-so400m from its defaults, so
the tower's sizes are read here from the tensors' shapes and the rest (heads, norm eps) are
so400m's; its depth is the number of layers *stored* (26: the release is already cut, and
``mm_vision_select_layer`` is not applied again). No image token id: images go where the ids
hold LaViDa's -200 sentinel (``data.IMAGE_TOKEN_INDEX``).

Tensors (bf16): the LM's own names (LLaDA ``model.transformer.*``, Dream Qwen2 names
``model.layers.*`` / ``lm_head``), ``model.mm_projector.{0,2}.*``, ``model.image_newline`` and
the SigLIP tower without its head under ``model.vision_tower.vision_tower.vision_model.*``.

``HF_FAMILY`` is the ``interop.tables.Family`` that ``mmjax.interop.hf`` finds under the
family name ``lavida`` (its ``FAMILIES`` / ``MODEL_TYPES`` tables name this module), so
``mmjax.interop.load(dir)`` reads a release; ``configs/lavida.py --config.model.init_from=DIR``
trains from one (`read_release`); `export` (``--mode export``) writes the same layout. Only a
tower that is not so400m-shaped (other heads or norm eps: the demo's) also gets a
``vision_config``, since the layout cannot describe it (LaViDa's code cannot build one).

Example::

    from mmjax import interop
    model, params = interop.load("/ckpt/lavida-llada-v1.0-instruct")
    logits = model.apply({"params": params}, ids, views, image_index)  # ids: -200 at images
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.interop import hf as hf_io
from mmjax.interop.dispatch import UnknownModelFormat, read_ref_config
from mmjax.interop.reader import Checkpoint, CheckpointMismatchError
from mmjax.interop.tables import IDENTITY, LINEAR, Family, Rule, prefixed
from mmjax.models import siglip
from mmjax.systems.lavida.data import (BASE_TILE, GRID_PINPOINTS, IMAGE_TOKEN_INDEX,
                                       VisionGeometry)
from mmjax.systems.lavida.model import (BACKBONES, LavidaConfig, LavidaModel,
                                        vision_tower_config)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."   # LaViDa's checkpoint names
SO400M_NAME = "google/siglip-so400m-patch14-384"
# LaViDa's SigLipVisionConfig defaults: the tower its code builds for every release
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
              num_attention_heads=16, image_size=384, patch_size=14, num_channels=3,
              layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
BACKBONE_OF = {"llava_llada": "llada", "llava_dream": "dream"}
NOT_CARRIED = ("vision_config", "image_token_index")   # written only when needed


# ----------------------------------------------------------------------------- reading
def tower_config(hf: dict, shapes: dict) -> dict:
  """The SigLIP tower's config (``SiglipVisionConfig`` fields) of a release whose tensor
  shapes are ``shapes``: width, MLP, patch, channels and the number of stored layers from
  the tensors; heads, norm eps and (when it gives the stored position count) the image size
  from ``hf['vision_config']`` if present, else SigLIP-so400m's."""
  v = VISION_PREFIX
  base = dict(SO400M, **hf.get("vision_config", {}))
  need = [v + "embeddings.patch_embedding.weight", v + "embeddings.position_embedding.weight",
          v + "encoder.layers.0.mlp.fc1.weight"]
  missing = [k for k in need if k not in shapes]
  if missing:
    raise CheckpointMismatchError(f"not a LaViDa checkpoint: no vision tower tensors "
                                  f"{missing}")
  width, channels, patch, _ = shapes[need[0]]
  positions = shapes[need[1]][0]
  grid = math.isqrt(positions)
  layer = re.compile(re.escape(v) + r"encoder\.layers\.(\d+)\.")
  layers = {int(m.group(1)) for m in map(layer.match, shapes) if m}
  if grid * grid != positions or layers != set(range(len(layers))):
    raise CheckpointMismatchError(f"the vision tower has {positions} positions (not a square "
                                  f"grid) or non-contiguous layers {sorted(layers)}")
  heads = base["num_attention_heads"]
  if width % heads:
    raise CheckpointMismatchError(
        f"the vision tower is {width} wide, which {heads} heads do not divide (config.json "
        f"has no vision_config, so SigLIP-so400m's head count is assumed): add "
        f"vision_config.num_attention_heads")
  image = base["image_size"] if base["image_size"] // patch == grid else grid * patch
  return dict(base, hidden_size=width, intermediate_size=shapes[need[2]][0],
              num_channels=channels, patch_size=patch, image_size=image,
              num_hidden_layers=len(layers), vision_use_head=False)


def complete_config(hf: dict, path: str) -> dict:
  """The release's ``config.json`` with ``vision_config`` filled in from the tensors of
  ``path`` (headers only; `tower_config`)."""
  return dict(hf, vision_config=tower_config(hf, Checkpoint(path).shapes))


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> LavidaConfig:
  """``LavidaConfig`` from a LaViDa ``config.json`` completed by `complete_config` (what
  ``mmjax.interop.load`` does); the tower ends at its last stored layer."""
  if "vision_config" not in hf:
    raise ValueError("a LaViDa config.json names no vision tower config: read the directory "
                     "with mmjax.interop.load(dir), which takes the tower's sizes from its "
                     "tensors")
  projector = hf.get("mm_projector_type", "mlp2x_gelu")
  pool_mode = hf.get("mm_spatial_pool_mode")
  if projector != "mlp2x_gelu" or pool_mode not in ("bilinear", None):
    raise NotImplementedError(f"mm_projector_type={projector!r}, mm_spatial_pool_mode="
                              f"{pool_mode!r} (LaViDa: mlp2x_gelu, bilinear)")
  kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
            attention_impl=attention_impl)
  text = BACKBONES[BACKBONE_OF[hf["model_type"]]].from_hf_config(
      hf, scan_layers=scan_layers, **kw)
  vision = vision_tower_config(hf["vision_config"], **kw)
  tile = vision.image_size
  pins = hf.get("image_grid_pinpoints") or ()
  pins = ast.literal_eval(pins) if isinstance(pins, str) else pins
  geometry = VisionGeometry(
      tile=tile, patch=vision.patch_size, anyres=hf.get("image_aspect_ratio") == "anyres",
      pool=pool_mode == "bilinear",
      pinpoints=tuple((h * BASE_TILE // tile, w * BASE_TILE // tile) for h, w in pins)
      or GRID_PINPOINTS)
  extra = {k: v for k, v in hf.items() if k not in NOT_CARRIED}
  return LavidaConfig(vision=vision, text=text, geometry=geometry,
                      image_token_id=hf.get("image_token_index", IMAGE_TOKEN_INDEX),
                      projector_bias=hf.get("mm_projector_bias", True),
                      hf_extra=json.dumps(extra, sort_keys=True))


def read_release(path: str, **kw) -> LavidaConfig:
  """The ``LavidaConfig`` of a LaViDa checkpoint directory (``kw``: `from_hf_config`'s)."""
  hf = read_ref_config(path)
  if hf.get("model_type") not in BACKBONE_OF:
    raise UnknownModelFormat(f"{path} is not a LaViDa checkpoint: model_type "
                     f"{hf.get('model_type')!r}, expected one of {sorted(BACKBONE_OF)}")
  return from_hf_config(complete_config(hf, path), **kw)


# ----------------------------------------------------------------------------- writing
def tower_is_implied(vision: siglip.SiglipConfig) -> bool:
  """Whether the release layout alone (no ``vision_config``) gives back ``vision``: its
  sizes come from the tensors, so its heads, norm eps and image size must be what
  `tower_config` assumes."""
  image = (SO400M["image_size"] if SO400M["image_size"] // vision.patch_size == vision.grid
           else vision.grid * vision.patch_size)
  return (vision.stack.num_heads == SO400M["num_attention_heads"] and image == vision.image_size
          and vision.stack.norm_eps == SO400M["layer_norm_eps"])


def to_hf_config(cfg: LavidaConfig) -> dict:
  """LaViDa's ``config.json``: the LLaDA (or Dream) fields plus LLaVA's multimodal ones."""
  backbone = cfg.text.family
  geo = cfg.geometry
  hf = json.loads(cfg.hf_extra)
  hf.update(BACKBONES[backbone].to_hf_config(cfg.text))
  hf.update({
      "architectures": ["LlavaLladaForMaskedDiffusion" if backbone == "llada"
                        else "LlavaDreamForMaskedDiffusion"],
      "model_type": f"llava_{backbone}",
      "mm_vision_tower": hf.get("mm_vision_tower", SO400M_NAME),
      "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": cfg.vision.stack.d_model,
      "mm_vision_select_layer": -2,            # the stored tower is already cut
      "mm_vision_select_feature": "patch", "use_mm_proj": True,
      "image_aspect_ratio": "anyres" if geo.anyres else "pad",
      "image_grid_pinpoints": [list(r) for r in geo.resolutions],
      "mm_patch_merge_type": "spatial_unpad" if geo.anyres else "flat",
      "mm_spatial_pool_mode": "bilinear" if geo.pool else None, "mm_spatial_pool_stride": 2,
  })
  if not cfg.projector_bias:
    hf["mm_projector_bias"] = False
  if not tower_is_implied(cfg.vision):
    hf["vision_config"] = dict(siglip.to_hf_config(cfg.vision), vision_use_head=False)
  if cfg.image_token_id != IMAGE_TOKEN_INDEX:
    hf["image_token_index"] = cfg.image_token_id
  return hf


# ----------------------------------------------------------------------------- the family
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
    name="lavida", model_types=tuple(BACKBONE_OF),
    architectures=("LlavaLladaForMaskedDiffusion", "LlavaDreamForMaskedDiffusion"),
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, make_model=LavidaModel,
    init_args=init_args, table=hf_table, ignore=hf_ignore, complete_config=complete_config)


def export(system, params, workdir: str) -> str:
  """WORKDIR/export: ``config.json`` + bf16 safetensors in LaViDa's layout and the tokenizer
  (``--mode export``); returns the directory."""
  path = os.path.join(workdir, "export")
  files = hf_io.save_hf(system.model, params, path, dtype=jnp.bfloat16)
  if system.prompter is not None and jax.process_index() == 0:
    system.prompter.tokenizer.save(os.path.join(path, "tokenizer.json"))
  print(f"export: {path} ({', '.join(files)})", flush=True)
  return path


def load_export(path: str, **overrides):
  """``(LavidaModel, params)`` from a LaViDa checkpoint directory: a release or what
  ``--mode export`` wrote (``mmjax.interop.load`` does the same).

  Example::

    model, params = load_export("/tmp/lavida/export")
  """
  return hf_io.load_hf(path, **overrides)

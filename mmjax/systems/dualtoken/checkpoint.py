"""The authors' checkpoint layout (the public DualToken tokenizer release), in and out.

A release is a directory with ``config.json`` (``model_type: rqvaesigliptransformer_model``,
the tokenizer's settings under ``rqvaesiglip``: ``layer_recon``, ``layer_sem``,
``layer_shortcut``, ``weight_shortcut``, ``ddconfig``, ``decoder_latent_shape``, ``vq_pix`` /
``vq_sem`` with ``code_shape``, ``n_embed``, ``embed_dim``, ``decay``, ``bottleneck_type``)
and open_clip-style ``epoch_N.pt`` pickles (``epoch``, ``name``, ``state_dict``,
``optimizer``). ``state_dict`` names (a ``module.`` prefix from DDP is dropped):

* ``siglip_model.vision_model.*`` (transformers SigLIP names; ``text_model.*``,
  ``logit_scale``, ``logit_bias`` of the full SiglipModel are not read);
* ``prequant_{pix,sem,shortcut}.*``, ``postquant_{pix,sem}.*`` (``projections.torch_table``);
* ``quantizer_{pix,sem}.codebooks.{d}.weight [K + 1, dim]`` (the last row is padding; the
  shared codebook appears once per depth) with ``cluster_size_ema [K]`` and
  ``embed_ema [K, dim]`` (the EMA sums);
* ``post_quant_conv.*``, ``decoder.*`` (``models.vqgan``).

``load_release(path)`` returns a ``ReleaseTokenizer`` (``encode`` / ``decode``);
``export_release(system, variables, path)`` writes the same layout (torch is imported only to
read or write ``.pt``). The SigLIP tower's own hyper-parameters (heads, MLP width) are not in
the release's config: they default to SigLIP2-so400m-patch14-384 and can be given.

Example::

    tok = load_release("/ckpt/dualtoken_release", image_size=384)
    codes = tok.encode(images)                 # pixel_codes, semantic_codes [b, 729, 8], ...
    recon = tok.decode(codes["pixel_codes"])   # [b, 384, 384, 3]
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.errors import MissingCheckpoint
from mmjax.interop import CheckpointMismatchError
from mmjax.models import patchgan, rvq, siglip, vqgan
from mmjax.systems.dualtoken.model import DualTokenConfig, Tokenizer
from mmjax.systems.dualtoken.projections import projection_from_torch, projection_to_torch
from mmjax.systems.dualtoken.tower import siglip_params_from_tower, tower_params_from_siglip

MODEL_TYPE = "rqvaesigliptransformer_model"
SIGLIP_PREFIX = "siglip_model.vision_model."
PROJECTIONS = ("prequant_pix", "prequant_sem", "prequant_shortcut", "postquant_pix",
               "postquant_sem")
SIGLIP2_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=384, patch_size=14,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


# ----------------------------------------------------------------------------- files
def release_files(path: str) -> tuple[str, str]:
  """``(config.json, newest epoch_N.pt)`` of a release directory (or of a ``.pt`` file and
  the ``config.json`` beside it)."""
  if os.path.isfile(path):
    directory, pt = os.path.dirname(path), path
  else:
    directory = path
    pts = sorted(glob.glob(os.path.join(path, "**", "epoch_*.pt"), recursive=True),
                 key=lambda p: int(re.search(r"epoch_(\d+)", p).group(1)))
    pt = pts[-1] if pts else ""
  cfg = os.path.join(directory, "config.json")
  missing = {k: v for k, v in (("config.json", cfg), ("epoch_N.pt", pt))
             if not v or not os.path.isfile(v)}
  if missing:
    raise MissingCheckpoint(missing, f"a DualToken release directory holds config.json and "
                            f"epoch_N.pt ({path!r})")
  return cfg, pt


def read_release(path: str) -> tuple[dict, dict]:
  """``(rqvaesiglip settings, {name: numpy})`` of a release."""
  cfg_path, pt = release_files(path)
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get("model_type") != MODEL_TYPE:
    raise CheckpointMismatchError(f"{cfg_path}: model_type {config.get('model_type')!r}, "
                                  f"expected {MODEL_TYPE!r}")
  tensors = vqgan.read_state_dict(pt)
  tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
  return config["rqvaesiglip"], tensors


# ----------------------------------------------------------------------------- config
def config_from_release(rq: dict, vision: Optional[dict] = None, dtype: Any = jnp.float32,
                        scan_layers: bool = True) -> DualTokenConfig:
  """Our ``DualTokenConfig`` from the release's ``rqvaesiglip`` settings."""
  vision_hf = dict(SIGLIP2_SO400M if vision is None else vision)
  vision_hf.setdefault("hidden_size", rq.get("hidden_size", 1152))
  vcfg = siglip.from_hf_config(vision_hf, dtype=dtype, scan_layers=scan_layers)

  def quantizer(vq):
    schedule = "joint" if vq.get("bottleneck_type") == "rq_ema" else "per_depth"
    return rvq.RVQConfig(depths=int(vq["code_shape"][-1]), codebook_size=int(vq["n_embed"]),
                         dim=int(vq["embed_dim"]), decay=float(vq.get("decay", 0.99)),
                         restart_dead_codes=bool(vq.get("restart_unused_codes", True)),
                         shared_codebook=bool(vq.get("shared_codebook", True)),
                         ema_schedule=schedule, search_block=0)
  shortcut = rq.get("layer_shortcut")
  return DualTokenConfig(
      vision=vcfg, pixel=quantizer(rq["vq_pix"]), semantic=quantizer(rq["vq_sem"]),
      decoder=vqgan.DecoderConfig.from_release_config(   # GroupNorm(32) unless we wrote it
          rq, dtype=dtype, num_groups=int(rq["ddconfig"].get("num_groups", 32))),
      disc=patchgan.PatchGANConfig(dtype=dtype), pixel_layer=int(rq["layer_recon"]),
      shortcut_layer=None if shortcut is None else int(shortcut),
      shortcut_scale=float(rq.get("weight_shortcut", 0.0)) if shortcut is not None else 0.0,
      semantic_layer=int(rq["layer_sem"]), use_lpips=False, dtype=dtype)


def config_to_release(cfg: DualTokenConfig) -> dict:
  """The ``config.json`` of a release for ``cfg``."""
  d = cfg.decoder

  def vq(q, kind):
    side = cfg.vision.grid
    return {"bottleneck_type": kind, "ckpt_path": None, "code_shape": [side, side, q.depths],
            "decay": q.decay, "embed_dim": q.dim, "latent_shape": [side, side, q.dim],
            "n_embed": q.codebook_size, "restart_unused_codes": q.restart_dead_codes,
            "shared_codebook": q.shared_codebook}
  rq = {"architectures": ["RQVAESiglip"], "model_type": "rqvaesiglip_model",
        "layer_recon": cfg.pixel_layer, "layer_sem": cfg.semantic_layer,
        "hidden_size": cfg.width,
        "ddconfig": {"attn_resolutions": list(d.attn_resolutions), "ch": d.ch,
                     "ch_mult": list(d.ch_mult), "decoder_in_channels": d.decoder_in_channels,
                     "double_z": False, "dropout": 0.0, "in_channels": 3,
                     "num_res_blocks": d.num_res_blocks, "out_ch": d.out_ch,
                     "resolution": d.resolution,
                     **({} if d.num_groups == 32 else {"num_groups": d.num_groups})},
        "decoder_latent_shape": list(d.decoder_latent_shape or ()),
        "vq_sem": vq(cfg.semantic, "rq_ema" if cfg.semantic.ema_schedule == "joint" else "rq"),
        "vq_pix": vq(cfg.pixel, "rq_ema" if cfg.pixel.ema_schedule == "joint" else "rq"),
        "vision_config": siglip.to_hf_config(cfg.vision)}
  if cfg.shortcut_layer is not None:
    rq.update(layer_shortcut=cfg.shortcut_layer, weight_shortcut=cfg.shortcut_scale)
  return {"architectures": ["RQVAESIGLIPTransformer"], "hidden_size": cfg.width,
          "model_type": MODEL_TYPE, "rqvaesiglip": rq}


# ----------------------------------------------------------------------------- tensors
def _siglip_family(cfg):
  fam = siglip.HF_FAMILY
  return dataclasses.replace(
      fam, table=lambda c: siglip.hf_table(c, prefix=SIGLIP_PREFIX),
      ignore=lambda c: siglip.hf_ignore(c, prefix=SIGLIP_PREFIX) + (r"siglip_model\..*",),
      renames=lambda c: ())


def tokenizer_from_tensors(cfg: DualTokenConfig, tensors: dict) -> tuple[dict, dict]:
  """``(tokenizer params, codebook collection)`` from a release state dict."""
  siglip_t = {k: v for k, v in tensors.items() if k.startswith("siglip_model.")}
  tower = tower_params_from_siglip(
      vqgan.load_state_dict(_siglip_family(cfg.vision), cfg.vision, siglip_t),
      cfg.semantic_layer)
  params = {"tower": tower}
  for name in PROJECTIONS:
    if name == "prequant_shortcut" and cfg.shortcut_layer is None:
      continue
    down = name.startswith("pre")
    dim = cfg.semantic.dim if name.endswith("sem") else cfg.pixel.dim
    params[name] = projection_from_torch(tensors, cfg.projection(down, dim), prefix=name + ".")
  dec_t = {k: v for k, v in tensors.items() if k.startswith(("post_quant_conv.", "decoder."))}
  params["decoder"] = vqgan.from_state_dict(cfg.decoder, dec_t)
  codebook = {}
  for name, q in (("quantizer_pix", cfg.pixel), ("quantizer_sem", cfg.semantic)):
    p = f"{name}.codebooks.0."
    need = [p + "weight", p + "cluster_size_ema", p + "embed_ema"]
    missing = [k for k in need if k not in tensors]
    if missing:
      raise CheckpointMismatchError(f"release state_dict lacks {missing}")
    weight = np.asarray(tensors[p + "weight"], np.float32)
    if weight.shape != (q.codebook_size + 1, q.dim):
      raise CheckpointMismatchError(f"{p}weight has shape {weight.shape}, expected "
                                    f"{(q.codebook_size + 1, q.dim)} (K + 1 rows)")
    codebook[name] = {"embed": jnp.asarray(weight[:-1]),
                      "cluster_size": jnp.asarray(tensors[p + "cluster_size_ema"], jnp.float32),
                      "embed_sum": jnp.asarray(tensors[p + "embed_ema"], jnp.float32)}
  return params, codebook


def tokenizer_to_tensors(cfg: DualTokenConfig, params: dict, codebook: dict) -> dict:
  """Inverse of ``tokenizer_from_tensors`` (numpy, the release's names)."""
  from mmjax.interop import hf  # pylint: disable=import-outside-toplevel
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), nn.unbox(params))
  out = hf.state_dict(_siglip_family(cfg.vision), cfg.vision,
                      siglip_params_from_tower(host["tower"]))
  for name in PROJECTIONS:
    if name in host:
      out.update(projection_to_torch(host[name], prefix=name + "."))
  out.update(vqgan.to_state_dict(cfg.decoder, host["decoder"]))
  for name, q in (("quantizer_pix", cfg.pixel), ("quantizer_sem", cfg.semantic)):
    cb = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), codebook[name])
    weight = np.concatenate([cb["embed"], np.zeros((1, q.dim), np.float32)])
    for d in range(q.depths):   # the shared codebook, stored once per depth
      p = f"{name}.codebooks.{d}."
      out.update({p + "weight": weight, p + "cluster_size_ema": cb["cluster_size"],
                  p + "embed_ema": cb["embed_sum"]})
  return out


# ----------------------------------------------------------------------------- API
@dataclasses.dataclass
class ReleaseTokenizer:
  """A loaded release: ``encode(images [b, H, W, 3] in [-1, 1])`` -> dict ``pixel_codes``,
  ``semantic_codes`` ``[b, n, D]``, ``semantic_features``, ``pooled``;
  ``decode(pixel_codes)`` -> images."""
  cfg: DualTokenConfig
  variables: dict

  def __post_init__(self):
    self.module = Tokenizer(self.cfg)
    self._encode = jax.jit(lambda v, x: self.module.apply(v, x, method=Tokenizer.encode))
    self._decode = jax.jit(lambda v, c: self.module.apply(v, c, method=Tokenizer.decode))

  def encode(self, images) -> dict:
    return self._encode(self.variables, jnp.asarray(images, jnp.float32))

  def decode(self, pixel_codes):
    return self._decode(self.variables, jnp.asarray(pixel_codes, jnp.int32))


def load_release(path: str, vision_config: Optional[dict] = None, image_size: int = 384,
                 dtype: Any = jnp.float32) -> ReleaseTokenizer:
  """The authors' tokenizer from a release directory (see the module docstring)."""
  rq, tensors = read_release(path)
  vision = dict(vision_config or rq.get("vision_config") or SIGLIP2_SO400M)
  vision["image_size"] = vision.get("image_size", image_size)
  cfg = config_from_release(rq, vision, dtype=dtype)
  params, codebook = tokenizer_from_tensors(cfg, tensors)
  return ReleaseTokenizer(cfg, {"params": params, "codebook": codebook})


def export_release(system, variables: dict, path: str, epoch: int = 0) -> str:
  """``path/config.json`` and ``path/epoch_{epoch}.pt`` in the release's layout from a
  trained system's variables (``{'params', 'codebook'}``)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise vqgan.TorchMissing("writing the release's epoch_N.pt needs PyTorch "
                             "(pip install torch)") from e
  cfg = system.cfg
  tensors = tokenizer_to_tensors(cfg, variables["params"]["tokenizer"],
                                 variables["codebook"]["tokenizer"])
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config_to_release(cfg), f, indent=2)
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    torch.save({"epoch": epoch, "name": "mmjax_export", "state_dict": state, "optimizer": None},
               os.path.join(path, f"epoch_{epoch}.pt"))
    print(f"export: {path} (config.json, epoch_{epoch}.pt: {len(tensors)} tensors)", flush=True)
  return path


def load_into_params(system, params: dict, path: str) -> tuple[dict, dict]:
  """``model.init='release'``: the tokenizer's params (boxes kept) and the codebooks from a
  release, as the starting point of training (the teacher copies the loaded tower)."""
  rq, tensors = read_release(path)
  loaded, codebook = tokenizer_from_tensors(system.cfg, tensors)
  flat_loaded = traverse_util.flatten_dict(loaded)
  flat = traverse_util.flatten_dict(params["tokenizer"])
  missing = sorted("/".join(k) for k in flat if k not in flat_loaded)
  if missing:
    raise CheckpointMismatchError(f"release {path!r} lacks tokenizer parameters {missing[:8]}")
  filled = {k: (v.replace_boxed(jnp.asarray(flat_loaded[k])) if isinstance(v, nn.Partitioned)
                else jnp.asarray(flat_loaded[k])) for k, v in flat.items()}
  del rq
  return {**params, "tokenizer": traverse_util.unflatten_dict(filled)}, {"tokenizer": codebook}


def tower_from_siglip_dir(tower: dict, path: str, semantic_layer: int) -> dict:
  """``model.init='siglip'``: the tower's params from a transformers SigLIP / SigLIP2
  directory, each tensor streamed onto its sharding (``interop.subtree.load_into``)."""
  from mmjax.interop.subtree import load_into  # pylint: disable=import-outside-toplevel
  return tower_params_from_siglip(load_into(siglip_params_from_tower(tower), "hf", path),
                                  semantic_layer)

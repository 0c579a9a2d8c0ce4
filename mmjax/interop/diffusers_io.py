"""Import and export of diffusers model directories (``config.json`` + safetensors).

A diffusers model directory (e.g. the ``transformer/`` or ``vae/`` folder of a pipeline) names
its class in ``config.json["_class_name"]``; its weights are
``diffusion_pytorch_model.safetensors`` or shards listed in
``diffusion_pytorch_model.safetensors.index.json``. The family module of each class holds
its config mapping and weight table (``DIFFUSERS_FAMILY``, an ``interop.tables.Family``);
this file only reads and writes. The machinery is ``interop.hf``'s: one
``CheckpointMismatchError`` naming every missing, unexpected and mis-shaped tensor, lazy
one-tensor-at-a-time reads, each parameter placed straight onto its ``NamedSharding``.

Example::

    from mmjax.interop.diffusers_io import load_diffusers, save_diffusers
    dit, dit_params = load_diffusers("/ckpt/Sana_1600M_512px_diffusers/transformer")
    ae, ae_params = load_diffusers("/ckpt/Sana_1600M_512px_diffusers/vae")
    v = dit.apply({"params": dit_params}, latents, t, caption, caption_mask)   # NHWC
    save_diffusers(dit.config, dit_params, "/tmp/sana_export")
    # diffusers.SanaTransformer2DModel.from_pretrained("/tmp/sana_export")
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mmjax.interop import hf
from mmjax.interop.hf import CheckpointMismatchError  # noqa: F401  (re-exported)
from mmjax.interop.tables import Family

# diffusers ``_class_name`` -> module defining ``DIFFUSERS_FAMILY`` (imported lazily)
FAMILIES = {
    "SanaTransformer2DModel": "mmjax.models.sana_dit",
    "AutoencoderDC": "mmjax.models.dc_ae",
    "UNet2DConditionModel": "mmjax.models.unet2d",
    "AutoencoderKL": "mmjax.models.autoencoder_kl",
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def family_module(class_name: str):
  """The family module registered for a diffusers ``_class_name``."""
  if class_name not in FAMILIES:
    raise ValueError(f"no mmjax family loads diffusers class {class_name!r}; "
                     f"known: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[class_name])


def _family_of(cfg) -> tuple[str, Any]:
  for class_name, path in FAMILIES.items():
    mod = importlib.import_module(path)
    if mod.DIFFUSERS_FAMILY.name == cfg.family:
      return class_name, mod
  raise ValueError(f"config family {cfg.family!r} is not a diffusers family")


class DiffusersCheckpoint(hf.Checkpoint):
  """``hf.Checkpoint`` (names, shapes, lazy one-tensor reads) over diffusers' file names."""

  def __init__(self, path: str, renames=()):
    super().__init__(path, renames, weights=WEIGHTS, index=INDEX)


# ----------------------------------------------------------------------------- load
def load_diffusers(path: str, mesh: Optional[jax.sharding.Mesh] = None, rules=None, *,
                   param_dtype: Any = jnp.float32, **config_overrides):
  """Loads a diffusers model directory as ``(module, params)``.

  Args:
    path: directory with ``config.json`` (``_class_name`` SanaTransformer2DModel,
      AutoencoderDC, UNet2DConditionModel or AutoencoderKL) and
      ``diffusion_pytorch_model.safetensors`` or a sharded index.
    mesh, rules: place every parameter on ``NamedSharding(mesh, spec)``, ``spec`` from its
      logical axis names and ``rules`` (default ``mmjax.config.default_logical_rules()``);
      each host reads one reference tensor at a time and keeps only its devices' shards.
      Without a mesh parameters land on the default device.
    param_dtype: dtype of the parameters (checkpoint tensors are cast).
    **config_overrides: our config fields, e.g. ``dtype=jnp.bfloat16`` (compute dtype),
      ``scan_layers=False``, ``remat_policy='dots'`` (DiT).

  Returns the Linen module and its params (a plain dict of arrays, no boxing). Raises
  ``CheckpointMismatchError`` naming every missing, unexpected and mis-shaped tensor.

  Example::

    vae, p = load_diffusers("/ckpt/dc-ae-f32c32-sana-1.0-diffusers")
    z = vae.apply({"params": p}, images, method=vae.encode)     # [b, H/32, W/32, 32]
  """
  ref_config = hf.read_config(path)
  family: Family = family_module(ref_config.get("_class_name")).DIFFUSERS_FAMILY
  cfg = family.from_hf_config(ref_config, param_dtype=param_dtype, **config_overrides)
  return hf.load_params(family, cfg, DiffusersCheckpoint(path, tuple(family.renames(cfg))),
                        mesh, rules)


# ----------------------------------------------------------------------------- save
def _diffusers_version() -> str:
  """The installed diffusers version for the config stamp (diffusers itself is optional)."""
  from importlib import metadata
  try:
    return metadata.version("diffusers")
  except metadata.PackageNotFoundError:
    return "0.32.0"


def diffusers_state_dict(cfg, params) -> dict:
  """Our params (of a family config ``cfg``) as the reference ``{name: numpy array}``,
  non-parameter buffers included (what ``save_diffusers`` writes)."""
  _, mod = _family_of(cfg)
  out = hf.state_dict(mod.DIFFUSERS_FAMILY, cfg, params)
  if hasattr(mod, "diffusers_buffers"):
    out.update(mod.diffusers_buffers(cfg))
  return out


def save_diffusers(module_cfg, params, path: str, *, dtype: Any = None,
                   max_shard_bytes: int = 10 << 30) -> list:
  """Writes a diffusers model directory that ``<Class>.from_pretrained(path)`` loads.

  Args:
    module_cfg: our config (``SanaConfig`` / ``DCAEConfig`` / ``UNetConfig`` /
      ``AutoencoderKLConfig``; ``module.config``).
    params: its params (boxed or not, with or without the ``'params'`` level).
    dtype: floating tensor dtype on disk (default: as the params are).
    max_shard_bytes: above this total, weights go to ``diffusion_pytorch_model-0000k-of-
      0000n.safetensors`` shards with an index (diffusers' default limit is 10 GB).

  Returns the files written. Only process 0 writes (multi-host arrays are gathered).

  Example::

    save_diffusers(vae.config, vae_params, "/tmp/vae")   # AutoencoderDC.from_pretrained
  """
  class_name, _ = _family_of(module_cfg)
  tensors = hf.cast_floating(diffusers_state_dict(module_cfg, params), dtype)
  ref_config = dict(module_cfg.to_diffusers_config())
  ref_config["_class_name"] = class_name
  ref_config["_diffusers_version"] = _diffusers_version()
  return hf.write_checkpoint(path, ref_config, tensors, weights=WEIGHTS, index=INDEX,
                             max_shard_bytes=max_shard_bytes)

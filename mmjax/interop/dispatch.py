"""The one front door: ``load`` any supported transformers or diffusers model directory,
``save`` any of our family models back to its reference layout.

A directory's ``config.json`` says what it holds: diffusers names its class
(``_class_name``: ``SanaTransformer2DModel``, ``AutoencoderDC``, ``UNet2DConditionModel``,
``AutoencoderKL``), transformers its ``model_type`` (``qwen2``, ``llada``, ``Dream``,
``siglip_vision_model``, ``llava_onevision``, ``llava_llada``, ...; else ``architectures``).
``load`` picks the family from the registries (``hf.FAMILIES`` / ``hf.MODEL_TYPES``,
``diffusers_io.FAMILIES``), checks every tensor name and shape, and streams each tensor onto
its ``NamedSharding`` (given a mesh): one reference tensor at a time in host memory, each
device's shard placed directly. ``save`` dispatches on
``module.config.family``.

Example::

    from mmjax import interop
    llm, llm_params = interop.load("/ckpt/LLaDA-8B-Instruct", mesh=mesh, rules=rules)
    dit, dit_params = interop.load("/ckpt/Sana_1600M_512px_diffusers/transformer")
    interop.save(dit, dit_params, "/tmp/dit")   # SanaTransformer2DModel.from_pretrained
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

from mmjax.errors import MissingCheckpoint, MmjaxError
from mmjax.interop import diffusers_io, hf
from mmjax.interop.tables import Family

KINDS = ("hf", "diffusers")


class UnknownModelFormat(MmjaxError, ValueError):
  """A ``config.json`` (or one of our configs) no registered family loads / saves."""


def known() -> str:
  """The registered reference names, for error messages."""
  return (f"known transformers model_type: {', '.join(sorted(hf.MODEL_TYPES))}; "
          f"known diffusers _class_name: {', '.join(sorted(diffusers_io.FAMILIES))}")


def read_ref_config(path: str) -> dict:
  """``config.json`` of ``path``; ``MissingCheckpoint`` naming the path when it has none."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise MissingCheckpoint({"path": path}, "it has no config.json (a transformers or "
                            "diffusers model directory has one)")
  return hf.read_config(path)


def resolve(path: str, kind: Optional[str] = None) -> tuple[str, Family, dict]:
  """``(kind, family, reference config)`` of a model directory. ``kind`` ('hf' |
  'diffusers') restricts the lookup; None decides by ``_class_name`` / ``model_type``."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"checkpoint kind {kind!r} is not one of {KINDS}")
  ref = read_ref_config(path)
  class_name = ref.get("_class_name")
  if kind == "diffusers" or (kind is None and class_name in diffusers_io.FAMILIES):
    if class_name not in diffusers_io.FAMILIES:
      raise UnknownModelFormat(f"{path}: no mmjax family loads diffusers class "
                               f"{class_name!r}; {known()}")
    return "diffusers", diffusers_io.family_module(class_name).DIFFUSERS_FAMILY, ref
  try:
    family = hf.family_for_config(ref)
  except ValueError as e:
    what = (f"diffusers class {class_name!r}" if class_name else
            f"model_type {ref.get('model_type')!r} (architectures "
            f"{list(ref.get('architectures') or ())})")
    raise UnknownModelFormat(f"{path}: no mmjax family loads {what}; {known()}") from e
  return "hf", family, family.complete_config(ref, path)


def open_checkpoint(kind: str, path: str, family: Family, cfg) -> hf.Checkpoint:
  """The lazy ``Checkpoint`` of a directory of ``kind`` (file names differ)."""
  if kind == "diffusers":
    return diffusers_io.DiffusersCheckpoint(path, tuple(family.renames(cfg)))
  return hf.Checkpoint(path, tuple(family.renames(cfg)))


def load(path: str, mesh: Optional[jax.sharding.Mesh] = None, rules=None, **overrides):
  """``(module, params)`` of any supported transformers or diffusers model directory.

  Args:
    path: directory with ``config.json`` and safetensors (one file or a sharded index).
    mesh, rules: place every tensor straight onto ``NamedSharding(mesh, spec)``, ``spec``
      from its logical axis names and ``rules`` (default ``mmjax.config.
      default_logical_rules()``); without a mesh the params land on the default device.
    **overrides: ``param_dtype`` (dtype the params are stored in) and our config fields for
      the family's ``from_hf_config`` (``dtype=jnp.bfloat16``, ``scan_layers=False``, ...).

  Raises ``UnknownModelFormat`` (one line naming every known ``model_type`` and
  ``_class_name``), ``MissingCheckpoint`` (no ``config.json``) and
  ``CheckpointMismatchError`` (every missing, unexpected and mis-shaped tensor).

  Example::

    module, params = load("/ckpt/dc-ae-f32c32-sana-1.0-diffusers")   # an AutoencoderDC
  """
  kind, _, _ = resolve(path)
  loader = diffusers_io.load_diffusers if kind == "diffusers" else hf.load_hf
  return loader(path, mesh, rules, **overrides)


def save(module: Any, params: Any, path: str, **kwargs) -> list:
  """Writes ``module`` (one of our family modules, or its config) with ``params`` as the
  reference directory its ``from_pretrained`` loads; ``kwargs`` (``dtype``,
  ``max_shard_bytes``) go to ``save_hf`` / ``save_diffusers``. Returns the files written.

  Example::

    save(module, params, "/tmp/export", dtype=jnp.bfloat16)
  """
  cfg = getattr(module, "config", module)
  family = getattr(cfg, "family", None)
  if family in hf.FAMILIES:
    return hf.save_hf(cfg, params, path, **kwargs)
  if family in diffusers_families():
    return diffusers_io.save_diffusers(cfg, params, path, **kwargs)
  raise UnknownModelFormat(f"no mmjax family saves config family {family!r}; known: "
                           f"{', '.join(sorted(set(hf.FAMILIES) | diffusers_families()))}")


def diffusers_families() -> set:
  """Our family names of the registered diffusers classes."""
  return {diffusers_io.family_module(c).DIFFUSERS_FAMILY.name for c in diffusers_io.FAMILIES}

"""Import and export of transformers checkpoints (``config.json`` + safetensors).

``load_hf`` reads a local transformers directory, picks the family from ``model_type`` /
``architectures``, checks every tensor name and shape against the family's table (one error
naming every missing, unexpected and mis-shaped tensor), then reads tensors lazily and, given
a mesh, places each one directly onto the ``NamedSharding`` its logical axis names ask for:
a host only materialises one reference tensor at a time plus the shards its own devices hold.
``save_hf`` writes the reference layout back (sharded files when large) for
``from_pretrained``.

The machinery is shared with ``diffusers_io`` (which differs only in file names and family
registry) and ``subtree``: ``Checkpoint`` (``reader``; file names are parameters),
``check_checkpoint``, ``read_shards`` / ``build_param``,
``load_params``, ``state_dict``, ``write_checkpoint`` (the one sharded safetensors writer),
``flat_params`` / ``unflat_params``, ``to_host``.

Example::

    from mmjax import config as mcfg
    from mmjax.interop import load_hf, save_hf
    module, params = load_hf("/ckpt/Qwen2.5-0.5B-Instruct")           # one device
    logits = module.apply({"params": params}, input_ids)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2),
                             ("data", "fsdp", "tensor"))
    module, params = load_hf("/ckpt/Qwen2.5-0.5B-Instruct", mesh=mesh,
                             rules=mcfg.default_logical_rules())      # sharded
    save_hf(module, params, "/tmp/export")   # Qwen2ForCausalLM.from_pretrained("/tmp/export")
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

# Checkpoint, CheckpointMismatchError and read_config are re-exported (their old home)
from mmjax.interop.reader import (INDEX_FILE, SINGLE_FILE, Checkpoint,  # noqa: F401
                                  CheckpointMismatchError, host_empty, read_config)
from mmjax.interop.tables import Family, Part, expand, matches_any, unmapped

# registry: family name -> module defining ``HF_FAMILY`` (imported lazily), and the reference
# ``model_type`` values each family loads.
FAMILIES = {
    "qwen2": "mmjax.models.qwen2",
    "dream": "mmjax.models.dream",
    "llada": "mmjax.models.llada",
    "siglip_vision": "mmjax.models.siglip",
    "llava_onevision": "mmjax.models.llava_onevision",
    "qwen2_5_vl": "mmjax.models.qwen2_5_vl",
    "lavida": "mmjax.systems.lavida.checkpoint",
    "metaquery": "mmjax.systems.metaquery.release",
}
MODEL_TYPES = {
    "qwen2": "qwen2", "Dream": "dream", "dream": "dream", "llada": "llada",
    "siglip_vision_model": "siglip_vision", "siglip": "siglip_vision",
    "llava_onevision": "llava_onevision", "qwen2_5_vl": "qwen2_5_vl",
    "llava_llada": "lavida", "llava_dream": "lavida", "metaquery": "metaquery",
}


def get_family(name: str) -> Family:
  """The ``Family`` registered under ``name`` (see ``FAMILIES``)."""
  if name not in FAMILIES:
    raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name]).HF_FAMILY


def _present_family(name: str) -> Optional[Family]:
  """``get_family(name)``, or None when its registered module is not installed."""
  try:
    return get_family(name)
  except ModuleNotFoundError as e:
    if e.name and FAMILIES[name].startswith(e.name):
      return None
    raise


def family_for_config(hf_config: dict) -> Family:
  """The family that loads a reference ``config.json`` (by ``model_type``, else by
  ``architectures``)."""
  model_type = hf_config.get("model_type")
  if model_type in MODEL_TYPES:
    return get_family(MODEL_TYPES[model_type])
  archs = tuple(hf_config.get("architectures") or ())
  for name in FAMILIES:
    fam = _present_family(name)
    if fam is not None and any(a in fam.architectures for a in archs):
      return fam
  raise ValueError(f"no mmjax family loads model_type={model_type!r} architectures={archs}; "
                   f"known model types: {sorted(MODEL_TYPES)}")


# ----------------------------------------------------------------------------- helpers
def flat_params(tree) -> dict:
  """A nested param dict as ``{'a/b/kernel': array}`` (the paths tables name)."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflat_params(flat: dict) -> dict:
  """Inverse of ``flat_params``."""
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def to_host(x) -> np.ndarray:
  """An array as numpy on this host (multi-host arrays are all-gathered first)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def abstract_params(family: Family, cfg, module=None):
  """``(shapes {path: ShapeDtypeStruct}, logical PartitionSpecs {path: spec})`` of the model,
  from ``jax.eval_shape`` (nothing allocated)."""
  module = family.make_model(cfg) if module is None else module
  args = tuple(family.init_args(cfg))
  arrays = [i for i, a in enumerate(args) if isinstance(a, (jax.Array, np.ndarray))]

  def init(*xs):  # non-array init arguments (e.g. static layouts) are closed over
    full = list(args)
    for i, x in zip(arrays, xs):
      full[i] = x
    return module.init(jax.random.key(0), *full)

  boxed = jax.eval_shape(init, *[args[i] for i in arrays])["params"]
  return flat_params(nn.unbox(boxed)), flat_params(nn.get_partition_spec(boxed))


def check_checkpoint(family: Family, cfg, ckpt: Checkpoint, entries, our_shapes) -> None:
  """Raises one ``CheckpointMismatchError`` naming every missing, unexpected (not matched by
  ``family.ignore``) and mis-shaped tensor of ``ckpt``, and every parameter no rule fills."""
  expected = {}
  for e in entries:
    expected[e.hf] = e.hf_shape
  present = ckpt.keys()
  missing = sorted(set(expected) - present)
  ignore = tuple(family.ignore(cfg))
  unexpected = sorted(k for k in present - set(expected) if not matches_any(k, ignore))
  misshaped = sorted(f"{k}: checkpoint {ckpt.shapes[k]}, model expects {expected[k]}"
                     for k in set(expected) & present if tuple(ckpt.shapes[k]) != expected[k])
  table_gaps = unmapped(family.table(cfg), our_shapes)
  if missing or unexpected or misshaped or table_gaps:
    lines = [f"checkpoint does not fit the {family.name} model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped), ("parameters no table rule fills",
                                                     table_gaps)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {x}" for x in items)
    raise CheckpointMismatchError("\n".join(lines))


def index_key(index, shape) -> tuple:
  """``((start, stop), ...)`` of a shard index (a tuple of slices) of an array ``shape``."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


_index_key = index_key


def read_shards(entries, shape, dtype, ckpt: Checkpoint, keys) -> dict:
  """``{key: numpy}``: the pieces ``keys`` (``index_key``s) of one parameter of ``shape``,
  built from its reference tensor(s) ``entries``. Each reference tensor is read once and
  only one is in memory at a time (stacked layers fill the pieces layer by layer)."""
  entries = sorted(entries, key=lambda e: -1 if e.layer is None else e.layer)
  stacked = entries[0].layer is not None

  def piece(e):
    x = ckpt.read(e.hf, keep=isinstance(e.transform, Part))
    return np.asarray(e.transform.to_ours(x, e.our_shape), dtype)

  bufs = {key: host_empty([b - a for a, b in key], dtype) for key in keys}
  if stacked:  # layer-major: one reference tensor in memory at a time
    for e in entries:
      x = piece(e)
      for key, buf in bufs.items():
        (start, stop), rest = key[0], key[1:]
        if start <= e.layer < stop:
          buf[e.layer - start] = x[tuple(slice(a, b) for a, b in rest)]
      del x
  else:
    x = piece(entries[0])
    for key, buf in bufs.items():
      buf[...] = x[tuple(slice(a, b) for a, b in key)]
  return bufs


def build_param(entries, shape, dtype, ckpt: Checkpoint, sharding):
  """One parameter from its reference tensor(s): stacked layers or a single tensor; with a
  ``sharding``, only the shards this host's devices hold are materialised."""
  shape = tuple(shape)
  if sharding is None:
    full = tuple((0, n) for n in shape)
    return jnp.asarray(read_shards(entries, shape, dtype, ckpt, [full])[full])
  index_map = sharding.addressable_devices_indices_map(shape)
  bufs = read_shards(entries, shape, dtype, ckpt,
                     list(dict.fromkeys(index_key(i, shape) for i in index_map.values())))
  return jax.make_array_from_callback(shape, sharding, lambda i: bufs[index_key(i, shape)])


# old private names (kept for callers outside interop)
_flat, _unflat, _host = flat_params, unflat_params, to_host
_check, _build = check_checkpoint, build_param


def load_params(family: Family, cfg, ckpt: Checkpoint, mesh=None, rules=None):
  """``(module, params)`` of ``family`` with config ``cfg`` from ``ckpt``: every tensor name
  and shape is checked first (``check_checkpoint``), then each parameter is built straight
  onto its ``NamedSharding`` (given a mesh; ``rules`` default to
  ``mmjax.config.default_logical_rules()``). What ``load_hf`` and ``load_diffusers`` share."""
  module = family.make_model(cfg)
  shapes, specs = abstract_params(family, cfg, module)
  our_shapes = {k: v.shape for k, v in shapes.items()}
  entries = expand(family.table(cfg), our_shapes)
  check_checkpoint(family, cfg, ckpt, entries, our_shapes)
  shardings = {}
  if mesh is not None:
    if rules is None:
      from mmjax.config import default_logical_rules
      rules = default_logical_rules()
    shardings = {k: nn.logical_to_mesh_sharding(spec, mesh, rules) for k, spec in specs.items()}
  by_path = {}
  for e in entries:
    by_path.setdefault(e.ours, []).append(e)
  flat = {p: build_param(by_path[p], s.shape, s.dtype, ckpt, shardings.get(p))
          for p, s in shapes.items()}
  ckpt.forget()
  return module, unflat_params(flat)


def state_dict(family: Family, cfg, params) -> dict:
  """Params of ``family`` (config ``cfg``; boxed or not, with or without the ``'params'``
  level) as the reference ``{name: numpy array}``; ``Part`` pieces are concatenated."""
  flat = flat_params(nn.unbox(params.get("params", params)))
  our_shapes = {k: tuple(v.shape) for k, v in flat.items()}
  table = family.table(cfg)
  gaps = unmapped(table, our_shapes)
  if gaps:
    raise CheckpointMismatchError(f"parameters no {family.name} table rule fills: {gaps}")
  parts: dict = {}
  for e in expand(table, our_shapes):
    x = flat[e.ours] if e.layer is None else flat[e.ours][e.layer]
    parts.setdefault(e.hf, []).append((getattr(e.transform, "index", 0),
                                       e.transform.to_hf(to_host(x))))
  return {name: np.concatenate([p for _, p in sorted(ps, key=lambda t: t[0])], axis=0)
          if len(ps) > 1 else ps[0][1] for name, ps in parts.items()}


# ----------------------------------------------------------------------------- writing
def cast_floating(tensors: dict, dtype) -> dict:
  """Floating tensors cast to ``dtype`` (None: unchanged); integer buffers stay as they are."""
  if dtype is None:
    return tensors
  return {k: v.astype(jnp.dtype(dtype)) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in tensors.items()}


def write_checkpoint(path: str, config: dict, tensors: dict, *, weights: str = SINGLE_FILE,
                     index: str = INDEX_FILE, max_shard_bytes: int = 4 << 30) -> list:
  """Writes ``config.json`` and ``tensors`` as safetensors (``metadata={'format': 'pt'}``):
  one ``weights`` file, or, above ``max_shard_bytes`` in total, ``<stem>-0000k-of-0000n
  .safetensors`` shards plus an ``index`` file with the ``weight_map``. Only process 0
  writes; returns the files written (``[]`` elsewhere).

  Example::

    write_checkpoint("/tmp/out", {"model_type": "qwen2"}, {"w": np.zeros((2, 2))})
    # ['config.json', 'model.safetensors']
  """
  if jax.process_index() != 0:
    return []
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  shards, size = [[]], 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += x.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(tensors, os.path.join(path, weights), metadata=meta)
    return ["config.json", weights]
  files, weight_map = [], {}
  stem = weights[:-len(".safetensors")]
  for k, names in enumerate(shards):
    fname = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(path, fname), metadata=meta)
    weight_map.update({n: fname for n in names})
    files.append(fname)
  total = int(sum(x.nbytes for x in tensors.values()))
  with open(os.path.join(path, index), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return ["config.json", index] + files


# ----------------------------------------------------------------------------- load / save
def load_hf(path: str, mesh: Optional[jax.sharding.Mesh] = None, rules=None, *,
            param_dtype: Any = jnp.float32, **config_overrides):
  """Loads a transformers directory as ``(module, params)``.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json``.
    mesh, rules: place every parameter on ``NamedSharding(mesh, spec)`` with ``spec`` from its
      logical axis names and ``rules`` (default ``mmjax.config.default_logical_rules()``).
      Without a mesh parameters land on the default device.
    param_dtype: dtype the parameters are stored in (checkpoint tensors are cast).
    **config_overrides: passed to the family's ``from_hf_config`` (e.g. ``dtype=jnp.bfloat16``
      for the compute dtype, ``scan_layers=False``).

  Returns the Linen module and its params (a plain dict of arrays, no boxing).
  Raises ``CheckpointMismatchError`` naming every missing, unexpected and mis-shaped tensor.

  Example::

    module, params = load_hf("/ckpt/qwen2")
    logits = module.apply({"params": params}, jnp.array([[1, 2, 3]]))
  """
  hf_config = read_config(path)
  family = family_for_config(hf_config)
  hf_config = family.complete_config(hf_config, path)
  cfg = family.from_hf_config(hf_config, param_dtype=param_dtype, **config_overrides)
  return load_params(family, cfg, Checkpoint(path, tuple(family.renames(cfg))), mesh, rules)


def hf_state_dict(module, params) -> dict:
  """Our params as the reference ``{name: numpy array}`` (what ``save_hf`` writes);
  ``module`` is a family module or its config."""
  cfg = getattr(module, "config", module)
  return state_dict(get_family(cfg.family), cfg, params)


def save_hf(module, params, path: str, *, dtype: Any = None,
            max_shard_bytes: int = 4 << 30) -> list:
  """Writes ``config.json`` + safetensors that transformers' ``from_pretrained`` loads.

  Args:
    module, params: a family module (``module.config.family`` names it; or that config)
      and its params.
    dtype: tensor dtype on disk (default: as the params are, e.g. float32).
    max_shard_bytes: above this total the weights are split into
      ``model-0000k-of-0000n.safetensors`` files with a ``model.safetensors.index.json``.

  Returns the list of files written. Only process 0 writes (multi-host arrays are gathered).

  Example::

    save_hf(module, params, "/tmp/qwen2_export")
    # transformers.Qwen2ForCausalLM.from_pretrained("/tmp/qwen2_export")
  """
  cfg = getattr(module, "config", module)
  family = get_family(cfg.family)
  tensors = cast_floating(hf_state_dict(cfg, params), dtype)
  hf_config = dict(family.to_hf_config(cfg))
  hf_config["dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
  return write_checkpoint(path, hf_config, tensors, max_shard_bytes=max_shard_bytes)

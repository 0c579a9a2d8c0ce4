"""Config files and the fields every training config has.

A config file is a Python file with ``get_config(arg=None) -> ConfigDict``. ``configs/X.py``
is the paper setting and ``configs/X.py:demo`` a CPU-sized run. Configs are *locked*: an
override or an assignment to a field that does not exist is an error naming the field.

Example::

    from mmjax import config as mcfg
    cfg = mcfg.load("configs/lm.py:demo", ["--config.total_steps=10"])
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

from mmjax.errors import ConfigError, UnknownField

ConfigDict = ml_collections.ConfigDict

# Logical axis names used by every model (weights) and by activations. The mapping from these
# names to mesh axes lives in ``config.logical_rules`` (see ``default_logical_rules``).
#   weights:      embed, heads, kv_heads, head_dim, mlp, vocab, layers, norm, patch, ...
#   activations:  act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab
MESH_AXES = ("data", "fsdp", "tensor", "context")


def default_logical_rules() -> list[tuple[str, object]]:
  """FSDP over ``fsdp``, Megatron-style tensor parallel over ``tensor``, batch over data+fsdp.

  Each rule is ``(logical_name, mesh_axis | tuple of mesh axes | None)``; the first rule whose
  mesh axes are still free wins (flax's ``logical_to_mesh`` semantics).
  """
  return [
      # activations
      ("act_batch", ("data", "fsdp")),
      ("act_length", "context"),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_kv_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
      # weights
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("head_dim", None),
      ("layers", None),
      ("norm", None),
  ]


def base_config() -> ConfigDict:
  """Fields shared by every training config, documented where they are defined."""
  c = ConfigDict()
  c.system = ""                 # registry name of the system (mmjax.systems.get_system)
  c.seed = 0                    # seeds parameter init, data order and per-step randomness
  c.total_steps = 1000          # optimizer steps to train
  c.log_every = 10              # steps between metrics.jsonl / TensorBoard / progress updates
  c.checkpoint_every = 500      # steps between checkpoints (plus one at the end and on SIGTERM)
  c.keep_checkpoints = 3        # how many checkpoints Orbax keeps
  c.async_checkpoints = True    # Orbax async saves
  c.dtype = "float32"           # compute dtype (bfloat16 on accelerators); params stay fp32
  c.remat_policy = "none"       # none | full | dots | dots_with_no_batch_dims | save_qkv_proj
  c.scan_layers = True          # nn.scan over transformer layers
  c.init_distributed = "auto"   # auto | yes | no: jax.distributed.initialize in the launcher
  c.device_peak_flops = 0.0     # override the peak-FLOPs table (0 = look up by device kind)
  c.profile_steps = ""          # "a,b": jax.profiler trace of steps a..b into WORKDIR/profile

  c.mesh = ConfigDict()
  c.mesh.data = -1              # one of the ICI sizes may be -1 (auto-filled)
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.context = 1
  c.mesh.dcn_data = 1           # multi-slice (DCN) factors; product = number of slices
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  c.mesh.dcn_context = 1
  c.logical_rules = [list(r) for r in default_logical_rules()]
  c.unsharded_warn_bytes = 1 << 20  # name parameters left unsharded above this size

  c.optim = ConfigDict()
  c.optim.lr = 1e-3             # peak learning rate
  c.optim.end_lr_ratio = 0.1    # cosine decays to lr * end_lr_ratio
  c.optim.warmup_steps = 0
  c.optim.schedule = "cosine"   # cosine | linear | constant (all after linear warmup)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0       # global-norm clip; 0 disables
  # Per-group learning-rate multipliers: list of [regex over 'a/b/c' param paths, lr_mult].
  # The first matching regex wins; unmatched params use multiplier 1.
  c.optim.lr_groups = []
  # Regexes of parameter paths that are frozen (no grads, no optimizer state).
  c.optim.frozen = []
  # Regexes of parameter paths excluded from weight decay (default: biases, norms, embeddings
  # of markers are decided by the system). Matching is on the 'a/b/c' path.
  c.optim.no_decay = [r".*bias$", r".*(norm|ln|scale).*"]
  # Optimizer groups of multi-objective systems (System.objectives()): name -> overrides of the
  # fields above for that group, e.g. groups.disc = dict(lr=1e-4, b1=0.5, b2=0.9).
  c.optim.groups = ConfigDict()
  c.optim.grad_accum_steps = 1  # microbatches per step, accumulated inside the jitted step
  c.optim.ema_decay = 0.0       # parameter EMA (0 = off); sample/eval modes use it when set

  c.data = ConfigDict()
  c.data.source = "shapes"      # shapes | shapes_describe | array_record | tfds
  c.data.path = ""              # ArrayRecord glob or TFDS name
  c.data.split = "train"
  c.data.data_dir = ""          # TFDS data_dir ("" = TFDS default)
  c.data.image_key = "image"    # TFDS feature holding the image ('a/b' for nested features)
  c.data.caption_key = "caption"  # TFDS feature holding the caption
  c.data.categories = ""        # shapes world: comma-separated categories ("" = all six)
  c.data.batch_size = 8         # global batch size
  c.data.resolution = 32        # image side in pixels
  c.data.shuffle_seed = -1      # -1: use config.seed
  c.data.num_workers = 0        # grain worker processes (0 = in-process)
  c.data.bad_record_policy = "skip"  # skip (count and report) | fail
  c.data.max_bad_fraction = 0.01     # skip policy: fail if more than this fraction is bad
  return c


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _fields(node: ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in node.items():
    out.append(prefix + k)
    if isinstance(v, ConfigDict):
      out.extend(_fields(v, prefix + k + "."))
  return out


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """Applies ``--config.a.b=value`` strings; an unknown field raises ``UnknownField``
  naming it and the closest existing field."""
  for item in overrides:
    if not item.startswith("--config."):
      raise ConfigError(f"override {item!r} must look like --config.a.b=value")
    key, sep, value = item[len("--config."):].partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} has no '=value'")
    node = cfg
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
      if not isinstance(node, ConfigDict) or p not in node:
        raise UnknownField(".".join(parts[:i + 1]), _fields(cfg), f"from override {item!r}")
      node = node[p]
    leaf = parts[-1]
    if not isinstance(node, ConfigDict) or leaf not in node:
      raise UnknownField(key, _fields(cfg), f"from override {item!r}")
    old = node[leaf]
    new = _parse_value(value)
    if isinstance(old, str) and not isinstance(new, str):
      new = value
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
      new = float(new)
    try:
      node[leaf] = new
    except TypeError as e:
      raise ConfigError(f"--config.{key}={value}: {e}") from None
  return cfg


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads ``path/to/config.py[:arg]``, applies overrides and locks the result."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(
      "mmjax_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg)")
  cfg = module.get_config(arg or None)
  cfg.lock()
  apply_overrides(cfg, overrides)
  return cfg

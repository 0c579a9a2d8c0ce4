"""The optimizer: learning-rate schedule, AdamW with decay mask, per-path groups, frozen params.

Parameters are addressed by their path ``'a/b/c'`` (the keys of the nested params dict).
Every regex in ``config.optim`` must match the *whole* path (``re.fullmatch``):

* ``optim.frozen``    frozen parameters: never differentiated, no optimizer state, values
                      bitwise unchanged. A system may freeze more with
                      ``System.trainable_mask(params) -> tree of bool`` (True = trainable).
* ``optim.no_decay``  parameters without weight decay.
* ``optim.lr_groups`` ``[[regex, multiplier], ...]``; the first match wins, unmatched -> 1.

Frozen parameters are split off *before* differentiation: the train step takes the gradient
of the loss w.r.t. the trainable sub-tree only, and ``optax`` only ever sees that sub-tree,
so a frozen tower costs neither gradient nor Adam memory.

Example::

    opt = make_optimizer(config, abstract_params, system)
    trainable, frozen = opt.split(params)
    opt_state = opt.init(params)               # state for the trainable sub-tree only
    n_train, n_frozen = opt.counts(params)
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from mmjax.errors import UnknownField
from mmjax.train import objectives as objectives_lib

SEP = "/"


def path_str(keypath: Sequence[Any]) -> str:
  """``'a/b/c'`` for a jax key path (dict keys, attribute names, sequence indices)."""
  return jax.tree_util.keystr(tuple(keypath), simple=True, separator=SEP)


def _first_match(path: str, patterns: Sequence[str]) -> int | None:
  for i, pattern in enumerate(patterns):
    if re.fullmatch(pattern, path):
      return i
  return None


# ---------------------------------------------------------------------------------- schedule


def make_schedule(optim_cfg: Any, total_steps: int) -> Callable[[Any], jax.Array]:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then ``optim.schedule``:

  * ``cosine``   half cosine from ``lr`` to ``lr * end_lr_ratio`` at ``total_steps``
  * ``linear``   straight line from ``lr`` to ``lr * end_lr_ratio`` at ``total_steps``
  * ``constant`` ``lr``

  The value at ``step`` is the learning rate used by the update that *starts* at ``step``
  (so step 0 of a warmup uses 0). Past ``total_steps`` the final value is held.

  >>> s = make_schedule(ConfigDict(dict(lr=1.0, warmup_steps=10, schedule='cosine',
  ...                                   end_lr_ratio=0.1)), total_steps=110)
  >>> float(s(5)), float(s(10)), float(s(60)), float(s(110))
  (0.5, 1.0, 0.55, 0.1)
  """
  kind = optim_cfg.schedule
  if kind not in ("cosine", "linear", "constant"):
    raise ValueError(f"optim.schedule = {kind!r}; expected cosine | linear | constant")
  peak = float(optim_cfg.lr)
  end = peak * float(optim_cfg.end_lr_ratio)
  warmup = int(optim_cfg.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    elif kind == "linear":
      after = peak + (end - peak) * t
    else:
      after = jnp.full_like(t, peak)
    return jnp.where(step < warmup, warm, after)

  return schedule


# ----------------------------------------------------------------------- trainable / frozen


def _flat(params: Any) -> dict[str, Any]:
  if not isinstance(params, dict):
    raise TypeError(f"params must be a nested dict (Flax Linen params), got {type(params)}")
  return traverse_util.flatten_dict(params, sep=SEP)


def trainable_paths(params: Any, frozen_patterns: Sequence[str] = (),
                    system_mask: Any = None) -> frozenset[str]:
  """Paths of trainable leaves: not matching ``frozen_patterns`` and True in ``system_mask``.

  A frozen pattern that matches no parameter is an error (a typo would silently train
  everything).
  """
  flat = _flat(params)
  unused = [p for p in frozen_patterns if not any(re.fullmatch(p, k) for k in flat)]
  if unused:
    raise ValueError(f"optim.frozen patterns {unused} match no parameter; "
                     f"paths look like {sorted(flat)[:5]}")
  keep = {k for k in flat if _first_match(k, frozen_patterns) is None}
  if system_mask is not None:
    flat_mask = _flat(system_mask)
    if set(flat_mask) != set(flat):
      raise ValueError("System.trainable_mask(params) must have the structure of params; "
                       f"differs at {sorted(set(flat_mask) ^ set(flat))[:5]}")
    keep = {k for k in keep if bool(flat_mask[k])}
  return frozenset(keep)


def _leaf_size(x: Any) -> int:
  return int(np.prod(x.shape))


# ---------------------------------------------------------------------------- transforms


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each update by ``multiplier(path)`` (per-group learning rates)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def scale(keypath, u):
      m = multiplier(path_str(keypath))
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def path_mask(predicate: Callable[[str], bool]) -> Callable[[Any], Any]:
  """A callable mask for optax: tree of ``predicate(path)`` with the structure of params."""
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda keypath, _: predicate(path_str(keypath)), tree)


def adamw(optim_cfg: Any, schedule: Callable) -> optax.GradientTransformation:
  """clip -> Adam -> decoupled weight decay (masked) -> -lr(step) -> per-group multipliers."""
  no_decay = list(optim_cfg.no_decay)
  groups = [(str(p), float(m)) for p, m in optim_cfg.lr_groups]
  parts = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  parts.append(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps))
  if optim_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(
        float(optim_cfg.weight_decay),
        mask=path_mask(lambda p: _first_match(p, no_decay) is None)))
  parts.append(optax.scale_by_learning_rate(schedule))
  if groups:
    patterns = [p for p, _ in groups]

    def multiplier(path):
      i = _first_match(path, patterns)
      return 1.0 if i is None else groups[i][1]

    parts.append(scale_by_path(multiplier))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- Optimizer

# optim fields that belong to the whole step, not to one group
_STEP_FIELDS = ("groups", "grad_accum_steps", "ema_decay", "frozen")


@dataclasses.dataclass(frozen=True)
class Group:
  """One optimizer group: the transform, its schedule and the parameter paths it updates."""
  name: str
  tx: optax.GradientTransformation
  schedule: Callable[[Any], jax.Array]
  paths: frozenset[str]


def _select(params: Any, paths: frozenset[str]) -> tuple[dict, dict]:
  flat = _flat(params)
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in paths}, sep=SEP),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in paths},
                                       sep=SEP))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optax transform per objective (``groups``, in objective order) plus the split
  that defines what is trainable.

  ``trainable`` is the static set of trainable paths (the union of the groups');
  ``split``/``merge`` move between the full params dict and ``(trainable sub-tree, frozen
  sub-tree)``; ``split_group`` does the same for one group. Sub-trees are nested dicts
  (absent leaves simply missing). ``tx`` / ``schedule`` are the first (``main``) group's.
  """
  groups: tuple[Group, ...]
  trainable: frozenset[str]

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.groups[0].tx

  @property
  def schedule(self) -> Callable[[Any], jax.Array]:
    return self.groups[0].schedule

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"no optimizer group {name!r}; groups: {[g.name for g in self.groups]}")

  def split(self, params: Any) -> tuple[dict, dict]:
    return _select(params, self.trainable)

  def split_group(self, params: Any, name: str) -> tuple[dict, dict]:
    """``(the group's sub-tree, everything else)``."""
    return _select(params, self.group(name).paths)

  def merge(self, trainable: Any, frozen: Any) -> dict:
    flat = dict(_flat(frozen))
    flat.update(_flat(trainable))
    return traverse_util.unflatten_dict(flat, sep=SEP)

  def init(self, params: Any) -> dict:
    """``{group: optax state of the group's leaves}`` (nothing for frozen parameters)."""
    return {g.name: g.tx.init(_select(params, g.paths)[0]) for g in self.groups}

  def counts(self, params: Any) -> tuple[int, int]:
    """``(trainable, frozen)`` parameter counts (works on arrays or ShapeDtypeStructs)."""
    flat = _flat(params)
    n_train = sum(_leaf_size(v) for k, v in flat.items() if k in self.trainable)
    n_frozen = sum(_leaf_size(v) for k, v in flat.items() if k not in self.trainable)
    return n_train, n_frozen


def group_config(optim_cfg: Any, name: str) -> types.SimpleNamespace:
  """``config.optim`` overridden by ``config.optim.groups[name]`` (if any); an override of a
  field ``optim`` does not have is an error naming it."""
  base = {k: v for k, v in optim_cfg.items() if k != "groups"}
  overrides = optim_cfg.groups[name].to_dict() if name in optim_cfg.groups else {}
  for key in overrides:
    if key not in base or key in _STEP_FIELDS:
      raise UnknownField(f"optim.groups.{name}.{key}",
                         [f"optim.groups.{name}.{k}" for k in base if k not in _STEP_FIELDS],
                         "a group overrides optimizer fields")
  return types.SimpleNamespace(**{**base, **overrides})


def _objectives(system: Any) -> list:
  if system is not None and hasattr(system, "objectives"):
    return list(system.objectives())
  return [objectives_lib.Objective(objectives_lib.MAIN, None)]


def make_optimizer(config: Any, params: Any, system: Any = None) -> Optimizer:
  """The optimizer groups of ``system.objectives()`` (one ``main`` group by default) for
  ``params`` (arrays or ShapeDtypeStructs), configured by ``config.optim`` (+ groups).

  ``system.trainable_mask(params)``, when the system defines it, freezes more parameters.
  An objective's ``params`` regex or an ``lr_groups`` pattern that matches no trainable
  parameter is an error, and so is a trainable parameter that no objective claims.
  """
  system_mask = None
  if system is not None and hasattr(system, "trainable_mask"):
    system_mask = system.trainable_mask(params)
  trainable = trainable_paths(params, list(config.optim.frozen), system_mask)
  unused = [p for p, _ in config.optim.lr_groups
            if not any(re.fullmatch(p, k) for k in trainable)]
  if unused:
    raise ValueError(f"optim.lr_groups patterns {unused} match no trainable parameter")
  objs = _objectives(system)
  names = [o.name for o in objs]
  if len(set(names)) != len(names):
    raise ValueError(f"objective names repeat: {names}")
  stray = sorted(set(config.optim.groups) - set(names))
  if stray:
    raise UnknownField(f"optim.groups.{stray[0]}", [f"optim.groups.{n}" for n in names],
                       f"objectives of system {config.system!r}: {names}")
  if sum(o.params is None for o in objs) > 1:
    raise ValueError("at most one objective may take the unclaimed parameters (params=None)")
  claimed: dict[str, frozenset[str]] = {}
  taken: set[str] = set()
  for o in objs:
    if o.params is not None:
      mine = frozenset(k for k in trainable if re.fullmatch(o.params, k) and k not in taken)
      if not mine:
        raise ValueError(f"objective {o.name!r}: params={o.params!r} matches no trainable "
                         f"parameter")
      claimed[o.name] = mine
      taken |= mine
  rest = frozenset(trainable - taken)
  for o in objs:
    if o.params is None:
      claimed[o.name] = rest
      rest = frozenset()
  if rest:
    raise ValueError(f"trainable parameters claimed by no objective: {sorted(rest)[:5]}")
  groups = []
  for o in objs:
    cfg = group_config(config.optim, o.name)
    schedule = make_schedule(cfg, config.total_steps)
    groups.append(Group(o.name, adamw(cfg, schedule), schedule, claimed[o.name]))
  return Optimizer(groups=tuple(groups), trainable=trainable)

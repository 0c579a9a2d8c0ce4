"""What the trainer needs from a system (a paper's method), and the registry of systems.

A system is the model composition + loss (+ sampler) of one paper. The trainer in
``mmjax.train`` only talks to this interface; plumbing (mesh, data pipeline, checkpoints,
optimizer) never lives in a system file.

Contract (all arrays are per-example numpy in ``preprocess``, global jax arrays elsewhere):

* ``model``                 a Flax Linen module whose params carry logical axis names.
* ``init(rng, batch)``      -> variables dict ``{'params': ...}`` (boxed with logical names);
                              called under ``jax.jit(out_shardings=...)`` / ``eval_shape``.
* ``loss(params, batch, rng)`` -> ``(scalar loss, dict of scalar metrics)``; pure, jittable.
* ``objectives()``           -> list of ``mmjax.train.objectives.Objective`` (default: one,
                              ``main``, from ``loss``). Multi-objective systems (a GAN's
                              generator and discriminator, each with its own optimizer
                              group; EMA codebooks as mutable collections returned by a
                              loss) override it; see ``mmjax/train/objectives.py``.
* ``preprocess(record, rng)``  -> dict of fixed-shape numpy arrays for one example; raises
                              ``mmjax.data.BadRecord`` on undecodable input.
* ``dummy_batch(batch_size)`` -> dict of numpy arrays with the batch's shapes/dtypes.
* ``batch_axes``            -> dict name -> tuple of logical axis names of the batch arrays
                              (default: leading axis 'act_batch', rest unsharded).
* ``flops_per_step(batch_size)`` -> analytic training FLOPs for one step, or None.
* ``modes()``                -> the launcher's other modes (sample, eval, export), optional.
* ``trainable_mask(params)`` -> optional pytree of bools (False = frozen, no optimizer state).
* ``prepare(workdir)``       -> optional; run by the trainer before it builds the state (e.g.
                              train a prerequisite stage into a subdirectory, read frozen
                              parts from another run).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import ml_collections

_REGISTRY: dict[str, str] = {
    # name -> "module:ClassName"; modules import lazily so a system's deps load only when used.
    "captioner": "mmjax.systems.captioner:Captioner",
    "metaquery": "mmjax.systems.metaquery.system:MetaQuery",
    "lavida": "mmjax.systems.lavida.system:Lavida",
    "dualtoken": "mmjax.systems.dualtoken.system:DualToken",
    "dualtoken_unified": "mmjax.systems.dualtoken.unified_system:UnifiedDualToken",
}


class System:
  """Base class: holds the config; subclasses implement the contract above."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  model: Any = None

  def init(self, rng, batch):
    raise NotImplementedError

  def loss(self, params, batch, rng):
    raise NotImplementedError

  def objectives(self) -> list:
    """One objective, ``main``: ``self.loss`` over every trainable parameter."""
    from mmjax.train.objectives import MAIN, Objective  # pylint: disable=import-outside-toplevel
    return [Objective(MAIN, lambda params, batch, rng, ctx: self.loss(params, batch, rng))]

  def preprocess(self, record: dict, rng) -> dict:
    raise NotImplementedError

  def dummy_batch(self, batch_size: int) -> dict:
    raise NotImplementedError

  @property
  def batch_axes(self) -> dict:
    return {k: ("act_batch",) + (None,) * (v.ndim - 1) for k, v in self.dummy_batch(1).items()}

  def flops_per_step(self, batch_size: int) -> float | None:
    return None

  def prepare(self, workdir: str) -> None:
    """Work the trainer runs before building the train state (default: none)."""

  def modes(self) -> dict[str, Callable]:
    """Extra launcher modes (sample, eval, export): name -> ``fn(params, workdir)``, called by
    ``mmjax.train.loop.run_mode`` with the newest checkpoint's params."""
    return {}


def register(name: str, target: str) -> None:
  _REGISTRY[name] = target


def get_system(config: ml_collections.ConfigDict) -> System:
  name = config.system
  if name not in _REGISTRY:
    raise KeyError(f"unknown system {name!r}; known: {sorted(_REGISTRY)}")
  module_name, cls_name = _REGISTRY[name].split(":")
  cls = getattr(importlib.import_module(module_name), cls_name)
  return cls(config)

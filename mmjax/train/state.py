"""The train state and how it is created: from abstract shapes, straight into its shardings.

``abstract_train_state`` traces the system's init and the optimizer's init with
``jax.eval_shape`` only: it returns ``ShapeDtypeStruct``s that carry their ``NamedSharding``s,
which is all that AOT compilation (``launch/aot.py``) or an Orbax restore target needs.
``create_train_state`` runs the same init under ``jax.jit(out_shardings=...)`` so each device
only ever materialises its own shards.

Example (8 virtual CPU devices)::

    from mmjax.parallel import mesh as pmesh, rules as prules
    mesh, rules = pmesh.make_mesh(config.mesh), prules.logical_rules(config)
    system = get_system(config)
    state, shardings, optimizer = create_train_state(system, config, mesh, rules)
    abstract, shardings, optimizer = abstract_train_state(system, config, mesh, rules)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmjax.parallel import sharding as psharding
from mmjax.parallel.rules import Rules, with_rules
from mmjax.train import optim as optim_lib

P = jax.sharding.PartitionSpec


class TrainState(struct.PyTreeNode):
  """``step``: completed optimizer steps (int32 scalar); ``params``: the full params dict
  (trainable and frozen); ``opt_state``: ``{group: optax state}`` of each optimizer group's
  trainable leaves (frozen ones have none); ``mutables``: the model's other collections
  (``{collection: tree}``: EMA codebooks, batch statistics; ``{}`` when there are none);
  ``ema_params``: the EMA of the trainable params (``optim.ema_decay`` > 0), else ``{}``.
  Every leaf is sharded by its logical names and checkpointed."""
  step: Any
  params: Any
  opt_state: Any
  mutables: Any = struct.field(default_factory=dict)
  ema_params: Any = struct.field(default_factory=dict)

  def eval_params(self, optimizer: Any) -> Any:
    """The parameters sampling and evaluation use: the EMA (merged with the frozen ones)
    when it is kept, else ``params``."""
    if not self.ema_params:
      return self.params
    return optimizer.merge(self.ema_params, optimizer.split(self.params)[1])


def _zeros_batch(system: Any, batch_size: int) -> dict:
  """The system's dummy batch as in-trace zeros (constants: nothing crosses to the device)."""
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in system.dummy_batch(batch_size).items()}


def _param_init_fn(system: Any, config: Any):
  def init(rng):
    return system.init(rng, _zeros_batch(system, config.data.batch_size))
  return init


def _key_name(k: Any) -> str:
  return optim_lib.path_str((k,))


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
  """Shardings for an optax state: a leaf whose key path *ends* with a parameter's path and
  has its shape (Adam's mu/nu, ...) takes that parameter's sharding; the rest (counts,
  scalars) is replicated. Works for any optax transform, no knowledge of its state needed."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(param_shardings)):
    by_path[tuple(_key_name(k) for k in path)] = (tuple(leaf.shape), sharding)
  replicated = jax.sharding.NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(_key_name(k) for k in path)
    for start in range(len(keys)):  # longest suffix first
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def abstract_train_state(system: Any, config: Any, mesh: jax.sharding.Mesh, rules: Rules,
                         optimizer: optim_lib.Optimizer | None = None
                         ) -> tuple[TrainState, TrainState, optim_lib.Optimizer]:
  """``(abstract_state, state_shardings, optimizer)``; nothing is allocated.

  ``abstract_state`` is a ``TrainState`` of ``jax.ShapeDtypeStruct`` with ``.sharding`` set;
  ``state_shardings`` the matching tree of ``NamedSharding``. Pass both (with
  ``system.dummy_batch``) to ``build_train_step(...).lower`` to AOT-compile a step.
  """
  rng = jax.random.PRNGKey(config.seed)
  variables, var_shardings = psharding.abstract_init(_param_init_fn(system, config), mesh,
                                                     rules, rng)
  params, param_shardings = variables["params"], var_shardings["params"]
  mutables = {k: v for k, v in variables.items() if k != "params"}
  mutable_shardings = {k: v for k, v in var_shardings.items() if k != "params"}
  if optimizer is None:
    optimizer = optim_lib.make_optimizer(config, params, system)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_shardings = opt_state_shardings(opt_state, params, param_shardings, mesh)
  if _ema_decay(config):
    ema, ema_shardings = optimizer.split(params)[0], optimizer.split(param_shardings)[0]
  else:
    ema, ema_shardings = {}, {}
  replicated = jax.sharding.NamedSharding(mesh, P())
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         mutables=mutable_shardings, ema_params=ema_shardings)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      params=params,
      opt_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_state, opt_shardings),
      mutables=mutables, ema_params=ema)
  return abstract, shardings, optimizer


def _ema_decay(config: Any) -> float:
  decay = float(config.optim.ema_decay)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"optim.ema_decay = {decay}; expected 0 (off) or a decay in (0, 1)")
  return decay


def create_train_state(system: Any, config: Any, mesh: jax.sharding.Mesh, rules: Rules,
                       optimizer: optim_lib.Optimizer | None = None
                       ) -> tuple[TrainState, TrainState, optim_lib.Optimizer]:
  """``(state, state_shardings, optimizer)``: fresh parameters (seeded by ``config.seed``)
  and optimizer state, created directly in their shardings by one jitted program."""
  _, shardings, optimizer = abstract_train_state(system, config, mesh, rules, optimizer)
  init_params = _param_init_fn(system, config)

  def init(rng):
    variables = nn.meta.unbox(init_params(rng))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      mutables={k: v for k, v in variables.items() if k != "params"},
                      ema_params=optimizer.split(params)[0] if _ema_decay(config) else {})

  with with_rules(rules, mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  return state, shardings, optimizer

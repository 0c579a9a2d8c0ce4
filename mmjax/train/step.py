"""One optimizer step as a single jitted, sharded XLA program.

For each of the system's objectives in order (``mmjax.train.objectives``; one ``main`` for a
one-loss system) the step differentiates its loss w.r.t. that optimizer group's *trainable*
sub-tree only (frozen parameters are passed through untouched), averaged over
``optim.grad_accum_steps`` microbatches scanned inside the program, and applies the group's
optimizer; then the model's mutable collections take the values the losses returned and the
parameter EMA (``optim.ema_decay``) moves. Metrics are replicated scalars: ``loss``,
``grad_norm`` (before clipping), ``lr`` and whatever the losses report (``disc/loss``, ...
for the other groups). Randomness is ``fold_in(PRNGKey(config.seed), state.step)``: a
resumed run draws exactly the numbers an uninterrupted one would.

Example::

    abstract, shardings, opt = abstract_train_state(system, config, mesh, rules)
    batch_sh = psharding.batch_sharding(mesh, rules, system.batch_axes)
    step = build_train_step(system, opt, mesh, rules, shardings, batch_sh)
    state, metrics = step(state, batch)                        # run
    compiled = step.lower(abstract, abstract_batch).compile()  # or AOT-compile
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.parallel.rules import Rules, with_rules
from mmjax.train import objectives as objectives_lib
from mmjax.train.optim import Optimizer
from mmjax.train.state import TrainState

P = jax.sharding.PartitionSpec


class TrainStep:
  """A jitted train step that installs the mesh and logical rules whenever it traces.

  ``__call__(state, batch) -> (state, metrics)`` (``state`` is donated);
  ``lower(state, batch)`` for AOT compilation; ``jitted`` is the bare ``jax.jit`` object.
  """

  def __init__(self, jitted, mesh: jax.sharding.Mesh, rules: Rules):
    self.jitted = jitted
    self.mesh = mesh
    self.rules = rules

  def __call__(self, state: TrainState, batch: Any):
    with with_rules(self.rules, self.mesh):
      return self.jitted(state, batch)

  def lower(self, state: Any, batch: Any):
    with with_rules(self.rules, self.mesh):
      return self.jitted.lower(state, batch)


def _microbatches(batch: Any, k: int) -> Any:
  """``[B, ...]`` -> ``[k, B/k, ...]`` with microbatch ``i`` = rows ``i, i+k, i+2k, ...``:
  every device keeps its rows (the batch axis stays sharded the same way)."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"optim.grad_accum_steps = {k} microbatches")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _unmicro(x):
  """A stacked carry ``[k, b, ...]`` back to batch order ``[b * k, ...]`` (scalars: mean)."""
  if x.ndim == 1:
    return jnp.mean(x, axis=0)
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _grads(objective, own, rest, merge, batch, rng, ctx, accum: int):
  """``(loss, grads, metrics, new mutables or None, carry or None)`` of one objective, over
  ``accum`` microbatches (scanned; gradients and metrics averaged, mutables threaded
  through the microbatches in order, carries put back in batch order)."""

  def loss_fn(own, batch, rng, mutables):
    loss, aux = objective.loss(merge(own, rest), batch, rng, ctx.replace(mutables=mutables))
    metrics, new_mutables, carry = objectives_lib.split_aux(aux)
    return loss, (metrics, new_mutables, carry)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, (metrics, new_mut, carry)), grads = grad_fn(own, batch, rng, ctx.mutables)
    return loss, grads, metrics, new_mut, carry

  returned = []  # whether the loss returns mutables: static, known once the body is traced

  def body(acc, xs):
    grads_sum, mutables = acc
    i, micro = xs
    (loss, (metrics, new_mut, carry)), grads = grad_fn(own, micro, jax.random.fold_in(rng, i),
                                                        mutables)
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    mutables = objectives_lib.update_mutables(mutables, new_mut)
    returned.append(new_mut is not None)
    return (grads_sum, mutables), (loss, metrics, carry)

  zeros = jax.tree.map(jnp.zeros_like, own)
  (grads, mutables), (losses, metrics, carry) = jax.lax.scan(
      body, (zeros, ctx.mutables), (jnp.arange(accum), _microbatches(batch, accum)))
  grads = jax.tree.map(lambda g: g / accum, grads)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  carry = None if carry is None else jax.tree.map(_unmicro, carry)
  return jnp.mean(losses), grads, metrics, mutables if returned[0] else None, carry


def train_step_fn(system: Any, optimizer: Optimizer, seed: int, accum: int = 1,
                  ema_decay: float = 0.0):
  """The pure step ``(state, batch) -> (state, metrics)`` (unjitted; for tests and tools).

  Objectives (``system.objectives()``) run in order, each differentiating its loss w.r.t.
  its own group's parameters on the params the earlier ones left; mutable collections and
  carries pass from one to the next. Metrics: ``loss``, ``grad_norm`` (before clipping),
  ``lr`` and the loss's own, prefixed ``name/`` for every group but ``main``.
  """
  objectives = list(system.objectives())

  def train_step(state: TrainState, batch: Any):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    params, mutables, carries = state.params, state.mutables, {}
    opt_state, metrics = dict(state.opt_state), {}
    for i, objective in enumerate(objectives):
      group = optimizer.group(objective.name)
      own, rest = optimizer.split_group(params, objective.name)
      ctx = objectives_lib.Context(step=state.step, mutables=mutables, carry=dict(carries))
      obj_rng = rng if i == 0 else jax.random.fold_in(rng, 1_000_003 + i)
      loss, grads, aux, new_mut, carry = _grads(objective, own, rest, optimizer.merge, batch,
                                                obj_rng, ctx, accum)
      updates, opt_state[objective.name] = group.tx.update(grads, state.opt_state[
          objective.name], own)
      params = optimizer.merge(optax.apply_updates(own, updates), rest)
      mutables = objectives_lib.update_mutables(mutables, new_mut)
      if carry is not None:
        carries[objective.name] = jax.lax.stop_gradient(carry)
      prefix = "" if objective.name == objectives_lib.MAIN else objective.name + "/"
      group_metrics = dict(aux)
      group_metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                           lr=group.schedule(state.step))
      metrics.update({prefix + k: v for k, v in group_metrics.items()})
    ema = state.ema_params
    if ema_decay:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema,
                         optimizer.split(params)[0])
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           mutables=mutables, ema_params=ema)
    return new_state, metrics

  return train_step


def build_train_step(system: Any, optimizer: Optimizer, mesh: jax.sharding.Mesh, rules: Rules,
                     state_shardings: TrainState, batch_shardings: Any) -> TrainStep:
  """``jax.jit`` of the step with explicit in/out shardings and the state donated."""
  replicated = jax.sharding.NamedSharding(mesh, P())
  c = system.config
  accum = int(c.optim.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"optim.grad_accum_steps = {accum}; expected >= 1")
  jitted = jax.jit(train_step_fn(system, optimizer, int(c.seed), accum,
                                 float(c.optim.ema_decay)),
                   in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,))
  return TrainStep(jitted, mesh, rules)

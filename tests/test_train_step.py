"""The sharded train step: same numbers on every mesh, really sharded state, frozen params,
AOT lowering from abstract shapes only."""
import jax
import numpy as np
import pytest

import train_helpers as th
from mmjax import parallel
from mmjax.train import state as state_lib, step as step_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
STEPS = 3


def _config(mesh_shape):
  c = th.tiny_config(**{"optim.frozen": ["tower"]})
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  return c


def _run(mesh_shape, initial):
  """STEPS steps on ``mesh_shape`` from the host copy ``initial`` of a fresh state."""
  c = _config(mesh_shape)
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  system = th.TinyMLP(c)
  _, shardings, opt = state_lib.abstract_train_state(system, c, mesh, rules)
  state = jax.device_put(initial, shardings)
  tower = np.asarray(state.params["tower"]).copy()
  batch_sh = parallel.batch_sharding(mesh, rules, system.batch_axes)
  train_step = step_lib.build_train_step(system, opt, mesh, rules, shardings, batch_sh)
  losses = []
  for i in range(STEPS):
    batch = parallel.host_local_to_global(th.random_batch(8), mesh, batch_sh)
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    assert set(metrics) >= {"loss", "grad_norm", "lr", "mse"}
  return state, losses, tower, opt


@pytest.fixture(scope="module")
def runs():
  # sharded init on one mesh (compiling it once is enough here), then each mesh's own
  # shardings from abstract_train_state
  c = _config((2, 2, 2))
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  state, _, _ = state_lib.create_train_state(th.TinyMLP(c), c, mesh, rules)
  assert state.params["fc1"]["kernel"].addressable_shards[0].data.shape == (8, 16)
  initial = jax.device_get(state)
  return {m: _run(m, initial) for m in MESHES}


def test_same_losses_on_every_mesh(runs):
  reference = runs[MESHES[0]][1]
  assert reference[-1] < reference[0]
  for mesh_shape, (_, losses, _, _) in runs.items():
    np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(mesh_shape))


def test_params_and_optimizer_state_are_sharded(runs):
  state = runs[(1, 2, 4)][0]
  kernel = state.params["fc1"]["kernel"]  # [16 embed -> fsdp=2, 32 mlp -> tensor=4]
  assert kernel.addressable_shards[0].data.shape == (8, 8)
  mu = state.opt_state["main"][1].mu["fc1"]["kernel"]
  assert mu.sharding == kernel.sharding
  report = parallel.param_report(state.params)
  assert report["sharded_fraction"] > 0.9
  assert state.step.sharding.is_fully_replicated


def test_frozen_tower_bitwise_and_without_state(runs):
  for state, _, tower, opt in runs.values():
    assert np.asarray(state.params["tower"]).tobytes() == tower.tobytes()
    assert "tower" not in state.opt_state["main"][1].mu
    assert opt.counts(state.params) == (1104, 256)
    assert int(state.step) == STEPS


def test_aot_lowering_from_abstract_state():
  c = th.tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  system = th.TinyMLP(c)
  abstract, shardings, opt = state_lib.abstract_train_state(system, c, mesh, rules)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
             for x in jax.tree.leaves(abstract))
  batch_sh = parallel.batch_sharding(mesh, rules, system.batch_axes)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
           for k, v in system.dummy_batch(c.data.batch_size).items()}
  train_step = step_lib.build_train_step(system, opt, mesh, rules, shardings, batch_sh)
  compiled = train_step.lower(abstract, batch).compile()
  assert compiled.cost_analysis() is not None

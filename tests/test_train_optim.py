"""Optimizer: schedules, frozen parameters, weight-decay mask, per-group learning rates."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.config import base_config
from mmjax.train import optim


def _config(**optim_fields):
  c = base_config()
  c.total_steps = 110
  c.optim.update(dict(lr=1.0, warmup_steps=10, end_lr_ratio=0.1, clip_norm=0.0,
                      weight_decay=0.0, no_decay=[], frozen=[], lr_groups=[]))
  c.optim.update(optim_fields)
  return c


def _params():
  ones = lambda *s: jnp.ones(s, jnp.float32)
  return {"enc": {"dense": {"kernel": ones(3, 4), "bias": ones(4)}, "norm": {"scale": ones(4)}},
          "dec": {"kernel": ones(4, 2)}}


@pytest.mark.parametrize("kind,expected", [
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 500: 0.1}),
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 110: 1.0}),
])
def test_schedule_values(kind, expected):
  s = optim.make_schedule(_config(schedule=kind).optim, total_steps=110)
  for step, value in expected.items():
    assert float(s(step)) == pytest.approx(value, abs=1e-6), (kind, step)
  # cosine is above linear mid-way (half-cosine shape), both at the same end points
  if kind == "cosine":
    assert float(s(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)), abs=1e-6)


def test_schedule_rejects_unknown_kind():
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_schedule(_config(schedule="step").optim, 10)


def test_frozen_params_get_no_state_and_stay_bitwise():
  params = _params()
  opt = optim.make_optimizer(_config(frozen=["enc/.*"], warmup_steps=0), params)
  assert opt.trainable == {"dec/kernel"}
  assert opt.counts(params) == (8, 12 + 4 + 4)
  state = opt.init(params)
  state_paths = {optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert not any("enc" in p for p in state_paths), state_paths
  assert any(p.endswith("dec/kernel") for p in state_paths)

  before = jax.tree.map(np.asarray, params)
  trainable, frozen = opt.split(params)
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, state["main"] = opt.tx.update(grads, state["main"], trainable)
    trainable = jax.tree.map(jnp.add, trainable, updates)
  after = opt.merge(trainable, frozen)
  for path in ("enc/dense/kernel", "enc/dense/bias", "enc/norm/scale"):
    a, b = (optim._flat(t)[path] for t in (before, after))
    assert np.asarray(b).tobytes() == np.asarray(a).tobytes(), path
  assert not np.allclose(after["dec"]["kernel"], 1.0)


def test_system_trainable_mask_and_unmatched_frozen_pattern():
  params = _params()

  class System:
    def trainable_mask(self, p):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: not optim.path_str(path).startswith("dec"), p)

  opt = optim.make_optimizer(_config(frozen=[r"enc/norm/.*"]), params, System())
  assert opt.trainable == {"enc/dense/kernel", "enc/dense/bias"}
  with pytest.raises(ValueError, match="match no parameter"):
    optim.make_optimizer(_config(frozen=["encoder/.*"]), params)


def test_weight_decay_mask():
  params = _params()
  opt = optim.make_optimizer(
      _config(warmup_steps=0, schedule="constant", lr=0.1, weight_decay=0.5,
              no_decay=[r".*bias$", r".*(norm|scale).*"]), params)
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: only decay moves params
  updates, _ = opt.tx.update(zeros, state["main"], params)
  new = jax.tree.map(jnp.add, params, updates)
  np.testing.assert_allclose(new["enc"]["dense"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_allclose(new["dec"]["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_array_equal(new["enc"]["dense"]["bias"], 1.0)
  np.testing.assert_array_equal(new["enc"]["norm"]["scale"], 1.0)


def test_lr_groups_scale_updates():
  params = _params()
  opt = optim.make_optimizer(
      _config(warmup_steps=0, schedule="constant", lr=0.1,
              lr_groups=[[r"enc/dense/.*", 0.1], [r"enc/.*", 0.5]]), params)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)  # Adam's first step moves each weight by ~lr
  updates, _ = opt.tx.update(grads, state["main"], params)
  np.testing.assert_allclose(updates["enc"]["dense"]["kernel"], -0.01, rtol=1e-5)
  np.testing.assert_allclose(updates["enc"]["norm"]["scale"], -0.05, rtol=1e-5)
  np.testing.assert_allclose(updates["dec"]["kernel"], -0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="lr_groups"):
    optim.make_optimizer(_config(lr_groups=[["nothing/.*", 2.0]]), params)


def test_clipping_and_counts_on_abstract_params():
  params = jax.eval_shape(_params)
  opt = optim.make_optimizer(_config(clip_norm=1.0), params)
  assert opt.counts(params) == (28, 0)
  concrete = _params()
  state = opt.init(concrete)
  grads = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), concrete)
  # after clipping to norm 1 Adam's first step is still ~lr (scale-invariant), finite
  updates, _ = opt.tx.update(grads, state["main"], concrete)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))

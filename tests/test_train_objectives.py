"""The trainer for multi-objective systems, end to end on 8 CPU devices: the toy tokenizer of
``train_helpers`` (an EMA-codebook autoencoder and a discriminator with its own Adam)
trains in one jitted step with two optimizer groups, mutable collections, a term that
starts at a configured step and an adaptive weight taken at a named layer; gradient
accumulation equals the large batch; the parameter EMA is what sample/eval modes get; a
SIGKILLed run resumes bit-exactly (mutables, both optimizer groups and the EMA included) and
restores onto another mesh; a NaN in the second group stops the run without saving."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import train_helpers as th
from mmjax import parallel
from mmjax.errors import UnknownField
from mmjax.train import checkpoint as ckpt_lib, loop, objectives, optim, state as state_lib
from mmjax.train import step as step_lib
from mmjax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "tpu.py")
CONFIG = os.path.join(REPO, "tests", "train_config.py") + ":tokenizer"


def _setup(config, system=None):
  config.lock()
  system = system or th.get_test_system(config)
  mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config)
  state, shardings, opt = state_lib.create_train_state(system, config, mesh, rules)
  batch_sh = parallel.batch_sharding(mesh, rules, system.batch_axes)
  step = step_lib.build_train_step(system, opt, mesh, rules, shardings, batch_sh)
  put = lambda b: parallel.host_local_to_global(b, mesh, batch_sh)
  return state, step, put, opt


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_two_groups_mutables_and_a_late_term():
  state, step, put, opt = _setup(th.toy_tokenizer_config())
  assert [g.name for g in opt.groups] == ["main", "disc"]
  assert all(p.startswith("discriminator/") for p in opt.group("disc").paths)
  assert not any(p.startswith("discriminator/") for p in opt.group("main").paths)
  # the codebook: a mutable collection sharded by logical names (mlp->tensor, embed->fsdp)
  embed = state.mutables["codebook"]["vq"]["embed"]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  history = [_host(state)]
  metrics = []
  for i in range(5):
    state, m = step(state, put(th.random_batch(8, i)))
    history.append(_host(state))
    metrics.append(_host(m))
  disc = lambda s: s.params["discriminator"]
  for k in (1, 2, 3):       # disc_start = 3: the discriminator is untouched for 3 steps
    th.assert_same(disc(history[k]), disc(history[0]))
  assert not np.array_equal(disc(history[4])["fc1"]["kernel"],
                            disc(history[3])["fc1"]["kernel"])
  assert not np.array_equal(history[2].params["vq"]["enc"]["kernel"],   # (step 0: lr 0)
                            history[1].params["vq"]["enc"]["kernel"])
  for k in range(1, 6):     # the EMA codebook moves every step (returned by the loss)
    assert not np.array_equal(history[k].mutables["codebook"]["vq"]["counts"],
                              history[k - 1].mutables["codebook"]["vq"]["counts"])
  np.testing.assert_allclose(history[1].mutables["codebook"]["vq"]["counts"].sum(),
                             0.99 * 8 + 0.01 * 8, rtol=1e-6)
  assert [m["disc/loss"] for m in metrics[:3]] == [0.0, 0.0, 0.0]
  assert all(m["disc/hinge"] > 0 for m in metrics) and metrics[3]["disc/loss"] > 0
  # each group has its own schedule: disc constant 3e-3, main warms up over 2 steps
  assert [float(m["disc/lr"]) for m in metrics] == pytest.approx([3e-3] * 5)
  assert [float(m["lr"]) for m in metrics[:2]] == pytest.approx([0.0, 5e-3])
  # its own Adam betas (0.5, 0.9): after the first non-zero gradient mu^2 / nu = 0.25 / 0.1
  adam = history[4].opt_state["disc"][1]
  mu, nu = adam.mu["discriminator"]["fc1"]["kernel"], adam.nu["discriminator"]["fc1"]["kernel"]
  nz = nu > 0
  assert nz.any()
  np.testing.assert_allclose(mu[nz] ** 2 / nu[nz], 2.5, rtol=1e-4)
  assert set(history[4].opt_state) == {"main", "disc"}


def test_layer_grads_and_adaptive_weight():
  params = {"a": {"w": jnp.array([1.0, 2.0])}, "b": jnp.array(3.0)}

  def terms(p):
    return jnp.sum(p["a"]["w"] ** 2) * p["b"], jnp.sum(jnp.sin(p["a"]["w"]))

  (t0, t1), (g0, g1) = objectives.layer_grads(terms, params, "a/w")
  np.testing.assert_allclose([t0, t1], terms(params), rtol=1e-6)
  np.testing.assert_allclose(g0, jax.grad(lambda w: terms({**params, "a": {"w": w}})[0])(
      params["a"]["w"]), rtol=1e-6)
  np.testing.assert_allclose(g1, jnp.cos(params["a"]["w"]), rtol=1e-6)
  w = objectives.adaptive_weight(g0, g1)
  np.testing.assert_allclose(w, np.linalg.norm(g0) / (np.linalg.norm(g1) + 1e-4), rtol=1e-6)
  # the weight is a constant to the outer gradient
  outer = jax.grad(lambda p: objectives.adaptive_weight(
      *objectives.layer_grads(terms, p, "a/w")[1]))(params)
  assert float(jnp.abs(outer["b"])) == 0.0
  with pytest.raises(KeyError, match="no parameter 'a/v'"):
    objectives.layer_grads(terms, params, "a/v")
  assert [float(objectives.starts_at(s, 3)) for s in (0, 2, 3, 9)] == [0, 0, 1, 1]


def test_grad_accumulation_equals_the_large_batch():
  """4 microbatches of 4 rows == one batch of 16, to fp32 tolerance, over 3 steps."""
  runs = {}
  for accum in (1, 4):
    c = th.tiny_config(**{"optim.grad_accum_steps": accum})
    state, step, put, _ = _setup(c, th.DeterministicMLP(c))
    ms = []
    for i in range(3):
      state, m = step(state, put(th.random_batch(16, i)))
      ms.append(_host(m))
    runs[accum] = (_host(state), ms)
  (s1, m1), (s4, m4) = runs[1], runs[4]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s1.params)[0],
                          jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=str(path))
  for key in ("loss", "grad_norm", "mse"):
    np.testing.assert_allclose([m[key] for m in m1], [m[key] for m in m4], rtol=1e-5)
  th.assert_same(s1.opt_state["main"][0], s4.opt_state["main"][0])   # clip state: empty


def test_grad_accumulation_threads_mutables_and_carries():
  """With 4 microbatches the EMA codebook is updated 4 times per step, in order, and the
  discriminator gets the generator's reconstructions of every row."""
  c = th.toy_tokenizer_config(**{"optim.grad_accum_steps": 4, "model.disc_start": 0})
  state, step, put, _ = _setup(c)
  state, m = step(state, put(th.random_batch(16, 0)))
  want = 8.0
  for _ in range(4):
    want = 0.99 * want + 0.01 * 4
  np.testing.assert_allclose(float(np.sum(_host(state.mutables)["codebook"]["vq"]["counts"])),
                             want, rtol=1e-6)
  assert np.isfinite(_host(m)["disc/loss"]) and _host(m)["disc/grad_norm"] > 0


def test_param_ema_is_what_sample_and_eval_get(tmp_path):
  c = th.tiny_config(**{"optim.ema_decay": 0.5, "total_steps": 2, "checkpoint_every": 2})
  state, step, put, opt = _setup(c, th.DeterministicMLP(c))
  seen = [_host(state.params)]
  for i in range(2):
    state, _ = step(state, put(th.random_batch(8, i)))
    seen.append(_host(state.params))
  want = jax.tree.map(lambda a, b, d: 0.25 * a + 0.25 * b + 0.5 * d, *seen)
  ema = _host(state.ema_params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ema)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=str(path))

  c2 = th.tiny_config(**{"optim.ema_decay": 0.5, "total_steps": 2, "checkpoint_every": 2})
  c2.lock()
  result = loop.train(c2, str(tmp_path), system=th.TinyMLP(c2))
  params, step_no = loop.restore_params(c2, str(tmp_path), th.TinyMLP(c2))
  assert step_no == 2
  th.assert_same(_host(params), _host(result.state.ema_params))
  assert not np.array_equal(_host(params)["fc1"]["kernel"],
                            _host(result.state.params)["fc1"]["kernel"])


def test_frozen_params_and_group_errors():
  c = th.toy_tokenizer_config(**{"optim.frozen": [r"vq/enc/.*"]})
  state, step, put, opt = _setup(c)
  before = _host(state.params["vq"]["enc"])
  for i in range(2):
    state, _ = step(state, put(th.random_batch(8, i)))
  th.assert_same(_host(state.params["vq"]["enc"]), before)
  paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert not any("enc" in p for p in paths) and any("vq/dec" in p for p in paths)

  bad = th.toy_tokenizer_config()
  bad.optim.groups.dsic = ConfigDict(dict(lr=1.0))
  bad.lock()
  with pytest.raises(UnknownField, match="did you mean 'optim.groups.disc'"):
    optim.make_optimizer(bad, _abstract_params(bad), th.ToyTokenizer(bad))
  typo = th.toy_tokenizer_config()
  typo.optim.groups.disc.b3 = 0.5
  typo.lock()
  with pytest.raises(UnknownField, match="optim.groups.disc.b3"):
    optim.make_optimizer(typo, _abstract_params(typo), th.ToyTokenizer(typo))
  frozen_disc = th.toy_tokenizer_config(**{"optim.frozen": [r"discriminator/.*"]})
  frozen_disc.lock()
  with pytest.raises(ValueError, match="objective 'disc'.*matches no trainable"):
    optim.make_optimizer(frozen_disc, _abstract_params(frozen_disc),
                         th.ToyTokenizer(frozen_disc))


def _abstract_params(c):
  system = th.ToyTokenizer(c)
  return jax.eval_shape(lambda: system.init(jax.random.PRNGKey(0),
                                            system.dummy_batch(8)))["params"]


def test_nan_in_the_second_group_stops_without_saving(tmp_path):
  c = th.toy_tokenizer_config(**{"model.disc_nan_at": 6, "checkpoint_every": 2})
  c.lock()
  with pytest.raises(loop.NonFiniteError, match=r"step 6: disc/\w+ = nan.*good checkpoint is "
                                                r"step 4"):
    loop.train(c, str(tmp_path), system=th.ToyTokenizer(c))
  assert ckpt_lib.step_dirs(tmp_path) == [2, 4]


def _launch(workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, LAUNCHER, "--config", CONFIG, "--workdir", str(workdir),
         "--config.total_steps=12", "--config.optim.ema_decay=0.9", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _restore_state(workdir, step, *overrides):
  from mmjax import config as config_lib
  c = config_lib.load(CONFIG, ["--config.total_steps=12", "--config.optim.ema_decay=0.9",
                               *overrides])
  system = th.ToyTokenizer(c)
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  abstract, _, _ = state_lib.abstract_train_state(system, c, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(str(workdir), c)
  try:
    return _host(ckpt.restore(step, abstract).state)
  finally:
    ckpt.close()


def test_resume_after_sigkill_is_exact_with_every_group_and_mutable(tmp_path):
  straight = tmp_path / "straight"
  out, _ = _launch(straight).communicate(timeout=300)
  assert "done: step 12" in out, out
  killed = tmp_path / "killed"
  proc = _launch(killed, "--config.model.slow_data=0.01")
  th.wait_for_checkpoint(proc, killed)
  proc.kill()
  proc.wait()
  resumed = max(ckpt_lib.step_dirs(killed))
  assert resumed < 12
  out, _ = _launch(killed).communicate(timeout=300)
  assert f"resuming from step {resumed}" in out, out
  rows = lambda w: [(r["step"], r["loss"], r["disc/loss"])
                    for r in read_jsonl(os.path.join(w, "metrics.jsonl"))]
  assert rows(killed) == rows(straight)
  final = _restore_state(straight, 12)
  th.assert_same(final, _restore_state(killed, 12))          # params, mutables, opt, EMA
  assert set(final.opt_state) == {"main", "disc"} and final.mutables and final.ema_params
  # the same checkpoint restored onto another mesh holds the same numbers
  th.assert_same(final, _restore_state(straight, 12, "--config.mesh.data=8",
                                       "--config.mesh.fsdp=1", "--config.mesh.tensor=1"))

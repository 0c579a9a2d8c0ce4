"""MetaQuery training: condition dropout to the empty prompt, the frozen MLLM through the real
trainer (bitwise unchanged, no optimizer state, counts logged), the analytic FLOPs against
XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config as mcfg
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG, TINY, tiny


def _params(system):
  return system.init_params(jax.random.PRNGKey(0))


def _batch(system, captions):
  ids, mask = system.prompts.encode_batch(captions)
  r = system.resolution
  images = np.random.default_rng(0).uniform(-1, 1, (len(captions), r, r, 3)).astype(np.float32)
  return {"images": jnp.asarray(images), "prompt_ids": jnp.asarray(ids),
          "prompt_mask": jnp.asarray(mask)}


def test_condition_dropout_is_the_empty_prompt():
  """Caption -> "" is the MLLM on the empty prompt (template and queries), not zeros."""
  keep, drop = tiny("--config.model.cond_dropout=0.0"), tiny("--config.model.cond_dropout=1.0")
  batch = _batch(keep, ["a red circle", "three blue squares"])
  rng = jax.random.key(3)
  e_ids, e_mask = keep.prompts.encode_batch(["", ""])
  ids, mask, dropped = drop._drop_captions(rng, batch["prompt_ids"], batch["prompt_mask"])
  np.testing.assert_array_equal(ids, e_ids)
  np.testing.assert_array_equal(mask, e_mask)
  assert e_mask.sum() == 2 and bool(dropped.all())              # <bos> only, per row
  ids, mask, dropped = keep._drop_captions(rng, batch["prompt_ids"], batch["prompt_mask"])
  np.testing.assert_array_equal(ids, batch["prompt_ids"])
  assert not bool(dropped.any())
  # in the loss: dropping every caption == training on empty prompts
  params = _params(drop)
  loss = jax.jit(drop.loss)
  l_drop, m = loss(params, batch, rng)
  l_empty, _ = loss(params, {**batch, "prompt_ids": jnp.asarray(e_ids),
                             "prompt_mask": jnp.asarray(e_mask)}, rng)
  assert float(m["dropped"]) == 1.0
  np.testing.assert_allclose(float(l_drop), float(l_empty), rtol=1e-6)


def test_trainer_keeps_the_mllm_bitwise_and_trains_the_queries(tmp_path, capsys):
  from mmjax.train import loop
  cfg = mcfg.load(CONFIG + ":demo", TINY + ["--config.total_steps=3", "--config.log_every=1",
                                            "--config.optim.warmup_steps=0",
                                            "--config.optim.lr=1e-2"])
  system = MetaQuery(cfg)
  init = jax.device_get(system.init_params(jax.random.PRNGKey(cfg.seed)))
  result = loop.train(cfg, str(tmp_path), system=system)
  out = capsys.readouterr().out
  after = jax.device_get(result.state.params)
  for a, b in zip(jax.tree.leaves(init["mllm"]), jax.tree.leaves(after["mllm"])):
    assert a.dtype == b.dtype and np.array_equal(a, b)          # bitwise
  assert not np.array_equal(init["queries"], after["queries"])
  assert not np.array_equal(init["markers"], after["markers"])
  assert not np.array_equal(init["connector"]["out_norm"]["scale"],
                            after["connector"]["out_norm"]["scale"])
  # no optimizer state for the MLLM (so no decay and no update of its vocabulary rows)
  from mmjax.train import optim
  opt = optim.make_optimizer(cfg, after, system)
  assert not any(p.startswith("mllm/") for p in opt.trainable)
  n_mllm = sum(a.size for a in jax.tree.leaves(after["mllm"]))
  n_train, n_frozen = opt.counts(after)
  assert n_frozen == n_mllm and f"{n_train:,} trainable, {n_frozen:,} frozen" in out
  assert np.isfinite(result.metrics["loss"]) and result.metrics["mfu"] is not None

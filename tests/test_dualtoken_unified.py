"""DualToken's unified model: layouts, the depth heads' cached steps against their
teacher-forced forward, the one-program samplers against the training forward, padded
batches against one-at-a-time, the top-k / top-p filter against transformers' warpers, the
loss's weighting and the frozen tokenizer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib, core
from mmjax.data import shapes
from mmjax.errors import ConfigError
from mmjax.systems.base import get_system
from mmjax.systems.dualtoken import sampling
from mmjax.systems.dualtoken.unified import VOCABS, UnifiedModel, exclusive_sums
from mmjax.train.objectives import Context

from dualtoken_helpers import random_variables

# 16 px images (4 x 4 positions), 2 depths, 2-layer LM and heads: the programs stay small
SMALL = ["--config.model.train_tokenizer=False", "--config.model.lm_config.num_hidden_layers=2",
         "--config.model.head.layers=2", "--config.model.seq_len=32",
         "--config.data.resolution=16", "--config.tokenizer.data.resolution=16",
         "--config.tokenizer.model.vision_config.image_size=16",
         "--config.tokenizer.model.decoder.latent=4", "--config.tokenizer.model.depths=2"]


@pytest.fixture(scope="module")
def system():
  return get_system(config_lib.load("configs/dualtoken.py:demo_unified", SMALL))


@pytest.fixture(scope="module")
def variables(system):
  return random_variables(system)     # every parameter drawn (no zero biases, unit norms)


def _batch(system, n=4, seed=0):
  src = shapes.ShapesSource(seed=seed, resolution=system.resolution,
                            categories=["single_object", "colors"])
  rng = np.random.default_rng(seed)
  exs = [system.preprocess(src[i], rng) for i in range(n)]
  return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def test_layouts(system):
  p = system.prompter
  t2i, i2t = p.t2i("a red circle"), p.i2t("a red circle")
  for ex in (t2i, i2t):
    assert ex["ids"].shape == (p.length,)
  cap = p.encode("a red circle")
  s = int(t2i["start"])
  assert list(t2i["ids"][:s]) == [p.bos_id, *cap, p.boi_id]
  assert t2i["ids"][s + p.positions] == p.eoi_id and t2i["ids"][s + p.positions + 1] == p.eos_id
  # t2i supervises <eoi> and eos as text (the visual targets are the codes), i2t the caption
  rows = np.nonzero(t2i["weights"])[0]
  assert list(t2i["targets"][rows]) == [p.eoi_id, p.eos_id] and t2i["image_weight"] == 1
  rows = np.nonzero(i2t["weights"])[0]
  assert list(i2t["targets"][rows]) == [*cap, p.eos_id] and i2t["image_weight"] == 0
  assert int(i2t["start"]) == 2 and i2t["mask"].sum() == 2 + p.positions + 1 + len(cap) + 1
  assert p.decode([*cap, p.eos_id, cap[0]]) == "a red circle"


def test_bad_config():
  with pytest.raises(ConfigError, match="text.boi"):
    get_system(config_lib.load("configs/dualtoken.py:demo_unified",
                               SMALL + ["--config.text.boi=<nope>"]))
  with pytest.raises(ConfigError, match="seq_len"):
    get_system(config_lib.load("configs/dualtoken.py:demo_unified",
                               SMALL + ["--config.model.seq_len=18"]))


def test_depth_head_cached_steps_equal_teacher_forcing(system, variables):
  model, c = system.model, system.cfg
  n = 3
  hidden = jax.random.normal(jax.random.key(1), (n, c.lm.stack.d_model))
  apply = functools.partial(model.apply, variables)
  for vocab in VOCABS:
    head = c.head(vocab)
    codes = jax.random.randint(jax.random.key(2), (n, head.depths), 0, head.codebook_size)
    full = apply(vocab, hidden, codes, method=UnifiedModel.head_logits)      # [n, D, K]
    emb = apply(vocab, codes, method=UnifiedModel.code_embeddings)
    sums = exclusive_sums(emb)
    cache = core.init_cache(head.stack, n, head.depths)
    x = apply(vocab, hidden, method=UnifiedModel.head_first_input)
    for d in range(head.depths):
      logits, cache = apply(vocab, x, d, cache, method=UnifiedModel.head_step)
      np.testing.assert_allclose(logits, full[:, d], atol=2e-5, rtol=1e-5)
      if d + 1 < head.depths:
        x = apply(vocab, sums[:, d], d + 1, method=UnifiedModel.head_code_input)


def _teacher_forced(system, variables, prompt, pix, sem):
  """Visual logits ``[N, D, K]`` (both vocabularies) the training forward gives over the
  finished sequence ``prompt + image``."""
  p = system.prompter
  seq = prompt + [p.pad_id] * system.cfg.positions + [p.eoi_id]
  ids = jnp.asarray([seq], jnp.int32)
  _, pl, sl = system.model.apply(variables, ids, jnp.ones_like(ids, bool),
                                 jnp.asarray([len(prompt)]), pix[None], sem[None])
  return pl[0], sl[0]


def test_cfg_generation_equals_training_forward(system, variables):
  """Greedy with CFG: every code the cached one-program sampler picks, at every position and
  depth of both vocabularies, is the argmax of ``u + s (c - u)`` where ``c`` and ``u`` are the
  training forward's logits over the finished conditional and blank-prompt sequences (LM
  cache, depth-head caches, embeddings, guidance)."""
  p, caption, scale = system.prompter, "a red circle", 3.0
  out = system.generate(variables, [caption], system.keys(0, [0]), cfg_scale=scale,
                        temperature=0.0)
  pix, sem = out["pixel"][0], out["semantic"][0]
  assert out["images"].shape == (1, system.resolution, system.resolution, 3)
  cond = _teacher_forced(system, variables, p.generation_prompt(caption), pix, sem)
  blank = _teacher_forced(system, variables, p.generation_prompt(""), pix, sem)
  for got, c, u in zip((pix, sem), cond, blank):
    np.testing.assert_array_equal(np.asarray(got), np.asarray((u + scale * (c - u)).argmax(-1)))
    # guidance matters: the conditional branch alone picks differently somewhere
    assert (np.asarray(c.argmax(-1)) != np.asarray(got)).any()
  assert len(np.unique(np.asarray(pix))) > 1


def test_padded_batch_equals_one_at_a_time(system, variables):
  """Sampled (temperature 1, top-k, top-p, CFG 3) images and greedy captions do not depend
  on the rest of the batch: prompts of different lengths are left-padded."""
  captions = ["a red circle", "a green triangle", ""]
  keys = system.keys(5, [0, 1, 2])
  together = system.generate(variables, captions, keys, top_p=0.9)
  for i, cap in enumerate(captions):
    alone = system.generate(variables, [cap], keys[i:i + 1], top_p=0.9)
    for k in VOCABS:
      np.testing.assert_array_equal(np.asarray(alone[k][0]), np.asarray(together[k][i]))
  batch = _batch(system, 3)
  pix, sem = system.tokenize(variables, batch["images"])
  both = system.describe(variables, pix, sem, caption_temperature=1.0,
                         keys=system.keys(1, [0, 1, 2]))
  for i in range(3):
    one = system.describe(variables, pix[i:i + 1], sem[i:i + 1], caption_temperature=1.0,
                          keys=system.keys(1, [i]))
    assert one[0] == both[i]


def test_understanding_equals_training_forward(system, variables):
  """Greedy captions from the cached program are the argmax chain of the full forward."""
  p = system.prompter
  batch = _batch(system, 2, seed=3)
  pix, sem = system.tokenize(variables, batch["images"])
  seq, start = p.understanding_prompt()
  ids, mask = p.left_pad([seq] * 2)
  out = sampling.understand(system.model, variables, jnp.asarray(ids), jnp.asarray(mask),
                            jnp.full((2,), start), pix, sem, system.keys(0, [0, 1]),
                            max_new_tokens=5, eos_id=-1, pad_id=p.pad_id)
  for r in range(2):
    toks = list(seq)
    for _ in range(5):
      arr = jnp.asarray([toks], jnp.int32)
      logits, _, _ = system.model.apply(variables, arr, jnp.ones_like(arr, bool),
                                        jnp.asarray([start]), pix[r:r + 1], sem[r:r + 1])
      toks.append(int(logits[0, -1].argmax()))
    assert list(np.asarray(out[r])) == toks[len(seq):]


def test_filter_matches_transformers_warpers():
  torch = pytest.importorskip("torch")
  from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                      TopKLogitsWarper, TopPLogitsWarper)
  logits = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32) * 3
  for temp, k, p in ((1.0, 50, 0.96), (0.7, 300, 0.5), (1.3, 10, 1.0)):
    t = torch.from_numpy(logits.copy())
    t = TemperatureLogitsWarper(temp)(None, t)
    t = TopKLogitsWarper(k)(None, t)
    if p < 1.0:
      t = TopPLogitsWarper(p)(None, t)
    want = np.isfinite(t.numpy())
    vals, idx = sampling.filter_logits(jnp.asarray(logits), temp, k, p)
    got = np.zeros_like(want)
    for r in range(4):
      got[r, np.asarray(idx[r])[np.isfinite(np.asarray(vals[r]))]] = True
    np.testing.assert_array_equal(got, want)
    kept = np.asarray(vals)[np.isfinite(np.asarray(vals))]
    np.testing.assert_allclose(np.sort(kept), np.sort(t.numpy()[want]), rtol=1e-6)


def test_loss_weights_and_frozen_tokenizer(system, variables):
  batch = _batch(system, 6, seed=1)
  ctx = Context(step=jnp.zeros((), jnp.int32), mutables={"codebook": variables["codebook"]},
                carry={})
  loss_fn = jax.jit(lambda p, b: system.unified_loss(p, b, None, ctx))
  loss, m = loss_fn(variables["params"], batch)
  w = system.config.loss
  assert np.isclose(loss, w.text * m["text_ce"] + w.pixel * m["pixel_ce"]
                    + w.semantic * m["semantic_ce"], rtol=1e-6)
  d = system.cfg.depths
  assert np.isclose(m["pixel_ce"], np.mean([m[f"pixel_ce_{i}"] for i in range(d)]), rtol=1e-6)
  # examples without an image target (i2t) do not move the visual losses
  t2i = batch["image_weight"] > 0
  assert 0 < t2i.sum() < len(t2i)
  other = dict(batch, images=np.where(t2i[:, None, None, None], batch["images"],
                                      -batch["images"]))
  _, m2 = loss_fn(variables["params"], other)
  assert np.isclose(m2["pixel_ce"], m["pixel_ce"], rtol=1e-6)
  # the tokenizer gets no gradient and is frozen for the optimizer
  mask = system.trainable_mask(variables["params"])
  assert not any(jax.tree.leaves(mask["tokenizer"]))
  assert all(jax.tree.leaves(mask["lm"])) and all(jax.tree.leaves(mask["pixel_head"]))
  grads = jax.grad(lambda p: loss_fn(p, batch)[0])(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["tokenizer"]))
  assert float(jnp.abs(grads["visual"]["proj"]["kernel"]).max()) > 0


def test_pretokenized_shards_give_the_same_batches_and_loss(system, variables, tmp_path):
  """pretokenize writes the tokenizer's codes; training from those shards
  (data.pretokenized) sees the codes the on-the-fly path computes, and the same loss."""
  from mmjax.data.pipeline import make_iterator, make_source
  from mmjax.systems.dualtoken import pretokenize
  system._tokenizer_vars = jax.device_get({"params": variables["params"]["tokenizer"],
                                           "codebook": variables["codebook"]})
  out = str(tmp_path / "codes")
  paths, n, bad = pretokenize.pretokenize(system.config, "", out, num=6, batch=4,
                                          log=lambda *a, **k: None, system=system)
  assert n == 6 and not bad and len(paths) == 1
  cfg = config_lib.load("configs/dualtoken.py:demo_unified", SMALL + [
      "--config.data.pretokenized=True", "--config.data.source=array_record",
      f"--config.data.path={out}-*.array_record", "--config.data.batch_size=6"])
  pre = get_system(cfg)
  batch = next(make_iterator(cfg.data, seed=cfg.seed, preprocess=pre.preprocess))
  assert batch["pixel_codes"].shape == (6, system.cfg.positions, system.cfg.depths)
  shards, world = make_source(cfg.data, cfg.seed), make_source(system.config.data, cfg.seed)
  got = [pre.preprocess(shards[i], np.random.default_rng(i)) for i in range(6)]
  fly = [system.preprocess(world[i], np.random.default_rng(i)) for i in range(6)]
  got, fly = ({k: np.stack([e[k] for e in exs]) for k in exs[0]} for exs in (got, fly))
  pix, sem = system.tokenize(variables, fly["images"])
  np.testing.assert_array_equal(got["pixel_codes"], np.asarray(pix))
  np.testing.assert_array_equal(got["semantic_codes"], np.asarray(sem))
  ctx = Context(step=jnp.zeros((), jnp.int32), mutables={"codebook": variables["codebook"]},
                carry={})
  a, _ = system.unified_loss(variables["params"], fly, None, ctx)
  b, _ = pre.unified_loss(variables["params"], got, None, ctx)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  with pytest.raises(Exception, match="codes"):
    pre.preprocess({"image": b"", "caption": "x"}, 0)

"""The masked-diffusion sampler: schedules (the spec's L=32 examples), remasking, temperature,
CFG, threshold decoding and EOS on hand-checkable toy logits; prefix / dual caches, padding and
embeddings on a tiny random LLaDA / Dream; one while loop in the program.

The toy "order" model reveals the commit order: at every masked answer position it predicts
token ``1 + (answer tokens committed so far)`` with logit ``SCALES[pos]`` (0 elsewhere), so a
position's confidence grows with its scale and the final answer spells out when each position
was committed.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import core
from mmjax.diffusion.masked import sampler
from mmjax.diffusion.masked.denoiser import DiffusionLM
from mmjax.diffusion.masked.sampler import generate
from mmjax.diffusion.masked.schedules import SCHEDULES, transfer_schedule
from mmjax.models.lm import DecoderLM, LMConfig

V, MASK, P, G = 40, 39, 2, 8
SCALES = jnp.array([1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
PROMPT = jnp.array([[3, 0]])                     # last prompt token 0: SCALES, 1: reversed


def order_toy(ids, attention_mask):
  answer = ids[:, P:]
  committed = jnp.sum(answer != MASK, -1)                                  # [b]
  scales = jnp.tile(SCALES, answer.shape[1] // 8)
  scales = jnp.where(ids[:, P - 1:P] == 1, scales[::-1], scales)            # [b, G]
  logits = scales[..., None] * jax.nn.one_hot(1 + committed, V)[:, None, :]
  return jnp.concatenate([jnp.zeros((ids.shape[0], P, V)), logits], 1)


toy = functools.partial(generate, order_toy, PROMPT, mask_id=MASK)


# ----------------------------------------------------------------------------- schedules
def test_shift_schedule_worked_examples_l32():
  assert transfer_schedule(32, 16, "shift").tolist() == [5, 4, 4, 3, 2, 2, 2, 2] + [1] * 8
  # The spec lists K=8 as [9, 7, 4, 4, 2, 2, 2, 1], which sums to 31 and would leave one of
  # the 32 tokens masked; the same rule that gives the K=16 example ends with 2 (sum 32).
  assert transfer_schedule(32, 8, "shift").tolist() == [9, 7, 4, 4, 2, 2, 2, 2]


def test_linear_and_cosine_schedules():
  assert transfer_schedule(10, 4).tolist() == [3, 3, 2, 2]      # remainder to the first steps
  assert transfer_schedule(8, 8).tolist() == [1] * 8
  # cosine: floor(8 (1 - cos(pi u)) / 2) at u = 0, .25, .5, .75, 1 -> 0, 1, 4, 6, 8
  assert transfer_schedule(8, 4, "cosine").tolist() == [1, 3, 2, 2]
  for kind in SCHEDULES:
    for n, k in [(32, 32), (7, 3), (64, 5)]:
      c = transfer_schedule(n, k, kind)
      assert c.sum() == n and (c >= 1).all()
  with pytest.raises(ValueError, match="steps per block"):
    transfer_schedule(4, 5)


def test_shift_schedule_drives_the_sampler():
  out = np.asarray(generate(order_toy, PROMPT, mask_id=MASK, gen_length=32, steps=8,
                            block_length=32, schedule="shift"))[0]
  values, counts = np.unique(out, return_counts=True)            # value = 1 + done before
  assert counts.tolist() == [9, 7, 4, 4, 2, 2, 2, 2]
  assert values.tolist() == (1 + np.cumsum([0, 9, 7, 4, 4, 2, 2, 2])).tolist()


# ----------------------------------------------------------------------------- remasking
def test_low_confidence_order_blocks_and_counts():
  # one block, one token per step: commit order = descending scale
  assert toy(gen_length=G, steps=8, block_length=8)[0].tolist() == [8, 4, 6, 2, 7, 1, 5, 3]
  # two blocks of 4, 4 steps each: block 0 is finished before block 1 starts
  assert toy(gen_length=G, steps=8, block_length=4)[0].tolist() == [4, 2, 3, 1, 8, 5, 7, 6]
  # linear counts [3, 3, 2] in one block: the top 3, the next 3, then the last 2
  assert toy(gen_length=G, steps=3, block_length=8)[0].tolist() == [7, 4, 4, 1, 7, 1, 4, 1]


def test_random_remasking_ignores_confidence():
  """'random' remasking commits the masked positions in a uniformly random order, whatever
  the logits: over many rows the most confident position (scale 8, always first under
  'low_confidence') goes first in about 1/8 of them; each row still commits one position per
  step; the order depends on the key only."""
  n = 800
  run = functools.partial(generate, order_toy, jnp.tile(PROMPT, (n, 1)), mask_id=MASK,
                          gen_length=G, steps=8, block_length=8, remasking="random")
  out = np.asarray(run(rng=jax.random.key(7)))
  assert (np.sort(out, 1) == np.arange(1, G + 1)).all()         # a permutation per row
  first = np.argmax(out == 1, axis=1)                            # committed at step 0
  np.testing.assert_allclose(np.bincount(first, minlength=G) / n, 1 / G, atol=0.05)
  assert len({tuple(r) for r in out.tolist()}) > n // 2           # rows draw their own order
  np.testing.assert_array_equal(np.asarray(run(rng=jax.random.key(7))), out)
  assert (np.asarray(run(rng=jax.random.key(8))) != out).any()


# ----------------------------------------------------------------------------- temperature
def test_gumbel_max_samples_softmax_of_tempered_logits():
  propose = jax.jit(sampler.propose, static_argnums=(2, 3, 4))
  logits = jnp.broadcast_to(jnp.array([1.0, 0.0, -1.0, 0.5, 9.0]), (1, 20000, 5))
  x0, conf = propose(logits, jax.random.key(0), 0.5, "low_confidence", 4)
  freq = np.bincount(np.asarray(x0[0]), minlength=5) / 20000
  want = np.asarray(jax.nn.softmax(logits[0, 0, :4] / 0.5))
  np.testing.assert_allclose(freq[:4], want, atol=0.015)
  assert freq[4] == 0                                            # [MASK] never proposed
  untempered = jax.nn.softmax(logits[0, 0, :4])                  # confidence ignores T
  np.testing.assert_allclose(conf[0, :4], untempered[np.asarray(x0[0, :4])], rtol=1e-5)
  x_arg, _ = propose(logits, jax.random.key(0), 0.0, "low_confidence", 4)
  assert (x_arg == 0).all()


def test_temperature_zero_is_argmax():
  greedy = toy(gen_length=G, steps=8, block_length=8)
  cold = toy(gen_length=G, steps=8, block_length=8, temperature=1e-3, rng=jax.random.key(3))
  assert greedy.tolist() == cold.tolist()


# ----------------------------------------------------------------------------- CFG
def cfg_toy(ids, attention_mask):
  """cond logits [2, 1.9]; with the prompt replaced by [MASK]: [2, 1.0]."""
  uncond = (ids[:, :P] == MASK).all(-1)[:, None, None]
  c, u = jnp.array([2.0, 1.9] + [0.0] * (V - 2)), jnp.array([2.0, 1.0] + [0.0] * (V - 2))
  return jnp.broadcast_to(jnp.where(uncond, u, c), ids.shape + (V,))


@pytest.mark.parametrize("w,token", [(0.0, 0), (0.1, 0), (0.2, 1)])
def test_cfg_formula(w, token):
  # u + (w + 1)(c - u) on token 1: 1 + (w + 1) 0.9 -> 1.9, 1.99, 2.08 vs 2 on token 0
  out = generate(cfg_toy, PROMPT, mask_id=MASK, gen_length=4, steps=4, cfg_scale=w)
  assert out.tolist() == [[token] * 4]


# ----------------------------------------------------------------------------- threshold, EOS
def test_threshold_decoding_hand_checked():
  # confidences e^s / (e^s + 38): s = 8, 7, 6 are >= 0.9, then one per step
  out, nfe = toy(gen_length=G, block_length=8, threshold=0.9, return_nfe=True)
  assert out[0].tolist() == [8, 4, 6, 1, 7, 1, 5, 1] and int(nfe) == 6
  out, nfe = toy(gen_length=G, block_length=4, threshold=0.9, return_nfe=True)
  assert out[0].tolist() == [4, 2, 3, 1, 8, 5, 7, 5] and int(nfe) == 7
  # a threshold no confidence reaches commits exactly one token per step: the plain sampler
  forced = toy(gen_length=G, block_length=4, threshold=1.5)
  assert forced.tolist() == toy(gen_length=G, steps=8, block_length=4).tolist()


def test_threshold_batch_lockstep_equals_rows_alone():
  both = jnp.array([[3, 0], [3, 1]])
  kw = dict(mask_id=MASK, gen_length=G, block_length=4, threshold=0.9)
  batch = generate(order_toy, both, **kw)
  for r in range(2):
    assert batch[r].tolist() == generate(order_toy, both[r:r + 1], **kw)[0].tolist()


def test_eos_truncates_the_answer():
  table = jax.nn.one_hot(jnp.array([5, 6, 9, 7, 9, 8, 7, 6]), V) * 4.0

  def fixed(ids, attention_mask):
    return jnp.concatenate([jnp.zeros((1, P, V)), table[None]], 1)
  kw = dict(mask_id=MASK, gen_length=G, steps=4)
  assert generate(fixed, PROMPT, **kw)[0].tolist() == [5, 6, 9, 7, 9, 8, 7, 6]
  assert generate(fixed, PROMPT, eos_id=9, **kw)[0].tolist() == [5, 6, 9, 9, 9, 9, 9, 9]


def test_unknown_options_are_errors():
  kw = dict(gen_length=G, steps=8, block_length=4)
  for bad in (dict(remasking="entropy"), dict(schedule="exp"), dict(cache="prefx"),
              dict(block_length=3), dict(steps=7), dict(steps=16), dict(cache="prefix"),
              dict(threshold=0.0), dict(temperature=-1.0)):
    with pytest.raises(ValueError):
      toy(**{**kw, **bad})


# ----------------------------------------------------------------------------- one XLA loop
def _walk(jaxpr, into_loops):
  """(while loops, equations) of a jaxpr, through nested jit calls (and loop bodies)."""
  whiles, eqns = 0, 0
  for eqn in jaxpr.eqns:
    eqns += 1
    name = eqn.primitive.name
    whiles += name == "while"
    if name in ("while", "cond", "scan") and not into_loops:
      continue
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
          w, e = _walk(sub.jaxpr, into_loops)
          whiles, eqns = whiles + w, eqns + e
  return whiles, eqns


def test_sampler_is_one_while_loop(tiny):
  lm, prompt, mask = tiny["llada"], tiny["prompt"], tiny["mask"]
  sizes = []
  for steps in (4, 8):
    jaxpr = jax.make_jaxpr(lambda pr, m: generate(
        lm, pr, m, gen_length=G, steps=steps, block_length=4, mask_id=MASK,
        cache="dual"))(prompt, mask)
    assert _walk(jaxpr.jaxpr, into_loops=False)[0] == 1       # the step loop, nothing else
    sizes.append(_walk(jaxpr.jaxpr, into_loops=True)[1])
  assert sizes[0] == sizes[1]                                  # no Python per step
  jaxpr = jax.make_jaxpr(lambda: toy(gen_length=G, block_length=4, threshold=0.9))()
  assert _walk(jaxpr.jaxpr, into_loops=False)[0] == 1


# ----------------------------------------------------------------------------- tiny LMs
@pytest.fixture(scope="module")
def tiny():
  """A random LLaDA-style and a Dream-style (shifted logits) LM sharing one parameter tree,
  both with the Prefix-DLM mask. Parameters are drawn with numpy from the abstract shapes
  (no compiled init); large weights make the logits peaked, so argmax ties do not occur."""
  def config(shift):
    return LMConfig(family="llada", vocab_size=V, attention="bidirectional", shift_logits=shift,
                    stack=core.TransformerConfig(num_layers=2, d_model=32, num_heads=4,
                                                 mlp_dim=64, rope_theta=500000.0))
  shapes = jax.eval_shape(DecoderLM(config(False)).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def draw(path, s):
    noise = rng.normal(size=s.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return {"llada": DiffusionLM(DecoderLM(config(False)), params, prefix_dlm=True),
          "dream": DiffusionLM(DecoderLM(config(True)), params, prefix_dlm=True),
          "prompt": jnp.array([[0, 5, 6, 7], [1, 2, 3, 4]]),        # row 0 left padded
          "mask": jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)}


@functools.partial(jax.jit, static_argnames=("start",))
def _cache_paths(lm, prompt, mask, answer, start):
  """Logits of the full pass vs the prefix cache and a dual-cache block step."""
  b, p = mask.shape
  g, bl = answer.shape[1], 4
  slot = jnp.concatenate([mask, jnp.ones_like(answer, bool)], 1)
  pos = core.positions_from_padding(slot)
  emb = jnp.concatenate([lm.embed(prompt), lm.embed(answer)], 1)
  h, kv = lm.hidden(emb, slot, p, with_cache=True)
  full = lm.block_logits(h, p, g)
  h_prompt, kv_prompt = lm.prefill(emb[:, :p], mask, p + g)
  h_ans = lm.extend(emb[:, p:], kv_prompt, slot, pos[:, p:])
  prefix = lm.block_logits(jnp.concatenate([h_prompt[:, -1:], h_ans], 1), 1, g)
  kv = kv.replace(index=jnp.full_like(kv.index, p + start))     # rewrite the block in place
  h_blk = lm.extend(emb[:, p + start:p + start + bl], kv, slot, pos[:, p + start:][:, :bl])
  dual = lm.block_logits(jnp.concatenate([h[:, p + start - 1:p + start], h_blk], 1), 1, bl)
  return full, prefix, dual


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cache_logits_equal_full_pass(tiny, family):
  answer = jnp.array([[MASK, 9, MASK, MASK, 4, MASK, MASK, 2]] * 2)
  full, prefix, dual = _cache_paths(tiny[family], tiny["prompt"], tiny["mask"], answer, 4)
  np.testing.assert_allclose(prefix, full, atol=2e-5)           # prefix-DLM: exact
  np.testing.assert_allclose(dual, full[:, 4:], atol=2e-5)      # right after a refresh


def test_prefix_cache_padding_embeds_and_dual_tokens(tiny):
  lm, prompt, mask = tiny["llada"], tiny["prompt"], tiny["mask"]
  kw = dict(gen_length=G, steps=8, block_length=1, mask_id=MASK)
  ref = generate(lm, prompt, mask, **kw)
  assert generate(lm, prompt, mask, cache="prefix", **kw).tolist() == ref.tolist()
  alone = generate(lm, None, None, prompt_embeds=lm.embed(prompt[:1, 1:]), **kw)
  assert alone[0].tolist() == ref[0].tolist()                   # padded row == alone
  # dual cache refreshed every step (block 1) + a threshold that forces one token per step
  dual = generate(lm, prompt, mask, cache="dual", threshold=1.5, **{**kw, "steps": None})
  assert dual.tolist() == ref.tolist()
  out, nfe = generate(lm, prompt, mask, gen_length=G, block_length=4, mask_id=MASK,
                      cache="dual", threshold=0.3, return_nfe=True)
  assert not (out == MASK).any() and 2 <= int(nfe) <= G


def test_dream_prefix_cache_with_cfg(tiny):
  lm, prompt, mask = tiny["dream"], tiny["prompt"], tiny["mask"]
  kw = dict(gen_length=G, steps=4, block_length=4, mask_id=MASK, cfg_scale=1.0)
  ref = generate(lm, prompt, mask, **kw)
  assert generate(lm, prompt, mask, cache="prefix", **kw).tolist() == ref.tolist()

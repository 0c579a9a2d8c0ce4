"""Infill with the masked-diffusion sampler (LaViDa-FIM inference): a draft whose [M]
positions are filled while every other token stays fixed, in the same one-program loop.

The toy "order" model reveals the commit order: at every answer position it predicts token
``1 + (answer positions not [MASK])`` with logit ``SCALES[pos]`` (0 elsewhere). Fixed draft
tokens count as not masked and use ids >= 40, so an output value ``v < 40`` at a hole means
"committed when ``v - 1`` answer tokens were known" and the most confident hole (largest
scale) goes first.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import core
from mmjax.diffusion.masked import schedules
from mmjax.diffusion.masked.denoiser import DiffusionLM
from mmjax.diffusion.masked.drafts import pad_drafts, strip_tokens
from mmjax.diffusion.masked.sampler import generate
from mmjax.diffusion.masked.schedules import infill_schedule
from mmjax.models.lm import DecoderLM, LMConfig

V, M, P = 64, 63, 2
SCALES = jnp.array([1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0] * 4)
PROMPT = jnp.array([[3, 0]])                     # last prompt token 0: SCALES, 1: reversed
A, B, C, D, E = 40, 41, 42, 43, 44               # fixed draft tokens


def order_toy(ids, attention_mask):
  answer, real = ids[:, P:], attention_mask[:, P:]
  n = answer.shape[1]
  known = jnp.sum((answer != M) & real, -1)                                   # [b]
  scales = jnp.where(ids[:, P - 1:P] == 1, SCALES[:n][::-1], SCALES[:n])       # [b, n]
  logits = scales[..., None] * jax.nn.one_hot(1 + known, V)[:, None, :]
  return jnp.concatenate([jnp.zeros((ids.shape[0], P, V)), logits], 1)


def toy(draft, **kw):
  out, nfe = generate(order_toy, PROMPT, draft_ids=jnp.array([draft]), mask_id=M,
                      return_nfe=True, **kw)
  return out[0].tolist(), int(nfe)


# ----------------------------------------------------------------------------- hand-checked
DRAFT = [A, M, M, B, M, M, M, C]      # holes at 1, 2, 4, 5, 6 with scales 5, 3, 2, 8, 4


def test_fixed_tokens_kept_low_confidence_order_one_per_step():
  # 5 holes, 8 steps for the 8-token block: 'jump' gives ceil(8 * 5 / 8) = 5 steps of 1;
  # order by scale: pos 5 (8), 1 (5), 6 (4), 2 (3), 4 (2); 3 tokens are known from the start
  assert toy(DRAFT, steps=8) == ([A, 5, 7, B, 8, 4, 6, C], 5)


def test_reveal_counts_count_only_the_holes():
  assert infill_schedule(5, 4, 8).tolist() == [2, 2, 1]                  # ceil(4 * 5 / 8) = 3
  assert toy(DRAFT, steps=4) == ([A, 4, 6, B, 8, 4, 6, C], 3)             # [2, 2, 1]
  assert infill_schedule(5, 4, 8, rule="full").tolist() == [2, 1, 1, 1]  # min(4, 5) steps
  assert toy(DRAFT, steps=4, infill_steps="full") == ([A, 4, 7, B, 8, 4, 6, C], 4)
  assert toy(DRAFT, steps=1) == ([A, 4, 4, B, 4, 4, 4, C], 1)            # all 5 at once


def test_block_without_holes_is_skipped():
  # block 0 is all fixed: no model call; block 1 has 3 holes (scales 2, 4, 6) -> 3 steps
  assert toy([A, B, C, D, M, E, M, M], steps=8, block_length=4) == (
      [A, B, C, D, 8, E, 7, 6], 3)
  # holes in both blocks: block 0 (scales 5, 7) first, then block 1 (scale 8)
  assert toy([A, M, B, M, C, M, D, E], steps=8, block_length=4) == (
      [A, 7, B, 6, C, 8, D, E], 3)


def test_shift_schedule_exact_counts_on_scattered_holes():
  rng = np.random.default_rng(0)
  draft = np.where(rng.random(32) < 0.6, M, rng.integers(40, 63, 32))
  m = int((draft == M).sum())
  want = infill_schedule(m, 8, 32, "shift").tolist()                    # ceil(8 m / 32) steps
  out, nfe = toy(draft.tolist(), steps=8, schedule="shift")
  out = np.array(out)
  assert (out[draft != M] == draft[draft != M]).all()
  values, counts = np.unique(out[draft == M], return_counts=True)      # value = 1 + known
  assert counts.tolist() == want and nfe == len(want)
  assert values.tolist() == (1 + (32 - m) + np.cumsum([0] + want[:-1])).tolist()


def test_all_holes_draft_is_plain_generate():
  for kw in (dict(steps=8, block_length=8), dict(steps=4, block_length=4, schedule="shift"),
             dict(block_length=4, threshold=0.9)):
    plain = generate(order_toy, PROMPT, gen_length=16, mask_id=M, return_nfe=True, **kw)
    draft = generate(order_toy, PROMPT, draft_ids=jnp.full((1, 16), M), mask_id=M,
                     return_nfe=True, **kw)
    assert plain[0].tolist() == draft[0].tolist() and int(plain[1]) == int(draft[1])


def test_threshold_infill():
  # confidences e^s / (e^s + 62): only scale 8 (pos 5) clears 0.9, so one token per step
  assert toy(DRAFT, threshold=0.9) == ([A, 5, 7, B, 8, 4, 6, C], 5)
  assert toy(DRAFT, threshold=0.01) == ([A, 4, 4, B, 4, 4, 4, C], 1)


def test_fixed_tokens_never_change_under_sampling():
  rng = np.random.default_rng(1)
  draft = np.where(rng.random((3, 16)) < 0.5, M, rng.integers(40, 63, (3, 16)))
  draft[:, 0] = M
  out = generate(order_toy, jnp.array([[3, 0]] * 3), draft_ids=draft, mask_id=M, steps=8,
                 block_length=8, temperature=1.0, remasking="random", rng=jax.random.key(5))
  out = np.asarray(out)
  assert (out[draft != M] == draft[draft != M]).all() and not (out == M).any()


def test_eos_truncates_each_run_and_keeps_fixed_tokens():
  table = jax.nn.one_hot(jnp.array([5, 9, 7, 0, 9, 8, 0, 6]), V) * 4.0

  def fixed(ids, attention_mask):
    return jnp.broadcast_to(jnp.concatenate([jnp.zeros((P, V)), table]), ids.shape + (V,))
  draft = jnp.array([[M, M, M, A, M, M, 9, M]])           # runs 0-2, 4-5, 7; a fixed EOS
  kw = dict(draft_ids=draft, mask_id=M, steps=4)
  assert generate(fixed, PROMPT, **kw)[0].tolist() == [5, 9, 7, A, 9, 8, 9, 6]
  # run 0 ends at its EOS; run 1 starts with EOS; run 2 is not ended by the fixed EOS
  assert generate(fixed, PROMPT, eos_id=9, **kw)[0].tolist() == [5, 9, 9, A, 9, 9, 9, 6]


# ----------------------------------------------------------------------------- batching
def test_padded_batch_equals_one_at_a_time():
  drafts = [[A, M, M, B, M, M, M, C, M, D, M, M],      # 12 tokens
            [M, B, M, M, E],                           # 5 tokens, scales reversed
            [A, B, C, D, E, A, M, M, M]]               # block 0 all fixed in this row
  prompts = jnp.array([[3, 0], [3, 1], [3, 0]])
  ids, mask = pad_drafts(drafts, pad_id=7)
  for kw in (dict(steps=12, block_length=4, schedule="shift"),
             dict(steps=16, block_length=4, infill_steps="full"),
             dict(block_length=4, threshold=0.9)):
    kw = dict(kw, mask_id=M, gen_length=16, eos_id=9)
    batch = np.asarray(generate(order_toy, prompts, draft_ids=ids, draft_mask=mask, **kw))
    for r, d in enumerate(drafts):
      alone = generate(order_toy, prompts[r:r + 1], draft_ids=jnp.array([d]), **kw)[0]
      assert batch[r].tolist() == alone.tolist(), (kw, r)
      assert batch[r, len(d):].tolist() == [9] * (16 - len(d))           # padding -> eos
  # one block, 'full' steps: a shorter draft padded in a batch == it alone, unpadded
  kw = dict(mask_id=M, steps=4, infill_steps="full")
  batch = generate(order_toy, jnp.array([[3, 0]] * 2), draft_ids=ids[[0, 2]],
                   draft_mask=mask[[0, 2]],
                   **kw)                                               # gen_length 12
  alone = generate(order_toy, PROMPT, draft_ids=[drafts[2]], **kw)     # gen_length 9
  assert batch[1, :9].tolist() == alone[0].tolist()
  assert batch[1, 9:].tolist() == [M] * 3                             # no eos_id: [MASK]


def test_traced_draft_under_jit():
  kw = dict(mask_id=M, steps=4, block_length=4, gen_length=8)
  run = jax.jit(lambda d, m: generate(order_toy, PROMPT, draft_ids=d, draft_mask=m, **kw))
  d, m = pad_drafts([DRAFT[:6]], length=8)
  assert run(d, m).tolist() == generate(order_toy, PROMPT, draft_ids=[DRAFT[:6]],
                                        **kw).tolist()
  jaxpr = jax.make_jaxpr(lambda d, m: generate(order_toy, PROMPT, draft_ids=d, draft_mask=m,
                                               **kw))(d, m)
  assert _whiles(jaxpr.jaxpr) == 1                                  # one loop, no others


def _whiles(jaxpr):
  """While loops of a jaxpr through nested jit calls, not counting loops inside loops."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("while", "scan"):
      n += 1
      continue
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
          n += _whiles(sub.jaxpr)
  return n


# ----------------------------------------------------------------------------- errors, helpers
def test_bad_drafts_are_errors():
  kw = dict(mask_id=M, steps=4)
  cases = [
      (dict(draft_ids=[DRAFT], gen_length=4), "longer than gen_length"),
      (dict(draft_ids=[[A, B, C, D]]), r"rows \[0\] have no \[M\]"),
      (dict(draft_ids=[[A, M], [B, C]], gen_length=4), "2 rows, the prompt 1"),
      (dict(draft_ids=[DRAFT], draft_mask=[[True] + [False] * 7]), r"no \[M\]"),
      (dict(draft_ids=[DRAFT], draft_mask=[[True] * 3]), "shape of draft_ids"),
      (dict(draft_ids=DRAFT), r"\[batch, D>=1\]"),
      (dict(draft_ids=[[M, -1, M, M]]), "not a token id"),
      (dict(draft_ids=[[M, 1.0, M, M]]), "integer token ids"),
      (dict(draft_ids=[DRAFT], infill_steps="half"), "infill_steps"),
      (dict(gen_length=8, draft_mask=[[True] * 8]), "draft_mask needs draft_ids"),
      (dict(), "give gen_length"),
  ]
  for extra, msg in cases:
    with pytest.raises(ValueError, match=msg):
      generate(order_toy, PROMPT, **{**kw, **extra})
  with pytest.raises(ValueError, match="steps per block"):
    generate(order_toy, PROMPT, **{**kw, "draft_ids": [DRAFT], "steps": 16})


def test_strip_tokens_and_pad_drafts():
  S_, FIM = 50, 51           # [S] filler and [FIM] marker: a FIM model's variable-length infill
  out = jnp.array([[A, 3, 4, S_, S_, FIM, B, 5, FIM, 9, 9]])
  assert strip_tokens(out, (S_, FIM, 9), pad_id=9).tolist() == [[A, 3, 4, B, 5] + [9] * 6]
  ids, mask = pad_drafts([[1, 2], [3]], length=3, pad_id=M)
  assert ids.tolist() == [[1, 2, M], [3, M, M]] and mask.sum(1).tolist() == [2, 1]
  with pytest.raises(ValueError):
    pad_drafts([[1, 2, 3]], length=2)


def test_infill_steps_rules():
  steps_for = schedules.infill_steps_for
  assert [steps_for(m, 16, 32) for m in (1, 2, 3, 16, 17, 32)] == [1, 1, 2, 8, 9, 16]
  assert [steps_for(m, 16, 32, "full") for m in (1, 3, 16, 32)] == [1, 3, 16, 16]
  for schedule in schedules.SCHEDULES:
    for rule in schedules.INFILL_STEPS:
      table = schedules.infill_table(32, 16, schedule, 1 / 3, rule)
      assert table.sum(1).tolist() == list(range(33))                   # every hole, once
      assert (table[32] == schedules.transfer_schedule(32, 16, schedule)).all()


# ----------------------------------------------------------------------------- tiny LLaDA
@pytest.fixture(scope="module")
def tiny():
  """A random Prefix-DLM LLaDA (prompt never attends to the answer, so the prefix cache is
  exact) and a Dream-style one; numpy parameters from abstract shapes, peaked logits."""
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


TINY_DRAFTS = [[M, 11, M, M, 12, 13, M, M], [20, M, M, M, 21]]


def test_tiny_llada_prefix_cache_and_padding(tiny):
  lm, prompt, mask = tiny["llada"], tiny["prompt"], tiny["mask"]
  ids, dmask = pad_drafts(TINY_DRAFTS, pad_id=0)
  kw = dict(gen_length=8, steps=8, block_length=4, mask_id=M)
  ref = generate(lm, prompt, mask, draft_ids=ids, draft_mask=dmask, **kw)
  assert generate(lm, prompt, mask, draft_ids=ids, draft_mask=dmask, cache="prefix",
                  **kw).tolist() == ref.tolist()
  for r, d in enumerate(TINY_DRAFTS):
    assert (np.asarray(ref[r, :len(d)])[np.array(d) != M] == np.array(d)[np.array(d) != M]).all()
  # row 0 alone: prompt unpadded (as embeddings)
  alone = generate(lm, None, None, prompt_embeds=lm.embed(prompt[:1, 1:]),
                   draft_ids=[TINY_DRAFTS[0]], cache="prefix", **kw)
  assert alone[0].tolist() == ref[0].tolist()
  assert not (ref[0] == M).any() and (ref[1, 5:] == M).all()


def test_tiny_llada_short_draft_alone_and_dual_cache(tiny):
  lm, prompt, mask = tiny["llada"], tiny["prompt"], tiny["mask"]
  ids, dmask = pad_drafts(TINY_DRAFTS, pad_id=0)
  kw = dict(gen_length=8, steps=8, block_length=4, mask_id=M)
  alone = generate(lm, prompt[1:], draft_ids=[TINY_DRAFTS[1]], **kw)   # draft unpadded
  ref = generate(lm, prompt, mask, draft_ids=ids, draft_mask=dmask, **kw)
  assert alone[0].tolist() == ref[1].tolist()
  # dual cache refreshed every step (block 1, one token per step) == no cache
  one = dict(kw, block_length=1, steps=None, threshold=1.5)
  assert generate(lm, prompt, mask, draft_ids=ids, draft_mask=dmask, cache="dual",
                  **one).tolist() == generate(lm, prompt, mask, draft_ids=ids,
                                              draft_mask=dmask, **one).tolist()


def test_tiny_dream_prefix_cache_cfg_infill(tiny):
  lm, prompt, mask = tiny["dream"], tiny["prompt"], tiny["mask"]
  ids, dmask = pad_drafts(TINY_DRAFTS, pad_id=0)
  kw = dict(gen_length=8, steps=4, block_length=8, mask_id=M, cfg_scale=1.0,
            draft_ids=ids, draft_mask=dmask)
  ref = generate(lm, prompt, mask, **kw)
  assert generate(lm, prompt, mask, cache="prefix", **kw).tolist() == ref.tolist()
  with pytest.raises(ValueError, match="not a token id"):
    generate(lm, prompt, mask, **{**kw, "draft_ids": jnp.full((2, 8), V + 1).at[:, 0].set(M)})

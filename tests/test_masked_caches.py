"""The block-wise KV caches of the masked-diffusion sampler on tiny random LMs: Fast-dLLM's
block-prefix cache ('block') and Elastic-Cache's drift refresh ('elastic') next to 'dual'.

Where a cache is exact it must give the tokens of full recomputation: with one layer every
cached K/V is a function of its token alone, and finished blocks and the masked suffix do
not change inside a block, so 'block', 'dual' and 'elastic' all equal 'none'; 'elastic'
refreshing every step (``refresh_gamma > 1``) equals 'none' at any depth. With two layers
'block' equals a plain Python re-implementation of Fast-dLLM's prefix-cache loop, and
'elastic' refreshes when the block's attention moves and not when it stays.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import core
from mmjax.diffusion.masked import caches
from mmjax.diffusion.masked.denoiser import DiffusionLM
from mmjax.diffusion.masked.sampler import generate, propose, top_k_mask
from mmjax.diffusion.masked.schedules import transfer_schedule
from mmjax.models.lm import DecoderLM, LMConfig

V, MASK, G, BL = 40, 39, 16, 4
PROMPT = jnp.array([[0, 5, 6, 7], [1, 2, 3, 4]])                 # row 0 left padded
PMASK = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)


def tiny_lm(layers: int, shift: bool = False) -> DiffusionLM:
  """A random LLaDA-style (or Dream-style, shifted) LM with the Prefix-DLM mask; weights
  drawn in numpy, large enough that the logits are peaked (no argmax ties)."""
  cfg = LMConfig(family="llada", vocab_size=V, attention="bidirectional", shift_logits=shift,
                 stack=core.TransformerConfig(num_layers=layers, d_model=32, num_heads=4,
                                              mlp_dim=64, rope_theta=500000.0))
  shapes = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(layers)

  def draw(path, s):
    noise = rng.normal(size=s.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise
  return DiffusionLM(DecoderLM(cfg), jax.tree_util.tree_map_with_path(draw, shapes),
                     prefix_dlm=True)


@pytest.fixture(scope="module")
def lms():
  return {1: tiny_lm(1), 2: tiny_lm(2), "dream": tiny_lm(2, shift=True)}


def test_one_layer_caches_are_exact(lms):
  lm = lms[1]
  kw = dict(gen_length=G, block_length=BL, mask_id=MASK)
  for decoding in (dict(steps=G), dict(threshold=0.5)):
    ref = generate(lm, PROMPT, PMASK, **kw, **decoding)
    for cache in ("block", "dual", "elastic"):
      out = generate(lm, PROMPT, PMASK, cache=cache, **kw, **decoding)
      assert out.tolist() == ref.tolist(), (cache, decoding)


@pytest.mark.parametrize("name", [2, "dream"])
def test_elastic_refreshing_every_step_is_no_cache(lms, name):
  lm = lms[name]
  kw = dict(gen_length=G, steps=G // 2, block_length=BL, mask_id=MASK)
  ref = generate(lm, PROMPT, PMASK, **kw)
  out = generate(lm, PROMPT, PMASK, cache="elastic", refresh_gamma=1.5, **kw)
  assert out.tolist() == ref.tolist()


def _fast_dllm_prefix_loop(lm, steps_per_block: int):
  """Fast-dLLM's prefix-cache decoding written out step by step in Python: each block starts
  with a full pass (its logits commit, its K/V are kept); then the block and everything
  after it run against the kept K/V of the prompt and the finished blocks."""
  b, p = PMASK.shape
  slot = jnp.concatenate([PMASK, jnp.ones((b, G), bool)], 1)
  pos = core.positions_from_padding(slot)
  pe = lm.embed(PROMPT)
  x = jnp.full((b, G), MASK, jnp.int32)
  counts = transfer_schedule(BL, steps_per_block)
  for start in range(0, G, BL):
    for j in range(steps_per_block):
      if j == 0:
        h, kv = lm.hidden(jnp.concatenate([pe, lm.embed(x)], 1), slot, p, with_cache=True)
        logits = lm.block_logits(h, p + start, BL)
      else:
        at = kv.replace(index=jnp.full_like(kv.index, p + start))
        h = lm.extend(lm.embed(x[:, start:]), at, slot, pos[:, p + start:])
        logits = lm.block_logits(h, 0, BL)
      x0, conf = propose(logits, jax.random.key(0), 0.0, "low_confidence", MASK)
      masked = x[:, start:start + BL] == MASK
      conf = jnp.where(masked, conf, -jnp.inf)
      pick = top_k_mask(conf, jnp.full((b,), int(counts[j]))) & masked
      x = x.at[:, start:start + BL].set(jnp.where(pick, x0, x[:, start:start + BL]))
  return x


def test_block_prefix_cache_is_fast_dllm_prefix_loop(lms):
  lm = lms[2]
  out = generate(lm, PROMPT, PMASK, gen_length=G, steps=G // 2, block_length=BL,
                 mask_id=MASK, cache="block")
  assert out.tolist() == _fast_dllm_prefix_loop(lm, 2).tolist()


def _layout(lm):
  b, p = PMASK.shape
  slot = jnp.concatenate([PMASK, jnp.ones((b, G), bool)], 1)
  return caches.Layout(p, G, BL, slot, core.positions_from_padding(slot), guided=False)


def test_elastic_drift_test_refreshes_when_attention_moves(lms):
  """A full pass (block 0), block 1's first step (block 0 rewritten, the attention reference
  set), the same tokens again (similarity 1: kept), then block 1 rewritten: with gamma 0.999
  the drift test fails and the step is a refresh (no reference after it); with gamma 0 the
  cheap step stays."""
  lm = lms[2]

  @jax.jit
  def run(gamma):
    strat = caches.make("elastic", lm, _layout(lm), lm.embed(PROMPT), refresh_gamma=gamma)
    x = jnp.full((2, G), MASK, jnp.int32)
    _, state = strat.logits(x, 0, jnp.int32(0), strat.init())          # full pass
    x = x.at[:, :BL].set(5)
    _, state = strat.logits(x, BL, jnp.int32(1), state)                 # rewrite + window
    _, state = strat.logits(x, BL, jnp.int32(1), state)                 # reference set
    moved = x.at[:, BL:2 * BL].set(jnp.array([7, 11, 13, 17]))
    logits, state = strat.logits(moved, BL, jnp.int32(1), state)        # drift test
    return logits, state[-1]
  refreshed_logits, has_ref = run(0.999)
  assert not bool(has_ref)
  kept_logits, has_ref = run(0.0)
  assert bool(has_ref)
  assert not np.allclose(refreshed_logits, kept_logits)


def test_window_attention_weights(lms):
  """``DiffusionLM.window``: the hidden states of ``extend``; per layer and query the
  head-averaged attention weights sum to 1 over the real slots and are 0 on padding."""
  lm = lms[2]
  lay = _layout(lm)
  emb = jnp.concatenate([lm.embed(PROMPT), lm.embed(jnp.full((2, G), MASK))], 1)
  _, kv = lm.hidden(emb, lay.slot_mask, 4, with_cache=True)
  at = kv.replace(index=jnp.full_like(kv.index, 4 + BL))
  args = (emb[:, 4 + BL:4 + 2 * BL], at, lay.slot_mask, lay.positions[:, 4 + BL:4 + 2 * BL])
  h, new, attn = lm.window(*args)
  np.testing.assert_allclose(h, lm.extend(*args), atol=1e-5)
  assert attn.shape == (2, 2, BL, 4 + G) and (new.index == at.index).all()
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert float(attn[:, 0, :, 0].max()) == 0.0                     # row 0's padded slot


@pytest.mark.parametrize("cache", ["block", "elastic"])
def test_cfg_and_dream_run(lms, cache):
  out, nfe = generate(lms["dream"], PROMPT, PMASK, gen_length=G, block_length=BL,
                      mask_id=MASK, cache=cache, threshold=0.6, cfg_scale=0.5,
                      return_nfe=True)
  assert not (out == MASK).any() and BL <= int(nfe) <= G

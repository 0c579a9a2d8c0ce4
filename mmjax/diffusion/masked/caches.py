"""The ways the sampler gets one block's logits (``generate(cache=...)``), as strategies.

Every strategy is built once per sampling call (inside the compiled program) from the
denoiser, the call's `Layout` and the prompt, does its one-time work there, and then offers

  ``init()``                            -> the state it carries through the loop;
  ``logits(x, start, block, state)``    -> ``(logits [r, block_length, V] fp32, state)``
                                           for the answer ``x [b, G]``, block ``block``
                                           starting at answer position ``start``.

All are over the core ``KVCache`` of ``models/lm.py``'s ``DecoderLM`` (``denoiser``):

* 'none' (`Recompute`): full recomputation every step (`RecomputeFn` for a plain
  ``logits_fn``, which only supports this);
* 'prefix' (`PrefixCache`, LaViDa's Prefix-DLM): the prompt (image included) is run once and
  its K/V kept; each step runs only the answer against it. Exact when the prompt does not
  attend to the answer (``DiffusionLM(prefix_dlm=True)``, as LaViDa trains), an
  approximation of a fully bidirectional model otherwise;
* 'block' (`BlockPrefixCache`, Fast-dLLM's prefix cache): each block's first step is a full
  pass; its K/V of the prompt and the finished blocks are kept, and the block's other steps
  run the block and the (masked) rest of the answer against them;
* 'dual' (`DualCache`, Fast-dLLM): at each block boundary one full pass refreshes the K/V of
  every position (and gives that step's logits); the other steps of the block run only the
  block's tokens against the cached prompt and the cached blocks before *and* after it;
* 'elastic' (`ElasticCache`, Elastic-Cache's attention-drift refresh): every step runs only
  the block and keeps its fresh K/V; a full refresh happens only when the attention to the
  most-attended cached token drifts (cosine similarity below ``refresh_gamma``).

With CFG the rows are ``[conditional; unconditional]`` (``r = 2b``): ``Layout.rows`` stacks
the answer twice, the prompt given to a strategy already holds both halves.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.diffusion.masked.denoiser import DiffusionLM, LogitsFn


@dataclasses.dataclass(frozen=True)
class Layout:
  """One sampling call's sequence: ``prompt_len`` prompt positions then ``gen_length`` answer
  positions in blocks of ``block_length``; ``slot_mask`` / ``positions [r, P + G]`` (real
  slots, RoPE positions) over the ``r`` model rows; ``guided``: CFG doubles the rows."""
  prompt_len: int
  gen_length: int
  block_length: int
  slot_mask: Any
  positions: Any
  guided: bool

  def rows(self, a):
    """``a [b, ...]`` as the model's rows (stacked twice with CFG)."""
    return jnp.concatenate([a, a]) if self.guided else a


class RecomputeFn:
  """cache='none' for a plain ``logits_fn``: the whole sequence every step."""

  def __init__(self, model: LogitsFn, layout: Layout, prompt_ids):
    self.model, self.layout, self.ids = model, layout, prompt_ids

  def init(self):
    return ()

  def logits(self, x, start, block, state):
    lay = self.layout
    logits = self.model.fn(jnp.concatenate([self.ids, lay.rows(x)], 1), lay.slot_mask)
    return (jax.lax.dynamic_slice_in_dim(logits, lay.prompt_len + start, lay.block_length,
                                         axis=1), state)


class Recompute:
  """cache='none': a full pass over prompt and answer embeddings every step."""

  def __init__(self, model: DiffusionLM, layout: Layout, prompt_embeds):
    self.model, self.layout, self.pe = model, layout, prompt_embeds

  def init(self):
    return ()

  def logits(self, x, start, block, state):
    lm, lay = self.model, self.layout
    h = lm.hidden(jnp.concatenate([self.pe, lm.embed(lay.rows(x))], 1), lay.slot_mask,
                  lay.prompt_len)
    return lm.block_logits(h, lay.prompt_len + start, lay.block_length), state


class PrefixCache:
  """cache='prefix': the prompt's K/V computed once (here); each step runs the answer."""

  def __init__(self, model: DiffusionLM, layout: Layout, prompt_embeds):
    self.model, self.layout = model, layout
    p = layout.prompt_len
    h_prompt, self.kv = model.prefill(prompt_embeds, layout.slot_mask[:, :p],
                                      p + layout.gen_length)
    self.h_last = h_prompt[:, -1:]                 # predicts answer token 0 for Dream

  def init(self):
    return ()

  def logits(self, x, start, block, state):
    lm, lay = self.model, self.layout
    h = lm.extend(lm.embed(lay.rows(x)), self.kv, lay.slot_mask,
                  lay.positions[:, lay.prompt_len:])
    return (lm.block_logits(jnp.concatenate([self.h_last, h], 1), 1 + start,
                            lay.block_length), state)


class _BlockRefresh:
  """What the block-wise caches share: state ``(kv, h_prev, cached_block, ...)`` and the full
  pass that refreshes the K/V of every position (and gives that step's logits)."""

  def __init__(self, model: DiffusionLM, layout: Layout, prompt_embeds, **options):
    self.model, self.layout, self.pe = model, layout, prompt_embeds
    self.options = options

  def _empty(self):
    lay, stack = self.layout, self.model.module.config.stack
    r = lay.slot_mask.shape[0]
    return (core.init_cache(stack, r, lay.prompt_len + lay.gen_length),
            jnp.zeros((r, 1, stack.d_model), stack.dtype), jnp.int32(-1))

  def _refresh(self, x, start, kv, h_prev):
    lm, lay, p = self.model, self.layout, self.layout.prompt_len
    h, kv = lm.hidden(jnp.concatenate([self.pe, lm.embed(lay.rows(x))], 1), lay.slot_mask, p,
                      with_cache=True)
    h_prev = jax.lax.dynamic_slice_in_dim(h, p + start - 1, 1, axis=1)
    return lm.block_logits(h, p + start, lay.block_length), kv, h_prev

  def _run(self, x, lo: int, n: int, kv):
    """Answer positions ``lo .. lo + n`` (static) against ``kv``, written at their slots
    (the stale K/V there are not seen) -> hidden ``[r, n, E]``."""
    lm, lay, p = self.model, self.layout, self.layout.prompt_len
    at = kv.replace(index=jnp.full_like(kv.index, p + lo))
    return lm.extend(lm.embed(lay.rows(x)[:, lo:lo + n]), at, lay.slot_mask,
                     lay.positions[:, p + lo:p + lo + n])

  def init(self):
    return self._empty()


class BlockPrefixCache(_BlockRefresh):
  """cache='block' (Fast-dLLM's prefix cache): each block's first step is a full pass whose
  K/V of the prompt *and the finished blocks* are kept; the block's other steps run the
  block and everything after it (still masked) against them. The steps of block ``k`` run
  ``G - k * bl`` positions: one compiled branch per block (``lax.switch``)."""

  def _rest(self, x, start, block, kv, h_prev):
    lay, bl = self.layout, self.layout.block_length

    def branch(k):
      lo = k * bl
      return lambda x, kv, h_prev: self.model.block_logits(
          jnp.concatenate([h_prev, self._run(x, lo, lay.gen_length - lo, kv)], 1), 1, bl)
    n_blocks = lay.gen_length // bl
    logits = jax.lax.switch(jnp.clip(block, 0, n_blocks - 1),
                            [branch(k) for k in range(n_blocks)], x, kv, h_prev)
    return logits, kv, h_prev

  def logits(self, x, start, block, state):
    kv, h_prev, cached_block = state
    logits, kv, h_prev = jax.lax.cond(
        block != cached_block, lambda x, start, block, kv, h: self._refresh(x, start, kv, h),
        self._rest, x, start, block, kv, h_prev)
    return logits, (kv, h_prev, block)


class DualCache(_BlockRefresh):
  """cache='dual': K/V of every position refreshed by a full pass when a new block starts;
  the block's other steps run only its tokens. State: ``(kv, h_prev, cached_block)``
  (``h_prev``: the hidden state before the block, which predicts its first token for Dream)."""

  def _reuse(self, x, start, kv, h_prev):
    lm, lay, p, bl = self.model, self.layout, self.layout.prompt_len, self.layout.block_length
    xb = jax.lax.dynamic_slice_in_dim(lay.rows(x), start, bl, axis=1)
    pos = jax.lax.dynamic_slice_in_dim(lay.positions, p + start, bl, axis=1)
    # the block's fresh K/V replace its stale ones; every other block stays visible
    at_block = kv.replace(index=jnp.full_like(kv.index, p + start))
    h = lm.extend(lm.embed(xb), at_block, lay.slot_mask, pos)
    return lm.block_logits(jnp.concatenate([h_prev, h], 1), 1, bl), kv, h_prev

  def logits(self, x, start, block, state):
    kv, h_prev, cached_block = state
    logits, kv, h_prev = jax.lax.cond(block != cached_block, self._refresh, self._reuse,
                                      x, start, kv, h_prev)
    return logits, (kv, h_prev, block)


class ElasticCache(_BlockRefresh):
  """cache='elastic' (Elastic-Cache's attention-drift refresh, on the block layout): no
  scheduled refresh. Each step runs the current block against the cache of every position
  and *keeps* the block's fresh K/V (a token decoded at one step enters the cache at the
  next, as in dKV-Cache); when a new block starts, the finished block before it is rewritten
  first (its last commits; its last hidden state predicts the new block's first token for
  Dream). A full pass refreshes everything only at the first step, after a jump over a
  block, and when the *drift test* fails: per layer, the attention the block's queries pay
  to the cached token they attended most at the previous step is compared with what they
  paid then (cosine similarity, lowest over layers and rows); below ``refresh_gamma`` the
  cache is stale, and the step uses the refresh's logits instead. With no previous step to
  compare (a block's first step, right after a refresh) the similarity is 1, so
  ``refresh_gamma > 1`` refreshes every step (= no cache). Not here: the paper's depth-aware
  partial refresh (every layer is recomputed) and its sliding window (blocks instead).
  State: ``(kv, h_prev, cached_block, ref_token [L, r], ref_attention [L, r, bl], has_ref)``.
  """

  def init(self):
    lay, stack = self.layout, self.model.module.config.stack
    r = lay.slot_mask.shape[0]
    return self._empty() + (jnp.zeros((stack.num_layers, r), jnp.int32),
                            jnp.zeros((stack.num_layers, r, lay.block_length), jnp.float32),
                            jnp.bool_(False))

  def _window(self, x, start, kv):
    lm, lay, p, bl = self.model, self.layout, self.layout.prompt_len, self.layout.block_length
    xb = jax.lax.dynamic_slice_in_dim(lay.rows(x), start, bl, axis=1)
    pos = jax.lax.dynamic_slice_in_dim(lay.positions, p + start, bl, axis=1)
    return lm.window(lm.embed(xb), kv.replace(index=jnp.full_like(kv.index, p + start)),
                     lay.slot_mask, pos)

  def _cheap(self, x, start, new_block, kv, h_prev, ref_tok, ref_col, has_ref):
    bl, p = self.layout.block_length, self.layout.prompt_len

    def rewrite_previous(kv, h_prev):       # the finished block: its last commits
      h, kv, _ = self._window(x, start - bl, kv)
      return kv, h[:, -1:].astype(h_prev.dtype)
    kv, h_prev = jax.lax.cond(new_block, rewrite_previous, lambda kv, h: (kv, h), kv, h_prev)
    h, kv, attn = self._window(x, start, kv)                       # attn [L, r, bl, T]
    col = jnp.take_along_axis(attn, ref_tok[:, :, None, None], axis=-1)[..., 0]
    cos = jnp.sum(col * ref_col, -1) / (
        jnp.linalg.norm(col, axis=-1) * jnp.linalg.norm(ref_col, axis=-1) + 1e-12)
    similarity = jnp.where(has_ref & ~new_block, jnp.min(cos), 1.0)
    slot = jnp.arange(attn.shape[-1])
    cached = (slot < p + start) | (slot >= p + start + bl)      # outside the window
    mass = jnp.where(cached, attn.sum(2), -1.0)                  # [L, r, T]
    ref_tok = jnp.argmax(mass, -1).astype(jnp.int32)
    ref_col = jnp.take_along_axis(attn, ref_tok[:, :, None, None], axis=-1)[..., 0]
    logits = self.model.block_logits(jnp.concatenate([h_prev, h], 1), 1, bl)
    return logits, kv, h_prev, ref_tok, ref_col, similarity

  def logits(self, x, start, block, state):
    kv, h_prev, cached_block, ref_tok, ref_col, has_ref = state
    gamma = self.options.get("refresh_gamma")
    gamma = 0.9 if gamma is None else gamma

    def full(kv, h_prev, ref_tok, ref_col):
      logits, kv, h_prev = self._refresh(x, start, kv, h_prev)
      return logits, kv, h_prev, ref_tok, ref_col, jnp.bool_(False)

    def step(kv, h_prev, ref_tok, ref_col):
      out = self._cheap(x, start, block != cached_block, kv, h_prev, ref_tok, ref_col,
                        has_ref)
      logits, kv_w, h_w, tok_w, col_w, similarity = out
      return jax.lax.cond(similarity < gamma, full,
                          lambda *_: (logits, kv_w, h_w, tok_w, col_w, jnp.bool_(True)),
                          kv, h_w, ref_tok, ref_col)

    jump = (cached_block < 0) | (block > cached_block + 1)
    out = jax.lax.cond(jump, full, step, kv, h_prev, ref_tok, ref_col)
    logits, kv, h_prev, ref_tok, ref_col, has_ref = out
    return logits, (kv, h_prev, block, ref_tok, ref_col, has_ref)


CACHES = {"none": Recompute, "prefix": PrefixCache, "block": BlockPrefixCache,
          "dual": DualCache, "elastic": ElasticCache}


def make(cache: str, model, layout: Layout, prompt, **options):
  """The strategy for ``cache`` (a name in ``CACHES``) over ``model``; ``prompt`` is the
  prompt's ids [r, P] for a ``LogitsFn`` (cache 'none' only), else its embeddings.
  ``options``: ``refresh_gamma`` (cache 'elastic'; others ignore it)."""
  if isinstance(model, LogitsFn):
    if cache != "none":
      raise ValueError(f"cache={cache!r} needs a DiffusionLM (a plain logits_fn recomputes)")
    return RecomputeFn(model, layout, prompt)
  if cache not in CACHES:
    raise ValueError(f"cache={cache!r} is not one of {tuple(CACHES)}")
  if cache in ("none", "prefix"):
    return CACHES[cache](model, layout, prompt)
  return CACHES[cache](model, layout, prompt, **options)

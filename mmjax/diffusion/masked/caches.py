"""The three ways the sampler gets one block's logits (``generate(cache=...)``), as strategies.

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
* 'dual' (`DualCache`, Fast-dLLM): at each block boundary one full pass refreshes the K/V of
  every position (and gives that step's logits); the other steps of the block run only the
  block's tokens against the cached prompt and the cached blocks before *and* after it.

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


class DualCache:
  """cache='dual': K/V of every position refreshed by a full pass when a new block starts;
  the block's other steps run only its tokens. State: ``(kv, h_prev, cached_block)``
  (``h_prev``: the hidden state before the block, which predicts its first token for Dream)."""

  def __init__(self, model: DiffusionLM, layout: Layout, prompt_embeds):
    self.model, self.layout, self.pe = model, layout, prompt_embeds

  def init(self):
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


CACHES = {"none": Recompute, "prefix": PrefixCache, "dual": DualCache}


def make(cache: str, model, layout: Layout, prompt):
  """The strategy for ``cache`` (a name in ``CACHES``) over ``model``; ``prompt`` is the
  prompt's ids [r, P] for a ``LogitsFn`` (cache 'none' only), else its embeddings."""
  if isinstance(model, LogitsFn):
    if cache != "none":
      raise ValueError(f"cache={cache!r} needs a DiffusionLM (a plain logits_fn recomputes)")
    return RecomputeFn(model, layout, prompt)
  if cache not in CACHES:
    raise ValueError(f"cache={cache!r} is not one of {tuple(CACHES)}")
  return CACHES[cache](model, layout, prompt)

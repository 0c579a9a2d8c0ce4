"""What the masked-diffusion sampler needs from a model: the denoiser.

A denoiser maps a partly masked sequence (prompt then answer) to logits for every answer
position. Two kinds:

* `LogitsFn`: any ``fn(ids, attention_mask) -> logits`` over the whole sequence; the sampler
  can only recompute everything each step (cache 'none');
* `DiffusionLM`: a ``DecoderLM`` (LLaDA / Dream) and its params. It works on *embeddings*
  (so multimodal prompts, image features spliced in, go through the same calls) and offers
  the pieces the KV-cache strategies (``caches``) combine:

  ``embed(ids)``                               token embeddings;
  ``hidden(embeds, slot_mask, prompt_len)``     a full pass (optionally filling a KV cache);
  ``prefill(prompt_embeds, prompt_mask, n)``    the prompt alone into a fresh cache;
  ``extend(embeds, cache, slot_mask, pos)``     a few positions against a fixed cache;
  ``window(embeds, cache, slot_mask, pos)``     the same, keeping their new K/V in the
                                                cache, with the attention weights;
  ``block_logits(h, start, length)``            logits of positions ``start ..`` (Dream's
                                                shifted prediction handled here).

``prefix_dlm=True`` is LaViDa's Prefix-DLM attention: the prompt never attends to the answer,
which makes the 'prefix' cache exact.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from mmjax import core


@struct.dataclass
class DiffusionLM:
  """A ``DecoderLM`` (LLaDA / Dream) and its params, seen as a masked-diffusion denoiser.

  A pytree (params are leaves), so it passes through ``jit``. ``prefix_dlm=True``: the
  prompt never attends to the answer (LaViDa's Prefix-DLM training mask), which makes the
  'prefix' cache exact. Inputs are embeddings, so multimodal prompts (image features spliced
  in) go through the same calls.

  Example::

    lm = DiffusionLM(module, params, prefix_dlm=True)
    emb = jnp.concatenate([lm.embed(prompt), lm.embed(answer)], 1)     # [b, P + G, E]
    logits = lm.full(emb, slot_mask, prompt_len=prompt.shape[1])       # [b, P + G, V]
  """
  module: Any = struct.field(pytree_node=False)
  params: Any
  prefix_dlm: bool = struct.field(pytree_node=False, default=False)

  def _apply(self, method: str, *args, **kwargs):
    return self.module.apply({"params": self.params}, *args, method=method, **kwargs)

  def embed(self, ids):
    """``[b, s]`` ids -> ``[b, s, E]``."""
    return self._apply("embed", ids)

  def attention_mask(self, slot_mask, prompt_len: int):
    """``[b, 1, T, T]``: bidirectional over real tokens; Prefix-DLM hides the answer
    (positions >= prompt_len) from the prompt."""
    b, t = slot_mask.shape
    mask = jnp.broadcast_to(slot_mask[:, None, None, :], (b, 1, t, t))
    if self.prefix_dlm:
      q, k = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
      mask = mask & ((k < prompt_len) | (q >= prompt_len))
    return mask

  def _features(self, embeds, mask, positions, cache=None, cache_valid=None,
                return_attention: bool = False):
    return self._apply("features", inputs_embeds=embeds, mask=mask, positions=positions,
                       cache=cache, cache_valid=cache_valid, return_attention=return_attention)

  def hidden(self, embeds, slot_mask, prompt_len: int, with_cache: bool = False):
    """Full pass over ``embeds [b, T, E]`` (prompt then answer) -> hidden ``[b, T, E]``;
    with_cache also returns a ``KVCache`` of all T positions (index T)."""
    cache = None
    if with_cache:
      cache = core.init_cache(self.module.config.stack, embeds.shape[0], embeds.shape[1])
    return self._features(embeds, self.attention_mask(slot_mask, prompt_len),
                          core.positions_from_padding(slot_mask), cache)

  def full(self, embeds, slot_mask, prompt_len: int):
    """Logits ``[b, T, V]`` of a full pass (the 'none' cache path)."""
    return self._apply("logits", self.hidden(embeds, slot_mask, prompt_len))

  def prefill(self, prompt_embeds, prompt_mask, max_len: int):
    """Runs the prompt alone into a fresh cache of ``max_len`` slots -> ``(h [b, P, E],
    cache)`` with ``cache.index == P``."""
    b, p = prompt_mask.shape
    slots = jnp.zeros((b, max_len), bool).at[:, :p].set(prompt_mask)
    mask = jnp.broadcast_to(slots[:, None, None, :], (b, 1, p, max_len))
    cache = core.init_cache(self.module.config.stack, b, max_len)
    return self._features(prompt_embeds, mask, core.positions_from_padding(prompt_mask), cache)

  def extend(self, embeds, cache, slot_mask, positions):
    """Runs ``embeds [b, s, E]`` (RoPE ``positions [b, s]``) against ``cache``: they are
    written at ``cache.index`` and attend to every real slot (``slot_mask [b, max_len]``),
    before or after them: each real slot must hold keys/values or be written now (so a
    block in the middle of a full cache is re-run against the blocks around it).
    Returns hidden ``[b, s, E]``; the updated cache is dropped (the cache stays fixed)."""
    b, s = embeds.shape[:2]
    mask = jnp.broadcast_to(slot_mask[:, None, None, :], (b, 1, s, slot_mask.shape[1]))
    return self._features(embeds, mask, positions, cache, cache_valid=slot_mask)[0]

  def window(self, embeds, cache, slot_mask, positions):
    """`extend` that keeps what it computed: ``(h [b, s, E], cache with the window's new
    K/V written at cache.index .., attention [layers, b, s, max_len])`` -- every layer's
    attention weights of the window's queries, averaged over heads (attention impl 'xla')."""
    b, s = embeds.shape[:2]
    mask = jnp.broadcast_to(slot_mask[:, None, None, :], (b, 1, s, slot_mask.shape[1]))
    h, new, attention = self._features(embeds, mask, positions, cache, cache_valid=slot_mask,
                                       return_attention=True)
    return h, new.replace(index=cache.index), attention

  def block_logits(self, h, start, length: int):
    """fp32 logits ``[b, length, V]`` of positions ``start ..`` of hidden states ``h``; a
    model with shifted prediction (Dream) reads position i from hidden state i - 1 through
    its unshifted head."""
    shift = int(self.module.config.shift_logits)
    rows = jax.lax.dynamic_slice_in_dim(h, start - shift, length, axis=1)
    return self._apply("logits", rows, shift_logits=False)


@struct.dataclass
class LogitsFn:
  """The simplest denoiser: a plain ``fn(ids [b, T], attention_mask [b, T]) -> logits
  [b, T, V]`` of the whole sequence, carried through jit (full recomputation only)."""
  fn: Callable = struct.field(pytree_node=False)

"""The decoder-only language model every LM family is: embed, core stack, final norm, head.

Qwen2 / Qwen2.5 (causal), Dream (Qwen2.5 weights, bidirectional, shifted logits) and LLaDA
(LLaMA-style, bidirectional) differ only in their config and in the weight names of their
reference checkpoints (see ``qwen2.py``, ``dream.py``, ``llada.py``).

Parameters: ``embed_tokens/embedding [vocab, embed]``, ``decoder/...`` (the core
``TransformerStack``), ``final_norm/scale``, ``lm_head/kernel [embed, vocab]`` (absent when
tied).

Example::

    import jax, jax.numpy as jnp
    from mmjax import core
    from mmjax.models.lm import DecoderLM, LMConfig, greedy_generate
    cfg = LMConfig(family="qwen2", vocab_size=64, stack=core.TransformerConfig(
        num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, qkv_bias=True))
    model = DecoderLM(cfg)
    ids = jnp.array([[0, 5, 6, 7]]); mask = jnp.array([[0, 1, 1, 1]], bool)   # left padded
    params = model.init(jax.random.key(0), ids)["params"]
    logits = model.apply({"params": params}, ids, attention_mask=mask)      # [1, 4, 64]
    out = greedy_generate(model, params, ids, mask, max_new_tokens=3)      # [1, 7]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core

ATTENTION_KINDS = ("causal", "bidirectional")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """A decoder-only LM: the core stack plus vocabulary, head and masking choices."""
  family: str                        # interop family name: 'qwen2' | 'dream' | 'llada'
  vocab_size: int
  stack: core.TransformerConfig
  tie_embeddings: bool = False       # logits = final hidden @ embed_tokens.T
  attention: str = "causal"          # 'causal' | 'bidirectional' (masked diffusion LMs)
  shift_logits: bool = False         # Dream: hidden i predicts token i+1; we return
  #                                    logits[:, i] for token i (first row repeated)
  hf_extra: str = "{}"               # JSON of reference-config fields carried to export

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"LMConfig.attention={self.attention!r}; expected {ATTENTION_KINDS}")


class DecoderLM(nn.Module):
  """``apply({'params': p}, input_ids, attention_mask=None, positions=None, cache=None)``
  -> logits ``[batch, len, vocab]`` (fp32), or ``(logits, cache)`` with a cache.

  * ``attention_mask``: bool ``[batch, len]`` (True = real token; left or right padding).
    With a cache it covers the cache slots, ``[batch, max_len]``.
  * ``positions``: RoPE positions ``[batch, len]`` (``[3, batch, len]`` for an M-RoPE stack,
    ``stack.rope_sections``: Qwen2.5-VL). Default: the count of real tokens before
    each token (``core.positions_from_padding``), i.e. transformers' ``generate`` convention
    (``cumsum(mask) - 1``, pads at 0). A plain transformers forward uses ``arange`` unless
    given ``position_ids``; with left padding pass them to compare.
  * ``cache``: a ``core.KVCache`` (``core.init_cache(config.stack, batch, max_len)``); new
    keys/values are written at ``cache.index`` and the updated cache is returned.
  * ``inputs_embeds``: ``[batch, len, embed]`` instead of ids (multimodal splicing).
  * ``mask``: an explicit bool ``[batch|1, 1|heads, len, kv_len]`` attention mask (kv_len =
    max_len with a cache, in slot coordinates) in place of the one built from
    ``config.attention`` and ``attention_mask`` (padding must then be in it), e.g.
    LaViDa's Prefix-DLM mask. ``attention_mask`` still sets the default positions.
  * ``cache_valid``: ``[batch, max_len]`` bool, the cache slots already holding keys/values
    (default: those before ``cache.index``); see ``core.TransformerStack``.
  * ``shift_logits``: override ``config.shift_logits`` (False: Dream's raw head, row i
    predicting token i + 1).
  """
  config: LMConfig

  def setup(self):
    c = self.config
    s = c.stack
    self.embed_tokens = core.Embed(c.vocab_size, s.d_model, dtype=s.dtype,
                                   param_dtype=s.param_dtype, init_std=s.init_std)
    self.decoder = core.TransformerStack(s)
    self.final_norm = core.make_norm(s.norm, s.norm_eps, s.dtype, s.param_dtype, "final_norm")
    if not c.tie_embeddings:
      self.lm_head = core.dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=s.dtype,
                                param_dtype=s.param_dtype, init_std=s.init_std, name="lm_head")

  def embed(self, input_ids):
    """``[batch, len]`` ids -> ``[batch, len, embed]``."""
    return self.embed_tokens(input_ids)

  def features(self, input_ids=None, attention_mask=None, positions=None, cache=None, *,
               inputs_embeds=None, deterministic: bool = True, mask=None, cache_valid=None,
               return_attention: bool = False):
    """Final hidden states after the final norm ``[batch, len, embed]`` (and the cache; and
    with ``return_attention`` every layer's head-averaged attention weights ``[layers,
    batch, len, kv_len]``, ``core.TransformerStack``)."""
    c = self.config
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, s = x.shape[:2]
    if cache is None:
      kv_len, offset = s, None
    else:
      kv_len, offset = cache.key.shape[2], cache.index
    if mask is None and (attention_mask is not None or cache is not None
                         or c.attention == "causal"):
      mask = core.make_attention_mask(c.attention, s, kv_len, padding_mask=attention_mask,
                                      q_offset=offset, batch=b)
    if positions is None:
      positions = default_positions(attention_mask, b, s, offset)
    h = self.decoder(x, mask=mask, positions=positions, cache=cache,
                     decode=cache is not None, deterministic=deterministic,
                     cache_valid=cache_valid, return_attention=return_attention)
    if return_attention:
      h, attention = h[:-1], h[-1]
      h = h[0] if cache is None else h
    if cache is not None:
      h, cache = h
    result = (self.final_norm(h),) + (() if cache is None else (cache,))
    if return_attention:
      result += (attention,)
    return result[0] if len(result) == 1 else result

  def logits(self, hidden, shift_logits: Optional[bool] = None):
    """Output head on final hidden states -> fp32 logits, shifted for Dream (row i for token
    i) unless ``shift_logits=False`` (default: ``config.shift_logits``)."""
    c = self.config
    if c.tie_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    logits = logits.astype(jnp.float32)
    shift = c.shift_logits if shift_logits is None else shift_logits
    if shift:
      logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, input_ids=None, attention_mask=None, positions=None, cache=None, *,
               inputs_embeds=None, deterministic: bool = True, mask=None, cache_valid=None,
               shift_logits: Optional[bool] = None):
    out = self.features(input_ids, attention_mask, positions, cache,
                        inputs_embeds=inputs_embeds, deterministic=deterministic, mask=mask,
                        cache_valid=cache_valid)
    if cache is None:
      return self.logits(out, shift_logits)
    return self.logits(out[0], shift_logits), out[1]


def default_positions(attention_mask, batch: int, length: int, offset=None):
  """RoPE positions: real tokens counted from 0 (``generate`` convention), over cache slots
  when ``offset`` (the cache index ``[batch]``) is given."""
  if attention_mask is None:
    start = 0 if offset is None else offset[:, None]
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
  pos = core.positions_from_padding(attention_mask)
  if offset is None:
    return pos
  slots = offset[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.take_along_axis(pos, jnp.minimum(slots, pos.shape[1] - 1), axis=1)


# ----------------------------------------------------------------------------- generation
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "use_cache"))
def greedy_generate(model: DecoderLM, params, input_ids, attention_mask=None, *,
                    max_new_tokens: int, use_cache: bool = True,
                    eos_id: Optional[int] = None, pad_id: int = 0):
  """Greedy decoding of left-padded prompts as one XLA program (``lax.fori_loop``).

  Args:
    input_ids: ``[batch, prompt_len]``; attention_mask: bool, True on real tokens.
    use_cache: decode with the core KV cache (prefill, then one token per step); False
      recomputes the whole sequence every step (the reference for the cache).
    eos_id: rows that produced it emit ``pad_id`` afterwards (transformers' behaviour).

  Returns ``[batch, prompt_len + max_new_tokens]`` tokens, prompt included.

  Example::

    out = greedy_generate(model, params, ids, mask, max_new_tokens=8)
  """
  b, p = input_ids.shape
  total = p + max_new_tokens
  if attention_mask is None:
    attention_mask = jnp.ones((b, p), bool)
  slots = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], 1)
  tokens = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad_id,
                                                input_ids.dtype)], 1)
  apply = functools.partial(model.apply, {"params": params})
  eos = -1 if eos_id is None else eos_id

  def emit(tokens, done, logits, t):
    nxt = jnp.argmax(logits, axis=-1).astype(tokens.dtype)
    nxt = jnp.where(done, jnp.asarray(pad_id, tokens.dtype), nxt)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, p + t))
    return tokens, done | (nxt == eos)

  done = jnp.zeros((b,), bool)
  if not use_cache:
    def body(t, carry):
      tokens, done = carry
      logits = apply(tokens, slots)                                   # [b, total, vocab]
      last = jax.lax.dynamic_index_in_dim(logits, p + t - 1, axis=1, keepdims=False)
      return emit(tokens, done, last, t)
    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, done))
    return tokens

  cache = core.init_cache(model.config.stack, b, total)
  logits, cache = apply(input_ids, slots, cache=cache)                 # prefill
  tokens, done = emit(tokens, done, logits[:, -1], 0)

  def step(t, carry):
    tokens, done, cache = carry
    cur = jax.lax.dynamic_slice_in_dim(tokens, p + t - 1, 1, axis=1)   # [b, 1]
    logits, cache = apply(cur, slots, cache=cache)
    tokens, done = emit(tokens, done, logits[:, -1], t)
    return tokens, done, cache

  tokens, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (tokens, done, cache))
  return tokens

"""Image generation and image understanding with the unified model, each one XLA program.

**Generation** (``generate_images``): the prompt ends with the image-start marker. The
conditional prompts and the blank-prompt (unconditional) ones run as one batch ``[2b, P]``
with a KV cache over ``P + N`` slots. At each of the ``N`` visual positions the pixel head
and then the semantic head run their ``D`` depths with their own small KV caches; at every
depth the logits are guided, ``u + s (c - u)`` (CFG scale ``s``, 3 by default), then
temperature, top-k (900) and top-p (0.96) filter them and one code is drawn per image and
given to both halves. The position's embedding (both vocabularies) is fed back to the LM.
Only the pixel codes go to the tokenizer's decoder; the semantic codes are returned too.

**Understanding** (``understand``): the image's dual tokens inside the prompt (spliced at
``start``), then the answer decoded with the LM's KV cache, greedy or sampled; rows that
produced ``eos`` emit ``pad`` afterwards.

Randomness is per image: ``keys [b]`` (one key per row, e.g. ``fold_in(seed, example
index)``), folded with the position, the vocabulary and the depth, so an image does not
depend on the rest of its batch (padded batches give the same output as one at a time).

``position_step`` is the body of the generation loop; ``bench/dualtoken_generate.py`` steps
it from Python to measure what the single program saves.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.systems.dualtoken.unified import VOCABS, UnifiedModel

F32 = jnp.float32


def filter_logits(logits, temperature, top_k: int, top_p):
  """``(values, indices)`` of the candidates kept after temperature, top-k and top-p
  (transformers' warper order and rule: top-p keeps the smallest prefix of the sorted
  candidates whose probability reaches ``top_p``); the rest have value ``-inf``.
  ``top_k`` is static (0 = all); ``temperature`` and ``top_p`` may be traced."""
  k = logits.shape[-1] if top_k <= 0 else min(int(top_k), logits.shape[-1])
  t = jnp.maximum(jnp.asarray(temperature, F32), 1e-6)
  vals, idx = jax.lax.top_k(logits.astype(F32) / t, k)
  probs = jax.nn.softmax(vals, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs          # mass of the better candidates
  vals = jnp.where((before < top_p) | (jnp.asarray(top_p) >= 1.0), vals, -jnp.inf)
  return vals, idx


def sample(logits, keys, temperature, top_k: int, top_p):
  """One id per row of ``logits [b, K]`` with per-row ``keys [b]``; greedy where the
  (traced or static) temperature is 0."""
  vals, idx = filter_logits(logits, temperature, top_k, top_p)
  pick = jax.vmap(jax.random.categorical)(keys, vals)
  drawn = jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0]
  greedy = jnp.argmax(logits, axis=-1)
  return jnp.where(jnp.asarray(temperature) > 0, drawn, greedy).astype(jnp.int32)


def guide(logits, scale, cfg: bool):
  """``[2b, K]`` (conditional rows first) -> ``u + scale (c - u)`` ``[b, K]``."""
  if not cfg:
    return logits
  c, u = jnp.split(logits, 2, axis=0)
  return u + scale * (c - u)


def _fold(keys, *data):
  for d in data:
    keys = jax.vmap(lambda k, d=d: jax.random.fold_in(k, d))(keys)
  return keys


def sample_position(model: UnifiedModel, variables, hidden, keys, position, *, cfg: bool,
                    cfg_scale, temperature, top_k: int, top_p):
  """Both depth heads at one visual position: ``hidden [rows, H]`` (rows = 2b with CFG) ->
  ``{'pixel': codes [b, D], 'semantic': codes [b, D]}``."""
  apply = functools.partial(model.apply, variables)
  c = model.cfg
  rows = hidden.shape[0]
  out = {}
  for v, vocab in enumerate(VOCABS):
    head = c.head(vocab)
    cache = core.init_cache(head.stack, rows, head.depths)
    x = apply(vocab, hidden, method=UnifiedModel.head_first_input)
    psum = jnp.zeros((rows, c.code_embed_dim), F32)
    codes = []
    for d in range(head.depths):
      logits, cache = apply(vocab, x, d, cache, method=UnifiedModel.head_step)
      code = sample(guide(logits, cfg_scale, cfg), _fold(keys, position, v * head.depths + d),
                    temperature, top_k, top_p)
      codes.append(code)
      if d + 1 < head.depths:
        both = jnp.tile(code, 2) if cfg else code
        psum = psum + apply(vocab, both, method=UnifiedModel.code_embeddings).astype(F32)
        x = apply(vocab, psum, d + 1, method=UnifiedModel.head_code_input)
    out[vocab] = jnp.stack(codes, axis=-1)
  return out


def prefill(model: UnifiedModel, variables, ids, mask, extra: int, embeds=None):
  """The prompt ``ids [rows, P]`` (left-padded; ``mask`` True on real tokens) or its
  ``embeds`` through the LM into a KV cache of ``P + extra`` slots ->
  ``(last hidden [rows, H], cache, slots)``."""
  rows, p = ids.shape
  slots = jnp.concatenate([mask.astype(bool), jnp.ones((rows, extra), bool)], axis=1)
  cache = core.init_cache(model.cfg.lm.stack, rows, p + extra)
  if embeds is None:
    embeds = model.apply(variables, ids, method=UnifiedModel.embed_text)
  hidden, cache = model.apply(variables, embeds, slots, cache, method=UnifiedModel.lm_step)
  return hidden[:, -1], cache, slots


def position_step(model: UnifiedModel, variables, state, keys, *, cfg: bool, cfg_scale,
                  temperature, top_k: int, top_p):
  """One visual position: sample its codes from ``state['hidden']``, write them at
  ``state['i']``, feed the position's embedding to the LM -> the next state."""
  i = state["i"]
  codes = sample_position(model, variables, state["hidden"], keys, i, cfg=cfg,
                          cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                          top_p=top_p)
  new = dict(state)
  for vocab in VOCABS:
    new[vocab] = jax.lax.dynamic_update_slice_in_dim(state[vocab], codes[vocab][:, None], i, 1)
  both = {v: (jnp.tile(codes[v], (2, 1)) if cfg else codes[v]) for v in VOCABS}
  e = model.apply(variables, both["pixel"], both["semantic"], method=UnifiedModel.embed_visual)
  hidden, new["cache"] = model.apply(variables, e[:, None], state["slots"], state["cache"],
                                     method=UnifiedModel.lm_step)
  new["hidden"], new["i"] = hidden[:, 0], i + 1
  return new


def start_generation(model: UnifiedModel, variables, ids, mask, uncond_ids=None,
                     uncond_mask=None):
  """The loop's first state: prompts (and blank prompts) prefilled, no codes yet."""
  cfg = uncond_ids is not None
  if cfg:
    ids = jnp.concatenate([ids, uncond_ids], axis=0)
    mask = jnp.concatenate([mask, uncond_mask], axis=0)
  b, n, depth = ids.shape[0] // (2 if cfg else 1), model.cfg.positions, model.cfg.depths
  hidden, cache, slots = prefill(model, variables, ids, mask, n)
  return {"hidden": hidden, "cache": cache, "slots": slots, "i": jnp.zeros((), jnp.int32),
          "pixel": jnp.zeros((b, n, depth), jnp.int32),
          "semantic": jnp.zeros((b, n, depth), jnp.int32)}


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def generate_images(model: UnifiedModel, variables, ids, mask, uncond_ids, uncond_mask, keys,
                    *, cfg_scale=3.0, temperature=1.0, top_k: int = 900, top_p=0.96):
  """Text-to-image as one program. ``ids``/``mask [b, P]``: left-padded prompts ending with
  the image-start marker; ``uncond_ids``/``uncond_mask``: the blank prompts (None: no CFG);
  ``keys [b]``. ``cfg_scale``, ``temperature`` and ``top_p`` are traced (one compile serves
  every setting; temperature 0 is greedy), ``top_k`` is static. Returns ``{'pixel': [b, N,
  D], 'semantic': [b, N, D], 'images': [b, R, R, 3]}`` (images decoded from the pixel codes
  by the tokenizer)."""
  cfg = uncond_ids is not None
  state = start_generation(model, variables, ids, mask, uncond_ids, uncond_mask)
  step = functools.partial(position_step, model, variables, keys=keys, cfg=cfg,
                           cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                           top_p=top_p)
  state = jax.lax.fori_loop(0, model.cfg.positions, lambda _, s: step(s), state)
  images = model.apply(variables, state["pixel"], method=UnifiedModel.decode_pixels)
  return {"pixel": state["pixel"], "semantic": state["semantic"], "images": images}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def understand(model: UnifiedModel, variables, ids, mask, start, pixel_codes, semantic_codes,
               keys, *, max_new_tokens: int, eos_id: int, pad_id: int, temperature=0.0,
               top_k: int = 0, top_p=1.0):
  """Image-to-text as one program. ``ids``/``mask [b, P]``: left-padded prompts whose
  visual block (placeholders) starts at ``start [b]``; the image's codes ``[b, N, D]``.
  Returns the answer ids ``[b, max_new_tokens]`` (``pad_id`` after ``eos_id``)."""
  embeds = model.apply(variables, ids, start, pixel_codes, semantic_codes,
                       method=UnifiedModel.embed_sequence)
  hidden, cache, slots = prefill(model, variables, ids, mask, max_new_tokens, embeds=embeds)
  b = ids.shape[0]

  def emit(t, hidden, done, keys_t):
    logits = model.apply(variables, hidden[:, None], method=UnifiedModel.text_logits)[:, 0]
    tok = sample(logits, keys_t, temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    return tok, done | (tok == eos_id)

  def body(t, carry):
    hidden, cache, done, out = carry
    tok, done = emit(t, hidden, done, _fold(keys, t))
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, 1)
    e = model.apply(variables, tok[:, None], method=UnifiedModel.embed_text)
    h, cache = model.apply(variables, e, slots, cache, method=UnifiedModel.lm_step)
    return h[:, 0], cache, done, out

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  _, _, _, out = jax.lax.fori_loop(0, max_new_tokens, body, (hidden, cache, done, out))
  return out

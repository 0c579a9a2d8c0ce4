"""Masked-diffusion sampling (LLaDA, LaViDa, Fast-dLLM) as one XLA program: `generate`.

The answer starts as ``gen_length`` [MASK] tokens, cut into blocks decoded left to right
(semi-autoregressive); ``steps`` are split evenly across blocks. One step:

1. the denoiser scores the current block (``caches``: recomputed, prefix-cached, block-prefix
   cached, dual-cached or elastic-cached); with CFG, ``u + (w + 1)(c - u)`` where ``u`` is the model with the prompt
   replaced by [MASK] (both halves batched in one call);
2. inside the block a proposal ``x0`` is drawn by Gumbel-max on ``logits / T`` (``T = 0``:
   argmax) and scored (`propose`): 'low_confidence' = softmax probability of ``x0`` under the
   (guided, untempered) logits, 'random' = uniform; positions not masked get -inf;
3. the ``k`` most confident masked positions are committed (`top_k_mask`), ``k`` from the
   schedule (``schedules``), or -- with ``threshold`` (Fast-dLLM) -- every masked position in
   the block with confidence >= threshold, at least the top one; the loop then runs until
   nothing is masked (at most ``gen_length`` steps) and ``steps`` is unused.

EOS: like LLaDA / LaViDa, nothing special happens inside the loop -- the model was trained to
fill the tail of the answer with EOS (supervised EOS padding) and decodes it like any token.
With ``eos_id`` the returned answer is truncated at the first EOS: every later position is
set to EOS (LaViDa's released decode drops special tokens instead, keeping any text after an
EOS). The proposal never picks [MASK] itself (its logit is set to -inf).

Infill (``draft_ids=``; LaViDa-FIM inference, ``drafts``): the answer starts from a user
draft instead of all [MASK]; only its [M] positions are candidates, with the same proposal,
remasking, temperature, CFG, caches and threshold. A block's step counts come from *its own*
[M] count per row (``schedules.infill_schedule``); a block with no [M] in any row costs no
model call, and rows that finish a block early wait (commit 0) while the others finish it.
A draft that is all [M] is plain generation. With ``eos_id`` each [M] run is truncated at its
first generated EOS (fixed draft tokens, EOS among them, are never changed); without a draft
the answer is one run, so this is the rule above.

Example::

    import jax, jax.numpy as jnp
    from mmjax import core
    from mmjax.models.lm import DecoderLM, LMConfig
    from mmjax.diffusion.masked.denoiser import DiffusionLM
    from mmjax.diffusion.masked.sampler import generate
    cfg = LMConfig(family="llada", vocab_size=32, attention="bidirectional",
                   stack=core.TransformerConfig(num_layers=2, d_model=32, num_heads=4,
                                                mlp_dim=64))
    module = DecoderLM(cfg)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    lm = DiffusionLM(module, params, prefix_dlm=True)
    prompt = jnp.array([[0, 5, 6, 7]]); mask = jnp.array([[0, 1, 1, 1]], bool)   # left padded
    out = generate(lm, prompt, mask, gen_length=8, steps=4, block_length=4, mask_id=31,
                   cache="prefix")                                              # [1, 8]
    draft = jnp.array([[3, 31, 31, 4, 31, 31, 31, 5]])            # 31 = [M]: fill 5 slots
    out = generate(lm, prompt, mask, draft_ids=draft, steps=4, mask_id=31)    # 3, 4, 5 kept
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.diffusion.masked.caches import CACHES as STRATEGIES
from mmjax.diffusion.masked.caches import Layout, make as make_cache
from mmjax.diffusion.masked.denoiser import DiffusionLM, LogitsFn
from mmjax.diffusion.masked.drafts import check_draft
from mmjax.diffusion.masked.schedules import (INFILL_STEPS, SCHEDULES, infill_table,
                                              transfer_schedule)

REMASKINGS = ("low_confidence", "random")
CACHES = tuple(STRATEGIES)             # none | prefix | block | dual | elastic


# ----------------------------------------------------------------------------- one step
def propose(logits, rng, temperature: float, remasking: str, mask_id: int):
  """Proposal ``x0`` and its confidence for every position of ``logits [b, n, V]``.

  Gumbel-max on ``logits / temperature`` (argmax at 0); confidence = softmax(logits)[x0]
  ('low_confidence') or U(0, 1) ('random'). [MASK] is never proposed.
  """
  logits = logits.astype(jnp.float32)
  if 0 <= mask_id < logits.shape[-1]:
    logits = logits.at[..., mask_id].set(-jnp.inf)
  k_gumbel, k_conf = jax.random.split(rng)
  if temperature > 0:
    x0 = jnp.argmax(logits / temperature + jax.random.gumbel(k_gumbel, logits.shape), -1)
  else:
    x0 = jnp.argmax(logits, -1)
  if remasking == "low_confidence":
    probs = jax.nn.softmax(logits, -1)
    conf = jnp.take_along_axis(probs, x0[..., None], -1)[..., 0]
  else:
    conf = jax.random.uniform(k_conf, x0.shape)
  return x0.astype(jnp.int32), conf


def top_k_mask(conf, k):
  """True on the ``k[b]`` highest entries of each row of ``conf [b, n]`` (ties: lower index
  first). Static shapes: ranks by a double argsort instead of a per-row top_k."""
  order = jnp.argsort(-conf, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return ranks < k[:, None]


# ----------------------------------------------------------------------------- the sampler
@dataclasses.dataclass(frozen=True)
class _Options:
  gen_length: int
  block_length: int
  steps: Optional[int]
  mask_id: int
  temperature: float
  remasking: str
  schedule: str
  shift_a: float
  cfg_scale: float
  threshold: Optional[float]
  eos_id: Optional[int]
  cache: str
  return_nfe: bool
  infill_steps: str = "jump"
  refresh_gamma: Optional[float] = None


def generate(logits_fn, prompt_ids=None, prompt_mask=None, *, gen_length: Optional[int] = None,
             steps: Optional[int] = None, block_length: Optional[int] = None, mask_id: int,
             temperature: float = 0.0, remasking: str = "low_confidence",
             schedule: str = "linear", shift_a: float = 1 / 3, cfg_scale: float = 0.0,
             threshold: Optional[float] = None, eos_id: Optional[int] = None,
             cache: str = "none", rng=None, prompt_embeds=None, return_nfe: bool = False,
             draft_ids=None, draft_mask=None, infill_steps: str = "jump",
             refresh_gamma: Optional[float] = None):
  """Samples ``gen_length`` answer tokens after each prompt (see the module docstring).

  Args:
    logits_fn: a ``DiffusionLM`` (any cache, embeddings) or a plain
      ``logits_fn(ids [b, T], attention_mask [b, T]) -> logits [b, T, V]`` (cache 'none').
    prompt_ids: ``[b, P]``, left padded; prompt_mask: bool ``[b, P]``, True on real tokens
      (default all). ``prompt_embeds [b, P, E]`` replaces ``prompt_ids`` (image features
      spliced in; needs a ``DiffusionLM``).
    gen_length, block_length: answer length and block size (default gen_length), with
      ``gen_length % block_length == 0``.
    steps: total steps, a multiple of the number of blocks, at most gen_length; unused with
      ``threshold``.
    schedule: 'linear' | 'cosine' | 'shift' (``shift_a``), see `transfer_schedule`.
    threshold: confidence-threshold parallel decoding (Fast-dLLM's tau, e.g. 0.9).
    rng: a key (default ``key(0)``); only used with temperature > 0 or 'random' remasking.
    return_nfe: also return the number of model calls (loop iterations).
    draft_ids: infill (module docstring): ``[b, D]`` with ``D <= gen_length`` (default
      ``gen_length = D``): the first D answer tokens; ``mask_id`` marks the [M] positions to
      fill, every other token stays as given. Each row needs at least one [M].
    draft_mask: bool ``[b, D]``, False on padding (a shorter draft in a batch); positions
      ``>= D`` are padding too. Padding is hidden, never filled, returned as ``eos_id``
      (``mask_id`` without one).
    infill_steps: 'jump' (spec, default) | 'full' (released code): steps of a block with
      m [M], see `infill_steps_for`.
    cache: 'none' | 'prefix' (LaViDa's Prefix-DLM) | 'block' (Fast-dLLM's prefix cache) |
      'dual' (Fast-dLLM) | 'elastic' (Elastic-Cache's drift refresh), see ``caches``.
    refresh_gamma: cache 'elastic': refresh when the attention drift test's cosine
      similarity falls below it (default 0.9; > 1 refreshes every step); other caches
      ignore it.

  Returns the answer ``[b, gen_length]`` int32 (and the NFE count).

  Example::

    out = generate(lm, prompt, mask, gen_length=32, steps=16, block_length=32,
                   mask_id=126336, schedule="shift", cache="prefix")
    out, nfe = generate(lm, prompt, mask, gen_length=256, block_length=32, mask_id=126336,
                        threshold=0.9, cache="dual", return_nfe=True)
    M, FIM = 126336, 126085                     # a LaViDa-FIM draft: "A [M]x11 [FIM] ..."
    out = generate(lm, prompt, mask, draft_ids=draft, steps=64, block_length=64,
                   mask_id=M, schedule="shift", cache="prefix")
    text = drafts.strip_tokens(out, (126086, FIM), pad_id=126081)   # drop [S] and [FIM]
  """
  plain = not isinstance(logits_fn, DiffusionLM)
  for name, value, allowed in (("remasking", remasking, REMASKINGS),
                               ("schedule", schedule, SCHEDULES), ("cache", cache, CACHES),
                               ("infill_steps", infill_steps, INFILL_STEPS)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r} is not one of {allowed}")
  if draft_ids is None:
    if draft_mask is not None:
      raise ValueError("draft_mask needs draft_ids")
    if gen_length is None:
      raise ValueError("give gen_length (or draft_ids)")
  else:
    draft_ids = jnp.asarray(draft_ids)
    if draft_ids.ndim != 2 or draft_ids.shape[1] < 1:
      raise ValueError(f"draft_ids must be [batch, D>=1], got shape {draft_ids.shape}")
    gen_length = draft_ids.shape[1] if gen_length is None else gen_length
    if draft_ids.shape[1] > gen_length:
      raise ValueError(f"the draft ({draft_ids.shape[1]} tokens) is longer than "
                       f"gen_length={gen_length}")
  block_length = gen_length if block_length is None else block_length
  if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
    raise ValueError(f"gen_length={gen_length} must be a positive multiple of "
                     f"block_length={block_length}")
  if threshold is None:
    blocks = gen_length // block_length
    if steps is None or steps <= 0 or steps % blocks:
      raise ValueError(f"steps={steps} must be a positive multiple of the {blocks} blocks")
    transfer_schedule(block_length, steps // blocks, schedule, shift_a)   # validates
  elif threshold <= 0:
    raise ValueError(f"threshold must be positive, got {threshold}")
  if temperature < 0 or cfg_scale < 0:
    raise ValueError("temperature and cfg_scale must be >= 0")
  if plain and (cache != "none" or prompt_embeds is not None):
    raise ValueError(f"cache={cache!r} and prompt_embeds need a DiffusionLM")
  if prompt_embeds is None and prompt_ids is None:
    raise ValueError("give prompt_ids or prompt_embeds")
  shape = (prompt_ids if prompt_embeds is None else prompt_embeds).shape[:2]
  if shape[1] < 1:
    raise ValueError("the prompt must have at least one position")
  prompt_mask = (jnp.ones(shape, bool) if prompt_mask is None
                 else jnp.asarray(prompt_mask, bool))
  draft = real = None
  if draft_ids is not None:
    draft, real = check_draft(draft_ids, draft_mask, shape[0], gen_length, mask_id,
                              None if plain else logits_fn.module.config.vocab_size)
  opts = _Options(gen_length, block_length, steps if threshold is None else None, mask_id,
                  float(temperature), remasking, schedule, float(shift_a), float(cfg_scale),
                  None if threshold is None else float(threshold), eos_id, cache, return_nfe,
                  infill_steps, None if refresh_gamma is None else float(refresh_gamma))
  model = LogitsFn(logits_fn) if plain else logits_fn
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, prompt_ids, prompt_mask, prompt_embeds, draft, real, rng, opts=opts)


def _guided_prompt(model, prompt_ids, prompt_embeds, prompt_mask, mask_id: int, guided: bool):
  """The prompt as the model's rows: ids for a ``LogitsFn``, else embeddings; with CFG the
  unconditional half (the prompt replaced by [MASK]) is stacked under the conditional one."""
  if isinstance(model, LogitsFn):
    ids = prompt_ids.astype(jnp.int32)
    if guided:
      ids = jnp.concatenate([ids, jnp.where(prompt_mask, mask_id, ids)])
    return ids
  pe = model.embed(prompt_ids) if prompt_embeds is None else prompt_embeds
  if guided:
    mask_emb = model.embed(jnp.full((1, 1), mask_id, jnp.int32))[0, 0]
    pe = jnp.concatenate([pe, jnp.where(prompt_mask[..., None], mask_emb.astype(pe.dtype), pe)])
  return pe


@functools.partial(jax.jit, static_argnames=("opts",))
def _generate(model, prompt_ids, prompt_mask, prompt_embeds, draft, real, rng, *,
              opts: _Options):
  o = opts
  b, p = prompt_mask.shape
  g, bl = o.gen_length, o.block_length
  n_blocks = g // bl
  cfg = o.cfg_scale > 0
  infill = draft is not None
  if infill:        # padding enters as [MASK] (a safe id), hidden, and is never a hole
    x = jnp.where(real, draft, o.mask_id)
  else:
    x, real = jnp.full((b, g), o.mask_id, jnp.int32), jnp.ones((b, g), bool)
  holes = (x == o.mask_id) & real                                       # [b, G]
  rows = (lambda a: jnp.concatenate([a, a])) if cfg else (lambda a: a)
  slot_mask = rows(jnp.concatenate([prompt_mask, real], 1))                      # [r, P+G]
  layout = Layout(p, g, bl, slot_mask, core.positions_from_padding(slot_mask), guided=cfg)
  prompt = _guided_prompt(model, prompt_ids, prompt_embeds, prompt_mask, o.mask_id, cfg)
  strategy = make_cache(o.cache, model, layout, prompt, refresh_gamma=o.refresh_gamma)
  state = strategy.init()

  # Blocks run left to right; the current one is the first with a hole left in any row
  # (lockstep batch), so an infill block without [M] costs nothing. ``j`` counts the steps
  # spent in it; ``k[b]`` tokens are committed at step ``j``.
  if o.threshold is None:
    per_block = o.steps // n_blocks
    if infill:                  # per row, from the block's own [M] count (exact integers)
      table = jnp.asarray(infill_table(bl, per_block, o.schedule, o.shift_a, o.infill_steps))
      block_holes = holes.reshape(b, n_blocks, bl).sum(-1)                # [b, n_blocks]
    else:
      counts = jnp.asarray(transfer_schedule(bl, per_block, o.schedule, o.shift_a), jnp.int32)

  def pending(x):
    return (x == o.mask_id) & real

  def cond(carry):
    x, step = carry[0], carry[1]
    if o.threshold is None and not infill:
      return step < o.steps
    return pending(x).any() & (step < g)

  def body(carry):
    x, step, key, state, j, prev = carry
    key, k_step = jax.random.split(key)
    if o.threshold is None and not infill:
      block = step // per_block
    else:
      block = jnp.argmax(pending(x).reshape(b, n_blocks, bl).any(axis=(0, 2))).astype(jnp.int32)
    j = jnp.where(block == prev, j + 1, 0)
    start = block * bl
    logits, state = strategy.logits(x, start, block, state)             # [r, bl, V]
    if cfg:
      cond_l, uncond_l = jnp.split(logits, 2)
      logits = uncond_l + (o.cfg_scale + 1.0) * (cond_l - uncond_l)
    xb = jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
    masked = jax.lax.dynamic_slice_in_dim(pending(x), start, bl, axis=1)
    x0, conf = propose(logits, k_step, o.temperature, o.remasking, o.mask_id)
    conf = jnp.where(masked, conf, -jnp.inf)
    if o.threshold is not None:
      above = jnp.sum(conf >= o.threshold, -1)
      k = jnp.where(masked.any(-1), jnp.maximum(above, 1), 0)
    elif infill:
      k = table[block_holes[:, block], jnp.minimum(j, per_block - 1)]
    else:
      k = jnp.broadcast_to(counts[j], (b,))
    xb = jnp.where(top_k_mask(conf, k) & masked, x0, xb)
    x = jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1)
    return x, step + 1, key, state, j, block

  carry = (x, jnp.int32(0), rng, state, jnp.int32(0), jnp.int32(-1))
  x, nfe = jax.lax.while_loop(cond, body, carry)[:2]
  if o.eos_id is not None:         # truncate each [M] run at its first EOS (one run: all)
    eos = jnp.int32(o.eos_id)
    is_eos = (x == eos) & holes
    before = jnp.cumsum(is_eos, -1) - is_eos                    # EOS earlier in the row
    run_start = holes & ~jnp.pad(holes, ((0, 0), (1, 0)))[:, :-1]
    at_start = jax.lax.cummax(jnp.where(run_start, before, 0), axis=1)
    x = jnp.where(holes & (before > at_start), eos, x)
  if infill:                       # padding is not part of the answer
    x = jnp.where(real, x, jnp.int32(o.mask_id if o.eos_id is None else o.eos_id))
  return (x, nfe) if o.return_nfe else x

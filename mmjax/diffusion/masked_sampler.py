"""Masked-diffusion sampling (LLaDA, LaViDa, Fast-dLLM) as one XLA program.

The answer starts as ``gen_length`` [MASK] tokens, cut into blocks decoded left to right
(semi-autoregressive); ``steps`` are split evenly across blocks. One step:

1. the model scores every position; with CFG, ``u + (w + 1)(c - u)`` where ``u`` is the
   model with the prompt replaced by [MASK] (both halves batched in one call);
2. inside the current block a proposal ``x0`` is drawn by Gumbel-max on ``logits / T``
   (``T = 0``: argmax) and scored: 'low_confidence' = softmax probability of ``x0`` under the
   (guided, untempered) logits, 'random' = uniform; confidence outside the block is -inf;
3. the ``k`` most confident masked positions are committed, ``k`` from the schedule
   (`transfer_schedule`), or -- with ``threshold`` (Fast-dLLM) -- every masked position in
   the block with confidence >= threshold, at least the top one; the loop then runs until
   nothing is masked (at most ``gen_length`` steps) and ``steps`` is unused.

Caches (``cache=``), all over the core ``KVCache`` of ``models/lm.py``'s ``DecoderLM``:

* 'none': full recomputation every step;
* 'prefix' (LaViDa's Prefix-DLM): the prompt (image included) is run once and its K/V kept;
  each step runs only the answer against it. Exact when the prompt does not attend to the
  answer (a ``DiffusionLM(prefix_dlm=True)`` model, as LaViDa trains), an approximation of a
  fully bidirectional model otherwise;
* 'dual' (Fast-dLLM): at each block boundary one full pass refreshes the K/V of every
  position (and gives that step's logits); the other steps of the block run only the block's
  tokens against the cached prompt and the cached blocks before *and* after it.

EOS: like LLaDA / LaViDa, nothing special happens inside the loop -- the model was trained to
fill the tail of the answer with EOS (supervised EOS padding) and decodes it like any token.
With ``eos_id`` the returned answer is truncated at the first EOS: every later position is
set to EOS (LaViDa's released decode drops special tokens instead, keeping any text after an
EOS). The proposal never picks [MASK] itself (its logit is set to -inf).

Infill (``draft_ids=``; LaViDa-FIM inference): the answer starts from a user draft instead
of all [MASK]. Draft positions holding ``mask_id`` are the [M] runs to fill; every other draft
token (text, [FIM] markers, EOT, ...) is fixed: it is seen by the model but never proposed,
committed or changed. The same loop runs with the same proposal, remasking, temperature, CFG,
caches and threshold; only [M] positions are candidates.

* Schedule: a block's step counts are computed from *its own* [M] count ``m`` (per row):
  ``transfer_schedule(m, S_m)`` (`infill_schedule`). With ``infill_steps='jump'`` (the spec:
  the reverse process starts at ``t = m / block_length`` instead of 1, keeping the step
  density of a full block) ``S_m = ceil(S m / block_length)``, capped to [1, m]; with
  'full' (LaViDa's released code) ``S_m = min(S, m)``; ``S = steps / blocks``. A block
  with no [M] in any row costs no model call; rows of a batch that finish a block early
  wait (commit 0) while the others finish it. A draft that is all [M] is plain `generate`.
* Variable-length infill: a FIM-trained model (stage 3, `masked.fim_insert`) fills an [M]
  run followed by a [FIM] marker with text and then [S] filler tokens; nothing about that is
  special to the sampler. `strip_tokens` drops [S] / [FIM] afterwards (static shapes).
* ``draft_mask`` (False = padding) lets drafts of different lengths share one batch;
  a draft shorter than ``gen_length`` is padded. Padding is hidden from attention, never
  filled and returned as ``eos_id`` (``mask_id`` without one), so a padded row decodes as
  it would alone with the same ``gen_length`` / blocks (LaViDa's code instead fills the
  positions after a short draft with [MASK] and decodes them: put those [M] in the draft).
* EOS: with ``eos_id`` each [M] run is truncated at its first generated EOS (the rest of
  the run becomes EOS); fixed draft tokens, EOS among them, are never changed. Without a
  draft the answer is one run, so this is the rule above.

Example::

    import jax, jax.numpy as jnp
    from mmjax import core
    from mmjax.models.lm import DecoderLM, LMConfig
    from mmjax.diffusion.masked_sampler import DiffusionLM, generate
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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmjax import core

SCHEDULES = ("linear", "cosine", "shift")
REMASKINGS = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")
INFILL_STEPS = ("jump", "full")


# ----------------------------------------------------------------------------- schedules
def transfer_schedule(num_tokens: int, steps: int, schedule: str = "linear",
                      shift_a: float = 1 / 3) -> np.ndarray:
  """Tokens committed at each of ``steps`` steps of one block of ``num_tokens`` masks.

  * 'linear' (LLaDA): ``num_tokens // steps`` each, the remainder to the first steps.
  * 'cosine' / 'shift': time runs from t = 1 (all masked) to 0 on the grid
    ``t_k = 1 - k / steps``; the masked fraction at ``t`` is ``s(t)``, so the committed count
    after step k is ``floor(N (1 - s(t_k)))`` and a step commits the difference, at least 1
    (the extra ones are taken from the largest counts). 'cosine': ``s(t) = (1 - cos(pi t)) / 2``
    (LaViDa's code; symmetric, slow-fast-slow). 'shift' (LaViDa): ``s(t) = a t / (1 + (a - 1)
    t)``; ``a = 1/3`` front-loads unmasking; counts are returned largest first. (The spec's
    K=8 example ``[9, 7, 4, 4, 2, 2, 2, 1]`` sums to 31; this rule, which reproduces its K=16
    example, ends in 2.)

  >>> transfer_schedule(32, 16, "shift").tolist()
  [5, 4, 4, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
  >>> transfer_schedule(32, 8, "shift").tolist()
  [9, 7, 4, 4, 2, 2, 2, 2]
  >>> transfer_schedule(10, 4).tolist()
  [3, 3, 2, 2]
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
  if not 1 <= steps <= num_tokens:
    raise ValueError(f"steps per block ({steps}) must be in [1, block_length={num_tokens}]")
  if schedule == "linear":
    base, rem = divmod(num_tokens, steps)
    return base + (np.arange(steps) < rem).astype(np.int64)
  u = np.arange(steps + 1, dtype=np.float64) / steps           # 1 - t_k
  if schedule == "cosine":
    done = (1.0 - np.cos(np.pi * u)) / 2.0
  else:
    if shift_a <= 0:
      raise ValueError(f"shift_a must be positive, got {shift_a}")
    done = u / (shift_a + (1.0 - shift_a) * u)                 # = 1 - s(1 - u)
  cum = np.floor(done * num_tokens + 1e-9).astype(np.int64)
  cum[0], cum[-1] = 0, num_tokens
  counts = np.maximum(np.diff(cum), 1)
  while counts.sum() > num_tokens:                              # pay for the forced 1s
    counts[np.argmax(counts)] -= 1
  return np.sort(counts)[::-1].copy() if schedule == "shift" else counts


def infill_steps_for(num_masked: int, steps: int, block_length: int,
                     rule: str = "jump") -> int:
  """Steps an infill block with ``num_masked`` [M] of ``block_length`` positions gets when
  a full block gets ``steps``: 'jump' ``ceil(steps m / block_length)`` (the process starts at
  ``t = m / block_length``; same tokens per step as a full block), 'full' ``steps``; both
  capped to [1, m] (0 when m = 0).

  >>> [infill_steps_for(m, 8, 32) for m in (0, 1, 4, 5, 31, 32)]
  [0, 1, 1, 2, 8, 8]
  >>> [infill_steps_for(m, 8, 32, "full") for m in (0, 1, 4, 5, 31, 32)]
  [0, 1, 4, 5, 8, 8]
  """
  if rule not in INFILL_STEPS:
    raise ValueError(f"infill_steps={rule!r} is not one of {INFILL_STEPS}")
  if num_masked <= 0:
    return 0
  s = -(-steps * num_masked // block_length) if rule == "jump" else steps
  return int(min(num_masked, max(1, s)))


def infill_schedule(num_masked: int, steps: int, block_length: int, schedule: str = "linear",
                    shift_a: float = 1 / 3, rule: str = "jump") -> np.ndarray:
  """Tokens committed per step in an infill block with ``num_masked`` [M] positions:
  ``transfer_schedule(m, infill_steps_for(m, ...))`` (empty when m = 0). With m =
  block_length it is the plain block schedule.

  >>> infill_schedule(5, 8, 32).tolist(), infill_schedule(5, 8, 32, rule="full").tolist()
  ([3, 2], [1, 1, 1, 1, 1])
  >>> infill_schedule(12, 8, 32, "shift").tolist()
  [7, 3, 2]
  """
  n = infill_steps_for(num_masked, steps, block_length, rule)
  if n == 0:
    return np.zeros((0,), np.int64)
  return transfer_schedule(num_masked, n, schedule, shift_a)


@functools.lru_cache(maxsize=32)
def _infill_table(block_length: int, steps: int, schedule: str, shift_a: float,
                  rule: str) -> np.ndarray:
  """``[block_length + 1, steps]``: row m is `infill_schedule` (m [M] in a block), 0-padded."""
  table = np.zeros((block_length + 1, steps), np.int32)
  for m in range(1, block_length + 1):
    counts = infill_schedule(m, steps, block_length, schedule, shift_a, rule)
    table[m, :len(counts)] = counts
  return table


def pad_drafts(drafts, length: Optional[int] = None, pad_id: int = 0):
  """Right-pads 1-D drafts of different lengths -> ``(draft_ids [b, D], draft_mask [b, D])``
  (numpy; ``D = length`` or the longest), for ``generate(draft_ids=, draft_mask=)``.

  >>> ids, m = pad_drafts([[5, 9, 9], [7]], pad_id=0)
  >>> ids.tolist(), m.tolist()
  ([[5, 9, 9], [7, 0, 0]], [[True, True, True], [True, False, False]])
  """
  drafts = [np.asarray(d, np.int64).reshape(-1) for d in drafts]
  width = max(len(d) for d in drafts) if length is None else length
  if any(len(d) > width for d in drafts):
    raise ValueError(f"a draft is longer than length={width}")
  ids = np.full((len(drafts), width), pad_id, np.int32)
  mask = np.zeros((len(drafts), width), bool)
  for r, d in enumerate(drafts):
    ids[r, :len(d)], mask[r, :len(d)] = d, True
  return ids, mask


def strip_tokens(ids, drop, pad_id: int):
  """Removes every token in ``drop`` from each row of ``ids [b, n]``, moving the rest left
  (order kept) and padding the end with ``pad_id``: static shapes, jittable. For LaViDa-FIM
  output, ``drop = (S_ID, FIM_ID)`` turns fixed-length [M] runs into variable-length infills.

  >>> strip_tokens(jnp.array([[4, 1, 1, 2, 5, 2]]), (1, 2), pad_id=0).tolist()
  [[4, 5, 0, 0, 0, 0]]
  """
  ids = jnp.asarray(ids)
  keep = ~jnp.isin(ids, jnp.asarray(drop, ids.dtype))
  order = jnp.argsort(~keep, axis=-1, stable=True)                  # kept tokens first
  out = jnp.take_along_axis(ids, order, -1)
  n = jnp.sum(keep, -1, keepdims=True)
  return jnp.where(jnp.arange(ids.shape[-1]) < n, out, jnp.asarray(pad_id, ids.dtype))


# ----------------------------------------------------------------------------- the model
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

  def _features(self, embeds, mask, positions, cache=None, cache_valid=None):
    return self._apply("features", inputs_embeds=embeds, mask=mask, positions=positions,
                       cache=cache, cache_valid=cache_valid)

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

  def block_logits(self, h, start, length: int):
    """fp32 logits ``[b, length, V]`` of positions ``start ..`` of hidden states ``h``; a
    model with shifted prediction (Dream) reads position i from hidden state i - 1 through
    its unshifted head."""
    shift = int(self.module.config.shift_logits)
    rows = jax.lax.dynamic_slice_in_dim(h, start - shift, length, axis=1)
    return self._apply("logits", rows, shift_logits=False)


@struct.dataclass
class _Fn:
  """A plain ``logits_fn(ids, attention_mask) -> logits`` carried through jit."""
  fn: Callable = struct.field(pytree_node=False)


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


def _concrete(a) -> Optional[np.ndarray]:
  """``a`` as numpy, or None while it is traced (value checks are then skipped)."""
  return None if isinstance(a, jax.core.Tracer) else np.asarray(a)


def generate(logits_fn, prompt_ids=None, prompt_mask=None, *, gen_length: Optional[int] = None,
             steps: Optional[int] = None, block_length: Optional[int] = None, mask_id: int,
             temperature: float = 0.0, remasking: str = "low_confidence",
             schedule: str = "linear", shift_a: float = 1 / 3, cfg_scale: float = 0.0,
             threshold: Optional[float] = None, eos_id: Optional[int] = None,
             cache: str = "none", rng=None, prompt_embeds=None, return_nfe: bool = False,
             draft_ids=None, draft_mask=None, infill_steps: str = "jump"):
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

  Returns the answer ``[b, gen_length]`` int32 (and the NFE count).

  Example::

    out = generate(lm, prompt, mask, gen_length=32, steps=16, block_length=32,
                   mask_id=126336, schedule="shift", cache="prefix")
    out, nfe = generate(lm, prompt, mask, gen_length=256, block_length=32, mask_id=126336,
                        threshold=0.9, cache="dual", return_nfe=True)
    M, FIM = 126336, 126085                     # a LaViDa-FIM draft: "A [M]x11 [FIM] ..."
    out = generate(lm, prompt, mask, draft_ids=draft, steps=64, block_length=64,
                   mask_id=M, schedule="shift", cache="prefix")
    text = strip_tokens(out, (126086, FIM), pad_id=126081)   # drop [S] fillers and [FIM]
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
    raise ValueError("cache='prefix'/'dual' and prompt_embeds need a DiffusionLM")
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
                  infill_steps)
  model = _Fn(logits_fn) if plain else logits_fn
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, prompt_ids, prompt_mask, prompt_embeds, draft, real, rng, opts=opts)


def check_draft(draft_ids, draft_mask, batch: int, gen_length: int, mask_id: int,
                vocab_size: Optional[int] = None):
  """Validates a draft (``generate``'s ``draft_ids [b, D]`` / ``draft_mask``) and pads it to
  ``gen_length`` -> ``(draft [b, G] int32, real [b, G] bool)``. Value checks (a [M] in every
  row, ids in ``[0, vocab_size)``) need concrete arrays: they are skipped while tracing (call
  this eagerly before a jitted ``generate``); a row without [M] then comes back unchanged."""
  draft_ids = jnp.asarray(draft_ids)
  if draft_ids.ndim != 2 or not 1 <= draft_ids.shape[1] <= gen_length:
    raise ValueError(f"draft_ids must be [batch, D] with 1 <= D <= gen_length={gen_length}, "
                     f"got shape {draft_ids.shape}")
  d = draft_ids.shape[1]
  if draft_ids.shape[0] != batch:
    raise ValueError(f"draft_ids has {draft_ids.shape[0]} rows, the prompt {batch}")
  if not jnp.issubdtype(draft_ids.dtype, jnp.integer):
    raise ValueError(f"draft_ids must be integer token ids, got {draft_ids.dtype}")
  real = jnp.ones(draft_ids.shape, bool) if draft_mask is None else jnp.asarray(draft_mask, bool)
  if real.shape != draft_ids.shape:
    raise ValueError(f"draft_mask must have the shape of draft_ids {draft_ids.shape}, got "
                     f"{real.shape}")
  ids_np, real_np = _concrete(draft_ids), _concrete(real)
  if ids_np is not None and real_np is not None:
    holes = (ids_np == mask_id) & real_np
    empty = np.flatnonzero(~holes.any(1))
    if len(empty):
      raise ValueError(f"draft rows {empty.tolist()} have no [M] (mask_id={mask_id}) to fill")
    hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    bad = real_np & ((ids_np < 0) | (ids_np >= hi))
    if bad.any():
      r, c = np.argwhere(bad)[0]
      raise ValueError(f"draft token {int(ids_np[r, c])} at row {r}, position {c} is not a "
                       f"token id in [0, {hi})")
  pad = ((0, 0), (0, gen_length - d))
  return jnp.pad(draft_ids.astype(jnp.int32), pad), jnp.pad(real, pad)


@functools.partial(jax.jit, static_argnames=("opts",))
def _generate(model, prompt_ids, prompt_mask, prompt_embeds, draft, real, rng, *,
              opts: _Options):
  o = opts
  b, p = prompt_mask.shape
  g, bl = o.gen_length, o.block_length
  n_blocks = g // bl
  cfg = o.cfg_scale > 0
  rows = (lambda a: jnp.concatenate([a, a])) if cfg else (lambda a: a)
  infill = draft is not None
  if infill:        # padding enters as [MASK] (a safe id), hidden, and is never a hole
    x = jnp.where(real, draft, o.mask_id)
  else:
    x, real = jnp.full((b, g), o.mask_id, jnp.int32), jnp.ones((b, g), bool)
  holes = (x == o.mask_id) & real                                       # [b, G]
  slot_mask = rows(jnp.concatenate([prompt_mask, real], 1))                      # [r, P+G]
  positions = core.positions_from_padding(slot_mask)

  if isinstance(model, _Fn):                        # plain logits_fn, full recomputation
    ids = prompt_ids.astype(jnp.int32)
    if cfg:                                         # un-conditional: prompt -> [MASK]
      ids = jnp.concatenate([ids, jnp.where(prompt_mask, o.mask_id, ids)])

    def logits_at(x, start, block, state):
      logits = model.fn(jnp.concatenate([ids, rows(x)], 1), slot_mask)
      return jax.lax.dynamic_slice_in_dim(logits, p + start, bl, axis=1), state
    state = ()
  else:
    pe = model.embed(prompt_ids) if prompt_embeds is None else prompt_embeds
    if cfg:
      mask_emb = model.embed(jnp.full((1, 1), o.mask_id, jnp.int32))[0, 0]
      pe = jnp.concatenate([pe, jnp.where(prompt_mask[..., None], mask_emb.astype(pe.dtype), pe)])

    if o.cache == "none":
      def logits_at(x, start, block, state):
        h = model.hidden(jnp.concatenate([pe, model.embed(rows(x))], 1), slot_mask, p)
        return model.block_logits(h, p + start, bl), state
      state = ()
    elif o.cache == "prefix":
      h_prompt, kv = model.prefill(pe, slot_mask[:, :p], p + g)
      h_last = h_prompt[:, -1:]                     # predicts answer token 0 for Dream

      def logits_at(x, start, block, state):
        h = model.extend(model.embed(rows(x)), kv, slot_mask, positions[:, p:])
        return model.block_logits(jnp.concatenate([h_last, h], 1), 1 + start, bl), state
      state = ()
    else:                                           # dual: refreshed at block boundaries
      def refresh(x, start, kv, h_prev):
        h, kv = model.hidden(jnp.concatenate([pe, model.embed(rows(x))], 1), slot_mask, p,
                             with_cache=True)
        h_prev = jax.lax.dynamic_slice_in_dim(h, p + start - 1, 1, axis=1)
        return model.block_logits(h, p + start, bl), kv, h_prev

      def reuse(x, start, kv, h_prev):
        xb = jax.lax.dynamic_slice_in_dim(rows(x), start, bl, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions, p + start, bl, axis=1)
        # the block's fresh K/V replace its stale ones; every other block stays visible
        at_block = kv.replace(index=jnp.full_like(kv.index, p + start))
        h = model.extend(model.embed(xb), at_block, slot_mask, pos)
        return model.block_logits(jnp.concatenate([h_prev, h], 1), 1, bl), kv, h_prev

      def logits_at(x, start, block, state):
        kv, h_prev, cached_block = state
        logits, kv, h_prev = jax.lax.cond(block != cached_block, refresh, reuse,
                                          x, start, kv, h_prev)
        return logits, (kv, h_prev, block)
      stack = model.module.config.stack
      state = (core.init_cache(stack, 2 * b if cfg else b, p + g),
               jnp.zeros((2 * b if cfg else b, 1, stack.d_model), stack.dtype),
               jnp.int32(-1))

  # Blocks run left to right; the current one is the first with a hole left in any row
  # (lockstep batch), so an infill block without [M] costs nothing. ``j`` counts the steps
  # spent in it; ``k[b]`` tokens are committed at step ``j``.
  if o.threshold is None:
    per_block = o.steps // n_blocks
    if infill:                  # per row, from the block's own [M] count (exact integers)
      table = jnp.asarray(_infill_table(bl, per_block, o.schedule, o.shift_a, o.infill_steps))
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
    logits, state = logits_at(x, start, block, state)                  # [r, bl, V]
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

"""Masked discrete diffusion training math, as LLaDA and LaViDa train their LMs.

Forward process: draw ``t ~ U(0, 1)`` per sequence, mask each *answer* token independently
with probability ``p = (1 - eps) t + eps`` (at least one per row), replacing its input
embedding by the [MASK] embedding. Prompt, image and [FIM] positions are never masked. The
model predicts the clean tokens at the masked positions.

* LLaDA loss: cross-entropy on masked tokens divided by ``p``, summed, normalised by the
  number of positions (pretraining) or per row by the answer length (SFT).
* LaViDa loss: plain token mean of the cross-entropy over masked answer tokens (no ``1/t``).
* Complementary masking (LaViDa): every row also appears with exactly the other answer
  positions masked (the caller stacks the two, 2B rows, computing vision features once).
* EOS padding is supervised and [FIM] insertion (stage 3) are data-pipeline steps on numpy:
  `pad_answers_with_eos`, `fim_insert`.

Everything on arrays is jittable with static shapes.

Example::

    import jax, jax.numpy as jnp
    from mmjax.diffusion import masked
    k_t, k_m = jax.random.split(jax.random.key(0))
    answer = jnp.array([[0, 0, 1, 1, 1, 1]], bool)        # prompt (2) then answer (4)
    t = masked.sample_t(k_t, 1)                            # [1]
    m = masked.forward_mask(k_m, answer, t)                # [1, 6], only answer positions
    m2 = jnp.concatenate([m, masked.complementary_mask(m, answer)])   # 2B rows
    embeds = jnp.zeros((2, 6, 8)); mask_embedding = jnp.ones((8,))
    x = masked.apply_mask_embeddings(embeds, m2, mask_embedding)       # model input
    logits = jnp.zeros((2, 6, 16)); targets = jnp.zeros((2, 6), jnp.int32)
    loss = masked.lavida_loss(logits, targets, m2)         # log(16) for uniform logits
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MASK_EPS = 1e-3
T_KINDS = ("uniform", "logit_normal", "mode")
NORMALISERS = ("tokens", "answer_length")
EXTRA_PAD_RANGE = (-128, 128)   # LaViDa's collator: extra EOS pad length in [-128, 128)


# ----------------------------------------------------------------------------- forward process
def mask_probability(t, eps: float = MASK_EPS):
  """``p = (1 - eps) t + eps``: the masking probability at time ``t`` (never exactly 0).

  >>> [round(float(mask_probability(t)), 6) for t in (0.0, 0.5, 1.0)]
  [0.001, 0.5005, 1.0]
  """
  return (1.0 - eps) * jnp.asarray(t, jnp.float32) + eps


def sample_t(rng, batch: int, kind: str = "uniform", *, logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29):
  """Diffusion times ``[batch]`` in [0, 1].

  ``kind``: 'uniform' (LLaDA / LaViDa default), 'logit_normal' (``sigmoid(N(mean, std))``)
  or 'mode' (SD3's mode sampling, ``1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U(0, 1)``),
  the alternatives LaViDa's training code offers.

  >>> t = sample_t(jax.random.key(0), 4, "logit_normal")
  >>> t.shape, bool(((t > 0) & (t < 1)).all())
  ((4,), True)
  """
  if kind == "uniform":
    return jax.random.uniform(rng, (batch,))
  if kind == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
  if kind == "mode":
    u = jax.random.uniform(rng, (batch,))
    t = 1.0 - u - mode_scale * (jnp.cos(jnp.pi * u / 2.0) ** 2 - 1.0 + u)
    return jnp.clip(t, 0.0, 1.0)
  raise ValueError(f"sample_t kind {kind!r} is not one of {T_KINDS}")


def forward_mask(rng, answer_mask, t, never_mask=None, eps: float = MASK_EPS):
  """Which tokens the forward process masks: bool ``[batch, len]``.

  Each position with ``answer_mask & ~never_mask`` (``never_mask``: e.g. [FIM] markers) is
  masked independently with probability ``mask_probability(t)`` (``t [batch]``). A row whose
  draw masked nothing gets its eligible position with the smallest uniform draw masked, so
  every row with an eligible position has at least one masked token (the loss is never
  empty). Prompt / image positions (``answer_mask`` False) are never masked.

  >>> ans = jnp.array([[0, 1, 1, 1]], bool)
  >>> m = forward_mask(jax.random.key(0), ans, jnp.zeros(1))   # p = 0.001: exactly one
  >>> int(m.sum()), bool(m[0, 0])
  (1, False)
  """
  answer_mask = jnp.asarray(answer_mask, bool)
  eligible = answer_mask if never_mask is None else answer_mask & ~jnp.asarray(never_mask, bool)
  u = jax.random.uniform(rng, answer_mask.shape)
  masked = (u < mask_probability(t, eps)[:, None]) & eligible
  first = jnp.argmin(jnp.where(eligible, u, 2.0), axis=-1)                 # [batch]
  force = ~masked.any(-1) & eligible.any(-1)
  one = jnp.arange(answer_mask.shape[1])[None, :] == first[:, None]
  return masked | (force[:, None] & one)


def complementary_mask(masked, answer_mask, never_mask=None):
  """The other answer positions: ``answer_mask & ~masked`` (and never ``never_mask``).

  LaViDa trains each sample twice, once with ``masked`` and once with this mask, so every
  answer token is supervised; stack the two along the batch (2B rows).

  >>> complementary_mask(jnp.array([[0, 1, 0]], bool), jnp.array([[0, 1, 1]], bool))
  Array([[False, False,  True]], dtype=bool)
  """
  out = jnp.asarray(answer_mask, bool) & ~jnp.asarray(masked, bool)
  return out if never_mask is None else out & ~jnp.asarray(never_mask, bool)


def apply_mask_embeddings(embeds, masked, mask_embedding):
  """Masking at the embedding level: ``embeds [b, L, E]`` with masked rows replaced by
  ``mask_embedding [E]`` (the [MASK] token's embedding; image features can be masked too).

  >>> apply_mask_embeddings(jnp.zeros((1, 2, 2)), jnp.array([[1, 0]], bool), jnp.ones(2))[0]
  Array([[1., 1.],
         [0., 0.]], dtype=float32)
  """
  mask_embedding = jnp.asarray(mask_embedding, embeds.dtype)
  return jnp.where(jnp.asarray(masked, bool)[..., None], mask_embedding, embeds)


# ----------------------------------------------------------------------------- losses
def token_cross_entropy(logits, targets):
  """``-log softmax(logits)[target]`` per position, fp32 ``[batch, len]``."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def lavida_loss(logits, targets, masked):
  """LaViDa's loss: mean cross-entropy over the masked answer tokens, no ``1/t`` weight.

  ``logits [b, L, V]``, ``targets [b, L]`` (clean ids), ``masked [b, L]`` bool (the forward
  mask, and its complement on the second half of a 2B batch). 0 when nothing is masked.

  >>> float(lavida_loss(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), int), jnp.ones((1, 3), bool)))
  1.386...
  """
  masked = jnp.asarray(masked, jnp.float32)
  ce = token_cross_entropy(logits, targets)
  return jnp.sum(ce * masked) / jnp.maximum(jnp.sum(masked), 1.0)


def llada_loss(logits, targets, masked, p, normaliser: str = "tokens", answer_mask=None):
  """LLaDA's loss: ``sum over masked tokens of CE / p``, normalised.

  Args:
    p: the masking probability, ``[b]`` or ``[b, L]`` (``mask_probability(t)``).
    normaliser: 'tokens' divides by the number of positions ``b * L`` (pretraining);
      'answer_length' divides each row by its answer length (``answer_mask.sum(-1)``) and
      averages over rows (SFT).

  >>> ce = float(jnp.log(4.0)); m = jnp.array([[0, 1, 1, 0]], bool)
  >>> l = llada_loss(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4), int), m, jnp.array([0.5]))
  >>> round(float(l) / ce, 4)                          # 2 tokens * (1 / 0.5) / 4 positions
  1.0
  """
  if normaliser not in NORMALISERS:
    raise ValueError(f"llada_loss normaliser {normaliser!r} is not one of {NORMALISERS}")
  p = jnp.asarray(p, jnp.float32)
  p = p[:, None] if p.ndim == 1 else p
  weighted = token_cross_entropy(logits, targets) / p * jnp.asarray(masked, jnp.float32)
  b, length = weighted.shape
  if normaliser == "tokens":
    return jnp.sum(weighted) / (b * length)
  if answer_mask is None:
    raise ValueError("llada_loss(normaliser='answer_length') needs answer_mask")
  lengths = jnp.maximum(jnp.sum(jnp.asarray(answer_mask, jnp.float32), -1), 1.0)
  return jnp.mean(jnp.sum(weighted, -1) / lengths)


# ----------------------------------------------------------------------------- data (numpy)
def pad_answers_with_eos(ids: Sequence[np.ndarray], answer_len: Sequence[int], eos_id: int,
                         extra_pad: int = 0, max_len: Optional[int] = None):
  """Right-pads ``prompt + answer`` sequences with EOS; the padding is supervised.

  Args:
    ids: one 1-D int array per example (prompt then answer).
    answer_len: answer tokens at the end of each example.
    extra_pad: extra EOS columns beyond the longest example, used when positive; LaViDa's
      collator draws it as ``rng.integers(*EXTRA_PAD_RANGE)`` per batch, so the model learns
      to fill an over-long answer slot with EOS.
    max_len: truncate the batch to this many columns.

  Returns ``tokens [b, T]`` and ``answer_mask [b, T]`` (True on answer tokens and on every
  EOS pad: the positions the forward process may mask and the loss covers). The pads are
  real tokens: attend to them (no padding mask).

  >>> t, a = pad_answers_with_eos([np.array([5, 6, 7]), np.array([5, 8])], [1, 1], 0, 2)
  >>> t.tolist(), a.astype(int).tolist()
  ([[5, 6, 7, 0, 0], [5, 8, 0, 0, 0]], [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
  """
  lengths = [len(x) for x in ids]
  total = max(lengths) + max(int(extra_pad), 0)
  total = total if max_len is None else min(total, max_len)
  tokens = np.full((len(ids), total), eos_id, dtype=np.int32)
  answer = np.ones((len(ids), total), dtype=bool)
  for i, (x, n, a) in enumerate(zip(ids, lengths, answer_len)):
    if not 0 <= a <= n:
      raise ValueError(f"example {i}: answer_len {a} not in [0, {n}]")
    n_keep = min(n, total)
    tokens[i, :n_keep] = np.asarray(x)[:n_keep]
    answer[i, :min(n - a, total)] = False
  return tokens, answer


def fim_insert(words, rng: np.random.Generator, s_id: int, fim_id: int, *, prob: float = 0.8,
               max_s: int = 5, min_words: int = 4, min_segments: int = 5,
               max_segments: int = 10, segment_frac: float = 0.1, at_end: bool = True):
  """LaViDa's stage-3 fill-in-the-middle insertion into one answer.

  With probability ``prob``, for answers of at least ``min_words`` words (the spec's
  "longer than 3"), ``n ~ U[1, N]`` segments are inserted at distinct word boundaries,
  ``N = min(max(min_segments, int(segment_frac * words)), max_segments)`` (and n at most the
  number of boundaries); each segment is ``0..max_s`` [S] tokens followed by one [FIM]. The
  boundaries are between words and, with ``at_end``, after the last word (the spec leaves the
  places open; without the end a draft whose hole ends the answer is never seen in training
  and the hole is filled with EOS).

  Args:
    words: one 1-D int array of token ids per word, or a flat 1-D array (each id a word).
    rng: numpy Generator (the pipeline's per-example rng).

  Returns ``ids [n]`` and ``fim_mask [n]`` bool (True on [FIM]): pass ``fim_mask`` as
  ``never_mask`` -- [FIM] is never masked nor predicted, while [S] tokens are ordinary answer
  tokens (masked and predicted).

  >>> ids, fim = fim_insert(np.arange(10, 20), np.random.default_rng(0), 1, 2, prob=1.0)
  >>> [int(i) for i in ids[~((ids == 1) | (ids == 2))]] == list(range(10, 20))
  True
  """
  words = [np.atleast_1d(np.asarray(w, np.int32)) for w in words]
  flat = np.concatenate(words) if words else np.zeros((0,), np.int32)
  n_words = len(words)
  if n_words < min_words or rng.random() >= prob:
    return flat, np.zeros(flat.shape, bool)
  cap = min(max(min_segments, int(segment_frac * n_words)), max_segments)
  places = np.arange(1, n_words + 1 if at_end else n_words)    # a segment before word i
  n = min(int(rng.integers(1, cap + 1)), len(places))
  before = set(int(i) for i in rng.choice(places, size=n, replace=False))
  out, fim = [], []
  for i, w in enumerate(words + [np.zeros((0,), np.int32)]):    # i = n_words: the end
    if i in before:
      k = int(rng.integers(0, max_s + 1))
      out.append(np.array([s_id] * k + [fim_id], np.int32))
      fim.append(np.arange(k + 1) == k)
    out.append(w)
    fim.append(np.zeros(len(w), bool))
  return np.concatenate(out), np.concatenate(fim)

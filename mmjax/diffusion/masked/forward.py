"""The forward process and the training losses of masked discrete diffusion (LLaDA, LaViDa).

Forward process: draw ``t ~ U(0, 1)`` per sequence, mask each *answer* token independently
with probability ``p = (1 - eps) t + eps`` (at least one per row), replacing its input
embedding by the [MASK] embedding. Prompt, image and [FIM] positions are never masked. The
model predicts the clean tokens at the masked positions.

* LLaDA loss: cross-entropy on masked tokens divided by ``p``, summed, normalised by the
  number of positions (pretraining) or per row by the answer length (SFT).
* LaViDa loss: plain token mean of the cross-entropy over masked answer tokens (no ``1/t``).
* Complementary masking (LaViDa): every row also appears with exactly the other answer
  positions masked (the caller stacks the two, 2B rows, computing vision features once).

The numpy steps that prepare the answers (supervised EOS padding, [FIM] insertion) live in
``mmjax.data.masked_text``. Everything here is jittable with static shapes.

Example::

    import jax, jax.numpy as jnp
    from mmjax.diffusion.masked import forward
    k_t, k_m = jax.random.split(jax.random.key(0))
    answer = jnp.array([[0, 0, 1, 1, 1, 1]], bool)        # prompt (2) then answer (4)
    t = forward.sample_t(k_t, 1)                           # [1]
    m = forward.forward_mask(k_m, answer, t)               # [1, 6], only answer positions
    m2 = jnp.concatenate([m, forward.complementary_mask(m, answer)])   # 2B rows
    embeds = jnp.zeros((2, 6, 8)); mask_embedding = jnp.ones((8,))
    x = forward.apply_mask_embeddings(embeds, m2, mask_embedding)      # model input
    logits = jnp.zeros((2, 6, 16)); targets = jnp.zeros((2, 6), jnp.int32)
    loss = forward.lavida_loss(logits, targets, m2)        # log(16) for uniform logits
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_EPS = 1e-3
T_KINDS = ("uniform", "logit_normal", "mode")
NORMALISERS = ("tokens", "answer_length")


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

"""Infill drafts (LaViDa-FIM inference): what a user gives ``generate(draft_ids=...)``.

A draft is the answer with holes: positions holding ``mask_id`` are the [M] runs to fill,
every other token (text, [FIM] markers, the end-of-turn marker, ...) is fixed -- seen by the
model, never proposed, committed or changed. ``draft_mask`` (False = padding) lets drafts of
different lengths share one batch; padding is hidden from attention, never filled and
returned as ``eos_id`` (``mask_id`` without one), so a padded row decodes as it would alone.
(LaViDa's code instead fills the positions after a short draft with [MASK] and decodes them:
put those [M] in the draft.)

A FIM-trained model (stage 3, ``mmjax.data.masked_text.fim_insert``) fills an [M] run
followed by a [FIM] marker with text and then [S] filler; `strip_tokens` drops [S] / [FIM]
afterwards (static shapes), turning fixed-length runs into variable-length infills.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


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


def _concrete(a) -> Optional[np.ndarray]:
  """``a`` as numpy, or None while it is traced (value checks are then skipped)."""
  return None if isinstance(a, jax.core.Tracer) else np.asarray(a)


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

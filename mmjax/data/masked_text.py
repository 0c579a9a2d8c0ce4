"""Host-side (numpy) preparation of answers for masked-diffusion training (LLaDA, LaViDa).

* `pad_answers_with_eos`: answers right-padded with EOS, and the padding is *supervised*
  (part of what the forward process masks and the loss covers), so the model learns to
  fill an over-long answer slot with EOS;
* `fim_insert`: LaViDa's stage-3 fill-in-the-middle insertion of ``[S]... [FIM]`` segments
  between the words of an answer.

Both run per example in the Grain pipeline (``mmjax.systems.lavida.data.make_example``); the
jittable forward process and losses are in ``mmjax.diffusion.masked.forward``.

Example::

    import numpy as np
    from mmjax.data import masked_text
    tokens, answer = masked_text.pad_answers_with_eos([np.array([5, 6, 7])], [2], eos_id=0,
                                                      extra_pad=2)
    ids, fim = masked_text.fim_insert(np.arange(10, 20), np.random.default_rng(0),
                                      s_id=1, fim_id=2, prob=1.0)
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

EXTRA_PAD_RANGE = (-128, 128)   # LaViDa's collator: extra EOS pad length in [-128, 128)


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
  ``forward_mask``'s ``never_mask`` -- [FIM] is never masked nor predicted, while [S] tokens
  are ordinary answer tokens (masked and predicted).

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

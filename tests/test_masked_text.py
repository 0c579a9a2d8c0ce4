"""Host-side answer preparation for masked-diffusion training: supervised EOS padding and
LaViDa's [S]... [FIM] insertion -- hand-checked on tiny inputs."""
import numpy as np
import pytest

from mmjax.data import masked_text


def test_pad_answers_with_eos():
  ids = [np.array([1, 2, 3, 4]), np.array([1, 5])]
  tok, ans = masked_text.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=-7)   # no extra
  assert tok.tolist() == [[1, 2, 3, 4], [1, 5, 9, 9]]
  assert ans.astype(int).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
  tok, ans = masked_text.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=3)
  assert tok.shape == (2, 7) and (tok[:, 4:] == 9).all() and ans[:, 4:].all()
  tok, _ = masked_text.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=100, max_len=5)
  assert tok.shape == (2, 5)
  with pytest.raises(ValueError, match="answer_len"):
    masked_text.pad_answers_with_eos(ids, [5, 1], eos_id=9)


def test_fim_insert_structure():
  s_id, fim_id = 1, 2
  words = [np.array([100 + i, 200 + i]) if i % 3 == 0 else np.array([100 + i])
           for i in range(60)]                                   # 60 words, N = 6
  flat = np.concatenate(words)
  seen_n, seen_end = set(), False
  for seed in range(40):
    ids, fim = masked_text.fim_insert(words, np.random.default_rng(seed), s_id, fim_id,
                                      prob=1.0)
    assert (ids[fim] == fim_id).all() and fim.sum() == (ids == fim_id).sum()
    assert ids[~np.isin(ids, [s_id, fim_id])].tolist() == flat.tolist()   # words kept, in order
    n = int(fim.sum())
    seen_n.add(n)
    assert 1 <= n <= 6
    runs = np.split(ids, np.flatnonzero(fim) + 1)[:-1]          # each ends with [FIM]
    for run in runs:                                             # 0..5 [S] right before it
      k = 0
      while k + 2 <= len(run) and run[-2 - k] == s_id:
        k += 1
      assert k <= 5
    starts = np.cumsum([0] + [len(w) for w in words])    # between words or at the end
    plain_pos = np.flatnonzero(~np.isin(ids, [s_id, fim_id]))
    for f in np.flatnonzero(fim):
      assert int(np.sum(plain_pos < f)) in set(starts[1:].tolist())
      seen_end = seen_end or not (plain_pos > f).any()
  assert seen_n == set(range(1, 7))                              # n ~ U[1, N]
  assert seen_end                                                # the end is a place too
  for seed in range(40):                                         # at_end=False: never
    ids, _ = masked_text.fim_insert(words, np.random.default_rng(seed), s_id, fim_id,
                                    prob=1.0, at_end=False)
    assert ids[-1] == flat[-1]


def test_fim_insert_skips_short_answers_and_probability():
  short = [np.array([7]), np.array([8]), np.array([9])]           # 3 words: never
  ids, fim = masked_text.fim_insert(short, np.random.default_rng(0), 1, 2, prob=1.0)
  assert ids.tolist() == [7, 8, 9] and not fim.any()
  hits = sum(masked_text.fim_insert(np.arange(10, 30), np.random.default_rng(s), 1, 2)[1].any()
             for s in range(400))
  assert abs(hits / 400 - 0.8) < 0.06
  big = np.arange(1000, 1200)                                    # 200 words: N capped at 10
  ns = {int(masked_text.fim_insert(big, np.random.default_rng(s), 1, 2, prob=1.0)[1].sum())
        for s in range(60)}
  assert max(ns) == 10 and min(ns) >= 1

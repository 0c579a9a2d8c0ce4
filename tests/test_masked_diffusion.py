"""Masked-diffusion training math: forward process, complementary masks, losses, EOS padding,
FIM insertion -- hand-checked on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.diffusion import masked

forward_mask = jax.jit(masked.forward_mask)      # one compile per shape, reused below
lavida_loss = jax.jit(masked.lavida_loss)
llada_loss = jax.jit(masked.llada_loss, static_argnames=("normaliser",))


def test_mask_probability():
  np.testing.assert_allclose(masked.mask_probability(jnp.array([0.0, 0.5, 1.0])),
                             [1e-3, 0.5005, 1.0], rtol=1e-6)


def test_forward_mask_rate_and_never_masked_positions():
  answer = jnp.zeros((3, 4000), bool).at[:, 1000:].set(True)     # 1000 prompt positions
  never = jnp.zeros((3, 4000), bool).at[:, 2000:2010].set(True)   # e.g. [FIM] markers
  t = jnp.array([0.25, 0.5, 0.9])
  m = forward_mask(jax.random.key(1), answer, t, never)
  assert not m[:, :1000].any() and not m[:, 2000:2010].any()
  rate = m[:, 1000:].sum(-1) / 2990.0
  np.testing.assert_allclose(rate, masked.mask_probability(t), atol=0.03)


def test_forward_mask_at_least_one_per_row():
  answer = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  never = jnp.array([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  for seed in range(5):
    m = forward_mask(jax.random.key(seed), answer, jnp.zeros(3), never)   # p = 1e-3
    assert m.sum(-1).tolist() == [1, 1, 0]          # no eligible position in the last row
    assert not (m & ~answer).any() and not (m & never).any()


def test_complementary_mask_partitions_the_answer():
  answer = jnp.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  never = jnp.array([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  m = forward_mask(jax.random.key(0), answer, jnp.array([0.5, 0.5, 0.5]), never)
  c = masked.complementary_mask(m, answer, never)
  assert not (m & c).any()
  assert ((m | c) == (answer & ~never)).all()


def test_apply_mask_embeddings():
  e = jnp.arange(12.0).reshape(1, 3, 4)
  out = masked.apply_mask_embeddings(e, jnp.array([[False, True, False]]), -jnp.ones(4))
  np.testing.assert_array_equal(out[0, 1], -jnp.ones(4))
  np.testing.assert_array_equal(out[0, [0, 2]], e[0, [0, 2]])


@pytest.mark.parametrize("kind", masked.T_KINDS)
def test_sample_t(kind):
  t = masked.sample_t(jax.random.key(0), 256, kind)
  assert t.shape == (256,) and bool(((t >= 0) & (t <= 1)).all()) and float(t.std()) > 0.1
  with pytest.raises(ValueError, match="sample_t kind"):
    masked.sample_t(jax.random.key(0), 2, "cosine")


def test_losses_hand_checked():
  # row 0: target 0 with logits [log 2, 0] -> p = 2/3; row 1 target 1 -> p = 1/3
  logits = jnp.log(jnp.array([[[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]]] * 2))
  targets = jnp.array([[0, 1, 0], [1, 1, 1]])
  m = jnp.array([[1, 1, 0], [0, 1, 0]], bool)
  ce = {0: -np.log(2 / 3), 1: -np.log(1 / 3)}
  want = (ce[0] + ce[1] + ce[1]) / 3
  np.testing.assert_allclose(lavida_loss(logits, targets, m), want, rtol=1e-6)
  p = jnp.array([0.5, 0.25])
  want_tok = ((ce[0] + ce[1]) / 0.5 + ce[1] / 0.25) / 6
  np.testing.assert_allclose(llada_loss(logits, targets, m, p), want_tok, rtol=1e-6)
  answer = jnp.array([[0, 1, 1], [1, 1, 1]], bool)             # answer lengths 2 and 3
  want_ans = (((ce[0] + ce[1]) / 0.5) / 2 + (ce[1] / 0.25) / 3) / 2
  got = llada_loss(logits, targets, m, p, normaliser="answer_length", answer_mask=answer)
  np.testing.assert_allclose(got, want_ans, rtol=1e-6)
  with pytest.raises(ValueError, match="needs answer_mask"):
    masked.llada_loss(logits, targets, m, p, "answer_length")
  with pytest.raises(ValueError, match="normaliser"):
    masked.llada_loss(logits, targets, m, p, "sequence")
  assert float(lavida_loss(logits, targets, jnp.zeros_like(m))) == 0.0


def test_pad_answers_with_eos():
  ids = [np.array([1, 2, 3, 4]), np.array([1, 5])]
  tok, ans = masked.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=-7)   # no extra
  assert tok.tolist() == [[1, 2, 3, 4], [1, 5, 9, 9]]
  assert ans.astype(int).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
  tok, ans = masked.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=3)
  assert tok.shape == (2, 7) and (tok[:, 4:] == 9).all() and ans[:, 4:].all()
  tok, _ = masked.pad_answers_with_eos(ids, [2, 1], eos_id=9, extra_pad=100, max_len=5)
  assert tok.shape == (2, 5)
  with pytest.raises(ValueError, match="answer_len"):
    masked.pad_answers_with_eos(ids, [5, 1], eos_id=9)


def test_fim_insert_structure():
  s_id, fim_id = 1, 2
  words = [np.array([100 + i, 200 + i]) if i % 3 == 0 else np.array([100 + i])
           for i in range(60)]                                   # 60 words, N = 6
  flat = np.concatenate(words)
  seen_n, seen_end = set(), False
  for seed in range(40):
    ids, fim = masked.fim_insert(words, np.random.default_rng(seed), s_id, fim_id, prob=1.0)
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
    ids, _ = masked.fim_insert(words, np.random.default_rng(seed), s_id, fim_id, prob=1.0,
                               at_end=False)
    assert ids[-1] == flat[-1]


def test_fim_insert_skips_short_answers_and_probability():
  short = [np.array([7]), np.array([8]), np.array([9])]           # 3 words: never
  ids, fim = masked.fim_insert(short, np.random.default_rng(0), 1, 2, prob=1.0)
  assert ids.tolist() == [7, 8, 9] and not fim.any()
  hits = sum(masked.fim_insert(np.arange(10, 30), np.random.default_rng(s), 1, 2)[1].any()
             for s in range(400))
  assert abs(hits / 400 - 0.8) < 0.06
  big = np.arange(1000, 1200)                                    # 200 words: N capped at 10
  ns = {int(masked.fim_insert(big, np.random.default_rng(s), 1, 2, prob=1.0)[1].sum())
        for s in range(60)}
  assert max(ns) == 10 and min(ns) >= 1

"""Masked-diffusion training math: forward process, complementary masks, losses -- hand-checked
on tiny inputs (the numpy answer preparation: tests/test_masked_text.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.diffusion.masked import forward

forward_mask = jax.jit(forward.forward_mask)      # one compile per shape, reused below
lavida_loss = jax.jit(forward.lavida_loss)
llada_loss = jax.jit(forward.llada_loss, static_argnames=("normaliser",))


def test_mask_probability():
  np.testing.assert_allclose(forward.mask_probability(jnp.array([0.0, 0.5, 1.0])),
                             [1e-3, 0.5005, 1.0], rtol=1e-6)


def test_forward_mask_rate_and_never_masked_positions():
  answer = jnp.zeros((3, 4000), bool).at[:, 1000:].set(True)     # 1000 prompt positions
  never = jnp.zeros((3, 4000), bool).at[:, 2000:2010].set(True)   # e.g. [FIM] markers
  t = jnp.array([0.25, 0.5, 0.9])
  m = forward_mask(jax.random.key(1), answer, t, never)
  assert not m[:, :1000].any() and not m[:, 2000:2010].any()
  rate = m[:, 1000:].sum(-1) / 2990.0
  np.testing.assert_allclose(rate, forward.mask_probability(t), atol=0.03)


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
  c = forward.complementary_mask(m, answer, never)
  assert not (m & c).any()
  assert ((m | c) == (answer & ~never)).all()


def test_apply_mask_embeddings():
  e = jnp.arange(12.0).reshape(1, 3, 4)
  out = forward.apply_mask_embeddings(e, jnp.array([[False, True, False]]), -jnp.ones(4))
  np.testing.assert_array_equal(out[0, 1], -jnp.ones(4))
  np.testing.assert_array_equal(out[0, [0, 2]], e[0, [0, 2]])


@pytest.mark.parametrize("kind", forward.T_KINDS)
def test_sample_t(kind):
  t = forward.sample_t(jax.random.key(0), 256, kind)
  assert t.shape == (256,) and bool(((t >= 0) & (t <= 1)).all()) and float(t.std()) > 0.1
  with pytest.raises(ValueError, match="sample_t kind"):
    forward.sample_t(jax.random.key(0), 2, "cosine")


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
    forward.llada_loss(logits, targets, m, p, "answer_length")
  with pytest.raises(ValueError, match="normaliser"):
    forward.llada_loss(logits, targets, m, p, "sequence")
  assert float(lavida_loss(logits, targets, jnp.zeros_like(m))) == 0.0

"""The splash-attention impl ('splash', mmjax/core/tpu_attention.py) against the XLA path, in
the Pallas kernel's interpreter on CPU: every mask kind, grouped kv heads, cross-attention,
gradients, and the sharded (shard_map) path on 8 virtual devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import core
from mmjax.core import tpu_attention
from mmjax.core.attention import dot_product_attention

B, H, KVH, D = 2, 4, 2, 16


def _qkv(s, t=None, seed=0, h=H, kvh=KVH):
  t = s if t is None else t
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, s, h, D)), jax.random.normal(kk, (B, t, kvh, D)),
          jax.random.normal(kv, (B, t, kvh, D)))


def _both(q, k, v, mask):
  ref = dot_product_attention(q, k, v, mask, impl="xla")
  with tpu_attention.interpret(True):
    out = dot_product_attention(q, k, v, mask, impl="splash")
  return np.asarray(ref), np.asarray(out)


def _rows_seen(mask, s, t):
  """[b, s] rows that see at least one key (the others are meaningless on both paths)."""
  if mask is None:
    return np.ones((B, s), bool)
  return np.asarray(jnp.broadcast_to(mask, (B, 1, s, t)).any(-1)[:, 0])


MASKS = {
    "causal": lambda s: core.make_attention_mask("causal", s),
    "bidirectional": lambda s: core.make_attention_mask("bidirectional", s),
    "none": lambda s: None,
    "prefix": lambda s: core.make_attention_mask("prefix", s, prefix_len=jnp.array([5, 140])),
    "left_padding_causal": lambda s: core.make_attention_mask(
        "causal", s, padding_mask=jnp.arange(s)[None] >= jnp.array([[0], [150]])),
    "right_padding_bidirectional": lambda s: core.make_attention_mask(
        "bidirectional", s, padding_mask=jnp.arange(s)[None] < jnp.array([[s], [37]])),
    "segments": lambda s: core.make_attention_mask(
        "causal", s, segment_ids=(jnp.arange(s)[None] >= jnp.array([[100], [7]])).astype(int)
        + (jnp.arange(s)[None] >= 200)),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_masks_match_xla(kind):
  s = 264   # padded to 384: three 128-tiles, some all-hidden, some all-visible, some mixed
  q, k, v = _qkv(s)
  mask = MASKS[kind](s)
  ref, out = _both(q, k, v, mask)
  seen = _rows_seen(mask, s, s)
  np.testing.assert_allclose(out[seen], ref[seen], atol=2e-5, rtol=2e-5)
  assert np.isfinite(out).all()


def test_cross_attention_and_per_head_mask_and_scale():
  s, t = 130, 77              # queries and keys of different lengths (keys padded to 128)
  q, k, v = _qkv(s, t, h=4, kvh=1)
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (B, 4, s, t))   # per-head mask
  ref = dot_product_attention(q, k, v, mask, impl="xla", scale=0.3)
  with tpu_attention.interpret(True):
    out = dot_product_attention(q, k, v, mask, impl="splash", scale=0.3)
  seen = np.asarray(mask.any(-1)).transpose(0, 2, 1)                    # [b, s, h]
  np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=2e-5)


def test_gradients_match_xla():
  s = 256
  q, k, v = _qkv(s, seed=1)
  mask = MASKS["prefix"](s)
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def loss(impl, q, k, v):
    return jnp.sum(dot_product_attention(q, k, v, mask, impl=impl) * cot)

  ref = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  with tpu_attention.interpret(True):
    got = jax.jit(jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_batch_split_into_several_calls(monkeypatch):
  """A local batch whose mask tables exceed the scalar-memory budget runs in pieces."""
  monkeypatch.setattr(tpu_attention, "SMEM_TABLE_BYTES", 1)
  s = 128
  q, k, v = _qkv(s, seed=2)
  mask = core.make_attention_mask("causal", s,
                                  padding_mask=jnp.arange(s)[None] >= jnp.array([[0], [20]]))
  ref, out = _both(q, k, v, mask)
  seen = _rows_seen(mask, s, s)
  np.testing.assert_allclose(out[seen], ref[seen], atol=2e-5)


def test_sharded_under_a_mesh():
  """Batch over data x fsdp and heads over tensor: the kernel runs per shard (shard_map)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                           ("data", "fsdp", "tensor"))
  rules = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"),
           ("act_kv_heads", "tensor"))
  s = 128
  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (4, s, H, D))
  k, v = (jax.random.normal(x, (4, s, KVH, D)) for x in (kk, kv))
  mask = core.make_attention_mask(
      "causal", s, padding_mask=jnp.arange(s)[None] >= jnp.array([[0], [3], [9], [60]]))
  ref = dot_product_attention(q, k, v, mask, impl="xla")
  f = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, m, impl="splash"))
  with nn.logical_axis_rules(rules), jax.set_mesh(mesh), tpu_attention.interpret(True):
    text = f.lower(q, k, v, mask).as_text()
    out = f(q, k, v, mask)
  assert "shard_map" in text or "sdy.manual_computation" in text
  seen = np.asarray(mask.any(-1)[:, 0])
  np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], atol=2e-5)


def test_falls_back_to_xla_off_tpu_and_for_short_queries():
  assert tpu_attention.choose_impl("splash", (1, 256, 2, 8), (1, 256, 2, 8), False) == "xla"
  with tpu_attention.interpret(True):
    assert tpu_attention.choose_impl("splash", (1, 256, 2, 8), (1, 256, 2, 8), False) == "splash"
    assert tpu_attention.choose_impl("splash", (1, 1, 2, 8), (1, 256, 2, 8), False) == "xla"
    assert tpu_attention.choose_impl("splash", (1, 256, 2, 8), (1, 256, 2, 8), True) == "xla"
    assert tpu_attention.choose_impl("xla", (1, 256, 2, 8), (1, 256, 2, 8), False) == "xla"
    with tpu_attention.default_impl("splash"):
      assert tpu_attention.choose_impl("xla", (1, 256, 2, 8), (1, 256, 2, 8), False) == "splash"
      assert tpu_attention.choose_impl("xla", (1, 256, 2, 8), (1, 256, 2, 8), True) == "xla"
  # and the result off TPU is the XLA path's, bit for bit
  q, k, v = _qkv(128)
  mask = MASKS["causal"](128)
  np.testing.assert_array_equal(dot_product_attention(q, k, v, mask, impl="splash"),
                                dot_product_attention(q, k, v, mask, impl="xla"))


def test_transformer_config_accepts_splash():
  cfg = core.TransformerConfig(num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                               attention_impl="splash")
  assert cfg.attention_impl == "splash"

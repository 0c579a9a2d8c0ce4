"""Multi-head / grouped-query attention with RoPE, QK-norm, biases, masks and a KV cache;
softmax (``dot_product_attention``) and ReLU linear attention (``relu_linear_attention``).

Shapes: ``x [batch, len, embed]``; q ``[batch, len, heads, head_dim]``; k, v
``[batch, len, kv_heads, head_dim]``; mask ``[batch, 1|heads, q_len, kv_len]`` bool.

Example::

    import jax, jax.numpy as jnp
    from mmjax.core import Attention, TransformerConfig, make_attention_mask
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
    attn = Attention(cfg)
    x = jnp.ones((2, 5, 32))
    mask = make_attention_mask("causal", 5)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    params = attn.init(jax.random.key(0), x, mask=mask, positions=pos)
    y = attn.apply(params, x, mask=mask, positions=pos)          # [2, 5, 32]
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmjax.core.config import TransformerConfig, constrain
from mmjax.core.embeddings import apply_rope
from mmjax.core.masks import make_attention_mask
from mmjax.core.norms import RMSNorm


def dot_product_attention(q, k, v, mask=None, *, impl: str = "xla",
                          scale: Optional[float] = None, return_weights: bool = False):
  """Softmax attention with grouped kv heads.

  Args:
    q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``
      with heads a multiple of kv_heads (query head i uses kv head i // (heads // kv_heads)).
    mask: bool ``[batch|1, 1|heads, q_len, kv_len]`` (True = attend) or None.
    impl: 'xla' (einsum, fp32 softmax) or 'dot_product_attention' (``jax.nn``'s fused op,
      which picks cuDNN / TPU kernels where they apply), or 'chunked'
      (``chunked_attention``: query chunks, never the whole logits; fast on CPU).
    scale: logit scale, default ``head_dim ** -0.5``.
    return_weights: also return the attention weights averaged over heads, fp32
      ``[batch, q_len, kv_len]`` ('xla' only; e.g. for a cache-refresh test).

  Returns ``[batch, q_len, heads, head_dim]`` in ``q.dtype`` (and the weights). Fully masked
  rows give a finite, meaningless average (never NaN).
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  from mmjax.core import tpu_attention  # 'splash': the TPU kernel (falls back to 'xla' off TPU)
  impl = tpu_attention.choose_impl(impl, q.shape, k.shape, return_weights)
  if impl == "splash":
    return tpu_attention.splash_attention(q, k, v, mask, scale=scale)
  if impl == "chunked":
    if return_weights:
      raise ValueError("return_weights needs attention impl 'xla' (chunks hide them)")
    return chunked_attention(q, k, v, mask, scale=scale)
  if impl == "dot_product_attention":
    if return_weights:
      raise ValueError("return_weights needs attention impl 'xla' (the fused op hides them)")
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                        scale=scale)
  if impl != "xla":
    raise ValueError(f"attention impl {impl!r} is not 'xla' or 'dot_product_attention'")
  g = h // kvh
  qg = q.reshape(b, s, kvh, g, d)
  logits = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(q.dtype)).astype(jnp.float32) * scale
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (s, k.shape[1]))
    mb, mh = mask.shape[:2]
    mask = (mask.reshape(mb, 1, 1, s, -1) if mh == 1
            else mask.reshape(mb, kvh, g, s, -1))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)
  out = out.reshape(b, s, h, d).astype(q.dtype)
  return (out, jnp.mean(probs, axis=(1, 2))) if return_weights else out


def chunked_attention(q, k, v, mask=None, *, scale: Optional[float] = None,
                      q_chunk: int = 256):
  """Softmax attention over query chunks: the same result as ``dot_product_attention``'s
  'xla' path (to fp32 rounding) without ever holding the whole ``[batch, heads, q_len,
  kv_len]`` logits: ``q_chunk`` queries' logits at a time, in a ``lax.map`` (on CPU a
  chunk's logits stay in cache). Heads lead the matmuls (``[b, kv_heads, g c, d] @ [b,
  kv_heads, d, kv_len]``); the scale is applied to the queries and the softmax normalised
  after the value product (``[.., d]`` divisions, not ``[.., kv_len]``); a key-padding
  mask (``[b|1, 1, 1, kv_len]``, e.g. a caption's) becomes an extra key channel holding
  the bias, paired with a query channel of ones, so the matmul applies it. Memory-efficient
  attention in the sense of Rabe & Staats, over queries only: the keys stay whole.

  Args: as ``dot_product_attention`` (q ``[b, s, h, d]``, k, v ``[b, t, kv_heads, d]``);
    mask bool ``[b|1, 1|h, 1|s, t]`` (one that does not vary over queries is never
    broadcast to them).

  Returns ``[b, s, h, d]`` in ``q.dtype``. Fully masked rows give a finite average.

  >>> q = k = v = jnp.ones((1, 5, 2, 4))
  >>> chunked_attention(q, k, v, q_chunk=2).shape
  (1, 5, 2, 4)
  """
  b, s, h, d = q.shape
  t, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  dt = q.dtype
  neg = jnp.finfo(jnp.float32).min
  q = q * jnp.asarray(scale, dt)
  kt = k.astype(dt).transpose(0, 2, 3, 1)                           # [b, kvh, d, t]
  vt = v.astype(dt).transpose(0, 2, 1, 3)                           # [b, kvh, t, d]
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mb, mh, ms = mask.shape[:3]
    if mh == 1 and ms == 1:                    # key padding: bias through the q.k product
      bias = jnp.where(mask[:, 0, 0, :], 0.0, neg).astype(dt)       # [mb, t]
      kt = jnp.concatenate([kt, jnp.broadcast_to(bias[:, None, None, :], (b, kvh, 1, t))], 2)
      q = jnp.concatenate([q, jnp.ones((b, s, h, 1), dt)], axis=-1)
      mask = None
    else:
      mask = mask.reshape(mb, kvh if mh > 1 else 1, g if mh > 1 else 1, ms, t)
  de = q.shape[-1]                                                  # d, or d + 1 with a bias

  def attend(qc, mc):                        # qc [b, c, h, de]; mc [mb, ., ., 1|c, t]
    c = qc.shape[1]
    qc = qc.reshape(b, c, kvh, g, de).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * c, de)
    logits = jnp.matmul(qc, kt, preferred_element_type=jnp.float32)  # [b, kvh, g c, t]
    if mc is not None:
      logits = jnp.where(mc, logits.reshape(b, kvh, g, c, t), neg).reshape(logits.shape)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.matmul(p.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / jnp.sum(p, axis=-1, keepdims=True)                  # [b, kvh, g c, d]
    return out.reshape(b, kvh, g, c, d).transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)

  n = -(-s // q_chunk)
  if n == 1:
    return attend(q, mask).astype(dt)
  pad = n * q_chunk - s
  qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, q_chunk, h, de)
  qs = jnp.moveaxis(qs, 1, 0)                                       # [n, b, c, h, de]
  if mask is None or mask.shape[3] == 1:
    out = jax.lax.map(lambda qc: attend(qc, mask), qs)
  else:
    mc = jnp.pad(mask, ((0, 0),) * 3 + ((0, pad), (0, 0)), constant_values=True)
    mc = jnp.moveaxis(mc.reshape(mc.shape[:3] + (n, q_chunk, t)), 3, 0)
    out = jax.lax.map(lambda a: attend(*a), (qs, mc))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, h, d)[:, :s].astype(dt)


def relu_linear_attention(q, k, v, eps: float = 1e-15):
  """Linear attention with a ReLU kernel (Sana, EfficientViT / DC-AE):
  ``relu(q) (relu(k)^T v) / (relu(q) sum_m relu(k_m) + eps)``, no mask.

  q, k, v ``[batch, len, heads, head_dim]`` -> ``[batch, len, heads, head_dim]`` in fp32
  (computed in fp32 at full matmul precision, as the references do: the sums over all
  tokens overflow / lose precision in bf16). Cost is linear in ``len``.
  """
  hi = jax.lax.Precision.HIGHEST
  q = jax.nn.relu(q.astype(jnp.float32))
  k = jax.nn.relu(k.astype(jnp.float32))
  v = v.astype(jnp.float32)
  kv = jnp.einsum("bnhd,bnhe->bhde", k, v, precision=hi)          # [b, h, d, e]
  num = jnp.einsum("bnhd,bhde->bnhe", q, kv, precision=hi)
  den = jnp.einsum("bnhd,bhd->bnh", q, jnp.sum(k, axis=1), precision=hi)
  return num / (den[..., None] + eps)


def write_cache(cache, new, index):
  """Writes ``new [batch, len, ...]`` into ``cache [batch, max_len, ...]`` at slots
  ``index[b] .. index[b] + len - 1`` of each row; writes past ``max_len`` are dropped.

  A gather plus a select over the whole cache rather than a per-row
  ``dynamic_update_slice``: vmapped, that becomes a scatter the SPMD partitioner can only
  handle by replicating the cache when the batch is sharded; the select is elementwise and
  costs one pass over the cache, as attention to it does anyway.
  """
  s, max_len = new.shape[1], cache.shape[1]
  rel = jnp.arange(max_len, dtype=jnp.int32)[None, :] - index[:, None]       # [b, max_len]
  valid = (rel >= 0) & (rel < s)
  idx = jnp.clip(rel, 0, s - 1).reshape(rel.shape + (1,) * (new.ndim - 2))
  gathered = jnp.take_along_axis(new.astype(cache.dtype), idx, axis=1)      # [b, max_len, ...]
  return jnp.where(valid.reshape(idx.shape), gathered, cache)


def l2_normalize(x, eps: float = 1e-12):
  """``x / max(||x||, eps)`` over the last axis in fp32 (torch's F.normalize)."""
  xf = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
  return (xf / jnp.maximum(norm, eps)).astype(x.dtype)



class HeadDense(nn.Module):
  """A dense layer whose kernel keeps the head axes: ``[embed, heads, head_dim]`` for q/k/v,
  ``[heads, head_dim, embed]`` for the output. (flax's ``DenseGeneral`` initialises a flat
  kernel and reshapes it, which breaks logically-partitioned init under a mesh.)"""
  in_axes: tuple
  in_names: tuple
  out_shape: tuple
  out_names: tuple
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    in_shape = tuple(x.shape[a] for a in self.in_axes)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                               self.in_names + self.out_names),
        in_shape + tuple(self.out_shape), self.param_dtype)
    n_in = len(self.in_axes)
    contract = (tuple(a % x.ndim for a in self.in_axes), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_names),
                        tuple(self.out_shape), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Self-attention of a ``TransformerConfig``; params q_proj, k_proj, v_proj, o_proj
  (kernels ``[embed, heads, head_dim]`` / ``[heads, head_dim, embed]``), plus q_norm / k_norm
  ('rms') or q_gain / k_gain ('l2_after_rope')."""
  cfg: TransformerConfig

  def _proj(self, heads: int, head_axis: str, use_bias: bool, name: str):
    c = self.cfg
    return HeadDense(in_axes=(-1,), in_names=("embed",), out_shape=(heads, c.head_dim),
                     out_names=(head_axis, "head_dim"), use_bias=use_bias, dtype=c.dtype,
                     param_dtype=c.param_dtype, init_std=c.init_std, name=name)

  def _l2_gain(self, x, name: str, head_axis: str):
    c = self.cfg
    # per head *and* per dimension ``[heads, head_dim]`` (MetaQuery's q_norm / k_norm gamma,
    # stored by the reference as ``[heads, 1, head_dim]``)
    gain = self.param(name, nn.with_logical_partitioning(nn.initializers.ones,
                                                         (head_axis, "head_dim")),
                      (x.shape[2], x.shape[3]), c.param_dtype)
    return l2_normalize(x) * (gain.astype(x.dtype) * math.sqrt(c.head_dim))

  @nn.compact
  def __call__(self, x, *, mask, positions=None, context=None, cache=None, cache_index=None,
               cache_valid=None, return_weights: bool = False):
    """Attends ``x [batch, len, embed]`` to itself (and to a cache), or to ``context``.

    Args:
      mask: bool ``[batch|1, 1|heads, len, kv_len]`` or None (= no masking without a cache,
        causal over cache slots with one).
      positions: ``[batch, len]`` ints for RoPE; default ``arange(len)`` (+ cache_index).
        With ``cfg.rope_sections``: ``[axes, batch, len]`` (or ``[batch, len]`` on every axis).
      context: ``[batch, ctx_len, ctx_width]`` for cross-attention: keys/values come from it,
        no RoPE is applied, mask is ``[batch, 1|heads, len, ctx_len]``; no cache.
      cache: None or ``(key, value)``, each ``[batch, max_len, kv_heads, head_dim]``. The new
        keys/values are written at slots ``cache_index[b] ..`` and every query attends over
        all ``max_len`` slots, restricted by ``mask`` (in slot coordinates, kv_len = max_len)
        and to slots written so far (``< cache_index + len``).
      cache_index: ``[batch]`` int32 first slot to write; needed with ``cache``.
      cache_valid: ``[batch, max_len]`` bool, the slots that already hold keys/values, in
        place of "the slots before ``cache_index``": queries see these and the slots written
        now (restricted by ``mask``). All True lets the mask alone decide, so a block in the
        middle of a filled cache can be rewritten while seeing the slots after it.
      return_weights: also return the attention weights averaged over heads ``[batch, len,
        kv_len]`` fp32 (``dot_product_attention``).

    Returns ``y [batch, len, embed]`` without a cache, ``(y, (key, value))`` with one; with
    ``return_weights`` that and the weights, ``(result, weights)``.
    """
    c = self.cfg
    b, s, _ = x.shape
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    q = self._proj(c.num_heads, "heads", c.qkv_bias, "q_proj")(x)
    kv_in = x if context is None else context
    k = self._proj(c.num_kv_heads, "kv_heads", c.qkv_bias, "k_proj")(kv_in)
    v = self._proj(c.num_kv_heads, "kv_heads", c.qkv_bias, "v_proj")(kv_in)
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")

    if c.qk_norm == "rms":
      q = RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="q_norm")(q)
      k = RMSNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="k_norm")(k)
    if context is not None and cache is not None:
      raise ValueError("cross-attention (context) takes no KV cache")
    if c.rope_theta is not None and context is None:
      if positions is None:
        start = 0 if cache_index is None else cache_index[:, None]
        positions = start + jnp.arange(s, dtype=jnp.int32)[None, :]
      q = apply_rope(q, positions, c.rope_theta, c.rope_sections, c.rope_axial)
      k = apply_rope(k, positions, c.rope_theta, c.rope_sections, c.rope_axial)
    if c.qk_norm == "l2_after_rope":
      q = self._l2_gain(q, "q_gain", "heads")
      k = self._l2_gain(k, "k_gain", "kv_heads")
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

    new_cache = None
    if cache is not None:
      if cache_index is None:
        raise ValueError("Attention with a cache needs cache_index [batch]")
      k = write_cache(cache[0], k, cache_index)
      v = write_cache(cache[1], v, cache_index)
      new_cache = (k, v)
      max_len = k.shape[1]
      slot = jnp.arange(max_len)[None, :]
      if cache_valid is None:
        written = slot < (cache_index + s)[:, None]                          # [b, max_len]
      else:
        written = jnp.asarray(cache_valid, bool) | (
            (slot >= cache_index[:, None]) & (slot < (cache_index + s)[:, None]))
      if mask is None:
        mask = make_attention_mask("causal", s, max_len, q_offset=cache_index)
      mask = mask & written[:, None, None, :]

    out = dot_product_attention(q, k, v, mask, impl=c.attention_impl,
                                return_weights=return_weights)
    if return_weights:
      out, weights = out
    out = constrain(out, ("act_batch", "act_length", "act_heads", None))
    y = HeadDense(in_axes=(-2, -1), in_names=("heads", "head_dim"), out_shape=(x.shape[-1],),
                  out_names=("embed",), use_bias=c.out_bias, dtype=c.dtype,
                  param_dtype=c.param_dtype, init_std=c.init_std, name="o_proj")(out)
    y = constrain(y, ("act_batch", "act_length", "act_embed"))
    result = y if cache is None else (y, new_cache)
    return (result, weights) if return_weights else result

"""The pre-norm transformer stack every family composes: scanned layers, remat, KV cache.

A layer is ``x + attn(input_norm(x))`` then ``x + mlp(post_attention_norm(x))``. The final
norm is left to the family. Whether the stack is a causal decoder, an encoder or a prefix-LM
is decided by the mask alone.

Example::

    import jax, jax.numpy as jnp
    from mmjax.core import TransformerConfig, TransformerStack, make_attention_mask, init_cache
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
    stack = TransformerStack(cfg)
    x = jnp.ones((1, 6, 32))
    mask = make_attention_mask("causal", 6)
    pos = jnp.arange(6)[None]
    params = stack.init(jax.random.key(0), x, mask=mask, positions=pos)
    y = stack.apply(params, x, mask=mask, positions=pos)               # [1, 6, 32]

    # the same with a KV cache: prompt first, then one token at a time
    cache = init_cache(cfg, batch=1, max_len=8)
    y4, cache = stack.apply(params, x[:, :4], mask=None, cache=cache, decode=True)
    y5, cache = stack.apply(params, x[:, 4:5], mask=None, cache=cache, decode=True)
    # y5 == y[:, 4:5]; mask=None with a cache means causal over the cache slots.
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmjax.core.attention import Attention
from mmjax.core.config import TransformerConfig, constrain, remat_policy
from mmjax.core.mlp import Mlp
from mmjax.core.norms import make_norm

LAYERS = "layers"  # name of the scanned layer collection and of its logical axis
TAP_AXES = (None, "act_batch", "act_length", "act_embed")  # logical axes of a tap buffer


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer and the next slot of each row.

  key, value: ``[layers, batch, max_len, kv_heads, head_dim]`` (RoPE already applied);
  index: ``[batch]`` int32, the first free slot (equals the number of tokens written).
  """
  key: jax.Array
  value: jax.Array
  index: jax.Array

  @staticmethod
  def logical_axes() -> "KVCache":
    """Logical axis names of each field, for ``nn.logical_to_mesh_sharding``."""
    kv = PartitionSpec(LAYERS, "act_batch", None, "act_kv_heads", None)
    return KVCache(key=kv, value=kv, index=PartitionSpec("act_batch"))


def init_cache(cfg: TransformerConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for ``batch`` rows of up to ``max_len`` tokens (dtype: cfg.dtype).

  Example::

    cache = init_cache(cfg, batch=2, max_len=128)   # cache.key: [layers, 2, 128, kvh, hd]
  """
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = cfg.dtype if dtype is None else dtype
  return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype),
                 index=jnp.zeros((batch,), jnp.int32))


class DecoderLayer(nn.Module):
  """One pre-norm block; submodules input_norm, self_attn, post_attention_norm, mlp.

  ``__call__(x, mask, positions, cache, cache_index, deterministic, cache_valid=None)
  -> (x, cache)`` with positional arguments so that ``nn.scan`` / ``nn.remat`` can lift it;
  ``cache`` is None or this layer's ``(key, value)`` (``cache_valid``: see ``Attention``).
  ``mask`` is a mask, or ``(choices [k, ...], pick)``: this layer attends with
  ``choices[pick]`` (``TransformerStack(mask_choice=...)``).
  With ``emit_hidden`` it returns ``(x, (cache, x))``: the scan then stacks every layer's
  output (layer taps) next to the cache. With ``emit_attention`` that second item becomes
  ``(item, weights)``: the attention weights averaged over heads ``[batch, len, kv_len]``.
  """
  cfg: TransformerConfig
  emit_hidden: bool = False
  emit_attention: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, cache, cache_index, deterministic, cache_valid=None):
    c = self.cfg
    if isinstance(mask, tuple):
      choices, pick = mask
      mask = jax.lax.dynamic_index_in_dim(choices, pick, axis=0, keepdims=False)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    h = make_norm(c.norm, c.norm_eps, c.dtype, c.param_dtype, "input_norm")(x)
    h = Attention(c, name="self_attn")(h, mask=mask, positions=positions, cache=cache,
                                       cache_index=cache_index, cache_valid=cache_valid,
                                       return_weights=self.emit_attention)
    if self.emit_attention:
      h, weights = h
    if cache is not None:
      h, cache = h
    if c.dropout_rate:
      h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x = x + h
    h = make_norm(c.norm, c.norm_eps, c.dtype, c.param_dtype, "post_attention_norm")(x)
    h = Mlp(c.mlp_dim, act=c.mlp_act, use_bias=c.mlp_bias, dtype=c.dtype,
            param_dtype=c.param_dtype, init_std=c.init_std, name="mlp")(h)
    if c.dropout_rate:
      h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x = constrain(x + h, ("act_batch", "act_length", "act_embed"))
    out = (cache, x) if self.emit_hidden else cache
    return x, ((out, weights) if self.emit_attention else out)


class TapLayer(nn.Module):
  """A layer that also records its output in a small tap buffer (the scanned path of
  ``TransformerStack(tap_layers=...)``).

  The carry is ``(x, taps, count)``: ``taps [len(tap_layers), batch, len, d]`` and ``count``
  the layers run so far. After the wrapped layer runs, ``count + 1`` is compared with
  ``tap_layers`` and matching rows of ``taps`` take the new ``x`` (a select, no gather or
  per-layer output). The wrapped layer shares this module's scope (``nn.share_scope``), so the
  parameters are exactly those of the layer alone; the select sits outside any remat.
  """
  cfg: TransformerConfig
  layer: Any                      # the (possibly remat-wrapped) DecoderLayer class
  tap_layers: tuple
  emit_hidden: bool = False
  emit_attention: bool = False

  def setup(self):
    self.inner = self.layer(self.cfg, emit_hidden=self.emit_hidden,
                            emit_attention=self.emit_attention)
    nn.share_scope(self, self.inner)

  def __call__(self, carry, mask, positions, cache, cache_index, deterministic, cache_valid=None):
    x, taps, count = carry
    x, out = self.inner(x, mask, positions, cache, cache_index, deterministic, cache_valid)
    count = count + 1
    hit = jnp.asarray(self.tap_layers, jnp.int32) == count                    # [taps]
    taps = jnp.where(hit[:, None, None, None], x[None].astype(taps.dtype), taps)
    return (x, constrain(taps, TAP_AXES), count), out


class TransformerStack(nn.Module):
  """``cfg.num_layers`` DecoderLayers, scanned (params under ``layers`` with a leading
  'layers' axis) or unrolled (``layers_0``, ``layers_1``, ...), with ``cfg.remat_policy``."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, *, mask, positions=None, cache: Optional[KVCache] = None,
               decode: bool = False, deterministic: bool = True,
               return_hidden_states: bool = False, cache_valid=None,
               tap_layers: tuple = (), mask_choice: tuple = (),
               return_attention: bool = False):
    """``x [batch, len, d_model]`` -> same shape (no final norm).

    Args:
      mask: bool ``[batch|1, 1|heads, len, kv_len]`` from ``make_attention_mask``; None means
        no masking (without a cache) or causal over cache slots (with one).
      positions: ``[batch, len]`` RoPE positions; default ``arange(len)`` (+ cache.index);
        ``[axes, batch, len]`` with ``cfg.rope_sections`` (multi-axis RoPE).
      mask_choice: one int per layer: ``mask`` is then a stack of masks ``[k, batch|1,
        1|heads, len, kv_len]`` and layer i attends with ``mask[mask_choice[i]]`` (windowed
        layers with a few full-attention ones, as in Qwen2.5-VL's vision tower). Only the
        k masks are held, never one per layer.
      cache, decode: with ``decode=True`` and a ``KVCache``, the new keys/values are written
        at ``cache.index`` of each row, queries attend over all cache slots (the mask is in
        slot coordinates: kv_len = max_len, e.g. ``make_attention_mask('causal', len,
        max_len, q_offset=cache.index)``) limited to the slots written so far, and
        ``(x, new_cache)`` is returned with ``index += len``. Static shapes: usable inside
        ``lax.while_loop``. Keeping the old cache and discarding the new one is how a prefix
        cache is reused (e.g. for every step of masked-diffusion sampling).
      cache_valid: ``[batch, max_len]`` bool, the cache slots that already hold keys/values,
        replacing "the slots before ``cache.index``" (default). With all slots valid the mask
        alone decides visibility: a block in the middle of a full cache is rewritten (at
        ``cache.index``) while seeing the blocks after it (Fast-dLLM's dual cache).
      deterministic: False enables residual dropout (needs a 'dropout' rng).
      return_hidden_states: also return every layer's output ``hidden [layers, batch, len,
        d_model]`` (``hidden[-1]`` is ``x``), collected by the scan / loop:
        ``(x, hidden)``, or ``(x, new_cache, hidden)`` with a cache.
      tap_layers: layer counts whose outputs to return, in transformers' ``hidden_states[k]``
        convention (0 = the input, k = the output of the first k layers, ``num_layers`` = the
        last layer's output), in any order, repeats allowed. Returns ``taps [len(tap_layers),
        batch, len, d_model]`` last: ``(x, taps)``, ``(x, new_cache, taps)``, or after
        ``hidden`` when both are asked. The scan carries only this buffer and a layer count
        and writes a tap with a select when the count matches: memory is ``len(tap_layers)``
        activations, not ``num_layers`` (``return_hidden_states`` keeps every layer).
        Parameters and ``x`` are the same as without taps.
      return_attention: also return every layer's attention weights averaged over heads,
        ``[layers, batch, len, kv_len]`` fp32 (attention impl 'xla'), after ``hidden`` and
        before ``taps`` (e.g. Elastic-Cache's drift test in ``diffusion.masked.caches``).

    Example::

      y, taps = stack.apply(params, x, mask=mask, tap_layers=(0, 1))
      # taps[0] == x (cast to cfg.dtype); taps[1] == the first layer's output
    """
    c = self.cfg
    if decode != (cache is not None):
      raise ValueError("decode=True needs a KVCache and a KVCache needs decode=True")
    if cache_valid is not None and cache is None:
      raise ValueError("cache_valid needs a KVCache")
    tap_layers = tuple(int(k) for k in tap_layers)
    bad = [k for k in tap_layers if not 0 <= k <= c.num_layers]
    if bad:
      raise ValueError(f"tap_layers {bad} outside 0..{c.num_layers} (layer counts of the stack)")
    mask_choice = tuple(int(k) for k in mask_choice)
    if mask_choice:
      if len(mask_choice) != c.num_layers or mask is None or not all(
          0 <= k < mask.shape[0] for k in mask_choice):
        raise ValueError(f"mask_choice {mask_choice} needs one index per layer "
                         f"({c.num_layers}) into a stack of masks")
    b, s, _ = x.shape
    index = None if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
      if index is not None:
        positions = positions + index[:, None]
    x = constrain(x.astype(c.dtype), ("act_batch", "act_length", "act_embed"))

    layer = DecoderLayer
    if c.remat_policy != "none":
      layer = nn.remat(layer, policy=remat_policy(c.remat_policy),
                       prevent_cse=not c.scan_layers, static_argnums=(6,))
    kv = None if cache is None else (cache.key, cache.value)
    if c.scan_layers:
      mask_axes = nn.broadcast
      if mask_choice:   # the stack of masks is shared, each layer's pick is scanned
        mask, mask_axes = (mask, jnp.asarray(mask_choice, jnp.int32)), (nn.broadcast, 0)
      scan_kw = dict(
          variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(mask_axes, nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
      if tap_layers:
        hit = jnp.asarray(tap_layers, jnp.int32) == 0
        taps = jnp.where(hit[:, None, None, None], x[None],
                         jnp.zeros((len(tap_layers),) + x.shape, x.dtype))
        carry = (x, constrain(taps, TAP_AXES), jnp.zeros((), jnp.int32))
        (x, taps, _), out = nn.scan(TapLayer, **scan_kw)(
            c, layer, tap_layers, emit_hidden=return_hidden_states,
            emit_attention=return_attention, name=LAYERS)(
                carry, mask, positions, kv, index, deterministic, cache_valid)
      else:
        x, out = nn.scan(layer, **scan_kw)(c, emit_hidden=return_hidden_states,
                                           emit_attention=return_attention, name=LAYERS)(
            x, mask, positions, kv, index, deterministic, cache_valid)
      if return_attention:
        out, attention = out
      kv, hidden = out if return_hidden_states else (out, None)
    else:
      outs, kept, weights = [], {0: x}, []
      for i in range(c.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        layer_mask = mask[mask_choice[i]] if mask_choice else mask
        x, out = layer(c, emit_hidden=return_hidden_states, emit_attention=return_attention,
                       name=f"{LAYERS}_{i}")(
            x, layer_mask, positions, layer_kv, index, deterministic, cache_valid)
        if return_attention:
          out, w = out
          weights.append(w)
        outs.append(out if return_hidden_states else (out, None))
        if i + 1 in tap_layers:
          kept[i + 1] = x
      if tap_layers:
        taps = constrain(jnp.stack([kept[k] for k in tap_layers]), TAP_AXES)
      if kv is not None:
        kv = tuple(jnp.stack([o[0][j] for o in outs]) for j in range(2))
      hidden = jnp.stack([o[1] for o in outs]) if return_hidden_states else None
      attention = jnp.stack(weights) if return_attention else None
    result = (x,) if cache is None else (x, KVCache(key=kv[0], value=kv[1],
                                                    index=cache.index + s))
    if return_hidden_states:
      result += (hidden,)
    if return_attention:
      result += (attention,)
    if tap_layers:
      result += (taps,)
    return result[0] if len(result) == 1 else result


# ----------------------------------------------------------------------------- params
def unstack_layer_params(params: dict, num_layers: int) -> dict:
  """Scanned stack params (``layers`` with leading axis) -> unrolled (``layers_0`` ...).

  Works on unboxed arrays (``nn.unbox`` / ``nn.meta.unbox`` boxed trees first).
  """
  out = {k: v for k, v in params.items() if k != LAYERS}
  for i in range(num_layers):
    out[f"{LAYERS}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], params[LAYERS])
  return out


def stack_layer_params(params: dict, num_layers: int) -> dict:
  """Unrolled stack params (``layers_0`` ...) -> scanned (``layers`` with leading axis)."""
  names = [f"{LAYERS}_{i}" for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  out[LAYERS] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[params[n] for n in names])
  return out

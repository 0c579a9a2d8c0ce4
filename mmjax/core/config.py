"""``TransformerConfig``: the one description of a transformer stack every family fills in.

Example::

    import jax.numpy as jnp
    from mmjax.core import TransformerConfig
    cfg = TransformerConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
                            rope_theta=10000.0, qkv_bias=True, dtype=jnp.float32)
    assert cfg.head_dim == 16 and cfg.num_groups == 2
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

MLP_ACTS = ("swiglu", "geglu", "gelu", "gelu_tanh")
NORMS = ("rms", "layer")
QK_NORMS = (None, "rms", "l2_after_rope")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "splash")   # splash: core/tpu_attention.py
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a pre-norm transformer stack (decoder or encoder, by the mask)."""
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None   # GQA; None = num_heads (plain multi-head attention)
  head_dim: Optional[int] = None       # None = d_model // num_heads
  # 'swiglu' / 'geglu': down(act(gate_proj x) * up_proj x) with act silu / exact gelu;
  # 'gelu' / 'gelu_tanh': fc2(act(fc1 x)) with exact / tanh-approximated gelu.
  mlp_act: str = "swiglu"
  norm: str = "rms"                    # 'rms' (HF RMSNorm, fp32) | 'layer' (LayerNorm with bias)
  norm_eps: float = 1e-6
  rope_theta: Optional[float] = 10000.0  # None = no rotary embedding
  # multi-axis RoPE: positions are [len(rope_sections), batch, len] (a [batch, len] array is
  # used on every axis); the first rope_sections[0] of the head_dim/2 rotary frequencies turn
  # with axis 0, the next with axis 1, ... (Qwen2-VL's M-RoPE: temporal, height, width).
  rope_sections: Optional[tuple] = None
  rope_axial: bool = False             # each section its own frequency ladder (2-D vision RoPE)
  qkv_bias: bool = False
  out_bias: bool = False               # bias on o_proj
  mlp_bias: bool = False
  # None | 'rms': per-head RMSNorm on q and k before RoPE (Qwen3) |
  # 'l2_after_rope': L2-normalise q, k after RoPE, times a learnable gain per head and dim,
  # times sqrt(head_dim) (MetaQuery's connector).
  qk_norm: Optional[str] = None
  dropout_rate: float = 0.0            # residual dropout after attention and MLP (train only)
  dtype: Any = jnp.float32             # compute dtype
  param_dtype: Any = jnp.float32
  scan_layers: bool = True             # nn.scan over layers; params get a leading 'layers' axis
  remat_policy: str = "none"           # none | full | dots | dots_with_no_batch_dims | save_qkv_proj
  attention_impl: str = "xla"          # 'xla' (einsum + softmax) | 'dot_product_attention'
  init_std: float = 0.02               # normal init std of every kernel; biases start at 0

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    for field, value, allowed in (("mlp_act", self.mlp_act, MLP_ACTS),
                                  ("norm", self.norm, NORMS),
                                  ("qk_norm", self.qk_norm, QK_NORMS),
                                  ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
                                  ("remat_policy", self.remat_policy, REMAT_POLICIES)):
      if value not in allowed:
        raise ValueError(f"TransformerConfig.{field}={value!r}; expected one of {allowed}")
    if self.rope_theta is not None and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.rope_sections is not None:
      object.__setattr__(self, "rope_sections", tuple(int(n) for n in self.rope_sections))
      if 2 * sum(self.rope_sections) != self.head_dim:
        raise ValueError(f"rope_sections {self.rope_sections} must sum to head_dim/2 = "
                         f"{self.head_dim // 2}")
    elif self.rope_axial:
      raise ValueError("rope_axial needs rope_sections")

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def remat_policy(name: str):
  """Maps a policy name to ``jax.checkpoint_policies`` (None for 'full' = save nothing)."""
  policies = jax.checkpoint_policies
  table = {
      "full": None,
      "dots": policies.checkpoint_dots,
      "dots_with_no_batch_dims": policies.checkpoint_dots_with_no_batch_dims,
      # the names are tagged with ``checkpoint_name`` in attention.py
      "save_qkv_proj": policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
  }
  if name not in table:
    raise ValueError(f"remat policy {name!r} is not one of {sorted(table)} (or 'none')")
  return table[name]


def constrain(x, axes: tuple):
  """``nn.with_logical_constraint`` when ``x`` has one axis per name (a no-op otherwise, e.g.
  an MLP applied to ``[batch, width]`` vectors)."""
  return nn.with_logical_constraint(x, axes) if x.ndim == len(axes) else x

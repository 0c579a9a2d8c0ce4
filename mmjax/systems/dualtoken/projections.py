"""The projections around each DualToken quantiser: width -> code dim before it
(``prequant_{pix,sem,shortcut}``), code dim -> width after it (``postquant_{pix,sem}``).

One block serves both directions (the tokenizer release's attention projection):

    y = proj(norm3(x)) + attn(norm1(x))          # a linear shortcut plus attention, in -> out
    y = y + mlp(norm2(y))                        # mlp = w2(gelu_tanh(w0 n) * w1 n), n = norm(.)

* ``attn`` works at the wider of the two dims ``W``: q, k, v = x @ qkv (``in -> 3W``, biases
  on q and v only, k's is a zero buffer), ``heads`` heads of ``W / heads`` (the release:
  heads = width / code dim, e.g. 36 heads of 32 for 1152 -> 32), softmax scale
  ``head_dim ** -0.5``.
  Down (in > out): the per-head outputs are **averaged over heads** ``[b, n, head_dim]``
  (then average-pooled to ``out`` when ``head_dim != out``), then ``attn.proj`` (out -> out).
  Up (in <= out): heads are concatenated ``[b, n, W]``, then ``attn.proj`` (W -> W).
* ``causal=True`` (the release's post-quantisation projections) masks attention to earlier
  positions in token order, i.e. raster order over the patch grid; pre-quantisation is
  bidirectional.
* norm1/norm3 (over ``in``) and norm2 (over ``out``) are LayerNorms with eps 1e-5, the MLP's
  own norm has eps 1e-6; the GeGLU hidden width is ``int(out * mlp_ratio)``, ratio 2.
* Init as the release's torch modules start: every Linear weight and bias uniform in
  +-1/sqrt(fan_in), q/v biases zero, norms one/zero.

Example::

    import jax, jax.numpy as jnp
    from mmjax.systems.dualtoken.projections import (ProjectionConfig, QuantProjection,
                                                     projection_from_torch, projection_to_torch)
    down = QuantProjection(ProjectionConfig(in_dim=64, out_dim=8))           # 8 heads of 8
    up = QuantProjection(ProjectionConfig(in_dim=8, out_dim=64), causal=True)
    x = jnp.ones((2, 9, 64))
    pd = down.init(jax.random.key(0), x)["params"]
    z = down.apply({"params": pd}, x)                                       # [2, 9, 8]
    pu = up.init(jax.random.key(1), z)["params"]
    y = up.apply({"params": pu}, z)                                         # [2, 9, 64]
    # the release's tensors (numpy, names as in its state dict):
    sd = projection_to_torch(pu, prefix="postquant_pix.")
    again = projection_from_torch(sd, up.cfg, prefix="postquant_pix.")
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax import core
from mmjax.interop import CheckpointMismatchError
from mmjax.interop.tables import FLATTEN, IDENTITY, LINEAR, Part, Rule, expand

WIDE = ("act_batch", "act_length", "act_embed")     # activations at the tower width
NARROW = ("act_batch", "act_length", None)          # activations at the code dim


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """One projection block: ``in_dim -> out_dim`` (one of them the tower width, the other the
  code dim). ``num_heads`` defaults to the release's ``width // code_dim``."""
  in_dim: int
  out_dim: int
  num_heads: Optional[int] = None
  mlp_ratio: float = 2.0
  norm_eps: float = 1e-5            # norm1, norm2, norm3 (torch nn.LayerNorm default)
  mlp_norm_eps: float = 1e-6        # the GeGLU MLP's own norm
  attention_impl: str = "xla"       # core.dot_product_attention impl
  dtype: Any = jnp.float32          # compute dtype
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_heads is None:
      object.__setattr__(self, "num_heads", self.width // min(self.in_dim, self.out_dim))
    if self.width % self.num_heads:
      raise ValueError(f"projection width {self.width} is not a multiple of "
                       f"num_heads={self.num_heads}")

  @property
  def down(self) -> bool:
    """Whether heads are averaged (in > out), as in the pre-quantisation projections."""
    return self.in_dim > self.out_dim

  @property
  def width(self) -> int:
    """Width of q, k, v: the wider of the two dims."""
    return max(self.in_dim, self.out_dim)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.out_dim * self.mlp_ratio)

  @property
  def in_axis(self) -> Optional[str]:
    """Logical name of the input dim: 'embed' on the width side, None on the code side (tiny,
    replicated); the head axis stays None too (36 heads divide no power-of-two mesh)."""
    return "embed" if self.down else None

  @property
  def out_axis(self) -> Optional[str]:
    return None if self.down else "embed"


def torch_uniform(fan_in: int, axes: tuple):
  """torch's default Linear init (weight and bias): uniform in +-1/sqrt(fan_in), named."""
  bound = 1.0 / math.sqrt(fan_in)
  return nn.with_logical_partitioning(
      lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound),
      axes)


def linear(cfg: ProjectionConfig, features: int, fan_in: int, axes: tuple, name: str):
  """A torch-initialised ``nn.Dense`` with kernel axes ``axes`` = (in, out)."""
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                  kernel_init=torch_uniform(fan_in, axes),
                  bias_init=torch_uniform(fan_in, (axes[1],)))


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_in, n_out]``: column i averages inputs ``floor(i n_in / n_out)`` to
  ``ceil((i + 1) n_in / n_out) - 1`` (torch's ``adaptive_avg_pool1d`` bins)."""
  m = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[lo:hi, i] = 1.0 / (hi - lo)
  return m


class HeadProjection(nn.Module):
  """``x [b, n, in] -> [b, n, heads, head_dim]``: one of q, k, v (kernel ``[in, heads,
  head_dim]``, optional bias ``[heads, head_dim]`` starting at zero)."""
  cfg: ProjectionConfig
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kernel = self.param("kernel", torch_uniform(c.in_dim, (c.in_axis, None, "head_dim")),
                        (c.in_dim, c.num_heads, c.head_dim), c.param_dtype)
    y = jnp.einsum("bni,ihd->bnhd", x.astype(c.dtype), kernel.astype(c.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (None, "head_dim")),
                        (c.num_heads, c.head_dim), c.param_dtype)
      y = y + bias.astype(c.dtype)
    return y


class ProjectionAttention(nn.Module):
  """q/k/v at the block's width, heads averaged (down) or concatenated (up), then ``o_proj``.
  Params q_proj (kernel ``[in, heads, head_dim]``, bias), k_proj (kernel only), v_proj
  (kernel, bias), o_proj (``[out, out]`` dense with bias)."""
  cfg: ProjectionConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x):                                                   # [b, n, in]
    c = self.cfg
    q = HeadProjection(c, use_bias=True, name="q_proj")(x)
    k = HeadProjection(c, use_bias=False, name="k_proj")(x)
    v = HeadProjection(c, use_bias=True, name="v_proj")(x)
    mask = core.make_attention_mask("causal", x.shape[1]) if self.causal else None
    h = core.dot_product_attention(q, k, v, mask, impl=c.attention_impl)   # [b, n, H, hd]
    if c.down:
      h = jnp.mean(h, axis=2)                                              # [b, n, hd]
      if c.head_dim != c.out_dim:
        h = h @ jnp.asarray(adaptive_avg_pool_matrix(c.head_dim, c.out_dim), h.dtype)
    else:
      h = h.reshape(h.shape[:2] + (c.width,))                             # [b, n, W]
    return linear(c, c.out_dim, c.out_dim, (None, c.out_axis), "o_proj")(h)


class GegluMlp(nn.Module):
  """``down(gelu_tanh(gate(n)) * up(n))`` with ``n = norm(x)`` (its own LayerNorm, eps 1e-6);
  hidden width ``cfg.mlp_dim``. The release's ``w0, w1, w2`` are gate_proj, up_proj,
  down_proj."""
  cfg: ProjectionConfig

  @nn.compact
  def __call__(self, x):                                                   # [b, n, out]
    c = self.cfg
    n = core.LayerNorm(eps=c.mlp_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                       name="norm")(x)
    gate = linear(c, c.mlp_dim, c.out_dim, (c.out_axis, "mlp"), "gate_proj")(n)
    up = linear(c, c.mlp_dim, c.out_dim, (c.out_axis, "mlp"), "up_proj")(n)
    h = core.constrain(jax.nn.gelu(gate, approximate=True) * up, ("act_batch", "act_length",
                                                                  "act_mlp"))
    return linear(c, c.out_dim, c.mlp_dim, ("mlp", c.out_axis), "down_proj")(h)


class QuantProjection(nn.Module):
  """``x [b, n, in_dim] -> [b, n, out_dim]``: ``y = proj(norm3 x) + attn(norm1 x)``, then
  ``y + mlp(norm2 y)``. ``causal`` restricts attention to earlier positions (raster order of
  the patch grid): the release's post-quantisation projections; pre-quantisation ones are
  bidirectional. Params norm1, norm3, norm2, attn, proj, mlp (see the module docstring)."""
  cfg: ProjectionConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    if x.shape[-1] != c.in_dim:
      raise ValueError(f"projection input width {x.shape[-1]} != in_dim {c.in_dim}")
    x = core.constrain(x, WIDE if c.down else NARROW)
    norm = lambda name: core.LayerNorm(eps=c.norm_eps, dtype=c.dtype,  # noqa: E731
                                       param_dtype=c.param_dtype, name=name)
    y = linear(c, c.out_dim, c.in_dim, (c.in_axis, c.out_axis), "proj")(norm("norm3")(x))
    y = y + ProjectionAttention(c, causal=self.causal, name="attn")(norm("norm1")(x))
    y = y + GegluMlp(c, name="mlp")(norm("norm2")(y))
    return core.constrain(y, NARROW if c.down else WIDE)


# ----------------------------------------------------------------------------- tables
def params_from_tensors(table, our_shapes: dict, tensors: dict, what: str = "") -> dict:
  """Our nested params from reference ``tensors`` (``{name: numpy}``) through a name table
  (``mmjax.interop.tables`` rules; stacked layers and ``Part`` pieces handled). Reads only the
  names the table asks for; raises ``CheckpointMismatchError`` naming every missing and
  mis-shaped one. ``our_shapes``: ``{'a/b/kernel': shape}`` of the model."""
  entries = expand(table, our_shapes)
  missing = sorted({e.hf for e in entries if e.hf not in tensors})
  full = {e.hf: e.hf_shape for e in entries}   # a Part's shape is its whole tensor's
  bad = sorted(f"{k}: {tuple(np.shape(tensors[k]))}, expected {v}" for k, v in full.items()
               if k in tensors and tuple(np.shape(tensors[k])) != v)
  gaps = sorted(set(our_shapes) - {e.ours for e in entries})
  if missing or bad or gaps:
    raise CheckpointMismatchError(
        f"{what or 'tensors'} do not fit the model: missing {missing}, mis-shaped {bad}, "
        f"parameters no rule fills {gaps}")
  pieces: dict = {}
  for e in entries:
    value = e.transform.to_ours(np.asarray(tensors[e.hf]), e.our_shape)
    pieces.setdefault(e.ours, []).append((e.layer, value))
  flat = {}
  for path, items in pieces.items():
    flat[path] = (items[0][1] if items[0][0] is None else
                  np.stack([v for _, v in sorted(items, key=lambda t: t[0])]))
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def tensors_from_params(table, params) -> dict:
  """The reference ``{name: numpy}`` of our params (boxed or not) through a name table;
  ``Part`` pieces are concatenated, stacked layers split."""
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
  entries = expand(table, {k: v.shape for k, v in flat.items()})
  gaps = sorted(set(flat) - {e.ours for e in entries})
  if gaps:
    raise CheckpointMismatchError(f"parameters no rule fills: {gaps}")
  parts: dict = {}
  for e in entries:
    x = flat[e.ours] if e.layer is None else flat[e.ours][e.layer]
    parts.setdefault(e.hf, []).append((getattr(e.transform, "index", 0), e.transform.to_hf(x)))
  return {k: np.concatenate([p for _, p in sorted(v, key=lambda t: t[0])], axis=0)
          if len(v) > 1 else v[0][1] for k, v in parts.items()}


ZERO_K_BIAS = "attn.zero_k_bias"   # the release's constant zero key bias (a buffer)


def torch_table(prefix: str = "") -> list:
  """Release names (``prequant_pix.`` etc. as ``prefix``) -> our ``QuantProjection`` paths.
  ``attn.qkv.weight [3W, in]`` holds q, k, v in that order, each head-major."""
  p = prefix
  table = [Rule(f"{p}attn.qkv.weight", f"attn/{n}_proj/kernel", Part(LINEAR, i, 3))
           for i, n in enumerate("qkv")]
  table += [Rule(f"{p}attn.q_bias", "attn/q_proj/bias", FLATTEN),
            Rule(f"{p}attn.v_bias", "attn/v_proj/bias", FLATTEN)]
  for theirs, ours in (("attn.proj", "attn/o_proj"), ("proj", "proj"), ("mlp.w0", "mlp/gate_proj"),
                       ("mlp.w1", "mlp/up_proj"), ("mlp.w2", "mlp/down_proj")):
    table += [Rule(f"{p}{theirs}.weight", f"{ours}/kernel", LINEAR),
              Rule(f"{p}{theirs}.bias", f"{ours}/bias", IDENTITY)]
  for norm in ("norm1", "norm2", "norm3", "mlp.norm"):
    ours = norm.replace(".", "/")
    table += [Rule(f"{p}{norm}.weight", f"{ours}/scale", IDENTITY),
              Rule(f"{p}{norm}.bias", f"{ours}/bias", IDENTITY)]
  return table


def param_shapes(cfg: ProjectionConfig) -> dict:
  """``{'a/b/kernel': shape}`` of a ``QuantProjection`` (nothing computed)."""
  boxed = jax.eval_shape(QuantProjection(cfg).init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, 1, cfg.in_dim), jnp.float32))["params"]
  return {"/".join(k): tuple(v.shape)
          for k, v in traverse_util.flatten_dict(nn.meta.unbox(boxed)).items()}


def projection_from_torch(tensors: dict, cfg: ProjectionConfig, prefix: str = "") -> dict:
  """Our params of one release block from its state dict (numpy arrays; other keys, not
  starting with ``prefix``, are left alone). Unexpected keys under ``prefix`` and a non-zero
  ``attn.zero_k_bias`` are errors."""
  table = torch_table(prefix)
  known = {r.hf for r in table} | {prefix + ZERO_K_BIAS}
  unexpected = sorted(k for k in tensors if k.startswith(prefix) and k not in known)
  if unexpected:
    raise CheckpointMismatchError(f"unexpected tensors under {prefix!r}: {unexpected}")
  kb = tensors.get(prefix + ZERO_K_BIAS)
  if kb is not None and np.any(np.asarray(kb) != 0):
    raise CheckpointMismatchError(f"{prefix}{ZERO_K_BIAS} is not zero: this block has no key "
                                  "bias")
  return params_from_tensors(table, param_shapes(cfg), tensors, what=prefix or "projection")


def projection_to_torch(params, prefix: str = "") -> dict:
  """The release's tensors of one block (numpy), the zero key-bias buffer included."""
  out = tensors_from_params(torch_table(prefix), params)
  width = out[prefix + "attn.q_bias"].shape[0]
  out[prefix + ZERO_K_BIAS] = np.zeros((width,), out[prefix + "attn.q_bias"].dtype)
  return out

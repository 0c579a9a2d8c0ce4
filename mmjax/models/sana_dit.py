"""Sana DiT: the linear-attention diffusion transformer MetaQuery's Sana decoder trains.

Same math and weights as diffusers' ``SanaTransformer2DModel``, NHWC:

* patch embedding (a stride-``patch_size`` convolution), plus a fixed 2-D sin-cos table only
  when the config sets ``interpolation_scale`` (the released Sana configs leave it unset);
* adaLN-single: the timestep (0..1000 scale) -> 256-d sinusoid -> MLP -> ``emb [b, D]``,
  and one shared ``Linear(D, 6D)`` on ``silu(emb)`` that every block adds to its own
  ``scale_shift_table [6, D]`` (shift/scale/gate for attention and for the feed-forward);
* caption projection ``Linear-GELU(tanh)-Linear`` (``core.Mlp``) and caption RMSNorm;
* blocks: ReLU-kernel **linear self-attention** (fp32), softmax **cross-attention** to the
  caption with a padding mask, and the **Mix-FFN** (``GLUMBConv``: 1x1 expand, depthwise
  3x3, SiLU gate, 1x1) on the token grid;
* final modulated LayerNorm, projection, unpatchify.

Blocks are scanned (params under ``transformer_blocks`` with a leading 'layers' axis) or
unrolled (``transformer_blocks_0`` ...). Our parameter names follow diffusers' module names so
the import table in ``diffusers_table`` reads line by line.

Sampling: `velocity_fn` computes the caption's cross-attention keys and values once per
sampling call (`CaptionKV`; they do not change across steps), unrolls the blocks and uses
query-chunked cross-attention (``bench/flow_sample.py``: against diffusers' SanaPipeline).

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import sana_dit
    cfg = sana_dit.SanaConfig(in_channels=4, out_channels=4, num_attention_heads=2,
                              attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                              cross_attention_head_dim=8, cross_attention_dim=16,
                              caption_channels=12)
    model = sana_dit.SanaDiT(cfg)
    x, t = jnp.zeros((1, 8, 8, 4)), jnp.array([500.0])
    caption, mask = jnp.zeros((1, 5, 12)), jnp.array([[1, 1, 1, 0, 0]])
    params = model.init(jax.random.key(0), x, t, caption, mask)["params"]
    v = model.apply({"params": params}, x, t, caption, mask)      # [1, 8, 8, 4]
    v = sana_dit.velocity_fn(cfg, params, caption, mask)(x, t)    # the same, for samplers
    # real checkpoints: mmjax.interop.diffusers_io.load_diffusers("/ckpt/Sana_1600M/transformer")
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.core import HeadDense, conv, relu_linear_attention
from mmjax.core.conv_shifts import cpu_apply
from mmjax.interop.tables import CONV, FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Rule

QK_NORMS = (None, "rms_norm_across_heads")
BLOCKS = "transformer_blocks"
OURS_ONLY = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat_policy",
             "attention_impl", "family")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SanaConfig:
  """Hyper-parameters of the Sana DiT; field names and defaults are diffusers' (Sana-1.6B)."""
  in_channels: int = 32                 # latent channels (DC-AE f32c32)
  out_channels: int = 32
  num_attention_heads: int = 70         # linear self-attention heads; width D = heads * dim
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  cross_attention_dim: int = 2240       # must equal D (the caption is projected to D)
  caption_channels: int = 2304          # width of the condition (Gemma-2 / MetaQuery connector)
  mlp_ratio: float = 2.5                # Mix-FFN hidden = int(mlp_ratio * D)
  attention_bias: bool = False          # biases on the self-attention q/k/v
  sample_size: int = 32                 # base latent size (only the sin-cos table uses it)
  patch_size: int = 1
  norm_elementwise_affine: bool = False  # scale+bias on the pre-FFN LayerNorm
  norm_eps: float = 1e-6
  interpolation_scale: Optional[float] = None   # None = no positional embedding
  qk_norm: Optional[str] = None         # None | 'rms_norm_across_heads' (Sana 1.5)
  timestep_scale: float = 1.0           # carried for export (diffusers' forward ignores it)
  dtype: Any = jnp.float32              # compute dtype; linear attention always runs in fp32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True              # nn.scan over blocks ('layers' axis on their params)
  scan_unroll: int = 1                  # blocks per scan iteration (same params; sampling)
  remat_policy: str = "none"            # see core.remat_policy
  attention_impl: str = "xla"           # cross-attention kernel (core.dot_product_attention)
  family: str = "sana_dit"

  def __post_init__(self):
    if self.qk_norm not in QK_NORMS:
      raise NotImplementedError(f"qk_norm={self.qk_norm!r}; supported: {QK_NORMS}")
    if self.cross_attention_dim != self.inner_dim:
      raise ValueError(f"cross_attention_dim={self.cross_attention_dim} must equal the width "
                       f"num_attention_heads * attention_head_dim = {self.inner_dim}")

  @property
  def inner_dim(self) -> int:
    """The model width D."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def ffn_dim(self) -> int:
    return int(self.mlp_ratio * self.inner_dim)

  def replace(self, **changes) -> "SanaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers_config(cls, d: dict, **overrides) -> "SanaConfig":
    """From a ``SanaTransformer2DModel`` ``config.json`` dict. ``overrides`` set our own
    fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat_policy``, ...). Unknown
    diffusers fields and features we do not implement are errors.

    Example::

      SanaConfig.from_diffusers_config({"num_layers": 2}, dtype=jnp.bfloat16).num_layers  # 2
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if d.pop("dropout", 0.0):
      raise NotImplementedError("dropout > 0 is not supported (Sana trains without it)")
    if d.pop("guidance_embeds", False):
      raise NotImplementedError("guidance_embeds=True (Sana-Sprint) is not supported")
    d.pop("guidance_embeds_scale", None)
    known = {f.name for f in dataclasses.fields(cls)} - set(OURS_ONLY)
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown SanaTransformer2DModel config fields: {unknown}")
    if d.get("out_channels") is None:
      d["out_channels"] = d.get("in_channels", cls.in_channels)
    return cls(**{**d, **overrides})

  def to_diffusers_config(self) -> dict:
    """The ``config.json`` dict ``SanaTransformer2DModel.from_pretrained`` reads."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in OURS_ONLY}
    out.update({"_class_name": "SanaTransformer2DModel", "dropout": 0.0,
                "guidance_embeds": False})
    return out


# ----------------------------------------------------------------------------- shared pieces
# ``RMSNormBias`` is ``core.RMSNorm(use_bias=True)`` (diffusers' ``RMSNorm(..., bias=True)``);
# the name stays for callers of this module, as do ``conv`` / ``relu_linear_attention``
# (imported from the core above).
RMSNormBias = functools.partial(core.RMSNorm, use_bias=True)


class Pointwise(nn.Module):
  """A 1x1 ``Conv2d`` as a matmul over the channels: the parameters of ``core.conv(features,
  1, axes)`` (kernel ``[1, 1, in, out]``, bias ``[out]``, same names, init and logical axes)
  and its result; XLA:CPU runs the matmul faster than the convolution."""
  features: int
  axes: tuple
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                          # [..., in]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None) + tuple(self.axes)),
        (1, 1, x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class GLUMBConv(nn.Module):
  """Mix-FFN on an NHWC grid: ``conv_inverted`` 1x1 (C -> 2h) + SiLU, ``conv_depth``
  depthwise 3x3, split into ``x, gate``, ``x * silu(gate)``, ``conv_point`` 1x1 (h -> out,
  no bias); then an optional RMSNorm (with bias, eps 1e-5) and residual (DC-AE's use).
  ``axes`` are the logical names of the outer and the hidden channel axes."""
  hidden: int
  out: int
  rms_norm: bool = False
  residual: bool = False
  axes: tuple = ("embed", "mlp")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                          # [b, h, w, c]
    outer, hid = self.axes
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Pointwise(2 * self.hidden, (outer, hid), name="conv_inverted", **kw)(x)
    h = conv(2 * self.hidden, 3, (None, hid), groups=2 * self.hidden, name="conv_depth",
             **kw)(jax.nn.silu(h))
    h, gate = jnp.split(h, 2, axis=-1)
    y = Pointwise(self.out, (hid, outer), use_bias=False, name="conv_point", **kw)(
        h * jax.nn.silu(gate))
    if self.rms_norm:
      y = core.RMSNorm(eps=1e-5, use_bias=True, name="norm", **kw)(y)
    return y + x if self.residual else y


def _layer_norm(eps: float, dtype):
  """LayerNorm without scale or bias (statistics in fp32)."""
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                      dtype=dtype)


# ----------------------------------------------------------------------------- the block
class SanaBlock(nn.Module):
  """One Sana block on ``x [b, h, w, D]``: modulated linear self-attention, cross-attention
  to the caption, modulated Mix-FFN. ``__call__(x, temb6, context, context_mask) -> (x,
  None)`` with positional arguments so ``nn.scan`` can lift it.

  ``context`` is the projected caption ``[b, n, D]``, or this block's cross-attention keys
  and values ``(k, v)`` (each ``[b, n, Hc, dc]``) computed beforehand; ``x=None`` computes
  only those: ``(None, (k, v))``. ``context_mask`` is ``[b, n]`` bool."""
  cfg: SanaConfig

  def _heads(self, heads, head_dim, bias, name):
    c = self.cfg
    return HeadDense(in_axes=(-1,), in_names=("embed",), out_shape=(heads, head_dim),
                     out_names=("heads", "head_dim"), use_bias=bias, dtype=c.dtype,
                     param_dtype=c.param_dtype, name=name)

  def _out(self, name):
    c = self.cfg
    return HeadDense(in_axes=(-2, -1), in_names=("heads", "head_dim"),
                     out_shape=(c.inner_dim,), out_names=("embed",), use_bias=True,
                     dtype=c.dtype, param_dtype=c.param_dtype, name=name)

  def _qk_norm(self, x, name):
    """'rms_norm_across_heads': one RMSNorm (eps 1e-5) over all heads' channels."""
    if self.cfg.qk_norm is None:
      return x
    b, n, h, d = x.shape
    y = core.RMSNorm(eps=1e-5, dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
                     name=name)(x.reshape(b, n, h * d))
    return y.reshape(b, n, h, d)

  def _caption_kv(self, context):
    """The cross-attention keys and values of the caption ``[b, n, D]``."""
    c = self.cfg
    Hc, dc = c.num_cross_attention_heads, c.cross_attention_head_dim
    k = self._qk_norm(self._heads(Hc, dc, True, "attn2_to_k")(context), "attn2_norm_k")
    v = self._heads(Hc, dc, True, "attn2_to_v")(context)
    return k, v

  @nn.compact
  def __call__(self, x, temb6, context, context_mask):
    c = self.cfg
    if x is None:
      return None, self._caption_kv(context)
    b, gh, gw, dim = x.shape
    act = ("act_batch", "act_length", "act_embed")
    heads = ("act_batch", "act_length", "act_heads", None)
    table = self.param("scale_shift_table", nn.with_logical_partitioning(
        nn.initializers.normal(dim ** -0.5), (None, "embed")), (6, dim), c.param_dtype)
    mod = table.astype(c.dtype)[None] + temb6.reshape(b, 6, dim)            # [b, 6, D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i, None] for i in range(6))
    x = core.constrain(x.reshape(b, gh * gw, dim), act)                      # [b, N, D]

    # 1. linear self-attention on the modulated, normalised tokens
    h = _layer_norm(c.norm_eps, c.dtype)(x) * (1 + scale_msa) + shift_msa
    H, d = c.num_attention_heads, c.attention_head_dim
    q = self._qk_norm(self._heads(H, d, c.attention_bias, "attn1_to_q")(h), "attn1_norm_q")
    k = self._qk_norm(self._heads(H, d, c.attention_bias, "attn1_to_k")(h), "attn1_norm_k")
    v = self._heads(H, d, c.attention_bias, "attn1_to_v")(h)
    q, k, v = (core.constrain(t, heads) for t in (q, k, v))
    o = relu_linear_attention(q, k, v).astype(c.dtype)
    x = x + gate_msa * self._out("attn1_to_out")(core.constrain(o, heads))

    # 2. cross-attention to the caption (no norm, no gate: as in the reference)
    Hc, dc = c.num_cross_attention_heads, c.cross_attention_head_dim
    q = self._qk_norm(self._heads(Hc, dc, True, "attn2_to_q")(x), "attn2_norm_q")
    k, v = context if isinstance(context, tuple) else self._caption_kv(context)
    mask = context_mask[:, None, None, :]                                   # [b, 1, 1, n]
    o = core.dot_product_attention(core.constrain(q, heads), core.constrain(k, heads),
                                   core.constrain(v, heads), mask, impl=c.attention_impl)
    x = x + self._out("attn2_to_out")(core.constrain(o, heads))

    # 3. Mix-FFN on the token grid
    norm2 = (core.LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                            name="norm2") if c.norm_elementwise_affine
             else _layer_norm(c.norm_eps, c.dtype))
    h = norm2(x) * (1 + scale_mlp) + shift_mlp
    h = GLUMBConv(c.ffn_dim, dim, dtype=c.dtype, param_dtype=c.param_dtype,
                  name="ff")(h.reshape(b, gh, gw, dim))
    x = core.constrain(x + gate_mlp * h.reshape(b, gh * gw, dim), act)
    return x.reshape(b, gh, gw, dim), None


# ----------------------------------------------------------------------------- the model
def pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float):
  """diffusers' PatchEmbed sin-cos table ``[grid_h * grid_w, dim]``: coordinates
  ``i * base_size / grid / interpolation_scale`` per axis, column (x) half first."""
  sh = base_size / grid_h / interpolation_scale
  sw = base_size / grid_w / interpolation_scale
  if grid_h == grid_w:
    return core.sincos_2d(dim, grid_h, scale=sh)
  ys, xs = jnp.meshgrid(jnp.arange(grid_h) * sh, jnp.arange(grid_w) * sw, indexing="ij")
  return jnp.concatenate([core.sincos_1d(dim // 2, xs), core.sincos_1d(dim // 2, ys)], axis=1)


class CaptionKV(NamedTuple):
  """A caption's cross-attention keys and values for every block, ``k``, ``v``
  ``[layers, b, n, Hc, dc]``, and its mask ``[b, n]`` bool: all the DiT computes from the
  caption, which no sampling step changes (see `velocity_fn`)."""
  k: jax.Array
  v: jax.Array
  mask: jax.Array


class SanaDiT(nn.Module):
  """``apply({'params': p}, latents [b, h, w, C], timestep [b], encoder_hidden_states
  [b, n, caption_channels], encoder_attention_mask [b, n] (1/True = real token) or None)``
  -> prediction ``[b, h, w, out_channels]`` (flow matching: the velocity eps - x0).

  ``timestep`` is on the 0..1000 scale (sigma * 1000 for flow matching).
  ``latents=None`` (and any ``timestep``) returns the caption's `CaptionKV` instead, which
  may then stand in for ``encoder_hidden_states`` (mask ignored): the same prediction
  without projecting the caption again.
  """
  config: SanaConfig

  def _caption(self, encoder_hidden_states, encoder_attention_mask):
    """Caption projection (Linear-GELU(tanh)-Linear) and RMSNorm -> ``([b, n, D], mask)``."""
    c = self.config
    dim = c.inner_dim
    ctx = core.Mlp(dim, act="gelu_tanh", use_bias=True, out_dim=dim, dtype=c.dtype,
                   param_dtype=c.param_dtype, name="caption_projection")(
                       encoder_hidden_states.astype(c.dtype))
    ctx = core.RMSNorm(eps=1e-5, dtype=c.dtype, param_dtype=c.param_dtype,
                       name="caption_norm")(ctx)
    if encoder_attention_mask is None:
      mask = jnp.ones(ctx.shape[:2], bool)
    else:
      mask = jnp.asarray(encoder_attention_mask).astype(bool)
      # the reference masks with a -10000 bias, so a caption with no real token attends to
      # all of them: keep that (a boolean mask alone would average the values instead)
      mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)
    return ctx, mask

  def _blocks(self, x, temb6, context, mask):
    """The blocks, scanned or unrolled. ``context``: the caption ``[b, n, D]`` (every block
    projects it) or ``(k, v)`` stacked over blocks on a leading axis. ``x=None``: returns
    ``(None, (k, v))`` stacked over blocks."""
    c = self.config
    per_layer = isinstance(context, tuple)
    block = SanaBlock
    if c.remat_policy != "none":
      block = nn.remat(block, policy=core.remat_policy(c.remat_policy),
                       prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, 0 if per_layer else nn.broadcast, nn.broadcast),
                      length=c.num_layers, unroll=c.scan_unroll,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      return stack(c, name=BLOCKS)(x, temb6, context, mask)
    outs = []
    for i in range(c.num_layers):
      ctx_i = tuple(a[i] for a in context) if per_layer else context
      x, out = block(c, name=f"{BLOCKS}_{i}")(x, temb6, ctx_i, mask)
      outs.append(out)
    if x is None:
      return None, tuple(jnp.stack(a) for a in zip(*outs))
    return x, None

  @nn.compact
  def __call__(self, latents, timestep, encoder_hidden_states, encoder_attention_mask=None):
    c = self.config
    if isinstance(encoder_hidden_states, CaptionKV):
      kv = encoder_hidden_states
      context, mask = (kv.k, kv.v), kv.mask
    else:
      context, mask = self._caption(encoder_hidden_states, encoder_attention_mask)
    if latents is None:             # the caption's half of the network: its keys and values
      if isinstance(context, tuple):
        raise ValueError("latents=None computes a CaptionKV from a caption, not from one")
      _, (k, v) = self._blocks(None, None, context, mask)
      return CaptionKV(k, v, mask)
    b, hgt, wid, _ = latents.shape
    p, dim = c.patch_size, c.inner_dim
    gh, gw = hgt // p, wid // p
    dense = dict(use_bias=True, dtype=c.dtype, param_dtype=c.param_dtype, init_std=0.02)

    # patches -> tokens [b, gh, gw, D]
    x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=c.dtype,
                param_dtype=c.param_dtype, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, "conv_in", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                    latents.astype(c.dtype))
    if c.interpolation_scale is not None:
      table = pos_embed(dim, gh, gw, c.sample_size // p, c.interpolation_scale)
      x = x + table.reshape(1, gh, gw, dim).astype(c.dtype)

    # adaLN-single: emb [b, D] and the shared modulation [b, 6D]
    t = core.timestep_embedding(timestep, 256, flip_sin_to_cos=True).astype(c.dtype)
    emb = core.dense(dim, (None, "mlp"), name="time_embed_linear_1", **dense)(t)
    emb = core.dense(dim, ("mlp", "embed"), name="time_embed_linear_2", **dense)(
        jax.nn.silu(emb))
    temb6 = core.dense(6 * dim, ("embed", "mlp"), name="time_embed_linear", **dense)(
        jax.nn.silu(emb))

    x, _ = self._blocks(x, temb6, context, mask)

    # final modulated norm, projection, unpatchify
    table = self.param("scale_shift_table", nn.with_logical_partitioning(
        nn.initializers.normal(dim ** -0.5), (None, "embed")), (2, dim), c.param_dtype)
    shift, scale = jnp.split(table.astype(c.dtype)[None] + emb[:, None], 2, axis=1)
    x = _layer_norm(1e-6, c.dtype)(x) * (1 + scale[:, None]) + shift[:, None]
    x = core.dense(p * p * c.out_channels, ("embed", None), name="proj_out", **dense)(x)
    x = x.reshape(b, gh, gw, p, p, c.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c.out_channels)


# ----------------------------------------------------------------------------- sampling
def unstack_blocks(params: dict, num_layers: int) -> dict:
  """Scanned block params (``transformer_blocks`` with a leading 'layers' axis) -> the
  unrolled layout (``transformer_blocks_0`` ...) of ``scan_layers=False``."""
  out = {k: v for k, v in params.items() if k != BLOCKS}
  for i in range(num_layers):
    out[f"{BLOCKS}_{i}"] = jax.tree.map(lambda a, i=i: a[i], params[BLOCKS])
  return out


def velocity_fn(cfg: SanaConfig, params, encoder_hidden_states, encoder_attention_mask=None,
                *, unroll: bool | int = True, attention_impl: str = "chunked"):
  """``model_fn(x, t) -> velocity`` for `mmjax.diffusion.solvers`, built for sampling.

  The caption's cross-attention keys and values (`CaptionKV`) are computed once, here, not
  at every step (diffusers' pipeline recomputes them each step); ``unroll=True`` samples
  with the blocks unrolled (the scanned params are sliced once, here), an int ``k`` scans
  ``k`` blocks per iteration; cross-attention uses ``attention_impl`` ('chunked': query
  chunks, never the whole ``[b, heads, queries, keys]`` logits); on the CPU backend
  depthwise convolutions run as shifted sums (`mmjax.core.conv_shifts`). Same prediction
  as ``SanaDiT(cfg).apply`` (to fp32 rounding). Call it inside the jitted sampler: the
  rows of ``encoder_hidden_states [rows, n, C]`` are the rows ``model_fn`` sees (for
  `solvers.cfg_two_way`, ``[uncond; cond]``).

  Example::

    both = jnp.concatenate([uncond, cond])                    # [2b, n, C]
    @jax.jit
    def sample(params, both, noise):
      fn = sana_dit.velocity_fn(cfg, params, both)
      guided = solvers.cfg_two_way(fn, 4.5)
      return solvers.dpm_solver_2m_sample(guided, noise, *solvers.flow_sigmas(30, 3.0))
  """
  params = nn.unbox(params)
  cfg = cfg.replace(attention_impl=attention_impl, remat_policy="none")
  if unroll is True and cfg.scan_layers:
    params, cfg = unstack_blocks(params, cfg.num_layers), cfg.replace(scan_layers=False)
  elif unroll and unroll is not True:
    cfg = cfg.replace(scan_unroll=int(unroll))
  model = SanaDiT(cfg)
  variables = {"params": params}
  caption = cpu_apply(model, variables, None, None, encoder_hidden_states,
                      encoder_attention_mask)

  def model_fn(x, t):
    return cpu_apply(model, variables, x, t, caption)
  return model_fn


# ----------------------------------------------------------------------------- interop
def diffusers_table(cfg: SanaConfig) -> list:
  """diffusers ``SanaTransformer2DModel`` names -> ours. Block weights are stacked on the
  'layers' axis when the blocks are scanned."""
  table = [Rule("patch_embed.proj.weight", "patch_embed/kernel", CONV),
           Rule("patch_embed.proj.bias", "patch_embed/bias", IDENTITY),
           Rule("caption_norm.weight", "caption_norm/scale", IDENTITY),
           Rule("scale_shift_table", "scale_shift_table", IDENTITY)]
  for theirs, ours in (("time_embed.emb.timestep_embedder.linear_1", "time_embed_linear_1"),
                       ("time_embed.emb.timestep_embedder.linear_2", "time_embed_linear_2"),
                       ("time_embed.linear", "time_embed_linear"),
                       ("caption_projection.linear_1", "caption_projection/fc1"),
                       ("caption_projection.linear_2", "caption_projection/fc2"),
                       ("proj_out", "proj_out")):
    table += [Rule(theirs + ".weight", ours + "/kernel", LINEAR),
              Rule(theirs + ".bias", ours + "/bias", IDENTITY)]
  L = BLOCKS + ".{i}."
  B = BLOCKS + "/" if cfg.scan_layers else BLOCKS + "_{i}/"
  table.append(Rule(L + "scale_shift_table", B + "scale_shift_table", IDENTITY))
  for attn in ("attn1", "attn2"):
    for n in ("q", "k", "v"):
      table += [Rule(f"{L}{attn}.to_{n}.weight", f"{B}{attn}_to_{n}/kernel", LINEAR),
                Rule(f"{L}{attn}.to_{n}.bias", f"{B}{attn}_to_{n}/bias", FLATTEN)]
    table += [Rule(f"{L}{attn}.to_out.0.weight", f"{B}{attn}_to_out/kernel", LINEAR_OUT),
              Rule(f"{L}{attn}.to_out.0.bias", f"{B}{attn}_to_out/bias", IDENTITY)]
    for n in ("q", "k"):
      table.append(Rule(f"{L}{attn}.norm_{n}.weight", f"{B}{attn}_norm_{n}/scale", IDENTITY))
  table += [Rule(L + "norm2.weight", B + "norm2/scale", IDENTITY),
            Rule(L + "norm2.bias", B + "norm2/bias", IDENTITY)]
  for name in ("conv_inverted", "conv_depth", "conv_point"):
    table += [Rule(f"{L}ff.{name}.weight", f"{B}ff/{name}/kernel", CONV),
              Rule(f"{L}ff.{name}.bias", f"{B}ff/{name}/bias", IDENTITY)]
  return table   # rules for parameters this config lacks (biases, norms) are skipped


def init_args(cfg: SanaConfig) -> tuple:
  """Smallest inputs ``init`` needs (shapes only; used under ``jax.eval_shape``)."""
  p = cfg.patch_size
  return (jnp.zeros((1, p, p, cfg.in_channels)), jnp.zeros((1,)),
          jnp.zeros((1, 1, cfg.caption_channels)), jnp.ones((1, 1), bool))


DIFFUSERS_FAMILY = Family(
    name="sana_dit", model_types=(), architectures=("SanaTransformer2DModel",),
    from_hf_config=SanaConfig.from_diffusers_config,
    to_hf_config=SanaConfig.to_diffusers_config, make_model=SanaDiT, init_args=init_args,
    table=diffusers_table)

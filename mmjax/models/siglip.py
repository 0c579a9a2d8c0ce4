"""SigLIP vision tower: patch embedding, learned positions, a bidirectional pre-LayerNorm
encoder (core stack, GELU-tanh MLP, no RoPE), post-LayerNorm and the MAP pooling head.

Every layer's output is available ("layer taps"): ``hidden_states[k]`` is the input of layer
k (``[0]`` = embeddings, ``[-1]`` = last layer before the post-LayerNorm), as in
transformers' ``output_hidden_states``. LLaVA-style models read the last layer's output
(``encoder_output`` = ``hidden_states[-1]``, no stack of every layer) of a tower whose last
layer was dropped (the *penultimate* features of the full model).

The patch embedding is a VALID stride-``patch`` convolution, so ``image_size`` need not be a
multiple of the patch: 384 px with patch 14 gives 27 x 27 patches (the last 6 px are unread),
as torch's ``Conv2d(stride=14)`` in the reference.

Images are NHWC floats, already normalised the SigLIP way (``(x / 255 - 0.5) / 0.5``).

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import siglip
    cfg = siglip.from_hf_config({"hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "image_size": 28, "patch_size": 7})
    model = siglip.SiglipVision(cfg)
    images = jnp.zeros((1, 28, 28, 3))
    params = model.init(jax.random.key(0), images)["params"]
    out = model.apply({"params": params}, images, output_hidden_states=True)
    out["last_hidden_state"].shape, out["pooler_output"].shape   # (1, 16, 32), (1, 32)
    out["hidden_states"].shape                                    # (3, 1, 16, 32)
    # real checkpoints: mmjax.interop.load_hf("/ckpt/siglip-so400m-patch14-384")
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mmjax import core
from mmjax.interop.tables import (CONV, FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Part,
                                  Rule)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """The SigLIP vision tower: image geometry, the encoder stack, whether the MAP head exists."""
  image_size: int
  patch_size: int
  stack: core.TransformerConfig
  num_channels: int = 3
  use_head: bool = True
  hf_extra: str = "{}"          # JSON of reference-config fields carried to export
  family: str = "siglip_vision"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2


class MapHead(nn.Module):
  """Multihead attention pooling: a learned probe cross-attends over the tokens (the core
  ``Attention`` with ``context``), then ``x + mlp(norm(x))``. Params probe, attention
  (q/k/v/o_proj), norm, mlp."""
  cfg: core.TransformerConfig

  @nn.compact
  def __call__(self, x):                                                  # [b, n, embed]
    c = self.cfg
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(c.init_std),
                                                             (None, None, "embed")),
                       (1, 1, c.d_model), c.param_dtype)
    probe = jnp.broadcast_to(probe.astype(c.dtype), (x.shape[0], 1, c.d_model))
    h = core.Attention(c, name="attention")(probe, mask=None, context=x)  # [b, 1, embed]
    y = core.LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="norm")(h)
    y = core.Mlp(c.mlp_dim, act=c.mlp_act, use_bias=True, dtype=c.dtype,
                 param_dtype=c.param_dtype, init_std=c.init_std, name="mlp")(y)
    return (h + y)[:, 0]                                                    # [b, embed]


def embed_patches(module: nn.Module, cfg: SiglipConfig, images):
  """SigLIP's embeddings inside ``module``'s compact method (params ``patch_embed_kernel``,
  ``patch_embed_bias``, ``pos_embed``): the stride-p patch convolution, VALID (torch
  ``Conv2d(stride=p)``, no padding: a side that is not a multiple of p loses its last
  ``side % p`` pixels, 384 / 14 -> 27 patches), plus learned positions. ``[b, patches, d]``."""
  c = cfg.stack
  b, h, w, ch = images.shape
  p, g = cfg.patch_size, cfg.grid
  if (h, w, ch) != (cfg.image_size, cfg.image_size, cfg.num_channels):
    raise ValueError(f"images {images.shape[1:]} do not match the tower's "
                     f"{(cfg.image_size, cfg.image_size, cfg.num_channels)}")
  kernel = module.param("patch_embed_kernel", nn.with_logical_partitioning(
      nn.initializers.normal(c.init_std), (None, None, None, "embed")), (p, p, ch, c.d_model),
      c.param_dtype)
  bias = module.param("patch_embed_bias", nn.with_logical_partitioning(
      nn.initializers.zeros, ("embed",)), (c.d_model,), c.param_dtype)
  pos = module.param("pos_embed", nn.with_logical_partitioning(
      nn.initializers.normal(c.init_std), (None, "embed")), (cfg.num_patches, c.d_model),
      c.param_dtype)
  x = jax.lax.conv_general_dilated(
      images.astype(c.dtype), kernel.astype(c.dtype), window_strides=(p, p), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(b, g * g, -1)
  x = x + bias.astype(c.dtype) + pos.astype(c.dtype)[None]
  return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class SiglipVision(nn.Module):
  """``apply({'params': p}, images [b, H, W, C], output_hidden_states=False)`` -> dict with
  ``encoder_output [b, patches, embed]`` (the last layer's output before the post-LayerNorm,
  i.e. ``hidden_states[-1]`` without stacking every layer), ``last_hidden_state`` (after it),
  ``pooler_output [b, embed]`` (when the head exists) and ``hidden_states [layers + 1, b,
  patches, embed]`` if asked (every layer's output is kept: memory). ``image_size`` need not
  be a multiple of ``patch_size`` (a VALID stride-``patch`` convolution drops the rest)."""
  config: SiglipConfig

  @nn.compact
  def __call__(self, images, output_hidden_states: bool = False, deterministic: bool = True):
    cfg, c = self.config, self.config.stack
    x = embed_patches(self, cfg, images)
    last = core.TransformerStack(c, name="encoder")(
        x, mask=None, deterministic=deterministic, return_hidden_states=output_hidden_states)
    if output_hidden_states:
      last, taps = last
    out = {"encoder_output": last,
           "last_hidden_state": core.LayerNorm(eps=c.norm_eps, dtype=c.dtype,
                                               param_dtype=c.param_dtype,
                                               name="post_layernorm")(last)}
    if cfg.use_head:
      out["pooler_output"] = MapHead(c, name="head")(out["last_hidden_state"])
    if output_hidden_states:
      out["hidden_states"] = jnp.concatenate([x[None], taps], axis=0)
    return out


# ----------------------------------------------------------------------------- random init
def reference_init(params, rng):
  """``params`` of a ``SiglipVision`` (boxed or not, scanned or unrolled layers) re-drawn the
  way transformers' ``SiglipPreTrainedModel._init_weights`` draws a fresh tower: patch
  convolution LeCun-normal, positions normal(1/sqrt(width)), attention and MLP kernels
  Xavier-uniform (the MAP head's q|k|v as one packed ``in_proj``), MLP biases normal(1e-6),
  the head's ``out_proj`` LeCun-normal, other biases zero, norms untouched. The modules
  themselves start every kernel at normal(0.02); a tower trained from scratch (the LaViDa
  demo) learns far faster from this init, where attention mixes the whole image from step 0.

  Example::

    params = siglip.reference_init(model.init(jax.random.key(0), images)["params"],
                                   jax.random.key(1))
  """
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(rng, len(flat))
  out = {}
  for key, (path, leaf) in zip(keys, sorted(flat.items())):
    value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    new = _reference_value(path, value, key)
    out[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new
  return traverse_util.unflatten_dict(out)


def _reference_value(path: tuple, value, key):
  name, shape, dtype = "/".join(path), value.shape, value.dtype

  def xavier(fan_in, fan_out):
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  def lecun(fan_in):   # transformers' lecun_normal_: trunc_normal_(std) cut at +-2 (absolute)
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * std

  head, parent = path[0] == "head", (path[-2] if len(path) > 1 else "")
  if name == "patch_embed_kernel":
    return lecun(shape[0] * shape[1] * shape[2])
  if name == "pos_embed":
    return jax.random.normal(key, shape, dtype) / shape[-1] ** 0.5
  if name == "head/probe":
    return xavier(shape[-1], shape[-1])
  if path[-1] == "kernel" and parent in ("q_proj", "k_proj", "v_proj"):     # [.., D, H, hd]
    out = shape[-2] * shape[-1]
    return xavier(shape[-3], 3 * out if head else out)
  if path[-1] == "kernel" and parent == "o_proj":                            # [.., H, hd, D]
    return lecun(shape[-3] * shape[-2]) if head else xavier(shape[-3] * shape[-2], shape[-1])
  if path[-1] == "kernel" and parent in ("fc1", "fc2"):
    return xavier(shape[-2], shape[-1])
  if path[-1] == "bias" and parent in ("fc1", "fc2"):
    return 1e-6 * jax.random.normal(key, shape, dtype)
  if path[-1] == "bias" and "norm" not in parent:
    return jnp.zeros(shape, dtype)
  return value


# ----------------------------------------------------------------------------- interop
KEEP = ("initializer_factor",)


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla", num_layers: int | None = None) -> SiglipConfig:
  """``SiglipConfig`` from a ``SiglipVisionConfig`` dict (or a full ``SiglipConfig`` dict,
  whose ``vision_config`` is used). ``num_layers`` truncates the tower (drop last layers)."""
  if "vision_config" in hf:
    hf = hf["vision_config"]
  if hf.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise NotImplementedError(f"hidden_act {hf['hidden_act']!r} (SigLIP uses gelu tanh)")
  stack = core.TransformerConfig(
      num_layers=num_layers or hf["num_hidden_layers"], d_model=hf["hidden_size"],
      num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
      mlp_act="gelu_tanh", norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-6),
      rope_theta=None, qkv_bias=True, out_bias=True, mlp_bias=True, dtype=dtype,
      param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy,
      attention_impl=attention_impl)
  return SiglipConfig(image_size=hf["image_size"], patch_size=hf["patch_size"], stack=stack,
                      num_channels=hf.get("num_channels", 3),
                      use_head=hf.get("vision_use_head", True),
                      hf_extra=json.dumps({k: hf[k] for k in KEEP if k in hf}))


def to_hf_config(cfg: SiglipConfig) -> dict:
  """The ``SiglipVisionModel`` ``config.json`` dict."""
  s = cfg.stack
  hf = json.loads(cfg.hf_extra)
  hf.update({"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
             "hidden_size": s.d_model, "intermediate_size": s.mlp_dim,
             "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
             "num_channels": cfg.num_channels, "image_size": cfg.image_size,
             "patch_size": cfg.patch_size, "hidden_act": "gelu_pytorch_tanh",
             "layer_norm_eps": s.norm_eps, "attention_dropout": 0.0,
             "vision_use_head": cfg.use_head})
  return hf


def hf_table(cfg: SiglipConfig, prefix: str = "") -> list:
  """SigLIP vision reference names (transformers 5 layout, ``prefix`` for nesting) -> ours."""
  e, L = prefix + "embeddings.", prefix + "encoder.layers.{i}."
  E = "encoder/layers" if cfg.stack.scan_layers else "encoder/layers_{i}"
  table = [Rule(e + "patch_embedding.weight", "patch_embed_kernel", CONV),
           Rule(e + "patch_embedding.bias", "patch_embed_bias", IDENTITY),
           Rule(e + "position_embedding.weight", "pos_embed", IDENTITY)]
  for n in ("q", "k", "v"):
    table += [Rule(f"{L}self_attn.{n}_proj.weight", f"{E}/self_attn/{n}_proj/kernel", LINEAR),
              Rule(f"{L}self_attn.{n}_proj.bias", f"{E}/self_attn/{n}_proj/bias", FLATTEN)]
  table += [Rule(L + "self_attn.out_proj.weight", E + "/self_attn/o_proj/kernel", LINEAR_OUT),
            Rule(L + "self_attn.out_proj.bias", E + "/self_attn/o_proj/bias", IDENTITY)]
  for theirs, mine in (("layer_norm1", "input_norm"), ("layer_norm2", "post_attention_norm")):
    table += [Rule(f"{L}{theirs}.weight", f"{E}/{mine}/scale", IDENTITY),
              Rule(f"{L}{theirs}.bias", f"{E}/{mine}/bias", IDENTITY)]
  for fc in ("fc1", "fc2"):
    table += [Rule(f"{L}mlp.{fc}.weight", f"{E}/mlp/{fc}/kernel", LINEAR),
              Rule(f"{L}mlp.{fc}.bias", f"{E}/mlp/{fc}/bias", IDENTITY)]
  table += [Rule(prefix + "post_layernorm.weight", "post_layernorm/scale", IDENTITY),
            Rule(prefix + "post_layernorm.bias", "post_layernorm/bias", IDENTITY)]
  h, H = prefix + "head.", "head/"
  table += [Rule(h + "probe", H + "probe", IDENTITY)]
  for k, n in enumerate(("q", "k", "v")):   # torch MultiheadAttention packs q|k|v
    table += [Rule(h + "attention.in_proj_weight", f"{H}attention/{n}_proj/kernel",
                   Part(LINEAR, k, 3)),
              Rule(h + "attention.in_proj_bias", f"{H}attention/{n}_proj/bias",
                   Part(FLATTEN, k, 3))]
  table += [Rule(h + "attention.out_proj.weight", H + "attention/o_proj/kernel", LINEAR_OUT),
            Rule(h + "attention.out_proj.bias", H + "attention/o_proj/bias", IDENTITY),
            Rule(h + "layernorm.weight", H + "norm/scale", IDENTITY),
            Rule(h + "layernorm.bias", H + "norm/bias", IDENTITY)]
  for fc in ("fc1", "fc2"):
    table += [Rule(f"{h}mlp.{fc}.weight", f"{H}mlp/{fc}/kernel", LINEAR),
              Rule(f"{h}mlp.{fc}.bias", f"{H}mlp/{fc}/bias", IDENTITY)]
  return table


def hf_ignore(cfg: SiglipConfig, prefix: str = "") -> tuple:
  """A full SigLIP checkpoint also holds the text tower and the logit scale/bias; a
  truncated tower ignores the dropped layers and (without the head) the head."""
  p = re.escape(prefix)
  kept = "|".join(map(str, range(cfg.stack.num_layers)))
  return (r"text_model\..*", r"logit_scale", r"logit_bias", p + r".*position_ids",
          p + rf"encoder\.layers\.(?!(?:{kept})\.)\d+\..*") + (
              () if cfg.use_head else (p + r"head\..*",))


HF_FAMILY = Family(
    name="siglip_vision", model_types=("siglip_vision_model", "siglip"),
    architectures=("SiglipVisionModel", "SiglipModel"), from_hf_config=from_hf_config,
    to_hf_config=to_hf_config, make_model=SiglipVision,
    init_args=lambda cfg: (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels)),),
    table=hf_table, ignore=hf_ignore, renames=lambda cfg: ((r"^vision_model\.", ""),))

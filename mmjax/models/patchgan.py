"""PatchGAN discriminator and GAN losses, as in DualToken's tokenizer release.

The release's discriminator is taming-transformers' ``NLayerDiscriminator`` (pix2pix PatchGAN,
``input_nc=3, ndf=64, n_layers=3``) with its conv-norm-LeakyReLU stages replaced by small
GroupNorm residual blocks and 3x3 kernels:

* ``conv_in``: 3x3 conv, stride 2, ``3 -> ndf``, LeakyReLU(0.2);
* ``block_n`` for n = 1 .. n_layers: ``ndf * min(2**(n-1), 8) -> ndf * min(2**n, 8)``
  (64 -> 128 -> 256 -> 512), stride 2 except the last (stride 1). A block is
  ``h = conv1(leaky_relu(norm1(x), 0.2))`` (GroupNorm(32, eps 1e-6), one 3x3 conv) plus a
  shortcut: ``x`` resized bilinearly to ``h``'s size (torch ``interpolate``, half-pixel, no
  antialias; a 2x2 average for even sizes) then a 1x1 ``nin_shortcut`` when widths differ.
  There is no second norm / conv in these blocks;
* ``conv_out``: 3x3 conv to 1 channel: a logits map (384 px -> 48x48).

Conv kernels start from N(0, 0.02) (the release's ``weights_init``); biases start at 0.
Losses (the release's): ``hinge_d_loss`` = 0.5 (mean(lrelu(1 - real)) + mean(lrelu(1 + fake)))
where lrelu is a *leaky* ReLU with slope 0.01 (``negative_slope=0`` gives the classic hinge);
``generator_loss`` = -mean(fake logits); ``adaptive_weight`` = ||grad rec|| / (||grad gen|| +
1e-4) clamped to [0.3, 10], both gradients taken at the decoder's ``conv_out`` kernel.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import patchgan
    cfg = patchgan.PatchGANConfig(ndf=16, num_groups=8)
    disc = patchgan.PatchGAN(cfg)
    real = fake = jnp.zeros((2, 64, 64, 3))
    params = disc.init(jax.random.key(0), real)["params"]
    lr, lf = disc.apply({"params": params}, real), disc.apply({"params": params}, fake)
    d_loss = patchgan.hinge_d_loss(lr, lf)         # logits maps [2, 8, 8, 1]
    g_loss = patchgan.generator_loss(lf)
    sd = patchgan.to_state_dict(cfg, params)       # {'main.0.weight': ..., 'main.5.bias': ...}
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.interop.tables import CONV, IDENTITY, Family, Rule
from mmjax.models.vqgan import AXES, GroupNorm, load_state_dict, resize_bilinear


@dataclasses.dataclass(frozen=True)
class PatchGANConfig:
  """Discriminator hyper-parameters (the release: ``NLayerDiscriminator(3, ndf=64,
  n_layers=3)``, GroupNorm(32))."""
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  num_groups: int = 32
  eps: float = 1e-6
  negative_slope: float = 0.2
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  family: str = "patchgan"

  def __post_init__(self):
    bad = [w for w in self.widths[:-1] if w % self.num_groups]
    if bad:
      raise ValueError(f"GroupNorm groups {self.num_groups} do not divide widths {bad}")

  @property
  def widths(self) -> tuple:
    """Channel widths after ``conv_in`` and after each block."""
    return tuple(self.ndf * min(2 ** n, 8) for n in range(self.n_layers + 1))


def _conv(cfg: PatchGANConfig, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.normal(cfg.init_std), (None, None) + AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (AXES[1],)))


class DiscBlock(nn.Module):
  """``resize(x) [-> nin_shortcut] + conv1(leaky_relu(norm1(x)))``."""
  cfg: PatchGANConfig
  out: int
  stride: int

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = GroupNorm(c.num_groups, c.eps, dtype=c.dtype, param_dtype=c.param_dtype,
                  name="norm1")(x)
    h = _conv(c, self.out, 3, self.stride, "conv1")(jax.nn.leaky_relu(h, c.negative_slope))
    if x.shape[-1] != self.out:
      x = _conv(c, self.out, 1, 1, "nin_shortcut")(resize_bilinear(x, h.shape[1:3]))
    else:
      x = resize_bilinear(x, h.shape[1:3])
    return x + h


class PatchGAN(nn.Module):
  """Images ``[b, H, W, in_channels]`` (in [-1, 1]) -> logits ``[b, h, w, 1]`` in fp32."""
  cfg: PatchGANConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    w = c.widths
    h = _conv(c, w[0], 3, 2, "conv_in")(x.astype(c.dtype))
    h = jax.nn.leaky_relu(h, c.negative_slope)
    for n in range(1, c.n_layers + 1):
      h = DiscBlock(c, w[n], 2 if n < c.n_layers else 1, name=f"block_{n}")(h)
    return _conv(c, 1, 3, 1, "conv_out")(h).astype(jnp.float32)


# ----------------------------------------------------------------------------- losses
def hinge_d_loss(logits_real, logits_fake, negative_slope: float = 0.01):
  """Discriminator loss 0.5 (mean f(1 - real) + mean f(1 + fake)), f = leaky ReLU with
  ``negative_slope`` (the release's 0.01; 0 is the classic hinge ReLU)."""
  f = lambda t: jax.nn.leaky_relu(t.astype(jnp.float32), negative_slope)  # noqa: E731
  return 0.5 * (jnp.mean(f(1.0 - logits_real)) + jnp.mean(f(1.0 + logits_fake)))


def generator_loss(logits_fake):
  """Generator loss (the release's ``vanilla_g_loss``): ``-mean(logits_fake)``."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(rec_grad, gen_grad, lo: float = 0.3, hi: float = 10.0,
                    eps: float = 1e-4):
  """``clip(||rec_grad|| / (||gen_grad|| + eps), lo, hi)`` with no gradient; the gradients
  are d(MSE + LPIPS)/dW and d(generator_loss)/dW at the decoder's last conv kernel (any
  pytree; the norm is over all its leaves). The release multiplies it by 0.75."""
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))  # noqa: E731
                                for x in jax.tree_util.tree_leaves(t)))
  return jax.lax.stop_gradient(jnp.clip(norm(rec_grad) / (norm(gen_grad) + eps), lo, hi))


# ----------------------------------------------------------------------------- interop
def torch_table(cfg: PatchGANConfig) -> list:
  """The release's ``NLayerDiscriminator`` names (``main.{index}`` of its ``nn.Sequential``:
  0 conv, 1 LeakyReLU, 2 .. n_layers + 1 blocks, n_layers + 2 the output conv) -> ours."""
  conv = [("weight", "kernel", CONV), ("bias", "bias", IDENTITY)]
  norm = [("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY)]
  layers = [("main.0", "conv_in", conv)]
  for n in range(1, cfg.n_layers + 1):
    layers += [(f"main.{n + 1}.norm1", f"block_{n}/norm1", norm),
               (f"main.{n + 1}.conv1", f"block_{n}/conv1", conv)]
    if cfg.widths[n - 1] != cfg.widths[n]:
      layers.append((f"main.{n + 1}.nin_shortcut", f"block_{n}/nin_shortcut", conv))
  layers.append((f"main.{cfg.n_layers + 2}", "conv_out", conv))
  return [Rule(f"{theirs}.{a}", f"{ours}/{b}", t) for theirs, ours, leaves in layers
          for a, b, t in leaves]


def _config_dict(cfg: PatchGANConfig) -> dict:
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in ("dtype", "param_dtype")}


FAMILY = Family(
    name="patchgan", model_types=(), architectures=("NLayerDiscriminator",),
    from_hf_config=lambda d, **o: PatchGANConfig(**{**d, **o}), to_hf_config=_config_dict,
    make_model=PatchGAN, init_args=lambda cfg: (jnp.zeros((1, 32, 32, cfg.in_channels)),),
    table=torch_table)


def to_state_dict(cfg: PatchGANConfig, params) -> dict:
  """Our params -> the release discriminator's ``{name: numpy}``."""
  from mmjax.interop import hf
  return hf.state_dict(FAMILY, cfg, params)


def from_state_dict(cfg: PatchGANConfig, tensors: dict, **kw):
  """The release discriminator's state dict -> our params (every name and shape checked)."""
  return load_state_dict(FAMILY, cfg, tensors, **kw)

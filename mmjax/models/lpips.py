"""LPIPS (Zhang et al. 2018, "v0.1", VGG16 variant): the learned perceptual distance used as
DualToken's perceptual loss. Same function and weights as the ``lpips`` package's
``LPIPS(net='vgg')`` (and taming-transformers' copy of it), NHWC:

1. inputs in [-1, 1] are scaled per channel: ``(x - shift) / scale`` with shift
   (-0.030, -0.088, -0.188) and scale (0.458, 0.448, 0.450);
2. torchvision's VGG16 ``features`` (3x3 convs + ReLU, 2x2 max pools) tapped after relu1_2,
   relu2_2, relu3_3, relu4_3 and relu5_3 (``features`` indices 3, 8, 15, 22, 29);
3. at each tap both feature maps are unit-normalised over channels (``f / (||f|| + 1e-10)``),
   their squared difference is weighted by a learned 1x1 conv to one channel (``lin0`` ..
   ``lin4``: non-negative weights, no bias), averaged over space; the five are summed.

``LPIPS()(x, y)`` returns the distance per image ``[b]`` (the loss is its mean). Both images go
through VGG as one batch. Weights: torchvision's VGG16 state dict (``features.N.weight`` /
``bias``; a full ``vgg16-397923af.pth`` with its classifier works) plus the lpips package's
linear heads (``lin{k}.model.1.weight``, the file ``lpips/weights/v0.1/vgg.pth`` shipped with
the package); an lpips ``LPIPS`` module's whole state dict (``net.slice{s}.{N}.*``) loads too.

Example::

    import jax, jax.numpy as jnp
    from mmjax.models import lpips
    params = lpips.load_lpips("/ckpt/vgg16-397923af.pth", lpips.package_lin_path())
    dist = jax.jit(lambda p, a, b: lpips.LPIPS().apply({"params": p}, a, b))
    x = jnp.zeros((2, 64, 64, 3)); y = jnp.ones((2, 64, 64, 3)) * 0.1
    loss = dist(params, x, y).mean()                   # [2] -> scalar, differentiable in x, y
    # untrained (e.g. shapes only): LPIPS().init(jax.random.key(0), x, y)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import MissingCheckpoint
from mmjax.interop.tables import CONV, IDENTITY, Family, Rule
from mmjax.models.vqgan import AXES, load_state_dict, read_state_dict

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# torchvision ``vgg16().features`` indices of the convs, one tuple per LPIPS slice; every conv
# is followed by a ReLU, every slice but the first starts with a 2x2 max pool.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
WIDTHS = (64, 128, 256, 512, 512)
EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  """Compute dtype of the VGG trunk (normalisation, heads and the result are fp32)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  family: str = "lpips_vgg"


class VGG16Features(nn.Module):
  """VGG16 ``features`` up to relu5_3; returns the five LPIPS taps (NHWC)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps = []
    h = x.astype(self.dtype)
    for s, (convs, width) in enumerate(zip(STAGES, WIDTHS)):
      if s:
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      for index in convs:
        h = jax.nn.relu(nn.Conv(
            width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"features_{index}",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None) + AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (AXES[1],)))(h))
      taps.append(h)
    return taps


class NetLin(nn.Module):
  """LPIPS head: a bias-free 1x1 conv to one channel, ``[b, h, w, C] -> [b, h, w]`` in fp32
  (kernel ``[1, 1, C, 1]``, torch's layout transposed; starts at 1/C, non-negative)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, d):
    c = d.shape[-1]
    w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.constant(1.0 / c),
                                                          (None, None, AXES[0], None)),
                   (1, 1, c, 1), self.param_dtype)
    return jnp.einsum("bhwc,c->bhw", d, w[0, 0, :, 0].astype(jnp.float32))


def unit_normalize(f):
  """``f / (sqrt(sum_c f^2) + 1e-10)`` over the channel axis, in fp32."""
  f = f.astype(jnp.float32)
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + EPS)


class LPIPS(nn.Module):
  """``(x, y)`` images ``[b, H, W, 3]`` in [-1, 1] (H, W >= 16) -> distance ``[b]`` (fp32).
  Params: ``net/features_{N}`` (VGG16) and ``lin{k}/kernel`` ``[1, 1, C_k, 1]``."""
  cfg: LPIPSConfig = LPIPSConfig()

  @nn.compact
  def __call__(self, x, y):
    b = x.shape[0]
    h = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    h = (h - SHIFT) / SCALE
    feats = VGG16Features(self.cfg.dtype, self.cfg.param_dtype, name="net")(h)
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      f = unit_normalize(f)
      diff = jnp.square(f[:b] - f[b:])
      head = NetLin(self.cfg.param_dtype, name=f"lin{k}")
      total = total + jnp.mean(head(diff), axis=(1, 2))
    return total


# ----------------------------------------------------------------------------- interop
def torch_table(cfg: LPIPSConfig) -> list:
  """torchvision ``features.N.*`` and lpips ``lin{k}.model.1.weight`` -> our paths."""
  del cfg
  rules = []
  for convs in STAGES:
    for n in convs:
      rules += [Rule(f"features.{n}.weight", f"net/features_{n}/kernel", CONV),
                Rule(f"features.{n}.bias", f"net/features_{n}/bias", IDENTITY)]
  return rules + [Rule(f"lin{k}.model.1.weight", f"lin{k}/kernel", CONV)
                  for k in range(len(STAGES))]


def _renames(cfg) -> tuple:
  """Other layouts of the same tensors: an lpips ``LPIPS`` module's state dict
  (``net.slice{s}.{N}.*``) and heads built without dropout (``lin{k}.model.0.weight``)."""
  del cfg
  return ((r"^net\.slice\d\.(\d+)\.", r"features.\1."),
          (r"^lin(\d)\.model\.0\.weight$", r"lin\1.model.1.weight"))


def _ignore(cfg) -> tuple:
  del cfg   # torchvision's classifier; lpips' constant buffers and ``lins`` (= lin0..lin4)
  return (r"classifier\..*", r"scaling_layer\..*", r"lins\.\d\.model\.\d\.weight")


def _config_dict(cfg: LPIPSConfig) -> dict:
  return {"family": cfg.family}


FAMILY = Family(
    name="lpips_vgg", model_types=(), architectures=("LPIPS",),
    from_hf_config=lambda d, **o: LPIPSConfig(**o), to_hf_config=_config_dict,
    make_model=LPIPS,
    init_args=lambda cfg: (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3))),
    table=torch_table, ignore=_ignore, renames=_renames)


def package_lin_path() -> str:
  """The linear-head weights shipped inside the installed ``lpips`` package
  (``lpips/weights/v0.1/vgg.pth``); found without importing the package."""
  spec = importlib.util.find_spec("lpips")
  path = (os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")
          if spec is not None and spec.origin else "")
  if not os.path.isfile(path):
    raise MissingCheckpoint({"lpips_lin": path}, "pip install --no-deps lpips==0.1.4 ships "
                            "them, or pass the file of lin0..lin4 weights")
  return path


def load_lpips(vgg_path: str, lin_path: Optional[str] = None, *, cfg: LPIPSConfig = LPIPSConfig(),
               mesh=None, rules=None):
  """LPIPS params from torchvision's VGG16 state dict file and the lpips linear-head file
  (``.pth`` needs torch, imported only then; ``.safetensors`` / ``.npz`` do not), or from one
  file holding both. Every expected tensor must be present with its shape."""
  missing = {k: v for k, v in (("lpips_vgg", vgg_path), ("lpips_lin", lin_path))
             if v and not os.path.isfile(v)}
  if not vgg_path or missing:
    raise MissingCheckpoint(missing or {"lpips_vgg": vgg_path},
                            "LPIPS needs torchvision's VGG16 weights and the lpips heads")
  tensors = read_state_dict(vgg_path)
  if lin_path:
    tensors.update(read_state_dict(lin_path))
  return load_state_dict(FAMILY, cfg, tensors, mesh=mesh, rules=rules)


def to_state_dict(params, cfg: LPIPSConfig = LPIPSConfig()) -> dict:
  """Our params -> ``{'features.N.weight': ..., 'lin{k}.model.1.weight': ...}``."""
  from mmjax.interop import hf
  return hf.state_dict(FAMILY, cfg, params)


def from_state_dict(tensors: dict, cfg: LPIPSConfig = LPIPSConfig(), **kw):
  """An in-memory VGG16 + heads state dict (either layout) -> our params."""
  return load_state_dict(FAMILY, cfg, tensors, **kw)

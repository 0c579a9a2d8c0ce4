"""VQGAN-style pixel decoder: parity against a small torch re-implementation of the taming /
RQ-VAE ``Decoder`` (plus DualToken's bilinear resize and ``post_quant_conv``) written here from
the layout facts, loaded through our table; export round trip into the torch module (strict);
bilinear resize against ``F.interpolate``; the paper-size decoder's shapes and table; errors."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from mmjax.interop import CheckpointMismatchError
from mmjax.models import vqgan

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
            decoder_in_channels=16, num_groups=8, hidden_size=24, decoder_latent_shape=(8, 8))
# no resize / post_quant_conv, three levels, attention at two resolutions, plain upsampling
PLAIN = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4, 8),
             resolution=16, decoder_in_channels=8, num_groups=4, hidden_size=None,
             decoder_latent_shape=None, resamp_with_conv=False)


# ----------------------------------------------------------------------------- torch reference
def gn(c, g):
  return tnn.GroupNorm(g, c, eps=1e-6, affine=True)


class TRes(tnn.Module):
  def __init__(self, cin, cout, g, k1=3):
    super().__init__()
    self.norm1, self.conv1 = gn(cin, g), tnn.Conv2d(cin, cout, k1, 1, k1 // 2)
    self.norm2, self.conv2 = gn(cout, g), tnn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = tnn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttn(tnn.Module):
  def __init__(self, c, g):
    super().__init__()
    self.norm = gn(c, g)
    self.q, self.k, self.v, self.proj_out = (tnn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q, k, v = (m(y).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
    a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)
    return x + self.proj_out(torch.einsum("bij,bcj->bci", a, v).reshape(b, c, h, w))


class TUp(tnn.Module):
  def __init__(self, c, with_conv):
    super().__init__()
    self.with_conv = with_conv
    if with_conv:
      self.conv = tnn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return self.conv(x) if self.with_conv else x


class TDecoder(tnn.Module):
  def __init__(self, c: vqgan.DecoderConfig):
    super().__init__()
    g, n, self.c = c.num_groups, len(c.ch_mult), c
    width, res = c.ch * c.ch_mult[-1], c.lowest_resolution
    self.conv_in = tnn.Conv2d(c.decoder_in_channels, width, 3, 1, 1)
    self.mid = tnn.Module()
    self.mid.block_1, self.mid.attn_1 = TRes(width, width, g), TAttn(width, g)
    self.mid.block_2 = TRes(width, width, g)
    ups = []
    for i in reversed(range(n)):
      up, cout = tnn.Module(), c.ch * c.ch_mult[i]
      up.block, up.attn = tnn.ModuleList(), tnn.ModuleList()
      for _ in range(c.num_res_blocks + 1):
        up.block.append(TRes(width, cout, g))
        width = cout
        if res in c.attn_resolutions:
          up.attn.append(TAttn(width, g))
      if i != 0:
        up.upsample, res = TUp(width, c.resamp_with_conv), res * 2
      ups.insert(0, up)
    self.up = tnn.ModuleList(ups)
    self.norm_out, self.conv_out = gn(width, g), tnn.Conv2d(width, c.out_ch, 3, 1, 1)

  def forward(self, z):
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
    for i in reversed(range(len(self.c.ch_mult))):
      for j, blk in enumerate(self.up[i].block):
        h = blk(h)
        if len(self.up[i].attn):
          h = self.up[i].attn[j](h)
      if i != 0:
        h = self.up[i].upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TPixelDecoder(tnn.Module):
  def __init__(self, c: vqgan.DecoderConfig):
    super().__init__()
    self.c = c
    if c.hidden_size is not None:
      self.post_quant_conv = TRes(c.hidden_size, c.decoder_in_channels, c.num_groups, k1=1)
    self.decoder = TDecoder(c)

  def forward(self, x):   # x: NCHW
    if self.c.decoder_latent_shape is not None:
      x = F.interpolate(x, size=self.c.decoder_latent_shape, mode="bilinear")
    if self.c.hidden_size is not None:
      x = self.post_quant_conv(x)
    return self.decoder(x)


def torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = TPixelDecoder(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        (p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.2))
  return model


def numpy_sd(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def run_torch(model, x):
  with torch.no_grad():
    return model(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  return jax.jit(lambda p, v: vqgan.PixelDecoder(cfg).apply({"params": p}, v))


def apply(cfg, params, x):
  """Our decoder under jit, one compile per config and shape (eager flax is slow on CPU)."""
  return np.asarray(_jitted(cfg)(params, x))


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kw, side", [(TINY, 10), (PLAIN, 4)])
def test_parity_with_torch_decoder(kw, side):
  cfg = vqgan.DecoderConfig(**kw)
  model = torch_model(cfg)
  params = vqgan.from_state_dict(cfg, numpy_sd(model))
  width = cfg.hidden_size or cfg.decoder_in_channels
  x = np.random.default_rng(0).normal(size=(2, side, side, width)).astype(np.float32)
  ours = apply(cfg, params, x)
  ref = run_torch(model, x)
  assert ours.shape == ref.shape == (2, cfg.resolution, cfg.resolution, 3)
  assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)
  if cfg.hidden_size is not None:   # the token layout [b, L, C] decodes the same
    np.testing.assert_allclose(apply(cfg, params, x.reshape(2, side * side, -1)), ours,
                               atol=1e-5)


def test_export_loads_strictly_into_torch():
  cfg = vqgan.DecoderConfig(**TINY)
  ref_sd = numpy_sd(torch_model(cfg, seed=1))
  sd = vqgan.to_state_dict(cfg, vqgan.from_state_dict(cfg, ref_sd))
  assert sorted(sd) == sorted(ref_sd)
  assert all(np.array_equal(sd[k], ref_sd[k]) for k in sd)
  model = TPixelDecoder(cfg)
  model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  from mmjax.config import default_logical_rules
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  placed = vqgan.from_state_dict(cfg, ref_sd, mesh=mesh, rules=default_logical_rules())
  kernel = placed["decoder"]["conv_out"]["kernel"]
  assert kernel.sharding.mesh.shape == mesh.shape
  np.testing.assert_array_equal(np.asarray(kernel), ref_sd["decoder.conv_out.weight"].transpose(
      2, 3, 1, 0))


@pytest.mark.parametrize("src, dst", [(27, 24), (10, 8), (8, 4), (7, 4), (4, 7), (5, 10)])
def test_resize_bilinear_matches_torch(src, dst):
  x = np.random.default_rng(src).normal(size=(2, src, src + 1, 3)).astype(np.float32)
  ours = np.asarray(vqgan.resize_bilinear(jnp.asarray(x), (dst, dst + 2)))
  ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(dst, dst + 2),
                      mode="bilinear").permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_group_norm_matches_torch():
  x = np.random.default_rng(2).normal(2.0, 3.0, size=(2, 5, 6, 16)).astype(np.float32)
  norm = vqgan.GroupNorm(num_groups=4)
  p = {"scale": np.linspace(0.5, 1.5, 16, dtype=np.float32),
       "bias": np.linspace(-1, 1, 16, dtype=np.float32)}
  ours = np.asarray(norm.apply({"params": p}, x))
  t = gn(16, 4)
  with torch.no_grad():
    t.weight.copy_(torch.tensor(p["scale"]))
    t.bias.copy_(torch.tensor(p["bias"]))
    ref = t(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_paper_decoder_shapes_and_table():
  rq = {"hidden_size": 1152, "decoder_latent_shape": [24, 24],
        "ddconfig": {"attn_resolutions": [24], "ch": 128, "ch_mult": [1, 1, 4, 4, 8],
                     "decoder_in_channels": 1024, "double_z": False, "dropout": 0.0,
                     "in_channels": 3, "num_res_blocks": 2, "out_ch": 3, "resolution": 384}}
  cfg = vqgan.DecoderConfig.from_release_config(rq)
  assert cfg == vqgan.DecoderConfig()
  out, boxed = jax.eval_shape(lambda: vqgan.PixelDecoder(cfg).init_with_output(
      jax.random.key(0), jnp.zeros((1, 27, 27, 1152))))
  assert out.shape == (1, 384, 384, 3)
  leaves = jax.tree_util.tree_leaves(boxed["params"], is_leaf=lambda x: isinstance(
      x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)   # every param has logical names
  shapes = {"/".join(k): v.shape for k, v in
            __import__("flax").traverse_util.flatten_dict(nn.unbox(boxed["params"])).items()}
  table = vqgan.torch_table(cfg)
  from mmjax.interop.tables import expand, unmapped
  assert unmapped(table, shapes) == []
  names = {e.hf: e.hf_shape for e in expand(table, shapes)}
  assert len(names) == len(shapes)
  assert names["post_quant_conv.conv1.weight"] == (1024, 1152, 1, 1)
  assert names["post_quant_conv.nin_shortcut.weight"] == (1024, 1152, 1, 1)
  assert names["decoder.conv_in.weight"] == (1024, 1024, 3, 3)
  assert names["decoder.up.4.attn.2.q.weight"] == (1024, 1024, 1, 1)
  assert names["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
  assert names["decoder.conv_out.weight"] == (3, 128, 3, 3)
  assert not any(".attn." in n and not n.startswith("decoder.up.4") for n in names)
  assert not any(n.startswith("decoder.up.0.upsample") for n in names)
  assert sum(n.endswith("conv1.weight") and ".block." in n for n in names) == 15
  assert sum(math.prod(s) for s in shapes.values()) == 180_253_571


def test_bf16_remat_and_gradient_to_last_layer():
  cfg = vqgan.DecoderConfig(**TINY)
  x = np.random.default_rng(0).normal(size=(2, 10, 10, 24)).astype(np.float32)
  params = vqgan.from_state_dict(cfg, numpy_sd(torch_model(cfg)))   # (init is slow on CPU)

  def loss(p, c):
    return jnp.mean(jnp.square(vqgan.PixelDecoder(c).apply({"params": p}, x).astype(
        jnp.float32)))

  g = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)["decoder"]["conv_out"]["kernel"]
  assert g.shape == (3, 3, 32, 3) and float(jnp.linalg.norm(g)) > 0   # adaptive-weight layer
  remat = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
      params, vqgan.DecoderConfig(**TINY, remat=True)))
  assert "checkpoint" in remat or "remat" in remat
  y16 = apply(vqgan.DecoderConfig(**TINY, dtype=jnp.bfloat16), params, x)
  assert y16.dtype == jnp.bfloat16
  assert rel_err(y16.astype(np.float32), apply(cfg, params, x)) < 5e-2


def test_mismatched_state_dict_names_every_key():
  cfg = vqgan.DecoderConfig(**TINY)
  sd = numpy_sd(torch_model(cfg))
  sd.pop("decoder.mid.attn_1.q.weight")
  sd["decoder.extra.weight"] = np.zeros(3, np.float32)
  sd["decoder.conv_out.bias"] = np.zeros(4, np.float32)
  with pytest.raises(CheckpointMismatchError) as e:
    vqgan.from_state_dict(cfg, sd)
  msg = str(e.value)
  for key in ("decoder.mid.attn_1.q.weight", "decoder.extra.weight", "decoder.conv_out.bias"):
    assert key in msg
  with pytest.raises(ValueError, match="do not divide"):
    vqgan.DecoderConfig(**{**TINY, "num_groups": 7})

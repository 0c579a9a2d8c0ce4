"""PatchGAN discriminator: parity against a torch re-implementation of the release's
``NLayerDiscriminator`` (GroupNorm residual blocks, bilinear shortcut) written here from its
layout facts, loaded through our table and exported back strictly; shapes of the paper's
discriminator; hinge / generator loss formulas; adaptive weight; gradients flow."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from mmjax.models import patchgan

TINY = dict(ndf=8, n_layers=3, num_groups=4)


class TBlock(tnn.Module):
  def __init__(self, cin, cout, stride, groups):
    super().__init__()
    self.norm1 = tnn.GroupNorm(groups, cin, eps=1e-6)
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1)
    if cin != cout:
      self.nin_shortcut = tnn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
    if h.shape[2:] != x.shape[2:]:
      x = F.interpolate(x, size=h.shape[2:], mode="bilinear")
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


def torch_disc(cfg, seed=0):
  torch.manual_seed(seed)
  w = cfg.widths
  layers = [tnn.Conv2d(3, w[0], 3, 2, 1), tnn.LeakyReLU(0.2)]
  layers += [TBlock(w[n - 1], w[n], 2 if n < cfg.n_layers else 1, cfg.num_groups)
             for n in range(1, cfg.n_layers + 1)]
  model = tnn.Module()
  model.main = tnn.Sequential(*layers, tnn.Conv2d(w[-1], 1, 3, 1, 1))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        (p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.2))
  return model.eval()


def jitted_apply(cfg):
  return jax.jit(lambda p, v: patchgan.PatchGAN(cfg).apply({"params": p}, v))


@pytest.mark.parametrize("size", [32, 37])   # 37: odd sizes exercise the bilinear shortcut
def test_parity_with_torch_discriminator(size):
  cfg = patchgan.PatchGANConfig(**TINY)
  model = torch_disc(cfg)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = patchgan.from_state_dict(cfg, sd)
  x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ours = np.asarray(jitted_apply(cfg)(params, x))
  with torch.no_grad():
    ref = model.main(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape
  assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
  back = patchgan.to_state_dict(cfg, params)
  assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  torch_disc(cfg, seed=1).load_state_dict({k: torch.tensor(v) for k, v in back.items()},
                                          strict=True)


def test_paper_discriminator_shapes_and_names():
  cfg = patchgan.PatchGANConfig()
  out, boxed = jax.eval_shape(lambda: patchgan.PatchGAN(cfg).init_with_output(
      jax.random.key(0), jnp.zeros((2, 384, 384, 3))))
  assert out.shape == (2, 48, 48, 1) and out.dtype == jnp.float32
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  from mmjax.interop.tables import expand
  from flax import traverse_util
  shapes = {"/".join(k): v.shape
            for k, v in traverse_util.flatten_dict(nn.unbox(boxed["params"])).items()}
  names = {e.hf: e.hf_shape for e in expand(patchgan.torch_table(cfg), shapes)}
  assert len(names) == len(shapes) == 22
  assert names["main.0.weight"] == (64, 3, 3, 3)
  assert names["main.2.conv1.weight"] == (128, 64, 3, 3)
  assert names["main.2.nin_shortcut.weight"] == (128, 64, 1, 1)
  assert names["main.4.conv1.weight"] == (512, 256, 3, 3)
  assert names["main.4.norm1.weight"] == (256,)
  assert names["main.5.weight"] == (1, 512, 3, 3)
  assert sum(int(np.prod(s)) for s in shapes.values()) == 1_729_409


def test_losses():
  real = jnp.array([2.0, 0.5, -3.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  leaky = lambda t: np.where(t > 0, t, 0.01 * t)  # noqa: E731
  want = 0.5 * (np.mean(leaky(1 - np.asarray(real))) + np.mean(leaky(1 + np.asarray(fake))))
  np.testing.assert_allclose(patchgan.hinge_d_loss(real, fake), want, rtol=1e-6)
  classic = 0.5 * (np.mean(np.maximum(0, 1 - np.asarray(real))) +
                   np.mean(np.maximum(0, 1 + np.asarray(fake))))
  np.testing.assert_allclose(patchgan.hinge_d_loss(real, fake, negative_slope=0.0), classic,
                             rtol=1e-6)
  np.testing.assert_allclose(patchgan.generator_loss(fake), -np.mean(np.asarray(fake)))
  g = {"w": jnp.full((2, 2), 3.0)}   # ||.|| = 6
  np.testing.assert_allclose(patchgan.adaptive_weight(g, {"w": jnp.full((2, 2), 1.0)}),
                             6 / (2 + 1e-4), rtol=1e-6)
  assert float(patchgan.adaptive_weight(g, {"w": jnp.full((2, 2), 100.0)})) == pytest.approx(0.3)
  assert float(patchgan.adaptive_weight(g, {"w": jnp.zeros((2, 2))})) == pytest.approx(10.0)
  assert jax.grad(lambda s: patchgan.adaptive_weight(s * g["w"], g["w"]))(1.0) == 0.0


def test_gradients_flow():
  cfg = patchgan.PatchGANConfig(**TINY)
  params = patchgan.from_state_dict(cfg, {k: v.numpy() for k, v in
                                          torch_disc(cfg).state_dict().items()})
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  fake = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  disc = patchgan.PatchGAN(cfg)

  def d_loss(p, fake):
    return patchgan.hinge_d_loss(disc.apply({"params": p}, real), disc.apply({"params": p}, fake))

  def g_loss(fake, p):
    return patchgan.generator_loss(disc.apply({"params": p}, fake))

  gp, gx = jax.jit(lambda p, f: (jax.grad(d_loss)(p, f), jax.grad(g_loss)(f, p)))(params, fake)
  # every kernel learns (biases after the last nonlinearity cancel between real and fake)
  from flax import traverse_util
  kernels = [v for k, v in traverse_util.flatten_dict(gp).items() if k[-1] != "bias"]
  assert len(kernels) == 11 and all(float(jnp.abs(g).sum()) > 0 for g in kernels)
  assert gx.shape == fake.shape and float(jnp.abs(gx).sum()) > 0
  bf = np.asarray(jitted_apply(patchgan.PatchGANConfig(**TINY, dtype=jnp.bfloat16))(params, real))
  ref = np.asarray(jitted_apply(cfg)(params, real))
  assert bf.dtype == np.float32 and np.max(np.abs(bf - ref)) < 0.05 * np.max(np.abs(ref)) + 0.05

"""SD1.5's UNet and KL autoencoder against diffusers' UNet2DConditionModel / AutoencoderKL:
output parity on tiny random configs (SD1.5's block types on a latent that does not halve
evenly; SD2's linear projections, per-block heads and two transformer layers), encode /
decode / posterior parity, export round trips through ``interop.save``, and the full-size
SD1.5 weight tables."""
import diffusers
import jax
import numpy as np
import pytest
import torch

import jax.numpy as jnp

from mmjax import interop
from mmjax.interop.hf import abstract_params
from mmjax.interop.tables import expand
from mmjax.models import autoencoder_kl, unet2d

# SD1.5's layout, shrunk: cross-attention down blocks then a plain one, mirrored going up
SD15_LIKE = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                 attention_head_dim=2, norm_num_groups=4)
# SD2's options (one block: no resampling): linear proj_in / proj_out, heads per block, two
# transformer layers per attention, two layers per block
SD2_LIKE = dict(SD15_LIKE, block_out_channels=(16,), layers_per_block=(2,),
                attention_head_dim=(4,), down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",), use_linear_projection=True,
                transformer_layers_per_block=2, in_channels=3, out_channels=5)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
           latent_channels=4)


def randomize(model, seed=0):
  """Every parameter random (zero-initialised biases and output convs included)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return model.eval()


def run(fn, *args):
  """``jax.jit(fn)(*args)`` compiled without LLVM's optimisations: the same numbers, a
  fraction of the compile time of these many-layer graphs on a small CPU."""
  opts = {"xla_backend_optimization_level": 0}
  return jax.tree.map(np.asarray, jax.jit(fn).lower(*args).compile(compiler_options=opts)(*args))


def nchw(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(x):
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("layout,size", [("sd15", (6, 5)), ("sd2", (4, 4))])
def test_unet_matches_diffusers(tmp_path, layout, size):
  kw = SD15_LIKE if layout == "sd15" else SD2_LIKE
  ref = randomize(diffusers.UNet2DConditionModel(**kw))
  ref.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, ref.config.in_channels)).astype(np.float32)
  ctx = rng.normal(size=(2, 5, 12)).astype(np.float32)
  t = np.array([999, 37])
  with torch.no_grad():
    want = nhwc(ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  # SD2 variant: ResNets and transformers rematerialised (the same function)
  module, params = interop.load(str(tmp_path), **({"remat_policy": "dots"} if layout == "sd2"
                                                  else {}))
  assert isinstance(module, unet2d.UNet2DConditionModel)
  got = run(module.apply, {"params": params}, x, t.astype(np.float32), ctx)
  diff = float(np.abs(got - want).max())
  print(f"unet ({layout}, {size}) max abs diff {diff:.2e} (output scale {np.abs(want).max():.2f})")
  assert got.shape == want.shape and diff <= 1e-4
  if layout == "sd15":    # export: diffusers loads it and computes the same
    interop.save(module, params, str(tmp_path / "out"))
    back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
      again = nhwc(back(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    np.testing.assert_allclose(again, want, atol=1e-6)


def test_autoencoder_kl_matches_diffusers(tmp_path):
  ref = randomize(diffusers.AutoencoderKL(**VAE))
  ref.save_pretrained(tmp_path)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(nchw(images)).latent_dist
    mean, logvar = nhwc(dist.mean), nhwc(dist.logvar)
    decoded = nhwc(ref.decode(dist.mean).sample)
  module, params = interop.load(str(tmp_path))
  cfg = module.config
  assert cfg.scaling_factor == 0.18215 and cfg.spatial_compression_ratio == 2
  m, lv = run(lambda p, x: module.apply({"params": p}, x, method=module.encode), params, images)
  y = run(lambda p, z: module.apply({"params": p}, z, method=module.decode), params, mean)
  diffs = [float(np.abs(a - b).max()) for a, b in ((m, mean), (lv, logvar), (y, decoded))]
  print(f"autoencoder_kl mean / logvar / decode max abs diff {diffs} "
        f"(decode scale {np.abs(decoded).max():.2f})")
  assert m.shape == (2, 8, 8, 4) and max(diffs) <= 1e-4
  # the posterior sample is mean + std * N(0, 1); the mode is the mean
  key = jax.random.key(0)
  s = autoencoder_kl.sample(m, lv, key)
  np.testing.assert_allclose(s, m + np.exp(0.5 * lv) * jax.random.normal(key, m.shape),
                             rtol=1e-6, atol=1e-6)
  z = autoencoder_kl.scale_latents(m, cfg)
  np.testing.assert_allclose(z, m * 0.18215, rtol=1e-6)
  np.testing.assert_allclose(autoencoder_kl.unscale_latents(z, cfg), m, rtol=1e-5, atol=1e-6)
  interop.save(module, params, str(tmp_path / "out"))
  back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(nhwc(back.encode(nchw(images)).latent_dist.mean), mean, atol=1e-6)


def test_configs_round_trip_and_refuse_what_they_do_not_build():
  cfg = unet2d.UNetConfig.from_diffusers_config(dict(SD2_LIKE, _class_name="x"))
  assert cfg.heads == (4,) and cfg.layers == (2,) and cfg.caption_channels == 12
  assert unet2d.UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
  with pytest.raises(NotImplementedError, match="class_embed_type"):
    unet2d.UNetConfig.from_diffusers_config({"class_embed_type": "timestep"})
  with pytest.raises(NotImplementedError, match="block types"):
    unet2d.UNetConfig(down_block_types=("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      block_out_channels=(8, 16))
  with pytest.raises(ValueError, match="bogus"):
    unet2d.UNetConfig.from_diffusers_config({"bogus": 1})
  vae = autoencoder_kl.AutoencoderKLConfig.from_diffusers_config(dict(VAE))
  assert autoencoder_kl.AutoencoderKLConfig.from_diffusers_config(
      vae.to_diffusers_config()) == vae
  with pytest.raises(ValueError, match="bogus"):
    autoencoder_kl.AutoencoderKLConfig.from_diffusers_config({"bogus": 1})


@pytest.mark.parametrize("cls,family,lo,hi", [
    (diffusers.UNet2DConditionModel, unet2d.DIFFUSERS_FAMILY, 8.55e8, 8.65e8),
    (diffusers.AutoencoderKL, autoencoder_kl.DIFFUSERS_FAMILY, 8.3e7, 8.4e7)])
def test_full_size_sd15_tables_match_diffusers_state_dicts(cls, family, lo, hi):
  """SD1.5 at full size (torch on the meta device, ours under eval_shape): our defaults are
  SD1.5's, and our table names exactly diffusers' tensors with their shapes."""
  ours = (unet2d.UNetConfig() if family is unet2d.DIFFUSERS_FAMILY
          else autoencoder_kl.AutoencoderKLConfig())
  with torch.device("meta"):
    ref = cls(**{k: v for k, v in ours.to_diffusers_config().items()
                 if not k.startswith("_")})
  shapes, _ = abstract_params(family, ours)
  entries = expand(family.table(ours), {k: v.shape for k, v in shapes.items()})
  assert {e.hf: e.hf_shape for e in entries} == {k: tuple(v.shape)
                                                for k, v in ref.state_dict().items()}
  count = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert count == sum(p.numel() for p in ref.parameters()) and lo < count < hi, count
  assert jnp.dtype(next(iter(shapes.values())).dtype) == jnp.float32

"""MetaQuery with the SD1.5 decoder: the ``:sd15`` preset at full size (shapes only: 77 queries
at caption width 768, SD1.5's UNet and KL autoencoder, both frozen), and a tiny variant that
takes a training step (the DDPM epsilon loss with uniform t on posterior latents), samples,
and reads its UNet / autoencoder groups from diffusers directories."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as mcfg
from mmjax import interop
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.interop.subtree import load_into
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG, TINY

# ``demo,sd15`` shrunk further (one level of cross-attention blocks: the multi-level UNet is
# test_models_unet2d.py's), on a one-level KL autoencoder: 16px -> 16x16x4 posterior latents
TINY_SD15 = TINY + [
    "--config.decoder.autoencoder=kl", "--config.decoder.unet.in_channels=4",
    "--config.decoder.unet.out_channels=4", "--config.decoder.unet.block_out_channels=[8]",
    "--config.decoder.unet.down_block_types=['CrossAttnDownBlock2D']",
    "--config.decoder.unet.up_block_types=['CrossAttnUpBlock2D']",
    "--config.decoder.unet.norm_num_groups=4", "--config.decoder.unet.cross_attention_dim=24",
    "--config.decoder.ae.block_out_channels=[8]", "--config.decoder.ae.norm_num_groups=4",
    "--config.decoder.ae.down_block_types=['DownEncoderBlock2D']",
    "--config.decoder.ae.up_block_types=['UpDecoderBlock2D']"]
FAST = {"xla_backend_optimization_level": 0}   # same numbers, a fraction of the compile time


def count(tree):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(nn.unbox(tree)))


def test_sd15_preset_is_the_papers_coco_fid_setting():
  with pytest.raises(MissingCheckpoint) as e:
    MetaQuery(mcfg.load(CONFIG + ":sd15"))
  assert set(e.value.missing) == {"mllm.path", "decoder.unet_path", "decoder.ae_path"}
  with pytest.raises(ConfigError, match="text-to-image"):
    mcfg.load(CONFIG + ":sd15,edit")
  system = MetaQuery(mcfg.load(CONFIG + ":sd15", ["--config.model.init=random"]))
  shapes = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))["params"]
  assert nn.unbox(shapes["queries"]).shape == (77, 896)                 # N = 77 at D = 896
  assert nn.unbox(shapes["connector"]["projection"]["fc2"]["kernel"]).shape == (768, 768)
  assert 8.55e8 < count(shapes["dit"]) < 8.65e8                          # SD1.5's UNet
  assert 8.3e7 < count(shapes["vae"]) < 8.4e7                            # and its KL VAE
  assert system.latent_shape == (64, 64, 4) and system.ae_cfg.scaling_factor == 0.18215
  mask = system.trainable_mask(shapes)
  for frozen in ("mllm", "dit", "vae"):
    assert not any(jax.tree.leaves(mask[frozen])), frozen
  assert mask["queries"] and all(jax.tree.leaves(mask["connector"]))
  assert system.config.sample.guidance == 3.0 and len(system.alphas_cumprod) == 1000
  assert set(system.ddpm_schedule) == {"timesteps", "alphas", "sigmas"}  # DPM-Solver++ 2M
  ddim = MetaQuery(mcfg.load(CONFIG + ":sd15", ["--config.model.init=random",
                                                "--config.sample.solver=ddim"]))
  assert ddim.ddpm_schedule["timesteps"][-1] == 1                       # 'leading' + offset 1
  with pytest.raises(ConfigError, match="solver"):
    MetaQuery(mcfg.load(CONFIG, ["--config.model.init=random", "--config.sample.solver=ddim"]))


def _random_params(system, seed=0):
  """Random params of the system's shapes (a jitted init of a UNet's many small tensors
  compiles for minutes on a small CPU; the values do not matter here)."""
  shapes = nn.unbox(jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))[
      "params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), shapes)


def test_tiny_sd15_trains_samples_and_loads_diffusers_groups(tmp_path):
  system = MetaQuery(mcfg.load(CONFIG + ":demo,sd15",
                               TINY_SD15 + ["--config.model.cond_dropout=0.0"]))
  assert system.latent_shape == (16, 16, 4) and system.config.sample.solver == "dpm_solver_2m"
  params = _random_params(system)
  ids, mask = system.prompts.encode_batch(["a red circle", "two blue squares"])
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  batch = {"images": images, "prompt_ids": ids, "prompt_mask": mask}
  rng = jax.random.key(3)

  train_step = jax.jit(jax.value_and_grad(system.loss, has_aux=True)).lower(
      params, batch, rng).compile(compiler_options=FAST)
  (loss, metrics), grads = train_step(params, batch, rng)
  assert np.isfinite(float(loss)) and float(metrics["dropped"]) == 0.0
  for group in ("queries", "markers", "connector", "dit"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[group])) > 0, group
  # the target is the noise: with a UNet that predicts 0 the loss is E[eps^2] of the noise
  # the step drew (split(rng, 3)[2], as the flow loss draws it)
  zero = {**params, "dit": {**params["dit"], "conv_out": jax.tree.map(
      jnp.zeros_like, params["dit"]["conv_out"])}}
  (loss0, _), _ = train_step(zero, batch, rng)
  eps = jax.random.normal(jax.random.split(rng, 3)[2], (2,) + system.latent_shape)
  assert float(loss0) == pytest.approx(float(jnp.mean(eps ** 2)), rel=1e-5)

  # sampling: prompts -> conditions -> DPM-Solver++ on the DDPM schedule -> KL decode
  images = jax.jit(system._generate).lower(params, ids, mask, rng).compile(
      compiler_options=FAST)(params, ids, mask, rng)
  assert images.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(images)).all()
  assert system.flops_per_step(2) > 0

  # the UNet and autoencoder groups are diffusers directories both ways
  abstract = jax.eval_shape(lambda: params)
  for group, cfg in (("dit", system.dit_cfg), ("vae", system.ae_cfg)):
    interop.save(cfg, params[group], str(tmp_path / group))
    back = load_into(abstract[group], "diffusers", str(tmp_path / group))
    for a, b in zip(jax.tree.leaves(params[group]), jax.tree.leaves(back)):
      np.testing.assert_array_equal(a, b)

"""PyTorch from the mmjax export: ``scripts/metaquery_to_torch.py EXPORT --prompt ... --out
image.png`` (transformers MLLM + the bridge + diffusers DiT / UNet and scheduler + pixel
latents or VAE) draws the image mmjax samples from the same noise, on the demo config (Sana,
DPM-Solver++ over flow sigmas) and its SD1.5 variant (UNet, DDPM-schedule solvers);
bridges of format version 1 (one QK gain per head) still load."""
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmjax import config as mcfg
from mmjax.data import image as image_ops
from mmjax.systems.metaquery.bridge import MetaQueryModel
from mmjax.systems.metaquery.export import export
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG, ROOT, TINY

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import metaquery_to_torch as mqt  # noqa: E402

CAPTIONS = ["two red circles left of a blue square", "a green triangle"]


def random_params(system, seed=0):
  """N(0, 0.1) everywhere, norm scales and QK gains 1 + N(0, 0.1): nothing at its init."""
  shapes = nn.unbox(jax.eval_shape(system.init, jax.random.key(0),
                                   system.dummy_batch(1)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    x = 0.1 * rng.standard_normal(a.shape)
    return (x + 1.0 if name in ("scale", "q_gain", "k_gain") else x).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def ours_from_noise(system, params, noise):
  """mmjax's sample from ``noise``: conditions of the captions and of the empty prompt,
  the compiled solver loop, the decode -- `MetaQuery._generate` with given noise."""
  ids, mask = system.prompts.encode_batch(CAPTIONS)
  e_ids, e_mask = system.prompts.encode_batch([""] * len(CAPTIONS))
  cond = jax.jit(lambda i, m: system.apply(params, i, m, method=MetaQueryModel.condition))
  z = jax.jit(system.sample_latents)(params, cond(ids, mask), cond(e_ids, e_mask), noise)
  return np.asarray(jax.jit(lambda z: system.apply(
      params, z, method=MetaQueryModel.decode_latents))(z))


# demo,sd15 on a one-level UNet and KL autoencoder (16px -> 16x16x4 latents)
KL = TINY + [
    "--config.decoder.autoencoder=kl", "--config.decoder.unet.in_channels=4",
    "--config.decoder.unet.out_channels=4", "--config.decoder.unet.block_out_channels=[8]",
    "--config.decoder.unet.down_block_types=['CrossAttnDownBlock2D']",
    "--config.decoder.unet.up_block_types=['CrossAttnUpBlock2D']",
    "--config.decoder.unet.norm_num_groups=4", "--config.decoder.unet.cross_attention_dim=24",
    "--config.decoder.ae.block_out_channels=[8]", "--config.decoder.ae.norm_num_groups=4",
    "--config.decoder.ae.down_block_types=['DownEncoderBlock2D']",
    "--config.decoder.ae.up_block_types=['UpDecoderBlock2D']"]


@pytest.mark.parametrize("preset,solver,steps,extra", [
    ("demo", "dpm_solver_2m", 8, []), ("demo,sd15", "ddim", 4, []),
    ("demo,sd15", "dpm_solver_2m", 3, KL)], ids=["sana", "sd15_ddim", "sd15_dpm_kl"])
def test_script_draws_mmjax_sample(tmp_path, preset, solver, steps, extra):
  system = MetaQuery(mcfg.load(f"{CONFIG}:{preset}", extra + [
      f"--config.sample.num_steps={steps}", f"--config.sample.solver={solver}"]))
  params = random_params(system)
  out = str(tmp_path / "export")
  export(system, params, out)
  noise = np.random.default_rng(1).standard_normal(
      (len(CAPTIONS),) + system.latent_shape).astype(np.float32)
  np.save(tmp_path / "noise.npy", noise)
  ours = ours_from_noise(system, params, noise)
  argv = [out, "--out", str(tmp_path / "image.png"), "--noise", str(tmp_path / "noise.npy")]
  for c in CAPTIONS:
    argv += ["--prompt", c]
  theirs = mqt.main(argv)
  diff = float(np.abs(theirs - ours).max())
  print(f"metaquery {preset} ({solver}): torch pipeline vs mmjax sample max abs diff {diff:.2e} "
        f"(|image| max {np.abs(ours).max():.2f}, mean {np.abs(ours).mean():.2f})")
  assert diff <= 1e-4 * max(1.0, float(np.abs(ours).max())) and np.abs(ours).mean() > 0.05
  png = np.asarray(Image.open(tmp_path / "image.png"))
  want = np.concatenate(list(image_ops.to_uint8(ours)), axis=1)
  assert png.shape == want.shape and np.abs(png.astype(int) - want).max() <= 1


def test_version_1_bridge_loads_with_broadcast_gains(tmp_path):
  """A bridge written before the gains went per dimension (``{q,k}_gain [heads]``, version
  1) loads with each head's scalar on every dimension: the same connector output."""
  system = MetaQuery(mcfg.load(f"{CONFIG}:demo", ["--config.model.num_queries=4"]))
  params = random_params(system, seed=2)
  for layer in params["connector"]["encoder"].values():     # per-head scalars
    for n in ("q_gain", "k_gain"):
      g = layer["self_attn"][n]
      layer["self_attn"][n] = np.repeat(g[:, :1], g.shape[1], axis=1)
  paths = export(system, params, str(tmp_path / "v2"))
  v1 = tmp_path / "v1"
  v1.mkdir()
  state = load_file(os.path.join(paths["bridge"], "model.safetensors"))
  old = {k.replace("q_norm.gamma", "q_gain").replace("k_norm.gamma", "k_gain"):
         v[:, 0, 0].contiguous() if k.endswith("gamma") else v for k, v in state.items()}
  save_file(old, str(v1 / "model.safetensors"))
  cfg = json.load(open(os.path.join(paths["bridge"], "config.json")))
  (v1 / "config.json").write_text(json.dumps(dict(cfg, version=1)))
  new = mqt.MetaQueryBridge.from_dir(paths["bridge"])
  legacy = mqt.MetaQueryBridge.from_dir(str(v1))
  x = torch.randn(2, 4, cfg["hidden_size"])
  with torch.no_grad():
    np.testing.assert_allclose(legacy.condition_from_hidden(x).numpy(),
                               new.condition_from_hidden(x).numpy(), atol=1e-6)

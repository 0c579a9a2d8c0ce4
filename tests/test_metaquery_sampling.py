"""MetaQuery sampling: our compiled loop (bridge conditions, DPM-Solver++ 2M with flow sigmas,
two-way CFG batched) against diffusers' DPMSolverMultistepScheduler driving
SanaTransformer2DModel step by step with the same conditions and noise; one XLA program."""
import os

import jax
import jax.extend
import numpy as np
import pytest
import torch

from mmjax import config as mcfg
from mmjax.interop.diffusers_io import load_diffusers
from mmjax.systems.metaquery.bridge import MetaQueryModel
from mmjax.systems.metaquery.system import MetaQuery

diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "metaquery.py")
DIT = dict(in_channels=48, out_channels=48, num_attention_heads=2, attention_head_dim=16,
           num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
           cross_attention_dim=32, caption_channels=24, sample_size=4)
BASE = ["--config.model.num_queries=4", "--config.model.connector_layers=1",
        "--config.model.connector_head_dim=16", "--config.mllm.hf_config.num_hidden_layers=1",
        "--config.data.resolution=16", "--config.scan_layers=False"]


def _walk(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (scan / while / cond bodies) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _walk(sub)


def torch_sana(path, seed=0):
  torch.manual_seed(seed)
  model = diffusers.SanaTransformer2DModel(**DIT).eval()
  with torch.no_grad():   # random everything, zero-initialised tables and biases included
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.15)
  model.save_pretrained(path)
  return model


def make(path, *overrides):
  system = MetaQuery(mcfg.load(CONFIG + ":demo", BASE + [f"--config.decoder.dit_path={path}",
                                                         *overrides]))
  params = dict(system.init_params(jax.random.PRNGKey(0)))
  _, params["dit"] = load_diffusers(str(path), scan_layers=False)   # weights from diffusers
  return system, params


@pytest.mark.parametrize("num_steps,shift,guidance", [(10, 3.0, 4.0), (6, 1.0, 1.0)])
def test_sampling_loop_matches_diffusers_step_by_step(tmp_path, num_steps, shift, guidance):
  ref = torch_sana(tmp_path / "dit")
  system, params = make(tmp_path / "dit", f"--config.sample.num_steps={num_steps}",
                        f"--config.sample.flow_shift={shift}")
  captions = ["a red circle", "two blue squares"]
  ids, mask = system.prompts.encode_batch(captions)
  e_ids, e_mask = system.prompts.encode_batch(["", ""])
  cond_fn = jax.jit(lambda i, m: system.apply(params, i, m, method=MetaQueryModel.condition))
  cond, uncond = np.asarray(cond_fn(ids, mask)), np.asarray(cond_fn(e_ids, e_mask))
  noise = np.random.default_rng(0).normal(size=(2,) + system.latent_shape).astype(np.float32)
  ours = np.asarray(jax.jit(system.sample_latents, static_argnums=4)(
      params, cond, uncond, noise, guidance))

  sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                prediction_type="flow_prediction")
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(noise).permute(0, 3, 1, 2)
  ctx = torch.from_numpy(np.concatenate([uncond, cond]))
  with torch.no_grad():
    for t in sched.timesteps:
      v = ref(torch.cat([x, x]), encoder_hidden_states=ctx, timestep=t.expand(4)).sample
      v_u, v_c = v.chunk(2)
      x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
  want = x.permute(0, 2, 3, 1).numpy()
  err = np.abs(ours - want).max() / np.abs(want).max()
  assert err < 1e-4, err
  # the whole loop, decode included: pixels from the same latents
  images = jax.jit(system._generate)(params, ids, mask, jax.random.key(0))
  assert images.shape == (2, 16, 16, 3)


def test_generation_is_one_program(tmp_path):
  torch_sana(tmp_path / "dit")

  def stats(num_steps):
    system, params = make(tmp_path / "dit", f"--config.sample.num_steps={num_steps}")
    ids, mask = system.prompts.encode_batch(["a red circle"])
    jaxpr = jax.make_jaxpr(system._generate)(params, ids, mask, jax.random.key(0))
    names = [e.primitive.name for e in _walk(jaxpr.jaxpr)]
    return names.count("scan"), names.count("while"), len(names), system, params

  scans, whiles, size, system, params = stats(3)
  assert scans == 1 and whiles == 0              # one lax.scan over the solver steps
  assert stats(7)[2] == size                     # the step count is only a static shape
  images = system.generate(params, ["a red circle", "an orange square", "three blue circles"],
                           jax.random.key(1))
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8

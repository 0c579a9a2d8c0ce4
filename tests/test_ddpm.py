"""mmjax.diffusion.ddpm against diffusers (CPU, fp32): SD1.5's schedule bit for bit, the
training noise, the timesteps of every spacing, and the DDIM / DPM-Solver++ 2M trajectories
with batched CFG on a toy epsilon model, every intermediate latent; one XLA program."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.diffusion import ddpm, solvers

diffusers = pytest.importorskip("diffusers")

# stable-diffusion-v1-5 scheduler/scheduler_config.json (what from_config reads)
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
SCHEDULERS = {"ddim": diffusers.DDIMScheduler,
              "dpm_solver_2m": diffusers.DPMSolverMultistepScheduler}
SHAPE = (2, 3, 4, 4)    # [batch, channels, h, w], as diffusers' latents


def make_models(seed=0):
  """One toy epsilon model in jax and torch, over ``[uncond; cond]`` rows: the noise of a
  data set near 0 plus nonlinear terms in x and t, the conditional half shifted."""
  r = np.random.default_rng(seed)
  a = r.normal(size=(4, 4)).astype(np.float32) * 0.6
  b = r.normal(size=SHAPE[1:]).astype(np.float32)
  abar = ddpm.alphas_cumprod()

  def jax_fn(x, t):
    s = jnp.sqrt(1.0 - jnp.asarray(abar)[t.astype(jnp.int32)]).reshape(-1, 1, 1, 1)
    c = (jnp.arange(x.shape[0]) >= x.shape[0] // 2).astype(jnp.float32).reshape(-1, 1, 1, 1)
    return s * x + 0.1 * jnp.tanh(x @ a) + 0.1 * b * (t / 1000.0).reshape(-1, 1, 1, 1) + 0.05 * c

  def torch_fn(x, t):
    s = torch.sqrt(1.0 - torch.from_numpy(abar)[t.long()]).reshape(-1, 1, 1, 1)
    c = (torch.arange(x.shape[0]) >= x.shape[0] // 2).float().reshape(-1, 1, 1, 1)
    return (s * x + 0.1 * torch.tanh(x @ torch.from_numpy(a))
            + 0.1 * torch.from_numpy(b) * (t.float() / 1000.0).reshape(-1, 1, 1, 1) + 0.05 * c)

  return jax_fn, torch_fn


def test_schedule_and_training_noise_equal_diffusers():
  ref = diffusers.DDPMScheduler.from_config(SD15)
  abar = ddpm.alphas_cumprod()
  assert abar.dtype == np.float32 and np.array_equal(abar, ref.alphas_cumprod.numpy())
  lin = diffusers.DDPMScheduler(beta_schedule="linear")
  assert np.array_equal(ddpm.alphas_cumprod("linear", 1e-4, 0.02), lin.alphas_cumprod.numpy())
  key = jax.random.key(0)
  t = np.asarray(ddpm.sample_timesteps(key, 4096))
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999          # uniform 0..999
  assert np.abs(np.histogram(t, bins=10, range=(0, 1000))[0] / 4096 - 0.1).max() < 0.03
  rng = np.random.default_rng(0)
  x0, eps = (rng.normal(size=(4, 3, 4, 4)).astype(np.float32) for _ in range(2))
  tt = np.array([0, 1, 500, 999])
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(tt))
  np.testing.assert_allclose(ddpm.add_noise(x0, eps, tt, abar), want.numpy(), atol=1e-6)
  assert float(ddpm.epsilon_loss(jnp.asarray(eps) + 1.0, eps)) == pytest.approx(1.0)


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_2m"])
def test_timesteps_of_every_spacing_equal_diffusers(solver):
  for spacing in ddpm.SPACINGS:
    for n in (7, 25, 50):
      ref = SCHEDULERS[solver].from_config({**SD15, "timestep_spacing": spacing})
      ref.set_timesteps(n)
      ours = ddpm.schedule(solver, n, ddpm.alphas_cumprod(), spacing=spacing)
      assert ours["timesteps"].tolist() == ref.timesteps.tolist(), (spacing, n)
      if solver == "dpm_solver_2m":
        np.testing.assert_allclose(ours["sigmas"] / ours["alphas"], ref.sigmas.numpy(),
                                   rtol=1e-6)


@pytest.mark.parametrize("solver,num_steps,guidance", [
    ("ddim", 10, 7.5), ("ddim", 50, 3.0), ("dpm_solver_2m", 10, 7.5),
    ("dpm_solver_2m", 30, 3.0)])
def test_cfg_trajectory_equals_diffusers_step_by_step(solver, num_steps, guidance):
  """Every latent of our one-program loop within 1e-5 of diffusers' scheduler driven by
  hand (SD1.5's config: DDIM 'leading' + offset 1, DPM-Solver++ 'linspace', final sigma 0;
  fewer and more than 15 steps), CFG batched as [uncond; cond]."""
  jax_fn, torch_fn = make_models()
  x_T = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
  ref = SCHEDULERS[solver].from_config(SD15)
  ref.set_timesteps(num_steps)
  x, want = torch.from_numpy(x_T), []
  for t in ref.timesteps:
    e_u, e_c = torch_fn(torch.cat([x, x]), t.expand(2 * SHAPE[0])).chunk(2)
    x = ref.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    want.append(x.numpy())
  sched = ddpm.schedule(solver, num_steps, ddpm.alphas_cumprod())
  guided = solvers.cfg_two_way(jax_fn, guidance)
  _, traj = jax.jit(lambda x: ddpm.sample(solver, guided, x, sched, return_trajectory=True))(x_T)
  err = np.abs(np.asarray(traj) - np.stack(want)).max()
  print(f"{solver} {num_steps} steps, CFG {guidance}: max abs diff {err:.1e} over the "
        f"trajectory (scale {np.abs(np.stack(want)).max():.2f})")
  assert traj.shape == (num_steps,) + SHAPE and err < 1e-5


def test_sampling_is_one_scan_whatever_the_step_count():
  jax_fn, _ = make_models()
  x_T = jnp.zeros(SHAPE)

  def eqns(solver, n):
    sched = ddpm.schedule(solver, n, ddpm.alphas_cumprod())
    jaxpr = jax.make_jaxpr(lambda x: ddpm.sample(solver, jax_fn, x, sched))(x_T)
    out = []

    def walk(j):
      for e in j.eqns:
        out.append(e.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(e.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return out

  for solver in ddpm.SOLVERS:
    a, b = eqns(solver, 5), eqns(solver, 40)
    assert a.count("scan") == 1 and "while" not in a and len(a) == len(b)
  with pytest.raises(ValueError, match="solver"):
    ddpm.schedule("euler", 5, ddpm.alphas_cumprod())

"""DDPM (discrete-time, epsilon prediction): how Stable Diffusion 1.5 is trained and sampled.

The forward process is ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` over ``T = 1000``
integer timesteps, ``abar_t = prod_{s <= t} (1 - beta_s)``; SD1.5's betas are
"scaled linear": ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` (float32, as diffusers
builds them). The UNet predicts ``eps`` from ``(x_t, t)`` and trains with an fp32 MSE, ``t``
uniform over ``{0, ..., 999}`` (MetaQuery's SD1.5 decoder loss).

Samplers, each one XLA program (a ``lax.scan``) whose trajectory equals diffusers' scheduler
driven step by step (tests compare every intermediate latent):

* ``ddim``: ``DDIMScheduler`` with eta 0 -- timesteps by ``timestep_spacing`` (SD1.5's
  config: 'leading', ``steps_offset`` 1), previous timestep ``t - T // N`` (``abar`` of
  ``t = 0`` at the end unless ``set_alpha_to_one``);
* ``dpm_solver_2m``: ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2, midpoint, final
  sigma 0, 'linspace' spacing) -- `solvers.dpm_solver_pp_2m` on the path
  ``alpha = 1 / sqrt(1 + s^2)``, ``sigma = s alpha`` with ``s = sqrt((1 - abar) / abar)``.

Conventions: ``eps_fn(x, t) -> eps`` with ``x [batch, ...]`` and integer-valued float ``t
[batch]``; latents and solver arithmetic in float32; CFG with `solvers.cfg_two_way` (it
guides any model output).

Example::

    import jax, jax.numpy as jnp
    from mmjax.diffusion import ddpm, solvers
    abar = ddpm.alphas_cumprod()                                     # SD1.5 [1000]
    x0 = jnp.ones((2, 8, 8, 4))
    k1, k2 = jax.random.split(jax.random.key(0))
    t = ddpm.sample_timesteps(k1, 2)                                 # int32 in [0, 1000)
    eps = jax.random.normal(k2, x0.shape)
    x_t = ddpm.add_noise(x0, eps, t, abar)
    loss = ddpm.epsilon_loss(jnp.zeros_like(x0), eps)                # UNet(x_t, t) vs eps
    sched = ddpm.schedule("dpm_solver_2m", 25, abar)
    eps_fn = solvers.cfg_two_way(lambda x, t: 0.1 * x, 7.5)          # a stand-in UNet
    sample = ddpm.sample("dpm_solver_2m", eps_fn, jax.random.normal(k1, (1, 8, 8, 4)), sched)
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.diffusion import solvers

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULES = ("scaled_linear", "linear")
SOLVERS = ("ddim", "dpm_solver_2m")
SPACINGS = ("leading", "linspace", "trailing")
DEFAULT_SPACING = {"ddim": "leading", "dpm_solver_2m": "linspace"}   # diffusers' defaults
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- the schedule
def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 ``linspace`` as torch computes it: a float32 step, each value one fused
  multiply-add from the nearer end (start for the first half, end for the second)."""
  f32 = np.float32
  lo, hi = f32(start), f32(end)
  step = np.float64((hi - lo) / f32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  return np.where(i < steps // 2, np.float64(lo) + step * i,
                  np.float64(hi) - step * (steps - 1 - i)).astype(f32)


def alphas_cumprod(beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                   beta_end: float = 0.012,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """``abar [T]`` float32 (defaults: SD1.5), equal to diffusers' bit for bit: float32 betas
  from torch's float32 ``linspace``, the product accumulated in float64 as torch's
  ``cumprod`` does.

  >>> a = alphas_cumprod()
  >>> a.shape, round(float(a[0]), 5), round(float(a[-1]), 5)
  ((1000,), 0.99915, 0.00466)
  """
  if beta_schedule == "scaled_linear":
    betas = _linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
  elif beta_schedule == "linear":
    betas = _linspace_f32(beta_start, beta_end, num_train_timesteps)
  else:
    raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")
  return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- training
def sample_timesteps(rng, batch: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
  """Training timesteps ``[batch]`` int32, uniform over ``{0, ..., T - 1}``."""
  return jax.random.randint(rng, (batch,), 0, num_train_timesteps, jnp.int32)


def _expand(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(x0, eps, t, abar):
  """``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for integer ``t [batch]`` (fp32).

  >>> a = alphas_cumprod()
  >>> x = add_noise(jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.array([0]), a)
  >>> round(float(x[0, 0]) ** 2, 5)                                # abar_0
  0.99915
  """
  a = _expand(jnp.asarray(abar, jnp.float32)[jnp.asarray(t, jnp.int32)], x0)
  return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * eps.astype(jnp.float32)


def epsilon_loss(pred, eps):
  """Mean squared error of the predicted noise, in float32 (``F.mse_loss(pred, eps)``)."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps.astype(jnp.float32)))


# ----------------------------------------------------------------------------- samplers
def timesteps_for(num_steps: int, spacing: str, steps_offset: int = 0, *,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                  solver: str = "ddim") -> np.ndarray:
  """The ``num_steps`` descending integer timesteps of diffusers' ``set_timesteps``.
  DDIM and DPM-Solver differ in two details of 'leading' and 'linspace' (DPM-Solver places
  ``N + 1`` points and drops the last), which ``solver`` selects.

  >>> timesteps_for(4, "leading", 1).tolist()
  [751, 501, 251, 1]
  >>> timesteps_for(4, "linspace", solver="dpm_solver_2m").tolist()
  [999, 749, 500, 250]
  """
  T, n = num_train_timesteps, num_steps
  dpm = solver == "dpm_solver_2m"
  if spacing == "leading":
    ratio = T // (n + 1) if dpm else T // n
    t = (np.arange(0, n + 1 if dpm else n) * ratio).round()[::-1]
    t = (t[:-1] if dpm else t).astype(np.int64) + steps_offset
  elif spacing == "linspace":
    t = np.linspace(0, T - 1, n + 1 if dpm else n).round()[::-1]
    t = (t[:-1] if dpm else t).astype(np.int64)
  elif spacing == "trailing":
    t = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
  else:
    raise ValueError(f"timestep_spacing {spacing!r} is not one of {SPACINGS}")
  return t.copy()


def schedule(solver: str, num_steps: int, abar, *, spacing: str = "",
             steps_offset: int = 1, set_alpha_to_one: bool = False) -> dict:
  """Host-side arrays of one sampler run (static shapes for `sample`):
  ``{'timesteps' [N], ...}`` plus ``alpha`` / ``alpha_prev`` (``abar`` at ``t`` and at
  ``t - T // N``; DDIM) or ``alphas`` / ``sigmas`` ``[N + 1]`` (the path coefficients at
  the step boundaries, final sigma 0; DPM-Solver). ``spacing`` "" = the scheduler's default
  (``DEFAULT_SPACING``); ``steps_offset`` and ``set_alpha_to_one`` as SD1.5's scheduler
  config (1, False)."""
  if solver not in SOLVERS:
    raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
  abar = np.asarray(abar, np.float32)
  T = abar.shape[0]
  t = timesteps_for(num_steps, spacing or DEFAULT_SPACING[solver], steps_offset,
                    num_train_timesteps=T, solver=solver)
  if solver == "ddim":
    prev = t - T // num_steps
    final = np.float32(1.0) if set_alpha_to_one else abar[0]
    alpha_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final).astype(np.float32)
    return {"timesteps": t.astype(np.float32), "alpha": abar[t], "alpha_prev": alpha_prev}
  s = np.sqrt((1 - abar) / abar).astype(np.float32)                 # diffusers' sigmas
  s = np.concatenate([s[t], [0.0]]).astype(np.float32)              # final sigma 0
  alphas = (1.0 / np.sqrt(s * s + 1.0)).astype(np.float32)
  return {"timesteps": t.astype(np.float32), "alphas": alphas, "sigmas": s * alphas}


def ddim_sample(eps_fn: EpsFn, x_T, timesteps, alpha, alpha_prev,
                clip_sample: Optional[float] = None, return_trajectory: bool = False):
  """DDIM (eta 0) with ``schedule('ddim', ...)``'s arrays; one ``lax.scan``. Per step:
  ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)`` (clipped to ``+-clip_sample`` if set),
  ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps``. Returns the final latents, plus every
  step's ``[N, *x_T.shape]`` when ``return_trajectory``."""
  def step(x, xs):
    t, a, a_prev = xs
    eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    if clip_sample is not None:
      x0 = jnp.clip(x0, -clip_sample, clip_sample)
    x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
    return x, x

  xs = tuple(jnp.asarray(v, jnp.float32) for v in (timesteps, alpha, alpha_prev))
  x, traj = jax.lax.scan(step, jnp.asarray(x_T, jnp.float32), xs)
  return (x, traj) if return_trajectory else x


def dpm_solver_2m_sample(eps_fn: EpsFn, x_T, timesteps, alphas, sigmas,
                         lower_order_final: bool = True, return_trajectory: bool = False):
  """DPM-Solver++ 2M with ``schedule('dpm_solver_2m', ...)``'s arrays: the noise prediction
  becomes a data prediction ``x0 = (x - sigma eps) / alpha`` for `solvers.dpm_solver_pp_2m`."""
  def data_fn(x, t, alpha, sigma):
    return (x - sigma * eps_fn(x, t).astype(jnp.float32)) / alpha

  return solvers.dpm_solver_pp_2m(data_fn, x_T, alphas, sigmas, timesteps, lower_order_final,
                                  return_trajectory)


def sample(solver: str, eps_fn: EpsFn, x_T, sched: dict, return_trajectory: bool = False):
  """Runs ``solver`` ('ddim' | 'dpm_solver_2m') from noise ``x_T`` (fp32, unit variance)
  with the arrays of `schedule`."""
  if solver == "ddim":
    return ddim_sample(eps_fn, x_T, sched["timesteps"], sched["alpha"], sched["alpha_prev"],
                       return_trajectory=return_trajectory)
  if solver == "dpm_solver_2m":
    return dpm_solver_2m_sample(eps_fn, x_T, sched["timesteps"], sched["alphas"],
                                sched["sigmas"], return_trajectory=return_trajectory)
  raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")

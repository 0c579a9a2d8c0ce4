"""ODE samplers for flow-matching models, each one XLA program (a ``lax.scan`` over steps).

MetaQuery samples its Sana decoder with diffusers' ``DPMSolverMultistepScheduler``
configured ``use_flow_sigmas=True, flow_shift=3.0, prediction_type='flow_prediction'``
(DPM-Solver++ 2M, midpoint, final sigma 0), 30 steps, with classifier-free guidance on the
velocity. This module reproduces that schedule and solver step for step (tests compare the
whole trajectory with diffusers) without per-step Python: the number of steps is the static
length of ``sigmas``, the model is traced once, and the loop state is ``(x, last x0)``. The
solver itself, `dpm_solver_pp_2m`, is written for any Gaussian path ``alpha x0 + sigma eps``;
`mmjax.diffusion.ddpm` drives it on SD1.5's discrete (epsilon-prediction) schedule.

Conventions: ``model_fn(x, t) -> velocity`` with ``x`` ``[batch, ...]`` and ``t`` ``[batch]``
on diffusers' timestep scale (0..1000); the velocity is ``eps - x0`` (see `flow`). Latents
and solver arithmetic are float32 whatever the model's compute dtype. For the Sana DiT,
`mmjax.models.sana_dit.velocity_fn` builds the ``model_fn`` to sample with: the caption's
cross-attention keys and values computed once per call rather than once per step, blocks
unrolled, query-chunked attention (``bench/flow_sample.py`` times it against diffusers).

Example::

    import jax, jax.numpy as jnp
    from mmjax.diffusion import solvers
    sigmas, timesteps = solvers.flow_sigmas(30, flow_shift=3.0)      # [31], [30]
    target = jnp.array([0.5, -1.0, 2.0, 0.0])                        # a one-point "data set"
    velocity = lambda x, t: (x - target) / (t / 1000.0)[:, None]     # its exact flow
    guided = solvers.cfg_two_way(velocity, 7.5)                      # cond == uncond here
    sample = jax.jit(lambda x: solvers.dpm_solver_2m_sample(guided, x, sigmas, timesteps))
    x0 = sample(jax.random.normal(jax.random.key(0), (2, 4)))       # [2, 4], ~= target
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def flow_sigmas(num_steps: int, flow_shift: float = 1.0, num_train_timesteps: int = 1000):
  """Sigmas ``[num_steps + 1]`` and model timesteps ``[num_steps]`` of diffusers' flow mode.

  As ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=...)`` builds them in
  ``set_timesteps``: ``s = 1 - linspace(1, 1/T, N + 1)`` (0 .. 0.999), shifted by
  ``flow_shift`` (see `flow.shift_sigmas`), reversed, the trailing 0 dropped; timesteps are
  ``s * T`` *truncated to integers* (diffusers stores them as int64 and that is what the DiT
  receives); the final sigma 0 is appended. Computed in float64 like diffusers, then cast
  to float32, so truncation lands on the same integers.

  >>> s, t = flow_sigmas(4, 3.0)
  >>> [round(float(v), 4) for v in s], t.tolist()
  ([0.9997, 0.8996, 0.7496, 0.4997, 0.0], [999.0, 899.0, 749.0, 499.0])
  """
  alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)
  s = 1.0 - alphas
  s = np.flip(flow_shift * s / (1.0 + (flow_shift - 1.0) * s))[:-1]
  timesteps = (s * num_train_timesteps).astype(np.int64).astype(np.float32)
  sigmas = np.concatenate([s, [0.0]]).astype(np.float32)
  return sigmas, timesteps


def _schedule(sigmas, timesteps):
  sigmas = jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {sigmas.shape}")
  n = sigmas.shape[0] - 1
  if timesteps is None:  # continuous timesteps, as FlowMatchEulerDiscreteScheduler uses
    timesteps = sigmas[:-1] * 1000.0
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.shape != (n,):
    raise ValueError(f"timesteps must have shape ({n},) for {n + 1} sigmas, "
                     f"got {timesteps.shape}")
  return sigmas, timesteps, n


def _call(model_fn: ModelFn, x, t):
  """The model at the scalar timestep ``t``, broadcast over the batch; float32 output."""
  return model_fn(x, jnp.full((x.shape[0],), t, jnp.float32)).astype(jnp.float32)


def euler_sample(model_fn: ModelFn, x_T, sigmas, timesteps=None,
                 return_trajectory: bool = False):
  """First-order ODE solve ``x <- x + (sigma_next - sigma) v(x, t)``.

  The step of diffusers' ``FlowMatchEulerDiscreteScheduler``. ``sigmas`` ``[N + 1]``
  (descending, usually ending at 0), ``timesteps`` ``[N]`` (default ``1000 sigma``).
  Returns the final latents, plus ``[N, *x_T.shape]`` latents after every step when
  ``return_trajectory``.
  """
  sigmas, timesteps, _ = _schedule(sigmas, timesteps)

  def step(x, xs):
    s, s_next, t = xs
    x = x + (s_next - s) * _call(model_fn, x, t)
    return x, x

  x, traj = jax.lax.scan(step, jnp.asarray(x_T, jnp.float32), (sigmas[:-1], sigmas[1:],
                                                               timesteps))
  return (x, traj) if return_trajectory else x


def dpm_solver_2m_sample(model_fn: ModelFn, x_T, sigmas, timesteps=None,
                         lower_order_final: bool = True, return_trajectory: bool = False):
  """DPM-Solver++ 2M (multistep, order 2, midpoint) on the flow path; one ``lax.scan``.

  The flow path is ``alpha = 1 - sigma``: the velocity becomes a data prediction
  ``x0 = x - sigma v`` and `dpm_solver_pp_2m` does the rest (diffusers' update, first order
  on the first step and on the last when the final sigma is 0 -- always with flow sigmas).

  ``sigmas`` ``[N + 1]``, ``timesteps`` ``[N]`` from `flow_sigmas` (or any descending
  schedule; timesteps default to ``1000 sigma``). Returns the final latents, plus
  ``[N, *x_T.shape]`` latents after every step when ``return_trajectory``.

  >>> s, _ = flow_sigmas(6, 3.0)
  >>> v = lambda x, t: (x - 2.0) / (t / 1000.0)[:, None]     # exact velocity towards x0 = 2
  >>> x = dpm_solver_2m_sample(v, jnp.ones((1, 3)), s)       # continuous t = 1000 sigma
  >>> bool(jnp.allclose(x, 2.0, atol=1e-4))
  True
  """
  sigmas, timesteps, _ = _schedule(sigmas, timesteps)

  def data_fn(x, t, alpha, sigma):
    del alpha
    return x - sigma * model_fn(x, t).astype(jnp.float32)   # flow prediction -> x0

  return dpm_solver_pp_2m(data_fn, x_T, 1.0 - sigmas, sigmas, timesteps, lower_order_final,
                          return_trajectory)


def dpm_solver_pp_2m(data_fn, x_T, alphas, sigmas, timesteps, lower_order_final: bool = True,
                     return_trajectory: bool = False):
  """DPM-Solver++ 2M (data prediction, order 2, midpoint) on any Gaussian path
  ``x_t = alpha_t x0 + sigma_t eps``: diffusers' ``DPMSolverMultistepScheduler`` update as
  one ``lax.scan``.

  ``alphas``, ``sigmas`` ``[N + 1]`` are the path's coefficients at the step boundaries
  (descending noise; the last may have sigma 0), ``timesteps [N]`` what the model receives at
  each step. ``data_fn(x, t [batch], alpha, sigma) -> x0`` turns the model's output into a
  data prediction (flow: ``x - sigma v``; epsilon: ``(x - sigma eps) / alpha``). With
  ``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda``,
  ``x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) (D0 + D1 / 2)``, ``D0 = x0``,
  ``D1 = (x0 - x0_prev) / r``, ``r = h_prev / h`` (``D1 = 0``: first order, i.e. DDIM).
  First order on the first step, and on the last step when the final sigma is 0 or when
  ``lower_order_final`` and fewer than 15 steps -- diffusers' rules. A final sigma of 0 makes
  the last step return its ``x0``. Returns the final latents, plus ``[N, *x_T.shape]``
  latents after every step when ``return_trajectory``.
  """
  alphas = jnp.asarray(alphas, jnp.float32)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  timesteps = jnp.asarray(timesteps, jnp.float32)
  n = sigmas.shape[0] - 1
  step_index = jnp.arange(n)
  prev = jnp.maximum(step_index - 1, 0)
  final_first_order = (sigmas[-1] == 0.0) | (lower_order_final and n < 15)
  first_order = (step_index == 0) | ((step_index == n - 1) & final_first_order)
  lam = jnp.log(alphas) - jnp.log(sigmas)              # half log-SNR; +inf at sigma 0

  def step(carry, xs):
    x, x0_prev = carry                                 # latents, last data prediction
    a, s, a_next, s_next, lam_p, lam_s, lam_next, t, first = xs
    x0 = data_fn(x, jnp.full((x.shape[0],), t, jnp.float32), a, s).astype(jnp.float32)
    h, h_prev = lam_next - lam_s, lam_s - lam_p
    phi = a_next * (jnp.exp(-h) - 1.0)                 # alpha_next (e^{-h} - 1); -1 at sigma 0
    x_next = (s_next / s) * x - phi * x0               # first-order (DDIM) update
    # Second-order correction; 1/r = h / h_prev is inf on the first / last step, so it is
    # zeroed there before it can meet x0 (no NaN even in the branch not taken).
    inv_r = jnp.where(first, 0.0, h / jnp.where(first, 1.0, h_prev))
    x_next = x_next - 0.5 * phi * (inv_r * (x0 - x0_prev))
    return (x_next, x0), x_next

  x = jnp.asarray(x_T, jnp.float32)
  xs = (alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:], lam[prev], lam[:-1], lam[1:],
        timesteps, first_order)
  (x, _), traj = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
  return (x, traj) if return_trajectory else x


# ----------------------------------------------------------------------------- guidance
def cfg_two_way(model_fn_batched: ModelFn, scale) -> ModelFn:
  """Classifier-free guidance ``v = v_u + scale (v_c - v_u)`` in ONE batched model call.

  ``model_fn_batched(x, t)`` sees ``2B`` rows, ``[uncond; cond]``: its conditions must be
  laid out that way (the unconditional branch is the MLLM on the empty prompt). Returns a
  ``model_fn(x, t)`` over ``B`` rows for the samplers.

  >>> f = cfg_two_way(lambda x, t: x * jnp.array([[0.0], [1.0]]), 3.0)   # v_u = 0, v_c = x
  >>> f(jnp.ones((1, 2)), jnp.zeros((1,))).tolist()
  [[3.0, 3.0]]
  """
  def model_fn(x, t):
    v = model_fn_batched(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    v_u, v_c = jnp.split(v.astype(jnp.float32), 2)
    return v_u + scale * (v_c - v_u)
  return model_fn


def cfg_three_way(model_fn_batched: ModelFn, s_img, s_txt) -> ModelFn:
  """Image + text guidance in ONE batched call over ``3B`` rows.

  Rows are ``[negative prompt + black images; negative prompt + images; caption + images]``
  and ``v = v_u + s_img (v_img - v_u) + s_txt (v_full - v_img)`` (MetaQuery: s_img 1.5).

  >>> rows = jnp.array([[1.0], [2.0], [4.0]])                        # v_u, v_img, v_full
  >>> f = cfg_three_way(lambda x, t: x * rows, 1.5, 3.0)
  >>> f(jnp.ones((1, 1)), jnp.zeros((1,))).tolist()                  # 1 + 1.5 + 6
  [[8.5]]
  """
  def model_fn(x, t):
    v = model_fn_batched(jnp.concatenate([x, x, x]), jnp.concatenate([t, t, t]))
    v_u, v_img, v_full = jnp.split(v.astype(jnp.float32), 3)
    return v_u + s_img * (v_img - v_u) + s_txt * (v_full - v_img)
  return model_fn

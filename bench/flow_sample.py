"""Flow sampling: mmjax's one-program Sana sampler against diffusers' ``SanaPipeline`` loop on
the same weights (CPU, fp32): DPM-Solver++ 2M with flow sigmas (shift 3), 30 steps, two-way
CFG, from the same noise and caption embeddings (``output_type='latent'``: no text encoder,
no VAE). One run per size: a compile / warm-up call of each, then ``--runs`` rounds of one
timed call of each, interleaved; prints the medians, their ratio, the largest difference of
the final latents and the load averages before and after.

``ours`` is `sana_dit.velocity_fn` (caption keys/values once per call, unrolled blocks,
query-chunked cross-attention) inside `solvers.dpm_solver_2m_sample`; ``plain`` is the same
solver on ``SanaDiT.apply`` as trained (scanned blocks, 'xla' attention, caption projected at
every step), for reference.

Usage::

    PYTHONPATH=. python bench/flow_sample.py                      # small and medium, 5 runs
    PYTHONPATH=. python bench/flow_sample.py --sizes medium --runs 3 --no-plain
    PYTHONPATH=. python bench/flow_sample.py --cores 1       # one core, one torch thread

Both sides run with every core the process may use (torch: its default thread count) unless
``--cores`` pins them. Time it on an idle machine: with other processes on the cores, torch's
spinning OpenMP pool collapses (tens of seconds for what takes one); there, compare with
``--cores 1`` or ``OMP_WAIT_POLICY=PASSIVE`` (and the process CPU times printed in
brackets), and read the printed load averages.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np

SIZES = {
    # the DiT (diffusers SanaTransformer2DModel fields), latent [h, w, c], caption tokens
    "small": dict(dit=dict(num_layers=4, num_attention_heads=4, attention_head_dim=32,
                           num_cross_attention_heads=4, cross_attention_head_dim=32,
                           cross_attention_dim=128, caption_channels=256, in_channels=16,
                           out_channels=16, sample_size=16),
                  latent=(16, 16, 16), tokens=120),
    "medium": dict(dit=dict(num_layers=8, num_attention_heads=8, attention_head_dim=32,
                            num_cross_attention_heads=8, cross_attention_head_dim=32,
                            cross_attention_dim=256, caption_channels=512, in_channels=16,
                            out_channels=16, sample_size=32),
                   latent=(32, 32, 16), tokens=300),
}


def make_weights(path: str, dit: dict, seed: int = 0):
  """A random ``SanaTransformer2DModel`` (every parameter drawn, the zero-initialised ones
  included) saved to ``path``; returns the torch model."""
  import diffusers
  import torch
  torch.manual_seed(seed)
  model = diffusers.SanaTransformer2DModel(**dit).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.5 * p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)
  model.save_pretrained(path)
  return model


def inputs(size: dict, seed: int = 0):
  """Noise ``[1, h, w, c]``, caption and empty-prompt embeddings ``[1, n, C]`` and masks
  (a caption of 40% real tokens, an empty prompt of 5), as the pipeline would get them."""
  rng = np.random.default_rng(seed)
  h, w, c = size["latent"]
  n, ch = size["tokens"], size["dit"]["caption_channels"]
  noise = rng.normal(size=(1, h, w, c)).astype(np.float32)
  cond, uncond = (rng.normal(size=(1, n, ch)).astype(np.float32) for _ in range(2))
  cond_mask, uncond_mask = np.zeros((1, n), np.int64), np.zeros((1, n), np.int64)
  cond_mask[:, :int(0.4 * n)] = 1
  uncond_mask[:, :5] = 1
  return noise, cond, cond_mask, uncond, uncond_mask


def _cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fns: dict, runs: int) -> tuple[dict, dict]:
  """Calls each of ``fns`` once (compile / warm up), then ``runs`` rounds calling each in
  turn (interleaved, so that a change of load hits every side alike). Returns the median
  wall ms and median process CPU ms (all threads) per name, and each one's last output."""
  outs = {name: fn() for name, fn in fns.items()}
  wall, cpu = ({name: [] for name in fns} for _ in range(2))
  for _ in range(runs):
    for name, fn in fns.items():
      t0, c0 = time.perf_counter(), _cpu_seconds()
      outs[name] = fn()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(_cpu_seconds() - c0)
  ms = {name: (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3)
        for name in fns}
  return ms, outs


def diffusers_fn(model, args, steps, guidance):
  """The SanaPipeline call, latents out ``[1, h, w, c]``."""
  import diffusers
  import torch
  noise, cond, cond_mask, uncond, uncond_mask = args
  scheduler = diffusers.DPMSolverMultistepScheduler(
      use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
  pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None,
                                transformer=model, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  _, h, w, _ = noise.shape
  latents = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()

  def call():
    with torch.no_grad():
      out = pipe(prompt_embeds=torch.from_numpy(cond),
                 prompt_attention_mask=torch.from_numpy(cond_mask),
                 negative_prompt=None, negative_prompt_embeds=torch.from_numpy(uncond),
                 negative_prompt_attention_mask=torch.from_numpy(uncond_mask),
                 latents=latents.clone(), height=32 * h, width=32 * w,
                 num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                 use_resolution_binning=False, return_dict=False)[0]
    return out.permute(0, 2, 3, 1).numpy()
  return call


def ours_fn(path, args, steps, guidance, plain=False):
  """Our sampler as one jitted call, latents out ``[1, h, w, c]``."""
  import jax
  import jax.numpy as jnp

  from mmjax.core.conv_shifts import cpu_apply
  from mmjax.diffusion import solvers
  from mmjax.interop.diffusers_io import load_diffusers
  from mmjax.models import sana_dit
  noise, cond, cond_mask, uncond, uncond_mask = args
  module, params = load_diffusers(path)              # scanned blocks, as trained
  sigmas, timesteps = solvers.flow_sigmas(steps, 3.0)
  both = jnp.concatenate([jnp.asarray(uncond), jnp.asarray(cond)])
  both_mask = jnp.concatenate([jnp.asarray(uncond_mask), jnp.asarray(cond_mask)])

  @jax.jit
  def sample(params, both, both_mask, noise):
    if plain:
      def fn(x, t):
        return cpu_apply(module, {"params": params}, x, t, both, both_mask)
    else:
      fn = sana_dit.velocity_fn(module.config, params, both, both_mask)
    guided = solvers.cfg_two_way(fn, guidance)
    return solvers.dpm_solver_2m_sample(guided, noise, sigmas, timesteps)

  noise = jnp.asarray(noise)
  return lambda: np.asarray(sample(params, both, both_mask, noise))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="small,medium")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--guidance", type=float, default=4.5)
  ap.add_argument("--no-plain", action="store_true", help="skip the 'plain' mmjax row")
  ap.add_argument("--cores", type=int, default=0,
                  help="pin the process to this many cores (torch gets as many threads); "
                       "0: all, torch's default threads")
  a = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")       # the same device as torch's
  if a.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:a.cores]))
  import jax
  import torch
  if a.cores:
    torch.set_num_threads(a.cores)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {len(os.sched_getaffinity(0))} of "
        f"{os.cpu_count()} CPUs, {a.steps} steps, CFG {a.guidance}, medians of {a.runs}; "
        f"wall ms (process CPU ms)")
  rows = []
  for name in a.sizes.split(","):
    size = SIZES[name]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as path:
      model = make_weights(path, size["dit"])
      args = inputs(size)
      fns = {"diffusers": diffusers_fn(model, args, a.steps, a.guidance),
             "ours": ours_fn(path, args, a.steps, a.guidance)}
      if not a.no_plain:
        fns["plain"] = ours_fn(path, args, a.steps, a.guidance, plain=True)
      ms, outs = timed(fns, a.runs)
    ref, out, plain = outs["diffusers"], outs["ours"], outs.get("plain")
    ref_ms, our_ms, plain_ms = ms["diffusers"], ms["ours"], ms.get("plain")
    diff = float(np.abs(out - ref).max())
    rows.append((name, ref_ms, our_ms, plain_ms, diff, float(np.abs(ref).max()), load0,
                 os.getloadavg()[0]))
    if plain_ms is not None:
      print(f"  {name}: plain vs diffusers max |diff| {float(np.abs(plain - ref).max()):.1e}")
  print(f"\n{'size':7} {'diffusers ms':>18} {'mmjax ms':>16} {'ratio':>6} {'plain ms':>16} "
        f"{'max|diff|':>9} {'|latent|':>8} {'load 1m':>12}")
  fmt = lambda m: f"{m[0]:7.0f} ({m[1]:6.0f})"
  for name, ref_ms, our_ms, plain_ms, diff, scale, l0, l1 in rows:
    plain = fmt(plain_ms) if plain_ms is not None else f"{'-':>16}"
    print(f"{name:7} {fmt(ref_ms):>18} {fmt(our_ms):>16} {our_ms[0] / ref_ms[0]:6.2f} {plain:>16} "
          f"{diff:9.1e} {scale:8.2f} {l0:5.2f}->{l1:5.2f}")


if __name__ == "__main__":
  main()

"""The one FLOPs counter (analytic training FLOPs of every system), peak FLOP/s per device
and model-FLOPs utilisation (MFU).

**Counting.** FLOPs = 2 x the multiply-adds of matmuls, convolutions and the attention
products (``q.k`` and ``p.v`` over every key the program computes: a causal mask still
computes all of them). Elementwise work (norms, softmax, activations, the optimizer) is not
counted. Each part of a model costs a number of *passes* of its forward multiply-adds:

* ``TRAINED`` (3): forward, gradient to activations, gradient to weights;
* ``THROUGH`` (2): a frozen part that gradients flow through (forward + activations);
* ``FORWARD`` (1): a frozen part behind ``stop_gradient`` (forward only).

A system's ``flops_per_step(batch)`` sums ``flops(macs, passes)`` over its parts, with the
multiply-adds from ``stack_macs`` (a core transformer stack), ``dense_macs`` and
``conv_macs``; tests compare every system's count with XLA's cost analysis of its
unrolled train step.

MFU = (analytic training FLOPs per step x steps/s) / (devices x peak FLOP/s per device).
Peaks come from the table below keyed on ``jax.devices()[0].device_kind``, or are
*measured* once on CPU (a large float32 matmul), or come from ``config.device_peak_flops``.

Example::

    macs = stack_macs(cfg, tokens=batch * seq, keys=seq) + dense_macs(batch * seq, d, vocab)
    per_step = flops(macs, TRAINED)
    print(mfu(per_step, steps_per_sec=2.0, num_devices=jax.device_count(),
              peak=peak_flops(dtype="bfloat16")))
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

TRAINED, THROUGH, FORWARD = 3, 2, 1


def flops(macs: float, passes: int) -> float:
  """Training FLOPs of a part with ``macs`` forward multiply-adds run ``passes`` times."""
  if passes not in (TRAINED, THROUGH, FORWARD):
    raise ValueError(f"passes = {passes}; expected TRAINED (3), THROUGH (2) or FORWARD (1)")
  return 2.0 * float(macs) * passes


def dense_macs(tokens: float, d_in: int, d_out: int) -> float:
  """A dense layer ``d_in -> d_out`` on ``tokens`` rows."""
  return float(tokens) * d_in * d_out


def conv_macs(positions: float, k: int, c_in: int, c_out: int, groups: int = 1) -> float:
  """A ``k x k`` convolution with ``positions`` output positions."""
  return float(positions) * k * k * (c_in // groups) * c_out


def attention_macs(tokens: float, keys: int, num_heads: int, head_dim: int) -> float:
  """``q.k`` and ``p.v`` of ``tokens`` queries over ``keys`` keys."""
  return 2.0 * float(tokens) * keys * num_heads * head_dim


def stack_macs(c: Any, tokens: float, keys: int) -> float:
  """A core ``TransformerStack`` (``c``: its ``TransformerConfig``) on ``tokens`` tokens in
  all, each attending over ``keys`` keys: q/k/v/out projections, the MLP (3 matrices when
  gated) and the attention products."""
  d, hd = c.d_model, c.head_dim
  proj = d * hd * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * hd * d
  mlp = (3 if c.mlp_act in ("swiglu", "geglu") else 2) * d * c.mlp_dim
  per_layer = float(tokens) * (proj + mlp) + attention_macs(tokens, keys, c.num_heads, hd)
  return c.num_layers * per_layer


# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from the vendors' specs.
# Matching is by lower-cased substring of device_kind, first entry wins.
PEAK_BF16 = (
    ("v6 lite", 918e12),   # Trillium / v6e
    ("v6e", 918e12),
    ("v5 lite", 197e12),   # v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),      # SXM; PCIe parts are slower but report the same kind string
    ("a100", 312e12),
)
# TPUs run fp32 matmuls as multi-pass bf16 and GPUs use TF32 tensor cores: take half.
FP32_FACTOR = 0.5


def lookup_peak(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Table peak for ``device_kind`` (None when the kind is unknown).

  >>> lookup_peak("TPU v5 lite")
  197000000000000.0
  >>> lookup_peak("NVIDIA H100 80GB HBM3", "float32")
  494500000000000.0
  """
  kind = device_kind.lower()
  for key, peak in PEAK_BF16:
    if key in kind:
      return peak * (FP32_FACTOR if jnp.dtype(dtype) == jnp.float32 else 1.0)
  return None


@functools.lru_cache(maxsize=None)
def measured_peak(n: int = 1024, repeats: int = 3) -> float:
  """FLOP/s of one ``n x n`` float32 matmul on the first device (best of ``repeats``)."""
  device = jax.local_devices()[0]
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(dtype: str = "bfloat16", override: float = 0.0) -> float:
  """Peak FLOP/s of one device: ``override`` if > 0, else the table, else measured."""
  if override and override > 0:
    return float(override)
  peak = lookup_peak(jax.devices()[0].device_kind, dtype)
  return peak if peak is not None else measured_peak()


def mfu(flops_per_step: float | None, steps_per_sec: float, num_devices: int,
        peak: float | None = None) -> float | None:
  """Model-FLOPs utilisation in [0, 1] (None when the system reports no FLOPs).

  >>> mfu(1e12, 2.0, 8, peak=1e12)
  0.25
  """
  if not flops_per_step or steps_per_sec <= 0:
    return None
  peak = peak_flops() if peak is None else peak
  return flops_per_step * steps_per_sec / (num_devices * peak)

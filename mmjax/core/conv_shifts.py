"""Depthwise convolutions as sums of shifted copies: an XLA:CPU workaround.

XLA:CPU runs a grouped convolution with one group per channel (a *depthwise* ``nn.Conv``,
e.g. the 3x3 of Sana's Mix-FFN) very slowly, and the gradient of its kernel inside a scanned
stack pathologically slowly. ``depthwise_as_shifts`` is an ``nn.intercept_methods`` hook that
computes such a convolution as a sum of ``k*k`` shifted, scaled copies of its input: the same
parameters and the same result (to fp32 rounding). ``cpu_apply`` applies a module with the
hook on the CPU backend and without it elsewhere.

Example::

    y = cpu_apply(model, {"params": params}, x)        # == model.apply(...) on TPU / GPU
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def is_depthwise(mod) -> bool:
  """A stride-1 ``nn.Conv`` with one group per output channel."""
  return (isinstance(mod, nn.Conv) and mod.feature_group_count > 1
          and mod.feature_group_count == mod.features and mod.strides in (None, 1, (1, 1)))


def depthwise_as_shifts(next_fun, args, kwargs, context):
  """``nn.intercept_methods`` hook: a depthwise ``nn.Conv.__call__`` (outside init) as a sum
  of shifted copies of its (explicitly padded) input; every other call passes through."""
  mod = context.module
  if not (context.method_name == "__call__" and is_depthwise(mod)
          and not mod.is_initializing()):
    return next_fun(*args, **kwargs)
  p = nn.unbox(mod.variables["params"])
  x = args[0].astype(mod.dtype)
  kernel = p["kernel"].astype(mod.dtype)                 # [k, k, 1, C]
  (t, bottom), (left, right) = mod.padding
  _, h, w, _ = x.shape
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (t, bottom), (left, right), (0, 0)))
  y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
  return y + p["bias"].astype(mod.dtype) if "bias" in p else y


def cpu_apply(module: nn.Module, variables, *args, **kwargs):
  """``module.apply(variables, *args, **kwargs)``, with ``depthwise_as_shifts`` on the CPU
  backend."""
  if jax.default_backend() != "cpu":
    return module.apply(variables, *args, **kwargs)
  with nn.intercept_methods(depthwise_as_shifts):
    return module.apply(variables, *args, **kwargs)

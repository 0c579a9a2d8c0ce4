"""Fill one parameter group of a larger model from a transformers / diffusers directory.

Systems compose pretrained parts (an MLLM, a DiT, an autoencoder, a vision tower) with new
parameters (queries, connectors, projectors). ``load_into`` replaces every leaf of one group
of the *boxed* init params with the checkpoint's tensor:

* the values arrive through ``jax.pure_callback``, so under ``jax.eval_shape`` (AOT, abstract
  state) nothing is read, and under ``jax.jit(init, out_shardings=...)`` the host reads the
  directory once and XLA places each leaf on its sharding;
* checkpoint tensors the group does not use (an LM head, SigLIP's pooling head, a vision
  tower for text-to-image) are ignored;
* a parameter missing from the checkpoint, or one with another shape, is an error naming
  the directory and the parameters.

Example::

    params["mllm"] = load_into(params["mllm"], "hf", "/ckpt/llava-ov-0.5b", scan_layers=True)
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

LOADERS = ("hf", "diffusers")


def flat(tree) -> dict:
  """``{'a/b/c': leaf}`` of a nested dict."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@functools.lru_cache(maxsize=4)
def host_checkpoint(kind: str, path: str, overrides: tuple) -> dict:
  """Flat ``{name: numpy}`` of a directory in our layout (read once per process)."""
  if kind == "hf":
    from mmjax.interop.hf import load_hf as load  # pylint: disable=import-outside-toplevel
  elif kind == "diffusers":
    from mmjax.interop.diffusers_io import load_diffusers as load  # pylint: disable=import-outside-toplevel
  else:
    raise ValueError(f"checkpoint kind {kind!r} is not one of {LOADERS}")
  _, params = load(path, **dict(overrides))
  return {k: np.asarray(v) for k, v in flat(params).items()}


def load_into(tree, kind: str, path: str, **overrides):
  """``tree`` (boxed or plain init params of one group) with every leaf read from the
  ``kind`` ('hf' | 'diffusers') directory ``path``; ``overrides`` go to the loader (e.g.
  ``scan_layers``). Logical-partitioning boxes are kept."""
  if kind not in LOADERS:
    raise ValueError(f"checkpoint kind {kind!r} is not one of {LOADERS}")
  ours = flat(nn.unbox(tree))
  names = list(ours)

  def read():
    ckpt = host_checkpoint(kind, path, tuple(sorted(overrides.items())))
    missing = [n for n in names if n not in ckpt]
    bad = [f"{n}: {ckpt[n].shape} vs ours {ours[n].shape}" for n in names
           if n in ckpt and tuple(ckpt[n].shape) != tuple(ours[n].shape)]
    if missing or bad:
      raise ValueError(f"{path}: {len(missing)} parameters missing {missing[:10]}; "
                       f"{len(bad)} mis-shaped {bad[:10]}")
    return tuple(ckpt[n].astype(ours[n].dtype) for n in names)

  values = jax.pure_callback(read, tuple(jax.ShapeDtypeStruct(v.shape, v.dtype)
                                         for v in ours.values()))
  loaded = traverse_util.unflatten_dict({tuple(k.split("/")): v
                                         for k, v in zip(names, values)})
  return jax.tree.map(lambda box, v: box.replace_boxed(v) if isinstance(box, nn.Partitioned)
                      else v, tree, loaded, is_leaf=lambda x: isinstance(x, nn.Partitioned))

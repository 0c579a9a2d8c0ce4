"""Weight-name tables: how a reference checkpoint's tensors become our parameters and back.

A table is data: a list of ``Rule(hf, ours, transform)``.

* ``hf`` is the reference name; ``{i}`` stands for a layer index.
* ``ours`` is our parameter path (``'decoder/layers/self_attn/q_proj/kernel'``). When ``hf``
  has ``{i}`` and ``ours`` does not, the per-layer tensors are *stacked* on axis 0 (scanned
  layers); when both have ``{i}`` the layers stay separate (unrolled layers).
* ``transform`` is reversible and shape-driven: it knows the reference shape of any of our
  shapes, so a mis-shaped tensor is detected before anything is read.

Example::

    import numpy as np
    from mmjax.interop.tables import LINEAR, Rule, expand
    table = [Rule("model.layers.{i}.self_attn.q_proj.weight",
                  "decoder/layers/self_attn/q_proj/kernel", LINEAR)]
    ours = {"decoder/layers/self_attn/q_proj/kernel": (2, 16, 4, 8)}   # [layers, embed, heads, hd]
    entries = expand(table, ours)      # one Entry per layer
    entries[1].hf, entries[1].hf_shape  # ('model.layers.1.self_attn.q_proj.weight', (32, 16))
    w = np.zeros((32, 16), np.float32)
    LINEAR.to_ours(w, (16, 4, 8)).shape                                 # (16, 4, 8)
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence

import numpy as np


# ----------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Identity:
  """Same layout on both sides (embeddings, norm weights, biases of equal shape)."""

  def hf_shape(self, shape):
    return tuple(shape)

  def to_ours(self, x, shape):
    return x.reshape(shape)

  def to_hf(self, x):
    return x


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Reference keeps a flat vector, we keep ``[heads, head_dim]`` (q/k/v biases)."""

  def hf_shape(self, shape):
    return (math.prod(shape),)

  def to_ours(self, x, shape):
    return x.reshape(shape)

  def to_hf(self, x):
    return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear:
  """torch ``Linear.weight [out, in]`` <-> our kernel ``[*in_dims, *out_dims]``.

  ``n_in`` is how many leading axes of our kernel are input axes: 1 for ``[embed, heads,
  head_dim]`` (q/k/v) and plain ``[in, out]`` kernels, 2 for ``[heads, head_dim, embed]``.
  """
  n_in: int = 1

  def hf_shape(self, shape):
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

  def to_ours(self, x, shape):
    return np.ascontiguousarray(x.T).reshape(shape)

  def to_hf(self, x):
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:self.n_in]), -1).T)


@dataclasses.dataclass(frozen=True)
class Conv:
  """torch ``Conv2d.weight [out, in, kh, kw]`` <-> our kernel ``[kh, kw, in, out]``."""

  def hf_shape(self, shape):
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)

  def to_ours(self, x, shape):
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0)).reshape(shape)

  def to_hf(self, x):
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class OutLast:
  """torch weight ``[out, *in_dims]`` <-> our kernel ``[*in_dims, out]``: a ``Conv3d`` whose
  stride equals its kernel is a linear map of each flattened patch (Qwen2.5-VL's patch
  embedding ``[embed, C, T, P, P]`` <-> ``[C, T, P, P, embed]``)."""

  def hf_shape(self, shape):
    return (shape[-1],) + tuple(shape[:-1])

  def to_ours(self, x, shape):
    return np.ascontiguousarray(np.moveaxis(x, 0, -1)).reshape(shape)

  def to_hf(self, x):
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


@dataclasses.dataclass(frozen=True)
class Part:
  """Our tensor is part ``index`` of ``count`` equal pieces (axis 0) of one reference tensor,
  e.g. q, k, v inside torch ``MultiheadAttention.in_proj_weight``. Export concatenates."""
  inner: object
  index: int
  count: int

  def hf_shape(self, shape):
    one = self.inner.hf_shape(shape)
    return (one[0] * self.count,) + tuple(one[1:])

  def to_ours(self, x, shape):
    piece = np.split(x, self.count, axis=0)[self.index]
    return self.inner.to_ours(piece, shape)

  def to_hf(self, x):
    return self.inner.to_hf(x)


IDENTITY = Identity()
FLATTEN = Flatten()
LINEAR = Linear(1)
LINEAR_OUT = Linear(2)   # attention output projections: kernel [heads, head_dim, embed]
CONV = Conv()
OUT_LAST = OutLast()


@dataclasses.dataclass(frozen=True)
class Rule:
  """One line of a table: reference name pattern, our path, reversible transform."""
  hf: str
  ours: str
  transform: object = IDENTITY


def prefixed(table: Sequence[Rule], ours: str) -> list:
  """The same rules with our paths under ``ours`` (a family nested inside another model)."""
  return [Rule(r.hf, ours + r.ours, r.transform) for r in table]


# ----------------------------------------------------------------------------- expansion
@dataclasses.dataclass(frozen=True)
class Entry:
  """One reference tensor of a concrete model: where it goes and what shape it must have."""
  hf: str
  ours: str
  layer: Optional[int]     # index on our axis 0 when stacked, else None
  transform: object
  hf_shape: tuple          # shape the reference tensor must have
  our_shape: tuple         # shape of the (per-layer) piece on our side


def expand(table: Sequence[Rule], our_shapes: dict) -> list:
  """Concrete entries for a model whose params have ``our_shapes`` (``{path: shape}``);
  layer counts come from the shapes. Rules naming a path the model does not have are skipped
  (e.g. ``lm_head`` of a tied model). Several ``Part`` entries may share one reference name."""
  out = []
  for rule in table:
    if "{i}" in rule.ours:
      i = 0
      while rule.ours.format(i=i) in our_shapes:
        shape = tuple(our_shapes[rule.ours.format(i=i)])
        out.append(Entry(rule.hf.format(i=i), rule.ours.format(i=i), None, rule.transform,
                         _hf_shape(rule.transform, shape), shape))
        i += 1
      continue
    if rule.ours not in our_shapes:
      continue
    shape = tuple(our_shapes[rule.ours])
    if "{i}" in rule.hf:
      out.extend(Entry(rule.hf.format(i=i), rule.ours, i, rule.transform,
                       _hf_shape(rule.transform, shape[1:]), shape[1:])
                 for i in range(shape[0]))
    else:
      out.append(Entry(rule.hf, rule.ours, None, rule.transform,
                       _hf_shape(rule.transform, shape), shape))
  return out


def _hf_shape(transform, shape):
  return tuple(int(d) for d in transform.hf_shape(tuple(shape)))


def unmapped(table: Sequence[Rule], our_shapes: dict) -> list:
  """Our parameter paths that no rule fills (a table bug: reported, never silently random)."""
  covered = {e.ours for e in expand(table, our_shapes)}
  return sorted(p for p in our_shapes if p not in covered)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
  """Whether ``name`` fully matches one of the regexes ``patterns``."""
  return any(re.fullmatch(p, name) for p in patterns)


@dataclasses.dataclass(frozen=True)
class Family:
  """What interop needs to know about one model family.

  model_types / architectures: the reference config values this family loads.
  from_hf_config(dict, **overrides) -> our config; to_hf_config(our config) -> dict.
  make_model(our config) -> Linen module; init_args(our config) -> positional args for
  ``module.init`` (shapes only matter). table(our config) -> list of Rule.
  ignore(our config) -> regexes of reference names that may be present and are not read
  (e.g. a tied ``lm_head.weight``, rotary buffers).
  renames(our config) -> ``(regex, replacement)`` pairs applied to checkpoint names before
  matching, for older layouts of the same weights (e.g. a ``vision_model.`` prefix).
  complete_config(reference config, directory) -> the config with what a layout leaves to
  its weights filled in, before ``from_hf_config`` (LaViDa's release names no vision tower
  config: its sizes come from the tensors' shapes).
  """
  name: str
  model_types: tuple
  architectures: tuple
  from_hf_config: Callable
  to_hf_config: Callable
  make_model: Callable
  init_args: Callable
  table: Callable
  ignore: Callable = lambda cfg: ()
  renames: Callable = lambda cfg: ()
  complete_config: Callable = lambda ref, path: ref

"""Objectives: what a system asks the trainer to minimise, one optimizer group each.

A one-loss system only defines ``System.loss(params, batch, rng) -> (loss, metrics)``; the
base class turns it into the single objective ``main`` over every trainable parameter. A
multi-objective system (a VQ-GAN tokenizer: the autoencoder and its discriminator) returns
several from ``System.objectives()``::

    def objectives(self):
      return [Objective("main", self.generator_loss),                   # params not claimed
              Objective("disc", self.disc_loss, params=r"disc/.*")]     # own Adam (0.5, 0.9)

They run in order inside one jitted step, each on the parameters as the previous objectives
left them (the order of alternating GAN updates). Each objective's loss is

    loss(params, batch, rng, ctx) -> (scalar, aux)

with ``ctx`` a ``Context``: ``ctx.step`` (the optimizer step, for terms that start at a
configured step: ``starts_at``), ``ctx.mutables`` (the model's non-gradient collections:
EMA codebooks, batch statistics) and ``ctx.carry`` (what earlier objectives of this step
handed on, gradient stopped, e.g. the generator's reconstructions for the discriminator).
``aux`` is a dict of scalar metrics plus two optional reserved keys:

* ``"mutables"``: new values of (some of) the collections, e.g. ``{"codebook": ...}``;
* ``"carry"``: a pytree handed to later objectives as ``ctx.carry[name]``.

Each objective's optimizer is ``config.optim`` overridden by ``config.optim.groups[name]``
(any optim field: lr, b1, b2, schedule, warmup_steps, clip_norm, weight_decay, ...).
``layer_grads`` takes the gradient of loss terms at one named layer (VQGAN's adaptive GAN
weight: ``adaptive_weight``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

MAIN = "main"
RESERVED = ("mutables", "carry")


@dataclasses.dataclass(frozen=True)
class Objective:
  """``name`` names the optimizer group (``config.optim.groups[name]``) and prefixes its
  metrics (``name/loss``; the ``main`` group's are unprefixed). ``params`` is a regex over
  ``'a/b/c'`` parameter paths this objective's optimizer updates; ``None``: every trainable
  parameter no other objective claims."""
  name: str
  loss: Callable[..., Any]
  params: Optional[str] = None


@struct.dataclass
class Context:
  step: Any                       # int32 scalar: completed optimizer steps
  mutables: Any                   # {collection: tree}
  carry: Any                      # {earlier objective name: what it handed on}


def split_aux(aux: dict) -> tuple[dict, Any, Any]:
  """``(metrics, mutables or None, carry or None)`` of a loss's aux dict."""
  aux = dict(aux or {})
  mutables = aux.pop("mutables", None)
  carry = aux.pop("carry", None)
  return aux, mutables, carry


def update_mutables(old: dict, new: Optional[dict]) -> dict:
  """``old`` with the collections (or leaves) given in ``new`` replaced; shapes, dtypes and
  tree structure must match (the state is donated and resharded as before)."""
  if not new:
    return old
  unknown = sorted(set(new) - set(old))
  if unknown:
    raise KeyError(f"loss returned mutable collections {unknown} that init did not create; "
                   f"known: {sorted(old)}")
  out = dict(old)
  for name, tree in new.items():
    flat_old = traverse_util.flatten_dict(old[name], sep="/")
    flat_new = traverse_util.flatten_dict(tree, sep="/")
    bad = sorted(set(flat_new) - set(flat_old))
    if bad:
      raise KeyError(f"mutable collection {name!r}: unknown entries {bad}")
    merged = dict(flat_old)
    for k, v in flat_new.items():
      ref = flat_old[k]
      if tuple(v.shape) != tuple(ref.shape):
        raise ValueError(f"mutable {name}/{k}: loss returned shape {tuple(v.shape)}, state "
                         f"has {tuple(ref.shape)}")
      merged[k] = v.astype(ref.dtype)
    out[name] = traverse_util.unflatten_dict(merged, sep="/")
  return out


def starts_at(step, start: int, dtype=jnp.float32):
  """1.0 from optimizer step ``start`` on, else 0.0 (a loss term that starts later)."""
  return jnp.where(jnp.asarray(step) >= int(start), 1.0, 0.0).astype(dtype)


def _get(params: dict, path: str):
  node = params
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise KeyError(f"no parameter {path!r} (at {key!r})")
    node = node[key]
  return node


def _set(params: dict, path: str, value) -> dict:
  head, _, rest = path.partition("/")
  out = dict(params)
  out[head] = _set(params[head], rest, value) if rest else value
  return out


def layer_grads(terms_fn: Callable[[dict], Any], params: dict, path: str,
                has_aux: bool = False) -> tuple:
  """``(terms, grads)`` (``(terms, grads, aux)`` with ``has_aux``): ``terms =
  terms_fn(params)``, a tuple of scalars (``(terms, aux)`` with ``has_aux``), and for each
  term its gradient w.r.t. the parameter at ``path``, gradient-stopped (a weight computed
  from them is a constant to the outer differentiation). One forward pass serves all.

  >>> (rec, gan), (g_rec, g_gan) = layer_grads(lambda p: (rec_loss(p), gan_loss(p)),
  ...                                          params, "decoder/conv_out/kernel")
  """
  w = _get(params, path)
  f = lambda v: terms_fn(_set(params, path, v))
  if has_aux:
    terms, vjp, aux = jax.vjp(lambda v: _pair(f(v)), w, has_aux=True)
  else:
    terms, vjp = jax.vjp(lambda v: tuple(f(v)), w)
  grads = []
  for i in range(len(terms)):
    cot = tuple(jnp.ones_like(t) if j == i else jnp.zeros_like(t) for j, t in enumerate(terms))
    grads.append(jax.lax.stop_gradient(vjp(cot)[0]))
  return (terms, tuple(grads), aux) if has_aux else (terms, tuple(grads))


def _pair(out):
  terms, aux = out
  return tuple(terms), aux


def adaptive_weight(grad_rec, grad_gan, max_weight: float = 1e4, eps: float = 1e-4):
  """VQGAN's balance of the GAN term: ``|g_rec| / (|g_gan| + eps)`` clipped to
  ``[0, max_weight]`` and gradient-stopped (gradients at the decoder's last layer)."""
  w = jnp.linalg.norm(grad_rec.astype(jnp.float32)) / (
      jnp.linalg.norm(grad_gan.astype(jnp.float32)) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))

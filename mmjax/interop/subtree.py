"""Fill one parameter group of a larger model from a transformers / diffusers directory.

Systems compose pretrained parts (an MLLM, a DiT, an autoencoder, a vision tower) with new
parameters (queries, connectors, projectors). ``load_into`` replaces every leaf of one group
of the (boxed or plain) init params with the checkpoint's tensor, streamed like ``load_hf``:
each leaf is built from its reference tensor(s) read one at a time (``reader.Checkpoint``:
plain reads, nothing memory-mapped, never the whole checkpoint in host memory) and each
device receives only its own shard.

* Inside a trace (a system's ``init`` under ``jax.jit(init, out_shardings=...)``): every
  leaf is a host callback. With a mesh installed (``jax.set_mesh``, as
  ``parallel.rules.with_rules(rules, mesh)`` does) the callback runs per device inside
  ``shard_map`` and returns that device's shard of the leaf's ``NamedSharding`` (its logical
  names through the installed rules): no device gathers or scatters a whole tensor. A host
  builds the pieces its devices need in one pass over the reference tensors and hands them
  out; pieces not yet taken are kept up to ``KEEP_BYTES`` (or the newest leaf's, if larger;
  a device that comes late for a dropped piece builds it again). Under ``jax.eval_shape`` (AOT,
  abstract state) nothing is read: the directory need not exist.
* Called eagerly (leaves are arrays or ``ShapeDtypeStruct``s): each leaf is placed with
  ``jax.make_array_from_callback`` on its own sharding (or the logical one, with a mesh
  installed), as ``load_hf`` does.
* Checkpoint tensors the group does not use (an LM head, SigLIP's pooling head, a vision
  tower for text-to-image) are ignored; group parameters missing from the checkpoint and
  mis-shaped ones are one ``CheckpointMismatchError`` naming the directory and every one
  (a checkpoint that does not fit its own family is ``load_hf``'s error).

Example::

    params["mllm"] = load_into(params["mllm"], "hf", "/ckpt/llava-ov-0.5b", scan_layers=True)
"""
from __future__ import annotations

import collections
import os
import threading

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.interop import dispatch, hf
from mmjax.interop.tables import expand

LOADERS = dispatch.KINDS
KEEP_BYTES = 32 << 20   # pieces kept for this host's other devices (or the newest leaf's)


def flat(tree) -> dict:
  """``{'a/b/c': leaf}`` of a nested dict."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _nbytes(key: tuple, dtype) -> int:
  return int(np.prod([b - a for a, b in key], dtype=np.int64)) * np.dtype(dtype).itemsize


class Source:
  """One directory read lazily for parameter groups: the family's table, our parameter
  shapes, and per-leaf shard builds (thread-safe: device callbacks may call concurrently)."""

  def __init__(self, kind: str, path: str, overrides: tuple):
    kind, family, ref = dispatch.resolve(path, kind)
    cfg = family.from_hf_config(ref, **dict(overrides))
    self.path, self.family, self.cfg = path, family, cfg
    self.ckpt = dispatch.open_checkpoint(kind, path, family, cfg)
    shapes, _ = hf.abstract_params(family, cfg)
    self.shapes = {k: tuple(v.shape) for k, v in shapes.items()}
    entries = expand(family.table(cfg), self.shapes)
    hf.check_checkpoint(family, cfg, self.ckpt, entries, self.shapes)
    self.entries = collections.defaultdict(list)
    for e in entries:
      self.entries[e.ours].append(e)
    self.lock = threading.Lock()
    self.pending = collections.OrderedDict()  # leaf id -> {index key: [piece, devices to serve]}
    self.served: dict = {}                    # leaf id -> {index key: devices served so far}
    self.checked: set = set()

  def check(self, group: tuple) -> None:
    """``group``: ``((name, shape), ...)``; one error naming every missing / mis-shaped."""
    if group in self.checked:
      return
    missing = [n for n, _ in group if n not in self.shapes]
    bad = [f"{n}: {self.shapes[n]} vs ours {tuple(s)}" for n, s in group
           if n in self.shapes and self.shapes[n] != tuple(s)]
    if missing or bad:
      raise hf.CheckpointMismatchError(
          f"{self.path}: {len(missing)} parameters missing {missing}; "
          f"{len(bad)} mis-shaped {bad}")
    self.checked.add(group)

  def build(self, name: str, shape, dtype, sharding):
    """The leaf as a ``jax.Array`` on ``sharding`` (None: the default device)."""
    with self.lock:
      out = hf.build_param(self.entries[name], shape, dtype, self.ckpt, sharding)
      self.ckpt.forget()
    return out

  def _make_room(self, leaf: tuple, new_bytes: int) -> None:
    """Drops the oldest other leaves' pieces until those kept plus ``new_bytes`` fit in
    ``max(KEEP_BYTES, new_bytes)``."""
    budget = max(KEEP_BYTES, new_bytes)
    held = {l: sum(b[0].nbytes for b in slot.values()) for l, slot in self.pending.items()}
    for other in list(self.pending):
      if sum(held.values()) + new_bytes <= budget:
        break
      if other != leaf:
        del self.pending[other]
        del held[other]

  def shard(self, leaf: tuple, key: tuple, keys: dict):
    """Numpy piece ``key`` of ``leaf`` = ``(name, shape, dtype)``; ``keys`` counts the
    devices of this host asking for each piece: all are built in one pass over the reference
    tensors on the first request and handed out (then dropped) one request at a time.

    Pieces waiting for other devices are kept up to ``KEEP_BYTES`` (or the newest leaf's
    pieces, if larger), oldest dropped first: a device that runs ahead of the others (or
    alone, when the runtime has fewer threads than devices) never piles up the pieces of
    many leaves; a device asking for a dropped piece builds it again. Nothing here waits for
    another device (a waiting callback can hold the thread a device needs)."""
    name, shape, dtype = leaf
    with self.lock:
      served = self.served.setdefault(leaf, collections.Counter())
      slot = self.pending.get(leaf)
      if slot is None or key not in slot:
        wanted = {k: n - served[k] for k, n in keys.items()
                  if n > served[k] and (slot is None or k not in slot)}
        wanted = wanted if key in wanted else {key: 1}
        self._make_room(leaf, sum(_nbytes(k, dtype) for k in wanted))
        bufs = hf.read_shards(self.entries[name], shape, dtype, self.ckpt, list(wanted))
        self.ckpt.forget()
        slot = self.pending.setdefault(leaf, {})
        slot.update({k: [bufs[k], n] for k, n in wanted.items()})
        self.pending.move_to_end(leaf)
      served[key] += 1
      if all(served[k] >= n for k, n in keys.items()):   # every device has its piece
        del self.served[leaf]
      held = slot[key]
      held[1] -= 1
      if held[1] <= 0:
        del slot[key]
        if not slot:
          del self.pending[leaf]
      return held[0]


_SOURCES: collections.OrderedDict = collections.OrderedDict()
_SOURCES_LOCK = threading.Lock()


def _stamp(path: str) -> tuple:
  try:
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                        for f in os.scandir(path) if f.is_file()))
  except OSError:
    return ()


def source(kind: str, path: str, overrides: tuple) -> Source:
  """The ``Source`` of a directory (headers and tables only): opened once per process and
  per version of its files, shared by every callback of a load."""
  key = (kind, path, overrides, _stamp(path))
  with _SOURCES_LOCK:
    if key not in _SOURCES:
      _SOURCES[key] = Source(kind, path, overrides)
      while len(_SOURCES) > 8:
        _SOURCES.popitem(last=False)
    return _SOURCES[key]


def _concrete_mesh():
  """The mesh installed with ``jax.set_mesh`` (also while tracing), or None."""
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    mesh = mesh_lib.get_concrete_mesh()
  except (ImportError, AttributeError):
    return None
  return None if mesh is None or mesh.empty else mesh


def _mesh_spec(box, ndim: int):
  """The mesh ``PartitionSpec`` of a boxed leaf (logical names through installed rules)."""
  if not _is_box(box):
    return P()
  spec = box.get_partition_spec()
  if isinstance(box, nn.LogicallyPartitioned):
    spec = nn.logical_to_mesh_axes(tuple(spec), box.rules)
  return P(*(tuple(spec) + (None,) * (ndim - len(spec))))


def _divides(shape, spec, mesh) -> bool:
  for size, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if any(a not in mesh.shape for a in axes):
      return False
    if size % int(np.prod([mesh.shape[a] for a in axes])):
      return False
  return True


def _traced_leaf(get, group, leaf, spec, mesh):
  """One leaf as a host callback: per device under ``shard_map`` when a mesh is installed
  and the leaf's spec divides it, else whole (XLA places it)."""
  name, shape, dtype = leaf
  full = tuple((0, n) for n in shape)

  def serve(key, keys):
    src = get()
    src.check(group)
    return src.shard(leaf, key, keys)

  if mesh is None or not _divides(shape, spec, mesh):
    return jax.pure_callback(lambda: serve(full, {full: 1}), jax.ShapeDtypeStruct(shape, dtype))
  sharding = NamedSharding(mesh, spec)
  keys = collections.Counter(hf.index_key(i, shape)
                             for i in sharding.addressable_devices_indices_map(shape).values())
  dims = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
  dims += [()] * (len(shape) - len(dims))
  used = [a for axes in dims for a in axes]
  local = sharding.shard_shape(shape)

  def on_device(*index):
    at = dict(zip(used, (int(i) for i in index)))
    key = []
    for n, piece, axes in zip(shape, local, dims):
      pos = 0
      for a in axes:   # major to minor
        pos = pos * mesh.shape[a] + at[a]
      key.append((pos * piece, pos * piece + piece))
    return serve(tuple(key), keys)

  def body():
    index = [jax.lax.axis_index(a) for a in used]
    return jax.pure_callback(on_device, jax.ShapeDtypeStruct(local, dtype), *index)

  return jax.shard_map(body, mesh=mesh, in_specs=(), out_specs=spec)()


def load_into(tree, kind: str, path: str, **overrides):
  """``tree`` (boxed or plain init params of one group, or ``ShapeDtypeStruct``s) with every
  leaf read from the ``kind`` ('hf' | 'diffusers') directory ``path``; ``overrides`` go to
  the family's ``from_hf_config`` (e.g. ``scan_layers``, ``num_layers``). Logical-
  partitioning boxes are kept; values are cast to each leaf's dtype."""
  if kind not in LOADERS:
    raise ValueError(f"checkpoint kind {kind!r} is not one of {LOADERS}")
  key = (kind, path, tuple(sorted(overrides.items())))
  boxes = flat(tree)                               # boxes stay whole (not dicts)
  ours = {n: nn.unbox(b) if _is_box(b) else b for n, b in boxes.items()}
  leaves = {n: (n, tuple(v.shape), np.dtype(v.dtype)) for n, v in ours.items()}
  group = tuple((n, s) for n, s, _ in leaves.values())
  mesh = _concrete_mesh()
  if any(isinstance(v, jax.core.Tracer) for v in ours.values()):
    values = {n: _traced_leaf(lambda: source(*key), group, leaves[n],
                              _mesh_spec(boxes[n], len(leaves[n][1])), mesh)
              for n in ours}
  else:
    src = source(*key)
    src.check(group)
    values = {}
    for n, v in ours.items():
      sharding = getattr(v, "sharding", None)
      if sharding is None and mesh is not None and _is_box(boxes[n]):
        sharding = NamedSharding(mesh, _mesh_spec(boxes[n], v.ndim))
      values[n] = src.build(n, leaves[n][1], leaves[n][2], sharding)
  return traverse_util.unflatten_dict({
      tuple(n.split("/")): boxes[n].replace_boxed(values[n]) if _is_box(boxes[n]) else values[n]
      for n in ours})

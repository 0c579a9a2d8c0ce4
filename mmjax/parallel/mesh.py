"""The device mesh: axis sizes from config (one ``-1`` auto-filled), ICI x DCN factors.

Every mesh in mmjax has the four named axes of ``mmjax.config.MESH_AXES``, in that order:
``('data', 'fsdp', 'tensor', 'context')``. ``config.mesh.<axis>`` is the size *within one
slice* (ICI); ``config.mesh.dcn_<axis>`` is how many slices that axis spans (DCN). The mesh
axis ``a`` has size ``ici[a] * dcn[a]``, slices outermost, so traffic over the slow network
only ever crosses slice boundaries along the axes given a DCN factor.

Example (8 virtual CPU devices)::

    import ml_collections
    from mmjax.parallel import mesh as pmesh
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1, context=1))
    pmesh.mesh_shape(cfg, 8)          # {'data': 4, 'fsdp': 2, 'tensor': 1, 'context': 1}
    mesh = pmesh.make_mesh(cfg)       # jax.sharding.Mesh over jax.devices()
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from mmjax.config import MESH_AXES


def _field(mesh_cfg: Any, name: str, default: int = 1) -> int:
  if isinstance(mesh_cfg, Mapping):   # a plain dict may leave sizes out (default 1)
    value = mesh_cfg.get(name, default)
  else:                               # a config defines every field (mmjax.config)
    value = getattr(mesh_cfg, name)
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise TypeError(f"mesh.{name} must be an int, got {value!r}")
  value = int(value)
  if value == 0 or value < -1:
    raise ValueError(f"mesh.{name} must be a positive int or -1, got {value}")
  return value


def _describe(prefix: str, sizes: dict[str, int]) -> str:
  return " x ".join(f"{prefix}{a}={n}" for a, n in sizes.items())


def _resolve(sizes: dict[str, int], total: int, prefix: str, what: str) -> dict[str, int]:
  """Fills at most one -1 so that the product of ``sizes`` equals ``total``."""
  auto = [a for a, n in sizes.items() if n == -1]
  if len(auto) > 1:
    raise ValueError(f"mesh {_describe(prefix, sizes)} has more than one -1 "
                     f"({', '.join(prefix + a for a in auto)}); at most one axis is auto-filled")
  known = math.prod(n for n in sizes.values() if n != -1)
  if auto:
    if total % known:
      raise ValueError(f"mesh {_describe(prefix, sizes)} = {known} does not divide "
                       f"{total} {what}")
    return {a: (total // known if n == -1 else n) for a, n in sizes.items()}
  if known != total:
    raise ValueError(f"mesh {_describe(prefix, sizes)} = {known} does not equal "
                     f"{total} {what}")
  return dict(sizes)


def ici_dcn_shapes(mesh_cfg: Any, num_devices: int,
                   num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
  """Per-axis ICI (within a slice) and DCN (across slices) sizes, each with -1 resolved.

  >>> ici_dcn_shapes(dict(data=-1, fsdp=2, dcn_data=2), 16, num_slices=2)[0]['data']
  4
  """
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} equal slices")
  dcn = _resolve({a: _field(mesh_cfg, "dcn_" + a) for a in MESH_AXES}, num_slices,
                 "dcn_", "slices")
  ici = _resolve({a: _field(mesh_cfg, a) for a in MESH_AXES}, num_devices // num_slices,
                 "", "devices" + (" per slice" if num_slices > 1 else ""))
  return ici, dcn


def mesh_shape(mesh_cfg: Any, num_devices: int, num_slices: int = 1) -> dict[str, int]:
  """Total size of each mesh axis (ICI x DCN), in ``MESH_AXES`` order.

  Raises ``ValueError`` naming the sizes when they cannot tile the devices:

  >>> mesh_shape(dict(data=3, fsdp=1, tensor=2, context=1), 8)
  Traceback (most recent call last):
  ValueError: mesh data=3 x fsdp=1 x tensor=2 x context=1 = 6 does not equal 8 devices
  """
  ici, dcn = ici_dcn_shapes(mesh_cfg, num_devices, num_slices)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def num_slices_of(devices: Sequence[Any]) -> int:
  """Number of distinct TPU slices among ``devices`` (1 where devices carry no slice index)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def _reshape_hybrid(devices: Sequence[Any], ici: dict[str, int],
                    dcn: dict[str, int]) -> np.ndarray:
  """Plain reshape with slices outermost on each axis (CPU, virtual or odd devices)."""
  n = len(MESH_AXES)
  grid = np.asarray(devices, dtype=object).reshape(
      [dcn[a] for a in MESH_AXES] + [ici[a] for a in MESH_AXES])
  # interleave (dcn_a, ici_a) per axis, then merge each pair into one axis.
  grid = grid.transpose([j for i in range(n) for j in (i, n + i)])
  return grid.reshape([dcn[a] * ici[a] for a in MESH_AXES])


def device_grid(mesh_cfg: Any, devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as a ``[data, fsdp, tensor, context]`` array for ``Mesh``.

  Uses the topology-aware ``mesh_utils`` layouts on TPU; falls back to a plain reshape
  where those do not apply (CPU/virtual devices, shapes that split a physical axis).
  """
  devices = list(devices)
  detected = num_slices_of(devices)
  if detected > 1:
    slices = detected
  else:  # one physical slice: DCN factors, if any, split it into virtual slices
    slices = math.prod(max(_field(mesh_cfg, "dcn_" + a), 1) for a in MESH_AXES)
  ici, dcn = ici_dcn_shapes(mesh_cfg, len(devices), slices)
  ici_shape = [ici[a] for a in MESH_AXES]
  dcn_shape = [dcn[a] for a in MESH_AXES]
  if devices[0].platform != "tpu":
    return _reshape_hybrid(devices, ici, dcn)
  try:
    if detected > 1:
      return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                  allow_split_physical_axes=True)
    if slices == 1:
      return mesh_utils.create_device_mesh(ici_shape, devices,
                                           allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.warning("mesh_utils could not lay out %s over the TPU topology (%s); "
                    "using a plain reshape of the device list", ici_shape, e)
  return _reshape_hybrid(devices, ici, dcn)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A ``Mesh`` with axes ``('data', 'fsdp', 'tensor', 'context')`` over ``devices``.

  ``devices`` defaults to ``jax.devices()``; pass a topology's devices to build a mesh for
  AOT compilation (see ``mmjax.train.aot``).

  >>> make_mesh(dict(data=-1, fsdp=1, tensor=1, context=1)).axis_names
  ('data', 'fsdp', 'tensor', 'context')
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(device_grid(mesh_cfg, devices), MESH_AXES)

"""Compile the real train step for a TPU pod on this (CPU) machine, and say if it fits.

With ``libtpu`` installed, ``jax.experimental.topologies`` describes any TPU slice
(``v5p:4x4x4``) as compile-only devices. We build the mesh over them, the abstract train
state and batch (``ShapeDtypeStruct``s carrying their shardings; nothing is allocated),
lower and compile the same jitted step ``launch/tpu.py`` runs, and read XLA's per-chip
memory and cost analyses. The command line is ``launch/aot.py``. The tool lives in
``train/`` because it builds a system's (``mmjax.systems.base``) train state and step
(``mmjax.train``); nothing below ``train/`` imports it.

Example::

    from mmjax import config as mcfg
    from mmjax.train import aot
    cfg = mcfg.load("configs/captioner.py", ["--config.mesh.fsdp=-1", "--config.mesh.data=1"])
    report = aot.aot_report(cfg, "v5p:2x2x1")
    print(aot.format_report(report))   # memory per chip vs HBM, sharding, flops, MFU
    report["memory"]["fits"]
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax

from mmjax.parallel import mesh as pmesh
from mmjax.parallel import rules as prules
from mmjax.parallel import sharding as psharding
from mmjax.train import flops as flops_lib

GiB = 1 << 30

# HBM per chip, matched by lower-cased substring of device_kind (first entry wins).
HBM_BYTES = (
    ("v6 lite", 32 * GiB),   # v6e (Trillium)
    ("v5 lite", 16 * GiB),   # v5e
    ("v5", 95 * GiB),        # v5p reports "TPU v5"
    ("v4", 32 * GiB),
)

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


def hbm_bytes(device_kind: str) -> int | None:
  """HBM of one chip of ``device_kind`` (None if unknown).

  >>> hbm_bytes("TPU v5 lite") // GiB
  16
  """
  kind = device_kind.lower()
  for key, nbytes in HBM_BYTES:
    if key in kind:
      return nbytes
  return None


def _compile_only_env(generation: str, chips: int) -> None:
  """Environment for libtpu as a compiler only (read when the plugin loads; kept if set).

  No metadata-server or pod-host lookups (the accelerator type only silences that lookup,
  it does not change the compile; v4/v5p names count two TensorCores per chip), and no
  exclusive ``/tmp/libtpu_lockfile``, which any other jax process on the machine may hold.
  """
  accelerator = {"v5e": "v5litepod", "v6e": "v6e"}.get(generation, generation)
  cores = chips * (2 if generation in ("v4", "v5p") else 1)
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", f"{accelerator}-{cores}"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology such as ``'v5p:4x4x4'`` or ``'v5e:2x2'``.

  Names are ``<generation>:<chips per dimension>``: ``v4`` and ``v5p`` are 3-D tori
  (``v4:2x2x1``, ``v5p:4x4x8``), ``v5e`` and ``v6e`` 2-D (``v5e:4x4``, ``v6e:8x16``). One
  device per chip (v4 in megacore mode). ``num_slices > 1`` gives a multi-slice system whose
  devices carry ``slice_index`` (use ``config.mesh.dcn_*``).
  """
  from jax.experimental import topologies
  if not _TOPOLOGY.match(topology):
    raise ValueError(f"topology {topology!r} should look like v5p:4x4x4, v4:2x2x1, "
                     f"v5e:2x2 or v6e:4x4")
  generation, dims = topology.split(":")
  chips = math.prod(int(d) for d in dims.split("x"))
  _compile_only_env(generation, chips)
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  if generation == "v4":
    kwargs["chip_config_name"] = "megacore"
  try:
    return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError("AOT compilation needs libtpu: pip install 'jax[tpu]=="
                         f"{jax.__version__}'") from e
    raise


def abstract_batch(system: Any, batch_size: int, shardings: dict) -> dict:
  """``ShapeDtypeStruct``s of one global batch, with their shardings."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
          for k, v in system.dummy_batch(batch_size).items()}


def memory_report(compiled: Any, hbm: int | None) -> dict:
  """Per-chip bytes from ``compiled.memory_analysis()``, and whether they fit ``hbm``.

  ``total`` = arguments + outputs - aliased (donated state) + temporaries + generated code;
  the fit is judged on the larger of ``total`` and XLA's ``peak`` (when it reports one).
  """
  m = compiled.memory_analysis()
  out = {
      "arguments": int(m.argument_size_in_bytes),
      "outputs": int(m.output_size_in_bytes),
      "aliased": int(m.alias_size_in_bytes),
      "temporaries": int(m.temp_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["generated_code"])
  out["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  needed = max(out["total"], out["peak"])
  out["hbm"] = hbm
  out["fits"] = None if hbm is None else needed <= hbm
  out["over_by"] = None if hbm is None else max(needed - hbm, 0)
  return out


def _has_while_loops(compiled: Any) -> bool:
  try:
    return bool(re.search(r"\bwhile\(", compiled.as_text() or ""))
  except Exception:  # some backends cannot print the optimised HLO
    return False


def cost_report(compiled: Any) -> dict:
  """XLA's cost model for one step on one chip: flops, bytes accessed, estimated seconds.

  XLA counts a ``while`` loop's body once, not once per iteration: for a program with loops
  (``nn.scan`` over layers) the numbers are per layer, not per step, and
  ``loop_bodies_counted_once`` is True. Compile with ``scan_layers=False`` for a whole-step
  estimate (``aot_report(..., unrolled_cost=True)``).
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  def get(key):
    value = cost.get(key)
    return float(value) if value is not None and value >= 0 else None
  return {"flops_per_chip": get("flops"), "bytes_accessed_per_chip": get("bytes accessed"),
          "transcendentals_per_chip": get("transcendentals"),
          "estimated_seconds": get("optimal_seconds"),
          "loop_bodies_counted_once": _has_while_loops(compiled)}


def mfu_report(system: Any, config: Any, cost: dict, chips: int, device_kind: str) -> dict:
  """Implied MFU: model FLOPs / (chips x bf16 peak x XLA's estimated step time).

  Model FLOPs are the system's analytic count when it has one, else XLA's flops x chips.
  """
  analytic = system.flops_per_step(int(config.data.batch_size))
  source = "analytic" if analytic else "xla"
  model_flops = analytic or ((cost["flops_per_chip"] or 0.0) * chips) or None
  peak = (float(config.device_peak_flops) if config.get("device_peak_flops", 0) > 0
          else flops_lib.lookup_peak(device_kind, "bfloat16"))
  seconds = cost["estimated_seconds"]
  note = ""
  if cost.get("loop_bodies_counted_once"):
    seconds, note = None, ("XLA's estimate covers one loop iteration (scanned layers); "
                           "use --unrolled_cost for a step-time estimate")
  elif not seconds:
    note = "XLA gave no step-time estimate for this program"
  mfu = (model_flops / (chips * peak * seconds)
         if model_flops and peak and seconds else None)
  return {"model_flops_per_step": model_flops, "model_flops_source": source,
          "peak_flops_per_chip": peak, "implied_mfu": mfu, "note": note}


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OOM_PATTERNS = (  # XLA:TPU's wordings of "does not fit"
    re.compile(r"required for .*?\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)"),
    re.compile(r"Used " + _SIZE + r" of " + _SIZE + r" hbm"),
)


def parse_oom(message: str) -> tuple[int, int] | None:
  """``(needed, available)`` bytes from XLA's out-of-HBM compile error, if it says.

  >>> parse_oom("Ran out of memory on HBM, the total memory required for HLO temporaries "
  ...           "(19.89G) exceeds available HBM (15.75G).")
  (21356724879, 16911433728)
  """
  scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  for pattern in _OOM_PATTERNS:
    hit = pattern.search(message)
    if hit:
      a, ua, b, ub = hit.groups()
      return int(float(a) * scale[ua]), int(float(b) * scale[ub])
  return None


def oom_memory_report(error: Exception, hbm: int | None) -> dict:
  """The memory section when XLA refused to compile for lack of HBM."""
  message = str(error)
  parsed = parse_oom(message)
  needed, available = parsed if parsed else (None, hbm)
  return {"fits": False, "compile_error": message.strip().splitlines()[0][:500],
          "total": needed, "hbm": hbm, "xla_available": available,
          "over_by": None if needed is None else needed - (available or hbm or 0)}


# XLA:TPU's cost model gives -1 s for each op it offloads to a SparseCore (v5p, v6e: the
# scatter-adds of embedding and gather gradients), so a program with such ops gets a
# negative ``optimal_seconds``. Cost compiles (``launch/aot.py --estimate``) keep them on the
# TensorCore with these options.
NO_SPARSECORE_OFFLOAD = {"xla_tpu_enable_offloading_scatter_to_sparsecore": "DISABLED",
                         "xla_tpu_enable_offloading_gather_to_sparsecore": False,
                         "xla_tpu_enable_offloading_sort_to_sparsecore": False}


def compile_train_step(config: Any, devices: Sequence[Any],
                       compiler_options: dict | None = None) -> dict:
  """Lowers and compiles the train step over ``devices``; returns the pieces for a report.

  ``compiled`` is None and ``error`` set when XLA runs out of HBM while compiling.
  """
  from mmjax.systems.base import get_system
  from mmjax.train.state import abstract_train_state
  from mmjax.train.step import build_train_step

  mesh = pmesh.make_mesh(config.mesh, devices)
  rules = prules.logical_rules(config)
  system = get_system(config)
  abstract, shardings, optimizer = abstract_train_state(system, config, mesh, rules)
  batch_shardings = psharding.batch_sharding(mesh, rules, system.batch_axes)
  batch = abstract_batch(system, int(config.data.batch_size), batch_shardings)
  step = build_train_step(system, optimizer, mesh, rules, shardings, batch_shardings)
  lowered = step.lower(abstract, batch)
  compiled, error = None, None
  try:
    compiled = lowered.compile(compiler_options=compiler_options or None)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    error = e
  return {"mesh": mesh, "system": system, "state": abstract, "compiled": compiled,
          "error": error}


def unrolled(config: Any) -> Any:
  """A copy with every ``scan_layers`` field (nested configs too) False."""
  config = config.copy_and_resolve_references()

  def walk(node):
    for key in list(node.keys()):
      value = node[key]
      if key == "scan_layers" and isinstance(value, bool):
        node[key] = False
      elif hasattr(value, "keys"):
        walk(value)
  walk(config)
  return config


def aot_report(config: Any, topology: str, num_slices: int = 1,
               unrolled_cost: bool = False) -> dict:
  """Compiles ``config``'s train step for ``topology``; the JSON-ready report.

  Memory always comes from the program as configured. ``unrolled_cost=True`` compiles a
  second time with ``scan_layers=False`` for XLA's flops and step-time estimate (slower to
  compile; see ``cost_report``).
  """
  devices = topology_devices(topology, num_slices)
  kind = devices[0].device_kind
  built = compile_train_step(config, devices)
  warn = int(config.get("unsharded_warn_bytes", 1 << 20))
  state, compiled = built["state"], built["compiled"]
  hbm = hbm_bytes(kind)
  if compiled is None:
    memory = oom_memory_report(built["error"], hbm)
    cost = {"flops_per_chip": None, "bytes_accessed_per_chip": None,
            "transcendentals_per_chip": None, "estimated_seconds": None,
            "loop_bodies_counted_once": False}
  else:
    memory, cost = memory_report(compiled, hbm), cost_report(compiled)
    if unrolled_cost and config.scan_layers:
      whole = compile_train_step(unrolled(config), devices)["compiled"]
      if whole is not None:
        cost = dict(cost_report(whole), from_unrolled_layers=True)
  return {
      "topology": topology,
      "num_slices": num_slices,
      "device_kind": kind,
      "chips": len(devices),
      "mesh": {k: int(v) for k, v in built["mesh"].shape.items()},
      "global_batch": int(config.data.batch_size),
      "memory": memory,
      "params": psharding.param_report(state.params, warn_bytes=warn),
      "optimizer_state": psharding.param_report(state.opt_state, warn_bytes=warn),
      "cost": cost,
      "mfu": mfu_report(built["system"], config, cost, len(devices), kind),
  }


def _gib(n: float | None) -> str:
  return "?" if n is None else psharding.human_bytes(n)


def format_report(r: dict) -> str:
  """The report as a few readable lines (what ``launch/aot.py`` prints)."""
  m, c, f = r["memory"], r["cost"], r["mfu"]
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"{r['topology']} ({r['device_kind']}): {r['chips']} chips"
           + (f" in {r['num_slices']} slices" if r["num_slices"] > 1 else "")
           + f", mesh {mesh}, global batch {r['global_batch']}"]
  if "compile_error" in m:
    lines.append(f"XLA could not compile the step: {m['compile_error']}")
  else:
    lines.append(
        f"memory per chip: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
        f"(aliased {_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}, "
        f"code {_gib(m['generated_code'])} -> total {_gib(m['total'])} "
        f"(XLA peak {_gib(m['peak'])}) of {_gib(m['hbm'])} HBM")
  lines += [
      psharding.format_report(r["params"]),
      f"optimizer state per chip: {_gib(r['optimizer_state']['per_device_bytes'])}, "
      f"sharded {100 * r['optimizer_state']['sharded_fraction']:.1f}% of bytes"]
  if c["flops_per_chip"] is not None:
    lines.append(
        f"XLA cost per chip{' (per loop iteration)' if c['loop_bodies_counted_once'] else ''}"
        + (" (layers unrolled)" if c.get("from_unrolled_layers") else "")
        + f": {c['flops_per_chip']:.4g} flops, {c['bytes_accessed_per_chip'] or 0:.4g} bytes "
        "accessed, estimated step "
        + (f"{c['estimated_seconds']:.4g} s" if c["estimated_seconds"] else "? (no estimate)"))
  if f["implied_mfu"] is not None:
    lines.append(f"implied MFU {100 * f['implied_mfu']:.3g}% ({f['model_flops_source']} "
                 f"{f['model_flops_per_step']:.4g} flops/step, peak "
                 f"{f['peak_flops_per_chip']:.4g} flop/s per chip)")
  elif f.get("note"):
    lines.append(f"implied MFU: ? ({f['note']})")
  if m["fits"] is False:
    lines.append(f"DOES NOT FIT: needs {_gib(m['total'])} per chip, HBM is {_gib(m['hbm'])}"
                 + (f" ({_gib(m['xla_available'])} usable)" if m.get("xla_available") else "")
                 + f": over by {_gib(m['over_by'])}")
  elif m["fits"]:
    lines.append(f"fits: {_gib(m['hbm'] - max(m['total'], m['peak']))} of HBM to spare")
  return "\n".join(lines)

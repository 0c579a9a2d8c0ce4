"""Compile a config's train step for a TPU pod on this machine: does it fit, how fast?

  python launch/aot.py --config configs/captioner.py --topology v5p:4x4x4
  python launch/aot.py --config configs/captioner.py --topology v5e:4x4 \\
      --config.mesh.fsdp=-1 --config.mesh.data=1 --out /tmp/aot.json
  python launch/aot.py --config configs/X.py --topology v5p:4x4x4 --num_slices 2 \\
      --config.mesh.dcn_data=2
  python launch/aot.py --config configs/lavida.py:stage2 --topology v5p:4x4x4 \\
      --config.model.init=random --config.mesh.fsdp=-1 --config.mesh.data=1 \\
      --estimate --attention_impl splash

Needs ``libtpu`` (``pip install 'jax[tpu]'``), not a TPU. Prints per-chip memory against HBM,
how much of the parameters is sharded, XLA's flops and estimated step time, and the implied
MFU; writes the same as JSON with ``--out``. Exits 1 when the step does not fit in HBM.

**Step time of a scanned model (``--estimate``).** XLA's cost model counts a ``while`` loop's
body once, so the program as configured (layers under ``nn.scan``) gives per-layer numbers,
and unrolling a full-size model makes one enormous program (MetaQuery-B unrolled did not
compile in 55 minutes). ``--estimate`` compiles the train step with every layer stack
unrolled (``scan_layers=False``) at two small depths and extrapolates linearly in the
number of layers: with ``k`` stacks (``STACKS``: e.g. MetaQuery's MLLM, connector and DiT)
it compiles once with every stack at depth ``d1`` (cost ``C0``) and once per stack with
that stack at ``d2`` (cost ``C_i``); the estimate is ``C0 + sum_i (C_i - C0) / (d2 - d1) x
(L_i - d1)``, for flops, bytes accessed and seconds alike (``k + 1`` small compiles; layers
are identical, so the cost is affine in each stack's depth; the step's other parts sit in
``C0``). Depths are ``--depths d1,d2`` (default 3,4: XLA:TPU costs the first two layers of a stack
unlike the rest (measured: 21.5 and 15.8 us vs 19.6 us per layer from the third on, on a
small decoder), so the line starts at depth 3; a stack may need others, e.g. the
DualToken tower, tapped at layer 6, uses 8,10); a stack of ``L <= d2`` layers is compiled
at full depth. Other loops are removed for the cost compiles where a config can
(``COST_OVERRIDES``: the RVQ's chunked code search runs unchunked, same flops), and the
report says if any remain. ``--check_unrolled`` also compiles the whole model unrolled and
prints the estimate's error against it (``bench/aot_estimate.py`` on a mid-size config).

The seconds are XLA:TPU's own cost-model estimate of the compiled program
(``cost_analysis()['optimal_seconds']``, present for TPU targets). MFU is *our* analytic
FLOPs of the full step (``mmjax.train.flops``, each system's ``flops_per_step``) / (chips x
bf16 peak x estimated seconds); ``hardware flops utilisation`` is the same with XLA's
counted flops (which include the recomputation of rematerialised layers).

``--attention_impl splash`` traces every softmax attention with the TPU splash-attention
kernel (``mmjax/core/tpu_attention.py``) instead of the XLA einsum path.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import time
from fractions import Fraction
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


Stack = collections.namedtuple("Stack", "name path tied depths", defaults=((), None))
Stack.__doc__ = """A layer stack whose depth the estimate varies: ``path`` (a dotted config
path; ``a|b``: the first that exists) holds its number of layers; ``tied`` paths move with it
(keeping their offset: the DualToken tower's ``num_hidden_layers`` = ``semantic_layer`` + 1);
``depths`` overrides ``--depths`` (a tower tapped at layer 6 cannot run 2 layers)."""


# The layer stacks of each system (config.system), as the paper configs spell them.
_TOWER = ("model.semantic_layer", ("model.vision_config.num_hidden_layers",), (8, 10))
STACKS = {
    "captioner": (Stack("decoder", "model.num_layers"),),
    "metaquery": (Stack("mllm", "mllm.hf_config.text_config.num_hidden_layers"),
                  Stack("connector", "model.connector_layers"),
                  Stack("dit", "decoder.dit.num_layers")),
    "lavida": (Stack("llm", "model.llm_config.n_layers|model.llm_config.num_hidden_layers"),
               Stack("vision", "model.vision_config.num_hidden_layers")),
    "dualtoken": (Stack("tower", *_TOWER),),
    "dualtoken_unified": (
        Stack("lm", "model.lm_config.num_hidden_layers"),
        Stack("tokenizer tower", "tokenizer." + _TOWER[0], ("tokenizer." + _TOWER[1][0],),
              _TOWER[2])),
}
# Set in the cost compiles only (same flops, no loop XLA would count once).
COST_OVERRIDES = {
    "dualtoken": {"model.distance_chunk": 0},
    "dualtoken_unified": {"tokenizer.model.distance_chunk": 0},
}
COST_KEYS = ("flops_per_chip", "bytes_accessed_per_chip", "transcendentals_per_chip",
             "estimated_seconds")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="FILE[:preset], e.g. configs/metaquery.py")
  p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v4:2x2x1, v5e:4x4, v6e:8x8")
  p.add_argument("--num_slices", type=int, default=1, help="multi-slice (DCN) systems")
  p.add_argument("--estimate", action="store_true",
                 help="estimate the whole step's time, flops and MFU from unrolled compiles at "
                 "two small depths per layer stack, extrapolated linearly (see above)")
  p.add_argument("--depths", default="3,4", help="the two small depths of --estimate")
  p.add_argument("--stacks", default="",
                 help="layer stacks for --estimate instead of STACKS[system]: "
                 "'name=config.path,...'")
  p.add_argument("--per_stack", action="store_true",
                 help="--estimate with one compile per stack (k + 1 compiles; gives each "
                 "stack's cost per layer) instead of two compiles on one line")
  p.add_argument("--check_unrolled", action="store_true",
                 help="with --estimate: also compile the whole model unrolled and compare")
  p.add_argument("--no_memory", action="store_true",
                 help="skip the compile of the program as configured (memory, sharding)")
  p.add_argument("--unrolled_cost", action="store_true",
                 help="compile again with scan_layers=False for XLA's whole-step estimate "
                 "(slow for big models: prefer --estimate)")
  p.add_argument("--attention_impl", default="", choices=("", "xla", "splash"),
                 help="trace softmax attention with this impl ('splash': the TPU kernel)")
  p.add_argument("--out", default="", help="write the report as JSON here")
  p.add_argument("--cache", default="",
                 help="a JSON file keeping each finished compile's results: a rerun (or a "
                 "killed run) with the same config, topology and attention reuses them")
  args, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  return args, rest


# -- config surgery ------------------------------------------------------------------------

def _resolve(config: Any, path: str) -> str | None:
  """The first of ``a|b|...`` that names an existing field."""
  for option in path.split("|"):
    node, ok = config, True
    for part in option.split("."):
      if isinstance(node, dict) or hasattr(node, "keys"):
        if part not in node:
          ok = False
          break
        node = node[part]
      else:
        ok = False
        break
    if ok:
      return option
  return None


def get_field(config: Any, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def set_field(config: Any, path: str, value: Any) -> None:
  *parents, last = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def stacks_of(config: Any, spec: str = "") -> list[tuple[Stack, str, int]]:
  """``(stack, resolved path, full depth)`` of the stacks the estimate varies."""
  if spec:
    stacks = tuple(Stack(n.strip(), p.strip()) for n, p in
                   (item.split("=", 1) for item in spec.split(",") if item.strip()))
  else:
    system = config.system
    if system not in STACKS:
      raise SystemExit(f"--estimate: no layer stacks known for system {system!r}; name them "
                       "with --stacks 'name=config.path,...'")
    stacks = STACKS[system]
  out = []
  for stack in stacks:
    path = _resolve(config, stack.path)
    if path is None:
      raise SystemExit(f"--estimate: stack {stack.name!r}: no field {stack.path!r} in the "
                       "config")
    out.append((stack, path, int(get_field(config, path))))
  return out


def at_depths(config: Any, stacks: Sequence, depths: dict) -> Any:
  """``config`` unrolled, with ``depths[name]`` layers in each named stack."""
  from mmjax.train import aot
  config = aot.unrolled(config)
  for stack, path, full in stacks:
    d = depths.get(stack.name, full)
    for tied in stack.tied:
      tied_path = _resolve(config, tied)
      set_field(config, tied_path, int(get_field(config, tied_path)) + d - full)
    set_field(config, path, d)
  for path, value in COST_OVERRIDES.get(config.system, {}).items():
    if _resolve(config, path):
      set_field(config, path, value)
  return config


# -- the estimate --------------------------------------------------------------------------

CACHE = {"path": ""}   # --cache: a JSON file of finished compiles' results


def _cache_key(kind: str, config: Any, devices: Sequence) -> str:
  from mmjax.core import tpu_attention
  text = json.dumps([kind, "no SparseCore offload", config.to_json_best_effort(sort_keys=True),
                     devices[0].device_kind, len(devices),
                     sorted({getattr(d, "slice_index", 0) for d in devices}),
                     tpu_attention._DEFAULT.get()])
  return hashlib.sha256(text.encode()).hexdigest()


def cached(kind: str, config: Any, devices: Sequence, compute):
  """``compute()``, or its result from an earlier run with the same config, topology and
  attention override when ``CACHE['path']`` names a cache file (a killed run resumes)."""
  path = CACHE["path"]
  if not path:
    return compute()
  key = _cache_key(kind, config, devices)
  store = json.load(open(path)) if os.path.exists(path) else {}
  if key in store:
    return store[key]
  value = compute()
  store = json.load(open(path)) if os.path.exists(path) else {}
  store[key] = value
  with open(path + ".tmp", "w") as f:
    json.dump(store, f, default=str)
  os.replace(path + ".tmp", path)
  return value


def _cost(config: Any, devices: Sequence) -> dict:
  def compute():
    from mmjax.train import aot
    t0 = time.perf_counter()
    options = aot.NO_SPARSECORE_OFFLOAD if devices[0].platform == "tpu" else None
    compiled = aot.compile_train_step(config, devices, options)["compiled"]
    if compiled is None:
      raise SystemExit("--estimate: a small-depth compile ran out of HBM")
    cost = aot.cost_report(compiled)
    cost["compile_seconds"] = time.perf_counter() - t0
    return cost
  return cached("cost", config, devices, compute)


def line_depths(stacks: Sequence[tuple[str, int, int]], max_ratio: int = 8
                ) -> tuple[dict, dict, Fraction] | None:
  """Depths ``a``, ``b`` per stack ``(name, full depth L, least depth)`` with ``L - a =
  r (b - a)`` for one ratio ``r`` (1 <= r <= max_ratio), so the full model lies on the line
  through the two compiles: ``C(L) = C(a) + r (C(b) - C(a))``. Of the choices, the fewest
  layers compiled (sum of 2a + (b - a)); None if there is none.

  >>> a, b, r = line_depths([("x", 24, 2), ("y", 24, 2), ("z", 20, 2)])
  >>> a, b, r            # 24 - 3 = 7 x (6 - 3), 20 - 6 = 7 x (8 - 6)
  ({'x': 3, 'y': 3, 'z': 6}, {'x': 6, 'y': 6, 'z': 8}, Fraction(7, 1))
  """
  (name0, full0, least0), rest = stacks[0], stacks[1:]
  best = None
  for a0 in range(least0, full0):
    for span0 in range(1, full0 - a0 + 1):
      r = Fraction(full0 - a0, span0)
      if not 1 <= r <= max_ratio:
        continue
      a, b, layers = {name0: a0}, {name0: a0 + span0}, 2 * a0 + span0
      for name, full, least in rest:
        hit = next(((ai, (full - ai) / r) for ai in range(least, full)
                    if ((full - ai) / r).denominator == 1), None)
        if hit is None:
          break
        ai, span = hit[0], int(hit[1])
        a[name], b[name], layers = ai, ai + span, layers + 2 * ai + span
      else:
        if best is None or layers < best[0]:
          best = (layers, a, b, r)
  return None if best is None else best[1:]


def estimate_cost(config: Any, devices: Sequence, depths: tuple[int, int] = (3, 4),
                  stack_spec: str = "", log=print, method: str = "line") -> dict:
  """XLA's whole-step cost per chip, extrapolated from unrolled compiles at two small
  depths per stack (module docstring). ``method``: 'line' (two compiles, every stack
  deeper in the second, the full model on the line through them: ``line_depths``) or
  'per_stack' (one compile with every stack at ``d1``, one per stack at ``d2``; also gives
  each stack's cost per layer)."""
  stacks = stacks_of(config, stack_spec)
  varied, low, high = [], {}, {}
  for stack, path, full in stacks:
    d1, d2 = stack.depths or depths
    if full <= d2:           # small enough: compile it whole every time
      continue
    varied.append((stack, path, full))
    low[stack.name], high[stack.name] = d1, d2
  line = None
  if method == "line" and len(varied) > 1:
    line = line_depths([(s.name, full, low[s.name]) for s, _, full in varied])
  elif method not in ("line", "per_stack"):
    raise ValueError(f"estimate method {method!r}: 'line' or 'per_stack'")
  if line is not None:
    low, high, ratio = line
    runs = [dict(low), dict(high)]
  else:
    runs = [dict(low)] + [dict(low, **{s.name: high[s.name]}) for s, _, _ in varied]
  compiles = []
  for depths_i in runs:
    log(f"estimate: compiling unrolled at {depths_i or 'full depth'}")
    compiles.append(dict(depths=depths_i, **_cost(at_depths(config, stacks, depths_i),
                                                  devices)))
  base = compiles[0]

  def diff(cost, k, span):
    return None if base[k] is None or cost[k] is None else (cost[k] - base[k]) / span

  per_layer, total, split = {}, {}, {}
  if line is not None:
    for k in COST_KEYS:
      step = diff(compiles[1], k, 1)
      total[k] = None if step is None else base[k] + float(ratio) * step
  else:
    for (s, _, _), cost in zip(varied, compiles[1:]):
      per_layer[s.name] = {k: diff(cost, k, high[s.name] - low[s.name]) for k in COST_KEYS}
    for k in COST_KEYS:
      if base[k] is None or any(per_layer[s.name][k] is None for s, _, _ in varied):
        total[k] = None
        continue
      total[k] = base[k] + sum(per_layer[s.name][k] * (full - low[s.name])
                               for s, _, full in varied)
    if total["estimated_seconds"]:
      rest = total["estimated_seconds"]
      for s, _, full in varied:
        split[s.name] = per_layer[s.name]["estimated_seconds"] * full
        rest -= split[s.name]
      split["other"] = rest
  return {
      "method": ("unrolled compiles at two small depths per stack, linear in layers"
                 + (f" (both compiles on one line, ratio {ratio})" if line else "")),
      "seconds_by_part": split,
      "stacks": [{"name": s.name, "path": p, "layers": full,
                  "depths": [low.get(s.name, full), high.get(s.name, full)],
                  "per_layer": per_layer.get(s.name)} for s, p, full in stacks],
      "compiles": compiles,
      "loops_remaining": any(c["loop_bodies_counted_once"] for c in compiles),
      **total,
  }


def estimate_mfu(system: Any, config: Any, est: dict, chips: int, device_kind: str) -> dict:
  """Estimated MFU (analytic FLOPs) and hardware FLOPs utilisation (XLA's flops)."""
  from mmjax.train import flops as flops_lib
  analytic = system.flops_per_step(int(config.data.batch_size))
  peak = (float(config.device_peak_flops) if config.get("device_peak_flops", 0) > 0
          else flops_lib.lookup_peak(device_kind, "bfloat16"))
  seconds = est.get("estimated_seconds")
  ok = bool(seconds and peak)
  xla = est.get("flops_per_chip")
  return {
      "model_flops_per_step": analytic, "peak_flops_per_chip": peak,
      "estimated_seconds": seconds,
      "estimated_mfu": analytic / (chips * peak * seconds) if ok and analytic else None,
      "hardware_flops_utilisation": xla / (peak * seconds) if ok and xla else None,
      "xla_over_analytic_flops": xla * chips / analytic if xla and analytic else None,
  }


def check_unrolled(config: Any, devices: Sequence, est: dict) -> dict:
  """The whole model compiled unrolled, and the estimate's relative error against it."""
  from mmjax.train import aot
  overrides = COST_OVERRIDES.get(config.system, {})
  full = aot.unrolled(config)
  for path, value in overrides.items():
    if _resolve(full, path):
      set_field(full, path, value)
  cost = _cost(full, devices)
  error = {k: (None if not cost[k] or est[k] is None else est[k] / cost[k] - 1)
           for k in COST_KEYS}
  return {"unrolled": cost, "relative_error": error}


def format_estimate(est: dict, mfu: dict) -> str:
  lines = ["step estimate (" + est["method"] + "):"]
  peak = mfu["peak_flops_per_chip"]
  for s in est["stacks"]:
    pl = s["per_layer"]
    line = (f"  {s['name']}: {s['layers']} layers ({s['path']}), compiled at "
            f"{s['depths'][0]} and {s['depths'][1]}")
    if pl and pl["estimated_seconds"]:
      line += (f": {pl['flops_per_chip']:.4g} flops, {pl['estimated_seconds']:.4g} s per layer"
               f" per chip ({100 * pl['flops_per_chip'] / (peak * pl['estimated_seconds']):.0f}%"
               " of peak)" if peak else "")
    lines.append(line)
  split = est.get("seconds_by_part") or {}
  if split and est["estimated_seconds"]:
    lines.append("  time by part: " + ", ".join(
        f"{k} {100 * v / est['estimated_seconds']:.0f}%" for k, v in split.items()))
  secs = est["estimated_seconds"]
  lines.append(f"  per chip: {est['flops_per_chip'] or 0:.4g} flops, "
               f"{est['bytes_accessed_per_chip'] or 0:.4g} bytes accessed, step "
               + (f"{secs:.4g} s" if secs else "? (XLA gave no time)")
               + f" ({sum(c['compile_seconds'] for c in est['compiles']):.0f} s of compiles)")
  if est["loops_remaining"]:
    lines.append("  WARNING: loops remain in the unrolled programs; XLA counts their bodies "
                 "once, so the estimate is low")
  if mfu["estimated_mfu"] is not None:
    lines.append(f"  estimated MFU {100 * mfu['estimated_mfu']:.1f}% (analytic "
                 f"{mfu['model_flops_per_step']:.4g} flops/step, peak "
                 f"{mfu['peak_flops_per_chip']:.4g} flop/s per chip); hardware flops "
                 f"utilisation {100 * (mfu['hardware_flops_utilisation'] or 0):.1f}% (XLA "
                 f"counts {mfu['xla_over_analytic_flops'] or 0:.2f}x the analytic flops)")
  if "check" in est:
    e, u = est["check"]["relative_error"], est["check"]["unrolled"]
    lines.append(
        f"  check against the whole model unrolled ({u['compile_seconds']:.0f} s compile): "
        f"flops {u['flops_per_chip']:.4g} (estimate {100 * (e['flops_per_chip'] or 0):+.2f}%), "
        f"step {u['estimated_seconds'] or 0:.4g} s (estimate "
        f"{100 * (e['estimated_seconds'] or 0):+.2f}%), bytes "
        f"{100 * (e['bytes_accessed_per_chip'] or 0):+.2f}%")
  return "\n".join(lines)


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # TPU devices exist only as compile targets here: the host backend stays CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mmjax import config as config_lib
  from mmjax.core import tpu_attention
  from mmjax.systems.base import get_system
  from mmjax.train import aot
  cfg = config_lib.load(args.config, overrides)
  CACHE["path"] = args.cache
  depths = tuple(int(d) for d in args.depths.split(","))
  if len(depths) != 2 or not 0 < depths[0] < depths[1]:
    raise SystemExit(f"--depths {args.depths!r}: two increasing depths, e.g. 3,4")
  with tpu_attention.default_impl(args.attention_impl or None):
    devices = aot.topology_devices(args.topology, args.num_slices)
    if args.no_memory:
      report = {"topology": args.topology, "num_slices": args.num_slices,
                "device_kind": devices[0].device_kind, "chips": len(devices),
                "global_batch": int(cfg.data.batch_size)}
    else:
      report = cached("report" + ("+unrolled" if args.unrolled_cost else ""), cfg, devices,
                      lambda: json.loads(json.dumps(aot.aot_report(
                          cfg, args.topology, args.num_slices, args.unrolled_cost),
                          default=str)))
      print(aot.format_report(report))
    report["attention_impl"] = args.attention_impl or "as configured"
    if args.estimate:
      est = estimate_cost(cfg, devices, depths, args.stacks,
                          method="per_stack" if args.per_stack else "line")
      if args.check_unrolled:
        est["check"] = check_unrolled(cfg, devices, est)
      mfu = estimate_mfu(get_system(cfg), cfg, est, len(devices), devices[0].device_kind)
      report["estimate"], report["estimate_mfu"] = est, mfu
      print(format_estimate(est, mfu))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2, default=str)
  memory = report.get("memory")
  return 1 if memory and memory["fits"] is False else 0


if __name__ == "__main__":
  sys.exit(main())

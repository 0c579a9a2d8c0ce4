"""Check ``launch/aot.py --estimate`` (unrolled compiles at two small depths per layer stack,
extrapolated linearly) against compiling the whole model unrolled, on a mid-size config.

  python bench/aot_estimate.py                     # the default mid-size check below
  python bench/aot_estimate.py --config configs/captioner.py --topology v5p:2x2x1 \\
      --config.mesh.fsdp=-1 --config.mesh.data=1

Default: LaViDa's stage-2 step (two stacks: the LLaDA language model and the SigLIP tower)
at mid size -- an 8-layer LLaDA of width 2048 (16 heads, MLP 5632) and the
SigLIP-so400m tower cut to 8 layers, batch 16, single-view images -- on v5p:2x2x1. Prints,
per quantity (XLA's flops, bytes accessed and estimated step time per chip), the estimate,
the unrolled compile's value and the relative error, and each way's compile time; exits 1
when an error exceeds ``--tolerance`` (5%).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MID_LAVIDA = [
    "--config.model.init=random", "--config.mesh.fsdp=-1", "--config.mesh.data=1",
    "--config.data.batch_size=16", "--config.model.anyres=False",
    "--config.model.llm_config.n_layers=8", "--config.model.llm_config.d_model=2048",
    "--config.model.llm_config.n_heads=16", "--config.model.llm_config.n_kv_heads=16",
    "--config.model.llm_config.mlp_hidden_size=5632",
    "--config.model.vision_config.num_hidden_layers=8",
]


def _launcher():
  from launch import aot     # launch/ on the path: the repository root (a namespace package)
  return aot


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/lavida.py:stage2")
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--depths", default="3,4")
  p.add_argument("--attention_impl", default="", choices=("", "xla", "splash"))
  p.add_argument("--tolerance", type=float, default=0.05)
  args, overrides = p.parse_known_args(argv)
  if args.config == "configs/lavida.py:stage2" and not overrides:
    overrides = MID_LAVIDA
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  launch = _launcher()
  from mmjax import config as config_lib
  from mmjax.core import tpu_attention
  from mmjax.train import aot
  cfg = config_lib.load(args.config, overrides)
  depths = tuple(int(d) for d in args.depths.split(","))
  with tpu_attention.default_impl(args.attention_impl or None):
    devices = aot.topology_devices(args.topology)
    est = launch.estimate_cost(cfg, devices, depths)
    check = launch.check_unrolled(cfg, devices, est)
  unrolled = check["unrolled"]
  print(f"{args.config} on {args.topology} ({devices[0].device_kind}), stacks "
        + ", ".join(f"{s['name']} {s['layers']} layers (compiled at {s['depths'][0]}, "
                    f"{s['depths'][1]})" for s in est["stacks"]))
  print(f"{'per chip':<26}{'estimate':>14}{'unrolled':>14}{'error':>10}")
  worst = 0.0
  for key in launch.COST_KEYS:
    if est[key] is None or not unrolled[key]:
      continue
    err = check["relative_error"][key]
    worst = max(worst, abs(err)) if key != "transcendentals_per_chip" else worst
    print(f"{key:<26}{est[key]:>14.5g}{unrolled[key]:>14.5g}{100 * err:>9.2f}%")
  print(f"compile time: estimate {sum(c['compile_seconds'] for c in est['compiles']):.0f} s "
        f"({len(est['compiles'])} compiles), whole model unrolled "
        f"{unrolled['compile_seconds']:.0f} s")
  if est["loops_remaining"] or unrolled["loop_bodies_counted_once"]:
    print("WARNING: loops remain in the unrolled programs")
  ok = worst <= args.tolerance
  print(("OK" if ok else "FAIL") + f": largest error {100 * worst:.2f}% "
        f"(tolerance {100 * args.tolerance:.0f}%)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

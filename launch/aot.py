"""Compile a config's train step for a TPU pod on this machine: does it fit, how fast?

  python launch/aot.py --config configs/captioner.py --topology v5p:4x4x4
  python launch/aot.py --config configs/captioner.py --topology v5e:4x4 \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --out /tmp/aot.json
  python launch/aot.py --config configs/X.py --topology v5p:4x4x4 --num_slices 2 \
      --config.mesh.dcn_data=2

XLA's cost model counts a scanned layer once; ``--unrolled_cost`` compiles a second time with
``scan_layers=False`` for a whole-step time estimate and the implied MFU.
Needs ``libtpu`` (``pip install 'jax[tpu]'``), not a TPU. Prints per-chip memory against HBM,
how much of the parameters is sharded, XLA's flops and estimated step time, and the implied
MFU; writes the same as JSON with ``--out``. Exits 1 when the step does not fit in HBM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="FILE[:preset], e.g. configs/metaquery.py")
  p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v4:2x2x1, v5e:4x4, v6e:8x8")
  p.add_argument("--num_slices", type=int, default=1, help="multi-slice (DCN) systems")
  p.add_argument("--unrolled_cost", action="store_true",
                 help="compile again with scan_layers=False for XLA's step-time estimate "
                 "(XLA counts a scanned layer once)")
  p.add_argument("--out", default="", help="write the report as JSON here")
  args, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  return args, rest


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  # TPU devices exist only as compile targets here: the host backend stays CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mmjax import config as config_lib
  from mmjax.train import aot
  cfg = config_lib.load(args.config, overrides)
  report = aot.aot_report(cfg, args.topology, args.num_slices, args.unrolled_cost)
  print(aot.format_report(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  return 1 if report["memory"]["fits"] is False else 0


if __name__ == "__main__":
  sys.exit(main())

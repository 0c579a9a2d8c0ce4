"""Launch an mmjax job on this host (a laptop, a TPU VM, or every host of a pod).

  python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap
  python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap --mode sample
  python launch/tpu.py --config configs/X.py --workdir DIR --config.optim.lr=1e-4

On a pod run the same command on every host (``gcloud compute tpus tpu-vm ssh NAME
--worker=all --command=...``); multi-host JAX is initialised automatically when the
environment says there are several hosts (``--config.init_distributed=no`` skips it).
Modes: train (default; resumes from the latest checkpoint in WORKDIR), sample, eval, export.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="FILE[:preset], e.g. configs/metaquery.py:demo")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, samples")
  p.add_argument("--mode", default="train", choices=["train", "sample", "eval", "export"])
  args, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  return args, rest


def main(argv=None):
  """Runs the job; a library error (``mmjax.errors.MmjaxError``: a config field, preset or
  checkpoint that does not exist, ...) is printed as one line, exit code 2."""
  from mmjax.errors import MmjaxError
  try:
    _main(argv)
  except MmjaxError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def _main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from mmjax import config as config_lib
  cfg = config_lib.load(args.config, overrides)

  from mmjax.parallel import multihost
  multihost.maybe_initialize(cfg.init_distributed)

  from mmjax.systems.base import get_system
  from mmjax.train import loop
  system = get_system(cfg)
  os.makedirs(args.workdir, exist_ok=True)
  if args.mode == "train":
    result = loop.train(cfg, args.workdir, system=system)
    if result.preempted:  # SIGTERM: the checkpoint is saved; leave before anything else
      return
    # after training, run the system's own post-training modes (samples, eval) if it has any
    for mode in ("sample", "eval"):
      if mode in system.modes():
        loop.run_mode(cfg, args.workdir, system, mode)
  else:
    if args.mode not in system.modes():
      raise SystemExit(f"system {cfg.system!r} has no mode {args.mode!r} "
                       f"(it has: train, {', '.join(system.modes()) or 'nothing else'})")
    loop.run_mode(cfg, args.workdir, system, args.mode)


if __name__ == "__main__":
  main()

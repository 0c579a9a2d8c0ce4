"""Residual VQ throughput: mmjax.models.rvq vs vector-quantize-pytorch, plus search memory.

  python bench/rvq.py                                   # CPU-sized defaults (a few minutes)
  python bench/rvq.py --batches 4,16,64 --repeats 5     # bigger batches
  python bench/rvq.py --modes train,search              # also the search alone (eval mode)
  python bench/rvq.py --no_torch --mem_batches 256      # ours only; memory at batch 256

One training step of the quantiser on ``729 x batch`` vectors of dimension ``--dim`` (one
27x27 image grid per batch element): residual search over ``--depths`` depths of one shared
``--codebook`` x ``--dim`` codebook, then the EMA update (decay 0.99) with dead-code restart
(EMA count < 1). Ours: ``ResidualVQ.apply(update=True)`` jitted, the codebook state donated
and threaded through the steps. Theirs: ``vector_quantize_pytorch.ResidualVQ(dim,
num_quantizers, codebook_size, shared_codebook=True, decay=0.99, threshold_ema_dead_code=1,
kmeans_init=False)`` in training mode under ``torch.no_grad()`` (its EMA and code expiry run
inside the forward); its eval mode gives the search-only rows (``--modes search``). Neither
side computes gradients. Each row: median wall time of ``--repeats`` steps after one warm-up
step (repeats interleaved across rows and sides, so drift in machine speed hits every row
alike) and vectors per second.

Memory: XLA's compiled memory analysis (temporary bytes of the program, one device) of the
forward search (and of the training step with ``--mem_train``), with and without
``distance_chunk``, for the plain argmax search (``search_block=0``, what TPU / GPU use: a
[rows, K] fp32 score block per chunk) and the blocked search (``search_block=64``, the CPU
default). Nothing is run for these rows, so large ``--mem_batches`` cost only compile time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GRID = 729  # 27 x 27 positions per image


def _ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v.strip()]


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=_ints, default=[4, 8], help="images per step (x 729 vectors)")
  p.add_argument("--depths", type=int, default=8)
  p.add_argument("--codebook", type=int, default=16384)
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--chunk", type=int, default=8192, help="our distance_chunk (rows)")
  p.add_argument("--search_block", type=int, default=-1, help="our search_block (-1: auto)")
  p.add_argument("--mem_batches", type=_ints, default=[16, 256])
  p.add_argument("--mem_train", action="store_true", help="memory of the train step too")
  p.add_argument("--modes", default="train", help="train,search (search: quantise only)")
  p.add_argument("--no_torch", action="store_true", help="skip vector-quantize-pytorch")
  args = p.parse_args(argv)

  import jax
  import numpy as np
  from mmjax.models import rvq

  cfg = rvq.RVQConfig(depths=args.depths, codebook_size=args.codebook, dim=args.dim,
                      decay=0.99, dead_threshold=1.0, distance_chunk=args.chunk,
                      search_block=args.search_block)
  model = rvq.ResidualVQ(cfg)
  step = jax.jit(lambda v, x, k: model.apply(v, x, update=True, rng=k, mutable=[rvq.CODEBOOK]),
                 donate_argnums=0)
  data = {b: np.random.RandomState(b).standard_normal((b, GRID, args.dim)).astype(np.float32)
          for b in args.batches}

  search = jax.jit(model.apply)
  ours, theirs = {}, {}
  for b in args.batches:
    x = jax.device_put(data[b])
    state = {"v": jax.jit(model.init)(jax.random.key(0), x), "i": 0}
    keys = [jax.random.key(i) for i in range(args.repeats + 1)]

    def run_ours(x=x, state=state, keys=keys):
      out, state["v"] = step(state["v"], x, keys[state["i"]])
      state["i"] += 1
      jax.block_until_ready((out, state["v"]))

    def search_ours(x=x, state=state):
      jax.block_until_ready(search(state["v"], x))
    ours[("train", b)], ours[("search", b)] = run_ours, search_ours

  torch_version = package_version = None
  if not args.no_torch:
    import torch
    import vector_quantize_pytorch as vqp
    from importlib.metadata import version
    torch_version, package_version = torch.__version__, version("vector-quantize-pytorch")
    for b in args.batches:
      module = vqp.ResidualVQ(dim=args.dim, num_quantizers=args.depths,
                              codebook_size=args.codebook, shared_codebook=True, decay=0.99,
                              threshold_ema_dead_code=1, kmeans_init=False).train()
      xt = torch.from_numpy(data[b].copy())

      def run_theirs(module=module, xt=xt, train=True):
        module.train(train)
        with torch.no_grad():
          module(xt)
      theirs[("train", b)] = run_theirs
      theirs[("search", b)] = lambda f=run_theirs: f(train=False)

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores); "
        + (f"torch {torch_version} ({torch.get_num_threads()} threads), vector-quantize-"
           f"pytorch {package_version}" if torch_version else "torch skipped"), flush=True)
  print(f"shapes: {args.depths} depths x {args.codebook} codes x dim {args.dim}, shared "
        f"codebook, EMA 0.99, restart < 1; ours: distance_chunk {args.chunk}, search_block "
        f"{args.search_block}", flush=True)

  modes = [m for m in ("train", "search") if m in args.modes.split(",")]
  cases = ([("ours",) + k + (f,) for k, f in ours.items() if k[0] in modes]
           + [("torch",) + k + (f,) for k, f in theirs.items() if k[0] in modes])
  times = {c[:3]: [] for c in cases}
  for who, mode, b, f in cases:  # warm-up (compile; the first EMA step restarts most codes)
    t = time.perf_counter()
    f()
    print(f"  warm-up {who} {mode} batch {b}: {time.perf_counter() - t:.2f} s", flush=True)
  for _ in range(args.repeats):
    for who, mode, b, f in cases:
      t = time.perf_counter()
      f()
      times[(who, mode, b)].append(time.perf_counter() - t)

  print("\ntrain = quantise + EMA update + dead-code restart; search = quantise only (eval)")
  print("| step | batch | vectors | ours (s) | ours (vectors/s) | torch (s) | torch (vectors/s) "
        "| speed-up |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for mode in modes:
    for b in args.batches:
      n = b * GRID
      mo = statistics.median(times[("ours", mode, b)])
      row = f"| {mode} | {b} | {n:,} | {mo:.3f} | {n / mo:,.0f} |"
      if ("torch", mode, b) in times:
        mt = statistics.median(times[("torch", mode, b)])
        row += f" {mt:.3f} | {n / mt:,.0f} | {mt / mo:.1f}x |"
      else:
        row += " - | - | - |"
      print(row, flush=True)

  print("\nmemory (XLA compiled temporary bytes, one device):")
  print("| batch | vectors | search | distance_chunk | forward temp |"
        + (" train-step temp |" if args.mem_train else ""))
  print("|---:|---:|---|---:|---:|" + ("---:|" if args.mem_train else ""))
  for b in args.mem_batches:
    x = jax.ShapeDtypeStruct((b, GRID, args.dim), np.float32)
    for block in (0, 64):
      for chunk in (0, args.chunk):
        c = rvq.RVQConfig(depths=args.depths, codebook_size=args.codebook, dim=args.dim,
                          distance_chunk=chunk, search_block=block)
        m = rvq.ResidualVQ(c)
        v = jax.eval_shape(m.init, jax.random.key(0), x)
        fwd = jax.jit(m.apply).lower(v, x).compile().memory_analysis()
        name = "argmax" if block == 0 else f"blocks of {block}"
        row = (f"| {b} | {b * GRID:,} | {name} | {chunk or 'none'} | "
               f"{_mib(fwd.temp_size_in_bytes)} |")
        if args.mem_train:
          upd = jax.jit(lambda v, x, k, m=m: m.apply(v, x, update=True, rng=k,
                                                     mutable=[rvq.CODEBOOK])
                        ).lower(v, x, jax.random.key(0)).compile().memory_analysis()
          row += f" {_mib(upd.temp_size_in_bytes)} |"
        print(row, flush=True)


if __name__ == "__main__":
  main()

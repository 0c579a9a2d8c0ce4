"""Decoding speed of LaViDa's masked-diffusion sampler vs an autoregressive LM of the same size.

  python bench/lavida_decode.py                           # CPU-sized defaults
  python bench/lavida_decode.py --d_model 4096 --layers 32 --heads 32 --mlp 12288 \
      --vocab 126464 --prompt 1136 --gen 256 --block 32 --batch 8 --dtype bfloat16   # LaViDa-L

One process, one random-weight model size: a LLaDA ``DecoderLM`` (bidirectional, Prefix-DLM
mask) decoded by ``diffusion.masked.sampler.generate`` at NFE 100 / 50 / 25 % (steps = gen,
gen/2, gen/4) with cache none / prefix / dual, plus confidence-threshold decoding; and a
Qwen2 ``DecoderLM`` with the same width, depth, heads, MLP and vocabulary (causal, q/k/v
biases) decoded greedily with its KV cache (``models.lm.greedy_generate``). The prompt stands
for LaViDa's image + text prompt (``--prompt`` tokens); vision encoding is excluded (both
sides would pay it once). Each row: median wall time of ``--repeats`` calls after a compile
call (the repeats interleaved across rows, so drift in machine speed hits every row alike),
output tokens per second (batch x gen / time), model calls (NFE) and the speed relative
to the autoregressive decoder. Random weights make the threshold row's NFE meaningless for
quality (a trained model commits several tokens per step); it is reported as measured.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp", type=int, default=768)
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens (image + text)")
  p.add_argument("--gen", type=int, default=64, help="answer tokens")
  p.add_argument("--block", type=int, default=16, help="block_length (semi-AR blocks)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from mmjax import core
  from mmjax.diffusion.masked.denoiser import DiffusionLM
  from mmjax.diffusion.masked.sampler import generate
  from mmjax.models.lm import DecoderLM, LMConfig, greedy_generate

  dtype = jnp.dtype(args.dtype)
  stack = core.TransformerConfig(num_layers=args.layers, d_model=args.d_model,
                                 num_heads=args.heads, mlp_dim=args.mlp, dtype=dtype,
                                 rope_theta=500000.0)
  llada = DecoderLM(LMConfig(family="llada", vocab_size=args.vocab, stack=stack,
                             attention="bidirectional"))
  qwen = DecoderLM(LMConfig(family="qwen2", vocab_size=args.vocab,
                            stack=stack.replace(qkv_bias=True, rope_theta=1e6)))
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 0, args.vocab - 1)
  mask = jnp.ones(ids.shape, bool)
  mask_id = args.vocab - 1
  lm = DiffusionLM(llada, llada.init(jax.random.key(0), ids[:, :8])["params"], prefix_dlm=True)
  ar_params = qwen.init(jax.random.key(0), ids[:, :8])["params"]

  g = args.gen
  cases = [("autoregressive", "kv", "-",
            lambda: greedy_generate(qwen, ar_params, ids, mask, max_new_tokens=g))]
  for cache in ("none", "prefix", "dual"):
    for k in (1, 2, 4):
      cases.append(("masked diffusion", cache, f"{100 // k}%", functools.partial(
          generate, lm, ids, mask, gen_length=g, steps=g // k, block_length=args.block,
          mask_id=mask_id, schedule="shift", cache=cache, return_nfe=True)))
  for cache in ("prefix", "dual"):
    cases.append((f"threshold {args.threshold}", cache, "-", functools.partial(
        generate, lm, ids, mask, gen_length=g, block_length=args.block, mask_id=mask_id,
        threshold=args.threshold, cache=cache, return_nfe=True)))
  # compile + first run of every case, then the repeats interleaved (round r times every
  # case once), so drift in the machine's speed hits all rows alike; medians reported
  outs = [jax.block_until_ready(fn()) for *_, fn in cases]
  times = [[] for _ in cases]
  for _ in range(args.repeats):
    for i, (*_, fn) in enumerate(cases):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - t0)
  tokens = args.batch * g
  rows = []
  for (name, cache, pct, _), out, ts in zip(cases, outs, times):
    nfe = g if name == "autoregressive" else int(out[1])
    rows.append((name, cache, pct, nfe, statistics.median(ts)))
  t_ar = rows[0][-1]

  print(f"device {jax.devices()[0].device_kind}; d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, mlp {args.mlp}, vocab {args.vocab}, {args.dtype}; batch "
        f"{args.batch}, prompt {args.prompt}, gen {args.gen}, block {args.block}")
  print(f"{'decoder':18s} {'cache':7s} {'NFE%':>5s} {'NFE':>5s} {'ms/batch':>10s} "
        f"{'tokens/s':>10s} {'vs AR':>7s}")
  for name, cache, pct, nfe, t in rows:
    print(f"{name:18s} {cache:7s} {pct:>5s} {nfe:5d} {1e3 * t:10.1f} {tokens / t:10.1f} "
          f"{t_ar / t:7.2f}x")
  return rows


if __name__ == "__main__":
  main()

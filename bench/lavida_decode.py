"""Decoding speed and memory of LaViDa's masked-diffusion sampler vs an autoregressive LM of the
same size, at long answers.

  python bench/lavida_decode.py                           # CPU-sized defaults: gen 256, 1024
  python bench/lavida_decode.py --gens 256 --d_model 256 --layers 4 --batch 4
  python bench/lavida_decode.py --d_model 4096 --layers 32 --heads 32 --mlp 12288 \
      --vocab 126464 --prompt 1136 --gens 256,1024 --block 32 --batch 8 --dtype bfloat16

One process, one random-weight model size: a LLaDA ``DecoderLM`` (bidirectional, Prefix-DLM
mask) decoded by ``diffusion.masked.sampler.generate`` with every cache mode -- none,
prefix (LaViDa's Prefix-DLM), block (Fast-dLLM's prefix cache), dual (Fast-dLLM), elastic
(Elastic-Cache's drift refresh, ``--refresh_gamma``) -- and a Qwen2 ``DecoderLM`` with the
same width, depth, heads, MLP and vocabulary (causal, q/k/v biases) decoded greedily with its
KV cache (``models.lm.greedy_generate``). The prompt stands for LaViDa's image + text prompt
(``--prompt`` tokens); vision encoding is excluded (both sides would pay it once).

Per answer length (``--gens``): every cache mode at NFE 100 % (steps = gen) and the
confidence-threshold decoding of the cached modes; NFE 50 / 25 % (gen / 2, gen / 4 steps)
for every mode up to ``--sweep_max`` tokens (above it the NFE-100 % rows alone: the
cost of a fixed-step row is NFE x its per-step cost). Each row: median wall time of
``--repeats`` calls after a compile call (the repeats interleaved across the rows of one
answer length, so drift in machine speed hits every row alike), output tokens per second
(batch x gen / time), model calls (NFE), speed relative to the autoregressive decoder, and
the compiled program's memory from XLA's buffer assignment (``memory_analysis()``: arguments
+ outputs + temporaries - aliased, i.e. the peak the program can need; params included).
Random weights make threshold decoding commit one token per step (its NFE is as measured; a
trained model commits several). ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CACHES = ("none", "prefix", "block", "dual", "elastic")


def _memory_mib(compiled) -> float:
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**20


def _cases(args, g, lm, ar, ids, mask):
  """``(decoder, cache, decoding, jitted fn, its args)`` of one answer length."""
  import functools
  import jax
  from mmjax.diffusion.masked.sampler import generate
  from mmjax.models.lm import greedy_generate
  qwen, ar_params = ar
  mask_id = args.vocab - 1
  out = [("autoregressive", "kv", "greedy", jax.jit(functools.partial(
      greedy_generate, qwen, max_new_tokens=g)), (ar_params, ids, mask))]

  def diffusion(cache, **kw):
    return jax.jit(lambda lm, i, m: generate(
        lm, i, m, gen_length=g, block_length=args.block, mask_id=mask_id, cache=cache,
        refresh_gamma=args.refresh_gamma, return_nfe=True, **kw))
  sweep = (1, 2, 4) if g <= args.sweep_max else (1,)
  for cache in CACHES:
    for k in sweep:
      out.append(("masked diffusion", cache, f"NFE {100 // k}%",
                  diffusion(cache, steps=g // k, schedule="shift"), (lm, ids, mask)))
  for cache in CACHES[2:]:
    out.append(("masked diffusion", cache, f"tau {args.threshold}",
                diffusion(cache, threshold=args.threshold), (lm, ids, mask)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp", type=int, default=192)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens (image + text)")
  p.add_argument("--gens", default="256,1024", help="answer lengths, comma-separated")
  p.add_argument("--block", type=int, default=32, help="block_length (semi-AR blocks)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--refresh_gamma", type=float, default=0.9)
  p.add_argument("--sweep_max", type=int, default=256,
                 help="NFE 50 / 25 %% rows up to this answer length")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--json", default="", help="write the rows here")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from mmjax import core
  from mmjax.diffusion.masked.denoiser import DiffusionLM
  from mmjax.models.lm import DecoderLM, LMConfig

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
  lm = DiffusionLM(llada, llada.init(jax.random.key(0), ids[:, :8])["params"], prefix_dlm=True)
  ar = (qwen, qwen.init(jax.random.key(0), ids[:, :8])["params"])

  print(f"device {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}); d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, mlp {args.mlp}, vocab {args.vocab}, {args.dtype}; batch "
        f"{args.batch}, prompt {args.prompt}, block {args.block}, median of {args.repeats}",
        flush=True)
  print(f"{'gen':>5s} {'decoder':17s} {'cache':8s} {'decoding':9s} {'NFE':>5s} "
        f"{'ms/batch':>10s} {'tokens/s':>9s} {'vs AR':>7s} {'MiB':>8s}", flush=True)
  rows = []
  for g in (int(x) for x in args.gens.split(",")):
    cases = _cases(args, g, lm, ar, ids, mask)
    memory, nfes = [], []
    for _, _, _, fn, a in cases:     # compile (memory from the compiled program) + first run
      memory.append(_memory_mib(fn.lower(*a).compile()))
      out = jax.block_until_ready(fn(*a))
      nfes.append(g if isinstance(out, jax.Array) else int(out[1]))
    times = [[] for _ in cases]
    for _ in range(args.repeats):    # round r times every case once: drift hits all alike
      for i, (_, _, _, fn, a) in enumerate(cases):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times[i].append(time.perf_counter() - t0)
    t_ar = statistics.median(times[0])
    for (name, cache, how, _, _), nfe, ts, mib in zip(cases, nfes, times, memory):
      t = statistics.median(ts)
      row = dict(gen=g, decoder=name, cache=cache, decoding=how, nfe=nfe, seconds=t,
                 tokens_per_s=args.batch * g / t, vs_ar=t_ar / t, memory_mib=mib)
      rows.append(row)
      print(f"{g:5d} {name:17s} {cache:8s} {how:9s} {nfe:5d} {1e3 * t:10.1f} "
            f"{row['tokens_per_s']:9.1f} {row['vs_ar']:6.2f}x {mib:8.1f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                 "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()

"""DualToken image generation: the one-program sampler vs the same model stepped from Python.

  python bench/dualtoken_generate.py        # CPU defaults: ~30 min on a busy 2-core machine
  python bench/dualtoken_generate.py --width 2048 --layers 36 --heads 16 --kv_heads 2 \
      --mlp 11008 --head_width 1024 --head_heads 16 --head_mlp 4096 --code_dim 1024 \
      --dtype bfloat16                                    # the paper's sizes (an accelerator)

One process, one random-weight unified model (``configs/dualtoken.py:demo_unified`` resized
by the flags: a Qwen2 LM, two 3-layer depth heads, a tiny tokenizer whose SigLIP grid is
27 x 27, so an image is 729 positions x 8 depths x 2 vocabularies of ``--codebook`` codes),
CFG (scale 3, the blank prompt batched with the caption), temperature 1, top-k 900, top-p 0.96:

* **one program**: ``sampling.generate_images``: prefill, a ``fori_loop`` over the 729
  positions (each: both heads' 8 depths, the position fed back to the LM), the pixel decoder;
* **Python loop**: the same pieces jitted separately (``start_generation``, the step, the
  decoder; the state donated) and the step called 729 times from Python, two ways:
  ``jit(position_step)``, and ``position_step`` inside a ``fori_loop`` of one trip (its bounds
  read from the state, so XLA keeps the loop). XLA fuses a bare step differently from the
  loop body of the one program, so its logits differ in the last bits, and sooner or later
  a sampled code (a top-p cut, a near-tie) flips and the rest of the image follows another
  path; the one-trip loop is compiled like the one program's loop body and gives the same
  codes bit for bit.

Each row: median wall time of ``--repeats`` calls after a compile call (repeats interleaved
between the rows, so drift in the machine's speed hits every row alike), seconds per image,
positions per second, the speed relative to ``jit(position_step)`` and whether the codes
equal the one program's (else the first position that differs). The script exits 1 unless
the one-trip loop's codes are identical to the one program's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(args):
  """The unified system with random weights at the flags' sizes."""
  from mmjax import config as config_lib
  from mmjax.systems.dualtoken.unified_system import UnifiedDualToken
  res = 27 * 4                                  # SigLIP patch 4 -> a 27 x 27 grid
  t = "--config.tokenizer.model."
  overrides = [
      "--config.model.train_tokenizer=False", f"--config.dtype={args.dtype}",
      f"--config.tokenizer.dtype={args.dtype}",
      f"--config.data.resolution={res}", f"--config.tokenizer.data.resolution={res}",
      f"{t}vision_config.image_size={res}", f"{t}vision_config.patch_size=4",
      f"{t}depths={args.depths}", f"{t}pixel.codebook_size={args.codebook}",
      f"{t}semantic.codebook_size={args.codebook}", f"{t}decoder.latent=27",
      f"{t}decoder.attn_resolutions=()",
      f"--config.model.seq_len={27 * 27 + 4 + args.text_len}",
      f"--config.model.code_embed_dim={args.code_dim}",
      f"--config.model.lm_config.hidden_size={args.width}",
      f"--config.model.lm_config.num_hidden_layers={args.layers}",
      f"--config.model.lm_config.num_attention_heads={args.heads}",
      f"--config.model.lm_config.num_key_value_heads={args.kv_heads}",
      f"--config.model.lm_config.intermediate_size={args.mlp}",
      f"--config.model.head.width={args.head_width}",
      f"--config.model.head.layers={args.head_layers}",
      f"--config.model.head.heads={args.head_heads}",
      f"--config.model.head.mlp_dim={args.head_mlp}"]
  config = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "dualtoken.py") + ":demo_unified", overrides)
  return UnifiedDualToken(config)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--width", type=int, default=256, help="LM width")
  p.add_argument("--layers", type=int, default=4, help="LM layers")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--mlp", type=int, default=768)
  p.add_argument("--head_width", type=int, default=128)
  p.add_argument("--head_layers", type=int, default=3)
  p.add_argument("--head_heads", type=int, default=4)
  p.add_argument("--head_mlp", type=int, default=512)
  p.add_argument("--code_dim", type=int, default=128, help="code-embedding width")
  p.add_argument("--codebook", type=int, default=16384, help="codes per vocabulary")
  p.add_argument("--depths", type=int, default=8)
  p.add_argument("--text_len", type=int, default=16, help="caption tokens of the prompt")
  p.add_argument("--batch", type=int, default=1, help="images per call (x2 rows with CFG)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)

  import flax.linen as nn
  import jax
  import numpy as np
  from mmjax.systems.dualtoken import sampling
  from mmjax.systems.dualtoken.unified import UnifiedModel

  system = build(args)
  model, n = system.model, system.cfg.positions
  # eager init: on a loaded CPU it is quicker than compiling the whole init
  variables = nn.unbox(system.init(jax.random.key(0), system.dummy_batch(1)))
  captions = ["two red circles left of a blue square"] * args.batch
  pr = system.prompter
  length = len(pr.head) + pr.text_len + 1
  ids, mask = pr.left_pad([pr.generation_prompt(c) for c in captions], length)
  un_ids, un_mask = pr.left_pad([pr.generation_prompt("")] * args.batch, length)
  keys = system.keys(0, np.arange(args.batch))
  s = dict(cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96)

  def one_program():
    return sampling.generate_images(model, variables, ids, mask, un_ids, un_mask, keys, **s)

  def body(v, state, k):
    return sampling.position_step(model, v, state, k, cfg=True, **s)

  start = jax.jit(lambda v, *a: sampling.start_generation(model, v, *a))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=UnifiedModel.decode_pixels))
  step = jax.jit(body, donate_argnums=1)
  # the same step as a while loop of one trip (bounds from the state, so XLA cannot unroll
  # it): compiled like the one program's loop body, hence the same rounding and codes
  loop_step = jax.jit(lambda v, st, k: jax.lax.fori_loop(
      st["i"], st["i"] + 1, lambda _, x: body(v, x, k), st), donate_argnums=1)

  def python_loop(fn):
    def run():
      state = start(variables, ids, mask, un_ids, un_mask)
      for _ in range(n):
        state = fn(variables, state, keys)
      return {"pixel": state["pixel"], "semantic": state["semantic"],
              "images": decode(variables, state["pixel"])}
    return run

  # (row, dispatches per call, function, must give the one program's codes)
  cases = [("one program", 1, one_program, True),
           ("Python, jit(position_step)", n + 2, python_loop(step), False),
           ("Python, one-trip loop step", n + 2, python_loop(loop_step), True)]
  outs = []
  for name, _, fn, _ in cases:                  # compile + first run
    t0 = time.perf_counter()
    outs.append(jax.block_until_ready(fn()))
    print(f"{name}: first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
  times = [[] for _ in cases]
  for _ in range(args.repeats):                 # interleaved, so drift hits every row alike
    for i, (_, _, fn, _) in enumerate(cases):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - t0)

  def agreement(out):
    """'identical', or the first position whose codes differ."""
    diff = np.argwhere(np.any((np.asarray(outs[0]["pixel"]) != np.asarray(out["pixel"]))
                              | (np.asarray(outs[0]["semantic"]) != np.asarray(out["semantic"])),
                              axis=-1))
    if not len(diff):
      return "identical", True
    return f"first differs at position {int(diff[:, 1].min())}", False

  c = system.cfg
  print(f"device {jax.devices()[0].device_kind}; LM width {args.width}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, mlp {args.mlp}, vocab {c.lm.vocab_size}; heads: "
        f"width {args.head_width}, {args.head_layers} layers, mlp {args.head_mlp}; "
        f"{n} positions x {c.depths} depths x 2 vocabularies of {args.codebook} codes; "
        f"batch {args.batch} (+{args.batch} CFG rows), prompt {length}, {args.dtype}; "
        f"median of {args.repeats}")
  print(f"{'sampler':27s} {'dispatches':>10s} {'s/image':>8s} {'positions/s':>12s} "
        f"{'vs Python':>9s}  codes vs one program")
  base = statistics.median(times[1])
  rows, ok = [], True
  for (name, calls, _, must), ts, out in zip(cases, times, outs):
    t = statistics.median(ts)
    same, exact = agreement(out)
    ok = ok and (exact or not must)
    rows.append((name, calls, t, same))
    print(f"{name:27s} {calls:10d} {t / args.batch:8.2f} {args.batch * n / t:12.1f} "
          f"{base / t:8.2f}x  {same}")
  if not ok:
    sys.exit(1)
  return rows


if __name__ == "__main__":
  main()

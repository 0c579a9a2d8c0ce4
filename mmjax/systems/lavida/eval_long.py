"""LaViDa's long-answer eval (``configs/lavida.py:demo_long``): where cached parallel decoding
pays.

The held-out scenes are described in full (``mmjax.data.shapes_describe``: every object's
colour, shape and grid cell, every pair's relation; 28-98 tokens) and scored per object and
attribute (``mmjax.eval.captions.score_description``). For each answer slot in
``eval.gen_lengths`` (a slot holds the scenes whose description fits it: 2-3 objects at 64,
2-4 at 128) the table has the untrained (step 0) model and, for every cache mode in
``eval.caches`` (none / prefix / block / dual / elastic, ``diffusion.masked.caches``), NFE
100 / 50 / 25 % (steps = gen, gen / 2, gen / 4) and confidence-threshold decoding at each of
``eval.thresholds``; blocks of ``sample.block_length``.

Latency: every setting is compiled and run once (the accuracy), then timed
``eval.timing_repeats`` more times, the repeats interleaved across all settings (round r
times every setting once) so a change in the machine's load hits every row alike; the row's
``seconds_per_sample`` is the median over its timed batches (batches of ``eval.batch``).
``speedup`` is relative to cache 'none' at NFE 100 % of the same slot.
Written to ``WORKDIR/eval/lavida_long.json``, printed by `format_table`.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from mmjax.data.shapes_describe import description_length
from mmjax.systems.lavida.eval import batch_of, held_out_source, score


def held_out_fitting(system, num: int, gen_length: int):
  """The first ``num`` held-out described scenes whose description (and end marker) fits
  ``gen_length`` tokens, and their prompts as one batch."""
  src = held_out_source(system.config)
  end = len(system.prompter.answer_end)
  recs, i = [], 0
  while len(recs) < num:
    if description_length(src.scene(i)) + end <= gen_length:
      recs.append(src[i])
    i += 1
  return recs, batch_of(recs, lambda r: system.preprocess(r, None))


def settings(config, g: int) -> list:
  """``(model, cache, steps, threshold)`` rows of one slot."""
  e = config.eval
  rows = [("step 0", "none", g, None)]
  for cache in e.caches:
    rows += [("trained", cache, g // k, None) for k in (1, 2, 4)]
    rows += [("trained", cache, None, float(t)) for t in e.thresholds]
  return rows


def _chunks(batch: dict, bs: int) -> list:
  n = len(batch["tokens"])
  out = []
  for i in range(0, n, bs):
    c = {k: v[i:i + bs] for k, v in batch.items()}
    extra = bs - len(c["tokens"])       # one shape for every batch: one compile
    out.append({k: np.concatenate([v, np.repeat(v[:1], extra, 0)]) for k, v in c.items()})
  return out


def eval_mode(system, params, workdir):
  """The long-answer speed / quality table (module docstring):
  WORKDIR/eval/lavida_long.json and a printed table."""
  config = system.config
  e = config.eval
  step0 = None
  bs = int(e.batch)
  runs = []                       # (row, options, params, chunks)
  for g in e.gen_lengths:
    recs, batch = held_out_fitting(system, int(e.num_scenes), int(g))
    refs, cats = [r["caption"] for r in recs], [r["category"] for r in recs]
    chunks = _chunks(batch, min(bs, len(refs)))
    for model, cache, steps, tau in settings(config, int(g)):
      opts = system.sample_options(cache=cache, steps=steps, threshold=tau, gen_length=int(g))
      if model == "step 0" and step0 is None:
        step0 = system.init_params(jax.random.PRNGKey(config.seed))
      p = step0 if model == "step 0" else params
      t0 = time.perf_counter()
      jax.block_until_ready(system.generate(p, chunks[0], **opts))           # compile
      compile_s = time.perf_counter() - t0
      ids, nfes = [], []
      for c in chunks:
        out, nfe = system.generate(p, c, **opts)
        ids.append(np.asarray(out))
        nfes.append(int(nfe))
      texts = [system.decode(r) for r in np.concatenate(ids)[:len(refs)]]
      s = score(config, texts, refs, cats)
      nfe = float(np.mean(nfes))
      row = {"gen_length": int(g), "model": model, "cache": cache, "steps": steps,
             "threshold": tau, "nfe": nfe, "nfe_percent": 100.0 * nfe / int(g),
             "compile_seconds": compile_s, **s,
             "examples": [{"reference": r, "generated": t}
                          for r, t in zip(refs[:3], texts[:3])]}
      runs.append((row, opts, p, chunks, []))
      print(f"  gen {g} {model} {cache} steps={steps} tau={tau}: attr "
            f"{row['attribute_accuracy']:.3f} nfe {nfe:.1f}", flush=True)
  for _ in range(int(e.timing_repeats)):        # interleaved timing rounds
    for row, opts, p, chunks, times in runs:
      for c in chunks:
        t0 = time.perf_counter()
        jax.block_until_ready(system.generate(p, c, **opts))
        times.append((time.perf_counter() - t0) / len(c["tokens"]))
  rows = []
  for row, _, _, _, times in runs:
    row["seconds_per_sample"] = float(np.median(times))
    rows.append(row)
  for row in rows:
    base = next(r for r in rows if r["gen_length"] == row["gen_length"] and
                r["model"] == "trained" and r["cache"] == "none" and r["threshold"] is None
                and r["steps"] == r["gen_length"])
    row["speedup"] = base["seconds_per_sample"] / row["seconds_per_sample"]
  result = {"task": "shapes_describe", "num_scenes": int(e.num_scenes),
            "block_length": config.sample.block_length, "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "lavida_long.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(result), flush=True)
  return result


def format_table(result: dict) -> str:
  """The long-answer table as text, one row per slot / model / cache / decoding."""
  lines = [f"LaViDa long answers: {result['num_scenes']} held-out scenes per slot, block "
           f"{result['block_length']}, {result['device']} (load {result['load_average']})",
           f"{'gen':>4s} {'model':8s} {'cache':8s} {'decoding':10s} {'NFE':>6s} {'NFE%':>5s} "
           f"{'attr acc':>8s} {'exact':>6s} {'ms/sample':>10s} {'speedup':>8s}"]
  for r in result["rows"]:
    how = f"tau={r['threshold']}" if r["threshold"] is not None else f"steps={r['steps']}"
    lines.append(f"{r['gen_length']:4d} {r['model']:8s} {r['cache']:8s} {how:10s} "
                 f"{r['nfe']:6.1f} {r['nfe_percent']:5.0f} {r['attribute_accuracy']:8.3f} "
                 f"{r['exact']:6.3f} {1e3 * r['seconds_per_sample']:10.2f} "
                 f"{r['speedup']:7.2f}x")
  return "\n".join(lines)

"""LaViDa's sample and eval modes on the shapes world: captions, the speed / quality table,
infill accuracy.

* `sample_mode`: captions of held-out scenes, scored, as JSON and a picture grid
  (``mmjax.eval.pictures.caption_grid``);
* `eval_mode`: attribute-level caption accuracy and latency per sample at NFE 100 / 50 / 25 %
  x cache none / prefix / dual, threshold decoding and the untrained (step 0) model, plus
  the infill rows (`infill_accuracy`); printed by `format_table`.

Every function takes the ``Lavida`` system (``system.py``), whose ``modes()`` binds them.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from mmjax.data import shapes
from mmjax.data.shapes_describe import DescribeSource
from mmjax.eval.captions import score_captions, score_descriptions
from mmjax.eval.pictures import caption_grid


def held_out_source(config):
  """The held-out shapes scenes (seed ``config.seed + 10000``): the training categories
  ``config.data.categories``, or described scenes for ``data.source='shapes_describe'``."""
  if config.data.source == "shapes_describe":
    return DescribeSource(seed=config.seed + 10_000, resolution=config.data.resolution)
  cats = [c.strip() for c in config.data.categories.split(",") if c.strip()]
  return shapes.ShapesSource(seed=config.seed + 10_000, categories=cats or None,
                             resolution=config.data.resolution)


def score(config, texts, refs, categories=None) -> dict:
  """Captions scored per attribute; long descriptions per object and attribute."""
  if config.data.source == "shapes_describe":
    return score_descriptions(texts, refs, categories)
  return score_captions(texts, refs, categories)


def batch_of(recs, preprocess) -> dict:
  examples = [preprocess(r) for r in recs]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def held_out(config, num: int, preprocess):
  """The first ``num`` held-out scenes (`held_out_source`) and their prompts as one batch."""
  src = held_out_source(config)
  recs = [src[i] for i in range(num)]
  return recs, batch_of(recs, preprocess)


def _held_out(system, num: int):
  return held_out(system.config, num, lambda r: system.preprocess(r, None))


def captions(system, params, batch, bs: int = 64, **options):
  """Decoded answers of every row, seconds per sample (median over batches of ``bs``,
  compile excluded), mean NFE. The last batch is padded with copies of its first row, so
  every batch has one shape (one compile)."""
  n = len(batch["tokens"])
  bs = min(bs, n)
  chunks = []
  for i in range(0, n, bs):
    c = {k: v[i:i + bs] for k, v in batch.items()}
    extra = bs - len(c["tokens"])
    chunks.append({k: np.concatenate([v, np.repeat(v[:1], extra, 0)]) for k, v in c.items()})
  jax.block_until_ready(system.generate(params, chunks[0], **options))        # compile
  out, nfes, times = [], [], []
  for c in chunks:
    t0 = time.perf_counter()
    ids, nfe = system.generate(params, c, **options)
    out.append(np.asarray(ids))
    times.append((time.perf_counter() - t0) / bs)
    nfes.append(int(nfe))
  rows = np.concatenate(out)[:n]
  if system.config.model.stage == 3:      # a FIM model may write [S] filler
    rows = system.strip_fim(rows)
  nfe = float(np.mean(np.repeat(nfes, bs)[:n]))
  return [system.decode(row) for row in rows], float(np.median(times)), nfe


def sample_mode(system, params, workdir):
  """Captions of held-out scenes: WORKDIR/samples/lavida_captions.{json,png}."""
  recs, batch = _held_out(system, int(system.config.sample.num_images))
  texts, _, _ = captions(system, params, batch, **system.sample_options())
  refs = [r["caption"] for r in recs]
  scores = score(system.config, texts, refs)
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  with open(os.path.join(workdir, "samples", "lavida_captions.json"), "w") as f:
    json.dump({**scores, "captions": [{"reference": r, "generated": c}
                                      for r, c in zip(refs, texts)]}, f, indent=1)
  caption_grid([r["image"] for r in recs], texts, refs).save(
      os.path.join(workdir, "samples", "lavida_captions.png"))
  print(f"samples: {workdir}/samples/lavida_captions.png (attribute accuracy "
        f"{scores['attribute_accuracy']:.3f})", flush=True)
  return scores


def eval_mode(system, params, workdir):
  """The speed / quality table: attribute-level caption accuracy and latency per sample at
  NFE 100 / 50 / 25 % x cache none / prefix / dual, threshold decoding, and the untrained
  (step 0) model: WORKDIR/eval/lavida_demo.json and a printed table."""
  config = system.config
  e = config.eval
  recs, batch = _held_out(system, int(e.num_scenes))
  refs, cats = [r["caption"] for r in recs], [r["category"] for r in recs]
  g = system.answer_len
  settings = [("step 0", "none", g, None)]
  settings += [("trained", cache, g // k, None) for cache in ("none", "prefix", "dual")
               for k in (1, 2, 4)]
  settings += [("trained", cache, None, float(e.threshold)) for cache in ("none", "dual")]
  step0 = system.init_params(jax.random.PRNGKey(config.seed))
  rows = []
  for model, cache, steps, tau in settings:
    opts = system.sample_options(cache=cache, steps=steps, threshold=tau)
    texts, seconds, nfe = captions(system, step0 if model == "step 0" else params, batch,
                                   **opts)
    score = score_captions(texts, refs, cats)
    rows.append({"model": model, "cache": cache, "steps": steps, "threshold": tau,
                 "nfe": nfe, "nfe_percent": 100.0 * nfe / g,
                 "seconds_per_sample": seconds, **score,
                 "examples": [{"reference": r, "generated": t}
                              for r, t in zip(refs[:4], texts[:4])]})
  result = {"num_scenes": len(recs), "gen_length": g,
            "block_length": config.sample.block_length, "device": str(jax.devices()[0]),
            "rows": rows,
            "infill": {kind: infill_accuracy(system, params, batch, refs, kind)
                       for kind in ("color", "shape")}}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "lavida_demo.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(format_table(result), flush=True)
  return result


def infill_accuracy(system, params, batch, refs, kind: str) -> dict:
  """Infill on the trained model: each reference caption with its colour (or shape) words
  as holes of ``eval.infill_slots`` slots (a FIM model writes the word and [S] filler,
  stripped); the fraction of holes filled with exactly the reference word."""
  slots = int(system.config.eval.infill_slots)
  is_hole = ((lambda w: w in shapes.COLORS) if kind == "color" else
             (lambda w: w.rstrip("s") in shapes.SHAPES))
  drafts, want = [], []
  for ref in refs:
    words = ref.split()
    drafts.append([slots if is_hole(w) else w for w in words])
    want.append([w for w in words if is_hole(w)])
  texts, _ = system.infill(params, batch, drafts, **system.sample_options(cache="prefix"))
  hits = total = 0
  for draft, text, words in zip(drafts, texts, want):
    got = text.split()
    filled = [got[i] if i < len(got) else None for i, p in enumerate(draft)
              if isinstance(p, int)]
    hits += sum(a == b for a, b in zip(filled, words))
    total += len(words)
  return {"holes": total, "slots": slots, "accuracy": hits / max(total, 1),
          "examples": [{"reference": r, "filled": t} for r, t in zip(refs[:4], texts[:4])]}


def format_table(result: dict) -> str:
  """The eval table as text (one row per model / cache / NFE setting)."""
  lines = [f"LaViDa demo: {result['num_scenes']} held-out scenes, gen_length "
           f"{result['gen_length']}, block {result['block_length']}, {result['device']}",
           f"{'model':8s} {'cache':7s} {'decoding':14s} {'NFE':>6s} {'NFE%':>5s} "
           f"{'attr acc':>8s} {'exact':>6s} {'ms/sample':>10s}"]
  for r in result["rows"]:
    how = f"tau={r['threshold']}" if r["threshold"] is not None else f"steps={r['steps']}"
    lines.append(f"{r['model']:8s} {r['cache']:7s} {how:14s} {r['nfe']:6.1f} "
                 f"{r['nfe_percent']:5.0f} {r['attribute_accuracy']:8.3f} {r['exact']:6.3f} "
                 f"{1e3 * r['seconds_per_sample']:10.2f}")
  for kind, r in result.get("infill", {}).items():
    lines.append(f"infill: {kind} words as {r.get('slots', 1)}-slot holes in the reference "
                 f"caption: {r['accuracy']:.3f} of {r['holes']} filled right")
  return "\n".join(lines)

"""MetaQuery's sample and eval modes (``launch/tpu.py --mode sample | eval``).

Text-to-image: ``sample_t2i`` writes a grid of generated images with their prompts
(WORKDIR/samples/metaquery.png); ``eval_t2i`` scores ShapesEval (GenEval's categories on the
shapes world) of the trained model and of the same model at step 0, on the same prompts and
noise (WORKDIR/eval/shapes_eval.json).

Image tasks (`mmjax.systems.metaquery.tasks`): ``sample_task`` writes one row per example,
source images | generated | target with the instruction below
(WORKDIR/samples/metaquery_<task>.png); ``eval_task`` scores the generations against the
*target* scenes, plus their mean absolute pixel error (WORKDIR/eval/shapes_eval_<task>.json).

Every function takes the system (`mmjax.systems.metaquery.system.MetaQuery`) first.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from mmjax.data import shapes
from mmjax.eval.pictures import caption_grid
from mmjax.eval.shapes_eval import ShapesEval
from mmjax.systems.metaquery import tasks


# ============================================================================ text-to-image
def eval_scenes(system, num: int) -> list:
  """``num`` shapes-world scenes of the eval categories (seed + 10000)."""
  cats = [c.strip() for c in (system.config.eval.categories or
                              system.config.data.categories).split(",") if c.strip()]
  return [shapes.sample_scene(system.config.seed + 10_000, i, cats or None) for i in range(num)]


def sample_t2i(system, params, workdir, num=None):
  """A grid of generated images with their prompts: WORKDIR/samples/metaquery.png."""
  scenes = eval_scenes(system, num or system.config.sample.num_images)
  captions = [shapes.caption(s) for s in scenes]
  images = system.generate(params, captions, jax.random.key(system.config.seed + 1))
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", "metaquery.png")
  caption_grid(list(images), captions, cols=8).save(path)
  print(f"samples: {path}", flush=True)
  return path


def eval_t2i(system, params, workdir, num=None):
  """ShapesEval (per GenEval category and overall) of the trained model and of the same
  model at step 0 (fresh init from the config's seed), on the same prompts and noise:
  WORKDIR/eval/shapes_eval.json."""
  scenes = eval_scenes(system, num or system.config.eval.num_images)
  captions = [shapes.caption(s) for s in scenes]
  rng = jax.random.key(system.config.seed + 2)
  result = {"num_images": len(scenes), "guidance": system.config.sample.guidance,
            "num_steps": system.config.sample.num_steps}
  step0 = system.init_params(jax.random.PRNGKey(system.config.seed))
  for name, p in (("step0", step0), ("trained", params)):
    scores = ShapesEval().evaluate(list(system.generate(p, captions, rng)), scenes)
    result[name] = {"per_category": scores["per_category"], "overall": scores["overall"]}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "shapes_eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  cats = sorted(result["trained"]["per_category"])
  print(f"{'':8s} " + " ".join(f"{c:>13s}" for c in cats) + f" {'overall':>8s}")
  for k in ("step0", "trained"):
    r = result[k]
    print(f"{k:8s} " + " ".join(f"{r['per_category'][c]:13.3f}" for c in cats)
          + f" {r['overall']:8.3f}", flush=True)
  return result


# ============================================================================ image tasks
def eval_examples(system, num: int) -> list[dict]:
  """``num`` shapes-world examples of the system's task (seed + 10000, eval categories)."""
  c = system.config
  cats = tasks.categories_of(c, c.eval.categories)
  return [tasks.shapes_example(system, i, seed=c.seed + 10_000, categories=cats)
          for i in range(num)]


def task_grid(sources: Sequence[Sequence[np.ndarray]], generated, targets,
              texts: Sequence[str], slots: int, scale: int = 3):
  """A PIL grid, one example per row: ``slots`` source cells (grey when empty) | generated
  | target, the instruction under the row."""
  r = generated[0].shape[0] * scale
  gap, text_h = 4, 16
  cols = slots + 2
  width = max(cols * (r + gap) + 3 * gap, 6 * max(len(t) for t in texts) + 8)  # ~6 px/char
  grid = Image.new("RGB", (width, len(generated) * (r + text_h + gap)), "white")
  draw = ImageDraw.Draw(grid)
  big = lambda a: Image.fromarray(np.asarray(a)).resize((r, r), Image.NEAREST)
  for row, (srcs, gen, tgt, text) in enumerate(zip(sources, generated, targets, texts)):
    y = row * (r + text_h + gap)
    for k in range(slots):
      cell = big(srcs[k]) if k < len(srcs) else Image.new("RGB", (r, r), (200, 200, 200))
      grid.paste(cell, (k * (r + gap), y))
    x = slots * (r + gap) + 2 * gap                       # a wider gap after the sources
    grid.paste(big(gen), (x, y))
    grid.paste(big(tgt), (x + r + gap, y))
    draw.text((2, y + r + 2), text or "(no text)", fill=(0, 0, 0))
  return grid


def sample_task(system, params, workdir, num=None):
  """Shapes-world examples of the task: WORKDIR/samples/metaquery_<task>.png, one row per
  example: source images | generated | target, the instruction below."""
  c = system.config
  raw = eval_examples(system, num or c.sample.num_images)
  examples = [tasks.preprocess(system, r) for r in raw]
  images = tasks.generate(system, params, examples, jax.random.key(c.seed + 1))
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", f"metaquery_{system.task}.png")
  task_grid([r["source_images"] for r in raw], list(images), [r["image"] for r in raw],
            [r["caption"] for r in raw], system.images.slots).save(path)
  print(f"samples: {path}", flush=True)
  return path


def eval_task(system, params, workdir, num=None):
  """ShapesEval of generated images against the *target* scenes, and the mean absolute
  pixel error to the target renders, for the trained model and step 0 (same examples and
  noise): WORKDIR/eval/shapes_eval_<task>.json."""
  c = system.config
  raw = eval_examples(system, num or c.eval.num_images)
  examples = [tasks.preprocess(system, r) for r in raw]
  targets = np.stack([r["image"] for r in raw]).astype(np.float32)
  rng = jax.random.key(c.seed + 2)
  result = {"task": system.task, "num_images": len(raw), "guidance": c.sample.guidance,
            "image_guidance": c.sample.image_guidance, "num_steps": c.sample.num_steps}
  step0 = system.init_params(jax.random.PRNGKey(c.seed))
  for name, p in (("step0", step0), ("trained", params)):
    images = tasks.generate(system, p, examples, rng)
    scores = ShapesEval().evaluate(list(images), [r["target_scene"] for r in raw])
    result[name] = {"per_category": scores["per_category"], "overall": scores["overall"],
                    "pixel_mae": float(np.abs(images.astype(np.float32) - targets).mean()
                                       / 255.0)}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", f"shapes_eval_{system.task}.json"), "w") as f:
    json.dump(result, f, indent=1)
  for k in ("step0", "trained"):
    print(f"{k:8s} overall {result[k]['overall']:.3f}  pixel MAE {result[k]['pixel_mae']:.4f}"
          f"  {result[k]['per_category']}", flush=True)
  return result

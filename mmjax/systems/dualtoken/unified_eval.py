"""The unified model's sample, eval and export modes (``launch/tpu.py --mode sample | eval |
export`` with ``configs/dualtoken.py:demo_unified`` or ``:unified``).

``eval_mode`` scores both directions on held-out shapes-world scenes (seed + 10000, the
``eval.categories``), for the trained model and for the same model at step 0 (a fresh LM and
heads from the config's seed around the same frozen tokenizer):

* text-to-image: ShapesEval (GenEval's rules on the shapes world) of images generated from
  the scenes' captions with the configured CFG scale, temperature, top-k and top-p;
* image-to-text: the attribute-level accuracy of the captions the model writes for the
  scenes' images (read through the tokenizer's dual tokens).

It writes WORKDIR/eval/dualtoken_unified.json (``step0`` and ``trained``, each with
``shapes_eval_overall``, ``caption_accuracy`` and the per-category numbers).
``sample_mode`` writes WORKDIR/samples/dualtoken_t2i.png (generated images under their
prompts) and WORKDIR/samples/dualtoken_captions.png. ``export_mode`` writes the PyTorch export
(``export.export_unified``).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from mmjax.data import image as image_ops, shapes
from mmjax.eval.captions import score_captions
from mmjax.eval.pictures import caption_grid
from mmjax.eval.shapes_eval import ShapesEval

BATCH = 32


def eval_scenes(system, num: int) -> list:
  cats = [c.strip() for c in system.config.eval.categories.split(",") if c.strip()]
  return [shapes.sample_scene(system.config.seed + 10_000, i, cats or None) for i in range(num)]


def generate(system, variables, captions, seed: int) -> np.ndarray:
  """uint8 images ``[n, R, R, 3]`` for ``captions`` (image ``i`` keyed by ``(seed, i)``)."""
  out = []
  for i in range(0, len(captions), BATCH):
    chunk = captions[i:i + BATCH]
    keys = system.keys(seed, np.arange(i, i + len(chunk)))
    images = system.generate(variables, chunk, keys)["images"]
    out.append(image_ops.to_uint8(np.clip(np.asarray(jax.device_get(images)), -1, 1)))
  return np.concatenate(out)


def describe(system, variables, images) -> list[str]:
  """Captions of ``images`` (float [-1, 1]) read through their dual tokens."""
  out = []
  for i in range(0, len(images), BATCH):
    pix, sem = system.tokenize(variables, images[i:i + BATCH])
    out += system.describe(variables, pix, sem)
  return out


def scores(system, variables, scenes) -> dict:
  captions = [shapes.caption(s) for s in scenes]
  generated = generate(system, variables, captions, system.config.sample.seed)
  t2i = ShapesEval().evaluate(list(generated), scenes)
  r = system.resolution
  images = np.stack([image_ops.to_float(shapes.render(s, r)) for s in scenes])
  written = describe(system, variables, images)
  i2t = score_captions(written, captions, [s.category for s in scenes])
  return {"shapes_eval_overall": float(t2i["overall"]),
          "shapes_eval_per_category": t2i["per_category"],
          "caption_accuracy": i2t["attribute_accuracy"], "caption_exact": i2t["exact"],
          "caption_per_category": i2t.get("per_category", {}),
          "examples": [{"prompt": c, "caption": w} for c, w in zip(captions[:8], written[:8])]}


def eval_mode(system, variables, workdir, num=None):
  """Both directions for step 0 and trained: WORKDIR/eval/dualtoken_unified.json."""
  e, s = system.config.eval, system.config.sample
  scenes = eval_scenes(system, num or e.num_prompts)
  step0 = system.init_variables(jax.random.PRNGKey(system.config.seed), tokenizer=variables)
  result = {"num_scenes": len(scenes), "cfg_scale": s.cfg_scale, "temperature": s.temperature,
            "top_k": s.top_k, "top_p": s.top_p}
  for name, v in (("step0", step0), ("trained", variables)):
    result[name] = scores(system, v, scenes)
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "dualtoken_unified.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"{'':8s} {'ShapesEval':>11s} {'caption acc':>12s}")
  for k in ("step0", "trained"):
    print(f"{k:8s} {result[k]['shapes_eval_overall']:11.3f} "
          f"{result[k]['caption_accuracy']:12.3f}", flush=True)
  return result


def sample_mode(system, variables, workdir, num=None):
  """WORKDIR/samples/dualtoken_t2i.png (generated images, prompts below) and
  dualtoken_captions.png (held-out images, the model's captions, references in green)."""
  scenes = eval_scenes(system, num or system.config.sample.num_images)
  captions = [shapes.caption(s) for s in scenes]
  images = generate(system, variables, captions, system.config.sample.seed)
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", "dualtoken_t2i.png")
  caption_grid(list(images), captions, cols=8).save(path)
  r = system.resolution
  renders = [shapes.render(s, r) for s in scenes]
  written = describe(system, variables, np.stack([image_ops.to_float(x) for x in renders]))
  caption_grid(renders, written, captions, cols=8).save(
      os.path.join(workdir, "samples", "dualtoken_captions.png"))
  print(f"samples: {path}", flush=True)
  return path


def export_mode(system, variables, workdir):
  """WORKDIR/export_unified: the LM as a transformers Qwen2 directory plus the visual parts."""
  from mmjax.systems.dualtoken import export  # pylint: disable=import-outside-toplevel
  return export.export_unified(system, variables, os.path.join(workdir, "export_unified"))

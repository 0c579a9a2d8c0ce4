"""DualToken's sample, eval and export modes (``launch/tpu.py --mode sample | eval | export``).

``eval_mode`` tokenizes held-out shapes-world images (seed + 10000) with the trained
tokenizer and with the same one at step 0, and writes WORKDIR/eval/dualtoken_tokenizer.json:
PSNR and SSIM of the reconstructions on [0, 1] RGB, codebook usage (distinct codes used /
K) per depth and vocabulary with its minimum, code entropy as a fraction of log2 K, and the
cosine of the quantised semantic features to the frozen teacher's layer-26 features.
``sample_mode`` writes WORKDIR/samples/dualtoken_recon.png (originals over reconstructions).
``export_mode`` writes the authors' release layout (``checkpoint.export_release``).

Every function takes the system (``mmjax.systems.dualtoken.system.DualToken``) first and the
variables dict (``{'params', 'codebook'}``) the trainer restores.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import image as image_ops, shapes
from mmjax.eval import images as image_metrics
from mmjax.models import rvq


def held_out(system, num: int) -> np.ndarray:
  """``[num, R, R, 3]`` shapes-world images in [-1, 1] (seed + 10000, the eval categories)."""
  cats = [c.strip() for c in system.config.data.categories.split(",") if c.strip()] or None
  r = system.resolution
  out = []
  for i in range(num):
    scene = shapes.sample_scene(system.config.seed + 10_000, i, cats)
    out.append(image_ops.to_float(shapes.render(scene, r)))
  return np.stack(out)


def _batched(fn, x, batch: int):
  outs = [jax.device_get(fn(x[i:i + batch])) for i in range(0, len(x), batch)]
  return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def _cosine(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                            * np.linalg.norm(b, axis=-1) + 1e-8)))


def scores(system, variables, images, batch: int = 32) -> dict:
  """The tokenizer's numbers on ``images`` (see the module docstring)."""
  from mmjax.systems.dualtoken.model import DualTokenModel  # pylint: disable=import-outside-toplevel
  codes = _batched(lambda x: system.encode(variables, x), images, batch)
  recon = _batched(lambda c: system.decode(variables, c), codes["pixel_codes"], batch)
  teacher = _batched(lambda x: system.model.apply(
      variables, jnp.asarray(x), method=DualTokenModel.targets)[0], images, batch)
  to01 = lambda x: np.clip((np.asarray(x, np.float64) + 1) / 2, 0, 1)  # noqa: E731
  out = {"psnr": float(np.mean(image_metrics.psnr(to01(images), to01(recon)))),
         "ssim": float(np.mean(image_metrics.ssim(to01(images), to01(recon)))),
         "semantic_cosine": _cosine(codes["semantic_features"], teacher)}
  usage, entropy = {}, {}
  for name, key, cfg in (("pixel", "pixel_codes", system.cfg.pixel),
                         ("semantic", "semantic_codes", system.cfg.semantic)):
    c = jnp.asarray(codes[key])
    usage[name] = [float(u) for u in rvq.usage(c, cfg.codebook_size)]
    entropy[name] = [float(e) for e in rvq.entropy_fraction(c, cfg.codebook_size)]
  out.update(codebook_usage=min(min(u) for u in usage.values()), usage_per_depth=usage,
             entropy_fraction_per_depth=entropy,
             entropy_fraction=min(min(e) for e in entropy.values()))
  return out, recon


def eval_mode(system, variables, workdir, num=None):
  """Scores of the trained tokenizer and of the same tokenizer at step 0:
  WORKDIR/eval/dualtoken_tokenizer.json; prints the table."""
  images = held_out(system, num or system.config.eval.num_images)
  step0 = system.init_variables(jax.random.PRNGKey(system.config.seed))
  result = {"num_images": len(images)}
  for name, v in (("step0", step0), ("trained", variables)):
    result[name], _ = scores(system, v, images)
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "dualtoken_tokenizer.json"), "w") as f:
    json.dump(result, f, indent=1)
  keys = ("psnr", "ssim", "codebook_usage", "entropy_fraction", "semantic_cosine")
  print(f"{'':8s} " + " ".join(f"{k:>16s}" for k in keys))
  for name in ("step0", "trained"):
    print(f"{name:8s} " + " ".join(f"{result[name][k]:16.3f}" for k in keys), flush=True)
  return result


def sample_mode(system, variables, workdir, num=None):
  """WORKDIR/samples/dualtoken_recon.png: held-out originals (top) over their
  reconstructions from the pixel codes (bottom), 8 per row pair."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images = held_out(system, num or system.config.sample.num_images)
  _, recon = scores(system, variables, images)
  scale, cols = max(1, 96 // system.resolution), 8
  r = system.resolution * scale
  rows = -(-len(images) // cols)
  grid = Image.new("RGB", (cols * (r + 2), rows * (2 * r + 6)), "white")
  for k, (a, b) in enumerate(zip(images, recon)):
    x, y = (k % cols) * (r + 2), (k // cols) * (2 * r + 6)
    for j, img in enumerate((a, b)):
      pic = Image.fromarray(image_ops.to_uint8(np.clip(img, -1, 1)))
      grid.paste(pic.resize((r, r), Image.NEAREST), (x, y + j * (r + 1)))
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", "dualtoken_recon.png")
  grid.save(path)
  print(f"samples: {path}", flush=True)
  return path


def export_mode(system, variables, workdir):
  """WORKDIR/export: the authors' release layout (``epoch_N.pt`` + config directory)."""
  from mmjax.systems.dualtoken import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.export_release(system, variables, os.path.join(workdir, "export"))

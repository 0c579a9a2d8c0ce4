"""MetaQuery's image-conditioned tasks: reconstruction, editing, instruction tuning.

``model.task`` (``configs/metaquery.py``) selects what the bridge reads (spec "Stages"):

=============  ===========================================  =================================
task           prompt (user turn of the MLLM)               condition dropout (training)
=============  ===========================================  =================================
t2i            caption                                      caption -> "" (p)
reconstruct    the target image itself, empty caption       image -> black (p)
edit           source image + instruction                   image -> black (p)
instruct       1..K source images + instruction             u ~ U(0, 1): u < p text -> "";
                                                            p <= u < 2p both; 2p <= u < 3p
                                                            images -> black (the reference's
                                                            ``_inst_process_fn``)
=============  ===========================================  =================================

(p = ``model.cond_dropout``, 0.1.) "Black" is an all-zero RGB image of the same size (the
reference's ``PIL.Image.new("RGB", size)``), i.e. every SigLIP-normalised view pixel -1;
"text -> ''" keeps the image placeholders and drops the instruction (the *null prompt*).
t2i is `mmjax.systems.metaquery.system` itself; this module holds what the image tasks add
(their sample and eval modes: `mmjax.systems.metaquery.modes`).

Static shapes: every example has ``K`` image slots (``model.max_images``; 1 for reconstruct
and edit), ``input_views [K, V, S, S, 3]`` (V views of an S x S image, the MLLM's tower
size) and ``input_valid [K]``. An example with ``n <= K`` images fills slots ``0..n-1`` and
its prompt holds ``n`` placeholder groups (left padding absorbs the difference); empty slots
are black and never reach the MLLM. Batches never shrink: an unusable record raises
``BadRecord`` and the pipeline fills its slot with the next good one.

Views (``model.image_views``): each image is resized (shorter side) and centre-cropped to
S (spec: 384). ``anyres``: LLaVA-OneVision's processor on that square (what the reference
feeds the MLLM): a base view plus a 1x1 grid crop, ``g^2 + g (g + 1)`` tokens (1485 at
384 / patch 14); ``single``: the base view and one newline, ``g^2 + 1`` tokens (730).

Batch (besides t2i's ``images`` = the *target*, ``prompt_ids``, ``prompt_mask``):
``null_ids`` / ``null_mask`` (the same images with an empty caption), ``input_views``,
``input_valid``.

Sampling: three-way CFG with input images, one XLA program: the conditions of
``[null prompt + black images; null prompt + images; prompt + images]`` in one MLLM call,
then DPM-Solver++ 2M with ``solvers.cfg_three_way`` (``v = v_u + s_img (v_img - v_u) +
s_txt (v_full - v_img)``; ``sample.image_guidance`` 1.5, ``sample.guidance``). With
``s_img = 1`` this is exactly the reference's two-way ``[neg + images, prompt + images]``.

Records: the shapes world (``data.source=shapes``) -- the example is derived from the
record's index by `mmjax.data.shapes_tasks.make_example` (same seed; instruct draws
``model.min_images`` .. ``model.max_images`` source images); otherwise
``{'image': target, 'caption': instruction, 'source_images': [image, ...]}`` (edit also
accepts ``'source_image'``; reconstruct needs only ``'image'``), images as encoded bytes or
uint8 arrays.

A Qwen2.5-VL MLLM (``mllm.family='qwen2_5_vl'``) takes each image as one square of
``model.image_size`` px cut into its patch grid (`mllm_qwen25vl.ImageInputs`:
``input_views [K, patches, patch_dim]``) and M-RoPE positions on that grid.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import BadRecord, image as image_ops, shapes_tasks
from mmjax.diffusion import solvers
from mmjax.errors import ConfigError
from mmjax.models import anyres
from mmjax.models import llava_onevision as lov
from mmjax.systems.metaquery import flops
from mmjax.systems.metaquery import mllm_qwen25vl as mq_qvl
from mmjax.systems.metaquery.bridge import MetaQueryModel
from mmjax.systems.metaquery.prompt import ImageSlots

IMAGE_VIEWS = ("anyres", "single")
SINGLE_IMAGE_TASKS = ("reconstruct", "edit")


@dataclasses.dataclass(frozen=True)
class ImageInputs(ImageSlots):
  """How input images enter the MLLM: ``slots`` (K) per example, ``layout`` of each image's
  tokens (static), ``num_views`` (V) views of ``tile`` x ``tile`` pixels."""
  task: str
  slots: int
  layout: anyres.ImageLayout
  num_views: int
  tile: int
  kind: str                                  # anyres | single
  grid_pinpoints: tuple = ()
  max_views: Optional[int] = None
  vision: Any = None                         # siglip.SiglipConfig (FLOPs)

  @classmethod
  def from_config(cls, task: str, mllm_cfg, model_cfg) -> "ImageInputs":
    """LLaVA-OneVision's views; Qwen2.5-VL: `mllm_qwen25vl.ImageInputs` (one patch grid)."""
    if not isinstance(mllm_cfg, lov.LlavaOnevisionConfig) and not mq_qvl.is_qwen25vl(mllm_cfg):
      raise ConfigError(f"model.task={task!r} reads images: it needs an MLLM with a vision "
                        f"tower (mllm.family='llava_onevision' or 'qwen2_5_vl')")
    slots = 1 if task in SINGLE_IMAGE_TASKS else int(model_cfg.max_images)
    if slots < 1:
      raise ConfigError(f"model.max_images must be >= 1, got {slots}")
    if mq_qvl.is_qwen25vl(mllm_cfg):
      return mq_qvl.ImageInputs.from_config(task, mllm_cfg, model_cfg, slots)
    kind = model_cfg.image_views
    if kind not in IMAGE_VIEWS:
      raise ConfigError(f"model.image_views {kind!r} is not one of {IMAGE_VIEWS}")
    vis = mllm_cfg.vision
    tile, grid = vis.image_size, vis.grid
    if kind == "single":
      layout = anyres.ImageLayout(grid=grid)
    else:
      layout = anyres.anyres_layout((tile, tile), mllm_cfg.grid_pinpoints, tile, grid,
                                    mllm_cfg.max_views)
    return cls(task=task, slots=slots, layout=layout, num_views=layout.num_views, tile=tile,
               kind=kind, grid_pinpoints=tuple(mllm_cfg.grid_pinpoints),
               max_views=mllm_cfg.max_views, vision=vis)

  @property
  def tokens_per_image(self) -> int:
    return self.layout.num_tokens

  @property
  def view_shape(self) -> tuple:
    return (self.slots, self.num_views, self.tile, self.tile, 3)

  @functools.cached_property
  def black(self) -> np.ndarray:
    """A black pixel after SigLIP normalisation ``[3]`` (-1 with mean = std = 0.5)."""
    return anyres.normalize(np.zeros((1, 3), np.uint8))[0]

  def views(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> normalised views ``[V, S, S, 3]`` float32."""
    if image.shape[:2] != (self.tile, self.tile):
      image = image_ops.resize_crop(image, self.tile, "bicubic")
    if self.kind == "single":
      v = image[None]
    else:
      v, layout = anyres.image_views(image, self.grid_pinpoints, self.tile, self.layout.grid,
                                     self.max_views)
      assert layout == self.layout, (layout, self.layout)
    return anyres.normalize(v)

  def vision_flops(self, mllm_cfg) -> float:
    """Forward FLOPs per example of the frozen tower + projector on all K x V views (no
    backward: the image features are a ``stop_gradient``)."""
    return flops.vision_flops(self.vision, mllm_cfg.text.stack.d_model, self.slots,
                              self.num_views)


# ============================================================================ data
def categories_of(config, field: str = "") -> Optional[tuple]:
  """The shapes-world categories of ``field`` (else ``data.categories``); None: all six."""
  text = field or config.data.categories
  cats = tuple(c.strip() for c in text.split(",") if c.strip())
  return cats or None


def shapes_example(system, index: int, seed: Optional[int] = None,
                   categories: Optional[Sequence[str]] = None) -> dict:
  """`shapes_tasks.make_example` for this system's task, resolutions and image counts."""
  c = system.config
  return shapes_tasks.make_example(
      system.task, c.seed if seed is None else seed, index, system.resolution,
      system.images.tile, categories or categories_of(c), min_images=c.model.min_images,
      max_images=system.images.slots)


def preprocess(system, record: dict) -> dict:
  """One example of an image task (see the module docstring): fixed-shape numpy arrays."""
  imgs, task = system.images, system.task
  if "scene" in record and "index" in record:        # a ShapesSource record: derive by index
    record = shapes_example(system, int(record["index"]))
  if "image" not in record:
    raise BadRecord("record has no target 'image'")
  target = image_ops.decode_image(record["image"])
  if task == "reconstruct":
    sources, text = [target], ""
  else:
    sources = record.get("source_images")
    if sources is None and "source_image" in record:
      sources = [record["source_image"]]
    text = record.get("caption")
    if not isinstance(text, str):
      raise BadRecord(f"record has no instruction 'caption' (got {text!r})")
  if not sources or len(sources) > imgs.slots:
    raise BadRecord(f"record has {len(sources or ())} source images; this task takes 1.."
                    f"{imgs.slots} (model.max_images)")
  if target.shape[:2] != (system.resolution, system.resolution):
    target = image_ops.resize_crop(target, system.resolution)
  views = np.empty(imgs.view_shape, np.float32)
  views[:] = imgs.black
  for j, src in enumerate(sources):
    views[j] = imgs.views(image_ops.decode_image(src))
  n = len(sources)
  ids, mask = system.prompts.encode(text, n)
  null_ids, null_mask = system.prompts.encode("", n)
  return {"images": image_ops.to_float(target), "prompt_ids": ids, "prompt_mask": mask,
          "null_ids": null_ids, "null_mask": null_mask, "input_views": views,
          "input_valid": np.arange(imgs.slots) < n}


# ============================================================================ training
def dropout_masks(task: str, rng, batch_size: int, p: float):
  """Per example ``(drop_text, drop_images)`` bool ``[b]`` (see the module docstring)."""
  u = jax.random.uniform(rng, (batch_size,))
  if task == "instruct":
    return u < 2 * p, (u >= p) & (u < 3 * p)
  return jnp.zeros((batch_size,), bool), u < p


def drop_conditions(system, rng, batch):
  """The batch's prompts and views after condition dropout: ``(ids, mask, views, metrics)``;
  a dropped text is the null prompt (the images' placeholders stay), dropped images are
  black."""
  ids, mask, views = batch["prompt_ids"], batch["prompt_mask"], batch["input_views"]
  drop_text, drop_img = dropout_masks(system.task, rng, ids.shape[0],
                                      system.config.model.cond_dropout)
  ids = jnp.where(drop_text[:, None], batch["null_ids"], ids)
  mask = jnp.where(drop_text[:, None], batch["null_mask"], mask)
  black = jnp.asarray(system.images.black, views.dtype)
  views = jnp.where(drop_img.reshape((-1,) + (1,) * (views.ndim - 1)), black, views)
  return ids, mask, views, {"dropped_text": drop_text.mean(), "dropped_image": drop_img.mean()}


# ============================================================================ sampling
def three_way_inputs(system, batch):
  """``(ids, mask, views)`` of the 3B rows ``[null + black; null + images; prompt +
  images]``."""
  views = jnp.asarray(batch["input_views"])
  black = jnp.broadcast_to(jnp.asarray(system.images.black, views.dtype), views.shape)
  cat = lambda *a: jnp.concatenate([jnp.asarray(x) for x in a])
  return (cat(batch["null_ids"], batch["null_ids"], batch["prompt_ids"]),
          cat(batch["null_mask"], batch["null_mask"], batch["prompt_mask"]),
          cat(black, views, views))


def sample_latents(system, params, conds, noise, guidance=None, image_guidance=None):
  """DPM-Solver++ 2M from ``noise [b, ...]`` with three-way CFG: one DiT call on the 3B
  conditions ``conds = [uncond; image only; full]`` per step, one ``lax.scan``."""
  s = system.config.sample
  s_txt = s.guidance if guidance is None else guidance
  s_img = s.image_guidance if image_guidance is None else image_guidance

  def batched(x, t):
    return system.apply(params, x, t, conds, method=MetaQueryModel.velocity)

  return solvers.dpm_solver_2m_sample(solvers.cfg_three_way(batched, s_img, s_txt), noise,
                                      system.sigmas, system.timesteps)


def generate_batch(system, params, batch, rng, guidance=None, image_guidance=None):
  """Jittable: a preprocessed batch (``prompt_ids`` ... ``input_views``) -> images float
  ``[b, R, R, 3]`` in [-1, 1]. Conditions, solver loop and decode in one program."""
  b = batch["prompt_ids"].shape[0]
  conds = system.apply(params, *three_way_inputs(system, batch),
                       method=MetaQueryModel.condition)
  noise = jax.random.normal(rng, (b,) + system.latent_shape, jnp.float32)
  z = sample_latents(system, params, conds, noise, guidance, image_guidance)
  return system.apply(params, z, method=MetaQueryModel.decode_latents)


SAMPLE_KEYS = ("prompt_ids", "prompt_mask", "null_ids", "null_mask", "input_views")


def generate_fn(system):
  """``jax.jit(generate_batch)`` for this system, compiled once per batch shape:
  ``fn(params, {k: [b, ...] for k in SAMPLE_KEYS}, rng, guidance, image_guidance)``."""
  fn = system.__dict__.get("_task_generate_jit")
  if fn is None:
    fn = system.__dict__["_task_generate_jit"] = jax.jit(
        functools.partial(generate_batch, system))
  return fn


def generate(system, params, examples: Sequence[dict], rng, guidance=None,
             image_guidance=None, batch: int = 32) -> np.ndarray:
  """Preprocessed examples -> uint8 images ``[len, R, R, 3]`` (one compiled program per
  batch shape; with more than ``batch`` examples the last chunk is padded with copies of
  its first example). Scales default to ``sample.guidance`` / ``sample.image_guidance``."""
  s = system.config.sample
  guidance = float(s.guidance if guidance is None else guidance)
  image_guidance = float(s.image_guidance if image_guidance is None else image_guidance)
  gen = generate_fn(system)
  out = []
  for i in range(0, len(examples), batch):
    chunk = list(examples[i:i + batch])
    pad = batch - len(chunk) if len(examples) > batch else 0
    chunk += [chunk[0]] * pad
    arrays = {k: np.stack([e[k] for e in chunk]) for k in SAMPLE_KEYS}
    imgs = gen(params, arrays, jax.random.fold_in(rng, i), guidance, image_guidance)
    out.append(image_ops.to_uint8(np.asarray(imgs))[:len(chunk) - pad])
  return np.concatenate(out)

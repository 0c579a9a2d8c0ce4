"""MetaQuery with a frozen Qwen2.5-VL MLLM (MetaQuery-L: Qwen2.5-VL-3B, -XL: 7B).

What the family adds to the bridge (`bridge.MetaQueryModel`, ``mllm.family='qwen2_5_vl'``):

* **Prompts**: Qwen2.5-VL's chat template (the reference passes the system prompt as a text
  item), images as ``<|vision_start|><|image_pad|><|vision_end|>`` with ``<|image_pad|>``
  repeated once per image token (`prompt.PromptFormat` with ``image_token='<|image_pad|>'``).
* **M-RoPE positions** of ``prompt | begin | queries | end | suffix`` (`positions`):
  text-only prompts have equal temporal / height / width positions (counting real tokens,
  so left padding changes nothing: the LM's default positions); with input images every
  image token sits at ``start + (frame, row, column)`` of its merged grid and the text after
  it continues from ``start + max(rows, columns)`` -- transformers' ``get_rope_index``.
* **Input images** (`ImageInputs`, the image tasks): the reference feeds images at their own
  size through the processor (dynamic resolution, 256..1280 x 28^2 pixels). Static shapes
  need one grid, so every input image is resized (shorter side) and centre-cropped to a
  square of ``model.image_size`` pixels (default 512, the reference's target size), then
  goes through Qwen2.5-VL's processor (`qwen2_5_vl.preprocess_image`: ``smart_resize`` with
  ``model.image_min_pixels`` / ``image_max_pixels``, default the reference's 256 / 1280 x
  28^2): 512 px -> 504 px, 36 x 36 patches, 324 image tokens. ``input_views`` hold the
  patches ``[K, patches, 3 * 2 * 14 * 14]``; a black image is every patch value
  ``-mean / std`` of its channel.

Example::

    system = MetaQuery(mcfg.load("configs/metaquery.py:xl", [
        "--config.mllm.path=/ckpt/Qwen2.5-VL-7B-Instruct", ...]))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from mmjax.data import image as image_ops
from mmjax.models import qwen2_5_vl as qvl
from mmjax.systems.metaquery import flops
from mmjax.systems.metaquery.prompt import ImageSlots

IMAGE_TOKEN = "<|image_pad|>"
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28    # the reference's processor settings
IMAGE_SIZE = 512


def is_qwen25vl(mllm_cfg) -> bool:
  return isinstance(mllm_cfg, qvl.Qwen25VLConfig)


def positions(cfg: qvl.Qwen25VLConfig, ids, mask, grid, num_images: int):
  """M-RoPE positions ``[3, b, len]`` of full sequences ``ids [b, len]`` (placeholder ids
  anywhere but the prompt's image tokens) whose image runs all have the patch ``grid``
  ``(t, h, w)``; ``num_images``: at most that many images in the batch (static)."""
  return qvl.mrope_positions(ids, mask, (tuple(grid),) * max(int(num_images), 1),
                             cfg.image_token_id, cfg.vision.merge_size)[0]


def vision_features(mllm, cfg: qvl.Qwen25VLConfig, views, grid):
  """``views [b, K, patches, patch_dim]`` -> image tokens ``[b, K*T, D]`` (the tower and its
  merger on every image; images of one grid are batched)."""
  b, k, p, d = views.shape
  feats = mllm.image_features(views.reshape(b * k * p, d), (tuple(grid),) * (b * k))
  return feats.reshape(b, -1, feats.shape[-1])


def init_vision(mllm, cfg: qvl.Qwen25VLConfig, dtype):
  """Runs the tower once on the smallest image (creates its params)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  m = cfg.vision.merge_size
  return mllm.image_features(jnp.zeros((m * m, cfg.vision.patch_dim), dtype), ((1, m, m),))


@dataclasses.dataclass(frozen=True)
class ImageInputs(ImageSlots):
  """How input images enter a Qwen2.5-VL MLLM (the interface of `tasks.ImageInputs`):
  ``slots`` (K) per example, each a ``tile`` x ``tile`` square cut into the patch ``grid``."""
  task: str
  slots: int
  tile: int
  grid: tuple                                # (1, h, w) in patches
  settings: Any                              # qwen2_5_vl.ImageSettings
  vision: Any = None                         # qwen2_5_vl_vision.VisionConfig
  kind: str = "qwen2_5_vl"

  @classmethod
  def from_config(cls, task: str, mllm_cfg, model_cfg, slots: int) -> "ImageInputs":
    v = mllm_cfg.vision
    settings = qvl.ImageSettings(
        min_pixels=int(model_cfg.get("image_min_pixels", 0) or MIN_PIXELS),
        max_pixels=int(model_cfg.get("image_max_pixels", 0) or MAX_PIXELS),
        patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        merge_size=v.merge_size)
    tile = int(model_cfg.get("image_size", 0) or IMAGE_SIZE)
    h, w = qvl.smart_resize(tile, tile, v.patch_size * v.merge_size, settings.min_pixels,
                            settings.max_pixels)
    return cls(task=task, slots=slots, tile=tile, settings=settings, vision=v,
               grid=(1, h // v.patch_size, w // v.patch_size))

  @property
  def layout(self) -> tuple:
    """What the model needs to know of every image: its patch grid."""
    return self.grid

  @property
  def num_patches(self) -> int:
    return int(np.prod(self.grid))

  @property
  def tokens_per_image(self) -> int:
    return self.num_patches // self.settings.merge_size ** 2

  @property
  def patch_dim(self) -> int:
    s = self.settings
    return 3 * s.temporal_patch_size * s.patch_size ** 2

  @property
  def view_shape(self) -> tuple:
    return (self.slots, self.num_patches, self.patch_dim)

  @functools.cached_property
  def black(self) -> np.ndarray:
    """One patch of a black image ``[patch_dim]`` (channel-major: -mean/std per channel)."""
    mean, std = np.asarray(self.settings.mean), np.asarray(self.settings.std)
    return np.repeat((-mean / std).astype(np.float32), self.patch_dim // 3)

  def views(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> patches ``[patches, patch_dim]`` float32."""
    image = image_ops.decode_image(image)
    if image.shape[:2] != (self.tile, self.tile):
      image = image_ops.resize_crop(image, self.tile, "bicubic")
    patches, grid = qvl.preprocess_image(image, self.settings)
    assert tuple(grid) == self.grid, (grid, self.grid)
    return patches

  def vision_flops(self, mllm_cfg) -> float:
    """Forward FLOPs per example of the frozen tower + merger on the K images."""
    return flops.qwen25vl_vision_flops(self.vision, self.grid, self.slots)


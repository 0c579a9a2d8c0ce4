"""Qwen2.5-VL: the vision tower (``qwen2_5_vl_vision``) -> image tokens spliced at the
``<|image_pad|>`` positions of a Qwen2 LM whose rotary embedding is M-RoPE.

M-RoPE: every token has three positions (temporal, height, width) and the rotary
frequencies are split in ``mrope_section`` parts (16, 24, 24 for head_dim 128), each turned
by one of them (``core.TransformerConfig.rope_sections``). Text tokens have the same value on
all three, counting up; an image's tokens sit at ``start + (frame, row, column)`` of its
merged grid, and the text after it continues from ``start + max(rows, columns)``
(``mrope_positions``).

The processor: an image is resized (bicubic) to the nearest size whose sides are multiples
of 28 and whose area lies in ``[min_pixels, max_pixels]`` (``smart_resize``), normalised with
the CLIP mean / std, duplicated in time and cut into flattened 14 x 14 x 2 patches
(``preprocess_image``); the chat template puts ``<|vision_start|><|image_pad|><|vision_end|>``
where an image goes and ``encode`` repeats ``<|image_pad|>`` once per image token.

Example::

    import jax.numpy as jnp
    from mmjax.interop import load
    from mmjax.models import qwen2_5_vl as qvl
    path = "/ckpt/Qwen2.5-VL-3B-Instruct"
    module, params = load(path)
    proc = qvl.Processor.from_dir(path)
    pixels, grids = proc.images([image_uint8])                 # [patches, 1176], ((1, h, w),)
    prompt = proc.chat([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the image."}]}])
    ids = proc.encode(prompt, grids)                          # <|image_pad|> expanded
    logits = module.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(pixels),
                          grids=grids)                        # [1, len, vocab]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.data import image as image_ops
from mmjax.interop.tables import Family, prefixed
from mmjax.models import image_tokens, llava_onevision, qwen2
from mmjax.models import qwen2_5_vl_vision as vision_lib
from mmjax.models.lm import DecoderLM, LMConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Vision tower, M-RoPE language model and the special token ids."""
  vision: vision_lib.VisionConfig
  text: LMConfig                       # stack.rope_sections = mrope_section
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  family: str = "qwen2_5_vl"


def mrope_positions(input_ids, attention_mask, grids: Sequence[Sequence[int]],
                    image_token_id: int, merge_size: int = 2):
  """M-RoPE positions ``[3, batch, len]`` and each row's ``delta [batch]`` (the next text
  position minus the row's real length: decoding token k of a row uses ``k + delta``).

  ``grids``: the static patch grids ``(t, h, w)`` of the images in reading order (row 0
  first); row-major over the batch, every image is a run of ``t*h*w / merge**2`` image tokens.
  Real text tokens count up from 0 on all three axes; an image's tokens are ``start +
  (frame, row, column)`` in its merged grid, and the next token is at ``start + max(rows,
  columns)``. Pads (``attention_mask`` False) get 0. Traceable (``jnp``; grids static).
  """
  ids = jnp.asarray(input_ids)
  real = (jnp.ones(ids.shape, bool) if attention_mask is None
          else jnp.asarray(attention_mask, bool))
  is_img = (ids == image_token_id) & real
  inc = real.astype(jnp.int32)
  offsets = jnp.zeros((3,) + ids.shape, jnp.int32)
  if grids:
    geo = np.array([(t, h // merge_size, w // merge_size) for t, h, w in grids], np.int32)
    counts = geo.prod(axis=1)
    ends = jnp.asarray(np.cumsum(counts))
    g = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, int(counts.sum()) - 1)
    k = jnp.searchsorted(ends, g, side="right")                 # image of each image token
    local = g - (ends[k] - jnp.asarray(counts)[k])
    gh, gw = jnp.asarray(geo[:, 1])[k], jnp.asarray(geo[:, 2])[k]
    rc = (local // (gh * gw), (local // gw) % gh, local % gw)
    offsets = jnp.where(is_img[None], jnp.stack(rc).reshape((3,) + ids.shape), 0)
    last = (local == jnp.asarray(counts)[k] - 1).reshape(ids.shape)
    advance = jnp.maximum(gh, gw).reshape(ids.shape)
    inc = jnp.where(is_img, jnp.where(last, advance, 0), inc)
  start = jnp.cumsum(inc, axis=1) - inc                          # exclusive running position
  pos = jnp.where(real[None], start[None] + offsets, 0)
  delta = jnp.max(jnp.where(real[None], pos, -1), axis=(0, 2)) + 1 - real.sum(axis=1)
  return pos, delta


class Qwen25VL(nn.Module):
  """``apply({'params': p}, input_ids, pixels=None, grids=(), attention_mask=None,
  positions=None, cache=None)`` -> logits ``[batch, len, vocab]`` (fp32), and the cache.

  pixels: ``[patches, patch_dim]`` of every image of the batch in reading order (the
  processor's ``images``); grids: their static ``(t, h, w)``; input_ids hold each image's
  ``num_tokens`` ``<|image_pad|>`` ids in the same order. positions default to
  ``mrope_positions`` (without a cache; with one pass them: ``k + delta`` on decode steps).
  """
  config: Qwen25VLConfig

  def setup(self):
    self.visual = vision_lib.VisionTower(self.config.vision)
    self.language_model = DecoderLM(self.config.text)

  def image_features(self, pixels, grids):
    """Patches -> image tokens ``[tokens, d_model]``."""
    return self.visual(pixels, grids)

  def embed(self, input_ids, pixels=None, grids=()):
    """Token embeddings with the image tokens spliced in ``[batch, len, d_model]``."""
    x = self.language_model.embed(input_ids)
    if pixels is None:
      return x
    feats = self.image_features(pixels, grids).astype(x.dtype)
    return image_tokens.splice(x, input_ids == self.config.image_token_id, feats)

  def positions(self, input_ids, attention_mask=None, grids=()):
    """M-RoPE positions ``[3, batch, len]`` (see ``mrope_positions``)."""
    return mrope_positions(input_ids, attention_mask, grids, self.config.image_token_id,
                           self.config.vision.merge_size)[0]

  def features(self, input_ids, pixels=None, grids=(), attention_mask=None, positions=None,
               cache=None):
    """Final hidden states after the final norm ``[batch, len, d_model]`` (and the cache)."""
    x = self.embed(input_ids, pixels, grids)
    if positions is None and cache is None:
      positions = self.positions(input_ids, attention_mask, grids)
    return self.language_model.features(None, attention_mask, positions, cache,
                                        inputs_embeds=x)

  def __call__(self, input_ids, pixels=None, grids=(), attention_mask=None, positions=None,
               cache=None):
    out = self.features(input_ids, pixels, grids, attention_mask, positions, cache)
    if cache is None:
      return self.language_model.logits(out)
    return self.language_model.logits(out[0]), out[1]


# ----------------------------------------------------------------------------- processor
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple:
  """The reference resize rule: sides rounded to multiples of ``factor``; when the area
  leaves ``[min_pixels, max_pixels]`` both sides are scaled by one factor (floored when
  shrinking, ceiled when growing), keeping the aspect ratio as near as the grid allows.

  Example::

    smart_resize(480, 640)        # (476, 644): 17 x 23 patches of 28 px
    smart_resize(40, 60)          # (56, 84): 28 x 56 has too few pixels, scaled up
  """
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
  h, w = round(height / factor) * factor, round(width / factor) * factor
  if h * w > max_pixels:
    scale = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / scale / factor) * factor)
    w = max(factor, math.floor(width / scale / factor) * factor)
  elif h * w < min_pixels:
    scale = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * scale / factor) * factor
    w = math.ceil(width * scale / factor) * factor
  return h, w


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """The image processor's settings (``preprocessor_config.json``)."""
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD

  @classmethod
  def from_json(cls, hf: dict) -> "ImageSettings":
    size = hf.get("size") or {}
    return cls(min_pixels=hf.get("min_pixels", size.get("shortest_edge", 56 * 56)),
               max_pixels=hf.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
               patch_size=hf.get("patch_size", 14),
               temporal_patch_size=hf.get("temporal_patch_size", 2),
               merge_size=hf.get("merge_size", 2),
               mean=tuple(hf.get("image_mean", CLIP_MEAN)),
               std=tuple(hf.get("image_std", CLIP_STD)))


def preprocess_image(image: np.ndarray, settings: ImageSettings = ImageSettings()):
  """uint8 ``[H, W, 3]`` (grey / RGBA arrays and encoded bytes are made RGB first) ->
  (patches ``[h*w, 3 * T * P * P]`` float32, grid ``(1, h, w)``).

  Resized with ``smart_resize`` (PIL bicubic), scaled to [0, 1], normalised, then cut into
  P x P patches in merge-block order, each flattened as (channel, time, row, column) with
  the image repeated over the ``T`` frames of a temporal patch.
  """
  s = settings
  image = image_ops.decode_image(image)
  p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
  h, w = smart_resize(image.shape[0], image.shape[1], p * m, s.min_pixels, s.max_pixels)
  x = image_ops.resize(image, (h, w), "bicubic").astype(np.float32) / 255.0
  x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)   # [h, w, C]
  c, gh, gw = x.shape[2], h // p, w // p
  x = x.reshape(gh // m, m, p, gw // m, m, p, c)
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)                  # [bh, bw, mh, mw, C, ph, pw]
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
  return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def preprocess_images(images: Sequence[np.ndarray], settings: ImageSettings = ImageSettings()):
  """uint8 images -> (patches of all ``[patches, patch_dim]`` float32, grids ``((1, h, w),
  ...)``): the model's ``pixels`` and ``grids`` (the reference's ``pixel_values`` and
  ``image_grid_thw``)."""
  out = [preprocess_image(im, settings) for im in images]
  return np.concatenate([o[0] for o in out]), tuple(o[1] for o in out)


def chat_text(messages: list, add_generation_prompt: bool = True) -> str:
  """The Qwen2.5-VL chat format (what its checkpoints' template renders): a default system
  turn when the first is not one, ``<|im_start|>role\\n ... <|im_end|>\\n`` turns, images as
  ``<|vision_start|><|image_pad|><|vision_end|>`` (videos with ``<|video_pad|>``)."""
  out = []
  for i, msg in enumerate(messages):
    if i == 0 and msg["role"] != "system":
      out.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    out.append(f"<|im_start|>{msg['role']}\n")
    content = msg["content"]
    if isinstance(content, str):
      out.append(content)
    else:
      for part in content:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
          out.append("<|vision_start|><|image_pad|><|vision_end|>")
        elif part.get("type") == "video" or "video" in part:
          out.append("<|vision_start|><|video_pad|><|vision_end|>")
        elif "text" in part:
          out.append(part["text"])
    out.append("<|im_end|>\n")
  if add_generation_prompt:
    out.append("<|im_start|>assistant\n")
  return "".join(out)


class Processor(llava_onevision.Processor):
  """Qwen2.5-VL's processor: ``tokenizer.json``, the chat template (the checkpoint's jinja
  template, else ``chat_text``), ``images`` -> patches and grids, and ``encode`` with each
  ``<|image_pad|>`` repeated once per image token.

  Example::

    proc = Processor.from_dir("/ckpt/Qwen2.5-VL-3B-Instruct")
    pixels, grids = proc.images([image])
    ids = proc.encode(proc.chat([{"role": "user", "content": [{"type": "image"},
                                  {"type": "text", "text": "What is this?"}]}]), grids)
  """

  def __init__(self, tokenizer, chat_template: Optional[str] = None,
               image_token: str = "<|image_pad|>", settings: ImageSettings = ImageSettings()):
    super().__init__(tokenizer, chat_template, image_token)
    self.settings = settings

  @classmethod
  def from_dir(cls, path: str, image_token: str = "<|image_pad|>") -> "Processor":
    """Tokenizer, chat template and ``preprocessor_config.json`` of a checkpoint directory."""
    proc = super().from_dir(path, image_token)
    f = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(f):
      with open(f) as fh:
        proc.settings = ImageSettings.from_json(json.load(fh))
    return proc

  def chat(self, messages: list, add_generation_prompt: bool = True) -> str:
    if self.chat_template:
      return super().chat(messages, add_generation_prompt)
    return chat_text(messages, add_generation_prompt)

  def images(self, images: Sequence[np.ndarray]):
    """``preprocess_images`` with this checkpoint's settings."""
    return preprocess_images(images, self.settings)

  def encode(self, text: str, grids: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """Token ids with the k-th ``<|image_pad|>`` repeated ``t*h*w / merge**2`` times."""
    unit = self.settings.merge_size ** 2
    return super().encode(text, [_Tokens(int(np.prod(g)) // unit) for g in grids])


@dataclasses.dataclass(frozen=True)
class _Tokens:
  num_tokens: int


# ----------------------------------------------------------------------------- interop
def _text_dict(hf: dict) -> dict:
  """The text fields: ``text_config`` (transformers 5) or the top level (hub checkpoints)."""
  text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"})
  rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind not in ("default", "mrope"):
    raise NotImplementedError(f"Qwen2.5-VL rope_type {kind!r} (only M-RoPE)")
  theta = rp.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 1000000.0)))
  text["mrope_section"] = tuple(rp.get("mrope_section", (16, 24, 24)))
  text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
  text.pop("rope_scaling", None)
  text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False)
                                     or text.get("tie_word_embeddings", False))
  return text


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> Qwen25VLConfig:
  """``Qwen25VLConfig`` from a ``Qwen2_5_VLConfig`` dict (nested or the hub's flat layout)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
            remat_policy=remat_policy, attention_impl=attention_impl)
  text = _text_dict(hf)
  # alone, the LM is a Qwen2: M-RoPE with equal positions on every axis is plain RoPE
  lm = qwen2.from_hf_config(text, **kw)
  lm = dataclasses.replace(lm, stack=lm.stack.replace(rope_sections=text["mrope_section"]))
  return Qwen25VLConfig(
      vision=vision_lib.from_hf_config(hf["vision_config"], **kw), text=lm,
      image_token_id=hf.get("image_token_id", 151655),
      video_token_id=hf.get("video_token_id", 151656),
      vision_start_token_id=hf.get("vision_start_token_id", 151652),
      vision_end_token_id=hf.get("vision_end_token_id", 151653))


def to_hf_config(cfg: Qwen25VLConfig) -> dict:
  """The ``Qwen2_5_VLForConditionalGeneration`` ``config.json`` dict (nested, transformers 5)."""
  text = qwen2.to_hf_config(cfg.text)
  for k in ("architectures", "tie_word_embeddings", "rope_theta"):
    text.pop(k, None)
  text.update({"model_type": "qwen2_5_vl_text",
               "rope_parameters": {"rope_type": "default", "rope_theta": cfg.text.stack.rope_theta,
                                   "mrope_section": list(cfg.text.stack.rope_sections)}})
  return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "text_config": text, "vision_config": vision_lib.to_hf_config(cfg.vision),
          "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
          "vision_start_token_id": cfg.vision_start_token_id,
          "vision_end_token_id": cfg.vision_end_token_id,
          "tie_word_embeddings": cfg.text.tie_embeddings}


def hf_table(cfg: Qwen25VLConfig) -> list:
  """Reference names as stored (``visual.*``, ``model.*`` for the LM, ``lm_head.weight``)."""
  return (prefixed(vision_lib.hf_table(cfg.vision, "visual."), "visual/")
          + prefixed(qwen2.hf_table(cfg.text, "model.", "lm_head.weight"), "language_model/"))


def hf_ignore(cfg: Qwen25VLConfig) -> tuple:
  return (r".*rotary_emb\.inv_freq", r".*rotary_pos_emb\.inv_freq") + (
      (r"lm_head\.weight",) if cfg.text.tie_embeddings else ())


# transformers 5's in-memory names -> the stored ones
RENAMES = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."))


def init_args(cfg: Qwen25VLConfig) -> tuple:
  m = cfg.vision.merge_size
  return (jnp.zeros((1, 1), jnp.int32), jnp.zeros((m * m, cfg.vision.patch_dim)), ((1, m, m),))


HF_FAMILY = Family(
    name="qwen2_5_vl", model_types=("qwen2_5_vl",),
    architectures=("Qwen2_5_VLForConditionalGeneration",), from_hf_config=from_hf_config,
    to_hf_config=to_hf_config, make_model=Qwen25VL, init_args=init_args, table=hf_table,
    ignore=hf_ignore, renames=lambda cfg: RENAMES)

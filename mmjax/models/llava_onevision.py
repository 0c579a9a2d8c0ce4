"""LLaVA-OneVision: SigLIP tower -> 2-layer GELU projector -> Qwen2, image features spliced
at the ``<image>`` tokens (one ``<image>`` per feature token, as transformers' processor
expands them).

Per image: the views (``anyres.image_views``: base view + grid crops, or
``anyres.single_view``) go through the tower; the last tapped layer (``feature_layer``,
-1 = the tower's last layer, pre post-LayerNorm) is projected; the base view's features come
first, then the grid picture (unpadded, maybe shrunk) with ``image_newline`` after each row
(a base-only image gets one newline). Layouts are static (``anyres.ImageLayout``).

Example::

    import jax.numpy as jnp
    from mmjax.interop import load_hf
    from mmjax.models import anyres, llava_onevision as lo
    path = "/ckpt/llava-onevision-qwen2-0.5b-ov-hf"
    module, params = load_hf(path)
    cfg = module.config
    views, layout = anyres.image_views(image_uint8, cfg.grid_pinpoints, cfg.vision.image_size,
                                       cfg.vision.grid, cfg.max_views)
    proc = lo.Processor.from_dir(path)
    prompt = proc.chat([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the image."}]}])
    ids = proc.encode(prompt, [layout])                       # <image> expanded
    logits = module.apply({"params": params}, jnp.asarray(ids)[None],
                          jnp.asarray(anyres.normalize(views)), layouts=(layout,))
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

from mmjax import core
from mmjax.interop.tables import IDENTITY, LINEAR, Family, Rule, prefixed
from mmjax.models import image_tokens, qwen2, siglip
from mmjax.models.anyres import ImageLayout
from mmjax.models.lm import DecoderLM, LMConfig


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionConfig:
  """Vision tower (already cut at the feature layer), language model and image plumbing."""
  vision: siglip.SiglipConfig
  text: LMConfig
  image_token_id: int
  grid_pinpoints: tuple                # ((height, width), ...) anyres grid resolutions
  max_views: Optional[int] = 9         # 'anyres_max_9': shrink pictures above 9 views
  feature_select: str = "full"         # 'full' | 'default' (drop the first token)
  projector_bias: bool = True
  hf_extra: str = "{}"                 # JSON of reference-config fields carried to export
  family: str = "llava_onevision"


class LlavaOnevision(nn.Module):
  """``apply({'params': p}, input_ids, images=None, layouts=(), attention_mask=None,
  positions=None, cache=None)`` -> logits ``[batch, len, vocab]`` (and the cache).

  images: normalised views ``[views, S, S, 3]`` of every image in the batch, image by image
  in reading order (row 0 first); layouts: one static ``ImageLayout`` per image; input_ids
  hold exactly ``layout.num_tokens`` image tokens per image in the same order.
  """
  config: LlavaOnevisionConfig

  def setup(self):
    c = self.config
    s = c.text.stack
    self.vision_tower = siglip.SiglipVision(c.vision)
    self.projector = core.Mlp(s.d_model, act="gelu", use_bias=c.projector_bias,
                              out_dim=s.d_model, dtype=s.dtype, param_dtype=s.param_dtype,
                              init_std=s.init_std)
    self.image_newline = self.param(
        "image_newline", nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(s.d_model)), ("embed",)),
        (s.d_model,), s.param_dtype)
    self.language_model = DecoderLM(c.text)

  def image_features(self, images):
    """Views ``[n, S, S, 3]`` -> projected features ``[n, grid*grid, d_model]``."""
    feats = self.vision_tower(images, output_hidden_states=True)["hidden_states"][-1]
    if self.config.feature_select == "default":
      feats = feats[:, 1:]
    return self.projector(feats)

  def pack(self, feats, layouts: Sequence[ImageLayout]):
    """Per-view features -> the image tokens of all images ``[tokens, d_model]``."""
    return image_tokens.pack(feats, layouts, self.image_newline)

  def embed(self, input_ids, images=None, layouts: Sequence[ImageLayout] = ()):
    """Token embeddings with the image features spliced in ``[batch, len, d_model]``."""
    x = self.language_model.embed(input_ids)
    if images is None:
      return x
    feats = self.pack(self.image_features(images), layouts).astype(x.dtype)
    return image_tokens.splice(x, input_ids == self.config.image_token_id, feats)

  def __call__(self, input_ids, images=None, layouts: Sequence[ImageLayout] = (),
               attention_mask=None, positions=None, cache=None):
    x = self.embed(input_ids, images, layouts)
    return self.language_model(None, attention_mask, positions, cache, inputs_embeds=x)


# ----------------------------------------------------------------------------- processor
class Processor:
  """Text side of LLaVA-OneVision: ``tokenizer.json`` through the ``tokenizers`` library,
  the checkpoint's chat template (jinja), and ``<image>`` expansion to each layout's tokens.

  Example::

    proc = Processor.from_dir("/ckpt/llava-onevision-qwen2-0.5b-ov-hf")
    prompt = proc.chat([{"role": "user", "content": [{"type": "image"},
                        {"type": "text", "text": "What is this?"}]}])
    ids = proc.encode(prompt, [layout])
  """

  def __init__(self, tokenizer, chat_template: Optional[str], image_token: str = "<image>"):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.image_token = image_token
    self.image_token_id = tokenizer.token_to_id(image_token)

  @classmethod
  def from_dir(cls, path: str, image_token: str = "<image>") -> "Processor":
    """Reads ``tokenizer.json`` and the chat template (``chat_template.jinja``,
    ``chat_template.json`` or ``tokenizer_config.json``)."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    template = None
    for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template"),
                      ("tokenizer_config.json", "chat_template")):
      f = os.path.join(path, name)
      if os.path.exists(f):
        with open(f) as fh:
          template = fh.read() if key is None else json.load(fh).get(key)
        if template:
          break
    return cls(tok, template, image_token)

  def chat(self, messages: list, add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` with the checkpoint's chat template (sandboxed jinja, the
    ``{% generation %}`` tag rendered as its body)."""
    if not self.chat_template:
      raise ValueError("this checkpoint has no chat template")
    return render_chat(self.chat_template, messages, add_generation_prompt)

  def encode(self, text: str, layouts: Sequence[ImageLayout] = ()) -> np.ndarray:
    """Token ids with the k-th ``<image>`` repeated ``layouts[k].num_tokens`` times."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    out, k = [], 0
    for i in ids:
      if i == self.image_token_id:
        if k >= len(layouts):
          raise ValueError(f"the text has more {self.image_token} than the {len(layouts)} "
                           f"layouts given")
        out.extend([i] * layouts[k].num_tokens)
        k += 1
      else:
        out.append(i)
    if k != len(layouts):
      raise ValueError(f"{len(layouts)} layouts for {k} {self.image_token} in the text")
    return np.asarray(out, np.int32)


def render_chat(template: str, messages: list, add_generation_prompt: bool = True) -> str:
  """A transformers-style chat template rendered with ``messages``."""
  import jinja2
  from jinja2 import ext, sandbox

  class Generation(ext.Extension):   # marks assistant text for training masks; render as is
    tags = {"generation"}

    def parse(self, parser):
      next(parser.stream)
      return parser.parse_statements(("name:endgeneration",), drop_needle=True)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(messages=messages,
                                          add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------------------- interop
KEEP = ("video_token_index", "projector_hidden_act", "vision_feature_layer")


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> LlavaOnevisionConfig:
  """``LlavaOnevisionConfig`` from a ``LlavaOnevisionConfig`` dict; the vision tower is cut
  after ``vision_feature_layer``."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
            attention_impl=attention_impl)
  vis, text = dict(hf["vision_config"]), dict(hf["text_config"])
  if text.get("model_type", "qwen2") != "qwen2":
    raise NotImplementedError(f"LLaVA-OneVision with a {text['model_type']!r} language model")
  layer = hf.get("vision_feature_layer", -1)
  if not isinstance(layer, int):
    raise NotImplementedError(f"vision_feature_layer {layer!r}: only one layer is supported")
  if hf.get("projector_hidden_act", "gelu") != "gelu":
    raise NotImplementedError(f"projector_hidden_act {hf['projector_hidden_act']!r}")
  depth = layer % (vis["num_hidden_layers"] + 1)   # hidden_states[layer] = after `depth` layers
  vis["vision_use_head"] = False
  vision = siglip.from_hf_config(vis, num_layers=depth, **kw)
  if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
    text["tie_word_embeddings"] = hf["tie_word_embeddings"]
  text_cfg = qwen2.from_hf_config(text, scan_layers=scan_layers, **kw)
  aspect = hf.get("vision_aspect_ratio", "anyres_max_9")
  max_views = int(aspect[len("anyres_max_"):]) if aspect.startswith("anyres_max_") else None
  pins = hf.get("image_grid_pinpoints") or [[384 * i, 384 * j] for i in range(1, 7)
                                            for j in range(1, 7)]
  return LlavaOnevisionConfig(
      vision=vision, text=text_cfg, image_token_id=hf.get("image_token_index", 151646),
      grid_pinpoints=tuple(tuple(p) for p in pins), max_views=max_views,
      feature_select=hf.get("vision_feature_select_strategy", "full"),
      projector_bias=hf.get("multimodal_projector_bias", True),
      hf_extra=json.dumps({k: hf[k] for k in KEEP if k in hf}))


def to_hf_config(cfg: LlavaOnevisionConfig) -> dict:
  """The ``LlavaOnevisionForConditionalGeneration`` ``config.json`` dict (the exported
  tower ends at the feature layer, so ``vision_feature_layer`` is -1)."""
  hf = json.loads(cfg.hf_extra)
  text = qwen2.to_hf_config(cfg.text)
  hf.update({
      "architectures": ["LlavaOnevisionForConditionalGeneration"],
      "model_type": "llava_onevision", "vision_config": siglip.to_hf_config(cfg.vision),
      "text_config": text, "image_token_index": cfg.image_token_id,
      "image_grid_pinpoints": [list(p) for p in cfg.grid_pinpoints],
      "vision_aspect_ratio": (f"anyres_max_{cfg.max_views}" if cfg.max_views else "anyres"),
      "vision_feature_layer": -1, "vision_feature_select_strategy": cfg.feature_select,
      "multimodal_projector_bias": cfg.projector_bias, "projector_hidden_act": "gelu",
      "tie_word_embeddings": cfg.text.tie_embeddings})
  hf["vision_config"]["vision_use_head"] = False
  return hf


def hf_table(cfg: LlavaOnevisionConfig) -> list:
  """Reference names as stored on disk (what ``save_pretrained`` writes: ``vision_tower.*``,
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head``,
  ``image_newline``) -> ours."""
  p = "multi_modal_projector."
  return ([Rule("image_newline", "image_newline", IDENTITY)]
          + prefixed(siglip.hf_table(cfg.vision, "vision_tower."), "vision_tower/")
          + [Rule(p + "linear_1.weight", "projector/fc1/kernel", LINEAR),
             Rule(p + "linear_1.bias", "projector/fc1/bias", IDENTITY),
             Rule(p + "linear_2.weight", "projector/fc2/kernel", LINEAR),
             Rule(p + "linear_2.bias", "projector/fc2/bias", IDENTITY)]
          + prefixed(qwen2.hf_table(cfg.text, "language_model.model.",
                                    "language_model.lm_head.weight"), "language_model/"))


def hf_ignore(cfg: LlavaOnevisionConfig) -> tuple:
  return (siglip.hf_ignore(cfg.vision, "vision_tower.")
          + (r".*rotary_emb\.inv_freq",)
          + ((r"language_model\.lm_head\.weight",) if cfg.text.tie_embeddings else ()))


# other layouts of the same weights -> the stored one: the hub's SigLIP prefix and
# transformers 5's in-memory names (``model.language_model.*`` ...)
RENAMES = ((r"^vision_tower\.vision_model\.", "vision_tower."),
           (r"^model\.vision_tower\.", "vision_tower."),
           (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
           (r"^model\.language_model\.", "language_model.model."),
           (r"^lm_head\.", "language_model.lm_head."),
           (r"^model\.image_newline$", "image_newline"))


def init_args(cfg: LlavaOnevisionConfig) -> tuple:
  return (jnp.zeros((1, 1), jnp.int32),
          jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3)),
          (ImageLayout(grid=cfg.vision.grid),))


HF_FAMILY = Family(
    name="llava_onevision", model_types=("llava_onevision",),
    architectures=("LlavaOnevisionForConditionalGeneration",), from_hf_config=from_hf_config,
    to_hf_config=to_hf_config, make_model=LlavaOnevision, init_args=init_args, table=hf_table,
    ignore=hf_ignore, renames=lambda cfg: RENAMES)

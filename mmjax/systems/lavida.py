"""LaViDa: a masked-diffusion vision-language model (LLaDA or Dream + SigLIP anyres).

Model. Every view of the image (base view + anyres grid crops, ``lavida_data``) goes through
SigLIP cut at its penultimate layer; the features are projected by the mlp2x_gelu projector
*before* pooling, then bilinearly resized from ``g x g`` to ``ceil(g/2)`` per side (27 -> 14 at
384px); the views' tokens are arranged as base view, then the grid picture with a learned
``image_newline`` after each row, and spliced at the ``<image>`` placeholder slots of the chat
prompt (LLaVA style). The language model is a bidirectional LLaDA (or Dream, with shifted
logits) ``DecoderLM``.

Training (``Lavida.loss``). The forward process masks each answer token with probability
``p = (1 - 1e-3) t + 1e-3``, ``t ~ U(0, 1)`` per row (at least one per row), at the embedding
level; prompt and image are never masked, [FIM] markers neither. *Complementary masking*:
each row also appears with exactly the other answer positions masked (2B rows); the vision
tower runs once on B rows and its embeddings are reused. Loss: LaViDa's token mean over the
masked answer tokens (default) or LLaDA's ``1/p``-weighted one. The attention mask is
Prefix-DLM (the prompt never attends to the answer), which makes the prefix KV cache of the
sampler exact. EOS padding is supervised (``lavida_data``). Stages (``configs/lavida.py``):
1 trains the projector only (single view, no pooling), 2 everything (vision at 0.1x the LM's
learning rate), 3 adds FIM insertion.

Sampling (``Lavida.generate``): the prompt embeddings (image spliced in) go to
``diffusion.masked_sampler.generate`` -- one ``while_loop`` with schedules, remasking, CFG,
prefix / dual KV cache and confidence-threshold decoding.

Example (CPU, ~11 minutes: trains, then the speed / quality table)::

    python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida
    python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida --mode export
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.data import image as image_ops
from mmjax.data import BadRecord
from mmjax.diffusion import masked, masked_sampler
from mmjax.interop import hf as hf_io
from mmjax.interop.subtree import load_into
from mmjax.interop.tables import IDENTITY, LINEAR, Family, Rule, prefixed
from mmjax.models import dream, llada, siglip
from mmjax.models.image_tokens import splice
from mmjax.models.lm import DecoderLM, LMConfig
from mmjax.systems import lavida_data as ld
from mmjax.systems.base import System

LOSSES = ("lavida", "llada")
BACKBONES = {"llada": llada, "dream": dream}
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."   # LaViDa's checkpoint names


# ============================================================================ the model
@dataclasses.dataclass(frozen=True)
class LavidaConfig:
  """Vision tower (cut at the feature layer, no head), language model, view geometry."""
  vision: siglip.SiglipConfig
  text: LMConfig
  geometry: ld.VisionGeometry
  image_token_id: int                  # the prompt's image placeholder id
  projector_bias: bool = True
  hf_extra: str = "{}"                 # reference-config fields carried to export
  family: str = "lavida"


class LavidaModel(nn.Module):
  """``apply({'params': p}, tokens [b, T], images [b, V, S, S, 3], image_index [b, N])`` ->
  logits ``[b, T, vocab]`` (full bidirectional pass; training and sampling use ``embed`` and
  the ``DiffusionLM`` view of ``language_model``). Params: ``vision_tower``, ``projector``
  (fc1, fc2), ``image_newline``, ``language_model``."""
  config: LavidaConfig

  def setup(self):
    c = self.config
    s = c.text.stack
    self.vision_tower = siglip.SiglipVision(c.vision)
    self.projector = Projector(s.d_model, use_bias=c.projector_bias, dtype=s.dtype,
                               param_dtype=s.param_dtype)
    self.image_newline = self.param(
        "image_newline", nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(s.d_model)), ("embed",)),
        (s.d_model,), s.param_dtype)
    self.language_model = DecoderLM(c.text)

  def view_features(self, views):
    """Views ``[n, S, S, 3]`` -> ``[n, grid^2, d_model]``: penultimate SigLIP features,
    projected, then bilinearly pooled (``g -> ceil(g/2)`` per side) when the geometry pools."""
    geo = self.config.geometry
    feats = self.vision_tower(views)["encoder_output"]   # the tower ends at the feature layer
    feats = self.projector(feats)                                   # before pooling
    return pool_features(feats, geo.grid) if geo.pool else feats

  def image_tokens(self, images, image_index):
    """``images [b, V, S, S, 3]``, ``image_index [b, N]`` -> image tokens ``[b, N, d]``: a
    gather from ``[V * grid^2 view features, image_newline]`` (``lavida_data``)."""
    b, v = images.shape[:2]
    feats = self.view_features(images.reshape((b * v,) + images.shape[2:]))
    feats = feats.reshape(b, v * feats.shape[1], feats.shape[2])
    newline = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (b, 1, feats.shape[2]))
    table = jnp.concatenate([feats, newline], axis=1)
    index = jnp.where(image_index < 0, table.shape[1] - 1, image_index)   # pads: any row
    return jnp.take_along_axis(table, index[..., None], axis=1)

  def embed(self, tokens, images, image_index):
    """Token embeddings with the image tokens spliced at the placeholders ``[b, T, d]``."""
    x = self.language_model.embed(tokens)
    img = self.image_tokens(images, image_index).astype(x.dtype)
    return splice(x, tokens == self.config.image_token_id, img.reshape(-1, img.shape[-1]))

  def __call__(self, tokens, images, image_index, attention_mask=None):
    x = self.embed(tokens, images, image_index)
    return self.language_model(None, attention_mask, inputs_embeds=x)


class Projector(nn.Module):
  """LLaVA's ``mlp2x_gelu``: fc1, exact GELU, fc2 (params as ``core.Mlp``'s), initialised as
  the reference's freshly built ``nn.Linear`` layers: kernel and bias U(+-1/sqrt(fan_in))."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for name, axes in (("fc1", ("embed", "mlp")), ("fc2", ("mlp", "embed"))):
      bound = x.shape[-1] ** -0.5
      x = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), axes),
                   bias_init=nn.with_logical_partitioning(
                       lambda k, shape, dtype, b=bound: jax.random.uniform(k, shape, dtype, -b, b),
                       axes[1:]))(x)
      x = jax.nn.gelu(x, approximate=False) if name == "fc1" else x
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


def pool_features(feats, out_side: int):
  """``[n, g*g, d]`` -> ``[n, out_side^2, d]`` by bilinear resizing of each ``g x g`` grid:
  half-pixel sampling without antialiasing, i.e. torch's ``F.interpolate(mode='bilinear',
  align_corners=False)`` that LaViDa's ``get_2dPool`` uses (27 -> 14)."""
  n, tokens, d = feats.shape
  g = math.isqrt(tokens)
  out = jax.image.resize(feats.reshape(n, g, g, d), (n, out_side, out_side, d), "linear",
                         antialias=False)
  return out.reshape(n, out_side * out_side, d)


# ============================================================================ the system
def _vision_tower_config(hf: dict, **kw) -> siglip.SiglipConfig:
  """SigLIP without its head, at the tile size (384: 27 x 27 patches, a VALID stride-14
  patch convolution as in the reference)."""
  return siglip.from_hf_config(dict(hf, vision_use_head=False), **kw)


def _read_json(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _as_dict(section) -> dict:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


class Lavida(System):
  """The trainer's view of LaViDa (see the module docstring and ``configs/lavida.py``)."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if m.stage not in (1, 2, 3):
      raise ValueError(f"model.stage={m.stage!r}; LaViDa has stages 1, 2, 3")
    for field, value, allowed in (("model.loss", m.loss, LOSSES),
                                  ("model.backbone", m.backbone, tuple(BACKBONES)),
                                  ("model.t_sampler", m.t_sampler, masked.T_KINDS),
                                  ("model.prompt", m.prompt, ld.PROMPT_KINDS)):
      if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {allowed}")
    self._check_checkpoints()
    kw = dict(dtype=jnp.dtype(config.dtype), remat_policy=config.remat_policy)
    llm_hf = _read_json(m.llm_path) if m.init == "pretrained" else _as_dict(m.llm_config)
    text = BACKBONES[m.backbone].from_hf_config(llm_hf, scan_layers=config.scan_layers, **kw)
    vis_hf = _read_json(m.vision_path) if m.init == "pretrained" else _as_dict(m.vision_config)
    vis_hf = vis_hf.get("vision_config", vis_hf)
    depth = m.vision_feature_layer % (vis_hf["num_hidden_layers"] + 1)
    vision = _vision_tower_config(vis_hf, num_layers=depth, **kw)
    self.geometry = ld.VisionGeometry(tile=vis_hf["image_size"], patch=vision.patch_size,
                                      anyres=m.anyres, pool=m.pool)
    self.prompter = self._make_prompter()
    if self.prompter is not None and self.prompter.vocab_size > text.vocab_size:
      raise ValueError(f"the tokenizer has {self.prompter.vocab_size} ids, the language model "
                       f"{text.vocab_size}")
    image_id = self.prompter.image_id if self.prompter is not None else m.image_token_id
    self.model_cfg = LavidaConfig(vision=vision, text=text, geometry=self.geometry,
                                  image_token_id=int(image_id))
    self.model = LavidaModel(self.model_cfg)
    self.lm_module = DecoderLM(text)
    self.prompt_len = m.max_prompt_text + self.geometry.max_tokens
    self.answer_len = m.answer_len
    self.mask_id = int(self.prompter.mask_id if self.prompter else llm_hf.get(
        "mask_token_id", BACKBONES[m.backbone].MASK_TOKEN_ID))

  # -- checkpoints and tokenizer ------------------------------------------------------------
  def _check_checkpoints(self):
    """``model.init='pretrained'`` needs both checkpoint directories; name what is missing."""
    m = self.config.model
    if m.init == "random":
      return
    if m.init != "pretrained":
      raise ValueError(f"model.init={m.init!r} is not 'pretrained' or 'random'")
    missing = [f"--config.model.{k}" + (f" (given {v!r}: no config.json there)" if v else "")
               for k, v in (("llm_path", m.llm_path), ("vision_path", m.vision_path))
               if not v or not os.path.exists(os.path.join(v, "config.json"))]
    if missing:
      raise SystemExit(
          f"LaViDa needs pretrained checkpoints; missing: {', '.join(missing)}. Download "
          f"{'LLaDA-8B-Instruct (GSAI-ML/LLaDA-8B-Instruct)' if m.backbone == 'llada' else 'Dream-v0-Instruct-7B'}"
          f" and SigLIP (google/siglip-so400m-patch14-384) and pass their directories, or "
          f"run the CPU demo: --config configs/lavida.py:demo. (--config.model.init=random "
          f"skips loading, e.g. for launch/aot.py.)")

  def _make_prompter(self) -> Optional[ld.Prompter]:
    """The chat template and tokenizer; None when no tokenizer is configured (a random-init
    full-size model, e.g. for AOT compiles: preprocess then raises)."""
    m = self.config.model
    if m.prompt == "shapes":
      from mmjax.data.tokenizer import shapes_tokenizer  # pylint: disable=import-outside-toplevel
      return ld.Prompter.shapes(shapes_tokenizer(), m.question)
    path = m.tokenizer_path or (m.llm_path if m.init == "pretrained" else "")
    if not path:
      return None
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    make = ld.Prompter.llada if m.prompt == "llada" else ld.Prompter.dream
    return make(tok, m.image_token_id, m.question)

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    """One record (``image``, answer in ``caption`` / ``answer``, optional ``question``) ->
    fixed-shape arrays (``lavida_data.make_example``)."""
    if self.prompter is None:
      raise ValueError("LaViDa needs a tokenizer: set --config.model.tokenizer_path (a "
                       "directory with tokenizer.json) or a pretrained model.llm_path")
    m = self.config.model
    image = image_ops.decode_image(record["image"])
    answer = record.get("answer", record.get("caption"))
    if not isinstance(answer, str) or not answer.strip():
      raise BadRecord(f"record has no answer / caption (got {answer!r})")
    return ld.make_example(self.prompter, self.geometry, image, answer, rng,
                           max_prompt_text=m.max_prompt_text, answer_len=m.answer_len,
                           question=record.get("question"), extra_pad=tuple(m.extra_pad),
                           fim=m.stage == 3, fim_prob=m.fim_prob)

  def dummy_batch(self, batch_size):
    geo, t = self.geometry, self.prompt_len + self.answer_len
    tokens = np.zeros((batch_size, t), np.int32)
    p0 = self.config.model.max_prompt_text
    tokens[:, p0:p0 + geo.max_tokens] = self.model_cfg.image_token_id
    return {"tokens": tokens, "slot_mask": np.ones((batch_size, t), bool),
            "answer_mask": np.zeros((batch_size, t), bool),
            "fim_mask": np.zeros((batch_size, t), bool),
            "images": np.zeros((batch_size, geo.max_views, geo.tile, geo.tile, 3), np.float32),
            "image_index": np.zeros((batch_size, geo.max_tokens), np.int32)}

  # -- parameters ---------------------------------------------------------------------------
  def init(self, rng, batch):
    variables = self.model.init(rng, batch["tokens"][:1], batch["images"][:1],
                                batch["image_index"][:1])
    params = dict(variables["params"])      # a fresh SigLIP as transformers draws one
    params["vision_tower"] = siglip.reference_init(params["vision_tower"],
                                                   jax.random.fold_in(rng, 1))
    variables = {**variables, "params": params}
    if self.config.model.init == "pretrained":
      m = self.config.model
      params = dict(variables["params"])
      params["language_model"] = load_into(params["language_model"], "hf", m.llm_path)
      depth = self.model_cfg.vision.stack.num_layers
      params["vision_tower"] = load_into(params["vision_tower"], "hf", m.vision_path,
                                          num_layers=depth)
      variables = {**variables, "params": params}
    return variables

  def init_params(self, rng):
    """Unboxed params of a fresh init (the trainer's seed gives step 0)."""
    return nn.unbox(jax.jit(self.init)(rng, self.dummy_batch(1))["params"])

  def trainable_mask(self, params):
    """Stage 1 trains the projector only; stages 2 and 3 train everything."""
    stage1 = self.config.model.stage == 1
    return {k: jax.tree.map(lambda _, k=k: k == "projector" or not stage1, v)
            for k, v in params.items()}

  def diffusion_lm(self, params) -> masked_sampler.DiffusionLM:
    """The language model as the sampler's denoiser (Prefix-DLM mask when configured)."""
    return masked_sampler.DiffusionLM(self.lm_module, params["language_model"],
                                      prefix_dlm=self.config.model.prefix_dlm)

  # -- training -----------------------------------------------------------------------------
  def forward_masks(self, batch, rng):
    """The forward process of one batch: ``(mask [nB, T], t [nB])`` -- the masked positions
    of each row (answer only, never [FIM]) and its time; with complementary masking rows
    ``B..2B`` mask exactly the answer positions rows ``0..B`` keep (time ``1 - t``)."""
    k_t, k_mask = jax.random.split(rng)
    answer, never = batch["answer_mask"], batch["fim_mask"]
    t = masked.sample_t(k_t, answer.shape[0], self.config.model.t_sampler)
    fwd = masked.forward_mask(k_mask, answer, t, never_mask=never)
    if not self.config.model.complementary:
      return fwd, t
    return (jnp.concatenate([fwd, masked.complementary_mask(fwd, answer, never)]),
            jnp.concatenate([t, 1.0 - t]))

  def pad_to_batch(self, batch):
    """Every row's supervised EOS padding extended to the batch's longest (answer + extra
    pad), as LaViDa's collator pads a batch: a row's answer slot then no longer tells its own
    answer length (per-row slots teach "a short slot holds a short answer", and sampling,
    whose slot is always ``answer_len``, then runs captions on)."""
    answer = batch["answer_mask"]
    longest = jnp.max(jnp.sum(answer, axis=1))
    pos = jnp.arange(answer.shape[1])
    pad = (pos >= self.prompt_len) & (pos < self.prompt_len + longest)
    return dict(batch, answer_mask=answer | pad, slot_mask=batch["slot_mask"] | pad)

  def loss(self, params, batch, rng):
    m = self.config.model
    p, a = self.prompt_len, self.answer_len
    batch = self.pad_to_batch(batch)
    embeds = self.model.apply({"params": params}, batch["tokens"], batch["images"],
                              batch["image_index"], method=LavidaModel.embed)    # [B, T, E]
    mask, t = self.forward_masks(batch, rng)
    n = mask.shape[0] // embeds.shape[0]           # 2 with complementary masking
    twice = lambda x: jnp.concatenate([x] * n)     # the image embeddings are computed once
    answer = batch["answer_mask"]
    lm = self.diffusion_lm(params)
    mask_embedding = lm.embed(jnp.full((1, 1), self.mask_id, jnp.int32))[0, 0]
    x = masked.apply_mask_embeddings(twice(embeds), mask, mask_embedding)
    h = lm.hidden(x, twice(batch["slot_mask"]), p)
    logits = lm.block_logits(h, p, a)                                           # [nB, A, V]
    targets, mask = twice(batch["tokens"])[:, p:], mask[:, p:]
    if m.loss == "lavida":
      loss = masked.lavida_loss(logits, targets, mask)
    else:   # the complementary row is masked with probability about 1 - p: weight by that
      loss = masked.llada_loss(logits, targets, mask, masked.mask_probability(t),
                               "answer_length", answer_mask=twice(answer)[:, p:])
    weights = mask.astype(jnp.float32)
    hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"masked_accuracy": jnp.sum(hits * weights) / jnp.maximum(weights.sum(), 1.0),
                  "masked_tokens": weights.sum() / n}

  def flops_per_step(self, batch_size):
    """Matmul FLOPs (2 per multiply-add) of one step: forward x3 for trained parts (weights
    and activations get gradients), x2 for the frozen LM of stage 1 (activation gradients
    only), x1 for a frozen vision tower (nothing flows back into it)."""
    m, geo, c = self.config.model, self.geometry, self.model_cfg
    stage1 = m.stage == 1
    views, nv = batch_size * geo.max_views, geo.feature_grid ** 2
    rows, t = batch_size * (2 if m.complementary else 1), self.prompt_len + self.answer_len
    d, dv = c.text.stack.d_model, c.vision.stack.d_model
    vision = _stack_flops(c.vision.stack, views * nv, nv)
    projector = 2 * views * nv * (dv * d + d * d)
    lm = _stack_flops(c.text.stack, rows * t, t) + 2 * rows * self.answer_len * d * c.text.vocab_size
    return float(vision * (1 if stage1 else 3) + 3 * projector + lm * (2 if stage1 else 3))

  # -- sampling -----------------------------------------------------------------------------
  @functools.lru_cache(maxsize=64)
  def _sampler(self, opts: tuple):
    kw = dict(opts)

    @jax.jit
    def run(params, tokens, slot_mask, images, image_index, rng, draft, real):
      pe = self.model.apply({"params": params}, tokens, images, image_index,
                            method=LavidaModel.embed)
      return masked_sampler.generate(
          self.diffusion_lm(params), prompt_embeds=pe, prompt_mask=slot_mask,
          gen_length=self.answer_len, mask_id=self.mask_id, eos_id=self.prompter.eos_id,
          rng=rng, return_nfe=True, draft_ids=draft, draft_mask=real, **kw)
    return run

  def generate(self, params, prompts: dict, rng=None, draft_ids=None, draft_mask=None,
               **options):
    """Answers ``[b, answer_len]`` and the number of model calls for a batch of prompts
    (``tokens`` / ``slot_mask`` cut to the prompt, ``images``, ``image_index``: what
    ``preprocess`` gives). ``options``: ``masked_sampler.generate``'s (steps, block_length,
    schedule, cache, threshold, infill_steps, ...). One compiled program per distinct options.

    ``draft_ids [b, D <= answer_len]`` (``draft_mask``: False on padding): infill -- the
    answer starts from the draft, its ``mask_id`` positions are filled and every other token
    is kept (``masked_sampler``'s module docstring; ``Lavida.infill`` builds drafts from
    text). Checked here, before anything compiles."""
    if self.prompter is None:
      raise ValueError("LaViDa.generate needs a tokenizer (model.tokenizer_path)")
    b = np.shape(prompts["tokens"])[0]
    draft = real = None
    if draft_ids is not None:
      draft, real = masked_sampler.check_draft(draft_ids, draft_mask, b, self.answer_len,
                                               self.mask_id, self.model_cfg.text.vocab_size)
    elif draft_mask is not None:
      raise ValueError("draft_mask needs draft_ids")
    run = self._sampler(tuple(sorted(options.items())))
    p = self.prompt_len
    rng = jax.random.key(0) if rng is None else rng
    return run(params, jnp.asarray(prompts["tokens"][:, :p]),
               jnp.asarray(prompts["slot_mask"][:, :p]), jnp.asarray(prompts["images"]),
               jnp.asarray(prompts["image_index"]), rng, draft, real)

  def infill(self, params, prompts: dict, drafts, rng=None, complete: bool = True,
             **options):
    """Fills the holes of text drafts (LaViDa-FIM inference) -> ``(texts, ids [b, G])``.

    ``drafts``: one per prompt row, each a list of pieces: a string is kept as written, an
    int ``n`` is a hole of ``n`` [M] slots, followed by [FIM] when the model is FIM-trained
    (stage 3: it writes [S] filler for unused slots, so a hole takes up to ``n`` tokens).
    [S] / [FIM] are stripped from the output before decoding. ``complete``: each draft is
    the whole answer (its end marker is appended; ``Prompter.draft``). Example::

      texts, _ = system.infill(params, batch, [["a", 2, "circle"]] * len(batch["tokens"]))
    """
    if self.prompter is None:
      raise ValueError("LaViDa.infill needs a tokenizer (model.tokenizer_path)")
    if len(drafts) != np.shape(prompts["tokens"])[0]:
      raise ValueError(f"{len(drafts)} drafts for {np.shape(prompts['tokens'])[0]} prompts")
    fim = self.config.model.stage == 3
    rows = [self.prompter.draft(d, fim=fim, complete=complete) for d in drafts]
    too_long = [i for i, r in enumerate(rows) if len(r) > self.answer_len]
    if too_long:
      raise ValueError(f"drafts {too_long} are longer than model.answer_len="
                       f"{self.answer_len} tokens")
    draft_ids, draft_mask = masked_sampler.pad_drafts(rows, pad_id=self.prompter.eos_id)
    ids, _ = self.generate(params, prompts, rng, draft_ids=draft_ids, draft_mask=draft_mask,
                           **options)
    ids = self._strip_fim(ids)
    return [self.decode(r) for r in ids], ids

  def _strip_fim(self, ids) -> np.ndarray:
    """``ids`` without [S] / [FIM] (FIM filler and markers are not part of the text)."""
    p = self.prompter
    return np.asarray(masked_sampler.strip_tokens(ids, (p.s_id, p.fim_id), p.eos_id))

  def sample_options(self, **changes) -> dict:
    """``config.sample`` as ``generate`` options (``changes`` override)."""
    s = dict(_as_dict(self.config.sample), **changes)
    s.pop("num_images", None)
    if s.get("threshold") is not None and s["threshold"] <= 0:
      s["threshold"] = None
    return s

  def modes(self):
    return {"sample": self.sample_mode, "eval": self.eval_mode, "export": self.export_mode}

  def _held_out(self, num: int):
    return ld.held_out(self.config, num, lambda r: self.preprocess(r, None))

  def _captions(self, params, batch, bs: int = 64, **options):
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
    jax.block_until_ready(self.generate(params, chunks[0], **options))        # compile
    out, nfes, times = [], [], []
    for c in chunks:
      t0 = time.perf_counter()
      ids, nfe = self.generate(params, c, **options)
      out.append(np.asarray(ids))
      times.append((time.perf_counter() - t0) / bs)
      nfes.append(int(nfe))
    rows = np.concatenate(out)[:n]
    if self.config.model.stage == 3:      # a FIM model may write [S] filler
      rows = self._strip_fim(rows)
    nfe = float(np.mean(np.repeat(nfes, bs)[:n]))
    return [self.decode(row) for row in rows], float(np.median(times)), nfe

  def decode(self, ids) -> str:
    """Answer text up to the first EOS (markers kept, so junk never parses as a caption;
    ids past the tokenizer's vocabulary -- the demo pads it -- are dropped)."""
    ids = [int(i) for i in ids]
    eos = self.prompter.eos_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    return self.prompter.tokenizer.decode([i for i in ids if i < self.prompter.vocab_size],
                                          skip_special_tokens=False)

  def sample_mode(self, params, workdir):
    """Captions of held-out scenes: WORKDIR/samples/lavida_captions.{json,png}."""
    from mmjax.eval.captions import score_captions  # pylint: disable=import-outside-toplevel
    from mmjax.eval.pictures import caption_grid  # pylint: disable=import-outside-toplevel
    recs, batch = self._held_out(int(self.config.sample.num_images))
    captions, _, _ = self._captions(params, batch, **self.sample_options())
    refs = [r["caption"] for r in recs]
    scores = score_captions(captions, refs)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", "lavida_captions.json"), "w") as f:
      json.dump({**scores, "captions": [{"reference": r, "generated": c}
                                        for r, c in zip(refs, captions)]}, f, indent=1)
    caption_grid([r["image"] for r in recs], captions, refs).save(
        os.path.join(workdir, "samples", "lavida_captions.png"))
    print(f"samples: {workdir}/samples/lavida_captions.png (attribute accuracy "
          f"{scores['attribute_accuracy']:.3f})", flush=True)
    return scores

  def eval_mode(self, params, workdir):
    """The speed / quality table: attribute-level caption accuracy and latency per sample at
    NFE 100 / 50 / 25 % x cache none / prefix / dual, threshold decoding, and the untrained
    (step 0) model: WORKDIR/eval/lavida_demo.json and a printed table."""
    from mmjax.eval.captions import score_captions  # pylint: disable=import-outside-toplevel
    e = self.config.eval
    recs, batch = self._held_out(int(e.num_scenes))
    refs, cats = [r["caption"] for r in recs], [r["category"] for r in recs]
    g = self.answer_len
    settings = [("step 0", "none", g, None)]
    settings += [("trained", cache, g // k, None) for cache in ("none", "prefix", "dual")
                 for k in (1, 2, 4)]
    settings += [("trained", cache, None, float(e.threshold)) for cache in ("none", "dual")]
    step0 = self.init_params(jax.random.PRNGKey(self.config.seed))
    rows = []
    for model, cache, steps, tau in settings:
      opts = self.sample_options(cache=cache, steps=steps, threshold=tau)
      texts, seconds, nfe = self._captions(step0 if model == "step 0" else params, batch,
                                           **opts)
      score = score_captions(texts, refs, cats)
      rows.append({"model": model, "cache": cache, "steps": steps, "threshold": tau,
                   "nfe": nfe, "nfe_percent": 100.0 * nfe / g,
                   "seconds_per_sample": seconds, **score,
                   "examples": [{"reference": r, "generated": t}
                                for r, t in zip(refs[:4], texts[:4])]})
    result = {"num_scenes": len(recs), "gen_length": g,
              "block_length": self.config.sample.block_length, "device": str(jax.devices()[0]),
              "rows": rows,
              "infill": {kind: self._infill_accuracy(params, batch, refs, kind)
                         for kind in ("color", "shape")}}
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "lavida_demo.json"), "w") as f:
      json.dump(result, f, indent=1)
    print(ld.format_table(result), flush=True)
    return result

  def _infill_accuracy(self, params, batch, refs, kind: str) -> dict:
    """Infill on the trained model: each reference caption with its colour (or shape) words
    as holes of ``eval.infill_slots`` slots (a FIM model writes the word and [S] filler,
    stripped); the fraction of holes filled with exactly the reference word."""
    slots = int(self.config.eval.infill_slots)
    from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
    is_hole = ((lambda w: w in shapes.COLORS) if kind == "color" else
               (lambda w: w.rstrip("s") in shapes.SHAPES))
    drafts, want = [], []
    for ref in refs:
      words = ref.split()
      drafts.append([slots if is_hole(w) else w for w in words])
      want.append([w for w in words if is_hole(w)])
    texts, _ = self.infill(params, batch, drafts, **self.sample_options(cache="prefix"))
    hits = total = 0
    for draft, text, words in zip(drafts, texts, want):
      got = text.split()
      filled = [got[i] if i < len(got) else None for i, p in enumerate(draft)
                if isinstance(p, int)]
      hits += sum(a == b for a, b in zip(filled, words))
      total += len(words)
    return {"holes": total, "slots": slots, "accuracy": hits / max(total, 1),
            "examples": [{"reference": r, "filled": t} for r, t in zip(refs[:4], texts[:4])]}

  def export_mode(self, params, workdir):
    """WORKDIR/export: LaViDa's checkpoint layout (``config.json`` + safetensors with the
    LLaDA / Dream names, ``model.mm_projector.*``, ``model.image_newline``, the SigLIP tower
    under ``model.vision_tower.vision_tower.vision_model.*``) and the tokenizer."""
    path = os.path.join(workdir, "export")
    files = hf_io.save_hf(self.model, params, path)
    if self.prompter is not None and jax.process_index() == 0:
      self.prompter.tokenizer.save(os.path.join(path, "tokenizer.json"))
    print(f"export: {path} ({', '.join(files)})", flush=True)
    return path


def _stack_flops(c: core.TransformerConfig, tokens: int, seq: int) -> float:
  """Forward matmul FLOPs of ``tokens`` tokens through a stack, attending over ``seq``."""
  attn = c.d_model * c.head_dim * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * c.head_dim * c.d_model
  mlp = (3 if c.mlp_act in ("swiglu", "geglu") else 2) * c.d_model * c.mlp_dim
  scores = 2 * c.num_heads * c.head_dim * seq            # q.k and p.v per token
  return 2.0 * tokens * c.num_layers * (attn + mlp + scores / 2)


# ============================================================================ export / import
def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla") -> LavidaConfig:
  """``LavidaConfig`` from an exported LaViDa ``config.json`` (``llava_llada`` /
  ``llava_dream``); its vision tower already ends at the feature layer."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
            attention_impl=attention_impl)
  backbone = {"llava_llada": "llada", "llava_dream": "dream"}[hf["model_type"]]
  text = BACKBONES[backbone].from_hf_config(hf, scan_layers=scan_layers, **kw)
  vision = _vision_tower_config(hf["vision_config"], **kw)
  tile = hf["vision_config"]["image_size"]
  pins = tuple((h * ld.BASE_TILE // tile, w * ld.BASE_TILE // tile)
               for h, w in hf.get("image_grid_pinpoints") or ())
  geometry = ld.VisionGeometry(tile=tile, patch=vision.patch_size,
                               anyres=hf.get("image_aspect_ratio") == "anyres",
                               pool=hf.get("mm_spatial_pool_mode") == "bilinear",
                               pinpoints=pins or ld.GRID_PINPOINTS)
  return LavidaConfig(vision=vision, text=text, geometry=geometry,
                      image_token_id=hf["image_token_index"],
                      projector_bias=hf.get("mm_projector_bias", True))


def to_hf_config(cfg: LavidaConfig) -> dict:
  """LaViDa's ``config.json``: the LLaDA (or Dream) fields plus the LLaVA multimodal ones."""
  backbone = cfg.text.family
  hf = BACKBONES[backbone].to_hf_config(cfg.text)
  geo, v = cfg.geometry, siglip.to_hf_config(cfg.vision)
  v.update(vision_use_head=False)
  hf.update(json.loads(cfg.hf_extra))
  hf.update({
      "architectures": ["LlavaLladaForMaskedDiffusion" if backbone == "llada"
                        else "LlavaDreamForMaskedDiffusion"],
      "model_type": f"llava_{backbone}", "vision_config": v,
      "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": cfg.vision.stack.d_model,
      "mm_projector_bias": cfg.projector_bias,
      "mm_vision_select_layer": -1,            # the exported tower ends at the feature layer
      "mm_vision_select_feature": "patch",
      "image_aspect_ratio": "anyres" if geo.anyres else "pad",
      "image_grid_pinpoints": [list(r) for r in geo.resolutions],
      "mm_patch_merge_type": "spatial_unpad" if geo.anyres else "flat",
      "mm_spatial_pool_mode": "bilinear" if geo.pool else None, "mm_spatial_pool_stride": 2,
      "image_token_index": cfg.image_token_id,
  })
  return hf


def hf_table(cfg: LavidaConfig) -> list:
  """LaViDa's stored names -> ours."""
  p = "model.mm_projector."
  text = hf_io.get_family(cfg.text.family).table(cfg.text)
  return (prefixed(text, "language_model/")
          + prefixed(siglip.hf_table(cfg.vision, VISION_PREFIX), "vision_tower/")
          + [Rule(p + "0.weight", "projector/fc1/kernel", LINEAR),
             Rule(p + "0.bias", "projector/fc1/bias", IDENTITY),
             Rule(p + "2.weight", "projector/fc2/kernel", LINEAR),
             Rule(p + "2.bias", "projector/fc2/bias", IDENTITY),
             Rule("model.image_newline", "image_newline", IDENTITY)])


def hf_ignore(cfg: LavidaConfig) -> tuple:
  return (siglip.hf_ignore(cfg.vision, VISION_PREFIX)
          + tuple(hf_io.get_family(cfg.text.family).ignore(cfg.text)))


def init_args(cfg: LavidaConfig) -> tuple:
  s = cfg.geometry.tile
  return (jnp.array([[cfg.image_token_id, 0]], jnp.int32), jnp.zeros((1, 1, s, s, 3)),
          jnp.zeros((1, 1), jnp.int32))


HF_FAMILY = Family(
    name="lavida", model_types=("llava_llada", "llava_dream"),
    architectures=("LlavaLladaForMaskedDiffusion", "LlavaDreamForMaskedDiffusion"),
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, make_model=LavidaModel,
    init_args=init_args, table=hf_table, ignore=hf_ignore)
# interop's family registry has no register(); LaViDa's layout joins it when this module loads
hf_io.FAMILIES.setdefault("lavida", __name__)
for _t in HF_FAMILY.model_types:
  hf_io.MODEL_TYPES.setdefault(_t, "lavida")


def load_export(path: str, **overrides):
  """``(LavidaModel, params)`` from a directory written by ``--mode export``.

  Example::

    model, params = load_export("/tmp/lavida/export")
  """
  return hf_io.load_hf(path, **overrides)

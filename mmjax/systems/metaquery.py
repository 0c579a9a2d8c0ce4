"""MetaQuery, the query bridge: learnable queries read a frozen MLLM out into a diffusion decoder.

The method ("Transfer between Modalities with MetaQueries", spec/metaquery.md), top to bottom:

1. **Queries through the frozen MLLM.** The prompt (chat template, caption) is left-padded to
   a fixed length and followed by ``<begin_of_img> q_0 .. q_{N-1} <end_of_img>`` and the
   template's closing tokens. The N queries and the two markers are our own parameters (the
   vocabulary is never touched); the MLLM keeps its ordinary *causal* mask, so each query
   sees the whole prompt and the queries before it.
2. **Condition.** The final hidden states *after the final norm* at the N query positions.
   The MLLM is frozen, but gradients flow through it back to the queries.
3. **Connector.** "Enc-Proj": a bidirectional Qwen2-style encoder at the MLLM width D (RoPE,
   QK-norm after RoPE, SwiGLU 4D, q/k/v biases, no final norm), then
   Linear(D->C)-GELU(tanh)-Linear(C->C)-RMSNorm(C) with the norm's weight starting at
   sqrt(5.5). "Proj-Enc" projects first and runs the encoder at width C.
4. **Decoder.** The condition replaces the text encoder's output of a Sana DiT, i.e. it
   enters *before* Sana's own caption projection and caption norm (which train). Latents
   come from a frozen DC-AE (or, for CPU demos, from pixels by space-to-depth).
5. **Training.** Flow matching (`mmjax.diffusion.flow`), caption -> "" with p=0.1 so the
   unconditional branch is the MLLM on the empty prompt (queries included).
6. **Sampling.** One XLA program: prompts and empty prompts -> conditions, DPM-Solver++ 2M
   with flow sigmas and two-way CFG batched in one DiT call per step, decode to pixels.
7. **Image tasks** (``model.task``: ``reconstruct`` | ``edit`` | ``instruct``; ``t2i`` is the
   above): input images go through the MLLM's frozen vision tower and are spliced at the
   prompt's image placeholders (``MetaQueryModel.image_tokens``); per-task condition
   dropout (black images, the null prompt) and three-way CFG sampling live in
   `mmjax.systems.metaquery_tasks`, shapes-world task data in `mmjax.data.shapes_tasks`.

Parameters: ``mllm`` (frozen), ``queries [N, D]``, ``markers [2, D]`` (begin, end),
``connector``, ``dit``, ``vae`` (frozen; only with ``decoder.autoencoder='dc_ae'``).

Example (CPU demo: trains, then writes samples and step-0 vs trained ShapesEval)::

    python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq
    python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq --mode sample

In Python::

    from mmjax import config as mcfg
    from mmjax.systems.base import get_system
    system = get_system(mcfg.load("configs/metaquery.py:demo"))
    params = system.init_params(jax.random.key(0))
    images = system.generate(params, ["a red circle"], jax.random.key(1))   # uint8 [1, R, R, 3]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.data import BadRecord, image as image_ops
from mmjax.diffusion import flow, solvers
from mmjax.interop.subtree import load_into
from mmjax.models import dc_ae, image_tokens, qwen2, sana_dit
from mmjax.models import llava_onevision as lov
from mmjax.models.lm import DecoderLM, LMConfig
from mmjax.systems.base import System
from mmjax.systems import metaquery_tasks as tasks_lib

# The reference's system prompt (spec: "Prompt layout").
SYSTEM_PROMPT = ("You will be given an image or its caption. Please describe the content of "
                 "the image in detail in your own words.")
CONNECTORS = ("enc_proj", "proj_enc")
TASKS = ("t2i", "reconstruct", "edit", "instruct")   # model.task
AUTOENCODERS = ("dc_ae", "pixels")
FROZEN = ("mllm", "vae")          # top-level parameter groups that never train


# ============================================================================ prompt layout
class PromptFormat:
  """Caption -> left-padded prompt ids ``[max_len]`` + mask, and the tokens that follow the
  ``<end_of_img>`` marker.

  ``kind='chat'``: the MLLM's own chat template (``llava_onevision.Processor``): system
  prompt, user turn with the caption (truncated to ``caption_tokens``), generation prompt,
  then ``"\\n"``; after the queries come ``<end_of_img><|im_end|>``.
  ``kind='plain'``: ``<bos> caption`` with a word tokenizer (the shapes-world demo MLLM has
  no chat template; ``tokenizer`` overrides ``shapes_tokenizer()``); ``<eos>`` follows the
  end marker.

  Input images (MetaQuery's image tasks): ``encode(caption, num_images=n)`` puts ``n`` image
  placeholders where the template puts them -- chat: the user turn's ``{"type": "image"}``
  items, rendered by the checkpoint's template (LLaVA-OneVision: ``<image>`` before the
  text); plain: right after ``<bos>`` -- each expanded to ``image_tokens`` copies of the
  image token id (``image_token_id``), which the model replaces by the image's features.

  A text-only prompt longer than ``max_len`` keeps its *end* (the caption is already
  truncated, so only an absurdly long template would lose its start) -- the queries always
  see the generation prompt. A prompt with images that does not fit is a configuration
  error (``model.prompt_len`` too small), never silently cut.
  """

  def __init__(self, kind: str, max_len: int, caption_tokens: int = 256,
               tokenizer_dir: str = "", system_prompt: str = SYSTEM_PROMPT,
               suffix_ids: Sequence[int] = (), image_tokens: int = 0, tokenizer=None):
    self.kind, self.max_len, self.caption_tokens = kind, int(max_len), int(caption_tokens)
    self.image_tokens, self.image_token_id = int(image_tokens), None
    self.system_prompt = system_prompt
    self._encode, self._render, self._parts_cache = None, None, {}
    if kind == "plain":
      if tokenizer is None:
        from mmjax.data.tokenizer import shapes_tokenizer  # pylint: disable=import-outside-toplevel
        tokenizer = shapes_tokenizer()
      self.tokenizer = tokenizer
      self._encode = lambda text: self.tokenizer.tokenizer.encode(
          text, add_special_tokens=False).ids
      self._head, self._tail = [self.tokenizer.bos_id], []
      self.suffix_ids = np.asarray([self.tokenizer.eos_id], np.int32)
      self.vocab_size = self.tokenizer.vocab_size
      self.image_token_id = self.tokenizer.tokenizer.token_to_id("<image>")
    elif kind == "chat" and tokenizer_dir:
      proc = lov.Processor.from_dir(tokenizer_dir)
      self.tokenizer = proc.tokenizer
      self._encode = lambda text: proc.tokenizer.encode(text, add_special_tokens=False).ids
      self._render = proc.chat
      self._head, self._tail = self._chat_parts(0)
      self.suffix_ids = np.asarray(self._encode("<|im_end|>"), np.int32)
      self.vocab_size = proc.tokenizer.get_vocab_size(with_added_tokens=True)
      self.image_token_id = proc.image_token_id
    elif kind == "chat":   # no tokenizer (random init, AOT): the layout's shapes only
      self.tokenizer, self.vocab_size = None, None
      self.suffix_ids = np.asarray(suffix_ids, np.int32)
    else:
      raise ValueError(f"prompt kind {kind!r} is not 'plain' or 'chat'")

  _SENTINEL = "\x00CAPTION\x00"

  def _chat_parts(self, num_images: int) -> tuple[list, list]:
    """Token ids before / after the caption in the chat template with ``num_images``
    image items (image token ids not yet expanded)."""
    user = [{"type": "image"}] * num_images + [{"type": "text", "text": self._SENTINEL}]
    text = self._render([{"role": "system",
                          "content": [{"type": "text", "text": self.system_prompt}]},
                         {"role": "user", "content": user}])
    before, after = (text + "\n").split(self._SENTINEL)
    return self._encode(before), self._encode(after)

  def parts(self, num_images: int = 0) -> tuple[list, list]:
    """``(head, tail)`` ids around the caption, image placeholders expanded."""
    if num_images == 0:
      return self._head, self._tail
    if num_images not in self._parts_cache:
      if self._encode is None:
        raise ValueError("prompts need the MLLM's tokenizer: set mllm.path or "
                         "mllm.tokenizer_dir")
      if self.image_token_id is None or self.image_tokens <= 0:
        raise ValueError("this prompt format has no image placeholders (image_tokens=0)")
      if self.kind == "plain":
        head, tail = self._head + [self.image_token_id] * num_images, list(self._tail)
      else:
        head, tail = self._chat_parts(num_images)
      expand = lambda ids: [j for i in ids for j in (
          [i] * self.image_tokens if i == self.image_token_id else [i])]
      head, tail = expand(head), expand(tail)
      found = (head + tail).count(self.image_token_id)
      if found != num_images * self.image_tokens:
        raise ValueError(f"the prompt template rendered {found // self.image_tokens} image "
                         f"placeholders for {num_images} images")
      self._parts_cache[num_images] = (head, tail)
    return self._parts_cache[num_images]

  def min_len(self, num_images: int = 0, caption_tokens: Optional[int] = None) -> int:
    """Length of a prompt with ``num_images`` images and a caption of ``caption_tokens``
    (default: the longest allowed) tokens."""
    head, tail = self.parts(num_images)
    return len(head) + len(tail) + (self.caption_tokens if caption_tokens is None
                                    else caption_tokens)

  def encode(self, caption: str, num_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [max_len], mask bool [max_len])``, left padded (pad id 0)."""
    if self._encode is None:
      if not caption and not num_images:
        # Layout only (random init without a tokenizer, e.g. launch/aot.py): the empty
        # prompt's *shape* is all a compile needs. Real captions cannot be encoded, so no
        # data (and no trained model) ever sees this placeholder.
        ids, mask = np.zeros((self.max_len,), np.int32), np.zeros((self.max_len,), bool)
        mask[-1] = True
        return ids, mask
      raise ValueError("prompts need the MLLM's tokenizer: set mllm.path or mllm.tokenizer_dir")
    head, tail = self.parts(num_images)
    body = self._encode(caption)[:self.caption_tokens] if caption else []
    seq = head + body + tail
    if num_images and len(seq) > self.max_len:
      raise ValueError(f"a prompt with {num_images} image(s) needs {len(seq)} tokens, "
                       f"model.prompt_len is {self.max_len}")
    seq = seq[-self.max_len:]
    ids = np.zeros((self.max_len,), np.int32)
    mask = np.zeros((self.max_len,), bool)
    if seq:
      ids[-len(seq):], mask[-len(seq):] = seq, True
    return ids, mask

  def encode_batch(self, captions: Sequence[str],
                   num_images: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    counts = [num_images] * len(captions) if isinstance(num_images, int) else num_images
    pairs = [self.encode(c, n) for c, n in zip(captions, counts)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ============================================================================ connector
@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  """The connector between the MLLM width ``in_dim`` (D) and the decoder's caption width
  ``out_dim`` (C). ``encoder_dim`` is D for Enc-Proj and C for Proj-Enc."""
  kind: str                 # 'enc_proj' | 'proj_enc'
  in_dim: int
  out_dim: int
  num_layers: int = 24
  head_dim: int = 64
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.014
  out_norm_init: float = math.sqrt(5.5)
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"

  @property
  def encoder_dim(self) -> int:
    return self.in_dim if self.kind == "enc_proj" else self.out_dim

  def encoder(self) -> core.TransformerConfig:
    """Qwen2-style encoder: D/64 heads of 64 (no GQA), SwiGLU 4D, q/k/v biases, QK-norm
    after RoPE; bidirectional by being called without a mask."""
    d = self.encoder_dim
    if d % self.head_dim:
      raise ValueError(f"connector width {d} is not a multiple of head_dim {self.head_dim}")
    return core.TransformerConfig(
        num_layers=self.num_layers, d_model=d, num_heads=d // self.head_dim,
        head_dim=self.head_dim, mlp_dim=4 * d, mlp_act="swiglu", norm="rms",
        norm_eps=self.norm_eps, rope_theta=self.rope_theta, qkv_bias=True,
        qk_norm="l2_after_rope", dtype=self.dtype, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl,
        init_std=self.init_std)


class Connector(nn.Module):
  """``[batch, queries, D] -> [batch, queries, C]``; params ``encoder``, ``projection``
  (``fc1`` D->C, ``fc2`` C->C), ``out_norm``."""
  cfg: ConnectorConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    if c.kind not in CONNECTORS:
      raise ValueError(f"connector kind {c.kind!r} is not one of {CONNECTORS}")
    proj = core.Mlp(c.out_dim, act="gelu_tanh", use_bias=True, out_dim=c.out_dim,
                    dtype=c.dtype, init_std=c.init_std, name="projection")
    encoder = core.TransformerStack(c.encoder(), name="encoder")
    x = x.astype(c.dtype)
    if c.kind == "enc_proj":
      x = proj(encoder(x, mask=None))         # mask=None: every query sees every query
    else:
      x = encoder(proj(x), mask=None)
    norm = core.RMSNorm(eps=1e-5, dtype=c.dtype, name="out_norm",
                        scale_init=nn.initializers.constant(c.out_norm_init))
    return norm(x)                              # [b, N, C]


# ============================================================================ the model
def _depthwise_as_shifts(next_fun, args, kwargs, context):
  """``nn.intercept_methods`` hook: a depthwise ``nn.Conv`` (Sana's Mix-FFN) computed as a
  sum of k*k shifted, scaled copies of its input -- the same parameters and result (to fp32
  rounding) as the grouped convolution, which XLA:CPU runs very slowly (and its kernel
  gradient inside a scanned stack pathologically slowly). Used on the CPU backend only."""
  mod = context.module
  if not (isinstance(mod, nn.Conv) and context.method_name == "__call__"
          and mod.feature_group_count > 1 and mod.feature_group_count == mod.features
          and mod.strides in (None, 1, (1, 1)) and not mod.is_initializing()):
    return next_fun(*args, **kwargs)
  p = nn.unbox(mod.variables["params"])
  x = args[0].astype(mod.dtype)
  kernel = p["kernel"].astype(mod.dtype)                 # [k, k, 1, C]
  (t, bottom), (left, right) = mod.padding
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (t, bottom), (left, right), (0, 0)))
  y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
  return y + p["bias"].astype(mod.dtype) if "bias" in p else y


def space_to_depth(images, patch: int):
  """Pixel "latents" for CPU demos: ``[b, H, W, 3]`` in [-1, 1] -> ``[b, H/p, W/p, 3 p^2]``."""
  return dc_ae.pixel_unshuffle(images, patch) if patch > 1 else images


def depth_to_space(latents, patch: int):
  return dc_ae.pixel_shuffle(latents, patch) if patch > 1 else latents


class MetaQueryModel(nn.Module):
  """MLLM + queries + connector + Sana DiT (+ DC-AE). Methods (``apply(..., method=...)``):

  * ``condition(prompt_ids, prompt_mask, views=None) -> [b, N, C]``
  * ``velocity(latents, t, cond) -> latents-shaped flow prediction`` (t on the 0..1000 scale)
  * ``encode_images(images [-1, 1]) -> latents`` / ``decode_latents(latents) -> images``
  * ``image_tokens(views) -> [b, K*T, D]`` (image tasks: the frozen vision tower)
  * ``__call__`` runs all of them (initialisation).

  Input images (``image_layout`` set): ``views [b, K, V, S, S, 3]`` -- K image slots per
  example, V views per image, SigLIP-normalised -- go through the vision tower and the
  projector (``lax.stop_gradient``: the tower is frozen and nothing upstream trains), are
  packed per image (``image_tokens.pack_views``) and spliced, row by row in order, at the prompt's
  ``image_token_id`` positions. A row with n < K images has n placeholder groups, in slots
  0..n-1; the features of the empty slots are computed (static shapes) and never used.
  """
  mllm_cfg: Any                         # LMConfig (text MLLM) | LlavaOnevisionConfig
  num_queries: int
  suffix_ids: tuple                     # tokens after <end_of_img> (e.g. <|im_end|>)
  connector: ConnectorConfig
  dit: sana_dit.SanaConfig
  autoencoder: str                      # 'dc_ae' | 'pixels'
  ae: Optional[dc_ae.DCAEConfig] = None
  pixel_patch: int = 4
  query_init_std: float = 0.02
  image_layout: Optional[Any] = None    # anyres.ImageLayout of every input image (tasks)
  image_token_id: int = -1

  def setup(self):
    cfg = self.mllm_cfg
    self.mllm = DecoderLM(cfg) if isinstance(cfg, LMConfig) else lov.LlavaOnevision(cfg)
    d = self.text_config.stack.d_model
    init = nn.with_logical_partitioning(nn.initializers.normal(self.query_init_std),
                                        (None, "embed"))
    self.queries = self.param("queries", init, (self.num_queries, d), jnp.float32)
    self.markers = self.param("markers", init, (2, d), jnp.float32)   # begin, end of image
    self.bridge = Connector(self.connector, name="connector")
    self.dit_model = sana_dit.SanaDiT(self.dit, name="dit")
    if self.autoencoder == "dc_ae":
      self.vae = dc_ae.AutoencoderDC(self.ae, name="vae")
    elif self.autoencoder != "pixels":
      raise ValueError(f"decoder.autoencoder {self.autoencoder!r} not in {AUTOENCODERS}")

  @property
  def text_config(self) -> LMConfig:
    cfg = self.mllm_cfg
    return cfg if isinstance(cfg, LMConfig) else cfg.text

  def _language_model(self) -> DecoderLM:
    return self.mllm if isinstance(self.mllm_cfg, LMConfig) else self.mllm.language_model

  def image_tokens(self, views):
    """``[b, K, V, S, S, 3]`` normalised views -> image tokens ``[b, K*T, D]`` (frozen tower,
    no gradient)."""
    if self.image_layout is None or isinstance(self.mllm_cfg, LMConfig):
      raise ValueError("input images need an MLLM with a vision tower and an image layout")
    b, k, v = views.shape[:3]
    vis = self.mllm.vision_tower(views.reshape((b * k * v,) + views.shape[3:]))
    feats = vis["encoder_output"]                                        # hidden_states[-1]
    if self.mllm_cfg.feature_select == "default":
      feats = feats[:, 1:]
    feats = self.mllm.projector(feats)                                   # [bkv, g*g, D]
    feats = image_tokens.pack_views(feats.reshape((b * k, v) + feats.shape[1:]),
                                    self.image_layout, self.mllm.image_newline)  # [bk, T, D]
    return jax.lax.stop_gradient(feats.reshape(b, -1, feats.shape[-1]))

  def query_states(self, prompt_ids, prompt_mask, views=None):
    """Left-padded prompts ``[b, P]`` (and input image views, see the class docstring) ->
    the MLLM's final hidden states (after its final norm) at the N query positions
    ``[b, N, D]``.

    Sequence: ``prompt (left padded) | begin | q_0 .. q_{N-1} | end | suffix``; causal mask
    over the real tokens; RoPE positions count real tokens (so padding changes nothing).
    """
    lm = self._language_model()
    b, p = prompt_ids.shape
    dtype = self.text_config.stack.dtype
    prompt = lm.embed(prompt_ids)                                        # [b, P, D]
    if views is not None:
      prompt = image_tokens.splice(prompt, prompt_ids == self.image_token_id, self.image_tokens(views))
    suffix = lm.embed(jnp.broadcast_to(jnp.asarray(self.suffix_ids, jnp.int32),
                                       (b, len(self.suffix_ids))))
    block = jnp.concatenate([self.markers[:1], self.queries, self.markers[1:]]).astype(dtype)
    x = jnp.concatenate([prompt.astype(dtype), jnp.broadcast_to(block, (b,) + block.shape),
                         suffix.astype(dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool),
                            jnp.ones((b, x.shape[1] - p), bool)], axis=1)
    h = lm.features(inputs_embeds=x, attention_mask=mask)                # post final norm
    h = h[:, p + 1:p + 1 + self.num_queries]                             # [b, N, D]
    return core.constrain(h, ("act_batch", "act_length", "act_embed"))

  def condition(self, prompt_ids, prompt_mask, views=None):
    """Left-padded prompts ``[b, P]`` (+ input image views) -> the decoder's condition
    ``[b, N, C]``."""
    return self.bridge(self.query_states(prompt_ids, prompt_mask, views))

  def velocity(self, latents, t, cond):
    return self.dit_model(latents, t, cond, None)

  def encode_images(self, images):
    if self.autoencoder == "pixels":
      return space_to_depth(images.astype(jnp.float32), self.pixel_patch)
    return dc_ae.scale_latents(self.vae.encode(images), self.ae).astype(jnp.float32)

  def decode_latents(self, latents):
    if self.autoencoder == "pixels":
      return depth_to_space(latents, self.pixel_patch)
    return self.vae.decode(dc_ae.unscale_latents(latents, self.ae))

  def __call__(self, prompt_ids, prompt_mask, images, views=None):
    z = self.encode_images(images)
    cond = self.condition(prompt_ids, prompt_mask, views)
    v = self.velocity(z, jnp.zeros((z.shape[0],), jnp.float32), cond)
    return v, self.decode_latents(z)


# ============================================================================ the system
def _mllm_config(m, dtype, scan_layers, remat):
  """LMConfig / LlavaOnevisionConfig from ``config.mllm`` (its ``hf_config`` dict, or the
  checkpoint's ``config.json`` when ``path`` is set)."""
  hf_cfg = m.hf_config.to_dict() if hasattr(m.hf_config, "to_dict") else dict(m.hf_config)
  if m.path:
    with open(os.path.join(m.path, "config.json")) as f:
      hf_cfg = json.load(f)
  kw = dict(dtype=dtype, scan_layers=scan_layers, remat_policy=remat)
  if m.family == "qwen2":
    return qwen2.from_hf_config(hf_cfg, **kw)
  if m.family == "llava_onevision":
    return lov.from_hf_config(hf_cfg, **kw)
  raise ValueError(f"mllm.family {m.family!r} is not 'qwen2' or 'llava_onevision'")


def _diffusers_config(section, path, cls, **overrides):
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  if path:
    with open(os.path.join(path, "config.json")) as f:
      d = json.load(f)
  return cls.from_diffusers_config(d, **overrides)


class MetaQuery(System):
  """The trainer's view of MetaQuery (see the module docstring and ``configs/metaquery.py``)."""

  def __init__(self, config):
    super().__init__(config)
    m, dec = config.model, config.decoder
    self._check_checkpoints()
    dtype = jnp.dtype(config.dtype)
    self.mllm_cfg = _mllm_config(config.mllm, dtype, config.scan_layers, config.remat_policy)
    text = self.mllm_cfg if isinstance(self.mllm_cfg, LMConfig) else self.mllm_cfg.text
    self.task = m.get("task", "t2i")
    if self.task not in TASKS:
      raise ValueError(f"model.task {self.task!r} is not one of {TASKS}")
    # image tasks: one static layout per input image, K image slots per example
    self.images = None if self.task == "t2i" else tasks_lib.ImageInputs.from_config(
        self.task, self.mllm_cfg, m)
    self.prompts = PromptFormat(
        config.mllm.prompt, m.prompt_len, m.caption_tokens,
        config.mllm.path or config.mllm.tokenizer_dir,
        suffix_ids=(json.loads(text.hf_extra).get("eos_token_id", 0),),
        image_tokens=self.images.tokens_per_image if self.images else 0,
        tokenizer=(tasks_lib.plain_tokenizer() if self.images and config.mllm.prompt == "plain"
                   else None))
    if config.mllm.prompt == "plain" and self.prompts.vocab_size > text.vocab_size:
      raise ValueError(f"the demo tokenizer has {self.prompts.vocab_size} ids, the MLLM "
                       f"vocabulary {text.vocab_size}")
    if self.images:
      self.images.check_prompts(self.prompts, self.mllm_cfg)
    self.dit_cfg = _diffusers_config(dec.dit, dec.dit_path, sana_dit.SanaConfig, dtype=dtype,
                                     scan_layers=config.scan_layers,
                                     remat_policy=config.remat_policy)
    self.ae_cfg = None
    if dec.autoencoder == "dc_ae":
      self.ae_cfg = _diffusers_config(dec.ae, dec.ae_path, dc_ae.DCAEConfig, dtype=dtype)
    elif dec.autoencoder != "pixels":
      raise ValueError(f"decoder.autoencoder {dec.autoencoder!r} not in {AUTOENCODERS}")
    self.conn_cfg = ConnectorConfig(
        kind=m.connector, in_dim=text.stack.d_model, out_dim=self.dit_cfg.caption_channels,
        num_layers=m.connector_layers, head_dim=m.connector_head_dim,
        rope_theta=m.connector_rope_theta, dtype=dtype, scan_layers=config.scan_layers,
        remat_policy=config.remat_policy)
    self.model = MetaQueryModel(
        mllm_cfg=self.mllm_cfg, num_queries=m.num_queries,
        suffix_ids=tuple(int(i) for i in self.prompts.suffix_ids), connector=self.conn_cfg,
        dit=self.dit_cfg, autoencoder=dec.autoencoder, ae=self.ae_cfg,
        pixel_patch=dec.pixel_patch, query_init_std=m.query_init_std,
        image_layout=self.images.layout if self.images else None,
        image_token_id=self.mllm_cfg.image_token_id if self.images else -1)
    self.resolution = config.data.resolution
    self.sigmas, self.timesteps = solvers.flow_sigmas(config.sample.num_steps,
                                                      config.sample.flow_shift)

  @functools.cached_property
  def empty_prompt(self) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional branch's prompt: the template around an empty caption."""
    return self.prompts.encode("")

  # -- checkpoints -------------------------------------------------------------------------
  def _paths(self) -> dict:
    c = self.config
    out = {"mllm.path": c.mllm.path, "decoder.dit_path": c.decoder.dit_path}
    if c.decoder.autoencoder == "dc_ae":
      out["decoder.ae_path"] = c.decoder.ae_path
    return out

  def _check_checkpoints(self):
    """``model.init='pretrained'`` needs every checkpoint directory; say which are missing."""
    if self.config.model.init != "pretrained":
      if self.config.model.init != "random":
        raise ValueError(f"model.init {self.config.model.init!r} is not pretrained | random")
      return
    missing = {k: v for k, v in self._paths().items()
               if not v or not os.path.exists(os.path.join(v, "config.json"))}
    if missing:
      names = ", ".join(f"--config.{k}" + (f" (given {v!r}, no config.json there)" if v else "")
                        for k, v in missing.items())
      raise SystemExit(
          f"MetaQuery needs pretrained checkpoints; missing: {names}. Download LLaVA-OneVision"
          f"-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf) and Sana-1.6B 512px (diffusers "
          f"format: transformer/ and vae/) and pass their directories, or run the CPU demo "
          f"with --config configs/metaquery.py:demo. (--config.model.init=random skips "
          f"loading, e.g. for launch/aot.py.)")

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    if self.images:    # image tasks (tasks_lib: source images, placeholders, views)
      return tasks_lib.preprocess(self, record)
    image = image_ops.decode_image(record["image"])
    if image.shape[:2] != (self.resolution, self.resolution):
      image = image_ops.resize_crop(image, self.resolution)
    caption = record.get("caption")
    if not isinstance(caption, str):
      raise BadRecord(f"record has no caption (got {caption!r})")
    ids, mask = self.prompts.encode(caption)
    return {"images": image_ops.to_float(image), "prompt_ids": ids, "prompt_mask": mask}

  def dummy_batch(self, batch_size):
    r, p = self.resolution, self.prompts.max_len
    batch = {"images": np.zeros((batch_size, r, r, 3), np.float32),
             "prompt_ids": np.zeros((batch_size, p), np.int32),
             "prompt_mask": np.ones((batch_size, p), bool)}
    if self.images:
      batch.update(self.images.dummy(batch_size, p))
    return batch

  # -- parameters ---------------------------------------------------------------------------
  def init(self, rng, batch):
    variables = self.model.init(rng, batch["prompt_ids"], batch["prompt_mask"],
                                batch["images"], batch.get("input_views"))
    if self.config.model.init == "pretrained":
      params = dict(variables["params"])
      dec = self.config.decoder
      scan = dict(scan_layers=self.config.scan_layers)
      params["mllm"] = load_into(params["mllm"], "hf", self.config.mllm.path, **scan)
      params["dit"] = load_into(params["dit"], "diffusers", dec.dit_path, **scan)
      if "vae" in params:
        params["vae"] = load_into(params["vae"], "diffusers", dec.ae_path)
      variables = {**variables, "params": params}
    return variables

  def init_params(self, rng):
    """Unboxed params (a fresh init; pretrained parts loaded when configured)."""
    return nn.unbox(jax.jit(self.init)(rng, self.dummy_batch(1))["params"])

  def trainable_mask(self, params):
    """MLLM and autoencoder frozen; queries, markers, connector and (unless
    ``decoder.trainable=False``) the DiT train."""
    frozen = FROZEN + (() if self.config.decoder.trainable else ("dit",))
    return {k: jax.tree.map(lambda _, k=k: k not in frozen, v) for k, v in params.items()}

  def apply(self, params, *args, method=None):
    """``self.model.apply`` on ``{'params': params}`` (with the XLA:CPU depthwise-conv
    workaround, `_depthwise_as_shifts`, on the CPU backend)."""
    if jax.default_backend() != "cpu":
      return self.model.apply({"params": params}, *args, method=method)
    with nn.intercept_methods(_depthwise_as_shifts):
      return self.model.apply({"params": params}, *args, method=method)

  # -- training -----------------------------------------------------------------------------
  def _drop_captions(self, rng, ids, mask):
    """Caption -> "" with probability ``model.cond_dropout`` (the empty prompt, not zeros)."""
    drop = jax.random.bernoulli(rng, self.config.model.cond_dropout, (ids.shape[0],))
    e_ids, e_mask = (jnp.asarray(a) for a in self.empty_prompt)
    return (jnp.where(drop[:, None], e_ids, ids), jnp.where(drop[:, None], e_mask, mask),
            drop)

  def loss(self, params, batch, rng):
    k_drop, k_sigma, k_noise = jax.random.split(rng, 3)
    fm = self.config.flow
    apply = functools.partial(self.apply, params)
    x0 = jax.lax.stop_gradient(apply(batch["images"], method=MetaQueryModel.encode_images))
    if self.images:    # image tasks: per-task dropout to the null prompt / black images
      ids, mask, views, metrics = tasks_lib.drop_conditions(self, k_drop, batch)
    else:
      ids, mask, drop = self._drop_captions(k_drop, batch["prompt_ids"], batch["prompt_mask"])
      views, metrics = None, {"dropped": drop.mean()}
    sigma = flow.sample_sigmas(k_sigma, x0.shape[0], kind=fm.sigma_sampler,
                               num_levels=fm.num_levels or None, shift=fm.shift,
                               logit_mean=fm.logit_mean, logit_std=fm.logit_std)
    eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
    cond = apply(ids, mask, views, method=MetaQueryModel.condition)
    pred = apply(flow.add_noise(x0, eps, sigma), flow.timesteps_from_sigmas(sigma), cond,
                 method=MetaQueryModel.velocity)
    loss = flow.flow_matching_loss(pred, x0, eps)
    return loss, {**metrics, "cond_rms": jnp.sqrt(jnp.mean(jnp.square(
        cond.astype(jnp.float32))))}

  def flops_per_step(self, batch_size):
    """Analytic training FLOPs: 6 x (matmul params + attention) per token for what trains,
    4 x for the frozen MLLM (forward + backward to its inputs, no weight gradients); the
    frozen DC-AE encoder (forward) from XLA's cost analysis."""
    mllm, conn, d = self.mllm_cfg, self.conn_cfg, self.dit_cfg
    text = mllm if isinstance(mllm, LMConfig) else mllm.text
    n = self.config.model.num_queries
    s = self.prompts.max_len + n + 2 + len(self.prompts.suffix_ids)
    mllm_f = 4 * s * stack_flops_per_token(text.stack, s)
    conn_f = 6 * n * (stack_flops_per_token(conn.encoder(), n)
                      + conn.in_dim * conn.out_dim + conn.out_dim ** 2)
    dit_f = 6 * dit_flops_per_sample(d, self.latent_shape, n)
    ae_f = self._ae_encode_flops()
    vis_f = self.images.vision_flops(mllm) if self.images else 0.0
    return float(batch_size * (mllm_f + conn_f + dit_f + ae_f + vis_f))

  @property
  def latent_shape(self) -> tuple:
    r = self.resolution
    if self.ae_cfg is None:
      p = self.config.decoder.pixel_patch
      return (r // p, r // p, 3 * p * p)
    f = self.ae_cfg.spatial_compression_ratio
    return (r // f, r // f, self.ae_cfg.latent_channels)

  @functools.lru_cache(maxsize=1)
  def _ae_encode_flops(self) -> float:
    if self.ae_cfg is None:
      return 0.0
    ae = dc_ae.AutoencoderDC(self.ae_cfg)
    img = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
    p = jax.eval_shape(ae.init, jax.random.key(0), img)
    cost = jax.jit(functools.partial(ae.apply, method=ae.encode)).lower(p, img).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))

  # -- sampling -----------------------------------------------------------------------------
  def sample_latents(self, params, cond, uncond, noise, guidance=None):
    """DPM-Solver++ 2M from ``noise [b, h, w, c]`` (fp32) with two-way CFG: one batched DiT
    call on ``[uncond; cond]`` per step, one ``lax.scan``. ``cond``/``uncond`` are
    ``[b, N, C]`` connector outputs."""
    scale = self.config.sample.guidance if guidance is None else guidance
    both = jnp.concatenate([uncond, cond])

    def batched(x, t):
      return self.apply(params, x, t, both, method=MetaQueryModel.velocity)

    return solvers.dpm_solver_2m_sample(solvers.cfg_two_way(batched, scale), noise,
                                        self.sigmas, self.timesteps)

  def _generate(self, params, prompt_ids, prompt_mask, rng, guidance=None):
    """Jittable: prompts ``[b, P]`` -> images float ``[b, R, R, 3]`` in [-1, 1]."""
    b = prompt_ids.shape[0]
    e_ids, e_mask = (jnp.broadcast_to(jnp.asarray(a), (b,) + a.shape)
                     for a in self.empty_prompt)
    apply = functools.partial(self.apply, params)
    conds = apply(jnp.concatenate([e_ids, prompt_ids]), jnp.concatenate([e_mask, prompt_mask]),
                  method=MetaQueryModel.condition)
    uncond, cond = jnp.split(conds, 2)
    noise = jax.random.normal(rng, (b,) + self.latent_shape, jnp.float32)
    z = self.sample_latents(params, cond, uncond, noise, guidance)
    return apply(z, method=MetaQueryModel.decode_latents)

  def generate(self, params, captions: Sequence[str], rng, guidance=None, batch: int = 32):
    """Captions -> uint8 images ``[len, R, R, 3]`` (one compiled program per batch shape)."""
    gen = self._generate_jit()
    out = []
    for i in range(0, len(captions), batch):
      chunk = list(captions[i:i + batch])
      pad = batch - len(chunk) if len(captions) > batch else 0
      ids, mask = self.prompts.encode_batch(chunk + [""] * pad)
      imgs = gen(params, ids, mask, jax.random.fold_in(rng, i), guidance)
      out.append(np.asarray(image_ops.to_uint8(np.asarray(imgs)))[:len(chunk)])
    return np.concatenate(out)

  @functools.lru_cache(maxsize=1)
  def _generate_jit(self):
    return jax.jit(self._generate)

  # -- modes --------------------------------------------------------------------------------
  def modes(self):
    if self.images:
      return {"sample": functools.partial(tasks_lib.sample_mode, self),
              "eval": functools.partial(tasks_lib.eval_mode, self), "export": self.export_mode}
    return {"sample": self.sample_mode, "eval": self.eval_mode, "export": self.export_mode}

  def _eval_scenes(self, num):
    from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
    cats = [c.strip() for c in (self.config.eval.categories or
                                self.config.data.categories).split(",") if c.strip()]
    return [shapes.sample_scene(self.config.seed + 10_000, i, cats or None) for i in range(num)]

  def sample_mode(self, params, workdir, num=None):
    """A grid of generated images with their prompts: WORKDIR/samples/metaquery.png."""
    from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
    from mmjax.eval.pictures import caption_grid  # pylint: disable=import-outside-toplevel
    scenes = self._eval_scenes(num or self.config.sample.num_images)
    captions = [shapes.caption(s) for s in scenes]
    images = self.generate(params, captions, jax.random.key(self.config.seed + 1))
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", "metaquery.png")
    caption_grid(list(images), captions, cols=8).save(path)
    print(f"samples: {path}", flush=True)
    return path

  def eval_mode(self, params, workdir, num=None):
    """ShapesEval (per GenEval category and overall) of the trained model and of the same
    model at step 0 (fresh init from the config's seed), on the same prompts and noise:
    WORKDIR/eval/shapes_eval.json."""
    from mmjax.eval.shapes_eval import ShapesEval  # pylint: disable=import-outside-toplevel
    from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
    scenes = self._eval_scenes(num or self.config.eval.num_images)
    captions = [shapes.caption(s) for s in scenes]
    rng = jax.random.key(self.config.seed + 2)
    result = {"num_images": len(scenes), "guidance": self.config.sample.guidance,
              "num_steps": self.config.sample.num_steps}
    step0 = self.init_params(jax.random.PRNGKey(self.config.seed))
    for name, p in (("step0", step0), ("trained", params)):
      scores = ShapesEval().evaluate(list(self.generate(p, captions, rng)), scenes)
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

  def export_mode(self, params, workdir):
    from mmjax.systems import metaquery_export  # pylint: disable=import-outside-toplevel
    return metaquery_export.export(self, params, os.path.join(workdir, "export"))


# ============================================================================ FLOPs
def stack_flops_per_token(c: core.TransformerConfig, seq: int) -> float:
  """Multiply-adds per token of one pass of a core stack (matmuls + attention over
  ``seq`` keys); x2 for FLOPs of a forward, x6 for forward + backward."""
  per_layer = (c.d_model * c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
               + c.num_heads * c.head_dim * c.d_model
               + (3 if c.mlp_act in ("swiglu", "geglu") else 2) * c.d_model * c.mlp_dim
               + 2 * c.num_heads * c.head_dim * seq)
  return float(c.num_layers * per_layer)


def dit_flops_per_sample(d: sana_dit.SanaConfig, latent_shape: tuple, ctx: int) -> float:
  """Multiply-adds of one Sana DiT forward on one latent with ``ctx`` condition tokens."""
  h, w, c = latent_shape
  n = (h // d.patch_size) * (w // d.patch_size)
  dim, hid = d.inner_dim, d.ffn_dim
  cross = d.num_cross_attention_heads * d.cross_attention_head_dim
  per_token = (3 * dim * dim + dim * dim                        # linear self-attn q k v, out
               + 2 * dim * d.attention_head_dim                 # relu(k)^T v and q . kv
               + dim * cross + cross * dim + 2 * cross * ctx    # cross q, out, scores, values
               + dim * 2 * hid + 9 * 2 * hid + hid * dim)       # Mix-FFN
  per_ctx = 2 * dim * cross                                     # cross k, v of the condition
  layers = d.num_layers * (n * per_token + ctx * per_ctx)
  io = n * (d.patch_size ** 2) * (c * dim + dim * c) + ctx * (d.caption_channels * dim
                                                               + dim * dim)
  return float(layers + io)

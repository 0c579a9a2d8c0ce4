"""MetaQuery, the query bridge: learnable queries read a frozen MLLM out into a diffusion decoder.

The method ("Transfer between Modalities with MetaQueries", spec/metaquery.md):

1. **Queries through the frozen MLLM.** The prompt (`prompt.PromptFormat`: chat template,
   caption; left-padded to a fixed length) is followed by
   ``<begin_of_img> q_0 .. q_{N-1} <end_of_img>`` and the template's closing tokens. The N
   queries and the two markers are our own parameters (the vocabulary is never touched);
   the MLLM keeps its ordinary *causal* mask, so each query sees the whole prompt and the
   queries before it (``MetaQueryModel.query_states``).
2. **Condition.** The final hidden states *after the final norm* at the N query positions.
   The MLLM is frozen, but gradients flow through it back to the queries.
3. **Connector.** "Enc-Proj" (``Connector``): a bidirectional Qwen2-style encoder at the
   MLLM width D (RoPE, QK-norm after RoPE with a gain per head and dimension, SwiGLU 4D,
   q/k/v biases, no final norm), then
   Linear(D->C)-GELU(tanh)-Linear(C->C)-RMSNorm(C) with the norm's weight starting at
   sqrt(5.5). "Proj-Enc" projects first and runs the encoder at width C.
   ``MetaQueryModel.condition`` = connector(query states): ``[b, N, C]``.
4. **Decoder.** The condition replaces the text encoder's output of a Sana DiT, i.e. it
   enters *before* Sana's own caption projection and caption norm (which train)
   (``MetaQueryModel.velocity``). Latents come from a frozen DC-AE (or, for CPU demos, from
   pixels by space-to-depth). The SD1.5 decoder: the condition ``[b, 77, 768]`` is the
   UNet's ``encoder_hidden_states`` (CLIP's place); latents are posterior samples of the
   frozen KL autoencoder.
5. **Training** (`system.MetaQuery.loss`). Flow matching (`mmjax.diffusion.flow`; SD1.5:
   DDPM epsilon prediction with uniform integer t, `mmjax.diffusion.ddpm`), caption -> ""
   with p=0.1 so the unconditional branch is the MLLM on the empty prompt (queries
   included).
6. **Sampling** (`system.MetaQuery.generate`). One XLA program: prompts and empty prompts
   -> conditions, DPM-Solver++ 2M with flow sigmas and two-way CFG batched in one DiT call
   per step, decode to pixels.
7. **Image tasks** (`tasks`: reconstruct, edit, instruct). Input images go through the
   MLLM's frozen vision tower and are spliced at the prompt's image placeholders
   (``MetaQueryModel.image_tokens``); per-task condition dropout (black images, the null
   prompt) and three-way CFG sampling. The MLLM is LLaVA-OneVision (MetaQuery-B) or
   Qwen2.5-VL (-L, -XL: its ViT on one patch grid, M-RoPE positions; `mllm_qwen25vl`).

Parameters: ``mllm`` (frozen), ``queries [N, D]``, ``markers [2, D]`` (begin, end),
``connector``, ``dit`` (the decoder's denoiser: the Sana DiT, or SD1.5's UNet -- one group
name, so freezing and loading treat both alike), ``vae`` (frozen; with
``decoder.autoencoder`` 'dc_ae' or 'kl').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.models import autoencoder_kl, dc_ae, image_tokens, sana_dit, unet2d
from mmjax.models import llava_onevision as lov
from mmjax.models import qwen2_5_vl as qvl
from mmjax.models.lm import DecoderLM, LMConfig
from mmjax.systems.metaquery import mllm_qwen25vl as mq_qvl

CONNECTORS = ("enc_proj", "proj_enc")
AUTOENCODERS = ("dc_ae", "kl", "pixels")


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
class MetaQueryModel(nn.Module):
  """MLLM + queries + connector + Sana DiT (+ DC-AE), or SD1.5's UNet (+ KL autoencoder).
  Methods (``apply(..., method=...)``), in the order of the method above:

  * ``query_states(prompt_ids, prompt_mask, views=None) -> [b, N, D]``  (steps 1, 2)
  * ``condition(prompt_ids, prompt_mask, views=None) -> [b, N, C]``     (step 3)
  * ``velocity(latents, t, cond) -> latents-shaped flow prediction``    (step 4; t on the
    0..1000 scale; the SD1.5 UNet predicts the noise epsilon at integer t in [0, 1000))
  * ``encode_images(images [-1, 1], rng=None) -> latents`` (KL: the posterior sample with
    ``rng``, else its mean) / ``decode_latents(latents) -> images``
  * ``image_tokens(views) -> [b, K*T, D]``                               (step 7)
  * ``__call__`` runs all of them (initialisation).

  Input images (``image_layout`` set): ``views [b, K, V, S, S, 3]`` -- K image slots per
  example, V views per image, SigLIP-normalised -- go through the vision tower and the
  projector (``lax.stop_gradient``: the tower is frozen and nothing upstream trains), are
  packed per image (``image_tokens.pack_views``) and spliced, row by row in order, at the
  prompt's ``image_token_id`` positions. A row with n < K images has n placeholder groups,
  in slots 0..n-1; the features of the empty slots are computed (static shapes) and never
  used.
  """
  mllm_cfg: Any                         # LMConfig (text MLLM) | LlavaOnevisionConfig |
                                        # Qwen25VLConfig (mllm_qwen25vl)
  num_queries: int
  suffix_ids: tuple                     # tokens after <end_of_img> (e.g. <|im_end|>)
  connector: ConnectorConfig
  dit: Any                              # sana_dit.SanaConfig | unet2d.UNetConfig (SD1.5)
  autoencoder: str                      # 'dc_ae' | 'kl' | 'pixels'
  ae: Optional[Any] = None              # dc_ae.DCAEConfig | autoencoder_kl.AutoencoderKLConfig
  pixel_patch: int = 4
  query_init_std: float = 0.02
  image_layout: Optional[Any] = None    # anyres.ImageLayout of every input image (tasks);
                                        # Qwen2.5-VL: its patch grid (1, h, w)
  image_token_id: int = -1
  full_mllm: bool = False               # init every MLLM weight (the vision tower of a
                                        # text-to-image run too: the authors' layout has it)

  def setup(self):
    cfg = self.mllm_cfg
    if isinstance(cfg, LMConfig):
      self.mllm = DecoderLM(cfg)
    elif mq_qvl.is_qwen25vl(cfg):
      self.mllm = qvl.Qwen25VL(cfg)
    else:
      self.mllm = lov.LlavaOnevision(cfg)
    d = self.text_config.stack.d_model
    init = nn.with_logical_partitioning(nn.initializers.normal(self.query_init_std),
                                        (None, "embed"))
    self.queries = self.param("queries", init, (self.num_queries, d), jnp.float32)
    self.markers = self.param("markers", init, (2, d), jnp.float32)   # begin, end of image
    self.bridge = Connector(self.connector, name="connector")
    if isinstance(self.dit, unet2d.UNetConfig):
      self.dit_model = unet2d.UNet2DConditionModel(self.dit, name="dit")
    else:
      self.dit_model = sana_dit.SanaDiT(self.dit, name="dit")
    if self.autoencoder == "dc_ae":
      self.vae = dc_ae.AutoencoderDC(self.ae, name="vae")
    elif self.autoencoder == "kl":
      self.vae = autoencoder_kl.AutoencoderKL(self.ae, name="vae")
    elif self.autoencoder != "pixels":
      raise ValueError(f"decoder.autoencoder {self.autoencoder!r} not in {AUTOENCODERS}")

  @property
  def text_config(self) -> LMConfig:
    cfg = self.mllm_cfg
    return cfg if isinstance(cfg, LMConfig) else cfg.text

  def _language_model(self) -> DecoderLM:
    return self.mllm if isinstance(self.mllm_cfg, LMConfig) else self.mllm.language_model

  # -- 1, 2: the queries through the frozen MLLM -------------------------------------------
  def query_states(self, prompt_ids, prompt_mask, views=None):
    """Left-padded prompts ``[b, P]`` (and input image views, see the class docstring) ->
    the MLLM's final hidden states (after its final norm) at the N query positions
    ``[b, N, D]``.

    Sequence: ``prompt (left padded) | begin | q_0 .. q_{N-1} | end | suffix``; causal mask
    over the real tokens; RoPE positions count real tokens (so padding changes nothing).
    Qwen2.5-VL with input images: M-RoPE positions, image tokens on their grid
    (``mllm_qwen25vl.positions``); text-only, all three axes count real tokens.
    """
    lm = self._language_model()
    b, p = prompt_ids.shape
    dtype = self.text_config.stack.dtype
    prompt = lm.embed(prompt_ids)                                        # [b, P, D]
    if views is not None:
      prompt = image_tokens.splice(prompt, prompt_ids == self.image_token_id,
                                   self.image_tokens(views))
    suffix = lm.embed(jnp.broadcast_to(jnp.asarray(self.suffix_ids, jnp.int32),
                                       (b, len(self.suffix_ids))))
    block = jnp.concatenate([self.markers[:1], self.queries, self.markers[1:]]).astype(dtype)
    x = jnp.concatenate([prompt.astype(dtype), jnp.broadcast_to(block, (b,) + block.shape),
                         suffix.astype(dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool),
                            jnp.ones((b, x.shape[1] - p), bool)], axis=1)
    positions = None
    if views is not None and mq_qvl.is_qwen25vl(self.mllm_cfg):
      ids = jnp.concatenate([prompt_ids.astype(jnp.int32),                # -1: text
                             jnp.full((b, x.shape[1] - p), -1, jnp.int32)], axis=1)
      positions = mq_qvl.positions(self.mllm_cfg, ids, mask, self.image_layout,
                                   b * views.shape[1])
    h = lm.features(inputs_embeds=x, attention_mask=mask,               # post final norm
                    positions=positions)
    h = h[:, p + 1:p + 1 + self.num_queries]                             # [b, N, D]
    return core.constrain(h, ("act_batch", "act_length", "act_embed"))

  # -- 3: the condition ----------------------------------------------------------------------
  def condition(self, prompt_ids, prompt_mask, views=None):
    """Left-padded prompts ``[b, P]`` (+ input image views) -> the decoder's condition
    ``[b, N, C]``: the connector on the query states."""
    return self.bridge(self.query_states(prompt_ids, prompt_mask, views))

  # -- 4: the decoder ------------------------------------------------------------------------
  def velocity(self, latents, t, cond):
    """The DiT's flow prediction with the condition as its (unmasked) caption; the SD1.5
    UNet's noise prediction with the condition as its ``encoder_hidden_states``."""
    if isinstance(self.dit, unet2d.UNetConfig):
      return self.dit_model(latents, t, cond)
    return self.dit_model(latents, t, cond, None)

  def encode_images(self, images, rng=None):
    """Images in [-1, 1] -> the decoder's (scaled) latents, fp32. The KL autoencoder's
    posterior is sampled with ``rng`` (training), its mean taken without."""
    if self.autoencoder == "pixels":
      return space_to_depth(images.astype(jnp.float32), self.pixel_patch)
    if self.autoencoder == "kl":
      mean, logvar = self.vae.encode(images)
      z = mean if rng is None else autoencoder_kl.sample(mean, logvar, rng)
      return autoencoder_kl.scale_latents(z, self.ae).astype(jnp.float32)
    return dc_ae.scale_latents(self.vae.encode(images), self.ae).astype(jnp.float32)

  def decode_latents(self, latents):
    if self.autoencoder == "pixels":
      return depth_to_space(latents, self.pixel_patch)
    return self.vae.decode(dc_ae.unscale_latents(latents, self.ae))   # DC-AE's rule = KL's

  # -- 7: input images -----------------------------------------------------------------------
  def image_tokens(self, views):
    """``[b, K, V, S, S, 3]`` normalised views -> image tokens ``[b, K*T, D]`` (frozen tower,
    no gradient)."""
    if self.image_layout is None or isinstance(self.mllm_cfg, LMConfig):
      raise ValueError("input images need an MLLM with a vision tower and an image layout")
    if mq_qvl.is_qwen25vl(self.mllm_cfg):    # views: [b, K, patches, patch_dim]
      return jax.lax.stop_gradient(mq_qvl.vision_features(
          self.mllm, self.mllm_cfg, views, self.image_layout))
    b, k, v = views.shape[:3]
    vis = self.mllm.vision_tower(views.reshape((b * k * v,) + views.shape[3:]))
    feats = vis["encoder_output"]                                        # hidden_states[-1]
    if self.mllm_cfg.feature_select == "default":
      feats = feats[:, 1:]
    feats = self.mllm.projector(feats)                                   # [bkv, g*g, D]
    feats = image_tokens.pack_views(feats.reshape((b * k, v) + feats.shape[1:]),
                                    self.image_layout, self.mllm.image_newline)  # [bk, T, D]
    return jax.lax.stop_gradient(feats.reshape(b, -1, feats.shape[-1]))

  def __call__(self, prompt_ids, prompt_mask, images, views=None):
    if self.full_mllm and mq_qvl.is_qwen25vl(self.mllm_cfg):
      mq_qvl.init_vision(self.mllm, self.mllm_cfg, self.text_config.stack.dtype)
    elif self.full_mllm and not isinstance(self.mllm_cfg, LMConfig):
      s = self.mllm_cfg.vision.image_size
      self.mllm.image_features(jnp.zeros((1, s, s, 3), self.text_config.stack.dtype))
    z = self.encode_images(images)
    cond = self.condition(prompt_ids, prompt_mask, views)
    v = self.velocity(z, jnp.zeros((z.shape[0],), jnp.float32), cond)
    return v, self.decode_latents(z)


def broadcast_qk_gains(params, cfg: ConnectorConfig):
  """Params saved when the connector's QK-norm gain was one scalar per head (``q_gain`` /
  ``k_gain`` ``[(layers,) heads]``) -> today's ``[(layers,) heads, head_dim]``, each head's
  scalar on every dimension (the same function). Other leaves pass through."""
  enc = cfg.encoder()
  new = (enc.num_heads, enc.head_dim)

  def fix(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name not in ("q_gain", "k_gain") or tuple(x.shape[-2:]) == new or x.shape[-1] != new[0]:
      return x
    return jnp.broadcast_to(jnp.asarray(x)[..., None], tuple(x.shape) + (new[1],))
  return jax.tree_util.tree_map_with_path(fix, params)


# ============================================================================ pixel latents
def space_to_depth(images, patch: int):
  """Pixel "latents" for CPU demos: ``[b, H, W, 3]`` in [-1, 1] -> ``[b, H/p, W/p, 3 p^2]``."""
  return dc_ae.pixel_unshuffle(images, patch) if patch > 1 else images


def depth_to_space(latents, patch: int):
  return dc_ae.pixel_shuffle(latents, patch) if patch > 1 else latents

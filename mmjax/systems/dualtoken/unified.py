"""DualToken's unified autoregressive model: one language model over text and the two visual
vocabularies, with a depth-transformer head per vocabulary.

* **Visual input.** A visual position carries ``D`` pixel codes and ``D`` semantic codes.
  Each vocabulary has its own code-embedding table (shared across depths, like the
  tokenizer's codebook); the position's embedding is
  ``Linear(concat(sum_d E_pix[c_pix_d], sum_d E_sem[c_sem_d]))`` at the LM width. Visual
  positions sit between the image markers among the text tokens.
* **Depth heads.** The hidden state of the LM at position ``t`` predicts the codes of
  visual position ``t + 1`` through two heads (pixel, semantic), each a small causal core
  transformer over the ``D`` depths: depth 0 reads ``MLP(hidden)``, depth ``d`` reads
  ``MLP(sum of the code embeddings of depths < d)``, plus a learned depth embedding; a
  final norm and ``D`` separate classifiers give the logits of each depth.
* **Text.** Text positions are read and predicted by the LM itself (embedding, head).
* **Tokenizer.** The frozen DualToken tokenizer (``Tokenizer``: tower, projections, both
  quantisers, pixel decoder) turns images into codes and pixel codes back into images;
  its codebooks are the ``codebook`` collection.

Parameters: ``lm`` (a ``DecoderLM``: Qwen2 / Qwen2.5), ``visual/{pixel_embed,
semantic_embed, proj}``, ``pixel_head``, ``semantic_head`` (``{from_hidden, from_codes,
depth_embed, stack, norm, classifier [D, width, K]}``) and ``tokenizer``.

Example::

    model = UnifiedModel(cfg)                                   # cfg: UnifiedConfig
    v = model.init(key, ids, mask, start, pix, sem)             # params + codebook
    text_logits, pix_logits, sem_logits = model.apply(v, ids, mask, start, pix, sem)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import core
from mmjax.models.lm import DecoderLM, LMConfig
from mmjax.systems.dualtoken.model import DualTokenConfig, Tokenizer

F32 = jnp.float32
VOCABS = ("pixel", "semantic")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """One depth head: its core stack (causal, no RoPE), the depths and the vocabulary."""
  stack: core.TransformerConfig
  depths: int
  codebook_size: int


@dataclasses.dataclass(frozen=True)
class UnifiedConfig:
  lm: LMConfig
  tokenizer: DualTokenConfig
  pixel_head: HeadConfig
  semantic_head: HeadConfig
  code_embed_dim: int            # width of each vocabulary's code-embedding table
  positions: int                 # visual positions per image (27 x 27 = 729 at 384 px)

  @property
  def depths(self) -> int:
    return self.pixel_head.depths

  def head(self, vocab: str) -> HeadConfig:
    return self.pixel_head if vocab == "pixel" else self.semantic_head


def exclusive_sums(embeds: jax.Array) -> jax.Array:
  """``[..., D, e]`` per-depth code embeddings -> ``[..., D - 1, e]``: entry ``d - 1`` is the
  sum over depths ``< d`` (the input of depth ``d``)."""
  return jnp.cumsum(embeds, axis=-2)[..., :-1, :]


class DepthHead(nn.Module):
  """A causal transformer over the depths of one visual position (see the module doc)."""
  cfg: HeadConfig

  def setup(self):
    c, s = self.cfg, self.cfg.stack
    kw = dict(dtype=s.dtype, param_dtype=s.param_dtype, init_std=s.init_std)
    self.from_hidden = core.Mlp(s.mlp_dim, act="gelu_tanh", use_bias=True, out_dim=s.d_model,
                                **kw)
    self.from_codes = core.Mlp(s.mlp_dim, act="gelu_tanh", use_bias=True, out_dim=s.d_model,
                               **kw)
    self.depth_embed = self.param(
        "depth_embed", nn.with_logical_partitioning(nn.initializers.normal(s.init_std),
                                                    (None, "embed")),
        (c.depths, s.d_model), s.param_dtype)
    self.stack = core.TransformerStack(s)
    self.norm = core.make_norm(s.norm, s.norm_eps, s.dtype, s.param_dtype, "norm")
    self.classifier = self.param(
        "classifier", nn.with_logical_partitioning(nn.initializers.normal(s.init_std),
                                                   (None, "embed", "vocab")),
        (c.depths, s.d_model, c.codebook_size), s.param_dtype)

  def inputs(self, hidden, prefix_sums):
    """``hidden [n, H]`` and ``prefix_sums [n, D - 1, e]`` -> the stack's input ``[n, D, W]``."""
    first = self.from_hidden(hidden[:, None])
    rest = self.from_codes(prefix_sums)
    x = jnp.concatenate([first, rest.astype(first.dtype)], axis=1)
    return x + self.depth_embed.astype(x.dtype)[None]

  def classify(self, x, depth=None):
    """Normed stack outputs ``[n, D, W]`` (or ``[n, W]`` at one ``depth``) -> fp32 logits."""
    x = self.norm(x)
    w = self.classifier.astype(x.dtype)
    if depth is None:
      return jnp.einsum("ndw,dwk->ndk", x, w).astype(F32)
    return jnp.einsum("nw,wk->nk", x, w[depth]).astype(F32)

  def __call__(self, hidden, prefix_sums):
    """Teacher-forced logits of every depth ``[n, D, K]`` (training)."""
    x = self.inputs(hidden, prefix_sums)
    mask = core.make_attention_mask("causal", self.cfg.depths)
    return self.classify(self.stack(x, mask=mask))

  def first_input(self, hidden):
    """The stack input of depth 0 ``[n, W]`` from LM states ``[n, H]``."""
    x = self.from_hidden(hidden[:, None])[:, 0]
    return x + self.depth_embed[0].astype(x.dtype)

  def code_input(self, prefix_sum, depth: int):
    """The stack input of ``depth >= 1`` ``[n, W]`` from the sum of the code embeddings of
    the depths before it ``[n, e]``."""
    x = self.from_codes(prefix_sum[:, None])[:, 0]
    return x + self.depth_embed[depth].astype(x.dtype)

  def step(self, x, depth: int, cache):
    """One depth of sampling with the head's KV cache (``core.init_cache(stack, n, D)``):
    the stack input ``x [n, W]`` of ``depth`` -> ``(logits [n, K], cache)``."""
    mask = core.make_attention_mask("causal", 1, self.cfg.depths, q_offset=cache.index)
    y, cache = self.stack(x[:, None], mask=mask, cache=cache, decode=True)
    return self.classify(y[:, 0], depth), cache


class VisualEmbedding(nn.Module):
  """Code-embedding tables of both vocabularies and the projection to the LM width."""
  cfg: UnifiedConfig

  def setup(self):
    c, s = self.cfg, self.cfg.lm.stack
    kw = dict(dtype=s.dtype, param_dtype=s.param_dtype, init_std=s.init_std)
    self.pixel_embed = core.Embed(c.pixel_head.codebook_size, c.code_embed_dim, **kw)
    self.semantic_embed = core.Embed(c.semantic_head.codebook_size, c.code_embed_dim, **kw)
    self.proj = core.dense(s.d_model, ("mlp", "embed"), use_bias=True, name="proj", **kw)

  def codes(self, vocab: str, codes):
    """Per-depth embeddings ``[..., D, e]`` of ``codes [..., D]``."""
    table = self.pixel_embed if vocab == "pixel" else self.semantic_embed
    return jnp.take(table.embedding, codes, axis=0).astype(self.cfg.lm.stack.dtype)

  def __call__(self, pixel_codes, semantic_codes):
    """``[..., D]`` codes of both vocabularies -> position embeddings ``[..., H]``."""
    pix = jnp.sum(self.codes("pixel", pixel_codes), axis=-2)
    sem = jnp.sum(self.codes("semantic", semantic_codes), axis=-2)
    return self.proj(jnp.concatenate([pix, sem], axis=-1))


def splice(text, visual, start):
  """``text [b, L, H]`` with ``visual [b, N, H]`` written at positions ``start[b] ...
  start[b] + N - 1`` of each row."""
  n, length = visual.shape[1], text.shape[1]
  rel = jnp.arange(length)[None, :] - start[:, None]                    # [b, L]
  inside = (rel >= 0) & (rel < n)
  picked = jnp.take_along_axis(visual, jnp.clip(rel, 0, n - 1)[..., None], axis=1)
  return jnp.where(inside[..., None], picked.astype(text.dtype), text)


class UnifiedModel(nn.Module):
  """The LM, the visual embedding, the two depth heads and the frozen tokenizer."""
  cfg: UnifiedConfig

  def setup(self):
    c = self.cfg
    self.lm = DecoderLM(c.lm)
    self.visual = VisualEmbedding(c)
    self.pixel_head = DepthHead(c.pixel_head)
    self.semantic_head = DepthHead(c.semantic_head)
    self.tokenizer = Tokenizer(c.tokenizer)

  def _head(self, vocab):
    return self.pixel_head if vocab == "pixel" else self.semantic_head

  # -- training forward ---------------------------------------------------------------------
  def embed_sequence(self, ids, start, pixel_codes, semantic_codes):
    """Text embeddings of ``ids [b, L]`` with the image's visual embeddings spliced in at
    ``start [b]`` (the first visual position)."""
    return splice(self.lm.embed(ids), self.visual(pixel_codes, semantic_codes), start)

  def head_logits(self, vocab, hidden, codes):
    """Teacher-forced logits ``[n, D, K]`` of ``vocab``'s head from LM states ``[n, H]``
    and the target codes ``[n, D]`` (their prefix sums feed depths >= 1)."""
    return self._head(vocab)(hidden, exclusive_sums(self.visual.codes(vocab, codes)))

  def __call__(self, ids, mask, start, pixel_codes, semantic_codes):
    """``(text_logits [b, L, V], pixel_logits [b, N, D, K], semantic_logits)``.

    Row ``t`` of the text logits predicts token ``t + 1``; the visual logits of position
    ``j`` come from the LM state at ``start + j - 1`` (the marker before the image for
    ``j = 0``).
    """
    x = self.embed_sequence(ids, start, pixel_codes, semantic_codes)
    h = self.lm.features(attention_mask=mask, inputs_embeds=x)
    n = pixel_codes.shape[1]
    idx = start[:, None] - 1 + jnp.arange(n)[None]                      # [b, N]
    hv = jnp.take_along_axis(h, idx[..., None], axis=1)                 # [b, N, H]
    b = hv.shape[0]
    flat = hv.reshape(b * n, -1)
    out = [self.head_logits(v, flat, c.reshape(b * n, -1)).reshape(b, n, *c.shape[2:], -1)
           for v, c in zip(VOCABS, (pixel_codes, semantic_codes))]
    return (self.lm.logits(h), *out)

  # -- sampling pieces ----------------------------------------------------------------------
  def lm_step(self, embeds, slots, cache):
    """LM states ``[b, len, H]`` of ``embeds`` written into the KV cache (``slots [b, max]``:
    the real cache slots, generated ones included) -> ``(hidden, cache)``."""
    return self.lm.features(attention_mask=slots, cache=cache, inputs_embeds=embeds)

  def text_logits(self, hidden):
    return self.lm.logits(hidden)

  def embed_text(self, ids):
    return self.lm.embed(ids)

  def embed_visual(self, pixel_codes, semantic_codes):
    return self.visual(pixel_codes, semantic_codes)

  def code_embeddings(self, vocab, codes):
    """Per-depth code embeddings ``[..., D, e]`` (fp32 sums are taken by the sampler)."""
    return self.visual.codes(vocab, codes)

  def head_first_input(self, vocab, hidden):
    return self._head(vocab).first_input(hidden)

  def head_code_input(self, vocab, prefix_sum, depth: int):
    return self._head(vocab).code_input(prefix_sum, depth)

  def head_step(self, vocab, x, depth: int, cache):
    return self._head(vocab).step(x, depth, cache)

  # -- the frozen tokenizer -----------------------------------------------------------------
  def tokenize(self, images):
    """``images [b, R, R, 3]`` in [-1, 1] -> ``(pixel_codes, semantic_codes)`` ``[b, N, D]``."""
    out = self.tokenizer.encode(images)
    return (jax.lax.stop_gradient(out["pixel_codes"]),
            jax.lax.stop_gradient(out["semantic_codes"]))

  def decode_pixels(self, pixel_codes):
    """Pixel codes ``[b, N, D]`` -> images ``[b, R, R, 3]`` (the tokenizer's decoder)."""
    return self.tokenizer.decode(pixel_codes)

  def init_all(self, ids, mask, start, pixel_codes, semantic_codes, images):
    """Creates every parameter (init only)."""
    self.tokenizer(images)
    return self(ids, mask, start, pixel_codes, semantic_codes)


def head_config(width: int, layers: int, heads: int, mlp_dim: int, depths: int,
                codebook_size: int, *, dtype: Any = F32, scan_layers: bool = True,
                remat_policy: str = "none", init_std: float = 0.02) -> HeadConfig:
  """A depth head: pre-norm RMSNorm / SwiGLU core stack without RoPE (the learned depth
  embedding carries the order)."""
  stack = core.TransformerConfig(
      num_layers=layers, d_model=width, num_heads=heads, mlp_dim=mlp_dim, mlp_act="swiglu",
      norm="rms", rope_theta=None, dtype=dtype, scan_layers=scan_layers,
      remat_policy=remat_policy, init_std=init_std)
  return HeadConfig(stack=stack, depths=depths, codebook_size=codebook_size)

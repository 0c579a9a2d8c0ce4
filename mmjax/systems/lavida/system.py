"""LaViDa's method: a masked-diffusion vision-language model (``configs/lavida.py``).

**Model** (``model.py``). LLaDA (LaViDa-L) or Dream (LaViDa-D) with SigLIP anyres vision: the
image tokens -- each view's penultimate SigLIP features, projected, pooled, base view then the
grid picture with a newline after each row -- are spliced into the chat prompt at its image
slots (LaViDa's -200 sentinel). ``model.init_from`` starts from a LaViDa checkpoint as
released (``checkpoint.py``).

**Training** (`Lavida.loss`). A caption or answer follows the prompt, padded with
*supervised* EOS (``data.py``); every row of the batch is padded to the batch's longest answer
(`Lavida.pad_to_batch`). The forward process draws ``t ~ U(0, 1)`` per row and masks each
answer token with probability ``p = (1 - 1e-3) t + 1e-3`` (at least one), at the embedding
level; prompt and image are never masked, [FIM] markers neither. *Complementary masking*:
each row also appears with exactly the other answer positions masked (time ``1 - t``), so
every answer token is supervised once per sample; the vision tower runs once on the B rows
and its embeddings serve all 2B (`Lavida.forward_masks`). The attention is *Prefix-DLM*:
the prompt never attends to the answer, which makes the sampler's prefix KV cache exact. The
loss is LaViDa's token mean of the cross-entropy over the masked answer tokens, without
LLaDA's ``1/p`` weight (``model.loss='llada'`` restores it). Stages: 1 trains the projector
only (single view, no pooling), 2 everything (vision at 0.1x the LM's learning rate), 3 adds
FIM insertion ([S]... [FIM] segments between words).

**Sampling** (`Lavida.generate`, `Lavida.infill`): the prompt's embeddings (image spliced
in) go to ``mmjax.diffusion.masked.sampler.generate`` -- one ``while_loop`` with schedules,
remasking, CFG, prefix / dual KV cache and confidence-threshold decoding; infill starts from
a text draft with holes.

Example (CPU, ~11 minutes: trains, then the speed / quality table of ``eval.py``)::

    python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida
    python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida --mode export
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import BadRecord
from mmjax.data import image as image_ops
from mmjax.diffusion.masked import forward
from mmjax.diffusion.masked.denoiser import DiffusionLM
from mmjax.diffusion.masked.drafts import check_draft, pad_drafts, strip_tokens
from mmjax.diffusion.masked.sampler import generate as diffusion_generate
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.interop.subtree import load_into
from mmjax.models import siglip
from mmjax.models.lm import DecoderLM
from mmjax.systems.base import System
from mmjax.systems.lavida import checkpoint, eval as lavida_eval, eval_captions, eval_long
from mmjax.systems.lavida.data import (IMAGE_TOKEN_INDEX, PROMPT_KINDS, Prompter,
                                       VisionGeometry, make_example)
from mmjax.train import flops as fl
from mmjax.systems.lavida.model import (BACKBONES, LavidaConfig, LavidaModel,
                                        vision_tower_config)

LOSSES = ("lavida", "llada")
INITS = ("pretrained", "random")


def _read_json(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


class Lavida(System):
  """The trainer's view of LaViDa (see the module docstring and ``configs/lavida.py``)."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if m.stage not in (1, 2, 3):
      raise ConfigError(f"model.stage={m.stage!r}; LaViDa has stages 1, 2, 3")
    for field, value, allowed in (("model.loss", m.loss, LOSSES),
                                  ("model.backbone", m.backbone, tuple(BACKBONES)),
                                  ("model.t_sampler", m.t_sampler, forward.T_KINDS),
                                  ("model.prompt", m.prompt, PROMPT_KINDS),
                                  ("model.init", m.init, INITS)):
      if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {allowed}")
    self._check_checkpoints()
    self.model_cfg = self._architecture()
    self.geometry = self.model_cfg.geometry
    text = self.model_cfg.text
    self.prompter = self._make_prompter()
    if self.prompter is not None and self.prompter.vocab_size > text.vocab_size:
      raise ConfigError(f"the tokenizer has {self.prompter.vocab_size} ids, the language "
                        f"model {text.vocab_size}")
    self.model = LavidaModel(self.model_cfg)
    self.lm_module = DecoderLM(text)
    self.prompt_len = m.max_prompt_text + self.geometry.max_tokens
    self.answer_len = m.answer_len
    self.mask_id = int(self.prompter.mask_id if self.prompter else json.loads(
        text.hf_extra).get("mask_token_id", BACKBONES[m.backbone].MASK_TOKEN_ID))

  def _architecture(self) -> LavidaConfig:
    """The network: a LaViDa checkpoint's (``model.init_from``: its LM, tower and grid
    pinpoints; ``model.anyres`` / ``pool`` as configured), else the LLM and SigLIP
    directories' (or ``llm_config`` / ``vision_config`` at random init), the tower cut at
    ``vision_feature_layer``. Images sit at LaViDa's -200 sentinel in the prompt ids."""
    m, c = self.config.model, self.config
    kw = dict(dtype=jnp.dtype(c.dtype), remat_policy=c.remat_policy)
    if m.init_from:
      release = checkpoint.read_release(m.init_from, scan_layers=c.scan_layers, **kw)
      if release.text.family != m.backbone:
        raise ConfigError(f"model.init_from={m.init_from!r} holds a LaViDa checkpoint with a "
                          f"{release.text.family} backbone, model.backbone={m.backbone!r} "
                          f"(the dream preset picks Dream)")
      geometry = dataclasses.replace(release.geometry, anyres=m.anyres, pool=m.pool)
      return dataclasses.replace(release, geometry=geometry, image_token_id=IMAGE_TOKEN_INDEX)
    pretrained = m.init == "pretrained"
    llm_hf = _read_json(m.llm_path) if pretrained else m.llm_config.to_dict()
    text = BACKBONES[m.backbone].from_hf_config(llm_hf, scan_layers=c.scan_layers, **kw)
    vis_hf = _read_json(m.vision_path) if pretrained else m.vision_config.to_dict()
    vis_hf = vis_hf.get("vision_config", vis_hf)       # a full SigLIP's config.json nests it
    depth = m.vision_feature_layer % (vis_hf["num_hidden_layers"] + 1)
    vision = vision_tower_config(vis_hf, num_layers=depth, **kw)
    geometry = VisionGeometry(tile=vis_hf["image_size"], patch=vision.patch_size,
                              anyres=m.anyres, pool=m.pool)
    extra = {"mm_vision_tower": m.vision_path} if pretrained else {}
    return LavidaConfig(vision=vision, text=text, geometry=geometry,
                        hf_extra=json.dumps(extra))

  # -- checkpoints and tokenizer ------------------------------------------------------------
  def _check_checkpoints(self):
    """``model.init_from`` must be a checkpoint directory; else ``model.init='pretrained'``
    needs both the LLM and SigLIP directories; names what is missing."""
    m = self.config.model
    if m.init_from:
      if not os.path.exists(os.path.join(m.init_from, "config.json")):
        raise MissingCheckpoint({"--config.model.init_from": m.init_from},
                                "it should be a LaViDa checkpoint (config.json + safetensors: "
                                "a release, or what --mode export writes)")
      return
    if m.init == "random":
      return
    missing = {f"--config.model.{k}": v for k, v in (("llm_path", m.llm_path),
                                                     ("vision_path", m.vision_path))
               if not v or not os.path.exists(os.path.join(v, "config.json"))}
    if missing:
      llm = ("LLaDA-8B-Instruct (GSAI-ML/LLaDA-8B-Instruct)" if m.backbone == "llada"
             else "Dream-v0-Instruct-7B")
      raise MissingCheckpoint(
          missing, f"LaViDa needs pretrained checkpoints (a directory with config.json): "
          f"download {llm} and SigLIP (google/siglip-so400m-patch14-384) and pass their "
          f"directories, or run the CPU demo: --config configs/lavida.py:demo. "
          f"(--config.model.init=random skips loading, e.g. for launch/aot.py.)")

  def _make_prompter(self) -> Optional[Prompter]:
    """The chat template and tokenizer; None when no tokenizer is configured (a random-init
    full-size model, e.g. for AOT compiles: preprocess then raises)."""
    m = self.config.model
    if m.prompt == "shapes":           # the long-answer task has a few more words
      from mmjax.data.shapes_describe import describe_tokenizer  # pylint: disable=import-outside-toplevel
      from mmjax.data.tokenizer import shapes_tokenizer  # pylint: disable=import-outside-toplevel
      describe = self.config.data.source == "shapes_describe"
      return Prompter.shapes(describe_tokenizer() if describe else shapes_tokenizer(),
                             m.question)
    path = m.tokenizer_path or m.init_from or (m.llm_path if m.init == "pretrained" else "")
    if not path:
      return None
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
      raise MissingCheckpoint({"--config.model.tokenizer_path": path},
                              "the chat template needs a tokenizer.json there")
    import tokenizers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    make = Prompter.llada if m.prompt == "llada" else Prompter.dream
    return make(tok, m.question)

  def _need_prompter(self, what: str):
    if self.prompter is None:
      raise ConfigError(f"LaViDa {what} needs a tokenizer: set --config.model.tokenizer_path "
                        f"(a directory with tokenizer.json) or a pretrained model.llm_path")

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    """One record (``image``, answer in ``caption`` / ``answer``, optional ``question``) ->
    fixed-shape arrays (``data.make_example``)."""
    self._need_prompter("preprocess")
    m = self.config.model
    image = image_ops.decode_image(record["image"])
    answer = record.get("answer", record.get("caption"))
    if not isinstance(answer, str) or not answer.strip():
      raise BadRecord(f"record has no answer / caption (got {answer!r})")
    return make_example(self.prompter, self.geometry, image, answer, rng,
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
    m = self.config.model
    if m.init == "pretrained" and m.init_from:     # every group from one LaViDa checkpoint
      params = load_into(params, "hf", m.init_from, scan_layers=self.config.scan_layers)
    elif m.init == "pretrained":
      params["language_model"] = load_into(params["language_model"], "hf", m.llm_path)
      params["vision_tower"] = load_into(params["vision_tower"], "hf", m.vision_path,
                                         num_layers=self.model_cfg.vision.stack.num_layers)
    return {**variables, "params": params}

  def init_params(self, rng):
    """Unboxed params of a fresh init (the trainer's seed gives step 0)."""
    return nn.unbox(jax.jit(self.init)(rng, self.dummy_batch(1))["params"])

  def trainable_mask(self, params):
    """Stage 1 trains the projector only; stages 2 and 3 train everything."""
    stage1 = self.config.model.stage == 1
    return {k: jax.tree.map(lambda _, k=k: k == "projector" or not stage1, v)
            for k, v in params.items()}

  def diffusion_lm(self, params) -> DiffusionLM:
    """The language model as the sampler's denoiser (Prefix-DLM mask when configured)."""
    return DiffusionLM(self.lm_module, params["language_model"],
                       prefix_dlm=self.config.model.prefix_dlm)

  # -- training: the method -----------------------------------------------------------------
  def forward_masks(self, batch, rng):
    """The forward process of one batch: ``(mask [nB, T], t [nB])`` -- the masked positions
    of each row (answer only, never [FIM]) and its time; with complementary masking rows
    ``B..2B`` mask exactly the answer positions rows ``0..B`` keep (time ``1 - t``)."""
    k_t, k_mask = jax.random.split(rng)
    answer, never = batch["answer_mask"], batch["fim_mask"]
    t = forward.sample_t(k_t, answer.shape[0], self.config.model.t_sampler)
    fwd = forward.forward_mask(k_mask, answer, t, never_mask=never)
    if not self.config.model.complementary:
      return fwd, t
    return (jnp.concatenate([fwd, forward.complementary_mask(fwd, answer, never)]),
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
    """Masked-diffusion loss of the answers given image and prompt (module docstring):
    EOS padding to the batch's longest, the image embedded once, forward masks (and their
    complements) applied at the embedding level, one Prefix-DLM pass over the 2B rows,
    cross-entropy on the masked answer tokens."""
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
    x = forward.apply_mask_embeddings(twice(embeds), mask, mask_embedding)
    h = lm.hidden(x, twice(batch["slot_mask"]), p)                 # Prefix-DLM attention
    logits = lm.block_logits(h, p, a)                                           # [nB, A, V]
    targets, mask = twice(batch["tokens"])[:, p:], mask[:, p:]
    if m.loss == "lavida":
      loss = forward.lavida_loss(logits, targets, mask)
    else:   # the complementary row is masked with probability about 1 - p: weight by that
      loss = forward.llada_loss(logits, targets, mask, forward.mask_probability(t),
                                "answer_length", answer_mask=twice(answer)[:, p:])
    weights = mask.astype(jnp.float32)
    hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"masked_accuracy": jnp.sum(hits * weights) / jnp.maximum(weights.sum(), 1.0),
                  "masked_tokens": weights.sum() / n}

  def flops_per_step(self, batch_size):
    """``mmjax.train.flops``: the LM over the 2B complementary rows (prompt + answer) and the
    output head on the answer positions; the vision tower on every view's patches and the
    projector before pooling. Stage 1: the LM is frozen with gradients flowing through it
    (``THROUGH``), the tower frozen behind a stop-gradient (``FORWARD``); else all train.
    The patch convolution needs no input gradient (one pass less)."""
    m, geo, c = self.config.model, self.geometry, self.model_cfg
    stage1 = m.stage == 1
    views, nv = batch_size * geo.max_views, geo.feature_grid ** 2
    rows, t = batch_size * (2 if m.complementary else 1), self.prompt_len + self.answer_len
    d, dv = c.text.stack.d_model, c.vision.stack.d_model
    vision = fl.stack_macs(c.vision.stack, views * nv, nv)
    patch = fl.dense_macs(views * nv, c.vision.patch_size ** 2 * 3, dv)
    projector = fl.dense_macs(views * nv, dv, d) + fl.dense_macs(views * nv, d, d)
    lm = (fl.stack_macs(c.text.stack, rows * t, t)
          + fl.dense_macs(rows * self.answer_len, d, c.text.vocab_size))
    if stage1:
      return (fl.flops(vision + patch, fl.FORWARD) + fl.flops(projector, fl.TRAINED)
              + fl.flops(lm, fl.THROUGH))
    return (fl.flops(vision + projector + lm, fl.TRAINED)
            + fl.flops(patch, fl.THROUGH))

  # -- sampling -----------------------------------------------------------------------------
  @functools.lru_cache(maxsize=64)
  def sampler(self, opts: tuple):
    """The jitted sampler for one set of options (``tuple(sorted(options.items()))``):
    ``run(params, tokens [b, P], slot_mask [b, P], images, image_index, rng, draft, real)``
    -> ``(answers [b, answer_len], nfe)``."""
    kw = dict(opts)

    gen_length = kw.pop("gen_length", None) or self.answer_len

    @jax.jit
    def run(params, tokens, slot_mask, images, image_index, rng, draft, real):
      pe = self.model.apply({"params": params}, tokens, images, image_index,
                            method=LavidaModel.embed)
      return diffusion_generate(
          self.diffusion_lm(params), prompt_embeds=pe, prompt_mask=slot_mask,
          gen_length=gen_length, mask_id=self.mask_id, eos_id=self.prompter.eos_id,
          rng=rng, return_nfe=True, draft_ids=draft, draft_mask=real, **kw)
    return run

  def generate(self, params, prompts: dict, rng=None, draft_ids=None, draft_mask=None,
               **options):
    """Answers ``[b, answer_len]`` and the number of model calls for a batch of prompts
    (``tokens`` / ``slot_mask`` cut to the prompt, ``images``, ``image_index``: what
    ``preprocess`` gives). ``options``: the sampler's ``generate`` options (steps,
    block_length, schedule, cache, threshold, infill_steps, gen_length -- default
    ``answer_len`` --, ...). One compiled program per distinct options.

    ``draft_ids [b, D <= answer_len]`` (``draft_mask``: False on padding): infill -- the
    answer starts from the draft, its ``mask_id`` positions are filled and every other token
    is kept (``mmjax.diffusion.masked.drafts``; `infill` builds drafts from text). Checked
    here, before anything compiles."""
    self._need_prompter("generate")
    b = np.shape(prompts["tokens"])[0]
    draft = real = None
    if draft_ids is not None:
      draft, real = check_draft(draft_ids, draft_mask, b, self.answer_len, self.mask_id,
                                self.model_cfg.text.vocab_size)
    elif draft_mask is not None:
      raise ValueError("draft_mask needs draft_ids")
    run = self.sampler(tuple(sorted(options.items())))
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
    self._need_prompter("infill")
    if len(drafts) != np.shape(prompts["tokens"])[0]:
      raise ValueError(f"{len(drafts)} drafts for {np.shape(prompts['tokens'])[0]} prompts")
    fim = self.config.model.stage == 3
    rows = [self.prompter.draft(d, fim=fim, complete=complete) for d in drafts]
    too_long = [i for i, r in enumerate(rows) if len(r) > self.answer_len]
    if too_long:
      raise ValueError(f"drafts {too_long} are longer than model.answer_len="
                       f"{self.answer_len} tokens")
    draft_ids, draft_mask = pad_drafts(rows, pad_id=self.prompter.eos_id)
    ids, _ = self.generate(params, prompts, rng, draft_ids=draft_ids, draft_mask=draft_mask,
                           **options)
    ids = self.strip_fim(ids)
    return [self.decode(r) for r in ids], ids

  def strip_fim(self, ids) -> np.ndarray:
    """``ids`` without [S] / [FIM] (FIM filler and markers are not part of the text)."""
    p = self.prompter
    return np.asarray(strip_tokens(ids, (p.s_id, p.fim_id), p.eos_id))

  def sample_options(self, **changes) -> dict:
    """``config.sample`` as ``generate`` options (``changes`` override; ``threshold <= 0``
    means none)."""
    s = dict(self.config.sample.to_dict(), **changes)
    del s["num_images"]
    if s["threshold"] is not None and s["threshold"] <= 0:
      s["threshold"] = None
    return s

  def decode(self, ids) -> str:
    """Answer text up to the first EOS (markers kept, so junk never parses as a caption;
    ids past the tokenizer's vocabulary -- the demo pads it -- are dropped)."""
    ids = [int(i) for i in ids]
    eos = self.prompter.eos_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    return self.prompter.tokenizer.decode([i for i in ids if i < self.prompter.vocab_size],
                                          skip_special_tokens=False)

  def modes(self):
    """``--mode sample | eval | export`` (``eval.py``; long answers: ``eval_long.py``; a caption
    set, ``data.source`` array_record / tfds: CIDEr-D, ``eval_captions.py``; ``checkpoint.py``)."""
    source = self.config.data.source
    if source in eval_captions.SOURCES:
      evaluate = eval_captions.caption_set_eval
    else:
      evaluate = (eval_long if source == "shapes_describe" else lavida_eval).eval_mode
    return {"sample": functools.partial(lavida_eval.sample_mode, self),
            "eval": functools.partial(evaluate, self),
            "export": functools.partial(checkpoint.export, self)}



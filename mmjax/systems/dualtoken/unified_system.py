"""DualToken's unified model (arXiv 2503.14324, "generation and understanding") as an mmjax
system: one Qwen2.5 language model reads and writes text and both visual vocabularies.

The method, in the order the loss computes it (``unified_loss``):

1. The frozen tokenizer turns each image into ``N`` positions of ``D`` pixel and ``D``
   semantic codes (on the fly, or read from pre-tokenised shards written by
   ``python -m mmjax.systems.dualtoken.pretokenize``).
2. Examples are text-to-image (``caption <boi> image <eoi>``) or image-to-text (``<boi> image
   <eoi> caption``), mixed by ``mix.t2i_ratio``; a text-to-image caption is dropped (blank)
   with probability ``mix.caption_dropout`` so that the model also learns the unconditional
   image distribution classifier-free guidance needs.
3. A visual position's input is ``Linear(concat(sum_d E_pix[c_d], sum_d E_sem[c_d]))``; the
   LM runs over the interleaved sequence.
4. The LM state at position ``t`` predicts visual position ``t + 1`` through the two depth
   heads (teacher-forced over the ``D`` depths) and the next text token through the LM head.
5. The loss is ``loss.text x CE(text) + loss.pixel x mean_d CE(pixel depth d) +
   loss.semantic x mean_d CE(semantic depth d)``; every depth's CE is logged.

Sampling (``sampling.py``): CFG text-to-image and image captioning, each one XLA program.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.models import qwen2
from mmjax.systems.base import System
from mmjax.systems.dualtoken.pretokenize import read_codes
from mmjax.systems.dualtoken.prompt import Prompter
from mmjax.systems.dualtoken.system import DualToken
from mmjax.systems.dualtoken.unified import (VOCABS, UnifiedConfig, UnifiedModel,
                                             head_config)
from mmjax.train.objectives import Objective

LM_INITS = ("pretrained", "random")


def _read_json(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def cross_entropy(logits, targets):
  """Per-entry CE of fp32 ``logits [..., K]`` against int ``targets [...]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


class UnifiedDualToken(System):
  """The unified model's trainer view (see the module docstring and
  ``configs/dualtoken.py:unified`` / ``:demo_unified``)."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if m.lm_init not in LM_INITS:
      raise ConfigError(f"model.lm_init = {m.lm_init!r}; expected one of {LM_INITS}")
    if config.data.resolution != config.tokenizer.data.resolution:
      raise ConfigError(f"data.resolution = {config.data.resolution} but the tokenizer reads "
                        f"{config.tokenizer.data.resolution} px images")
    self._check_checkpoints()
    self.tok_system = DualToken(config.tokenizer)
    tok = self.tok_system.cfg
    grid = tok.vision.image_size // tok.vision.patch_size
    self.prompter = self._make_prompter(grid * grid)
    dtype = jnp.dtype(config.dtype)
    lm_hf = _read_json(m.lm_path) if m.lm_init == "pretrained" else dict(m.lm_config)
    if not lm_hf.get("vocab_size"):
      lm_hf["vocab_size"] = self.prompter.vocab_size
    lm = qwen2.from_hf_config(lm_hf, dtype=dtype, scan_layers=config.scan_layers,
                              remat_policy=config.remat_policy)
    if self.prompter.vocab_size > lm.vocab_size:
      raise ConfigError(f"the tokenizer has {self.prompter.vocab_size} ids, the language "
                        f"model {lm.vocab_size}")
    h = m.head
    heads = {v: head_config(h.width, h.layers, h.heads, h.mlp_dim, tok.pixel.depths,
                            q.codebook_size, dtype=dtype, scan_layers=config.scan_layers,
                            remat_policy=config.remat_policy)
             for v, q in zip(VOCABS, (tok.pixel, tok.semantic))}
    self.cfg = UnifiedConfig(lm=lm, tokenizer=tok, pixel_head=heads["pixel"],
                             semantic_head=heads["semantic"], code_embed_dim=m.code_embed_dim,
                             positions=grid * grid)
    self.model = UnifiedModel(self.cfg)
    self.resolution = config.data.resolution
    self._tokenizer_vars = None        # a tokenizer run's variables, read by ``prepare``

  # -- checkpoints ------------------------------------------------------------------------
  def _check_checkpoints(self):
    m, missing = self.config.model, {}
    if m.lm_init == "pretrained" and not os.path.exists(os.path.join(m.lm_path, "config.json")):
      missing["model.lm_path"] = m.lm_path
    if m.tokenizer_workdir and not m.train_tokenizer and not os.path.isdir(m.tokenizer_workdir):
      missing["model.tokenizer_workdir"] = m.tokenizer_workdir
    if (m.lm_init == "pretrained" and not m.tokenizer_workdir and not m.train_tokenizer
        and self.config.tokenizer.model.init == "random"):   # a real run needs a tokenizer
      missing["model.tokenizer_workdir"] = "(an mmjax tokenizer run, or tokenizer.model.init=release)"
    if missing:
      raise MissingCheckpoint(missing, "use configs/dualtoken.py:demo_unified for a "
                              "self-contained CPU run, or --config.model.lm_init=random")

  def _make_prompter(self, positions: int) -> Prompter:
    t, m = self.config.text, self.config.model
    if t.tokenizer == "shapes":
      from mmjax.data.tokenizer import shapes_tokenizer  # pylint: disable=import-outside-toplevel
      tok = shapes_tokenizer().tokenizer
    else:
      import tokenizers  # pylint: disable=import-outside-toplevel
      path = t.tokenizer or m.lm_path
      file = os.path.join(path, "tokenizer.json")
      if not os.path.exists(file):
        raise MissingCheckpoint({"text.tokenizer": file}, "a directory with tokenizer.json "
                                "(default: model.lm_path), or text.tokenizer=shapes")
      tok = tokenizers.Tokenizer.from_file(file)
    text_len = m.seq_len - positions - 4 - len(tok.encode(m.question, add_special_tokens=False)
                                                .ids if m.question else [])
    if text_len < 1:
      raise ConfigError(f"model.seq_len = {m.seq_len} leaves no room for text next to "
                        f"{positions} visual positions")
    return Prompter.from_tokenizer(tok, bos=t.bos, eos=t.eos, pad=t.pad, boi=t.boi, eoi=t.eoi,
                                   positions=positions, text_len=text_len, question=m.question)

  def tokenizer_dir(self, workdir: str) -> str:
    m = self.config.model
    return m.tokenizer_workdir or (os.path.join(workdir, "tokenizer") if m.train_tokenizer
                                   else "")

  def prepare(self, workdir: str) -> None:
    """Before training: train the tokenizer first when asked (``model.train_tokenizer``;
    resumes / skips a finished run in WORKDIR/tokenizer), then read the tokenizer run's
    variables for ``init``."""
    path = self.tokenizer_dir(workdir)
    if not path:
      return
    if self.config.model.train_tokenizer:
      from mmjax.train import loop  # pylint: disable=import-outside-toplevel
      loop.train(self.config.tokenizer, path, system=self.tok_system)
    self.prepare_tokenizer(path)

  def prepare_tokenizer(self, path: str) -> None:
    """Reads the newest checkpoint of the tokenizer run at ``path`` (frozen from here on)."""
    from mmjax.parallel import global_to_host  # pylint: disable=import-outside-toplevel
    from mmjax.train import loop  # pylint: disable=import-outside-toplevel
    variables, step = loop.restore_params(self.config.tokenizer, path, self.tok_system)
    self._tokenizer_vars = global_to_host({"params": variables["params"]["tokenizer"],
                                           "codebook": variables["codebook"]})
    print(f"tokenizer: step {step} of {path} (frozen)", flush=True)

  def tokenizer_variables(self) -> dict:
    """The variables ``tokenize`` / ``decode`` need, from ``prepare_tokenizer``."""
    v = self._tokenizer_vars
    return {"params": {"tokenizer": v["params"]}, "codebook": v["codebook"]}

  # -- data -------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    mix, caption = self.config.mix, str(record["caption"])
    if rng.uniform() < mix.t2i_ratio:
      ex = self.prompter.t2i("" if rng.uniform() < mix.caption_dropout else caption)
    else:
      ex = self.prompter.i2t(caption)
    if self.config.data.pretokenized:   # shards written by dualtoken.pretokenize
      ex["pixel_codes"], ex["semantic_codes"] = read_codes(record, self.cfg.positions,
                                                           self.cfg.depths)
    else:
      ex["images"] = self.tok_system.preprocess(record, rng)["images"]
    return ex

  def dummy_batch(self, batch_size):
    ex = self.prompter.t2i("")
    out = {k: np.zeros((batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in ex.items()}
    n, d, r = self.cfg.positions, self.cfg.depths, self.resolution
    if self.config.data.pretokenized:
      out.update(pixel_codes=np.zeros((batch_size, n, d), np.int32),
                 semantic_codes=np.zeros((batch_size, n, d), np.int32))
    else:
      out["images"] = np.zeros((batch_size, r, r, 3), np.float32)
    return out

  # -- parameters -------------------------------------------------------------------------
  def init(self, rng, batch):
    n, d, r = self.cfg.positions, self.cfg.depths, self.resolution
    codes = jnp.zeros((1, n, d), jnp.int32)
    v = self.model.init(rng, batch["ids"][:1], batch["mask"][:1], batch["start"][:1], codes,
                        codes, jnp.zeros((1, r, r, 3)), method=UnifiedModel.init_all)
    params = dict(v["params"])
    m = self.config.model
    if m.lm_init == "pretrained":
      from mmjax.interop.subtree import load_into  # pylint: disable=import-outside-toplevel
      params["lm"] = load_into(params["lm"], "hf", m.lm_path)
    if self._tokenizer_vars is not None:        # a tokenizer run (see ``prepare``)
      tok, book = self._tokenizer_vars["params"], self._tokenizer_vars["codebook"]
    elif self.config.tokenizer.model.init != "random":   # the authors' release (or SigLIP)
      tv = self.tok_system.init(jax.random.fold_in(rng, 7), self.tok_system.dummy_batch(1))
      tok, book = tv["params"]["tokenizer"], tv["codebook"]
    else:                                       # random (AOT, smoke tests): as drawn above
      return {**v, "params": params}
    params["tokenizer"] = _replace(params["tokenizer"], tok)
    return {**v, "params": params, "codebook": _replace(v["codebook"], book)}

  def init_variables(self, rng, tokenizer=None):
    """Unboxed variables of a fresh init; ``tokenizer`` (a variables dict of this system)
    supplies the tokenizer and its codebooks (eval's step 0 keeps the trained tokenizer)."""
    v = nn.unbox(jax.jit(self.init)(rng, self.dummy_batch(1)))
    if tokenizer is not None:
      v["params"]["tokenizer"] = tokenizer["params"]["tokenizer"]
      v["codebook"] = tokenizer["codebook"]
    return v

  def trainable_mask(self, params):
    """The tokenizer is frozen (no optimizer state); everything else trains."""
    return {k: jax.tree.map(lambda _, k=k: k != "tokenizer", v) for k, v in params.items()}

  def objectives(self):
    return [Objective("main", self.unified_loss)]

  # -- the method -------------------------------------------------------------------------
  def codes(self, variables, batch):
    """The batch's codes: read (pre-tokenised) or from the frozen tokenizer."""
    if "pixel_codes" in batch:
      return batch["pixel_codes"], batch["semantic_codes"]
    return self.model.apply(variables, batch["images"], method=UnifiedModel.tokenize)

  def unified_loss(self, params, batch, rng, ctx):
    del rng
    w = self.config.loss
    variables = {"params": params, **ctx.mutables}
    pix, sem = self.codes(variables, batch)
    text_logits, pix_logits, sem_logits = self.model.apply(
        variables, batch["ids"], batch["mask"], batch["start"], pix, sem)
    tw = batch["weights"]
    text = jnp.sum(cross_entropy(text_logits, batch["targets"]) * tw) / jnp.maximum(
        jnp.sum(tw), 1.0)
    iw = batch["image_weight"][:, None, None]
    denom = jnp.maximum(jnp.sum(batch["image_weight"]) * self.cfg.positions, 1.0)
    metrics, visual = {"text_ce": text}, {}
    for vocab, logits, codes in (("pixel", pix_logits, pix), ("semantic", sem_logits, sem)):
      per_depth = jnp.sum(cross_entropy(logits, codes) * iw, axis=(0, 1)) / denom   # [D]
      visual[vocab] = jnp.mean(per_depth)
      metrics[f"{vocab}_ce"] = visual[vocab]
      metrics.update({f"{vocab}_ce_{i}": per_depth[i] for i in range(self.cfg.depths)})
    loss = w.text * text + w.pixel * visual["pixel"] + w.semantic * visual["semantic"]
    return loss, metrics

  def flops_per_step(self, batch_size):
    from mmjax.systems.dualtoken import flops  # pylint: disable=import-outside-toplevel
    return flops.unified_train_flops(self, batch_size)

  # -- sampling ---------------------------------------------------------------------------
  def keys(self, seed: int, indices) -> jax.Array:
    """One key per image: ``fold_in(key(seed), index)``."""
    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))

  def generate(self, variables, captions, keys, **overrides):
    """Images for ``captions`` (CFG with the blank prompt unless ``cfg_scale`` is 0):
    ``{'images' [b, R, R, 3] in [-1, 1], 'pixel', 'semantic' [b, N, D]}``."""
    from mmjax.systems.dualtoken import sampling  # pylint: disable=import-outside-toplevel
    s = {**self.config.sample.to_dict(), **overrides}
    p = self.prompter
    length = len(p.head) + p.text_len + 1
    ids, mask = p.left_pad([p.generation_prompt(c) for c in captions], length)
    un_ids = un_mask = None
    if s["cfg_scale"]:
      un_ids, un_mask = p.left_pad([p.generation_prompt("")] * len(captions), length)
    return sampling.generate_images(
        self.model, variables, ids, mask, un_ids, un_mask, keys, cfg_scale=float(s["cfg_scale"]),
        temperature=float(s["temperature"]), top_k=int(s["top_k"]), top_p=float(s["top_p"]))

  def describe(self, variables, pixel_codes, semantic_codes, keys=None, **overrides):
    """Captions (strings) of images given as codes ``[b, N, D]``; greedy by default."""
    from mmjax.systems.dualtoken import sampling  # pylint: disable=import-outside-toplevel
    s = {**self.config.sample.to_dict(), **overrides}
    b = pixel_codes.shape[0]
    seq, start = self.prompter.understanding_prompt()
    ids, mask = self.prompter.left_pad([seq] * b)
    keys = self.keys(0, np.arange(b)) if keys is None else keys
    out = sampling.understand(
        self.model, variables, ids, mask, jnp.full((b,), start, jnp.int32), pixel_codes,
        semantic_codes, keys, max_new_tokens=int(s["max_new_tokens"]),
        eos_id=self.prompter.eos_id, pad_id=self.prompter.pad_id,
        temperature=float(s["caption_temperature"]), top_k=int(s["top_k"]),
        top_p=float(s["top_p"]))
    return [self.prompter.decode(row) for row in np.asarray(out)]

  @functools.cached_property
  def _tokenize(self):
    return jax.jit(functools.partial(self.model.apply, method=UnifiedModel.tokenize))

  def tokenize(self, variables, images):
    return self._tokenize(variables, jnp.asarray(images, jnp.float32))

  def modes(self):
    from mmjax.systems.dualtoken import unified_eval  # pylint: disable=import-outside-toplevel
    return {"sample": functools.partial(unified_eval.sample_mode, self),
            "eval": functools.partial(unified_eval.eval_mode, self),
            "export": functools.partial(unified_eval.export_mode, self)}


def _replace(boxed, values):
  """``boxed`` (init params, maybe logical-partitioning boxes) with leaves from ``values``
  (arrays or host numpy; numpy goes in through a host callback, not as a constant)."""
  def one(box, value):
    target = box.unbox() if isinstance(box, nn.Partitioned) else box
    if isinstance(value, np.ndarray):
      spec = jax.ShapeDtypeStruct(target.shape, target.dtype)
      if value.shape != target.shape:
        raise ConfigError(f"tokenizer run has a leaf of shape {value.shape}, this config "
                          f"{target.shape}: the tokenizer config does not match the run")
      value = jax.pure_callback(lambda v=value: v.astype(spec.dtype), spec)
    value = jnp.asarray(value, target.dtype)
    return box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value
  return jax.tree.map(one, boxed, nn.unbox(values),
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))

"""The smallest end-to-end system: a prefix-LM image captioner on the shapes world.

It exists to exercise every piece of the foundation (config -> mesh -> Grain data -> sharded
train step -> Orbax checkpoints -> sampling) with one transformer from ``mmjax.core``:
image patches are a bidirectional prefix, the caption is decoded causally after them.

Example (CPU, a couple of minutes)::

    python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap
    python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap --mode sample
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import core
from mmjax.data import image as image_ops, tokenizer as tok_lib
from mmjax.data import BadRecord
from mmjax.systems.base import System
from mmjax.train import flops as fl


def patchify(images, patch: int):
  """[batch, H, W, C] -> [batch, (H/p)*(W/p), p*p*C]."""
  b, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class CaptionerModel(nn.Module):
  """Patch embedding + one transformer stack (prefix-LM mask) + tied output head."""
  cfg: core.TransformerConfig
  vocab_size: int
  patch_size: int
  num_patches: int

  def setup(self):
    cfg = self.cfg
    self.patch_embed = core.mlp.dense(cfg.d_model, ("patch", "embed"), use_bias=True,
                                      dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      init_std=cfg.init_std, name="patch_embed")
    self.patch_pos = self.param(
        "patch_pos", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  (None, "embed")),
        (self.num_patches, cfg.d_model), cfg.param_dtype)
    self.embed = core.Embed(self.vocab_size, cfg.d_model, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, init_std=cfg.init_std, name="embed")
    self.stack = core.TransformerStack(cfg, name="stack")
    self.final_norm = core.RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, name="final_norm")

  def __call__(self, images, tokens, token_mask):
    """images [b, H, W, 3] float; tokens/token_mask [b, T] -> logits [b, T, vocab]."""
    cfg = self.cfg
    patches = patchify(images.astype(cfg.dtype), self.patch_size)       # [b, P, p*p*3]
    img = self.patch_embed(patches) + self.patch_pos.astype(cfg.dtype)  # [b, P, d]
    txt = self.embed(tokens)                                            # [b, T, d]
    x = jnp.concatenate([img, txt], axis=1)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    b, s = x.shape[:2]
    n = img.shape[1]
    padding = jnp.concatenate([jnp.ones((b, n), bool), token_mask.astype(bool)], axis=1)
    mask = core.make_attention_mask("prefix", s, prefix_len=jnp.full((b,), n, jnp.int32),
                                    padding_mask=padding)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = self.stack(x, mask=mask, positions=positions)
    x = self.final_norm(x[:, n:])
    logits = self.embed.attend(x)                                       # [b, T, vocab]
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      ("act_batch", "act_length", "act_vocab"))


class Captioner(System):
  """Trains ``CaptionerModel`` with next-token cross-entropy on the caption tokens."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.tokenizer = tok_lib.shapes_tokenizer()
    self.resolution = config.data.resolution
    self.max_len = m.max_caption_len
    self.tcfg = core.TransformerConfig(
        num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, mlp_dim=m.mlp_dim, rope_theta=m.rope_theta,
        dtype=jnp.dtype(config.dtype), scan_layers=config.scan_layers,
        remat_policy=config.remat_policy)
    self.num_patches = (self.resolution // m.patch_size) ** 2
    # the embedding is padded to a multiple of 64 rows so 'vocab' shards over any tensor axis
    self.vocab_size = -(-self.tokenizer.vocab_size // 64) * 64
    self.model = CaptionerModel(self.tcfg, self.vocab_size, m.patch_size, self.num_patches)

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    image = image_ops.decode_image(record["image"])
    if image.shape[:2] != (self.resolution, self.resolution):
      image = image_ops.resize_crop(image, self.resolution)
    caption = record.get("caption")
    if not isinstance(caption, str) or not caption.strip():
      raise BadRecord(f"record has no caption (got {caption!r})")
    ids, mask = self.tokenizer.encode(caption, self.max_len)
    image = image_ops.to_float(image)
    return {"images": image, "tokens": ids, "token_mask": mask}

  def dummy_batch(self, batch_size):
    r = self.resolution
    return {"images": np.zeros((batch_size, r, r, 3), np.float32),
            "tokens": np.zeros((batch_size, self.max_len), np.int32),
            "token_mask": np.ones((batch_size, self.max_len), bool)}

  # -- model --------------------------------------------------------------------------------
  def init(self, rng, batch):
    return self.model.init(rng, batch["images"], batch["tokens"], batch["token_mask"])

  def loss(self, params, batch, rng):
    logits = self.model.apply({"params": params}, batch["images"], batch["tokens"],
                              batch["token_mask"])
    targets = batch["tokens"][:, 1:]
    weights = batch["token_mask"][:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / denom
    acc = ((logits[:, :-1].argmax(-1) == targets) * weights).sum() / denom
    return loss, {"token_accuracy": acc}

  def flops_per_step(self, batch_size):
    """``mmjax.train.flops``: the stack and the tied output head train (3 passes); the
    patch embedding needs no gradient for its input (2: forward + weights)."""
    c, b = self.tcfg, batch_size
    s = self.num_patches + self.max_len
    patch = fl.dense_macs(b * self.num_patches, self.config.model.patch_size ** 2 * 3,
                          c.d_model)
    head = fl.dense_macs(b * self.max_len, c.d_model, self.vocab_size)
    return (fl.flops(fl.stack_macs(c, b * s, s) + head, fl.TRAINED)
            + fl.flops(patch, fl.THROUGH))

  # -- sampling -----------------------------------------------------------------------------
  def generate(self, params, images):
    """Greedy captions [b, max_len] as one XLA program (``lax.fori_loop``, static shapes)."""
    b = images.shape[0]
    tokens = jnp.zeros((b, self.max_len), jnp.int32).at[:, 0].set(self.tokenizer.bos_id)
    done = jnp.zeros((b,), bool)

    def body(i, carry):
      tokens, done = carry
      mask = jnp.arange(self.max_len)[None, :] <= i
      logits = self.model.apply({"params": params}, images, tokens, jnp.broadcast_to(mask, tokens.shape))
      real = logits[:, i, :self.tokenizer.vocab_size]  # never the padding rows
      nxt = jnp.where(done, self.tokenizer.pad_id, real.argmax(-1).astype(jnp.int32))
      tokens = tokens.at[:, i + 1].set(nxt)
      return tokens, done | (nxt == self.tokenizer.eos_id)

    tokens, _ = jax.lax.fori_loop(0, self.max_len - 1, body, (tokens, done))
    return tokens

  def modes(self):
    return {"sample": self.sample_mode, "eval": self.eval_mode}

  def _held_out(self, num):
    from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
    src = shapes.ShapesSource(seed=self.config.seed + 10_000, resolution=self.resolution)
    recs = [src[i] for i in range(num)]
    images = np.stack([self.preprocess(r, None)["images"] for r in recs])
    return recs, images

  def _captions(self, params, images, batch=64):
    gen = jax.jit(self.generate)
    ids = np.concatenate([np.asarray(gen(params, jnp.asarray(images[i:i + batch])))
                          for i in range(0, len(images), batch)])
    return [self.tokenizer.decode(row) for row in ids]

  def sample_mode(self, params, workdir, num=16):
    """Captions held-out scenes: WORKDIR/samples/captions.json and a captions.png grid."""
    from mmjax.eval.captions import score_captions  # pylint: disable=import-outside-toplevel
    from mmjax.eval.pictures import caption_grid  # pylint: disable=import-outside-toplevel
    recs, images = self._held_out(num)
    captions = self._captions(params, images)
    scores = score_captions(captions, [r["caption"] for r in recs])
    out = [{"reference": r["caption"], "generated": c} for r, c in zip(recs, captions)]
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    with open(os.path.join(workdir, "samples", "captions.json"), "w") as f:
      json.dump({**scores, "captions": out}, f, indent=1)
    caption_grid([r["image"] for r in recs], captions, [r["caption"] for r in recs]).save(
        os.path.join(workdir, "samples", "captions.png"))
    print(f"samples: {workdir}/samples/captions.png (attribute accuracy "
          f"{scores['attribute_accuracy']:.3f}, exact {scores['exact']:.3f})")
    return scores

  def eval_mode(self, params, workdir, num=256):
    """Attribute-level caption accuracy of the trained model and of the same model at step 0
    (fresh init from the config's seed): WORKDIR/eval/captioner_eval.json."""
    from mmjax.eval.captions import score_captions  # pylint: disable=import-outside-toplevel
    recs, images = self._held_out(num)
    refs, cats = [r["caption"] for r in recs], [r["category"] for r in recs]
    init = jax.jit(self.init)(jax.random.PRNGKey(self.config.seed), self.dummy_batch(1))
    result = {"num_scenes": num,
              "step0": score_captions(self._captions(nn.unbox(init["params"]), images), refs, cats),
              "trained": score_captions(self._captions(params, images), refs, cats)}
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "captioner_eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    print(f"{'':10s} {'attr acc':>9s} {'exact':>7s}")
    for k in ("step0", "trained"):
      print(f"{k:10s} {result[k]['attribute_accuracy']:9.3f} {result[k]['exact']:7.3f}")
    return result

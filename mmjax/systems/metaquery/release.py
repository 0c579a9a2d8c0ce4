"""MetaQuery's checkpoint directory as the authors' trainer writes it, read and written as
interop data: ``mmjax.interop.load(DIR)``, ``configs/metaquery.py --config.model.init_from=DIR``
(`mmjax.systems.metaquery.system`), ``--mode export`` (`export_release`).

The layout, as learnt from the authors' public trainer code (facebookresearch/metaquery:
``models/metaquery.py``, ``models/model.py``, ``models/transformer_encoder.py``, ``train.py``;
the HF Trainer's ``save_pretrained`` of their top-level model):

* ``config.json``: ``model_type: metaquery``, the parts named by their base models --
  ``mllm_id`` (a LLaVA-OneVision or Qwen2.5-VL checkpoint), ``diffusion_model_id`` (Sana: its
  ``transformer/`` subfolder; SD1.5: ``unet/``), ``vae_id`` (Sana: ``vae/``; else the root,
  then ``vae/``) -- and ``num_metaqueries``, ``connector_num_hidden_layers``, ``input_size``
  (the latent side), ``in_channels``, ``vae_downsample_f``, ``max_input_text_tokens``,
  ``system_prompt``, ``loss_type`` (flow | diff), ... The architectures are those base models'
  ``config.json`` files: `complete_config` reads them from a local directory or the
  Hugging Face cache; ``mllm_path`` / ``dit_path`` / ``ae_path`` (``interop.load`` keywords,
  the system's ``mllm.path`` / ``decoder.dit_path`` / ``decoder.ae_path``) point elsewhere.
  A model no base checkpoint describes (the CPU demo) carries them in its own config.json as
  ``mllm_config`` / ``transformer_config`` / ``vae_config`` (``pixel_patch`` for pixel
  latents, ``connector_head_dim`` / ``connector_rope_theta`` when not 64 / 1e4): an mmjax
  extension the authors' code does not read.
* ``model.mllm_backbone.*``: the MLLM in transformers-4.49 names (LLaVA-OneVision:
  ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``,
  ``language_model.model.*``, ``image_newline``; Qwen2.5-VL (MetaQuery-L / -XL; their code
  picks it when ``mllm_id`` contains "Qwen2.5-VL"): ``visual.*`` (the tower and merger),
  ``model.*`` (the LM); a text-only Qwen2, our extension: ``model.*``) and no ``lm_head`` (it is an identity there: the "logits" are the final hidden
  states after the final norm). ``embed_tokens`` has V + N + 2 rows, V the base config's
  ``vocab_size``: row V is ``<begin_of_img>``, V+1 ``<end_of_img>``, V+2+i query i (their
  tokenizer is padded to V and then given these tokens in that order). Rows V.. are our
  ``markers`` and ``queries``; rows < V our MLLM's vocabulary, read from the release (their
  optimizer decays the whole matrix, so they differ from the base model's).
* ``model.connector.0.layers.{i}.*``: the Qwen2-style bidirectional encoder (q/k/v biases, no
  o bias, D/64 heads of 64, RoPE theta 1e4 over 0..N-1, then QK-norm
  ``self_attn.{q,k}_norm.gamma [heads, 1, 64]``; no final norm); ``model.connector.1`` and
  ``.3`` the Linear layers (GELU-tanh between), ``model.connector.4.weight`` the RMSNorm.
* ``model.transformer.*``: the DiT (diffusers names; Sana's stored in bf16, as their code
  loads it), ``vae.*``: the frozen autoencoder (diffusers names).

Example::

    from mmjax import interop
    model, params = interop.load("/ckpt/metaquery-b")        # needs the base configs locally
    cond = model.apply({"params": params}, ids, mask, method=model.condition)
    release.save_release(model.config, params, "/tmp/back")   # the same tensors, same dtypes

(``interop.save`` also writes the layout, but in one dtype and without BatchNorm counters;
`save_release` writes what their trainer stores: a Sana DiT in bf16, the rest in fp32, or
the dtypes the checkpoint it was read from had.)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.interop import diffusers_io, hf as hf_io
from mmjax.interop.dispatch import UnknownModelFormat, read_ref_config
from mmjax.interop.reader import (INDEX_FILE, SINGLE_FILE, CheckpointMismatchError,
                                  SafetensorsFile)
from mmjax.interop.tables import (FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Part, Rule)
from mmjax.models import autoencoder_kl, dc_ae, qwen2, sana_dit, siglip, unet2d
from mmjax.models import llava_onevision as lov
from mmjax.models import qwen2_5_vl as qvl
from mmjax.models.lm import LMConfig
from mmjax.systems.metaquery.bridge import ConnectorConfig, MetaQueryModel

MLLM, CONNECTOR, DIT, VAE = "model.mllm_backbone.", "model.connector.", "model.transformer.", "vae."
HEAD_DIM, ROPE_THETA = 64, 10000.0          # their connector: D/64 heads, Qwen2Config's theta
COMPLETED = "_mmjax_completed"              # what complete_config adds (never written back)
SHARD_BYTES = 5 * 10**9                     # save_pretrained's default shard size
CLASS_OF = {"sana_dit": "SanaTransformer2DModel", "unet2d": "UNet2DConditionModel",
            "dc_ae": "AutoencoderDC", "autoencoder_kl": "AutoencoderKL"}
PARTS = {"mllm": MLLM, "connector": CONNECTOR, "transformer": DIT, "vae": VAE}


# ----------------------------------------------------------------------------- transforms
@dataclasses.dataclass(frozen=True)
class Rows(Part):
  """Rows ``[start, stop)`` of a reference matrix of ``total`` rows (the vocabulary, the
  markers and the queries share ``embed_tokens``); export concatenates by ``index``."""
  start: int = 0
  stop: int = 0
  total: int = 0

  def hf_shape(self, shape):
    return (self.total,) + tuple(shape[1:])

  def to_ours(self, x, shape):
    return np.ascontiguousarray(x[self.start:self.stop]).reshape(shape)

  def to_hf(self, x):
    return x


@dataclasses.dataclass(frozen=True)
class HeadGain:
  """Our QK-norm gain ``[heads, head_dim]`` <-> the reference's gamma ``[heads, 1, head_dim]``."""

  def hf_shape(self, shape):
    return (shape[0], 1, shape[1])

  def to_ours(self, x, shape):
    return np.asarray(x).reshape(shape)

  def to_hf(self, x):
    return np.asarray(x)[:, None, :]


HEAD_GAIN = HeadGain()


# ----------------------------------------------------------------------------- the config
@dataclasses.dataclass(frozen=True)
class ReleaseConfig:
  """A MetaQuery checkpoint's architecture: MLLM, connector, DiT (or UNet), autoencoder."""
  mllm: Any                    # LMConfig (text Qwen2) | LlavaOnevisionConfig | Qwen25VLConfig
  connector: ConnectorConfig
  dit: Any                     # SanaConfig | UNetConfig
  ae: Any                      # DCAEConfig | AutoencoderKLConfig | None (pixel latents)
  num_queries: int
  suffix_ids: tuple            # ids after <end_of_img> (<|im_end|>: the text config's eos)
  latent_size: int             # config.json input_size
  pixel_patch: int = 1         # pixel latents: space-to-depth factor
  mllm_dir: str = ""           # the base MLLM directory (tokenizer, chat template), if local
  hf_extra: str = "{}"         # config.json as stored
  dtypes: str = "{}"           # {part: numpy dtype name} of the stored tensors
  family: str = "metaquery"

  @property
  def text(self) -> LMConfig:
    return self.mllm if isinstance(self.mllm, LMConfig) else self.mllm.text

  @property
  def autoencoder(self) -> str:
    if self.ae is None:
      return "pixels"
    return "kl" if isinstance(self.ae, autoencoder_kl.AutoencoderKLConfig) else "dc_ae"

  @property
  def resolution(self) -> int:
    f = self.pixel_patch if self.ae is None else self.ae.spatial_compression_ratio
    return self.latent_size * f


class ReleaseModel(MetaQueryModel):
  """``MetaQueryModel`` holding every MLLM weight, with its release config (``.config``)."""
  config: Any = None


def make_model(cfg: ReleaseConfig) -> ReleaseModel:
  return ReleaseModel(
      mllm_cfg=cfg.mllm, num_queries=cfg.num_queries, suffix_ids=tuple(cfg.suffix_ids),
      connector=cfg.connector, dit=cfg.dit, autoencoder=cfg.autoencoder, ae=cfg.ae,
      pixel_patch=cfg.pixel_patch, full_mllm=True, config=cfg)


def init_args(cfg: ReleaseConfig) -> tuple:
  r = cfg.resolution
  return (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), jnp.zeros((1, r, r, 3)))


# ----------------------------------------------------------------------------- reading
def _dir_with_config(*candidates) -> str:
  """The first candidate directory holding a config.json ('' if none)."""
  for d in candidates:
    if d and os.path.isfile(os.path.join(d, "config.json")):
      return d
  return ""


def _hub_dir(repo_id: str) -> str:
  """A hub id's snapshot in the local Hugging Face cache ('' if not there; never downloads)."""
  if not repo_id or os.path.isabs(repo_id) or repo_id.count("/") != 1:
    return ""
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    return snapshot_download(repo_id, local_files_only=True)
  except Exception:  # pylint: disable=broad-except  # not cached / no huggingface_hub
    return ""


def base_dirs(ref: dict) -> dict:
  """``{'mllm' | 'transformer' | 'vae': directory with config.json or ''}`` from the ids."""
  def roots(key):
    rid = ref.get(key) or ""
    return [rid if os.path.isdir(rid) else "", _hub_dir(rid)]
  mllm = _dir_with_config(*roots("mllm_id"))
  dit = _dir_with_config(*[os.path.join(r, s) for r in roots("diffusion_model_id") if r
                           for s in ("transformer", "unet")])
  vae = _dir_with_config(*[os.path.join(r, s) for r in roots("vae_id") if r
                           for s in ("", "vae")])
  return {"mllm": mllm, "transformer": dit, "vae": vae}


def stored_dtypes(path: str) -> dict:
  """``{part: numpy dtype name}`` of the tensors under each part's prefix."""
  index = os.path.join(path, INDEX_FILE)
  files = [SINGLE_FILE]
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for name in files:
    f = SafetensorsFile(os.path.join(path, name))
    for key in f.keys():
      part = next((p for p, pre in PARTS.items() if key.startswith(pre)), None)
      stored = _FLOATS.get(f.header[key]["dtype"])
      if part and stored and part not in out:
        out[part] = stored
  return out


_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def complete_config(ref: dict, path: str) -> dict:
  """The release's config.json plus what its tensors and base models say (under
  ``COMPLETED``): the base directories found, the embedding's row count, stored dtypes."""
  if ref.get("model_type") != "metaquery":
    raise UnknownModelFormat(f"{path} is not a MetaQuery checkpoint: model_type "
                             f"{ref.get('model_type')!r}")
  shapes = hf_io.Checkpoint(path).shapes
  rows = [s[0] for k, s in shapes.items() if k.startswith(MLLM) and
          k.endswith("embed_tokens.weight")]
  if len(rows) != 1:
    raise CheckpointMismatchError(f"{path}: expected one {MLLM}...embed_tokens.weight, found "
                                  f"{len(rows)}: not a MetaQuery checkpoint")
  return dict(ref, **{COMPLETED: {
      "dirs": base_dirs(ref), "embed_rows": int(rows[0]), "dtypes": stored_dtypes(path),
      "connector_shapes": {k: list(s) for k, s in shapes.items() if k.startswith(CONNECTOR)}}})


def _part_config(hf: dict, part: str, override: Optional[str], what: str, flag: str) -> tuple:
  """``(config dict, directory)`` of one base model: the override directory, the config
  embedded in config.json, or the directory its id resolved to; else a one-line error."""
  if override:
    if not os.path.isfile(os.path.join(override, "config.json")):
      raise MissingCheckpoint({flag: override}, f"it should hold the {what}'s config.json")
    return hf_io.read_config(override), override
  if hf.get(f"{part}_config"):
    return dict(hf[f"{part}_config"]), ""
  found = (hf.get(COMPLETED) or {}).get("dirs", {}).get(part, "")
  if found:
    return hf_io.read_config(found), found
  key = {"mllm": "mllm_id", "transformer": "diffusion_model_id", "vae": "vae_id"}[part]
  raise MissingCheckpoint({key: hf.get(key)}, (
      f"the MetaQuery checkpoint names its {what} by id and the architecture comes from that "
      f"model's config.json, which is not local: download it (huggingface-cli download "
      f"{hf.get(key)}) or pass its directory ({flag})"))


def _mllm_config(mllm_hf: dict, **kw):
  """Our MLLM config, tied (the release has no lm_head) and without sliding windows (their
  code turns them off)."""
  mllm_hf = dict(mllm_hf)
  if mllm_hf.get("model_type") == "llava_onevision":
    text = dict(mllm_hf["text_config"], tie_word_embeddings=True, use_sliding_window=False)
    return lov.from_hf_config(dict(mllm_hf, text_config=text, tie_word_embeddings=True), **kw)
  if mllm_hf.get("model_type") == "qwen2":
    return qwen2.from_hf_config(dict(mllm_hf, tie_word_embeddings=True,
                                     use_sliding_window=False), **kw)
  if mllm_hf.get("model_type") == "qwen2_5_vl":
    if mllm_hf.get("text_config"):
      mllm_hf["text_config"] = dict(mllm_hf["text_config"], tie_word_embeddings=True,
                                    use_sliding_window=False)
    return qvl.from_hf_config(dict(mllm_hf, tie_word_embeddings=True, use_sliding_window=False),
                              **kw)
  raise NotImplementedError(f"a MetaQuery MLLM of model_type {mllm_hf.get('model_type')!r} "
                            f"(supported: llava_onevision, qwen2_5_vl, qwen2)")


def from_hf_config(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   scan_layers: bool = True, remat_policy: str = "none",
                   attention_impl: str = "xla", mllm_path: Optional[str] = None,
                   dit_path: Optional[str] = None, ae_path: Optional[str] = None
                   ) -> ReleaseConfig:
  """``ReleaseConfig`` of a config.json completed by `complete_config`; ``*_path`` name base
  model directories (their config.json) when the ids do not resolve locally."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
            attention_impl=attention_impl)
  done = hf.get(COMPLETED) or {}
  mllm_hf, mllm_dir = _part_config(hf, "mllm", mllm_path, "MLLM",
                                   "mllm_path / --config.mllm.path")
  mllm = _mllm_config(mllm_hf, scan_layers=scan_layers, **kw)
  text = mllm if isinstance(mllm, LMConfig) else mllm.text
  n = int(hf["num_metaqueries"])
  rows = done.get("embed_rows")
  if rows is not None and rows != text.vocab_size + n + 2:
    raise CheckpointMismatchError(
        f"the MLLM's embed_tokens has {rows} rows; vocab_size {text.vocab_size} of its base "
        f"config + num_metaqueries {n} + 2 markers = {text.vocab_size + n + 2}")
  dit_hf, _ = _part_config(hf, "transformer", dit_path, "diffusion model",
                           "dit_path / --config.decoder.dit_path")
  cls = {"SanaTransformer2DModel": sana_dit.SanaConfig,
         "UNet2DConditionModel": unet2d.UNetConfig}.get(dit_hf.get("_class_name"))
  if cls is None:
    raise NotImplementedError(f"a MetaQuery decoder of class {dit_hf.get('_class_name')!r}")
  extra = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
  if cls is sana_dit.SanaConfig:
    extra["scan_layers"] = scan_layers
  dit = cls.from_diffusers_config(dit_hf, **extra)
  ae, patch = None, int(hf.get("pixel_patch") or 1)
  if not hf.get("pixel_patch"):
    vae_hf, _ = _part_config(hf, "vae", ae_path, "autoencoder",
                             "ae_path / --config.decoder.ae_path")
    ae_cls = {"AutoencoderDC": dc_ae.DCAEConfig,
              "AutoencoderKL": autoencoder_kl.AutoencoderKLConfig}.get(vae_hf.get("_class_name"))
    if ae_cls is None:
      raise NotImplementedError(f"a MetaQuery autoencoder of class {vae_hf.get('_class_name')!r}")
    ae = ae_cls.from_diffusers_config(vae_hf, dtype=dtype, param_dtype=param_dtype)
  conn = ConnectorConfig(
      kind="enc_proj", in_dim=text.stack.d_model, out_dim=dit.caption_channels,
      num_layers=int(hf.get("connector_num_hidden_layers", 24)),
      head_dim=int(hf.get("connector_head_dim", HEAD_DIM)),
      rope_theta=float(hf.get("connector_rope_theta", ROPE_THETA)), dtype=dtype,
      scan_layers=scan_layers, remat_policy=remat_policy, attention_impl=attention_impl)
  if "connector_shapes" in done:
    check_connector(conn, {k: tuple(v) for k, v in done["connector_shapes"].items()})
  stored = {k: v for k, v in hf.items() if k != COMPLETED}
  return ReleaseConfig(
      mllm=mllm, connector=conn, dit=dit, ae=ae, num_queries=n,
      suffix_ids=(int(json.loads(text.hf_extra).get("eos_token_id", 0)),),
      latent_size=int(hf.get("input_size", dit.sample_size)), pixel_patch=patch,
      mllm_dir=mllm_dir, hf_extra=json.dumps(stored, sort_keys=True),
      dtypes=json.dumps(done.get("dtypes") or {}, sort_keys=True))


def _some(names, k=4) -> str:
  names = list(names)
  return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def check_connector(conn: ConnectorConfig, stored: dict) -> None:
  """One line naming the connector tensors (``model.connector.*``) that are missing,
  unexpected or mis-shaped for ``conn``."""
  from mmjax.systems.metaquery.bridge import Connector  # pylint: disable=import-outside-toplevel
  from mmjax.interop.tables import expand  # pylint: disable=import-outside-toplevel
  tree = jax.eval_shape(lambda: Connector(conn).init(jax.random.key(0),
                                                     jnp.zeros((1, 1, conn.in_dim))))
  ours = {"connector/" + k: tuple(v.shape)
          for k, v in hf_io.flat_params(nn.unbox(tree["params"])).items()}
  want = {e.hf: e.hf_shape for e in expand(connector_table(conn), ours)}
  missing, unexpected = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
  bad = [f"{k} {stored[k]} (expected {want[k]})" for k in sorted(set(want) & set(stored))
         if tuple(stored[k]) != tuple(want[k])]
  if missing or unexpected or bad:
    parts = [f"{t}: {_some(x)}" for t, x in (("missing", missing), ("unexpected", unexpected),
                                             ("mis-shaped", bad)) if x]
    raise CheckpointMismatchError(
        f"the connector does not fit {conn.num_layers} layers at {conn.in_dim} -> "
        f"{conn.out_dim} (heads of {conn.head_dim}): " + "; ".join(parts))


def to_hf_config(cfg: ReleaseConfig) -> dict:
  """The release config.json (as read; `export_release` builds one for a trained system)."""
  return json.loads(cfg.hf_extra)


def read_release(path: str, **kw) -> ReleaseConfig:
  """The ``ReleaseConfig`` of a MetaQuery checkpoint directory (``kw``: `from_hf_config`'s)."""
  return from_hf_config(complete_config(read_ref_config(path), path), **kw)


# ----------------------------------------------------------------------------- tables
def _nested(table, hf_prefix: str, ours: str) -> list:
  return [Rule(hf_prefix + r.hf, ours + r.ours, r.transform) for r in table]


def mllm_table(cfg: ReleaseConfig) -> list:
  """``model.mllm_backbone.*`` (transformers-4.49 names, no lm_head) -> ``mllm/``, and the
  embedding rows V.. -> ``markers``, ``queries``."""
  m, text = cfg.mllm, cfg.text
  if isinstance(m, LMConfig):
    table, embed = qwen2.hf_table(m, "model.", "lm_head.weight"), "model.embed_tokens.weight"
    ours_embed = "mllm/embed_tokens/embedding"
  elif isinstance(m, qvl.Qwen25VLConfig):   # transformers 4.49: visual.*, model.* (the LM)
    table, embed = qvl.hf_table(m), "model.embed_tokens.weight"
    ours_embed = "mllm/language_model/embed_tokens/embedding"
  else:   # transformers 4.49 keeps SigLIP's own vision_model level
    table = [Rule("vision_tower.vision_model." + r.hf[len("vision_tower."):]
                  if r.hf.startswith("vision_tower.") else r.hf, r.ours, r.transform)
             for r in lov.hf_table(m)]
    embed, ours_embed = "language_model.model.embed_tokens.weight", \
        "mllm/language_model/embed_tokens/embedding"
  table = [r for r in _nested(table, MLLM, "mllm/")
           if not r.hf.endswith("lm_head.weight") and r.hf != MLLM + embed]
  v, n = text.vocab_size, cfg.num_queries
  total = v + n + 2
  return table + [Rule(MLLM + embed, ours_embed, Rows(IDENTITY, 0, 3, 0, v, total)),
                  Rule(MLLM + embed, "markers", Rows(IDENTITY, 1, 3, v, v + 2, total)),
                  Rule(MLLM + embed, "queries", Rows(IDENTITY, 2, 3, v + 2, total, total))]


def connector_table(conn: ConnectorConfig) -> list:
  """``model.connector.{0,1,3,4}`` -> ``connector/``: the encoder (Sequential item 0), the
  two Linear layers and the RMSNorm (Enc-Proj; the layout has no Proj-Enc)."""
  if conn.kind != "enc_proj":
    raise ConfigError(f"the authors' layout holds the Enc-Proj connector only (this model's "
                      f"is {conn.kind!r})")
  ours = "connector/encoder/" + ("layers" if conn.scan_layers else "layers_{i}")
  L = CONNECTOR + "0.layers.{i}."
  table = []
  for n in "qkv":
    table += [Rule(f"{L}self_attn.{n}_proj.weight", f"{ours}/self_attn/{n}_proj/kernel", LINEAR),
              Rule(f"{L}self_attn.{n}_proj.bias", f"{ours}/self_attn/{n}_proj/bias", FLATTEN)]
  table += [Rule(L + "self_attn.o_proj.weight", ours + "/self_attn/o_proj/kernel", LINEAR_OUT),
            Rule(L + "self_attn.q_norm.gamma", ours + "/self_attn/q_gain", HEAD_GAIN),
            Rule(L + "self_attn.k_norm.gamma", ours + "/self_attn/k_gain", HEAD_GAIN),
            Rule(L + "input_layernorm.weight", ours + "/input_norm/scale"),
            Rule(L + "post_attention_layernorm.weight", ours + "/post_attention_norm/scale")]
  table += [Rule(f"{L}mlp.{n}_proj.weight", f"{ours}/mlp/{n}_proj/kernel", LINEAR)
            for n in ("gate", "up", "down")]
  for i, fc in (("1", "fc1"), ("3", "fc2")):
    table += [Rule(f"{CONNECTOR}{i}.weight", f"connector/projection/{fc}/kernel", LINEAR),
              Rule(f"{CONNECTOR}{i}.bias", f"connector/projection/{fc}/bias", IDENTITY)]
  return table + [Rule(CONNECTOR + "4.weight", "connector/out_norm/scale")]


def _diffusers_family(cfg):
  return diffusers_io.family_module(CLASS_OF[cfg.family]).DIFFUSERS_FAMILY


def hf_table(cfg: ReleaseConfig) -> list:
  table = mllm_table(cfg) + connector_table(cfg.connector)
  table += _nested(_diffusers_family(cfg.dit).table(cfg.dit), DIT, "dit/")
  if cfg.ae is not None:
    table += _nested(_diffusers_family(cfg.ae).table(cfg.ae), VAE, "vae/")
  return table


def hf_ignore(cfg: ReleaseConfig) -> tuple:
  """Buffers (rotary tables, position ids, BatchNorm counters), SigLIP parts a cut tower
  does not use."""
  m = re.escape(MLLM)
  out = [r".*rotary_emb\.inv_freq", r".*rotary_pos_emb\.inv_freq", m + r".*position_ids"]
  if isinstance(cfg.mllm, lov.LlavaOnevisionConfig):
    out += list(siglip.hf_ignore(cfg.mllm.vision, MLLM + "vision_tower.vision_model."))
  for part, prefix in ((cfg.dit, DIT), (cfg.ae, VAE)):
    if part is not None:
      out += [re.escape(prefix) + p for p in _diffusers_family(part).ignore(part)]
  return tuple(out)


HF_FAMILY = Family(
    name="metaquery", model_types=("metaquery",), architectures=("MetaQuery",),
    from_hf_config=from_hf_config, to_hf_config=to_hf_config, make_model=make_model,
    init_args=init_args, table=hf_table, ignore=hf_ignore, complete_config=complete_config)


# ----------------------------------------------------------------------------- writing
def default_dtypes(cfg: ReleaseConfig) -> dict:
  """What their trainer stores: fp32 everywhere but a Sana DiT (loaded in bf16)."""
  sana = isinstance(cfg.dit, sana_dit.SanaConfig)
  return {"mllm": "float32", "connector": "float32",
          "transformer": "bfloat16" if sana else "float32", "vae": "float32"}


def state_dict(cfg: ReleaseConfig, params) -> dict:
  """``{release name: numpy}`` in the stored dtypes (the release's own, else
  `default_dtypes`); diffusers buffers (BatchNorm counters) included."""
  params = nn.unbox(params.get("params", params))
  dtypes = dict(default_dtypes(cfg), **json.loads(cfg.dtypes))
  out = {}
  for part, prefix in (("dit", DIT), ("vae", VAE)):
    sub = getattr(cfg, "ae" if part == "vae" else "dit")
    if sub is not None:
      out.update({prefix + k: v for k, v in diffusers_io.diffusers_state_dict(
          sub, params[part]).items()})
  fam = dataclasses.replace(HF_FAMILY, table=lambda c: mllm_table(c) + connector_table(
      c.connector))
  out.update(hf_io.state_dict(fam, cfg, {k: params[k] for k in ("mllm", "queries", "markers",
                                                                 "connector")}))
  return {k: _cast(v, dtypes[next(p for p, pre in PARTS.items() if k.startswith(pre))])
          for k, v in sorted(out.items())}


def _cast(x, dtype: str):
  x = np.asarray(x)
  return x.astype(jnp.dtype(dtype)) if np.issubdtype(x.dtype, np.floating) else x


def save_release(cfg: ReleaseConfig, params, path: str) -> list:
  """Writes the layout: config.json + ``model.safetensors`` (shards above 5 GB, as
  ``save_pretrained``). Returns the files written."""
  return hf_io.write_checkpoint(path, to_hf_config(cfg), state_dict(cfg, params),
                                max_shard_bytes=SHARD_BYTES)


# ----------------------------------------------------------------------------- a system's
def _parent_if(path: str, names: tuple) -> str:
  """The directory above ``path`` when ``path`` is its ``names`` subfolder, else ''."""
  path = (path or "").rstrip("/")
  return os.path.dirname(path) if os.path.basename(path) in names else ""


def _tied(mllm):
  """The MLLM config without an lm_head (the layout stores none)."""
  if isinstance(mllm, LMConfig):
    return dataclasses.replace(mllm, tie_embeddings=True)
  return dataclasses.replace(mllm, text=dataclasses.replace(mllm.text, tie_embeddings=True))


def system_release_config(system) -> ReleaseConfig:
  """The release config of a MetaQuery system: the checkpoint it started from
  (``model.init_from``), else one built from its config -- base models named by their
  directories (``mllm.path``, the parents of ``decoder.dit_path`` / ``ae_path``), the
  architectures embedded where no directory names them."""
  if getattr(system, "release", None) is not None:
    return system.release
  c, m, conn = system.config, system.config.model, system.conn_cfg
  if conn.kind != "enc_proj":
    raise ConfigError("the authors' layout holds the Enc-Proj connector only "
                      "(model.connector='enc_proj')")
  mllm = _tied(system.mllm_cfg)
  sd15 = c.decoder.kind == "sd15"
  dit_root = _parent_if(c.decoder.unet_path if sd15 else c.decoder.dit_path,
                        ("unet",) if sd15 else ("transformer",))
  hf = {"model_type": "metaquery", "architectures": ["MetaQuery"],
        "mllm_id": c.mllm.path or "", "diffusion_model_id": dit_root,
        "noise_scheduler_id": dit_root, "scheduler_id": dit_root,
        "num_metaqueries": int(m.num_queries), "connector_num_hidden_layers": conn.num_layers,
        "input_size": int(system.latent_shape[0]), "in_channels": int(system.latent_shape[2]),
        "max_input_text_tokens": int(m.caption_tokens),
        "system_prompt": system.prompts.system_prompt, "loss_type": "diff" if sd15 else "flow",
        "torch_dtype": "float32"}
  if not c.mllm.path:
    hf["mllm_config"] = hf_io.get_family(mllm.family).to_hf_config(mllm)
  if not dit_root:
    hf["transformer_config"] = dict(system.dit_cfg.to_diffusers_config(),
                                    _class_name=CLASS_OF[system.dit_cfg.family])
  if system.ae_cfg is None:
    hf.update(vae_id="", pixel_patch=int(c.decoder.pixel_patch),
              vae_downsample_f=int(c.decoder.pixel_patch))
  else:
    ae_path = c.decoder.ae_path or ""
    hf["vae_id"] = _parent_if(ae_path, ("vae",)) or ae_path
    hf["vae_downsample_f"] = int(system.ae_cfg.spatial_compression_ratio)
    if not ae_path:
      hf["vae_config"] = dict(system.ae_cfg.to_diffusers_config(),
                              _class_name=CLASS_OF[system.ae_cfg.family])
  if conn.head_dim != HEAD_DIM:
    hf["connector_head_dim"] = conn.head_dim
  if conn.rope_theta != ROPE_THETA:
    hf["connector_rope_theta"] = conn.rope_theta
  return ReleaseConfig(
      mllm=mllm, connector=conn, dit=system.dit_cfg, ae=system.ae_cfg,
      num_queries=int(m.num_queries),
      suffix_ids=tuple(int(i) for i in system.prompts.suffix_ids),
      latent_size=int(system.latent_shape[0]),
      pixel_patch=int(c.decoder.pixel_patch) if system.ae_cfg is None else 1,
      mllm_dir=c.mllm.path or "", hf_extra=json.dumps(hf, sort_keys=True))   # default dtypes


def _whole_mllm(system, cfg: ReleaseConfig, mllm_params):
  """The system's MLLM params with every weight the layout holds: an lm_head dropped, a
  vision tower the run never built (text-to-image) read from ``mllm.path``."""
  mllm_params = dict(mllm_params)
  if isinstance(cfg.mllm, LMConfig):
    mllm_params.pop("lm_head", None)
    return mllm_params
  lm = dict(mllm_params["language_model"])
  lm.pop("lm_head", None)
  mllm_params["language_model"] = lm
  shapes = nn.unbox(jax.eval_shape(lambda: make_model(cfg).init(
      jax.random.key(0), *init_args(cfg)))["params"]["mllm"])
  lacking = sorted(k for k in shapes if k not in mllm_params)
  if not lacking:
    return mllm_params
  path = system.config.mllm.path
  if not path:
    raise ConfigError(f"the authors' layout holds the whole MLLM; these params lack its "
                      f"{lacking} and mllm.path (where to read them) is not set")
  from mmjax.interop.subtree import load_into  # pylint: disable=import-outside-toplevel
  base = load_into({k: shapes[k] for k in lacking}, "hf", path,
                   scan_layers=system.config.scan_layers)
  return dict(mllm_params, **base)


def export_release(system, params, out_dir: str) -> str:
  """Writes ``params`` of ``system`` in the authors' layout to ``out_dir``; returns it."""
  cfg = system_release_config(system)
  params = dict(nn.unbox(params.get("params", params)))
  params["mllm"] = _whole_mllm(system, cfg, params["mllm"])
  files = save_release(cfg, params, out_dir)
  if jax.process_index() == 0:
    print(f"export (the authors' layout): {out_dir} ({', '.join(files)})", flush=True)
  return out_dir

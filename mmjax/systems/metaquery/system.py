"""MetaQuery as the trainer sees it: configs -> model, data, loss, sampling, modes.

``MetaQuery(config)`` builds the parts from ``configs/metaquery.py`` (the MLLM from
``mllm.*``, the prompt layout, the connector and queries from ``model.*``, the decoder from
``decoder.*``: Sana DiT + DC-AE trained by flow matching, or -- ``decoder.kind='sd15'`` --
SD1.5's UNet + KL autoencoder trained by DDPM epsilon prediction), checks that pretrained
checkpoints exist when ``model.init='pretrained'`` (``MissingCheckpoint`` names each one) --
or, with ``model.init_from=DIR``, takes the architecture and every weight from a checkpoint in
the authors' layout (`release`; the config fields it implies are set from it) --,
and implements the ``mmjax.systems.base.System`` contract. The method itself is `bridge`;
what the image tasks add, `tasks`; the launcher's modes, `modes` (sample, eval) and `export`.

Example (CPU demo: trains, then writes samples and step-0 vs trained ShapesEval)::

    python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq
    python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq --mode sample

In Python::

    from mmjax import config as mcfg
    from mmjax.systems.metaquery.system import MetaQuery
    system = MetaQuery(mcfg.load("configs/metaquery.py:demo"))
    params = system.init_params(jax.random.key(0))
    images = system.generate(params, ["a red circle"], jax.random.key(1))   # uint8 [1, R, R, 3]
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.core.conv_shifts import cpu_apply
from mmjax.data import BadRecord, image as image_ops, shapes_tasks
from mmjax.diffusion import ddpm, flow, solvers
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.interop.subtree import load_into
from mmjax.models import autoencoder_kl, dc_ae, qwen2, sana_dit, unet2d
from mmjax.models import llava_onevision as lov
from mmjax.models import qwen2_5_vl as qvl
from mmjax.models.lm import LMConfig
from mmjax.systems.base import System
from mmjax.systems.metaquery import export as export_lib
from mmjax.systems.metaquery import flops, modes, release as release_lib, tasks
from mmjax.systems.metaquery.bridge import (AUTOENCODERS, CONNECTORS, ConnectorConfig,
                                            MetaQueryModel)
from mmjax.systems.metaquery.prompt import SYSTEM_PROMPT, PromptFormat, qvl_image_token

TASKS = ("t2i", "reconstruct", "edit", "instruct")   # model.task
FROZEN = ("mllm", "vae")          # top-level parameter groups that never train
INITS = ("pretrained", "random")  # model.init
DECODERS = ("sana", "sd15")       # decoder.kind


def _mllm_config(m, dtype, scan_layers, remat):
  """LMConfig / LlavaOnevisionConfig / Qwen25VLConfig from ``config.mllm`` (its ``hf_config``
  dict, or the checkpoint's ``config.json`` when ``path`` is set)."""
  hf_cfg = m.hf_config.to_dict() if hasattr(m.hf_config, "to_dict") else dict(m.hf_config)
  if m.path:
    with open(os.path.join(m.path, "config.json")) as f:
      hf_cfg = json.load(f)
  kw = dict(dtype=dtype, scan_layers=scan_layers, remat_policy=remat)
  if m.family == "qwen2":
    return qwen2.from_hf_config(hf_cfg, **kw)
  if m.family == "llava_onevision":
    return lov.from_hf_config(hf_cfg, **kw)
  if m.family == "qwen2_5_vl":
    return qvl.from_hf_config(hf_cfg, **kw)
  raise ConfigError(f"mllm.family {m.family!r} is not 'qwen2', 'llava_onevision' or "
                    f"'qwen2_5_vl'")


def _diffusers_config(section, path, cls, **overrides):
  d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  if path:
    with open(os.path.join(path, "config.json")) as f:
      d = json.load(f)
  return cls.from_diffusers_config(d, **overrides)


def checkpoint_paths(config) -> dict:
  """``{field: directory}`` of the pretrained checkpoints a config loads."""
  dec = config.decoder
  out = {"mllm.path": config.mllm.path}
  if dec.kind == "sd15":
    out["decoder.unet_path"] = dec.unet_path
  else:
    out["decoder.dit_path"] = dec.dit_path
  if dec.autoencoder in ("dc_ae", "kl"):
    out["decoder.ae_path"] = dec.ae_path
  return out


def init_from(config) -> str:
  """``model.init_from``: a MetaQuery checkpoint in the authors' layout ('' = none)."""
  return config.model.get("init_from", "") or ""


def check_checkpoints(config) -> None:
  """``model.init_from`` must be a checkpoint directory; else ``model.init='pretrained'``
  needs every checkpoint directory (with its config.json); raises ``MissingCheckpoint``
  naming each one that is not there."""
  if config.model.init not in INITS:
    raise ConfigError(f"model.init {config.model.init!r} is not one of {INITS}")
  path = init_from(config)
  if path:
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise MissingCheckpoint({"--config.model.init_from": path}, (
          "it should be a MetaQuery checkpoint directory (config.json + safetensors: what the "
          "authors' trainer writes, or --mode export with model.export_layout=release)"))
    return
  if config.model.init != "pretrained":
    return
  missing = {k: v for k, v in checkpoint_paths(config).items()
             if not v or not os.path.exists(os.path.join(v, "config.json"))}
  if missing:
    raise MissingCheckpoint(missing, hint=(
        "MetaQuery needs pretrained checkpoints, each a directory with a config.json: "
        "LLaVA-OneVision-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf; :l / :xl presets: "
        "Qwen/Qwen2.5-VL-3B-Instruct / Qwen/Qwen2.5-VL-7B-Instruct) as --config.mllm.path"
        " and Sana-1.6B 512px in diffusers format (transformer/ and vae/) as "
        "--config.decoder.dit_path and --config.decoder.ae_path (configs/metaquery.py:sd15: "
        "SD1.5's unet/ and vae/ as --config.decoder.unet_path and --config.decoder.ae_path); "
        "or run the CPU demo with "
        "--config configs/metaquery.py:demo (--config.model.init=random skips loading, e.g. "
        "for launch/aot.py)"))


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


class MetaQuery(System):
  """The trainer's view of MetaQuery (see the module docstring and ``configs/metaquery.py``)."""

  def __init__(self, config):
    super().__init__(config)
    m, dec = config.model, config.decoder
    check_checkpoints(config)
    dtype = jnp.dtype(config.dtype)
    # model.init_from: the architecture (and, with init='pretrained', every weight) of a
    # checkpoint in the authors' layout; the config fields it implies are set from it
    self.release = self._adopt_release(config) if init_from(config) else None
    rel = self.release
    self.mllm_cfg = rel.mllm if rel else _mllm_config(config.mllm, dtype, config.scan_layers,
                                                      config.remat_policy)
    text = self.mllm_cfg if isinstance(self.mllm_cfg, LMConfig) else self.mllm_cfg.text
    self.task = m.task
    if self.task not in TASKS:
      raise ConfigError(f"model.task {self.task!r} is not one of {TASKS}")
    if m.connector not in CONNECTORS:
      raise ConfigError(f"model.connector {m.connector!r} is not one of {CONNECTORS}")
    # image tasks: one static layout per input image, K image slots per example
    self.images = None if self.task == "t2i" else tasks.ImageInputs.from_config(
        self.task, self.mllm_cfg, m)
    self.prompts = PromptFormat(
        config.mllm.prompt, m.prompt_len, m.caption_tokens,
        config.mllm.path or config.mllm.tokenizer_dir or (rel.mllm_dir if rel else ""),
        system_prompt=(json.loads(rel.hf_extra).get("system_prompt") if rel else None)
        or SYSTEM_PROMPT,
        suffix_ids=(json.loads(text.hf_extra).get("eos_token_id", 0),),
        image_tokens=self.images.tokens_per_image if self.images else 0,
        # image tasks on the demo: the shapes-world words plus the instruction words
        tokenizer=(shapes_tasks.task_tokenizer()
                   if self.images and config.mllm.prompt == "plain" else None),
        image_token=(qvl_image_token() if isinstance(self.mllm_cfg, qvl.Qwen25VLConfig)
                     else "<image>"))
    if config.mllm.prompt == "plain" and self.prompts.vocab_size > text.vocab_size:
      raise ConfigError(f"the demo tokenizer has {self.prompts.vocab_size} ids, the MLLM "
                        f"vocabulary {text.vocab_size}")
    if self.images:
      self.images.check_prompts(self.prompts, self.mllm_cfg)
    if dec.kind not in DECODERS:
      raise ConfigError(f"decoder.kind {dec.kind!r} is not one of {DECODERS}")
    if dec.kind == "sd15" and self.task != "t2i":
      raise ConfigError(f"decoder.kind='sd15' is text-to-image only (model.task={self.task!r})")
    if rel:
      self.dit_cfg = rel.dit
    elif dec.kind == "sd15":
      self.dit_cfg = _diffusers_config(dec.unet, dec.unet_path, unet2d.UNetConfig, dtype=dtype,
                                       remat_policy=config.remat_policy)
    else:
      self.dit_cfg = _diffusers_config(dec.dit, dec.dit_path, sana_dit.SanaConfig, dtype=dtype,
                                       scan_layers=config.scan_layers,
                                       remat_policy=config.remat_policy)
    self.ae_cfg = None
    if rel:
      self.ae_cfg = rel.ae
    elif dec.autoencoder == "dc_ae":
      self.ae_cfg = _diffusers_config(dec.ae, dec.ae_path, dc_ae.DCAEConfig, dtype=dtype)
    elif dec.autoencoder == "kl":
      self.ae_cfg = _diffusers_config(dec.ae, dec.ae_path, autoencoder_kl.AutoencoderKLConfig,
                                      dtype=dtype)
    elif dec.autoencoder != "pixels":
      raise ConfigError(f"decoder.autoencoder {dec.autoencoder!r} not in {AUTOENCODERS}")
    self.conn_cfg = rel.connector if rel else ConnectorConfig(
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
        image_token_id=self.mllm_cfg.image_token_id if self.images else -1,
        full_mllm=rel is not None)
    self.resolution = config.data.resolution
    self.sigmas, self.timesteps = solvers.flow_sigmas(config.sample.num_steps,
                                                      config.sample.flow_shift)
    self.alphas_cumprod = self.ddpm_schedule = None      # SD1.5: the DDPM schedule
    if dec.kind == "sd15":
      d = config.ddpm
      self.alphas_cumprod = ddpm.alphas_cumprod(d.beta_schedule, d.beta_start, d.beta_end,
                                                d.num_train_timesteps)
      self.ddpm_schedule = ddpm.schedule(
          config.sample.solver, config.sample.num_steps, self.alphas_cumprod,
          spacing=d.timestep_spacing, steps_offset=d.steps_offset,
          set_alpha_to_one=d.set_alpha_to_one)
    elif config.sample.solver != "dpm_solver_2m":
      raise ConfigError(f"sample.solver {config.sample.solver!r}: the Sana decoder samples with "
                        f"'dpm_solver_2m' (flow sigmas)")

  @functools.cached_property
  def empty_prompt(self) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional branch's prompt: the template around an empty caption."""
    return self.prompts.encode("")

  @property
  def latent_shape(self) -> tuple:
    r = self.resolution
    if self.ae_cfg is None:
      p = self.config.decoder.pixel_patch
      return (r // p, r // p, 3 * p * p)
    f = self.ae_cfg.spatial_compression_ratio
    return (r // f, r // f, self.ae_cfg.latent_channels)

  # -- data ---------------------------------------------------------------------------------
  def preprocess(self, record, rng):
    if self.images:    # image tasks: source images, placeholders, views
      return tasks.preprocess(self, record)
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
    if self.release is not None and self.config.model.init == "pretrained":
      # every group (MLLM, queries, markers, connector, DiT, autoencoder) from the release
      params = load_into(dict(variables["params"]), "hf", init_from(self.config),
                         **self._release_overrides())
      variables = {**variables, "params": params}
    elif self.config.model.init == "pretrained":
      params = dict(variables["params"])
      dec = self.config.decoder
      scan = dict(scan_layers=self.config.scan_layers)
      params["mllm"] = load_into(params["mllm"], "hf", self.config.mllm.path, **scan)
      if dec.kind == "sd15":
        params["dit"] = load_into(params["dit"], "diffusers", dec.unet_path)
      else:
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
    ``decoder.trainable=False``, as SD1.5's UNet is) the DiT train."""
    frozen = FROZEN + (() if self.config.decoder.trainable else ("dit",))
    return {k: jax.tree.map(lambda _, k=k: k not in frozen, v) for k, v in params.items()}

  def apply(self, params, *args, method=None):
    """``self.model.apply`` on ``{'params': params}`` (on the CPU backend with depthwise
    convolutions as shifted sums, `mmjax.core.conv_shifts`)."""
    return cpu_apply(self.model, {"params": params}, *args, method=method)

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
    x0 = jax.lax.stop_gradient(apply(batch["images"], jax.random.fold_in(rng, 3),
                                     method=MetaQueryModel.encode_images))   # KL: a sample
    if self.images:    # image tasks: per-task dropout to the null prompt / black images
      ids, mask, views, metrics = tasks.drop_conditions(self, k_drop, batch)
    else:
      ids, mask, drop = self._drop_captions(k_drop, batch["prompt_ids"], batch["prompt_mask"])
      views, metrics = None, {"dropped": drop.mean()}
    eps = jax.random.normal(k_noise, x0.shape, jnp.float32)
    cond = apply(ids, mask, views, method=MetaQueryModel.condition)
    if self.alphas_cumprod is not None:    # SD1.5: DDPM epsilon prediction, uniform integer t
      t = ddpm.sample_timesteps(k_sigma, x0.shape[0], len(self.alphas_cumprod))
      pred = apply(ddpm.add_noise(x0, eps, t, self.alphas_cumprod), t.astype(jnp.float32),
                   cond, method=MetaQueryModel.velocity)
      return ddpm.epsilon_loss(pred, eps), {**metrics, "cond_rms": _rms(cond)}
    sigma = flow.sample_sigmas(k_sigma, x0.shape[0], kind=fm.sigma_sampler,
                               num_levels=fm.num_levels or None, shift=fm.shift,
                               logit_mean=fm.logit_mean, logit_std=fm.logit_std)
    pred = apply(flow.add_noise(x0, eps, sigma), flow.timesteps_from_sigmas(sigma), cond,
                 method=MetaQueryModel.velocity)
    loss = flow.flow_matching_loss(pred, x0, eps)
    return loss, {**metrics, "cond_rms": _rms(cond)}

  def flops_per_step(self, batch_size):
    """Analytic training FLOPs (`flops`): the frozen MLLM at 4x, what trains at 6x, the
    frozen encoders' forwards."""
    text = self.mllm_cfg if isinstance(self.mllm_cfg, LMConfig) else self.mllm_cfg.text
    n = self.config.model.num_queries
    per_example = flops.train_flops_per_example(
        text.stack, self.conn_cfg, self.dit_cfg, num_queries=n,
        seq_len=self.prompts.max_len + n + 2 + len(self.prompts.suffix_ids),
        latent_shape=self.latent_shape,
        ae_flops=flops.ae_encode_flops(self.ae_cfg, self.resolution),
        vis_flops=self.images.vision_flops(self.mllm_cfg) if self.images else 0.0,
        dit_trained=bool(self.config.decoder.trainable))
    return float(batch_size * per_example)

  # -- sampling -----------------------------------------------------------------------------
  def sample_latents(self, params, cond, uncond, noise, guidance=None):
    """DPM-Solver++ 2M from ``noise [b, h, w, c]`` (fp32) with two-way CFG: one batched DiT
    call on ``[uncond; cond]`` per step, one ``lax.scan``. ``cond``/``uncond`` are
    ``[b, N, C]`` connector outputs. SD1.5: ``sample.solver`` (DPM-Solver++ 2M or DDIM) on
    the DDPM schedule, guiding the UNet's noise prediction."""
    scale = self.config.sample.guidance if guidance is None else guidance
    both = jnp.concatenate([uncond, cond])

    if isinstance(self.dit_cfg, sana_dit.SanaConfig):
      # the DiT built for sampling: the condition's cross-attention K/V once, not per step;
      # blocks unrolled; on CPU query-chunked cross-attention (bench/flow_sample.py)
      cpu = jax.default_backend() == "cpu"
      batched = sana_dit.velocity_fn(
          self.dit_cfg, params["dit"], both,
          attention_impl="chunked" if cpu else self.dit_cfg.attention_impl)
    else:
      def batched(x, t):
        return self.apply(params, x, t, both, method=MetaQueryModel.velocity)

    guided = solvers.cfg_two_way(batched, scale)
    if self.ddpm_schedule is not None:
      return ddpm.sample(self.config.sample.solver, guided, noise, self.ddpm_schedule)
    return solvers.dpm_solver_2m_sample(guided, noise, self.sigmas, self.timesteps)

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
    """``sample`` and ``eval`` (`modes`: text-to-image, or the image task's) and ``export``
    (`export`: WORKDIR/export)."""
    if self.images:
      sample, evaluate = modes.sample_task, modes.eval_task
    else:
      sample, evaluate = modes.sample_t2i, modes.eval_t2i
    return {"sample": functools.partial(sample, self), "eval": functools.partial(evaluate, self),
            "export": self.export_mode}

  def export_mode(self, params, workdir):
    """WORKDIR/export: the mmjax PyTorch export (`export`), and/or the authors' layout
    (`release`): ``model.export_layout`` 'mmjax' | 'release' (WORKDIR/export is then that
    checkpoint) | 'both' (WORKDIR/export/release); unset or '': 'both' for a run started
    from such a checkpoint (``model.init_from``), else 'mmjax'."""
    out = os.path.join(workdir, "export")
    layout = self.config.model.get("export_layout", "") or (
        "both" if self.release is not None else "mmjax")
    if layout not in ("mmjax", "release", "both"):
      raise ConfigError(f"model.export_layout {layout!r} is not 'mmjax', 'release' or 'both'")
    if layout == "release":
      return release_lib.export_release(self, params, out)
    paths = export_lib.export(self, params, out)
    if layout == "both":
      paths["release"] = release_lib.export_release(self, params, os.path.join(out, "release"))
    return paths

  # -- the authors' checkpoint layout -------------------------------------------------------
  def _release_overrides(self) -> dict:
    """`release.from_hf_config` keywords that shape the model: scanned layers and the base
    model directories configured (else the release's ids must resolve locally)."""
    dec = self.config.decoder
    return {"scan_layers": self.config.scan_layers,
            "mllm_path": self.config.mllm.path or None,
            "dit_path": dec.dit_path or dec.unet_path or None, "ae_path": dec.ae_path or None}

  def _adopt_release(self, config) -> "release_lib.ReleaseConfig":
    """Reads ``model.init_from``'s architecture and sets the config fields it implies (MLLM
    family, queries, connector, decoder kind, autoencoder, resolution, caption budget)."""
    rel = release_lib.read_release(
        init_from(config), dtype=jnp.dtype(config.dtype), remat_policy=config.remat_policy,
        **self._release_overrides())
    m, dec = config.model, config.decoder
    m.num_queries, m.connector = rel.num_queries, "enc_proj"
    m.connector_layers, m.connector_head_dim = rel.connector.num_layers, rel.connector.head_dim
    m.connector_rope_theta = float(rel.connector.rope_theta)
    config.mllm.family = ("qwen2" if isinstance(rel.mllm, LMConfig) else
                          "qwen2_5_vl" if isinstance(rel.mllm, qvl.Qwen25VLConfig)
                          else "llava_onevision")
    dec.kind = "sd15" if isinstance(rel.dit, unet2d.UNetConfig) else "sana"
    dec.autoencoder = rel.autoencoder
    if rel.ae is None:
      dec.pixel_patch = rel.pixel_patch
    config.data.resolution = rel.resolution
    budget = json.loads(rel.hf_extra).get("max_input_text_tokens")
    if budget and config.mllm.prompt == "chat":
      m.caption_tokens = int(budget)
    return rel

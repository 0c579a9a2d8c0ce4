"""Export of a trained MetaQuery model to PyTorch formats (``--mode export``).

``export(system, params, out_dir)`` writes::

  out_dir/transformer/   the decoder: a diffusers SanaTransformer2DModel directory (SD1.5,
                         decoder.kind=sd15: UNet2DConditionModel)
  out_dir/bridge/        model.safetensors (queries, markers, connector) + config.json
  out_dir/vae/           the autoencoder, a diffusers AutoencoderDC (decoder.autoencoder=dc_ae)
                         or AutoencoderKL (kl) directory
  out_dir/mllm/          the frozen MLLM, a transformers directory -- only when the config
                         names no checkpoint (mllm.path empty: a random-init demo MLLM);
                         otherwise config.json's ``mllm.path`` says which checkpoint it is
  out_dir/README.md      how to load it all in PyTorch

The bridge's tensor names are those of ``scripts/metaquery_to_torch.py``'s ``MetaQueryBridge``
(``load_state_dict(strict=True)`` takes the file as is), torch layout (``Linear.weight
[out, in]``), one entry per layer (scanned layers are unstacked)::

  queries [N, D]; markers [2, D] (begin_of_img, end_of_img)
  connector.encoder.layers.{i}.input_layernorm.weight
  connector.encoder.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, .o_proj.weight
  connector.encoder.layers.{i}.self_attn.{q,k}_norm.gamma [heads, 1, head_dim]  (QK-norm
      after RoPE; the authors' name and shape; format version 1 stored {q,k}_gain [heads])
  connector.encoder.layers.{i}.post_attention_layernorm.weight
  connector.encoder.layers.{i}.mlp.{gate,up,down}_proj.weight
  connector.projection.fc1.{weight,bias}, connector.projection.fc2.{weight,bias}
  connector.out_norm.weight

Example::

    python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq --mode export
    python scripts/metaquery_to_torch.py /tmp/mq/export --prompt "a red circle" --out x.png

``--mode export`` also writes the authors' checkpoint layout (`release`) to out_dir/release
when ``model.export_layout`` is 'release' or 'both', or -- that field absent or '' -- when
the run started from such a checkpoint (``model.init_from``); 'release' writes it alone.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from mmjax.interop import hf, save_hf
from mmjax.interop.diffusers_io import save_diffusers
from mmjax.interop.tables import FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Rule
from mmjax.systems.metaquery.release import HEAD_GAIN
from mmjax.models import llava_onevision as lov
from mmjax.models import qwen2_5_vl as qvl
from mmjax.models.lm import DecoderLM, LMConfig

BRIDGE_FORMAT = "mmjax-metaquery-bridge"
BRIDGE_VERSION = 2          # 2: QK-norm gains per head and dimension ({q,k}_norm.gamma)
GROUPS = ("mllm", "queries", "markers", "connector", "dit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.json", "chat_template.jinja")


def bridge_table(conn_cfg) -> list:
  """Torch names of ``scripts/metaquery_to_torch.py`` -> our paths (``{i}``: a layer)."""
  enc = conn_cfg.encoder()
  ours = "connector/encoder/" + ("layers" if enc.scan_layers else "layers_{i}")
  hf_l = "connector.encoder.layers.{i}."
  table = [Rule("queries", "queries"), Rule("markers", "markers")]
  for n in ("q", "k", "v", "o"):
    table += [Rule(f"{hf_l}self_attn.{n}_proj.weight", f"{ours}/self_attn/{n}_proj/kernel",
                   LINEAR_OUT if n == "o" else LINEAR),
              Rule(f"{hf_l}self_attn.{n}_proj.bias", f"{ours}/self_attn/{n}_proj/bias",
                   IDENTITY if n == "o" else FLATTEN)]       # o bias: only if configured
  table += [Rule(f"{hf_l}self_attn.{n}_norm.gamma", f"{ours}/self_attn/{n}_gain", HEAD_GAIN)
            for n in "qk"]
  table += [Rule(f"{hf_l}mlp.{n}_proj.{w}", f"{ours}/mlp/{n}_proj/{k}", t)
            for n in ("gate", "up", "down")
            for w, k, t in (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))]
  table += [Rule(f"{hf_l}input_layernorm.weight", f"{ours}/input_norm/scale"),
            Rule(f"{hf_l}post_attention_layernorm.weight", f"{ours}/post_attention_norm/scale")]
  table += [Rule(f"connector.projection.{n}.{w}", f"connector/projection/{n}/{k}", t)
            for n in ("fc1", "fc2")
            for w, k, t in (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))]
  return table + [Rule("connector.out_norm.weight", "connector/out_norm/scale")]


def bridge_state_dict(conn_cfg, params) -> dict:
  """``{torch name: numpy}`` of queries, markers and connector (every parameter mapped, or
  ``CheckpointMismatchError`` names the ones no rule fills)."""
  family = Family(name="metaquery_bridge", model_types=(), architectures=(),
                  from_hf_config=None, to_hf_config=None, make_model=None, init_args=None,
                  table=bridge_table)
  return hf.state_dict(family, conn_cfg, {k: params[k] for k in ("queries", "markers",
                                                                  "connector")})


def bridge_config(system) -> dict:
  """config.json of ``bridge/``: everything ``metaquery_to_torch.py`` needs, and the prompt
  layout the queries were trained with."""
  c, cc, enc = system.config, system.conn_cfg, system.conn_cfg.encoder()
  prompts = system.prompts
  chat = c.mllm.prompt == "chat"
  return {
      "format": BRIDGE_FORMAT, "version": BRIDGE_VERSION,
      "task": c.model.task,                 # image tasks also put images in the user turn
      "num_queries": int(c.model.num_queries), "hidden_size": cc.in_dim,     # D (MLLM)
      "caption_channels": cc.out_dim,                                       # C (DiT)
      "connector": {
          "kind": cc.kind, "width": enc.d_model, "num_layers": enc.num_layers,
          "num_heads": enc.num_heads, "head_dim": enc.head_dim,
          "intermediate_size": enc.mlp_dim, "rope_theta": enc.rope_theta,
          "rms_norm_eps": enc.norm_eps, "out_norm_eps": 1e-5, "qk_norm": enc.qk_norm,
          "qk_norm_eps": 1e-12, "qkv_bias": enc.qkv_bias, "o_bias": enc.out_bias,
          "mlp_bias": enc.mlp_bias, "attention": "bidirectional", "mlp_act": "swiglu",
          "projection_act": "gelu_tanh"},
      "mllm": {"family": c.mllm.family, "path": c.mllm.path,
               "tokenizer_dir": tokenizer_dir(system),
               "exported": "mllm" if exports_mllm(system) else None},
      "prompt": {
          "kind": c.mllm.prompt, "system_prompt": prompts.system_prompt if chat else None,
          "max_len": prompts.max_len, "caption_tokens": prompts.caption_tokens,
          "padding": "left", "pad_id": 0,
          "layout": ("chat template(system prompt, user: caption) + generation prompt + '\\n'"
                     if chat else "<bos> caption") +
                    " | <begin_of_img> q_0 .. q_{N-1} <end_of_img> | suffix_ids",
          # prompt ids = head_ids + caption ids[:caption_tokens] + tail_ids, keeping the last
          # max_len, left padded (None: no tokenizer was configured at export)
          "head_ids": _ids(prompts.head_ids),
          "tail_ids": _ids(prompts.tail_ids),
          "suffix_ids": _ids(prompts.suffix_ids),
          "positions": "RoPE positions count real tokens from 0 (padding takes none)",
          "mask": "causal (the MLLM's own) over real tokens",
          "condition": "final hidden states after the final norm at the N query positions"},
      "decoder": {"kind": c.decoder.kind, "transformer": "transformer",
                  "autoencoder": c.decoder.autoencoder,
                  "vae": "vae" if system.ae_cfg is not None else None,
                  "pixel_patch": int(c.decoder.pixel_patch), "resolution": system.resolution,
                  "latent_shape_hwc": list(system.latent_shape)},
      "sampling": _sampling(c),
  }


def _sampling(c) -> dict:
  """How samples are drawn: Sana -- DPM-Solver++ 2M over flow sigmas, the DiT's timestep
  sigma * 1000; SD1.5 -- ``sample.solver`` (dpm_solver_2m | ddim) on the DDPM schedule with
  epsilon prediction (diffusers' scheduler of the same name and these fields)."""
  out = {"solver": c.sample.solver, "num_steps": int(c.sample.num_steps),
         "guidance": float(c.sample.guidance)}
  if c.decoder.kind != "sd15":
    return dict(out, flow_shift=float(c.sample.flow_shift), timestep="sigma * 1000",
                prediction="flow")
  d = c.ddpm
  return dict(out, prediction="epsilon", beta_schedule=d.beta_schedule,
              beta_start=float(d.beta_start), beta_end=float(d.beta_end),
              num_train_timesteps=int(d.num_train_timesteps),
              timestep_spacing=d.timestep_spacing or None, steps_offset=int(d.steps_offset),
              set_alpha_to_one=bool(d.set_alpha_to_one))


def tokenizer_dir(system) -> str:
  """The directory of the chat tokenizer the prompts were made with ('' for none)."""
  c, rel = system.config, getattr(system, "release", None)
  return c.mllm.path or c.mllm.tokenizer_dir or (rel.mllm_dir if rel is not None else "")


def exports_mllm(system) -> bool:
  """Whether the export carries the MLLM (mllm/): a random-init MLLM (no ``mllm.path``) or
  one read from the authors' checkpoint (its vocabulary rows differ from the base model's)."""
  return not system.config.mllm.path or getattr(system, "release", None) is not None


def _ids(ids):
  return None if ids is None else [int(i) for i in ids]


README = """# MetaQuery export (mmjax)

Generate in PyTorch (transformers MLLM + bridge + diffusers decoder, scheduler, VAE):

    python scripts/metaquery_to_torch.py {out} --prompt "a red circle" --out image.png

- `transformer/`: diffusers `SanaTransformer2DModel` (`from_pretrained`); the condition
  `[b, N, C]` is its `encoder_hidden_states` (no mask); timesteps on the 0..1000 scale.
  SD1.5 runs: `UNet2DConditionModel`, the condition its `encoder_hidden_states`.
- `bridge/`: `model.safetensors` (queries, markers, connector) + `config.json` (sizes, the
  prompt layout, sampling settings). Rebuild it with `scripts/metaquery_to_torch.py`:

      from metaquery_to_torch import load
      bridge, transformer = load("{out}")
      cond = bridge.condition_from_hidden(query_states)   # [b, N, D] -> [b, N, C]
      v = transformer(latents_nchw, encoder_hidden_states=cond, timestep=t).sample

  `query_states` are the MLLM's final hidden states (after its final norm) at the query
  positions of `prompt | <begin_of_img> q_0..q_(N-1) <end_of_img> | suffix_ids`;
  `bridge.prompt_ids(caption_ids)` lays out one prompt (left padded) and
  `bridge.query_states(lm, ids, mask)` runs that sequence through a transformers causal LM.
- `vae/` (DC-AE / KL runs): diffusers `AutoencoderDC` / `AutoencoderKL`; DiT latents =
  (z - shift) * scaling_factor, so decode `vae.decode(latents / scaling_factor + shift)`.
  Pixel runs:
  latents are `torch.nn.functional.pixel_unshuffle(images, pixel_patch)` (NCHW, [-1, 1]).
- `mllm/` (when the run had no MLLM checkpoint, or read its MLLM from the authors' layout):
  transformers directory of the frozen MLLM (and its tokenizer); otherwise
  `bridge/config.json` names it (`mllm.path`).
"""


def export(system, params, out_dir: str, *, dtype=None) -> dict:
  """Writes the directories above; returns ``{'transformer' | 'bridge' | 'vae' | 'mllm' |
  'readme': path}``. ``dtype``: floating dtype on disk (default: as the params are)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be the system's parameter dict, got {type(params).__name__}")
  params = nn.unbox(params.get("params", params))
  missing = [g for g in GROUPS + (("vae",) if system.ae_cfg is not None else ())
             if g not in params]
  if missing:
    raise ValueError(f"params lack groups {missing} (have {sorted(params)}): not MetaQuery "
                     f"params of this config")
  n, d = system.config.model.num_queries, system.conn_cfg.in_dim
  if tuple(np.shape(params["queries"])) != (n, d):
    raise ValueError(f"queries are {np.shape(params['queries'])}, the config says {(n, d)}")
  out = {k: os.path.join(out_dir, k) for k in ("transformer", "bridge")}
  save_diffusers(system.dit_cfg, params["dit"], out["transformer"], dtype=dtype)
  hf.write_checkpoint(out["bridge"], bridge_config(system),
                      hf.cast_floating(bridge_state_dict(system.conn_cfg, params), dtype),
                      max_shard_bytes=1 << 62)          # one file, whatever its size
  if system.ae_cfg is not None:
    out["vae"] = os.path.join(out_dir, "vae")
    save_diffusers(system.ae_cfg, params["vae"], out["vae"], dtype=dtype)
  if exports_mllm(system):
    out["mllm"] = os.path.join(out_dir, "mllm")
    mllm = (DecoderLM(system.mllm_cfg) if isinstance(system.mllm_cfg, LMConfig)
            else qvl.Qwen25VL(system.mllm_cfg) if isinstance(system.mllm_cfg, qvl.Qwen25VLConfig)
            else lov.LlavaOnevision(system.mllm_cfg))
    save_hf(mllm, params["mllm"], out["mllm"], dtype=dtype)
    if system.config.mllm.prompt == "plain" and jax.process_index() == 0:   # demo tokenizer
      system.prompts.tokenizer.tokenizer.save(os.path.join(out["mllm"], "tokenizer.json"))
    elif tokenizer_dir(system) and jax.process_index() == 0:    # the chat tokenizer beside it
      for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_dir(system), name)):
          shutil.copy(os.path.join(tokenizer_dir(system), name), out["mllm"])
  if jax.process_index() == 0:
    out["readme"] = os.path.join(out_dir, "README.md")
    with open(out["readme"], "w") as f:
      f.write(README.replace("{out}", out_dir))
    print(f"export: {out_dir} ({', '.join(sorted(out))})", flush=True)
  return out

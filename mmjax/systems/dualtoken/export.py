"""Export of the unified DualToken model to PyTorch formats (``--mode export``).

``export_unified(system, variables, out_dir)`` writes::

  out_dir/lm/                   the language model, a transformers ``Qwen2ForCausalLM``
                                directory (config.json + model.safetensors), with the text
                                tokenizer (tokenizer.json, tokenizer_config.json) when the run
                                has one: ``tokenizers.Tokenizer.from_file`` or
                                ``PreTrainedTokenizerFast.from_pretrained`` read it as is
                                (transformers 5's ``AutoTokenizer`` picks ``Qwen2Tokenizer``
                                from config.json: right for Qwen's own tokenizer only)
  out_dir/visual.safetensors    code embeddings, projection and both depth heads (names below)
  out_dir/visual_config.json    their sizes, the marker / special token ids, the prompt layout
                                and the sampling settings (``FORMAT``)
  out_dir/tokenizer/            the frozen image tokenizer in the authors' release layout
                                (config.json + epoch_0.pt, ``checkpoint.export_release``;
                                needs torch, skipped without it)

``scripts/dualtoken_unified_to_torch.py`` rebuilds it all in plain PyTorch. Tensor names of
``visual.safetensors``, torch layout (``Linear.weight [out, in]``), one entry per layer
(scanned layers are unstacked); ``{v}`` is ``pixel`` or ``semantic``::

  visual.{v}_embed.weight [K, e]            code embeddings (shared by all depths; the sum
                                            over depths is a position's embedding, the
                                            prefix sums feed the depth heads)
  visual.proj.{weight [H, 2e], bias [H]}    Linear(concat(pixel sum, semantic sum))
  {v}_head.from_hidden.fc{1,2}.{weight,bias}   depth 0 input: fc2(gelu_tanh(fc1(h)))
  {v}_head.from_codes.fc{1,2}.{weight,bias}    depth d input from the prefix sum of codes
  {v}_head.depth_embed [D, W]               learned depth embedding (added to the input)
  {v}_head.layers.{i}.input_layernorm.weight, .post_attention_layernorm.weight   RMSNorm
  {v}_head.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias when configured)
  {v}_head.layers.{i}.mlp.{gate,up,down}_proj.weight   SwiGLU
  {v}_head.norm.weight                      final RMSNorm
  {v}_head.classifiers.{d}.weight [K, W]    one bias-free Linear per depth

Example::

    python launch/tpu.py --config configs/dualtoken.py:demo_unified --workdir /tmp/u \\
        --mode export
    python scripts/dualtoken_unified_to_torch.py /tmp/u/export_unified --prompt "a red circle"
"""
from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np

from mmjax.interop import hf, save_hf
from mmjax.interop.tables import FLATTEN, IDENTITY, LINEAR, LINEAR_OUT, Family, Rule
from mmjax.models.lm import DecoderLM
from mmjax.systems.dualtoken.unified import VOCABS

FORMAT = "mmjax-dualtoken-unified"
GROUPS = ("lm", "visual", "pixel_head", "semantic_head")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")


# ----------------------------------------------------------------------------- tables
def head_table(vocab: str, head) -> list:
  """Torch names of one depth head -> our paths under ``{vocab}_head``."""
  ours, t = f"{vocab}_head/", f"{vocab}_head."
  L = ours + ("stack/layers" if head.stack.scan_layers else "stack/layers_{i}")
  p = t + "layers.{i}."
  table = [Rule(t + "depth_embed", ours + "depth_embed"),
           Rule(t + "norm.weight", ours + "norm/scale"),
           Rule(t + "classifiers.{i}.weight", ours + "classifier", LINEAR)]   # [D, W, K]
  table += [Rule(f"{t}{m}.{fc}.{w}", f"{ours}{m}/{fc}/{k}", tr)
            for m in ("from_hidden", "from_codes") for fc in ("fc1", "fc2")
            for w, k, tr in (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))]
  for n in ("q", "k", "v"):
    table += [Rule(f"{p}self_attn.{n}_proj.weight", f"{L}/self_attn/{n}_proj/kernel", LINEAR),
              Rule(f"{p}self_attn.{n}_proj.bias", f"{L}/self_attn/{n}_proj/bias", FLATTEN)]
  table += [Rule(p + "self_attn.o_proj.weight", f"{L}/self_attn/o_proj/kernel", LINEAR_OUT),
            Rule(p + "self_attn.o_proj.bias", f"{L}/self_attn/o_proj/bias", IDENTITY)]
  table += [Rule(f"{p}mlp.{n}_proj.{w}", f"{L}/mlp/{n}_proj/{k}", tr)
            for n in ("gate", "up", "down")
            for w, k, tr in (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))]
  return table + [Rule(p + "input_layernorm.weight", f"{L}/input_norm/scale"),
                  Rule(p + "post_attention_layernorm.weight", f"{L}/post_attention_norm/scale")]


def visual_table(cfg) -> list:
  """Torch names of ``visual.safetensors`` -> our paths (``cfg``: the ``UnifiedConfig``)."""
  table = [Rule(f"visual.{v}_embed.weight", f"visual/{v}_embed/embedding") for v in VOCABS]
  table += [Rule("visual.proj.weight", "visual/proj/kernel", LINEAR),
            Rule("visual.proj.bias", "visual/proj/bias")]
  for v in VOCABS:
    table += head_table(v, cfg.head(v))
  return table


def visual_state_dict(cfg, params) -> dict:
  """``{torch name: numpy}`` of the visual embedding and both depth heads (every parameter
  mapped, or ``CheckpointMismatchError`` names the ones no rule fills)."""
  family = Family(name="dualtoken_visual", model_types=(), architectures=(),
                  from_hf_config=None, to_hf_config=None, make_model=None, init_args=None,
                  table=visual_table)
  return hf.state_dict(family, cfg, {k: params[k] for k in GROUPS[1:]})


# ----------------------------------------------------------------------------- config
def _head_config(head) -> dict:
  s = head.stack
  return {"codebook_size": head.codebook_size, "depths": head.depths, "width": s.d_model,
          "num_layers": s.num_layers, "num_heads": s.num_heads,
          "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
          "intermediate_size": s.mlp_dim, "mlp_act": s.mlp_act, "norm": s.norm,
          "rms_norm_eps": s.norm_eps, "qkv_bias": s.qkv_bias, "o_bias": s.out_bias,
          "mlp_bias": s.mlp_bias, "rope": None, "attention": "causal over depths",
          # from_hidden / from_codes: fc2(gelu_tanh(fc1 x)), fc1 -> input_mlp_dim -> width
          "input_mlp_dim": s.mlp_dim, "input_mlp_act": "gelu_tanh"}


def visual_config(system) -> dict:
  """``visual_config.json``: everything ``dualtoken_unified_to_torch.py`` needs."""
  c, p, s = system.cfg, system.prompter, system.config.sample
  grid = int(round(c.positions ** 0.5))
  return {
      "format": FORMAT, "version": 1, "lm": "lm",
      "hidden_size": c.lm.stack.d_model, "code_embed_dim": c.code_embed_dim,
      "positions": c.positions, "grid": [grid, grid] if grid * grid == c.positions else None,
      "depths": c.depths, "vocabularies": list(VOCABS),
      "pixel_head": _head_config(c.pixel_head), "semantic_head": _head_config(c.semantic_head),
      "token_ids": {"bos": p.bos_id, "eos": p.eos_id, "pad": p.pad_id, "boi": p.boi_id,
                    "eoi": p.eoi_id},
      "prompt": {
          "text_len": p.text_len, "question": p.question, "padding": "left",
          "generation": "[bos] caption ids[:text_len] <boi>; unconditional: [bos] <boi>",
          "understanding": "[bos] <boi> v_1 .. v_N <eoi> question ids; the answer follows",
          "positions": "RoPE positions count real tokens from 0 (padding takes none)",
          "visual_position": "proj(concat(sum_d pixel_embed[c_d], sum_d semantic_embed[c_d]))",
          "prediction": "the final hidden state (after the LM's norm) at position t gives "
                        "the codes of visual position t + 1 through both depth heads"},
      "depth_head": {
          "input": "depth 0: from_hidden(h); depth d >= 1: from_codes(sum of the head's "
                   "vocabulary embeddings of the codes of depths < d); plus depth_embed[d]",
          "stack": "pre-norm layers, causal attention over the depths, scale 1/sqrt(head_dim), "
                   "no RoPE, SwiGLU MLP; then norm and classifiers[d]"},
      "sampling": {"cfg_scale": float(s.cfg_scale), "temperature": float(s.temperature),
                   "top_k": int(s.top_k), "top_p": float(s.top_p),
                   "cfg": "u + scale (c - u) at every depth; conditional rows first, the "
                          "blank prompt batched after them; one code per image fed to both",
                   "order": "pixel head (all depths), then semantic head, from the same h"},
  }


# ----------------------------------------------------------------------------- writing
def _save_text_tokenizer(system, lm_dir: str) -> bool:
  """The prompter's ``tokenizers.Tokenizer`` as ``lm_dir/tokenizer.json``, and the source
  directory's tokenizer files beside it (a minimal tokenizer_config.json otherwise)."""
  p, t = system.prompter, system.config.text
  tok = getattr(p, "tokenizer", None)
  if tok is None or not hasattr(tok, "save"):
    return False
  tok.save(os.path.join(lm_dir, "tokenizer.json"))
  source = "" if t.tokenizer == "shapes" else (t.tokenizer or system.config.model.lm_path)
  copied = [f for f in TOKENIZER_FILES if source and os.path.isfile(os.path.join(source, f))]
  for f in copied:
    shutil.copy(os.path.join(source, f), os.path.join(lm_dir, f))
  if "tokenizer_config.json" not in copied:
    name = {i: tok.id_to_token(i) for i in (p.bos_id, p.eos_id, p.pad_id) if i is not None}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name[p.eos_id],
            "pad_token": name[p.pad_id], "padding_side": "left",
            "bos_token": name.get(p.bos_id), "model_max_length": system.config.model.seq_len}
    with open(os.path.join(lm_dir, "tokenizer_config.json"), "w") as f:
      json.dump(conf, f, indent=2)
  return True


def _variables(variables) -> tuple[dict, dict]:
  """``(params, codebook)`` of a variables dict (or of bare params: no codebook)."""
  v = nn.unbox(variables)
  if "params" in v:
    return v["params"], v.get("codebook", {})
  return v, {}


def export_unified(system, variables, out_dir: str, *, dtype=None,
                   image_tokenizer: bool = True) -> dict:
  """Writes the layout of the module docstring; returns ``{'lm' | 'visual' | 'config' |
  'tokenizer': path}``. ``dtype``: floating dtype on disk (default: as the params are);
  ``image_tokenizer``: also write the frozen tokenizer (release layout, needs torch)."""
  params, codebook = _variables(variables)
  missing = [g for g in GROUPS if g not in params]
  if missing:
    raise ValueError(f"variables lack parameter groups {missing} (have {sorted(params)}): "
                     "not unified DualToken variables")
  c = system.cfg
  shape = tuple(np.shape(params["visual"]["pixel_embed"]["embedding"]))
  if shape != (c.pixel_head.codebook_size, c.code_embed_dim):
    raise ValueError(f"visual.pixel_embed is {shape}, the config says "
                     f"{(c.pixel_head.codebook_size, c.code_embed_dim)}")
  out = {"lm": os.path.join(out_dir, "lm"),
         "visual": os.path.join(out_dir, "visual.safetensors"),
         "config": os.path.join(out_dir, "visual_config.json")}
  save_hf(DecoderLM(c.lm), params["lm"], out["lm"], dtype=dtype)
  tensors = hf.cast_floating(visual_state_dict(c, params), dtype)
  config = visual_config(system)
  if jax.process_index() == 0:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out["visual"],
              metadata={"format": "pt"})
    config["text_tokenizer"] = ("lm/tokenizer.json" if _save_text_tokenizer(system, out["lm"])
                                else None)
  config["image_tokenizer"] = None
  if image_tokenizer and "tokenizer" in params and "tokenizer" in codebook:
    from mmjax.models import vqgan  # pylint: disable=import-outside-toplevel
    from mmjax.systems.dualtoken import checkpoint  # pylint: disable=import-outside-toplevel
    try:
      out["tokenizer"] = checkpoint.export_release(
          system.tok_system, {"params": params, "codebook": codebook},
          os.path.join(out_dir, "tokenizer"))
      config["image_tokenizer"] = "tokenizer"
    except vqgan.TorchMissing as e:
      print(f"export: image tokenizer skipped ({e})", flush=True)
  if jax.process_index() == 0:
    with open(out["config"], "w") as f:
      json.dump(config, f, indent=2)
    print(f"export: {out_dir} ({', '.join(sorted(out))})", flush=True)
  return out

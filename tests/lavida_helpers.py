"""Shared helpers of the LaViDa tests (tests/test_lavida*.py): tiny configs, batches of the
shapes world, cheap random params; tiny checkpoints in LaViDa's release layout and the
PyTorch reference forward built from one (torch is imported on use)."""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config as mcfg
from mmjax.data import shapes
from mmjax.systems.lavida.system import Lavida

TINY_VISION = ["--config.model.vision_config.hidden_size=16",
               "--config.model.vision_config.intermediate_size=32",
               "--config.model.vision_config.num_hidden_layers=2", "--config.data.batch_size=4"]
TINY = TINY_VISION + ["--config.model.llm_config.d_model=32",
                      "--config.model.llm_config.n_layers=1",
                      "--config.model.llm_config.mlp_hidden_size=64"]


def tiny_system(*overrides, preset="demo", tiny=TINY) -> Lavida:
  return Lavida(mcfg.load(f"configs/lavida.py:{preset}", tiny + list(overrides)))


def shapes_batch(system, n, seed=0, rng=0):
  """``n`` preprocessed shapes scenes as one batch (``rng=None``: prompts, no extra pad)."""
  src = shapes.ShapesSource(seed=seed, resolution=system.config.data.resolution)
  gen = None if rng is None else np.random.default_rng(rng)
  examples = [system.preprocess(src[i], gen) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def random_params(system, seed=0):
  """Params of the system's shapes drawn in numpy (norm scales 1, biases 0, else N(0, 0.02)):
  compiling the real initialiser costs more than these tests."""
  boxed = jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name in ("scale", "bias"):
      return jnp.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed))


# ----------------------------------------------------------------------------- releases
# a LaViDa checkpoint as its save_pretrained writes it, built from tiny random torch modules
RELEASE_TILE = 16                      # tile 16 px, patch 4: 4 x 4 features, pooled to 2 x 2
RELEASE_PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]   # LaViDa's, / 24
LLADA_NAMES = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
               "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
               "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
               "model.embed_tokens": "model.transformer.wte",
               "model.layers.": "model.transformer.blocks.", "model.norm": "model.transformer.ln_f",
               "lm_head": "model.transformer.ff_out"}


def _perturb_bf16(module, torch):
  """Random weights (norm scales near 1) that bf16 holds exactly."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
      else:
        p.normal_(0.0, 0.2)
      p.copy_(p.to(torch.bfloat16).float())


def write_release(path, backbone="llada", seed=0):
  """A tiny LaViDa-L (LLaDA) or LaViDa-D (Dream) checkpoint in the release layout: LM fields
  plus LLaVA's ``mm_*`` fields in ``config.json`` (no ``vision_config``, no image token id),
  bf16 safetensors with the LM's names, ``model.mm_projector.{0,2}``, ``model.image_newline``
  and a SigLIP tower of 16 heads (so400m's count) built with 3 layers and cut to 2, without
  its head. Returns the torch parts ``(lm, tower, projector, newline)``."""
  import torch
  import transformers
  from safetensors.torch import save_file
  torch.manual_seed(seed)
  tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=16,
      image_size=RELEASE_TILE, patch_size=4, vision_use_head=False,
      attn_implementation="eager")).eval()
  del tower.encoder.layers[-1:]                      # LaViDa drops the last layer
  kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            tie_word_embeddings=False, attn_implementation="eager")
  if backbone == "llada":
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **kw)).eval()
    hf = {"model_type": "llava_llada", "architectures": ["LlavaLladaForMaskedDiffusion"],
          "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 64,
          "mlp_ratio": 2, "vocab_size": 64, "embedding_size": 64, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "weight_tying": False, "block_type": "llama",
          "include_bias": False, "activation_type": "silu", "layer_norm_type": "rms",
          "rope": True, "max_sequence_length": 4096, "mask_token_id": 63, "eos_token_id": 62}
  else:
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **kw)).eval()
    hf = {k: v for k, v in lm.config.to_dict().items() if k not in ("model_type", "dtype")}
    hf.update(model_type="llava_dream", architectures=["LlavaDreamForMaskedDiffusion"],
              rope_theta=1000000.0, mask_token_id=63, pad_token_id=62)
  projector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(),
                                  torch.nn.Linear(32, 32))
  newline = torch.nn.Parameter(torch.zeros(32))
  for module in (tower, lm, projector):
    _perturb_bf16(module, torch)
  with torch.no_grad():
    newline.copy_(torch.randn(32).to(torch.bfloat16).float())
  tensors = {}
  for name, p in lm.state_dict().items():
    if backbone == "llada":
      for a, b in LLADA_NAMES.items():
        name = name.replace(a, b)
    tensors[name] = p
  tensors.update({"model.vision_tower.vision_tower.vision_model." + k: p
                  for k, p in tower.state_dict().items()})
  tensors.update({f"model.mm_projector.{k}": p for k, p in projector.state_dict().items()})
  tensors["model.image_newline"] = newline.detach()
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            str(path / "model.safetensors"), metadata={"format": "pt"})
  hf.update(mm_vision_tower="google/siglip-so400m-patch14-384",
            mm_projector_type="mlp2x_gelu", mm_hidden_size=32, mm_vision_select_layer=-2,
            mm_vision_select_feature="patch", image_aspect_ratio="anyres",
            image_grid_pinpoints=RELEASE_PINPOINTS, mm_patch_merge_type="spatial_unpad",
            mm_spatial_pool_mode="bilinear", mm_newline_position="grid", use_mm_proj=True,
            torch_dtype="bfloat16")
  (path / "config.json").write_text(json.dumps(hf))
  return lm, tower, projector, newline


def reference_logits(parts, ids, views, shift: bool):
  """LaViDa's forward in torch on the parts `write_release` returns: one square image
  (``views [5, S, S, 3]``: the base view then a 2 x 2 grid, row-major) spliced at the
  -200 sentinel of ``ids``; the tower's last stored layer (no post-LayerNorm), the projector,
  bilinear pooling ``g -> ceil(g/2)``, base tokens then the grid picture with the newline
  after each row, a bidirectional pass; Dream's logits ``shift``ed (position i scores
  token i). Returns ``[len(ids) - 1 + image tokens, vocab]``."""
  import torch
  from reference_models import bidirectional_mask
  lm, tower, projector, newline = parts
  with torch.no_grad():
    h = tower(torch.from_numpy(np.asarray(views)).permute(0, 3, 1, 2),
              output_hidden_states=True).hidden_states[-1]
    h = projector(h)
    v, n, d = h.shape
    g = math.isqrt(n)
    o = -(-g // 2)
    h = torch.nn.functional.interpolate(h.view(v, g, g, d).permute(0, 3, 1, 2), size=(o, o),
                                        mode="bilinear", align_corners=False)
    h = h.permute(0, 2, 3, 1)                                          # [v, o, o, d]
    grid = h[1:].reshape(2, 2, o, o, d).permute(0, 2, 1, 3, 4).reshape(2 * o, 2 * o, d)
    grid = torch.cat([grid, newline.view(1, 1, d).expand(2 * o, 1, d)], dim=1)
    image = torch.cat([h[0].reshape(-1, d), grid.reshape(-1, d)])
    k = list(ids).index(-200)
    text = lm.get_input_embeddings()(torch.tensor([i for i in ids if i != -200]))
    x = torch.cat([text[:k], image, text[k:]])[None]
    mask = np.ones((1, x.shape[1]), np.int64)
    logits = lm(inputs_embeds=x, attention_mask=bidirectional_mask(mask),
                position_ids=torch.arange(x.shape[1])[None]).logits[0].numpy()
  return np.concatenate([logits[:1], logits[:-1]]) if shift else logits

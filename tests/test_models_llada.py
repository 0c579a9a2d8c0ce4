"""LLaDA: our bidirectional forward equals a transformers LLaMA run without a causal mask.

The reference is ``LlamaForCausalLM`` (same math as LLaDA's blocks) given an explicit 4-D
additive mask that only hides padding; its weights are renamed into a LLaDA-format checkpoint
(``model.transformer.blocks.N.*``) that ``load_hf`` reads.
"""
import json

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

import jax.numpy as jnp

from mmjax.interop import load_hf, save_hf

from reference_models import IDS, MASK, POS, bidirectional_mask


RENAME = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
          "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
          "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}


def llama_as_llada(path, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
      attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.2)
  tensors = {}
  for name, p in model.state_dict().items():
    new = name.replace("model.embed_tokens", "model.transformer.wte")
    new = new.replace("model.layers.", "model.transformer.blocks.")
    new = new.replace("model.norm", "model.transformer.ln_f")
    new = new.replace("lm_head", "model.transformer.ff_out")
    for a, b in RENAME.items():
      new = new.replace(a, b)
    tensors[new] = p.contiguous()
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  hf = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 32, "n_heads": 4,
        "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 64, "vocab_size": 64,
        "embedding_size": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "weight_tying": False, "block_type": "llama", "include_bias": False,
        "mask_token_id": 63}
  (path / "config.json").write_text(json.dumps(hf))
  return model


def test_bidirectional_logits_match_llama_without_causal_mask(tmp_path):
  ref_model = llama_as_llada(tmp_path / "ckpt")
  with torch.no_grad():
    ref = ref_model(torch.tensor(IDS), attention_mask=bidirectional_mask(MASK),
                    position_ids=torch.tensor(POS)).logits.numpy()
  module, params = load_hf(str(tmp_path / "ckpt"))
  assert module.config.attention == "bidirectional"
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(IDS),
                                 attention_mask=jnp.asarray(MASK, bool)))
  diff = float(np.abs(ours - ref)[MASK.astype(bool)].max())
  print(f"llada logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  # a later token changes an earlier logit: really bidirectional
  ids2 = IDS.copy()
  ids2[0, -1] = 1
  ours2 = np.asarray(module.apply({"params": params}, jnp.asarray(ids2),
                                  attention_mask=jnp.asarray(MASK, bool)))
  assert np.abs(ours2[0, 0] - ours[0, 0]).max() > 1e-3
  # export writes the same names back
  save_hf(module, params, str(tmp_path / "out"))
  _, params2 = load_hf(str(tmp_path / "out"))
  again = module.apply({"params": params2}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK, bool))
  np.testing.assert_array_equal(np.asarray(again), ours)

"""Qwen2 against transformers' Qwen2ForCausalLM: logits, export round trip, greedy decoding.

Tiny random fp32 models are built here with torch; weights (biases included) are drawn with a
large std so that argmax decoding is not degenerate.
"""
import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from mmjax.interop import load_hf, save_hf
from mmjax.models.lm import greedy_generate

from reference_models import IDS, MASK, max_diff, tiny_qwen2, torch_logits

@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers(tmp_path, tie):
  ref_model = tiny_qwen2(tmp_path, tie)
  module, params = load_hf(str(tmp_path))
  assert module.config.tie_embeddings == tie and ("lm_head" in params) == (not tie)
  ours = module.apply({"params": params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK, bool))
  diff = max_diff(ours, torch_logits(ref_model))
  print(f"qwen2 tie={tie} logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  # the padded row equals the same prompt unpadded
  alone = module.apply({"params": params}, jnp.asarray(IDS[1:, 2:]))
  np.testing.assert_allclose(np.asarray(ours)[1, 2:], np.asarray(alone)[0], atol=1e-5)


def test_export_round_trip_loads_in_transformers(tmp_path):
  ref_model = tiny_qwen2(tmp_path / "src", tie=False)
  module, params = load_hf(str(tmp_path / "src"))
  files = save_hf(module, params, str(tmp_path / "out"), max_shard_bytes=20_000)
  assert "model.safetensors.index.json" in files and len(files) > 3   # sharded export
  back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  diff = max_diff(torch_logits(back), torch_logits(ref_model))
  assert diff <= 1e-6
  # and our loader reads the sharded export back
  _, params2 = load_hf(str(tmp_path / "out"))
  ours = module.apply({"params": params2}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK, bool))
  assert max_diff(ours, torch_logits(ref_model)) <= 1e-4


def test_greedy_generation_cache_nocache_and_transformers(tmp_path):
  ref_model = tiny_qwen2(tmp_path, tie=True)
  module, params = load_hf(str(tmp_path))
  n = 6
  with torch.no_grad():
    ref = ref_model.generate(torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                             max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None).numpy()
  ids, mask = jnp.asarray(IDS), jnp.asarray(MASK, bool)
  cached = np.asarray(greedy_generate(module, params, ids, mask, max_new_tokens=n))
  full = np.asarray(greedy_generate(module, params, ids, mask, max_new_tokens=n,
                                    use_cache=False))
  np.testing.assert_array_equal(cached, full)
  np.testing.assert_array_equal(cached, ref)
  assert len(set(cached[:, IDS.shape[1]:].ravel().tolist())) > 2   # not a degenerate test

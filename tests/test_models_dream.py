"""Dream: Qwen2.5 weights, bidirectional attention, shifted logits, against transformers'
Qwen2 run with a padding-only 4-D mask."""
import json

import numpy as np
import torch

import jax.numpy as jnp

from mmjax.interop import load_hf, save_hf

from reference_models import IDS, MASK, POS, bidirectional_mask, tiny_qwen2


def test_dream_matches_bidirectional_qwen2_shifted(tmp_path):
  ref_model = tiny_qwen2(tmp_path, tie=False, attn_implementation="eager")
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=63)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with torch.no_grad():
    raw = ref_model(torch.tensor(IDS), attention_mask=bidirectional_mask(MASK),
                    position_ids=torch.tensor(POS)).logits.numpy()
  ref = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
  module, params = load_hf(str(tmp_path))
  assert module.config.family == "dream" and module.config.shift_logits
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(IDS),
                                 attention_mask=jnp.asarray(MASK, bool)))
  valid = MASK.astype(bool)
  valid[1, 2] = False   # shifted row 1: logits at the first real token come from a pad slot
  diff = float(np.abs(ours - ref)[valid].max())
  print(f"dream logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  save_hf(module, params, str(tmp_path / "out"))
  out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out_cfg["model_type"] == "Dream" and out_cfg["mask_token_id"] == 63

"""Sana DiT against diffusers' SanaTransformer2DModel: output parity with a caption padding
mask, the optional features (sin-cos positions, QK-norm, affine norm, patch 2, non-square,
unrolled blocks), export round trip, sharded import, bad checkpoints, and the full-size
Sana-1.6B weight table."""
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jax.numpy as jnp

from mmjax import config as mcfg
from mmjax.interop import CheckpointMismatchError
from mmjax.interop.diffusers_io import load_diffusers, save_diffusers
from mmjax.interop.hf import abstract_params
from mmjax.interop.tables import expand
from mmjax.models import sana_dit

from sana_helpers import TINY, inputs, tiny_sana


def torch_out(model, x, t, caption, mask):
  with torch.no_grad():
    out = model(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(caption), torch.tensor(t),
                encoder_attention_mask=torch.tensor(mask)).sample
  return out.permute(0, 2, 3, 1).numpy()


def ours(module, params, x, t, caption, mask):
  return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                          jnp.asarray(caption), jnp.asarray(mask)))


def test_output_matches_diffusers_with_caption_mask(tmp_path):
  ref_model = tiny_sana(tmp_path)
  args = inputs()
  ref = torch_out(ref_model, *args)
  module, params = load_diffusers(str(tmp_path))
  assert module.config.scan_layers and params["transformer_blocks"]["ff"]["conv_depth"][
      "kernel"].shape == (2, 3, 3, 1, 160)
  out = ours(module, params, *args)
  diff = float(np.abs(out - ref).max())
  print(f"sana dit max abs diff {diff:.2e} (output scale {np.abs(ref).max():.2f})")
  assert diff <= 1e-4
  # the mask matters: unmasking changes the output, and masked tokens' values do not
  unmasked = ours(module, params, *args[:3], np.ones_like(args[3]))
  assert np.abs(unmasked - out).max() > 1e-3
  caption = args[2].copy()
  caption[0, 4:] = 100.0
  np.testing.assert_allclose(ours(module, params, *args[:2], caption, args[3]), out, atol=1e-5)
  # a caption with no real token behaves as in the reference (its -10000 bias cancels out).
  # Looser: the reference adds -10000 to fp32 logits, whose spacing there is ~1e-3.
  empty = args[3].copy()
  empty[0] = 0
  diff_empty = np.abs(ours(module, params, *args[:3], empty) - torch_out(ref_model, *args[:3],
                                                                         empty)).max()
  assert diff_empty <= 1e-3


def test_optional_features_match_diffusers(tmp_path):
  """sin-cos positions (interpolation_scale), QK-norm across heads, affine pre-FFN norm,
  attention biases, patch size 2, a non-square latent and unrolled blocks."""
  ref_model = tiny_sana(tmp_path, seed=1, interpolation_scale=1.0,
                        qk_norm="rms_norm_across_heads", norm_elementwise_affine=True,
                        attention_bias=True, patch_size=2, out_channels=6)
  args = inputs(seed=1, h=8, w=12)
  ref = torch_out(ref_model, *args)
  module, params = load_diffusers(str(tmp_path), scan_layers=False)
  assert "transformer_blocks_1" in params
  out = ours(module, params, *args)
  diff = float(np.abs(out - ref).max())
  print(f"sana dit (pos embed, qk norm, patch 2, 8x12) max abs diff {diff:.2e}")
  assert out.shape == (2, 8, 12, 6) and diff <= 1e-4


def test_export_round_trip(tmp_path):
  ref_model = tiny_sana(tmp_path / "in")
  args = inputs(seed=2)
  module, params = load_diffusers(str(tmp_path / "in"))
  files = save_diffusers(module.config, params, str(tmp_path / "out"), max_shard_bytes=20_000)
  assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
  back = diffusers.SanaTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
  assert back.config.num_layers == 2 and back.config.caption_channels == 24
  np.testing.assert_allclose(torch_out(back, *args), torch_out(ref_model, *args), atol=1e-6)
  # and our sharded export loads back into us
  module2, params2 = load_diffusers(str(tmp_path / "out"))
  np.testing.assert_allclose(ours(module2, params2, *args), ours(module, params, *args),
                             atol=1e-6)


def test_sharded_import_places_every_array(tmp_path):
  ref_model = tiny_sana(tmp_path)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                           ("data", "fsdp", "tensor"))
  module, params = load_diffusers(str(tmp_path), mesh=mesh, rules=mcfg.default_logical_rules())
  q = params["transformer_blocks"]["attn1_to_q"]["kernel"]            # [layers, embed, heads, hd]
  assert q.sharding.spec[:3] == (None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 16, 1, 16)
  args = inputs(seed=3)
  assert np.abs(ours(module, params, *args) - torch_out(ref_model, *args)).max() <= 1e-4


def test_bad_checkpoint_names_missing_extra_and_misshaped(tmp_path):
  tiny_sana(tmp_path)
  f = str(tmp_path / "diffusion_pytorch_model.safetensors")
  tensors = load_file(f)
  del tensors["transformer_blocks.1.ff.conv_point.weight"]                        # missing
  tensors["transformer_blocks.0.attn1.extra.weight"] = np.zeros((2, 2), np.float32)  # extra
  tensors["caption_norm.weight"] = np.ones((31,), np.float32)                      # mis-shaped
  save_file(tensors, f, metadata={"format": "pt"})
  with pytest.raises(CheckpointMismatchError) as err:
    load_diffusers(str(tmp_path))
  msg = str(err.value)
  for name in ("transformer_blocks.1.ff.conv_point.weight",
               "transformer_blocks.0.attn1.extra.weight",
               "caption_norm.weight: checkpoint (31,), model expects (32,)"):
    assert name in msg, msg
  assert "1 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg


def test_config_round_trip_and_unknown_fields():
  cfg = sana_dit.SanaConfig.from_diffusers_config({**TINY, "_class_name": "x",
                                                   "dropout": 0.0, "out_channels": None})
  assert cfg.out_channels == 4
  again = sana_dit.SanaConfig.from_diffusers_config(json.loads(json.dumps(
      cfg.to_diffusers_config())))
  assert again == cfg
  with pytest.raises(ValueError, match="bogus"):
    sana_dit.SanaConfig.from_diffusers_config({**TINY, "bogus": 1})
  with pytest.raises(NotImplementedError):
    sana_dit.SanaConfig.from_diffusers_config({**TINY, "guidance_embeds": True})


# Sana-1.6B 512px transformer (MetaQuery's decoder): 20 layers, 70x32 linear heads, 20x112
# cross heads, caption width 2304
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                  num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                  cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=16)


def test_full_size_table_matches_diffusers_state_dict():
  """At full size (shapes only: torch on the meta device, ours under eval_shape) our table
  names exactly diffusers' tensors with their shapes, and the count is ~1.6B."""
  with torch.device("meta"):
    ref = diffusers.SanaTransformer2DModel(**SANA_1600M)
  family = sana_dit.DIFFUSERS_FAMILY
  cfg = family.from_hf_config(dict(ref.config))
  shapes, specs = abstract_params(family, cfg)
  entries = expand(family.table(cfg), {k: v.shape for k, v in shapes.items()})
  assert {e.hf: e.hf_shape for e in entries} == {k: tuple(v.shape)
                                                for k, v in ref.state_dict().items()}
  count = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert count == sum(p.numel() for p in ref.parameters()) and 1.55e9 < count < 1.65e9
  assert tuple(specs["transformer_blocks/ff/conv_inverted/kernel"]) == (
      "layers", None, None, "embed", "mlp")

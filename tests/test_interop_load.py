"""``interop.load`` / ``interop.save``: one front door over transformers (``model_type``) and
diffusers (``_class_name``) directories, streamed onto shardings; clear errors otherwise."""
import json

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from mmjax import config as mcfg
from mmjax import interop
from mmjax.errors import MissingCheckpoint, MmjaxError
from mmjax.interop import diffusers_io, hf
from mmjax.parallel.mesh import make_mesh


def _qwen2(path):
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False)
  transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


def _sana(path):
  torch.manual_seed(0)
  diffusers.SanaTransformer2DModel(
      in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
      num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
      cross_attention_dim=32, caption_channels=24, sample_size=8).save_pretrained(path)


def _dc_ae(path):
  torch.manual_seed(0)
  diffusers.AutoencoderDC(
      in_channels=3, latent_channels=4, attention_head_dim=8,
      encoder_block_types=("ResBlock", "EfficientViTBlock"),
      decoder_block_types=("ResBlock", "EfficientViTBlock"),
      encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
      encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
      encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
      decoder_norm_types=("rms_norm", "rms_norm"), decoder_act_fns=("silu", "silu"),
      upsample_block_type="interpolate", downsample_block_type="Conv").save_pretrained(path)


def _same(a, b):
  fa, fb = hf.flat_params(a), hf.flat_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("make,kind", [(_qwen2, "hf"), (_sana, "diffusers"),
                                       (_dc_ae, "diffusers")])
def test_load_dispatches_and_save_round_trips(tmp_path, make, kind):
  make(tmp_path / "src")
  module, params = interop.load(str(tmp_path / "src"))
  loader = hf.load_hf if kind == "hf" else diffusers_io.load_diffusers
  _, want = loader(str(tmp_path / "src"))
  _same(params, want)
  files = interop.save(module, params, str(tmp_path / "out"))
  assert ("model.safetensors" if kind == "hf" else diffusers_io.WEIGHTS) in files
  again, back = interop.load(str(tmp_path / "out"))
  assert type(again) is type(module)
  _same(back, params)
  interop.save(module.config, params, str(tmp_path / "from_config"))   # a config will do
  _same(interop.load(str(tmp_path / "from_config"))[1], params)


def test_load_streams_onto_the_mesh(tmp_path):
  _sana(tmp_path)
  mesh, rules = make_mesh(dict(data=2, fsdp=2, tensor=2, context=1)), mcfg.default_logical_rules()
  _, params = interop.load(str(tmp_path), mesh=mesh, rules=rules, scan_layers=True)
  leaves = jax.tree.leaves(params)
  assert all(x.sharding.mesh == mesh for x in leaves)
  assert any(x.addressable_shards[0].data.shape != x.shape for x in leaves)
  _same(params, diffusers_io.load_diffusers(str(tmp_path), scan_layers=True)[1])


def test_unknown_formats_are_one_line_errors(tmp_path):
  _qwen2(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"], cfg["architectures"] = "gpt_neo", ["GPTNeoForCausalLM"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(interop.UnknownModelFormat) as err:
    interop.load(str(tmp_path))
  msg = str(err.value)
  assert "\n" not in msg and "gpt_neo" in msg and isinstance(err.value, MmjaxError)
  for name in ("qwen2", "llada", "llava_llada", "SanaTransformer2DModel", "AutoencoderDC"):
    assert name in msg
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
  with pytest.raises(interop.UnknownModelFormat, match="UNet3DConditionModel.*AutoencoderDC"):
    interop.load(str(tmp_path))
  with pytest.raises(MissingCheckpoint, match="absent"):
    interop.load(str(tmp_path / "absent"))
  with pytest.raises(interop.UnknownModelFormat, match="known: .*qwen2"):
    interop.save(type("Cfg", (), {"family": "gpt_neo"})(), {}, str(tmp_path / "out"))


def test_lavida_is_registered_statically():
  """LaViDa's release layout is in the registry as data (its module imported on use only)."""
  assert hf.FAMILIES["lavida"] == "mmjax.systems.lavida.checkpoint"
  for model_type in ("llava_llada", "llava_dream"):
    family = hf.family_for_config({"model_type": model_type})
    assert family.name == "lavida" and model_type in family.model_types

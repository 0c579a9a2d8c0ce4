"""SigLIP vision tower against transformers' SiglipVisionModel: every layer's hidden states,
the post-LayerNorm output and the MAP-pooled output."""
import numpy as np
import torch
import transformers

import jax.numpy as jnp

from mmjax.interop import load_hf, save_hf


def tiny_siglip(path, seed=0, image_size=28, patch_size=7, **kw):
  torch.manual_seed(seed)
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4,
                                        image_size=image_size, patch_size=patch_size, **kw)
  model = transformers.SiglipVisionModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.1)
  model.save_pretrained(path)
  return model


def test_hidden_states_and_pooled_match_transformers(tmp_path):
  ref_model = tiny_siglip(tmp_path)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
  module, params = load_hf(str(tmp_path))
  out = module.apply({"params": params}, jnp.asarray(images), output_hidden_states=True)
  assert out["hidden_states"].shape == (4, 2, 16, 32)
  diffs = [float(np.abs(np.asarray(out["hidden_states"][k]) - ref.hidden_states[k].numpy()).max())
           for k in range(4)]
  last = float(np.abs(np.asarray(out["last_hidden_state"]) - ref.last_hidden_state.numpy()).max())
  pooled = float(np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max())
  print(f"siglip hidden states max abs diff per layer {diffs}, last {last:.2e}, "
        f"pooled {pooled:.2e}")
  assert max(diffs + [last, pooled]) <= 1e-4
  # export -> transformers loads it and agrees
  save_hf(module, params, str(tmp_path / "out"))
  back = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    again = back(torch.tensor(images).permute(0, 3, 1, 2)).pooler_output.numpy()
  np.testing.assert_allclose(again, ref.pooler_output.numpy(), atol=1e-6)


def test_truncated_tower_reads_penultimate_layer(tmp_path):
  """A tower built with one layer fewer loads the full checkpoint (the dropped layer is
  ignored) and its last hidden state is the full model's penultimate one."""
  ref_model = tiny_siglip(tmp_path, vision_use_head=False)
  images = np.random.default_rng(1).uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
  module, params = load_hf(str(tmp_path), num_layers=2)
  out = module.apply({"params": params}, jnp.asarray(images), output_hidden_states=True)
  assert "pooler_output" not in out
  np.testing.assert_allclose(np.asarray(out["hidden_states"][-1]), ref.hidden_states[-2].numpy(),
                             atol=1e-4)


def test_unrolled_tower_loads_and_matches_scanned(tmp_path):
  """``scan_layers=False`` (params ``encoder/layers_{i}``) reads the same checkpoint and gives
  the same hidden states as the scanned tower."""
  tiny_siglip(tmp_path)
  images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 28, 28, 3)), jnp.float32)
  outs = []
  for scan in (True, False):
    module, params = load_hf(str(tmp_path), scan_layers=scan)
    assert ("layers" in params["encoder"]) == scan
    outs.append(module.apply({"params": params}, images, output_hidden_states=True))
  for key in ("hidden_states", "pooler_output"):
    np.testing.assert_allclose(np.asarray(outs[1][key]), np.asarray(outs[0][key]), atol=1e-5)


def test_patch_size_not_dividing_the_image_matches_transformers(tmp_path):
  """384 / 14 in miniature: 30 px with patch 14 -> 2 x 2 patches, the last 2 px of each side
  unread (torch's Conv2d(stride=14), no padding). Pixels there must not change anything."""
  ref_model = tiny_siglip(tmp_path, image_size=30, patch_size=14)
  images = np.random.default_rng(3).uniform(-1, 1, (2, 30, 30, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
  module, params = load_hf(str(tmp_path))
  assert (module.config.image_size, module.config.grid) == (30, 2)
  out = module.apply({"params": params}, jnp.asarray(images), output_hidden_states=True)
  assert out["hidden_states"].shape == (4, 2, 4, 32)
  for k in range(4):
    np.testing.assert_allclose(np.asarray(out["hidden_states"][k]), ref.hidden_states[k].numpy(),
                               atol=1e-4, err_msg=f"hidden state {k}")
  np.testing.assert_allclose(np.asarray(out["encoder_output"]), ref.hidden_states[-1].numpy(),
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pooler_output"]), ref.pooler_output.numpy(),
                             atol=1e-4)
  edited = images.copy()
  edited[:, 28:] = 5.0
  edited[:, :, 28:] = -5.0
  again = module.apply({"params": params}, jnp.asarray(edited))
  np.testing.assert_array_equal(np.asarray(again["pooler_output"]),
                                np.asarray(out["pooler_output"]))
  # export -> transformers reads the same layout at the same size
  save_hf(module, params, str(tmp_path / "out"))
  back = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "out")).eval()
  assert back.config.image_size == 30
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.tensor(images).permute(0, 3, 1, 2)).pooler_output.numpy(),
                               ref.pooler_output.numpy(), atol=1e-6)


def test_encoder_output_without_layer_taps(tmp_path):
  """Without ``output_hidden_states`` no per-layer stack is kept; ``encoder_output`` is the
  last layer's output (``hidden_states[-1]``)."""
  tiny_siglip(tmp_path)
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 28, 28, 3)), jnp.float32)
  module, params = load_hf(str(tmp_path))
  plain = module.apply({"params": params}, images)
  taps = module.apply({"params": params}, images, output_hidden_states=True)
  assert "hidden_states" not in plain
  np.testing.assert_array_equal(np.asarray(plain["encoder_output"]),
                                np.asarray(taps["hidden_states"][-1]))


def test_reference_init_keeps_the_tree_and_draws_transformers_scales():
  """``reference_init`` on a boxed tree (scanned or unrolled): same structure, boxes kept; the
  MAP head's q|k|v drawn as one packed in_proj (Xavier over [3D, D]), MLP biases ~1e-6."""
  import jax
  import flax.linen as nn
  from mmjax.models import siglip
  hf = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": 30, "patch_size": 14}
  for scan in (True, False):
    model = siglip.SiglipVision(siglip.from_hf_config(hf, scan_layers=scan))
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))["params"]
    new = siglip.reference_init(boxed, jax.random.key(1))
    assert jax.tree.structure(new, is_leaf=lambda x: isinstance(x, nn.Partitioned)) == \
        jax.tree.structure(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    p = nn.unbox(new)
    hq = np.asarray(p["head"]["attention"]["q_proj"]["kernel"])
    assert np.abs(hq).max() <= (6 / (32 + 96)) ** 0.5 < np.abs(hq).max() * 1.3
    fc1 = p["encoder"]["layers" if scan else "layers_0"]["mlp"]["fc1"]
    assert 0 < np.abs(np.asarray(fc1["bias"])).max() < 1e-5
    np.testing.assert_array_equal(np.asarray(p["post_layernorm"]["scale"]), 1.0)
    out = model.apply({"params": p}, jnp.zeros((1, 30, 30, 3)))
    assert np.isfinite(np.asarray(out["pooler_output"])).all()

"""The DualToken tokenizer system on a tiny config: one trainer step of both objectives (every
loss term logged, the EMA codebooks move, the discriminator waits for gan_start), the
authors' release layout written and read back (names, K + 1 rows, one codebook per depth;
encode / decode equal), ``model.init=release`` / ``siglip`` start from those weights with
the teacher a copy of the tower, eval writes step-0 and trained scores, the paper config
names its missing checkpoints, and the FLOPs counter agrees with XLA."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib, parallel
from mmjax.data import image as image_ops, shapes
from mmjax.errors import MissingCheckpoint
from mmjax.systems.dualtoken import checkpoint as ck, eval as dt_eval
from mmjax.systems.dualtoken.system import DualToken
from mmjax.train import state as state_lib, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "dualtoken.py")
TINY = ["--config.model.depths=2", "--config.model.decoder.ch=16",
        "--config.model.disc.ndf=8", "--config.data.batch_size=8", "--config.scan_layers=True"]


def tiny(*overrides):
  return DualToken(config_lib.load(CONFIG + ":demo", TINY + list(overrides)))


def scenes(n, r=32):
  return np.stack([image_ops.to_float(shapes.render(shapes.sample_scene(0, i), r))
                   for i in range(n)])


@pytest.fixture(scope="module")
def system():
  return tiny()


@pytest.fixture(scope="module")
def variables(system):
  return system.init_variables(jax.random.PRNGKey(0))


def test_one_step_of_both_objectives(system):
  c = system.config
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  state, shardings, opt = state_lib.create_train_state(system, c, mesh, rules)
  assert [g.name for g in opt.groups] == ["main", "disc"]
  assert not any(p.startswith(("teacher/", "lpips/")) for p in opt.trainable)
  batch_sh = parallel.batch_sharding(mesh, rules, system.batch_axes)
  step = step_lib.build_train_step(system, opt, mesh, rules, shardings, batch_sh)
  before = jax.device_get(state.mutables)
  disc = np.asarray(state.params["disc"]["conv_in"]["kernel"])
  tower = np.asarray(state.params["tokenizer"]["tower"]["pos_embed"])
  np.testing.assert_array_equal(tower, state.params["teacher"]["pos_embed"])
  state, m = step(state, parallel.host_local_to_global({"images": scenes(8)}, mesh, batch_sh))
  m = jax.device_get(m)
  for key in ("recon_mse", "semantic_feature", "semantic_pooled", "commit_pix", "commit_sem",
              "gan_generator", "gan_weight", "disc/hinge", "usage_pix", "usage_sem"):
    assert np.isfinite(m[key]), key
  assert 0.3 <= m["gan_weight"] <= 10.0 and m["disc/loss"] == 0.0   # GAN from gan_start
  after = jax.device_get(state.mutables)
  assert not np.array_equal(after["codebook"]["tokenizer"]["quantizer_sem"]["cluster_size"],
                            before["codebook"]["tokenizer"]["quantizer_sem"]["cluster_size"])
  np.testing.assert_array_equal(np.asarray(state.params["disc"]["conv_in"]["kernel"]), disc)
  np.testing.assert_array_equal(np.asarray(state.params["teacher"]["pos_embed"]), tower)


def test_release_layout_round_trip(system, variables, tmp_path):
  ck.export_release(system, variables, str(tmp_path / "rel"))
  with open(tmp_path / "rel" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["model_type"] == "rqvaesigliptransformer_model"
  rq = cfg["rqvaesiglip"]
  assert (rq["layer_recon"], rq["layer_sem"], rq["layer_shortcut"]) == (2, 4, 1)
  assert rq["vq_pix"]["code_shape"] == [8, 8, 2] and rq["vq_sem"]["bottleneck_type"] == "rq_ema"
  _, tensors = ck.read_release(str(tmp_path / "rel"))
  k, d = system.cfg.pixel.codebook_size, system.cfg.pixel.dim
  for depth in range(2):
    assert tensors[f"quantizer_pix.codebooks.{depth}.weight"].shape == (k + 1, d)
  assert not tensors["quantizer_sem.codebooks.0.weight"][-1].any()      # the padding row
  assert "siglip_model.vision_model.encoder.layers.4.mlp.fc1.weight" in tensors
  assert not tensors["prequant_pix.attn.zero_k_bias"].any()
  for name in ("post_quant_conv.conv1.weight", "decoder.conv_out.weight",
               "postquant_sem.mlp.w2.weight", "prequant_shortcut.norm3.bias"):
    assert name in tensors, name

  tok = ck.load_release(str(tmp_path / "rel"))
  imgs = scenes(4)
  ours, theirs = system.encode(variables, imgs), tok.encode(imgs)
  for key in ("pixel_codes", "semantic_codes"):
    np.testing.assert_array_equal(ours[key], theirs[key])
  np.testing.assert_allclose(ours["pooled"], theirs["pooled"], atol=1e-6)
  np.testing.assert_allclose(system.decode(variables, ours["pixel_codes"]),
                             tok.decode(theirs["pixel_codes"]), atol=1e-6)

  # training may start from the release: tokenizer + codebooks loaded, teacher = its tower
  again = tiny("--config.model.init=release",
               f"--config.model.release_path={tmp_path / 'rel'}")
  v2 = again.init_variables(jax.random.PRNGKey(5))
  for a, b in zip(jax.tree.leaves(variables["params"]["tokenizer"]),
                  jax.tree.leaves(v2["params"]["tokenizer"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(v2["params"]["tokenizer"]["tower"]),
                  jax.tree.leaves(v2["params"]["teacher"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      v2["codebook"]["tokenizer"]["quantizer_pix"]["embed"],
      variables["codebook"]["tokenizer"]["quantizer_pix"]["embed"])


def test_init_from_a_transformers_siglip(tmp_path):
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=5, num_attention_heads=4,
                                        image_size=32, patch_size=4, layer_norm_eps=1e-6)
  ref = transformers.SiglipVisionModel(cfg).eval()
  ref.save_pretrained(tmp_path / "siglip")
  system = tiny("--config.model.init=siglip", f"--config.model.siglip_path={tmp_path}/siglip")
  v = system.init_variables(jax.random.PRNGKey(0))
  imgs = scenes(2)
  with torch.no_grad():
    out = ref(torch.tensor(imgs).permute(0, 3, 1, 2), output_hidden_states=True)
  from mmjax.systems.dualtoken.model import DualTokenModel
  sem, pooled = system.model.apply(v, jnp.asarray(imgs), method=DualTokenModel.targets)
  np.testing.assert_allclose(sem, out.hidden_states[4].numpy(), atol=2e-5)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=2e-5)


def test_eval_mode_writes_step0_and_trained(system, variables, tmp_path):
  result = dt_eval.eval_mode(system, variables, str(tmp_path), num=8)
  with open(tmp_path / "eval" / "dualtoken_tokenizer.json") as f:
    assert json.load(f) == json.loads(json.dumps(result))
  for key in ("step0", "trained"):
    for metric in ("psnr", "ssim", "codebook_usage", "semantic_cosine", "entropy_fraction"):
      assert np.isfinite(result[key][metric]), (key, metric)
  assert 0 < result["trained"]["codebook_usage"] <= 1
  dt_eval.sample_mode(system, variables, str(tmp_path), num=4)
  assert os.path.getsize(tmp_path / "samples" / "dualtoken_recon.png") > 0


def test_paper_config_names_missing_checkpoints():
  with pytest.raises(MissingCheckpoint, match="model.siglip_path.*model.lpips_vgg_path"):
    DualToken(config_lib.load(CONFIG))
  c = config_lib.load(CONFIG, ["--config.model.init=random"])   # AOT: no files needed
  assert DualToken(c).cfg.vision.num_patches == 729 and DualToken(c).cfg.use_lpips

"""MetaQuery export to PyTorch: the DiT loads in diffusers and matches our velocity, the torch
bridge of scripts/metaquery_to_torch.py matches our connector (Enc-Proj unrolled, Proj-Enc
scanned) and, with the exported demo MLLM in transformers, our whole prompt -> condition
path; the launcher's export mode on a trained checkpoint; bad input is refused."""
import json
import os
import sys

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import config as mcfg
from mmjax.systems.metaquery.bridge import MetaQueryModel
from mmjax.systems.metaquery.export import export
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG, ROOT, TINY, tiny


sys.path.insert(0, os.path.join(ROOT, "scripts"))
import metaquery_to_torch as mqt  # noqa: E402

# D=32, C=48: heads of 16 give 2 (Enc-Proj at D) or 3 (Proj-Enc at C); two connector layers
SIZES = ["--config.model.connector_layers=2", "--config.decoder.dit.caption_channels=48"]


def random_params(system, seed=0, shapes=None):
  """Random params of the system's shapes (no init compile): N(0, 0.1) everywhere, norm
  weights and QK gains 1 + N(0, 0.1) -- no zero biases, no unit gains, nothing at init."""
  if shapes is None:
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.key(0),
                                     system.dummy_batch(1)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    x = 0.1 * rng.standard_normal(a.shape)
    return (x + 1.0 if name in ("scale", "q_gain", "k_gain") else x).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=[("enc_proj", False), ("proj_enc", True)],
                ids=["enc_proj", "proj_enc_scanned"])
def exported(request, tmp_path_factory):
  kind, scan = request.param
  system = tiny(*SIZES, f"--config.model.connector={kind}", f"--config.scan_layers={scan}")
  params = random_params(system)
  out = str(tmp_path_factory.mktemp(kind))
  return system, params, out, export(system, params, out)


def _states(system, n=2, seed=1):
  d = system.conn_cfg.in_dim
  return np.random.default_rng(seed).standard_normal((n, system.config.model.num_queries, d),
                                                     dtype=np.float32)


def test_layout_config_and_queries(exported):
  system, params, out, paths = exported
  assert sorted(paths) == ["bridge", "mllm", "readme", "transformer"]     # pixels: no vae
  cfg = json.load(open(os.path.join(out, "bridge", "config.json")))
  c = cfg["connector"]
  assert (cfg["num_queries"], cfg["hidden_size"], cfg["caption_channels"]) == (4, 32, 48)
  assert c["kind"] == system.conn_cfg.kind and c["num_layers"] == 2 and c["head_dim"] == 16
  assert c["width"] == (32 if c["kind"] == "enc_proj" else 48) and c["out_norm_eps"] == 1e-5
  assert cfg["prompt"]["suffix_ids"] == [int(i) for i in system.prompts.suffix_ids]
  assert cfg["mllm"]["family"] == "qwen2" and cfg["mllm"]["exported"] == "mllm"
  bridge = mqt.MetaQueryBridge.from_dir(os.path.join(out, "bridge"))     # strict load
  np.testing.assert_array_equal(bridge.queries.detach().numpy(), params["queries"])
  np.testing.assert_array_equal(bridge.markers.detach().numpy(), params["markers"])
  names = set(bridge.state_dict())
  assert "connector.encoder.layers.1.self_attn.q_proj.weight" in names   # unstacked
  w = bridge.state_dict()["connector.projection.fc1.weight"]
  assert tuple(w.shape) == (48, 32)                                        # torch [out, in]
  assert "README.md" in os.listdir(out)


def test_torch_bridge_matches_our_connector(exported):
  system, params, out, _ = exported
  states = _states(system)
  ours = np.asarray(jax.jit(lambda p, x: system.apply(p, x, method=lambda m, x: m.bridge(x)))(
      params, jnp.asarray(states)))
  bridge = mqt.MetaQueryBridge.from_dir(os.path.join(out, "bridge"))
  with torch.no_grad():
    theirs = bridge.condition_from_hidden(torch.tensor(states)).numpy()
  diff = np.abs(theirs - ours).max()
  print(f"{system.conn_cfg.kind}: connector max |diff| {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours).mean() > 0.1


def test_diffusers_dit_matches_our_velocity(exported):
  system, params, out, _ = exported
  from diffusers import SanaTransformer2DModel
  model = SanaTransformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2,) + system.latent_shape, dtype=np.float32)     # NHWC
  t = np.array([873.0, 12.5], np.float32)
  cond = rng.standard_normal((2, 4, 48), dtype=np.float32)
  ours = np.asarray(jax.jit(lambda p, *a: system.apply(p, *a, method=MetaQueryModel.velocity))(
      params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond)))
  with torch.no_grad():
    theirs = model(torch.tensor(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.tensor(cond),
                   timestep=torch.tensor(t)).sample.permute(0, 2, 3, 1).numpy()
  diff = np.abs(theirs - ours).max()
  print(f"{system.conn_cfg.kind}: DiT max |diff| {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours).mean() > 0.1


def test_torch_prompt_to_condition_with_the_exported_mllm(exported):
  """Caption -> prompt ids (the exported layout and tokenizer) -> transformers Qwen2 from
  mllm/ -> bridge.query_states -> condition, against our condition."""
  system, params, out, _ = exported
  import tokenizers
  from transformers import AutoModelForCausalLM
  bridge, _ = mqt.load(out)
  tok = tokenizers.Tokenizer.from_file(os.path.join(out, "mllm", "tokenizer.json"))
  lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "mllm"),
                                            dtype=torch.float32).eval()
  captions = ["two red circles left of a blue square", ""]
  pairs = [bridge.prompt_ids(tok.encode(c, add_special_tokens=False).ids) for c in captions]
  ids, mask = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
  o_ids, o_mask = system.prompts.encode_batch(captions)
  np.testing.assert_array_equal(ids.numpy(), o_ids)
  np.testing.assert_array_equal(mask.numpy(), o_mask)
  ours = np.asarray(jax.jit(lambda p, i, m: system.apply(p, i, m,
                                                         method=MetaQueryModel.condition))(
      params, o_ids, o_mask))
  with torch.no_grad():
    theirs = bridge.condition_from_hidden(bridge.query_states(lm, ids, mask)).numpy()
  diff = np.abs(theirs - ours).max()
  print(f"prompt -> condition max |diff| {diff:.2e}")
  assert diff < 1e-4


def test_launcher_export_mode_from_a_checkpoint(tmp_path):
  """``launch/tpu.py --mode export`` on a checkpoint (random params written as step 7)."""
  import importlib.util
  from mmjax import parallel
  from mmjax.train.checkpoint import Checkpointer
  from mmjax.train.state import TrainState, abstract_train_state
  cfg = mcfg.load(CONFIG + ":demo", TINY)
  system = MetaQuery(cfg)
  abstract, _, _ = abstract_train_state(system, cfg, parallel.make_mesh(cfg.mesh),
                                        parallel.logical_rules(cfg))
  params = random_params(system, seed=3, shapes=abstract.params)
  put = lambda v, a: jax.device_put(np.asarray(v, a.dtype), a.sharding)
  state = TrainState(step=put(7, abstract.step), params=jax.tree.map(put, params, abstract.params),
                     opt_state=jax.tree.map(lambda a: put(np.zeros(a.shape), a),
                                            abstract.opt_state))
  ckpt = Checkpointer(str(tmp_path), cfg)
  ckpt.save(7, state)
  ckpt.close()
  spec = importlib.util.spec_from_file_location("tpu", os.path.join(ROOT, "launch", "tpu.py"))
  tpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu)
  tpu.main(["--config", CONFIG + ":demo", "--workdir", str(tmp_path), "--mode", "export"] + TINY)
  out = os.path.join(str(tmp_path), "export")
  assert sorted(os.listdir(out)) == ["README.md", "bridge", "mllm", "transformer"]
  bridge = mqt.MetaQueryBridge.from_dir(os.path.join(out, "bridge"))
  np.testing.assert_array_equal(bridge.queries.detach().numpy(), params["queries"])
  np.testing.assert_array_equal(bridge.markers.detach().numpy(), params["markers"])


def test_dc_ae_run_exports_the_vae(tmp_path):
  """decoder.autoencoder=dc_ae: vae/ loads in diffusers and decodes our latents as
  ``decode_latents`` does (latents / scaling_factor)."""
  from diffusers import AutoencoderDC
  cfg = mcfg.load(CONFIG + ":demo", TINY + ["--config.decoder.autoencoder=dc_ae",
                                            "--config.decoder.dit.in_channels=4",
                                            "--config.decoder.dit.out_channels=4"])
  with cfg.unlocked():
    cfg.decoder.ae = dict(                      # 4x down, 4 channels: a 16px image -> 4x4x4
        latent_channels=4, attention_head_dim=8,
        encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
        encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
        encoder_qkv_multiscales=[[], [5], [5]], decoder_qkv_multiscales=[[], [5], [5]],
        upsample_block_type="interpolate", downsample_block_type="Conv", scaling_factor=0.5)
  system = MetaQuery(cfg)
  assert system.latent_shape == (4, 4, 4)
  params = random_params(system)
  paths = export(system, params, str(tmp_path))
  assert json.load(open(os.path.join(paths["bridge"], "config.json")))["decoder"]["vae"] == "vae"
  vae = AutoencoderDC.from_pretrained(paths["vae"]).eval()
  z = np.random.default_rng(4).standard_normal((1, 4, 4, 4), dtype=np.float32)
  ours = np.asarray(jax.jit(lambda p, z: system.apply(p, z, method=MetaQueryModel.decode_latents))(
      params, jnp.asarray(z)))
  with torch.no_grad():
    theirs = vae.decode(torch.tensor(z).permute(0, 3, 1, 2) / 0.5).sample
  theirs = theirs.permute(0, 2, 3, 1).numpy()
  diff = np.abs(theirs - ours).max()
  print(f"DC-AE decode max |diff| {diff:.2e}")
  assert diff < 1e-4


def test_bad_input_is_refused(tmp_path):
  system = tiny()
  params = random_params(system)
  with pytest.raises(ValueError, match="connector"):
    export(system, {k: v for k, v in params.items() if k != "connector"}, str(tmp_path))
  with pytest.raises(ValueError, match="queries"):
    export(system, {**params, "queries": params["queries"][:2]}, str(tmp_path))
  with pytest.raises(TypeError):
    export(system, [params], str(tmp_path))

"""LaViDa through the real trainer (stage 1 trains the projector only), stage presets and
checkpoint errors, and export to LaViDa's checkpoint layout with a reload."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open

from mmjax import config as mcfg
from mmjax import parallel
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.systems.lavida.checkpoint import load_export, to_hf_config
from mmjax.systems.lavida.system import Lavida
from mmjax.train import loop
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.state import abstract_train_state

from lavida_helpers import TINY, random_params, shapes_batch, tiny_system


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_stage1_trains_only_the_projector(tmp_path):
  """Three optimizer steps of the real trainer (stage 1: one view, no pooling): between the
  checkpoints of step 1 and step 3 the projector moves and every other parameter is
  bitwise unchanged; the frozen parameters have no optimizer state."""
  cfg = mcfg.load("configs/lavida.py:stage1,demo", TINY + [
      "--config.total_steps=3", "--config.checkpoint_every=1", "--config.log_every=1",
      "--config.keep_checkpoints=3", "--config.optim.warmup_steps=0",
      "--config.data.batch_size=8"])   # one row per virtual device
  system = Lavida(cfg)
  assert (system.geometry.max_views, system.geometry.max_tokens) == (1, 16)   # 4 x 4, flat
  result = loop.train(cfg, str(tmp_path), system=system)
  assert result.step == 3 and np.isfinite(result.metrics["loss"])
  mesh, rules = parallel.make_mesh(cfg.mesh), parallel.logical_rules(cfg)
  abstract, _, optimizer = abstract_train_state(system, cfg, mesh, rules)
  ckpt = Checkpointer(str(tmp_path), cfg)
  try:
    step1 = ckpt.restore(1, abstract).state
  finally:
    ckpt.close()
  before, after = _flat(step1.params), _flat(result.state.params)
  moved = {k for k in before if before[k].tobytes() != after[k].tobytes()}
  assert moved == {k for k in before if k.startswith("projector/")}
  assert optimizer.trainable == frozenset(k for k in before if k.startswith("projector/"))
  mu = _flat(result.state.opt_state["main"][1].mu)
  assert set(mu) == {k for k in before if k.startswith("projector/")}


# the paper's architecture with tiny widths (vocabulary and geometry as configured)
SMALL_PAPER = ["--config.model.init=random", "--config.model.llm_config.d_model=32",
               "--config.model.llm_config.n_heads=4", "--config.model.llm_config.n_kv_heads=4",
               "--config.model.llm_config.n_layers=1",
               "--config.model.llm_config.mlp_hidden_size=64",
               "--config.model.vision_config.hidden_size=16",
               "--config.model.vision_config.intermediate_size=32",
               "--config.model.vision_config.num_attention_heads=4",
               "--config.model.vision_config.num_hidden_layers=3"]


@pytest.mark.parametrize("preset,views,tokens,trained", [
    ("stage1", 1, 27 * 27, {"projector"}),                      # one view, unpooled
    ("stage2", 5, 196 + 28 * 29, {"projector", "vision_tower", "image_newline",
                                  "language_model"}),
    ("stage3", 5, 196 + 28 * 29, {"projector", "vision_tower", "image_newline",
                                  "language_model"})])
def test_stage_presets_build_the_papers_stages(preset, views, tokens, trained):
  """Stage 1 trains the projector on single unpooled 384px views (27 x 27 tokens); stages 2
  and 3 train everything on anyres views (at most 196 + a 2 x 2 grid of 14 x 14 tokens with
  a newline after each of its 28 rows)."""
  system = Lavida(mcfg.load(f"configs/lavida.py:{preset}", SMALL_PAPER))
  assert (system.geometry.max_views, system.geometry.max_tokens) == (views, tokens)
  abstract = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0),
                                     system.dummy_batch(1))["params"])
  mask = system.trainable_mask(abstract)
  assert {k for k, v in mask.items() if all(jax.tree.leaves(v))} == trained
  assert {k for k, v in mask.items() if not any(jax.tree.leaves(v))} == set(mask) - trained


def test_missing_checkpoints_and_bad_presets_are_typed_errors():
  """The paper settings need both pretrained directories: a ``MissingCheckpoint`` names each
  missing one (and points at the demo); presets and fields are checked by name."""
  with pytest.raises(MissingCheckpoint, match=r"model\.llm_path.*model\.vision_path.*:demo"):
    Lavida(mcfg.load("configs/lavida.py:stage2"))
  with pytest.raises(MissingCheckpoint) as info:
    Lavida(mcfg.load("configs/lavida.py:stage3,dream", ["--config.model.llm_path=/nowhere"]))
  assert set(info.value.missing) == {"--config.model.llm_path", "--config.model.vision_path"}
  assert info.value.missing["--config.model.llm_path"] == "/nowhere"
  with pytest.raises(ConfigError, match="unknown preset 'stage4'.*did you mean"):
    mcfg.load("configs/lavida.py:stage4")
  with pytest.raises(ConfigError, match="pick one stage"):
    mcfg.load("configs/lavida.py:stage1,stage3")
  with pytest.raises(KeyError, match="prefix_cache"):
    mcfg.load("configs/lavida.py:demo", ["--config.sample.prefix_cache=True"])
  with pytest.raises(ConfigError, match="model.loss='elbo'"):
    tiny_system("--config.model.loss=elbo")


def test_paper_config_builds_at_random_init():
  """LaViDa-L as configured (random init, no tokenizer): LLaDA-8B and a 26-layer SigLIP;
  only shapes are computed."""
  system = Lavida(mcfg.load("configs/lavida.py", ["--config.model.init=random"]))
  text, vision = system.model_cfg.text, system.model_cfg.vision
  assert (text.stack.d_model, text.stack.num_layers, text.vocab_size) == (4096, 32, 126464)
  assert (vision.stack.num_layers, vision.image_size, system.geometry.grid) == (26, 384, 14)
  assert system.prompt_len == 128 + 1008
  abstract = jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))
  assert 8.3e9 < n < 8.6e9       # 8.0B LLaDA + 0.4B SigLIP + 21M projector
  hf = to_hf_config(system.model_cfg)        # the release's config.json: so400m needs no more
  assert "vision_config" not in hf and "image_token_index" not in hf
  assert hf["mm_vision_tower"] == "google/siglip-so400m-patch14-384"
  with pytest.raises(ValueError, match="tokenizer"):
    system.preprocess({"image": np.zeros((8, 8, 3), np.uint8), "caption": "x"}, None)


def test_export_layout_and_reload(tmp_path):
  """``--mode export``: LaViDa's layout in bf16 (the demo's 4-head tower is not so400m-shaped,
  so its ``vision_config`` is written too; never an image token id) and a reload."""
  system = tiny_system()
  params = random_params(system, seed=3)
  path = system.modes()["export"](params, str(tmp_path))      # --mode export
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  assert hf["model_type"] == "llava_llada" and hf["mm_projector_type"] == "mlp2x_gelu"
  assert hf["image_aspect_ratio"] == "anyres" and hf["mm_spatial_pool_mode"] == "bilinear"
  assert hf["vision_config"]["num_attention_heads"] == 4 and "image_token_index" not in hf
  with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
    names = set(f.keys())
    assert all(str(f.get_tensor(k).dtype) == "bfloat16" for k in names)
  for name in ("model.transformer.wte.weight", "model.transformer.blocks.0.q_proj.weight",
               "model.transformer.blocks.0.ff_proj.weight", "model.transformer.ff_out.weight",
               "model.mm_projector.0.weight", "model.mm_projector.2.bias",
               "model.image_newline",
               "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
    assert name in names, name
  assert os.path.exists(os.path.join(path, "tokenizer.json"))
  model, loaded = load_export(path)
  no_extra = lambda c: dataclasses.replace(c, hf_extra="{}")
  assert no_extra(model.config) == no_extra(system.model_cfg)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
  ours, theirs = _flat(rounded), _flat(loaded)
  assert set(ours) == set(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  batch = shapes_batch(system, 2, rng=None)
  apply = jax.jit(lambda p: model.apply({"params": p}, batch["tokens"], batch["images"],
                                        batch["image_index"]))
  np.testing.assert_allclose(np.asarray(apply(loaded)), np.asarray(apply(rounded)), atol=1e-6)

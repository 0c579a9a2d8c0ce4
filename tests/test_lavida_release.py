"""LaViDa's checkpoints as released: the layout (no vision_config, no image token id, a tower
already cut to its feature layer, bf16) read by ``mmjax.interop.load`` against a PyTorch
forward built from the same tensors, as the start of training (``model.init_from``), and
written back by ``--mode export``."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from mmjax import interop
from mmjax.errors import ConfigError, MissingCheckpoint
from mmjax.interop import CheckpointMismatchError, hf as hf_io
from mmjax.systems.lavida import checkpoint as lc
from mmjax.systems.lavida import data as ld
from mmjax.systems.lavida.model import vision_tower_config

from lavida_helpers import (RELEASE_PINPOINTS, RELEASE_TILE, reference_logits, shapes_batch,
                            tiny_system, write_release)

TEXT = [3, 4, -200, 5, 6, 7]          # LaViDa's ids: the image at the -200 sentinel


def _tensors(path):
  with safe_open(str(path / "model.safetensors"), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_release_logits_match_torch(tmp_path, backbone):
  """``interop.load`` reads the release as it is: the tower's sizes from its tensors (2
  stored layers; ``mm_vision_select_layer: -2`` is not applied again), so400m's 16 heads,
  images at -200; logits equal LaViDa's forward in torch on the same bf16 weights. Saving
  writes the same tensors (names, bf16 values) and config fields back."""
  parts = write_release(tmp_path / "release", backbone)
  model, params = interop.load(str(tmp_path / "release"))
  cfg = model.config
  assert (cfg.vision.stack.num_layers, cfg.vision.stack.num_heads) == (2, 16)
  assert (cfg.vision.image_size, cfg.image_token_id, cfg.text.family) == (RELEASE_TILE, -200,
                                                                        backbone)
  geo = cfg.geometry
  assert geo.anyres and geo.pool and [list(r) for r in geo.resolutions] == RELEASE_PINPOINTS
  image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
  views, index = geo.views(image)                   # square: base + 2 x 2 grid, no padding
  assert (index != ld.PAD_INDEX).all() and len(index) == 4 + 4 * 5
  k = TEXT.index(-200)
  tokens = np.array([TEXT[:k] + [-200] * len(index) + TEXT[k + 1:]])
  ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens, views[None], index[None]))[0]
  ref = reference_logits(parts, TEXT, views[:5], shift=backbone == "dream")
  diff = float(np.abs(ours - ref).max())
  print(f"lavida-{backbone} release logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  interop.save(model, params, str(tmp_path / "out"), dtype=jnp.bfloat16)
  theirs, back = _tensors(tmp_path / "release"), _tensors(tmp_path / "out")
  assert set(back) == set(theirs)
  for name, x in theirs.items():
    assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes(), name
  release = json.loads((tmp_path / "release" / "config.json").read_text())
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert "vision_config" not in written and "image_token_index" not in written
  assert {k: written[k] for k in release} == release


def test_tower_config_counts_the_stored_layers():
  """Sizes from the shapes, the depth from the stored layer indices, so400m's image size
  where its position count agrees; heads that cannot divide the width are an error."""
  v = lc.VISION_PREFIX
  shapes = {v + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
            v + "embeddings.position_embedding.weight": (729, 1152)}
  shapes.update({f"{v}encoder.layers.{i}.mlp.fc1.weight": (4304, 1152) for i in range(26)})
  tower = lc.tower_config({"mm_vision_select_layer": -2}, shapes)
  assert (tower["num_hidden_layers"], tower["image_size"], tower["num_attention_heads"]) == (
      26, 384, 16)
  assert lc.tower_is_implied(vision_tower_config(tower))
  with pytest.raises(CheckpointMismatchError, match="1000 wide.*16 heads"):
    lc.tower_config({}, dict(shapes, **{v + "embeddings.patch_embedding.weight":
                                        (1000, 3, 14, 14)}))
  del shapes[f"{v}encoder.layers.3.mlp.fc1.weight"]
  with pytest.raises(CheckpointMismatchError, match="non-contiguous"):
    lc.tower_config({}, shapes)
  with pytest.raises(CheckpointMismatchError, match="no vision tower"):
    lc.tower_config({}, {})


def test_training_starts_from_a_release(tmp_path):
  """``--config.model.init_from=DIR``: the architecture, grid pinpoints and every parameter
  come from the release (the tower's last layer is not cut again); the loss runs on it;
  ``--mode export`` writes the release layout back (bf16, same names, no vision_config,
  no image token id). Wrong directories are one-line errors."""
  write_release(tmp_path / "release", "llada")
  system = tiny_system(f"--config.model.init_from={tmp_path / 'release'}",
                       "--config.model.init=pretrained")
  _, loaded = interop.load(str(tmp_path / "release"))
  assert system.model_cfg.vision.stack.num_layers == 2
  assert [list(r) for r in system.geometry.resolutions] == RELEASE_PINPOINTS
  params = system.init_params(jax.random.PRNGKey(0))
  ours, want = hf_io.flat_params(params), hf_io.flat_params(loaded)
  assert set(ours) == set(want)
  for name in want:
    np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(want[name]), err_msg=name)
  loss, _ = jax.jit(system.loss)(params, shapes_batch(system, 2), jax.random.key(0))
  assert np.isfinite(float(loss))
  out = pathlib.Path(system.modes()["export"](params, str(tmp_path / "work")))
  theirs, back = _tensors(tmp_path / "release"), _tensors(out)
  assert set(back) == set(theirs)
  assert all(back[k].tobytes() == theirs[k].tobytes() for k in theirs)
  written = json.loads((out / "config.json").read_text())
  assert written["model_type"] == "llava_llada" and written["mm_vision_select_layer"] == -2
  assert "vision_config" not in written and "image_token_index" not in written
  with pytest.raises(MissingCheckpoint, match="model.init_from"):
    tiny_system(f"--config.model.init_from={tmp_path / 'absent'}")
  write_release(tmp_path / "dream", "dream")
  with pytest.raises(ConfigError, match="dream backbone"):
    tiny_system(f"--config.model.init_from={tmp_path / 'dream'}")
  (tmp_path / "llm").mkdir()
  (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llada"}))
  with pytest.raises(interop.UnknownModelFormat, match="not a LaViDa checkpoint.*'llada'"):
    tiny_system(f"--config.model.init_from={tmp_path / 'llm'}")

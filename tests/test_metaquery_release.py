"""MetaQuery checkpoints in the authors' layout (what their trainer's ``save_pretrained``
writes): ``mmjax.interop.load`` and ``--config.model.init_from`` read them -- the prompt
layout, the condition and the samples equal a PyTorch reference of their model on the same
tensors (metaquery_release_helpers) --, ``--mode export`` / ``release.save_release`` write them
back byte-equal; broken directories are one-line errors."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmjax import config as mcfg
from mmjax import interop
from mmjax.errors import MissingCheckpoint
from mmjax.interop import CheckpointMismatchError, hf as hf_io
from mmjax.systems.metaquery import release
from mmjax.systems.metaquery.bridge import MetaQueryModel, broadcast_qk_gains
from mmjax.systems.metaquery.prompt import PromptFormat
from mmjax.systems.metaquery.system import MetaQuery

import metaquery_release_helpers as H
from metaquery_helpers import CONFIG, ROOT, TINY

CAPTIONS = ["two red circle left of a blue square", "a green circle"]
EMBED = "model.mllm_backbone.language_model.model.embed_tokens.weight"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  path, parts = H.write_release(tmp_path_factory.mktemp("mq_release"))
  return path, parts, H.Reference(parts)


def _tensors(path):
  with safe_open(str(path / "model.safetensors"), "pt") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _bytes(t):
  return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same_checkpoint(theirs, back):
  """Same names, dtypes and bytes; config.json equal as a dict."""
  a, b = _tensors(theirs), _tensors(back)
  assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
  for k, t in a.items():
    assert b[k].dtype == t.dtype and _bytes(b[k]) == _bytes(t), k
  assert json.loads((back / "config.json").read_text()) == json.loads(
      (theirs / "config.json").read_text())


def _system(path, *more):
  cfg = mcfg.load(CONFIG + ":demo", [
      "--config.mllm.prompt=chat", "--config.model.init=pretrained",
      "--config.model.prompt_len=48", "--config.sample.flow_shift=3.0",
      "--config.sample.num_steps=6", "--config.sample.guidance=4.0", *more])
  with cfg.unlocked():
    cfg.model.init_from = str(path)
  return MetaQuery(cfg)


def test_load_gives_their_prompt_layout_and_condition(built, tmp_path):
  """interop.load: rows V, V+1 are the markers and V+2.. the queries; the vocabulary rows
  come from the release (not the base model); QK gains are [layers, heads, 64]; our chat
  prompt + markers + queries + <|im_end|> are their ids; the condition (final hidden states
  between the markers, through the Sequential connector) equals theirs. save_release writes
  the same bytes back (bf16 DiT, fp32 rest)."""
  path, parts, ref = built
  model, params = interop.load(str(path))
  cfg = model.config
  assert (cfg.num_queries, cfg.text.vocab_size, cfg.connector.num_layers,
          cfg.connector.head_dim, cfg.autoencoder, cfg.resolution) == (4, 64, 2, 64, "dc_ae", 16)
  emb = parts["tensors"][EMBED].numpy()
  np.testing.assert_array_equal(params["markers"], emb[64:66])
  np.testing.assert_array_equal(params["queries"], emb[66:])
  lm_embed = params["mllm"]["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(lm_embed, emb[:64])
  assert not np.allclose(lm_embed, parts["mllm"].get_input_embeddings().weight.detach().numpy())
  gain = params["connector"]["encoder"]["layers"]["self_attn"]["q_gain"]
  assert gain.shape == (2, 2, 64)
  np.testing.assert_array_equal(
      gain[1], parts["tensors"]["model.connector.0.layers.1.self_attn.q_norm.gamma"][:, 0])
  assert ref.boi == 64 and ref.eoi == 65          # their tokens land on rows V, V+1, V+2..

  fmt = PromptFormat("chat", 48, 256, str(parts["mllm_dir"]))
  captions = CAPTIONS + [""]
  ids, mask = fmt.encode_batch(captions)
  for row, m, want in zip(ids, mask, H.layout_ids(ref, captions)):
    assert [int(i) for i in row[m]] + [int(i) for i in fmt.suffix_ids] == want
  ours = np.asarray(jax.jit(lambda p, i, m: model.apply(
      {"params": p}, i, m, method=MetaQueryModel.condition))(params, ids, mask))
  want = ref.condition(captions).numpy()
  diff = float(np.abs(ours - want).max())
  print(f"metaquery release condition max abs diff {diff:.2e} (|cond| ~ {np.abs(want).mean():.2f})")
  assert diff <= 1e-4 and np.abs(want).mean() > 0.1

  release.save_release(cfg, params, str(tmp_path / "back"))
  _same_checkpoint(path, tmp_path / "back")


def test_training_from_a_release_samples_like_their_model(built, tmp_path):
  """--config.model.init_from: architecture and every weight from the release (vision tower
  included), the samples (CFG with the empty prompt, DPM-Solver++ over flow sigmas, DC-AE
  decode) equal their loop's from the same noise; --mode export writes the mmjax export and
  the release layout byte-equal; the torch pipeline on that export gives the same image."""
  path, parts, ref = built
  system = _system(path)
  c = system.config
  assert (c.model.num_queries, c.data.resolution, c.decoder.autoencoder, c.mllm.family,
          system.latent_shape) == (4, 16, "dc_ae", "llava_onevision", (4, 4, 4))
  params = system.init_params(jax.random.PRNGKey(0))
  _, loaded = interop.load(str(path), scan_layers=False)
  ours, want = hf_io.flat_params(params), hf_io.flat_params(loaded)
  assert set(ours) == set(want) and any("vision_tower" in k for k in ours)
  for k in want:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(want[k]), err_msg=k)

  noise = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  ids, mask = system.prompts.encode_batch(CAPTIONS)
  e_ids, e_mask = system.prompts.encode_batch(["", ""])
  cond_fn = jax.jit(lambda i, m: system.apply(params, i, m, method=MetaQueryModel.condition))
  z = jax.jit(system.sample_latents, static_argnums=4)(
      params, cond_fn(ids, mask), cond_fn(e_ids, e_mask), noise, 4.0)
  images = np.asarray(jax.jit(lambda z: system.apply(
      params, z, method=MetaQueryModel.decode_latents))(z))
  theirs = ref.sample(CAPTIONS, noise, 4.0, 6)
  diff = float(np.abs(images - theirs).max())
  print(f"metaquery release samples max abs diff {diff:.2e} (|image| max "
        f"{np.abs(theirs).max():.2f})")
  assert diff <= 1e-4 * max(1.0, float(np.abs(theirs).max()))

  out = system.modes()["export"](params, str(tmp_path / "work"))
  assert sorted(out) == ["bridge", "mllm", "readme", "release", "transformer", "vae"]
  _same_checkpoint(path, tmp_path / "work" / "export" / "release")
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import metaquery_to_torch as mqt  # pylint: disable=import-outside-toplevel
  pipe = mqt.Pipeline(str(tmp_path / "work" / "export"))
  torch_images = pipe(CAPTIONS, noise=noise)
  diff = float(np.abs(torch_images - images).max())
  print(f"metaquery release -> torch pipeline image max abs diff {diff:.2e}")
  assert diff <= 1e-4 * max(1.0, float(np.abs(images).max()))


def _variant(src, dst, config=None, drop=(), replace=None):
  """A copy of the release with config fields changed, tensors dropped or replaced."""
  dst.mkdir(parents=True)
  cfg = dict(json.loads((src / "config.json").read_text()), **(config or {}))
  (dst / "config.json").write_text(json.dumps(cfg))
  t = {k: v for k, v in _tensors(src).items() if k not in drop}
  t.update(replace or {})
  save_file({k: v.contiguous() for k, v in t.items()}, str(dst / "model.safetensors"))
  return dst


def test_broken_releases_are_one_line_errors(built, tmp_path):
  path, _, _ = built
  gamma = "model.connector.0.layers.0.self_attn.q_norm.gamma"
  cases = [
      (dict(config={"num_metaqueries": 5}), CheckpointMismatchError,
       r"embed_tokens has 70 rows; vocab_size 64 .* \+ num_metaqueries 5 \+ 2 markers = 71"),
      (dict(config={"mllm_id": "nobody/absent-mllm"}), MissingCheckpoint,
       r"mllm_id = 'nobody/absent-mllm'.*download it"),
      (dict(drop=("model.connector.4.weight",)), CheckpointMismatchError,
       r"connector does not fit .*missing: model.connector.4.weight"),
      (dict(replace={gamma: torch.ones(2, 64)}), CheckpointMismatchError,
       r"mis-shaped: model.connector.0.layers.0.self_attn.q_norm.gamma \(2, 64\) "
       r"\(expected \(2, 1, 64\)\)"),
      (dict(config={"connector_num_hidden_layers": 3}), CheckpointMismatchError,
       r"3 layers .*missing: model.connector.0.layers.2"),
  ]
  for i, (kw, err, pattern) in enumerate(cases):
    bad = _variant(path, tmp_path / f"bad{i}", **kw)
    with pytest.raises(err, match=pattern) as e:
      interop.load(str(bad))
    assert "\n" not in str(e.value), str(e.value)
  with pytest.raises(MissingCheckpoint, match="model.init_from"):
    _system(tmp_path / "absent")
  with pytest.raises(interop.UnknownModelFormat, match="not a MetaQuery checkpoint"):
    _system(built[1]["mllm_dir"])


def test_demo_exports_the_layout_and_reads_it_back(tmp_path):
  """The CPU demo (text-only Qwen2, pixel latents) in the authors' layout: its
  architectures embedded (no hub names), V + N + 2 rows, no lm_head; interop.load gives the
  same params and save_release the same bytes. Old per-head scalar QK gains broadcast."""
  cfg = mcfg.load(CONFIG + ":demo", TINY)
  with cfg.unlocked():
    cfg.model.export_layout = "release"
  system = MetaQuery(cfg)
  params = H.random_params(system, 1)
  out = system.modes()["export"](params, str(tmp_path))
  written = json.loads((tmp_path / "export" / "config.json").read_text())
  assert written["model_type"] == "metaquery" and written["pixel_patch"] == 4
  assert {"mllm_config", "transformer_config"} <= set(written) and "vae_config" not in written
  t = _tensors(tmp_path / "export")
  assert t["model.mllm_backbone.model.embed_tokens.weight"].shape == (64 + 4 + 2, 32)
  assert not any("lm_head" in k for k in t)
  assert t["model.connector.0.layers.0.self_attn.q_norm.gamma"].shape == (2, 1, 16)
  assert t["model.transformer.proj_out.weight"].dtype == torch.bfloat16
  model, loaded = interop.load(out, scan_layers=False)
  ours, back = hf_io.flat_params(params), hf_io.flat_params(loaded)
  assert set(ours) == set(back)
  for k in ours:   # the DiT went through bf16 (as their trainer stores it)
    tol = 1e-2 * float(np.abs(np.asarray(ours[k])).max()) if k.startswith("dit/") else 0.0
    np.testing.assert_allclose(np.asarray(back[k]), np.asarray(ours[k]), atol=tol, err_msg=k)
  release.save_release(model.config, loaded, str(tmp_path / "again"))
  _same_checkpoint(tmp_path / "export", tmp_path / "again")

  gains = {"connector": {"encoder": {"layers_0": {"self_attn": {
      "q_gain": np.array([2.0, 3.0]), "k_gain": np.ones((2, 16))}}}}}
  fixed = broadcast_qk_gains(gains, system.conn_cfg)["connector"]["encoder"]["layers_0"]
  np.testing.assert_array_equal(fixed["self_attn"]["q_gain"], np.repeat([[2.0], [3.0]], 16, 1))
  assert fixed["self_attn"]["k_gain"].shape == (2, 16)
  shutil.rmtree(tmp_path / "again")


def test_sd15_kl_layout_round_trips(tmp_path):
  """SD1.5-style parts (UNet ``model.transformer.*`` in fp32, KL ``vae.*``, loss_type diff)
  are written and read back exactly."""
  cfg = mcfg.load(CONFIG + ":demo,sd15", TINY + ["--config.decoder.autoencoder=kl"])
  with cfg.unlocked():
    cfg.model.export_layout = "release"
  system = MetaQuery(cfg)
  params = H.random_params(system, 2)
  out = system.modes()["export"](params, str(tmp_path / "sd15"))
  written = json.loads((tmp_path / "sd15" / "export" / "config.json").read_text())
  assert written["loss_type"] == "diff" and written["vae_config"]["_class_name"] == "AutoencoderKL"
  assert _tensors(tmp_path / "sd15" / "export")["model.transformer.conv_in.weight"].dtype == \
      torch.float32
  _, loaded = interop.load(out, scan_layers=False)
  ours, back = hf_io.flat_params(params), hf_io.flat_params(loaded)
  assert set(ours) == set(back)
  for k in ours:
    np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(ours[k]), err_msg=k)


def test_a_vision_tower_never_built_comes_from_the_base_mllm(built, tmp_path):
  """A text-to-image run never builds its LLaVA-OneVision vision tower; writing the layout
  (whose MLLM holds one) takes it and the projector from ``mllm.path``."""
  _, parts, _ = built
  cfg = mcfg.load(CONFIG + ":demo", [
      "--config.mllm.family=llava_onevision", f"--config.mllm.path={parts['mllm_dir']}",
      "--config.mllm.prompt=chat", "--config.model.prompt_len=48",
      "--config.model.num_queries=4", "--config.model.connector_layers=1"])
  with cfg.unlocked():
    cfg.model.export_layout = "release"
  system = MetaQuery(cfg)
  params = H.random_params(system, 3)
  assert "vision_tower" not in params["mllm"]                # text-to-image: never built
  system.modes()["export"](params, str(tmp_path / "t2i"))
  t = _tensors(tmp_path / "t2i" / "export")
  base = parts["mllm"].state_dict()
  for name, want in base.items():
    if "vision_tower" in name or "multi_modal_projector" in name:
      np.testing.assert_array_equal(t["model.mllm_backbone." + H.to_449(name)].numpy(),
                                    want.numpy(), err_msg=name)
  assert t[EMBED].shape == (64 + 4 + 2, 128)

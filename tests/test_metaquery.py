"""MetaQuery's bridge: the prompt layout (left padding, causal queries, post-norm states), the
connector as the spec states it, the paper config (shapes, missing checkpoints named,
pretrained weights loaded) and its presets. Training: test_metaquery_train.py; sampling:
test_metaquery_sampling.py."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as mcfg
from mmjax.errors import ConfigError, MissingCheckpoint, UnknownPreset
from mmjax.models.lm import DecoderLM
from mmjax.systems.metaquery.bridge import Connector, ConnectorConfig, MetaQueryModel
from mmjax.systems.metaquery.prompt import PromptFormat
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG, tiny


@pytest.fixture(scope="module")
def system():
  return tiny()


@pytest.fixture(scope="module")
def params(system):
  return system.init_params(jax.random.PRNGKey(0))


def _states(system, params, captions, prompt_len=None):
  prompts = system.prompts if prompt_len is None else PromptFormat("plain", prompt_len, 6)
  ids, mask = prompts.encode_batch(captions)
  fn = jax.jit(lambda p, i, m: system.apply(p, i, m, method=MetaQueryModel.query_states))
  return np.asarray(fn(params, ids, mask))


# ----------------------------------------------------------------------------- the bridge
def test_prompt_is_left_padded_with_markers_after_it(system):
  ids, mask = system.prompts.encode("a red circle")
  tok = system.prompts.tokenizer
  assert list(mask) == [False] * 4 + [True] * 4                 # <bos> a red circle
  assert ids[4] == tok.bos_id and tok.decode(ids) == "a red circle"
  e_ids, e_mask = system.empty_prompt                            # the unconditional prompt
  assert e_mask.sum() == 1 and e_ids[-1] == tok.bos_id
  assert list(system.prompts.suffix_ids) == [tok.eos_id]         # after <end_of_img>


def test_query_states_are_post_norm_hidden_states_of_the_unpadded_sequence(system, params):
  """Built by hand: [<bos> caption, begin, queries, end, <eos>] through the plain MLLM
  without padding; final-norm output at the query positions."""
  lm = DecoderLM(system.mllm_cfg)
  ids = np.asarray(system.prompts._head + system.prompts._encode("a blue square"))
  p = params["mllm"]
  emb = p["embed_tokens"]["embedding"]
  x = jnp.concatenate([emb[ids], params["markers"][:1], params["queries"],
                       params["markers"][1:], emb[system.prompts.suffix_ids]])[None]
  h = jax.jit(lambda p, x: lm.apply({"params": p}, inputs_embeds=x,
                                    method=DecoderLM.features))(p, x)
  want = np.asarray(h[0, len(ids) + 1:len(ids) + 1 + 4])
  got = _states(system, params, ["a blue square"])[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  longer = _states(system, params, ["a blue square"], prompt_len=12)[0]   # more padding
  np.testing.assert_allclose(longer, want, atol=1e-5)
  rms = np.sqrt((got ** 2).mean(-1))                  # final RMSNorm (unit scale at init)
  np.testing.assert_allclose(rms, 1.0, rtol=5e-3)


def test_queries_are_causal_and_receive_gradients_through_the_frozen_mllm(system, params):
  ids, mask = (jnp.asarray(a) for a in system.prompts.encode_batch(["two green triangles"]))

  def state(queries, i):
    p = {**params, "queries": queries}
    return system.apply(p, ids, mask, method=MetaQueryModel.query_states)[0, i].sum()

  grad = jax.jit(jax.grad(state), static_argnums=1)
  for i in range(4):
    g = np.abs(np.asarray(grad(params["queries"], i))).sum(-1)   # [N]
    assert (g[:i + 1] > 0).all() and (g[i + 1:] == 0).all()
  # and the caption reaches every query
  a, b = _states(system, params, ["a red circle", "a blue circle"])
  assert np.abs(a - b).min(-1).max() > 0 and np.abs(a - b).mean() > 1e-3


# ----------------------------------------------------------------------------- connector
def test_connector_is_the_spec_enc_proj():
  cfg = ConnectorConfig(kind="enc_proj", in_dim=64, out_dim=48, num_layers=2, head_dim=16)
  conn = Connector(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  p = nn.unbox(jax.jit(conn.init)(jax.random.key(1), x)["params"])
  np.testing.assert_allclose(p["out_norm"]["scale"], math.sqrt(5.5), rtol=1e-6)
  attn = p["encoder"]["layers_0"]["self_attn"] if "layers_0" in p["encoder"] else \
      jax.tree.map(lambda a: a[0], p["encoder"]["layers"]["self_attn"])
  assert attn["q_proj"]["kernel"].shape == (64, 4, 16)          # D/64-style heads, no GQA
  assert attn["k_proj"]["kernel"].shape == (64, 4, 16)
  assert not np.any(attn["q_proj"]["bias"]) and "q_gain" in attn and "k_gain" in attn
  k = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p["encoder"])
                      if a.ndim >= 2 and a.size > 1000])
  assert abs(k.std() - 0.014) < 0.002                          # N(0, 0.014)
  assert p["projection"]["fc1"]["kernel"].shape == (64, 48)
  assert p["projection"]["fc2"]["kernel"].shape == (48, 48)
  mlp = jax.tree.map(lambda a: a[0], p["encoder"]["layers"]["mlp"])
  assert mlp["gate_proj"]["kernel"].shape == (64, 256)          # SwiGLU 4D
  # bidirectional: the first output depends on the last input
  jac = jax.jit(jax.grad(lambda x: conn.apply({"params": p}, x)[0, 0].sum()))(x)
  assert np.abs(np.asarray(jac[0, -1])).sum() > 0


@pytest.mark.parametrize("kind,width,lo,hi", [("enc_proj", 896, 3.10e8, 3.22e8),
                                              ("proj_enc", 2304, 1.9e9, 2.1e9)])
def test_connector_parameter_counts_match_the_paper(kind, width, lo, hi):
  """Enc-Proj at D=896 ~316M; Proj-Enc at 2304 ~2.0B (24 layers, C=2304)."""
  cfg = ConnectorConfig(kind=kind, in_dim=896, out_dim=2304, num_layers=24)
  shapes = jax.eval_shape(Connector(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 256, 896), jnp.float32))
  n = sum(math.prod(a.shape) for a in jax.tree.leaves(nn.unbox(shapes)))
  assert cfg.encoder().d_model == width and lo < n < hi, n


# ----------------------------------------------------------------------------- paper config
def test_paper_config_names_missing_checkpoints_and_points_to_demo(tmp_path):
  with pytest.raises(MissingCheckpoint) as e:
    MetaQuery(mcfg.load(CONFIG))
  msg = str(e.value)
  for name in ("mllm.path", "decoder.dit_path", "decoder.ae_path", "configs/metaquery.py:demo"):
    assert name in msg
  assert set(e.value.missing) == {"mllm.path", "decoder.dit_path", "decoder.ae_path"}
  # a directory without config.json is missing too, and named with its path; the pixel
  # decoder needs no autoencoder checkpoint
  (tmp_path / "mllm").mkdir()
  (tmp_path / "mllm" / "config.json").write_text("{}")
  with pytest.raises(MissingCheckpoint) as e:
    MetaQuery(mcfg.load(CONFIG, [f"--config.mllm.path={tmp_path / 'mllm'}",
                                 f"--config.decoder.dit_path={tmp_path}",
                                 "--config.decoder.autoencoder=pixels"]))
  assert e.value.missing == {"decoder.dit_path": str(tmp_path)} and str(tmp_path) in str(e.value)
  with pytest.raises(ConfigError, match="model.init"):
    MetaQuery(mcfg.load(CONFIG, ["--config.model.init=pretrianed"]))


def test_paper_config_shapes():
  """MetaQuery-B, abstractly: 256 queries at 896, ~316M connector, Sana-1.6B, frozen LM."""
  system = MetaQuery(mcfg.load(CONFIG, ["--config.model.init=random"]))
  shapes = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))["params"]
  count = {k: sum(math.prod(a.shape) for a in jax.tree.leaves(nn.unbox(v)))
           for k, v in shapes.items()}
  assert nn.unbox(shapes["queries"]).shape == (256, 896)
  assert 3.10e8 < count["connector"] < 3.22e8
  assert 1.55e9 < count["dit"] < 1.65e9
  assert 4.8e8 < count["mllm"] < 5.1e8           # Qwen2-0.5B (text side used for T2I)
  assert system.latent_shape == (16, 16, 32)
  mask = system.trainable_mask(shapes)
  assert not any(jax.tree.leaves(mask["mllm"])) and not any(jax.tree.leaves(mask["vae"]))
  assert all(jax.tree.leaves(mask["dit"])) and mask["queries"]
  assert system.flops_per_step(1) > 0


def test_pretrained_init_loads_the_checkpoints(tmp_path):
  """model.init=pretrained reads mllm.path (transformers) and decoder.dit_path (diffusers)."""
  from mmjax.interop import save_hf
  from mmjax.interop.diffusers_io import save_diffusers
  src = tiny()
  p = jax.device_get(src.init_params(jax.random.PRNGKey(7)))
  save_hf(DecoderLM(src.mllm_cfg), p["mllm"], str(tmp_path / "mllm"))
  save_diffusers(src.dit_cfg, p["dit"], str(tmp_path / "dit"))
  system = tiny("--config.model.init=pretrained", f"--config.mllm.path={tmp_path / 'mllm'}",
                f"--config.decoder.dit_path={tmp_path / 'dit'}")
  loaded = system.init_params(jax.random.PRNGKey(0))
  for group in ("mllm", "dit"):
    for a, b in zip(jax.tree.leaves(p[group]), jax.tree.leaves(loaded[group])):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(p["queries"], loaded["queries"])   # the bridge starts fresh


# ----------------------------------------------------------------------------- presets
def test_presets_combine_with_commas():
  """``demo,<task>`` in any order is ``demo_<task>``: the CPU demo's model with the task's
  inputs; a task alone is the paper stage; unknown, repeated or two tasks are refused."""
  demo_edit = mcfg.load(CONFIG + ":demo_edit")
  for spec in ("demo,edit", "edit,demo"):
    assert mcfg.load(f"{CONFIG}:{spec}").to_dict() == demo_edit.to_dict()
  demo, edit = mcfg.load(CONFIG + ":demo"), mcfg.load(CONFIG + ":edit")
  assert demo_edit.model.task == edit.model.task == "edit" and demo.model.task == "t2i"
  assert demo_edit.data.resolution == demo.data.resolution < edit.data.resolution
  with pytest.raises(UnknownPreset, match="did you mean 'demo'"):
    mcfg.load(CONFIG + ":dmeo")
  for bad in ("edit,instruct", "demo_edit,instruct", "demo,demo_edit"):
    with pytest.raises(ConfigError):
      mcfg.load(f"{CONFIG}:{bad}")

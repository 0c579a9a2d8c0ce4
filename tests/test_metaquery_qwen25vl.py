"""MetaQuery with a Qwen2.5-VL MLLM (``mllm.family='qwen2_5_vl'``, MetaQuery-L / -XL):
the query states (the MLLM's final hidden states at the query positions, which feed the
connector) equal transformers' Qwen2_5_VLForConditionalGeneration run the authors' way --
their embedding grown to V + N + 2 rows (begin, end, queries), their ids, lm_head an
identity -- on a left-padded batch, text-to-image and with input images (M-RoPE on the
image grid); the authors' checkpoint layout with a Qwen2.5-VL MLLM round-trips; the L / XL
presets build."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax import config as mcfg
from mmjax.interop.subtree import load_into
from mmjax.models import qwen2_5_vl as qvl
from mmjax.systems.metaquery.bridge import MetaQueryModel
from mmjax.systems.metaquery.system import MetaQuery

from metaquery_helpers import CONFIG
from qwen_vl_helpers import QWEN_VL_TEMPLATE, tiny_qwen_vl

N = 4                                   # queries
IMAGE, VSTART, VEND, V = 120, 121, 122, 128
WORDS = ["<unk>", "\n", "a", "red", "blue", "green", "circle", "square", "two", "left", "of",
         "system", "user", "assistant", "make", "it"]
SPECIALS = {"<|endoftext|>": 100, "<|im_start|>": 101, "<|im_end|>": 102, "<|image_pad|>": IMAGE,
            "<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|video_pad|>": 123}
IMAGE_SETTINGS = dict(image_size=84, image_min_pixels=56 * 56, image_max_pixels=28 * 28 * 24)


def write_mllm(path):
  """The tiny random Qwen2.5-VL (transformers) + a word tokenizer with Qwen's specials at
  their config ids + the Qwen2.5-VL Instruct chat template."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  model = tiny_qwen_vl(path)
  vocab = {w: i for i, w in enumerate(WORDS)}
  vocab.update(SPECIALS)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"\n|[^\s]+"), "removed",
                                           invert=True)
  tok.add_special_tokens(list(SPECIALS))
  tok.save(str(path / "tokenizer.json"))
  (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_TEMPLATE}))
  return model


@pytest.fixture(scope="module")
def mllm(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen25vl")
  return path, write_mllm(path)


def make_system(path, task="t2i", **model):
  cfg = mcfg.load(CONFIG + ":demo", [
      "--config.mllm.family=qwen2_5_vl", f"--config.mllm.path={path}",
      "--config.mllm.prompt=chat", f"--config.model.num_queries={N}",
      "--config.model.prompt_len=64", "--config.model.caption_tokens=16",
      "--config.model.connector_layers=1", "--config.model.connector_head_dim=16",
      f"--config.model.task={task}"])
  with cfg.unlocked():
    cfg.model.update(model)
  return MetaQuery(cfg)


def system_params(system, path):
  params = system.init_params(jax.random.key(0))
  params["mllm"] = load_into(params["mllm"], "hf", str(path),
                             scan_layers=system.config.scan_layers)
  return params


def reference_states(model, params, ids, mask, pixel_values=None, grid_thw=None):
  """The authors' computation: embed_tokens grown by [begin, end, queries] rows (their
  token order), ``prompt + <begin> <img0..> <end> <|im_end|>`` ids, lm_head an identity,
  the states strictly between the markers."""
  ref = copy.deepcopy(model).eval()
  ref.resize_token_embeddings(V + N + 2, mean_resizing=False)
  emb = ref.get_input_embeddings().weight
  with torch.no_grad():
    emb[V:V + 2] = torch.tensor(np.asarray(params["markers"]))
    emb[V + 2:] = torch.tensor(np.asarray(params["queries"]))
  ref.lm_head = torch.nn.Identity()
  b = ids.shape[0]
  block = np.asarray([V] + [V + 2 + i for i in range(N)] + [V + 1, SPECIALS["<|im_end|>"]])
  full = np.concatenate([ids, np.broadcast_to(block, (b, len(block)))], axis=1)
  fmask = np.concatenate([mask, np.ones((b, len(block)), bool)], axis=1)
  tids = torch.tensor(full, dtype=torch.long)
  kw = {}
  if pixel_values is not None:
    kw = dict(pixel_values=pixel_values, image_grid_thw=grid_thw,
              mm_token_type_ids=(tids == IMAGE).int())
  with torch.no_grad():
    h = ref(input_ids=tids, attention_mask=torch.tensor(fmask).long(), **kw).logits.numpy()
  p = ids.shape[1]
  return h[:, p + 1:p + 1 + N]


def test_text_to_image_query_states_match_transformers(mllm):
  path, model = mllm
  system = make_system(path)
  assert isinstance(system.mllm_cfg, qvl.Qwen25VLConfig)
  params = system_params(system, path)
  captions = ["two red circle left of a blue square", "a green circle"]
  ids, mask = system.prompts.encode_batch(captions)
  assert (~mask[1]).sum() > (~mask[0]).sum() > 0                # left padded, unequally
  # our prompt is their template: system prompt, user caption, generation prompt, "\n"
  assert list(ids[1][mask[1]][-4:]) == [101, WORDS.index("assistant"), 1, 1]
  assert list(system.prompts.suffix_ids) == [SPECIALS["<|im_end|>"]]
  ours = np.asarray(system.apply(params, jnp.asarray(ids), jnp.asarray(mask),
                                 method=MetaQueryModel.query_states))
  ref = reference_states(model, params, ids, mask)
  diff = float(np.abs(ours - ref).max())
  print(f"qwen2.5-vl t2i query states max abs diff {diff:.2e} (|h| up to {np.abs(ref).max():.1f})")
  assert ours.shape == (2, N, 48) and diff <= 1e-4
  cond = system.apply(params, jnp.asarray(ids), jnp.asarray(mask),
                      method=MetaQueryModel.condition)
  assert cond.shape == (2, N, system.dit_cfg.caption_channels)


def test_edit_task_query_states_with_images_match_transformers(mllm):
  """Source images through the Qwen2.5-VL tower, spliced at ``<|image_pad|>``, M-RoPE on
  their grid: equal to transformers' forward (its get_rope_index) on a left-padded batch."""
  path, model = mllm
  system = make_system(path, "edit", **IMAGE_SETTINGS)
  imgs = system.images
  assert imgs.grid == (1, 6, 6) and imgs.tokens_per_image == 9
  params = system_params(system, path)
  rng = np.random.default_rng(0)
  sources = [rng.integers(0, 256, (100, 120, 3), dtype=np.uint8),
             rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)]
  records = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "caption": c,
              "source_image": s}
             for c, s in zip(["make it a red square left of a blue circle", "make it green"],
                             sources)]
  from mmjax.systems.metaquery import tasks
  ex = [tasks.preprocess(system, r) for r in records]
  ids = np.stack([e["prompt_ids"] for e in ex])
  mask = np.stack([e["prompt_mask"] for e in ex])
  views = np.stack([e["input_views"] for e in ex])             # [2, 1, 36, 1176]
  assert views.shape == (2, 1, 36, 1176) and (ids == IMAGE).sum(1).tolist() == [9, 9]
  assert (~mask[1]).sum() > (~mask[0]).sum() > 0
  ours = np.asarray(system.apply(params, jnp.asarray(ids), jnp.asarray(mask),
                                 jnp.asarray(views), method=MetaQueryModel.query_states))
  # the reference processor on the same 84 px crops
  from mmjax.data import image as image_ops
  crops = [image_ops.resize_crop(s, 84, "bicubic") for s in sources]
  proc = transformers.Qwen2VLImageProcessorPil(
      size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 24})
  ref_in = proc(images=crops, return_tensors="pt")
  np.testing.assert_allclose(views.reshape(-1, 1176), ref_in["pixel_values"].numpy(), atol=1e-6)
  ref = reference_states(model, params, ids, mask, ref_in["pixel_values"],
                         ref_in["image_grid_thw"])
  diff = float(np.abs(ours - ref).max())
  print(f"qwen2.5-vl edit query states max abs diff {diff:.2e} (|h| up to "
        f"{np.abs(ref).max():.1f})")
  assert diff <= 1e-4
  # a black source image changes the states (the image reaches the queries)
  black = np.broadcast_to(imgs.black, views.shape)
  other = np.asarray(system.apply(params, jnp.asarray(ids), jnp.asarray(mask),
                                  jnp.asarray(black), method=MetaQueryModel.query_states))
  assert np.abs(other - ours).max() > 1e-3


def test_release_layout_with_qwen25vl_round_trips(mllm, tmp_path):
  """--mode export in the authors' layout with a Qwen2.5-VL MLLM: ``model.mllm_backbone.
  visual.*`` (the tower, read from mllm.path: a text-to-image run never built it) and
  ``model.mllm_backbone.model.*`` with V + N + 2 embedding rows, no lm_head; transformers'
  model loaded from those tensors (4.49 names) computes the query states of the model
  ``interop.load`` reads back; save_release writes the same bytes."""
  from safetensors import safe_open
  from mmjax import interop
  from mmjax.systems.metaquery import release
  path, model = mllm
  system = make_system(path)
  params = system_params(system, path)
  out = release.export_release(system, params, str(tmp_path / "release"))
  with safe_open(f"{out}/model.safetensors", "pt") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  mllm_keys = [k[len(release.MLLM):] for k in tensors if k.startswith(release.MLLM)]
  assert any(k.startswith("visual.blocks.") for k in mllm_keys)
  assert any(k.startswith("model.layers.") for k in mllm_keys)
  assert not any("lm_head" in k for k in mllm_keys)
  emb = tensors[release.MLLM + "model.embed_tokens.weight"].numpy()
  assert emb.shape == (V + N + 2, 48)
  np.testing.assert_array_equal(emb[V:V + 2], np.asarray(params["markers"]))
  np.testing.assert_array_equal(emb[V + 2:], np.asarray(params["queries"]))
  config = json.loads((tmp_path / "release" / "config.json").read_text())
  assert config["mllm_id"] == str(path) and config["num_metaqueries"] == N

  back, bparams = interop.load(out)
  assert isinstance(back.config.mllm, qvl.Qwen25VLConfig)
  ids, mask = system.prompts.encode_batch(["a red circle left of two blue square", "a"])
  ours = np.asarray(back.apply({"params": bparams}, jnp.asarray(ids), jnp.asarray(mask),
                               method=MetaQueryModel.query_states))
  # their MLLM from the release's tensors (transformers-4.49 names -> today's)
  ref = copy.deepcopy(model).eval()
  ref.resize_token_embeddings(V + N + 2, mean_resizing=False)
  ref.lm_head = torch.nn.Identity()
  rename = lambda k: ("model.visual." + k[7:] if k.startswith("visual.")
                      else "model.language_model." + k[6:])
  state = {rename(k[len(release.MLLM):]): t for k, t in tensors.items()
           if k.startswith(release.MLLM)}
  missing, unexpected = ref.load_state_dict(state, strict=False)
  assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing, unexpected)
  b = ids.shape[0]
  block = np.asarray([V] + [V + 2 + i for i in range(N)] + [V + 1, SPECIALS["<|im_end|>"]])
  full = np.concatenate([ids, np.broadcast_to(block, (b, len(block)))], axis=1)
  fmask = np.concatenate([mask, np.ones((b, len(block)), bool)], axis=1)
  with torch.no_grad():
    h = ref(input_ids=torch.tensor(full, dtype=torch.long),
            attention_mask=torch.tensor(fmask).long()).logits.numpy()
  p = ids.shape[1]
  diff = float(np.abs(ours - h[:, p + 1:p + 1 + N]).max())
  print(f"release (qwen2.5-vl) query states vs transformers max abs diff {diff:.2e}")
  assert diff <= 1e-4
  mine = np.asarray(system.apply(params, jnp.asarray(ids), jnp.asarray(mask),
                                 method=MetaQueryModel.query_states))
  np.testing.assert_allclose(ours, mine, atol=1e-5)       # scanned vs unrolled layers
  cond = lambda m, p_: np.asarray(m.apply({"params": p_}, jnp.asarray(ids), jnp.asarray(mask),
                                          method=MetaQueryModel.condition))
  np.testing.assert_allclose(cond(back, bparams), cond(system.model, params), atol=1e-5)

  release.save_release(back.config, bparams, str(tmp_path / "again"))
  with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
    again = {k: f.get_tensor(k) for k in f.keys()}
  assert set(again) == set(tensors)
  for k, t in tensors.items():
    assert again[k].dtype == t.dtype and torch.equal(again[k], t), k


def test_l_and_xl_presets():
  """The paper's sizes: Qwen2.5-VL-3B (width 2048) / 7B (3584), the connector at that width,
  the spec's learning rates, the real checkpoints' architecture."""
  for name, d, layers, lr, end in (("l", 2048, 36, 1e-4, 1e-5), ("xl", 3584, 28, 5e-5, 1e-6)):
    cfg = mcfg.load(f"{CONFIG}:{name}", ["--config.model.init=random"])
    system = MetaQuery(cfg)
    text, vis = system.mllm_cfg.text, system.mllm_cfg.vision
    assert (text.stack.d_model, text.stack.num_layers, text.stack.rope_sections) == (
        d, layers, (16, 24, 24))
    assert (vis.stack.num_layers, vis.stack.d_model, vis.out_dim, vis.fullatt_blocks,
            vis.window_size) == (32, 1280, d, (7, 15, 23, 31), 112)
    assert (system.conn_cfg.in_dim, system.conn_cfg.out_dim) == (d, 2304)
    assert cfg.optim.lr == lr and abs(cfg.optim.lr * cfg.optim.end_lr_ratio - end) < 1e-12
    assert system.flops_per_step(1) > 0
  edit = MetaQuery(mcfg.load(f"{CONFIG}:xl,edit", ["--config.model.init=random"]))
  assert edit.images.grid == (1, 36, 36) and edit.images.tokens_per_image == 324
  assert edit.config.model.prompt_len >= 320 + 324
  # the frozen ViT (~0.67B params) forward on 36 x 36 patches: ~2 * params * patches
  from mmjax.systems.metaquery import flops
  vis = flops.qwen25vl_vision_flops(edit.mllm_cfg.vision, (1, 36, 36), 1)
  assert 1.5e12 < vis < 1.9e12
  t2i = MetaQuery(mcfg.load(f"{CONFIG}:xl", ["--config.model.init=random"]))
  assert edit.flops_per_step(1) > t2i.flops_per_step(1) + vis
  with pytest.raises(Exception):
    mcfg.load(f"{CONFIG}:demo,xl")

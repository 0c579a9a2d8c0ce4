"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration (tiny random configs,
fp32): the image processor and resize rule, the chat format, M-RoPE positions, and logits
of a left-padded batch holding images of two different sizes, before and after export."""
import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from mmjax import core, interop
from mmjax.models import qwen2_5_vl as qvl
from mmjax.models import qwen2_5_vl_vision as qv

from qwen_vl_helpers import IMAGE, QWEN_VL_TEMPLATE, SETTINGS, VEND, VSTART, tiny_qwen_vl


def images():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)   # -> 112 x 140: 8 x 10 patches
  b = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)     # -> 56 x 84: 4 x 6 patches
  c = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
  return [a, b, c]


def hf_image_processor():
  return transformers.Qwen2VLImageProcessorPil(
      size={"shortest_edge": SETTINGS.min_pixels, "longest_edge": SETTINGS.max_pixels})


def padded_batch(n_a, n_b):
  """Two left-padded rows: row 0 holds image a, row 1 image b then image c (a's size)."""
  rows = [[5, 6, VSTART] + [IMAGE] * n_a + [VEND, 7, 8, 9],
          [10, VSTART] + [IMAGE] * n_b + [VEND, 11, VSTART] + [IMAGE] * n_a + [VEND, 12]]
  length = max(map(len, rows)) + 1
  ids, mask = np.zeros((2, length), np.int64), np.zeros((2, length), bool)
  for r, row in enumerate(rows):
    ids[r, length - len(row):], mask[r, length - len(row):] = row, True
  return ids, mask


def reference_logits(model, ids, mask, ref_in):
  tids = torch.tensor(ids)
  with torch.no_grad():
    return model(input_ids=tids, attention_mask=torch.tensor(mask).long(),
                 pixel_values=ref_in["pixel_values"], image_grid_thw=ref_in["image_grid_thw"],
                 mm_token_type_ids=(tids == IMAGE).int()).logits.numpy()


def test_logits_of_a_padded_batch_with_two_image_sizes_match_transformers(tmp_path):
  ref_model = tiny_qwen_vl(tmp_path / "ref")
  module, params = interop.load(str(tmp_path / "ref"))
  cfg = module.config
  assert cfg.vision.fullatt_blocks == (1,) and cfg.vision.window_tokens == 2
  assert cfg.text.stack.rope_sections == (2, 2, 2)
  ref_in = hf_image_processor()(images=images(), return_tensors="pt")
  pixels, grids = qvl.preprocess_images(images(), SETTINGS)
  assert grids == ((1, 8, 10), (1, 4, 6), (1, 8, 10))   # windows of 4 x 4 patches, partial ones
  np.testing.assert_array_equal(np.asarray(grids), ref_in["image_grid_thw"].numpy())
  np.testing.assert_allclose(pixels, ref_in["pixel_values"].numpy(), rtol=0, atol=1e-6)
  ids, mask = padded_batch(cfg.vision.num_tokens(grids[0]), cfg.vision.num_tokens(grids[1]))

  # M-RoPE positions and decode deltas: transformers' get_rope_index
  pos, delta = jax.jit(qvl.mrope_positions, static_argnums=(2, 3, 4))(ids, mask, grids, IMAGE, 2)
  tids = torch.tensor(ids)
  ref_pos, ref_delta = ref_model.model.get_rope_index(
      tids, (tids == IMAGE).int(), ref_in["image_grid_thw"], attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(np.asarray(pos), ref_pos.numpy())
  np.testing.assert_array_equal(np.asarray(delta), ref_delta.numpy()[:, 0])

  apply = jax.jit(functools.partial(module.apply, grids=grids))
  ours = np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels),
                          attention_mask=jnp.asarray(mask)))
  ref = reference_logits(ref_model, ids, mask, ref_in)
  diff = float(np.abs(ours - ref)[mask].max())
  print(f"qwen2.5-vl logits max abs diff {diff:.2e} (|logits| up to {np.abs(ref).max():.1f})")
  assert diff <= 1e-4

  # KV-cache decoding: prefill all but the last token, then that one at position k + delta
  # (k: its index among the row's real tokens)
  @jax.jit
  def prefill_then_step(params):
    cache = core.init_cache(cfg.text.stack, 2, ids.shape[1])
    _, cache = module.apply({"params": params}, ids[:, :-1], pixels, grids=grids,
                            attention_mask=mask, positions=pos[:, :, :-1], cache=cache)
    step = jnp.broadcast_to((mask.sum(1) - 1 + delta)[None, :, None], (3, 2, 1))
    logits, _ = module.apply({"params": params}, ids[:, -1:], attention_mask=mask,
                             positions=step, cache=cache)
    return logits[:, 0]

  np.testing.assert_allclose(np.asarray(prefill_then_step(params)), ours[:, -1], atol=1e-5)

  # export: transformers loads it and computes the same logits
  interop.save(module, params, str(tmp_path / "out"))
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      str(tmp_path / "out")).eval()
  again = reference_logits(back, ids, mask, ref_in)
  assert np.abs(again - ref)[mask].max() <= 1e-5


def test_processor_resize_rule_patches_and_chat_match_transformers(tmp_path):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  for h, w in [(40, 60), (100, 150), (10, 1000), (1000, 10), (3000, 4000), (28, 28),
               (517, 333), (2000, 20), (56, 9000)]:
    for lo, hi in [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 512 * 28 * 28)]:
      assert qvl.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w)
  with pytest.raises(ValueError):
    qvl.smart_resize(10, 2500)

  # the chat format: Qwen2-VL / Qwen2.5-VL checkpoints' template rendered by transformers
  import tokenizers
  from tokenizers import models, pre_tokenizers
  words = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", ".",
           "describe", "the", "picture", "cat"]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"min_pixels": SETTINGS.min_pixels, "max_pixels": SETTINGS.max_pixels}))
  proc = qvl.Processor.from_dir(str(tmp_path))
  assert proc.chat_template is None and proc.settings == SETTINGS
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  conversations = [
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
       {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
       {"role": "user", "content": "describe the picture"}],
      [{"role": "system", "content": "You are a cat ."},
       {"role": "user", "content": [{"type": "text", "text": "the"}, {"image": "x.png"},
                                    {"type": "video"}]}]]
  for messages in conversations:
    for gen in (True, False):
      assert proc.chat(messages, gen) == fast.apply_chat_template(
          messages, chat_template=QWEN_VL_TEMPLATE, tokenize=False, add_generation_prompt=gen)
  prompt = proc.chat(conversations[0])
  _, grids = proc.images(images()[:1])
  ids = proc.encode(prompt, grids)
  n = 8 * 10 // 4                       # transformers' processor: t * h * w / merge**2 pads
  ref_ids = fast(prompt.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
  np.testing.assert_array_equal(ids, ref_ids)


def test_hub_config_layout_reads_like_the_nested_one(tmp_path):
  """Hub checkpoints keep the text fields at the top level with ``rope_scaling: mrope``."""
  tiny_qwen_vl(tmp_path)
  nested = json.loads((tmp_path / "config.json").read_text())
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  flat.update({k: v for k, v in nested["text_config"].items() if k != "rope_parameters"})
  flat.update(rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
              model_type="qwen2_5_vl")
  vis = dict(flat["vision_config"])
  vis["in_chans"] = vis.pop("in_channels")
  vis.pop("rope_parameters")
  flat["vision_config"] = vis
  assert qvl.from_hf_config(flat) == qvl.from_hf_config(nested)
  assert qvl.to_hf_config(qvl.from_hf_config(nested))["text_config"]["rope_parameters"] == (
      nested["text_config"]["rope_parameters"])


def test_window_geometry():
  """Windows of 2 x 2 merged tokens (4 x 4 patches) over an 8 x 10 patch grid, in merge-block
  token order: 2 x 3 windows, the last column of windows 2 patches wide."""
  win = qv.window_ids((1, 8, 10), merge=2, window_tokens=2)
  pos = qv.patch_positions((1, 8, 10), merge=2)
  grid = np.zeros((8, 10), int)
  grid[pos[0], pos[1]] = win
  expected = (np.arange(8)[:, None] // 4) * 3 + np.arange(10)[None] // 4
  np.testing.assert_array_equal(grid, expected)
  assert list(pos[:, :4].T.tolist()) == [[0, 0], [0, 1], [1, 0], [1, 1]]   # one merge block
  assert qv.window_ids((2, 4, 4), 2, 2).tolist() == [0] * 16 + [1] * 16    # per frame


def test_core_multi_axis_rope_and_per_layer_masks():
  """M-RoPE with equal positions on every axis is RoPE; ``mask_choice`` picks each layer's
  mask the same way scanned and unrolled."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 12)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4], [3, 0, 0, 1, 2]])
  cfg = core.TransformerConfig(num_layers=3, d_model=16, num_heads=2, mlp_dim=32,
                               rope_sections=(2, 2), rope_axial=True)
  h = rng.normal(size=(2, 6, 16)).astype(np.float32)
  pos2 = np.stack([np.arange(6) // 3, np.arange(6) % 3])[:, None]          # [2, 1, 6]
  ids = np.arange(6) // 2
  masks = np.stack([np.ones((6, 6), bool), ids[:, None] == ids[None]])[:, None, None]
  choice = (1, 0, 1)
  stack = core.TransformerStack(cfg)
  unrolled = core.TransformerStack(cfg.replace(scan_layers=False))

  @jax.jit
  def run(x, h, masks):
    params = stack.init(jax.random.key(0), h, mask=masks, positions=pos2, mask_choice=choice)
    p = {"params": core.unstack_layer_params(params["params"], 3)}
    return (core.apply_rope(x, pos, 100.0, sections=(2, 2, 2)), core.apply_rope(x, pos, 100.0),
            stack.apply(params, h, mask=masks, positions=pos2, mask_choice=choice),
            unrolled.apply(p, h, mask=masks, positions=pos2, mask_choice=choice),
            stack.apply(params, h, mask=masks[0], positions=pos2))

  mrope, rope, y, y2, y3 = (np.asarray(a) for a in run(x, h, masks))
  np.testing.assert_allclose(mrope, rope, atol=1e-6)
  np.testing.assert_allclose(y, y2, atol=1e-5)
  assert np.abs(y - y3).max() > 1e-3                                      # the masks matter

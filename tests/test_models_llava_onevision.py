"""LLaVA-OneVision against transformers' LlavaOnevisionForConditionalGeneration with an
anyres image in the prompt (unpadding, and the shrink path with ``anyres_max_1``)."""
import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from mmjax.interop import load_hf, save_hf
from mmjax.models import anyres

from reference_models import TEMPLATE

PINS = [[28, 28], [28, 56], [56, 28], [56, 56]]
IMAGE_TOKEN = 60


def tiny_llava(path, aspect="anyres_max_9", seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlavaOnevisionConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, image_size=28, patch_size=7,
                         vision_use_head=False),
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
      image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINS, vision_aspect_ratio=aspect,
      vision_feature_layer=-2)
  model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.15)
  model.save_pretrained(path)
  return model


def hf_pixels(image):
  proc = transformers.LlavaOnevisionImageProcessorPil(
      size={"height": 28, "width": 28}, image_grid_pinpoints=PINS, image_mean=[0.5] * 3,
      image_std=[0.5] * 3)
  return proc(images=[image], return_tensors="pt")


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_logits_with_an_anyres_image_match_transformers(tmp_path, aspect):
  ref_model = tiny_llava(tmp_path, aspect)
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  module, params = load_hf(str(tmp_path))
  cfg = module.config
  assert cfg.vision.stack.num_layers == 2          # tower cut at vision_feature_layer=-2
  views, layout = anyres.image_views(image, cfg.grid_pinpoints, 28, cfg.vision.grid,
                                     cfg.max_views)
  assert layout.num_views == 5 and (layout.resize_to is None) == (aspect == "anyres_max_9")
  ref_in = hf_pixels(image)
  pixels = ref_in["pixel_values"][0].permute(0, 2, 3, 1).numpy()     # [views, 28, 28, 3]
  ours_pixels = anyres.normalize(views)
  # PIL bicubic resizes, zero padding, (x - 0.5) / 0.5: the same pixels as the PIL backend
  print("preprocessing max abs diff", np.abs(ours_pixels - pixels).max())
  assert np.abs(ours_pixels - pixels).max() <= 1e-6
  n = layout.num_tokens
  ids = np.array([[1, 2] + [IMAGE_TOKEN] * n + [3, 4, 5]])
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), pixel_values=ref_in["pixel_values"],
                    image_sizes=ref_in["image_sizes"]).logits.numpy()
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels),
                                 layouts=(layout,)))
  diff = float(np.abs(ours - ref).max())
  print(f"llava-onevision {aspect} ({n} image tokens) logits max abs diff {diff:.2e}")
  assert diff <= 1e-4
  if aspect == "anyres_max_1":
    return
  save_hf(module, params, str(tmp_path / "out"))
  back = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
      str(tmp_path / "out")).eval()
  with torch.no_grad():
    again = back(input_ids=torch.tensor(ids), pixel_values=ref_in["pixel_values"],
                 image_sizes=ref_in["image_sizes"]).logits.numpy()
  assert np.abs(again - ref).max() <= 1e-5




def test_processor_matches_transformers(tmp_path):
  """tokenizer.json + chat template + <image> expansion equal LlavaOnevisionProcessor's."""
  import json
  import tokenizers
  from tokenizers import models, pre_tokenizers
  from mmjax.models.llava_onevision import Processor
  words = ["<unk>", "user", "assistant", "describe", "the", "picture", "a", "cat"]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  proc = Processor.from_dir(str(tmp_path))
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "describe the picture"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  _, layout = anyres.image_views(image, PINS, 28, 4, 9)
  prompt = proc.chat(messages)
  ids = proc.encode(prompt, [layout])

  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  assert prompt == fast.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                            add_generation_prompt=True)
  # the processor's token count (it cannot be built here: no torchvision for its video part)
  ref_proc = object.__new__(transformers.LlavaOnevisionProcessor)
  ref_proc.image_processor = transformers.LlavaOnevisionImageProcessorPil(
      size={"height": 28, "width": 28}, image_grid_pinpoints=PINS)
  ref_proc.num_image_tokens, ref_proc.vision_aspect_ratio = 16, "anyres_max_9"
  n = ref_proc._get_number_of_features(40, 60, 28, 28)
  ref_ids = fast(prompt.replace("<image>", "<image>" * n))["input_ids"]
  np.testing.assert_array_equal(ids, ref_ids)
  assert (ids == proc.image_token_id).sum() == layout.num_tokens == n == 70

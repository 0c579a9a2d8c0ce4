"""A tiny random transformers Qwen2.5-VL and the chat template its Instruct checkpoints ship,
shared by the Qwen2.5-VL tests."""
import torch
import transformers

from mmjax.models import qwen2_5_vl as qvl

IMAGE, VSTART, VEND = 120, 121, 122
SETTINGS = qvl.ImageSettings(min_pixels=56 * 56, max_pixels=28 * 28 * 24)


# the chat template Qwen2-VL / Qwen2.5-VL Instruct checkpoints ship (reference data)
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_vl(path, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.Qwen2_5_VLConfig(
      vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                         out_hidden_size=48, window_size=56, fullatt_block_indexes=[1]),
      text_config=dict(vocab_size=128, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 2, 2]}),
      image_token_id=IMAGE, video_token_id=123, vision_start_token_id=VSTART,
      vision_end_token_id=VEND)
  model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.1)
  model.save_pretrained(path)
  return model

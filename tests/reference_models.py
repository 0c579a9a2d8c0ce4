"""Reference models and inputs shared by the parity tests (not a test module): tiny random
transformers models saved to a directory, the padded inputs they are run on, and helpers
that compare our logits with theirs."""
import numpy as np
import torch
import transformers

IDS = np.array([[3, 4, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12]])      # row 1 left padded
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
POS = np.clip(MASK.cumsum(-1) - 1, 0, None)                      # generate's convention


def tiny_qwen2(path, tie: bool, seed: int = 0, **kw):
  """Saves a random Qwen2ForCausalLM (GQA 4/2 heads, biases) to ``path``; returns it."""
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
      rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, rms_norm_eps=1e-5, **kw)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.endswith("layernorm.weight") and not name.endswith("norm.weight"):
        p.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return model


def torch_logits(model, ids=IDS, mask=MASK, pos=POS):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()


def max_diff(ours, ref, mask=MASK):
  """Max |diff| over real (non-pad) positions."""
  d = np.abs(np.asarray(ours) - ref)
  return float(d[np.asarray(mask, bool)].max())


def bidirectional_mask(mask):
  """Additive ``[b, 1, s, s]`` mask hiding only padded keys (no causal part)."""
  keep = torch.tensor(mask, dtype=torch.bool)[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
  return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


# the chat template of the llava-hf LLaVA-OneVision checkpoints (images first, then text)
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

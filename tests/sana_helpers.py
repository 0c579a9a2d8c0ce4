"""A tiny random diffusers Sana DiT and its inputs, shared by the Sana tests."""
import diffusers
import numpy as np
import torch

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
            cross_attention_dim=32, caption_channels=24, sample_size=8)


def tiny_sana(path, seed=0, **kw):
  torch.manual_seed(seed)
  model = diffusers.SanaTransformer2DModel(**{**TINY, **kw}).eval()
  with torch.no_grad():   # random everything (zero-initialised tables and biases included)
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return model


def inputs(seed=0, b=2, h=8, w=8, c=4, n=6, cap=24):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  t = np.array([999.0, 137.5][:b], np.float32)
  caption = rng.normal(size=(b, n, cap)).astype(np.float32)
  mask = np.ones((b, n), np.int64)
  mask[0, 4:] = 0            # the first caption has two padding tokens
  mask[1, 1:3] = 0           # the second has holes in the middle
  return x, t, caption, mask

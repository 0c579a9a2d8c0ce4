"""Shapes-world image captioner: the foundation's smallest end-to-end training.

Default: a ~110M-parameter prefix-LM captioner at 64px for a TPU slice.
``:demo``: a tiny model that learns to caption 32px scenes on a 2-core CPU in minutes.

  python launch/tpu.py --config configs/captioner.py:demo --workdir /tmp/cap
  python launch/tpu.py --config configs/captioner.py --workdir gs://bucket/cap \
      --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from mmjax.config import base_config
from mmjax.errors import parse_presets


def get_config(arg=None):
  c = base_config()
  c.system = "captioner"
  c.seed = 0
  c.total_steps = 20000
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.dtype = "bfloat16"
  c.remat_policy = "dots"

  c.model = dict(
      num_layers=12,          # transformer layers
      d_model=768,            # width
      num_heads=12,
      num_kv_heads=4,         # GQA
      mlp_dim=3072,
      rope_theta=10000.0,
      patch_size=8,           # image patch side in pixels
      max_caption_len=24,     # tokens incl. <bos>/<eos>, right padded
  )
  c.data.resolution = 64
  c.data.batch_size = 256
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 1000
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.95

  presets = parse_presets(arg, ("demo",), "configs/captioner.py")
  if "demo" in presets:
    c.total_steps = 300
    c.log_every = 10
    c.checkpoint_every = 100
    c.dtype = "float32"
    c.remat_policy = "none"
    c.model.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=256,
                   patch_size=8)
    c.data.resolution = 32
    c.data.batch_size = 32
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.01
  return c

"""DualToken's RVQ tokenizer: one SigLIP tower, two residual-VQ vocabularies, a pixel decoder.

Default: the paper's tokenizer (the newer release): SigLIP2-so400m-patch14-384 (27 layers,
width 1152), pixel features = layer 6 + 0.6 x layer 4, semantic = layer 26, 8 depths of
16384 x 32 codes per vocabulary (shared across depths, EMA 0.99, dead-code restart), a VQGAN
decoder 128 x [1,1,4,4,8] from 24x24 to 384 px, LPIPS, a GroupNorm PatchGAN; batch 256,
AdamW 7.2e-5 betas (0.5, 0.9), wd 1e-4 (none on biases and norms), 10k warmup + cosine,
bf16 with the quantisers in fp32, RandomResizedCrop(0.9-1.0).
``:demo``: a tiny tower and codebooks on 32 px shapes-world images, trained on a 2-core CPU.

``:unified``: the unified autoregressive model (system ``dualtoken_unified``): Qwen2.5-3B
over text and both vocabularies of the frozen tokenizer (``config.tokenizer`` is the
tokenizer's own config), two 3-layer depth heads, 729 positions x 8 depths x 2 per 384 px
image, sequence 4096, text-to-image and image-to-text mixed 1:1, caption dropout 0.1, CFG 3,
top-k 900, top-p 0.96. ``:demo_unified``: trains a tiny tokenizer first (WORKDIR/tokenizer),
then a tiny Qwen2 on its codes; ShapesEval and caption accuracy, step 0 vs trained.

  python launch/tpu.py --config configs/dualtoken.py:demo --workdir /tmp/dualtoken
  python launch/tpu.py --config configs/dualtoken.py --workdir gs://bucket/dt \\
      --config.model.siglip_path=/ckpt/siglip2-so400m-patch14-384 \\
      --config.model.lpips_vgg_path=/ckpt/vgg16.pth \\
      --config.data.source=array_record --config.data.path='/data/cc12m-*.array_record'
  python launch/aot.py --config configs/dualtoken.py --topology v5p:4x4x4 \\
      --config.model.init=random --config.mesh.fsdp=-1 --config.mesh.data=1
  python launch/tpu.py --config configs/dualtoken.py:demo_unified --workdir /tmp/dtu
  python launch/tpu.py --config configs/dualtoken.py:unified --workdir gs://bucket/dtu \\
      --config.model.lm_path=/ckpt/Qwen2.5-3B --config.model.tokenizer_workdir=gs://bucket/dt
"""
from ml_collections import ConfigDict

from mmjax.config import base_config
from mmjax.errors import parse_presets

PRESETS = ("demo", "no_restart", "first_release", "unified", "demo_unified")

# SigLIP2-so400m-patch14-384 (transformers SiglipVisionConfig fields)
SIGLIP2_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=384, patch_size=14,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


# Qwen2.5-3B (transformers Qwen2Config fields): the unified model's language model
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                 max_position_embeddings=32768)


def get_config(arg=None):
  presets = set(parse_presets(arg, PRESETS, "configs/dualtoken.py"))
  if presets & {"unified", "demo_unified"}:
    return unified_config(presets)
  return tokenizer_config(presets)


def tokenizer_config(presets):
  c = base_config()
  c.system = "dualtoken"
  c.total_steps = 200_000
  c.log_every = 50
  c.checkpoint_every = 2000
  c.dtype = "bfloat16"
  c.remat_policy = "full"
  c.model = ConfigDict(dict(
      # random (everything drawn, LPIPS's VGG too unless lpips_vgg_path is set: for AOT and
      # smoke tests) | siglip (tower from siglip_path) | release (tokenizer from release_path)
      init="siglip",
      siglip_path="",            # transformers SigLIP / SigLIP2 directory
      release_path="",           # the authors' release: config dir + epoch_N.pt
      lpips_vgg_path="",         # torchvision VGG16 state dict (.pth / .safetensors)
      lpips_lin_path="",         # lpips heads (vgg.pth of the lpips package); "" = shipped
      vision_config=SIGLIP2_SO400M,
      pixel_layer=6, shortcut_layer=4, shortcut_scale=0.6, semantic_layer=26,
      depths=8, decay=0.99, eps=1e-5, restart_dead_codes=True,
      pixel=dict(codebook_size=16384, dim=32, ema_schedule="per_depth"),   # the release's rq
      semantic=dict(codebook_size=16384, dim=32, ema_schedule="joint"),    # its rq_ema
      distance_chunk=8192,       # rows per chunk of the nearest-code search (per batch shard)
      search_block=0,            # 0: argmax over all codes (TPU/GPU); see models/rvq.py
      decoder=dict(ch=128, ch_mult=[1, 1, 4, 4, 8], num_res_blocks=2, attn_resolutions=[24],
                   in_channels=1024, latent=24, num_groups=32),
      disc=dict(ndf=64, n_layers=3, num_groups=32),
      crop_scale=(0.9, 1.0),     # RandomResizedCrop area range; (0, 0): resize + centre crop
  ))
  c.loss = ConfigDict(dict(
      semantic_feature=5.0, semantic_pooled=1.0, commit=5.0, recon=5.0, lpips=1.0, gan=0.75,
      disc=0.75, gan_start=20_000, adaptive_min=0.3, adaptive_max=10.0, hinge_slope=0.01))
  c.eval = ConfigDict(dict(num_images=256))
  c.sample = ConfigDict(dict(num_images=16))
  c.data.resolution = 384
  c.data.batch_size = 256
  c.optim.update(lr=7.2e-5, b1=0.5, b2=0.9, weight_decay=1e-4, warmup_steps=10_000,
                 schedule="cosine", end_lr_ratio=0.0, clip_norm=0.0)
  c.optim.groups.disc = ConfigDict(dict(lr=7.2e-5, b1=0.5, b2=0.9, weight_decay=0.0,
                                        warmup_steps=0, schedule="constant"))

  if "first_release" in presets:   # SigLIP-so400m, no shortcut, 32768 x 256 codes
    c.model.shortcut_scale = 0.0
    c.model.pixel.update(codebook_size=32768, dim=256)
    c.model.semantic.update(codebook_size=32768, dim=256)
  if "no_restart" in presets:
    c.model.restart_dead_codes = False
  if "demo" in presets:
    c.total_steps = 2500
    c.log_every = 50
    c.checkpoint_every = 500
    c.dtype = "float32"
    c.remat_policy = "none"
    c.scan_layers = False
    c.model.update(init="random", pixel_layer=2, shortcut_layer=1, semantic_layer=4,
                   depths=4, distance_chunk=0, search_block=-1, crop_scale=(0.0, 0.0))
    c.model.vision_config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                                 num_attention_heads=4, image_size=32, patch_size=4,
                                 layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    c.model.pixel.update(codebook_size=256, dim=8)
    c.model.semantic.update(codebook_size=256, dim=8)
    c.model.decoder = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=0, attn_resolutions=[8],
                           in_channels=64, latent=8, num_groups=8)
    c.model.disc = dict(ndf=16, n_layers=2, num_groups=8)
    c.loss.update(lpips=0.0, gan_start=1800)   # no VGG weights here: LPIPS off
    c.eval.num_images = 128
    c.data.resolution = 32
    c.data.batch_size = 16
    c.optim.update(lr=1e-3, warmup_steps=100, end_lr_ratio=0.1, weight_decay=1e-4)
    c.optim.groups.disc.update(lr=2e-4)
  return c


def unified_config(presets):
  """The unified model: Qwen2.5 over text and both vocabularies of a frozen tokenizer
  (``config.tokenizer``: the tokenizer's own config, its presets applied)."""
  demo = "demo_unified" in presets
  c = base_config()
  c.system = "dualtoken_unified"
  c.tokenizer = tokenizer_config(presets & {"demo", "no_restart", "first_release"}
                                 | ({"demo"} if demo else set()))
  c.tokenizer.loss.lpips = 0.0   # the tokenizer is frozen here: no VGG needed
  # its weights come from model.tokenizer_workdir (or tokenizer.model.init=release with
  # tokenizer.model.release_path); random only for AOT / smoke runs with lm_init=random
  c.tokenizer.model.init = "random"
  c.total_steps = 100_000
  c.log_every = 50
  c.checkpoint_every = 2000
  c.dtype = "bfloat16"
  c.remat_policy = "full"
  c.model = ConfigDict(dict(
      lm_init="pretrained",       # pretrained (model.lm_path) | random (model.lm_config)
      lm_path="",                 # transformers Qwen2.5 directory (weights, tokenizer.json)
      lm_config=QWEN25_3B,        # used when lm_init=random (vocab_size 0 = the tokenizer's)
      # the frozen tokenizer: an mmjax tokenizer run (its checkpoints; "" = the tokenizer
      # config's own init: model.init=release with release_path for the authors' release)
      tokenizer_workdir="",
      train_tokenizer=False,      # train config.tokenizer into WORKDIR/tokenizer first (demo)
      code_embed_dim=1024,        # each vocabulary's code-embedding width
      head=dict(width=1024, layers=3, heads=16, mlp_dim=4096),   # each depth head
      seq_len=4096,               # training sequence length (text budget = seq_len - N - 4)
      question="",                # text after the image in image-to-text examples
  ))
  c.text = ConfigDict(dict(
      tokenizer="",               # tokenizer.json directory ("" = model.lm_path) | shapes
      bos="", eos="<|endoftext|>", pad="<|endoftext|>", boi="<|vision_start|>",
      eoi="<|vision_end|>"))
  c.mix = ConfigDict(dict(t2i_ratio=0.5, caption_dropout=0.1))
  c.loss = ConfigDict(dict(text=1.0, pixel=1.0, semantic=1.0))
  c.sample = ConfigDict(dict(cfg_scale=3.0, temperature=1.0, top_k=900, top_p=0.96,
                             caption_temperature=0.0, max_new_tokens=64, num_images=16,
                             seed=0))
  c.eval = ConfigDict(dict(num_prompts=128, num_captions=128,
                           categories="single_object,colors"))
  c.data.resolution = c.tokenizer.data.resolution
  c.data.batch_size = 256
  c.data.pretokenized = False     # records carry pixel_codes / semantic_codes (pretokenize)
  c.optim.update(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=2000,
                 schedule="cosine", end_lr_ratio=0.1, clip_norm=1.0)

  if demo:   # a tiny Qwen2 over the shapes-world words, on the tokenizer demo's codes
    c.total_steps = 1200
    c.log_every = 50
    c.checkpoint_every = 600
    c.dtype = "float32"
    c.remat_policy = "none"
    c.scan_layers = False
    c.tokenizer.total_steps = 700
    c.tokenizer.checkpoint_every = 700
    c.model.update(lm_init="random", train_tokenizer=True, code_embed_dim=64, seq_len=80)
    c.model.lm_config = dict(vocab_size=0, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                             tie_word_embeddings=True)
    c.model.head = dict(width=64, layers=2, heads=4, mlp_dim=128)
    c.text.update(tokenizer="shapes", bos="<bos>", eos="<eos>", pad="<pad>", boi="<boi>",
                  eoi="<eoi>")
    c.sample.update(max_new_tokens=10, num_images=16)
    c.eval.update(num_prompts=64, num_captions=64)
    c.data.categories = "single_object,colors"
    c.data.batch_size = 16
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.0, end_lr_ratio=0.1)
  return c

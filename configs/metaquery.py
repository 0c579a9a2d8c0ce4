"""MetaQuery (query bridge): learnable queries through a frozen MLLM into a Sana DiT.

Default: MetaQuery-B text-to-image pretraining -- LLaVA-OneVision-0.5B (frozen) + 256 queries
+ Enc-Proj connector (24 layers at 896, ~316M) + Sana-1.6B 512px (trainable) with its DC-AE
(frozen); AdamW (0.9, 0.95), wd 0.1, clip 0.5, lr 1e-4 -> 1e-5 cosine, warmup 5000, bf16.
It needs the pretrained checkpoints (directories in transformers / diffusers format):

  python launch/tpu.py --config configs/metaquery.py --workdir gs://bucket/mq \
      --config.mllm.path=/ckpt/llava-onevision-qwen2-0.5b-ov-hf \
      --config.decoder.dit_path=/ckpt/Sana_1600M_512px_diffusers/transformer \
      --config.decoder.ae_path=/ckpt/Sana_1600M_512px_diffusers/vae \
      --config.data.source=array_record --config.data.path='/data/pairs-*.array_record'

``:demo``: a CPU-sized run on the shapes world. The frozen "MLLM" is a tiny *random-init*
Qwen2 language model over the shapes-world word tokenizer (text-to-image needs only the text
side of the MLLM); the DiT works on 32px pixels (space-to-depth 4x4, no autoencoder). It
trains in minutes, then writes samples and ShapesEval of step 0 vs trained:

  python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mq

Image tasks (``model.task``; mmjax/systems/metaquery/tasks.py): ``:reconstruct``, ``:edit``,
``:instruct`` are MetaQuery-B's later stages (image(s) through the MLLM's vision tower,
three-way CFG at sampling); ``:demo_reconstruct``, ``:demo_edit``, ``:demo_instruct`` (also
written ``:demo,edit`` or ``:edit,demo``) are the CPU demo with a tiny random LLaVA-OneVision
and shapes-world task data (mmjax/data/shapes_tasks.py: recolour / move / remove edits,
compositions of objects picked from 1..3 source images):

  python launch/tpu.py --config configs/metaquery.py:demo_edit --workdir /tmp/mq_edit
  python launch/tpu.py --config configs/metaquery.py:demo_edit --workdir /tmp/mq_edit \
      --mode sample        # samples/metaquery_edit.png: sources | generated | target

Presets combine with commas (``configs/metaquery.py:a,b``): at most one task
(reconstruct | edit | instruct), with or without ``demo``; ``demo_<task>`` = ``demo,<task>``.

``:sd15``: the paper's COCO-FID setting -- MetaQuery-B's bridge with 77 queries at caption
width 768 into a *frozen* Stable Diffusion 1.5 (UNet + KL autoencoder, 64x64x4 latents at
512px), trained by DDPM epsilon prediction with uniform t (text-to-image only); sampling
DPM-Solver++ 2M (``--config.sample.solver=ddim`` for DDIM), CFG 3.0. ``:demo,sd15`` is the
CPU demo's MLLM and bridge with a tiny trainable random UNet on 32px pixels:

  python launch/tpu.py --config configs/metaquery.py:sd15 --workdir gs://bucket/mq_sd15 \
      --config.mllm.path=/ckpt/llava-onevision-qwen2-0.5b-ov-hf \
      --config.decoder.unet_path=/ckpt/stable-diffusion-v1-5/unet \
      --config.decoder.ae_path=/ckpt/stable-diffusion-v1-5/vae

``:l`` / ``:xl``: MetaQuery-L / -XL -- Qwen2.5-VL-3B / 7B-Instruct as the frozen MLLM
(connector at width 2048 / 3584), otherwise B's recipe (lr 1e-4 -> 1e-5 / 5e-5 -> 1e-6);
they combine with the task presets (``:xl,edit``) and ``sd15``:

  python launch/tpu.py --config configs/metaquery.py:xl --workdir gs://bucket/mq_xl \
      --config.mllm.path=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.decoder.dit_path=/ckpt/Sana_1600M_512px_diffusers/transformer \
      --config.decoder.ae_path=/ckpt/Sana_1600M_512px_diffusers/vae

Compile-only pod check (no checkpoints needed):

  python launch/aot.py --config configs/metaquery.py --topology v5p:4x4x4 \
      --config.model.init=random --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from mmjax.config import base_config
from mmjax.errors import ConfigError, parse_presets

TASK_PRESETS = ("reconstruct", "edit", "instruct")
SIZE_PRESETS = ("l", "xl")      # MetaQuery-L / -XL: Qwen2.5-VL-3B / 7B (default: B)
PRESETS = (("demo", "sd15") + TASK_PRESETS + tuple(f"demo_{t}" for t in TASK_PRESETS)
           + SIZE_PRESETS)

# LLaVA-OneVision-0.5B (llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json, abridged):
# SigLIP-so400m tower cut at its last layer, Qwen2-0.5B, hidden 896. With ``mllm.path`` set,
# the checkpoint's own config.json is used instead.
LLAVA_OV_05B = dict(
    model_type="llava_onevision", image_token_index=151646, video_token_index=151647,
    projector_hidden_act="gelu", vision_feature_layer=-1,
    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    tie_word_embeddings=True,
    image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
    vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384,
                       intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26,
                       patch_size=14, layer_norm_eps=1e-6, vision_use_head=False),
    text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896,
                     intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
)
# Qwen2.5-VL-3B / 7B-Instruct (Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json, hub layout,
# abridged): the ViT (32 layers at 1280, windows of 112 px, full attention at 7/15/23/31,
# 2x2 merger to the LM width) and a Qwen2.5 LM with M-RoPE sections (16, 24, 24).
_QWEN25_VL_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
    hidden_act="silu", patch_size=14, spatial_patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2)
_QWEN25_VL_TEXT = dict(
    model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
    hidden_act="silu", max_position_embeddings=128000, max_window_layers=70,
    rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
    attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
    vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
    image_token_id=151655, video_token_id=151656,
    rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]))
QWEN25_VL_3B = dict(
    _QWEN25_VL_TEXT, vocab_size=151936, hidden_size=2048, intermediate_size=11008,
    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    tie_word_embeddings=True, vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=2048))
QWEN25_VL_7B = dict(
    _QWEN25_VL_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    tie_word_embeddings=False, vision_config=dict(_QWEN25_VL_VISION, out_hidden_size=3584))
# Sana-1.6B 512px transformer (diffusers SanaTransformer2DModel config): caption width 2304
SANA_1600M_512 = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
    num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
    cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=16)
# DC-AE f32c32 (Sana 1.0): 32x down, 32 latent channels, scaling 0.41407
DC_AE_F32C32 = dict(
    latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
    decoder_act_fns=["relu"] * 3 + ["silu"] * 3,
    upsample_block_type="interpolate", downsample_block_type="Conv", scaling_factor=0.41407)
# Stable Diffusion 1.5 (stable-diffusion-v1-5 unet/ and vae/ config.json): the UNet's cross-
# attention reads a [b, 77, 768] caption (CLIP's; here the connector's), the VAE maps 512px to
# 64x64x4 latents, scaled by 0.18215.
SD15_UNET = dict(
    in_channels=4, out_channels=4, sample_size=64, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.18215)


def get_config(arg=None):
  c = base_config()
  c.system = "metaquery"
  c.seed = 0
  c.total_steps = 8 * 25_000_000 // 4096   # 8 epochs of 25M pairs at global batch 4096
  c.log_every = 50
  c.checkpoint_every = 2000
  c.dtype = "bfloat16"
  c.remat_policy = "full"       # AOT v5p:4x4x4: "dots" needs 131 GiB/chip, "full" 30.5 GiB

  c.model = dict(
      init="pretrained",       # pretrained: load mllm.path / decoder.*_path | random
      num_queries=256,         # N learnable queries (+ begin/end markers)
      prompt_len=320,          # left-padded prompt tokens (template + caption)
      caption_tokens=256,      # the caption is truncated to this many tokens
      connector="enc_proj",    # enc_proj (paper default) | proj_enc (ablation)
      connector_layers=24,
      connector_head_dim=64,
      connector_rope_theta=10000.0,
      query_init_std=0.02,     # queries and markers start N(0, std)
      cond_dropout=0.1,        # caption -> "" (the empty prompt) for CFG; image tasks: image
                               # -> black (reconstruct, edit), instruct: 10% each of text /
                               # both / images dropped (mmjax/systems/metaquery/tasks.py)
      task="t2i",              # t2i | reconstruct | edit | instruct (input images: needs the
                               # llava_onevision MLLM; selects preprocessing, dropout, sampling)
      max_images=1,            # instruct: image slots per example (static; reconstruct/edit: 1)
      min_images=2,            # shapes-world instruct data: fewest source images (spec: 2..6)
      image_views="anyres",    # input images: anyres (LLaVA-OV processor on the 384 crop:
                               # 2 views, 1485 tokens) | single (base view: 730 tokens)
      init_from="",            # a MetaQuery checkpoint directory in the authors' layout
                               # (model.* + vae.*, model_type metaquery): architecture + weights
      export_layout="",        # --mode export: mmjax | release (the authors' layout) | both;
                               # "" = mmjax, or both for a run started from init_from
  )
  c.mllm = dict(
      family="llava_onevision",  # llava_onevision | qwen2_5_vl (:l, :xl) | qwen2 (text-only)
      path="",                   # transformers checkpoint directory (weights + tokenizer)
      tokenizer_dir="",          # tokenizer.json + chat template when not in `path`
      prompt="chat",             # chat (the MLLM's chat template) | plain (<bos> caption)
      hf_config=LLAVA_OV_05B,    # architecture when `path` is empty (random init / AOT)
  )
  c.decoder = dict(
      kind="sana",               # sana (DiT, flow matching) | sd15 (UNet, DDPM epsilon)
      dit=SANA_1600M_512,        # diffusers SanaTransformer2DModel config (when no dit_path)
      dit_path="",               # diffusers transformer/ directory
      unet=SD15_UNET,            # kind=sd15: diffusers UNet2DConditionModel config (no unet_path)
      unet_path="",              # kind=sd15: diffusers unet/ directory
      autoencoder="dc_ae",       # dc_ae (frozen DC-AE latents) | kl (frozen KL autoencoder,
                                 # posterior samples; SD1.5) | pixels (space-to-depth)
      ae=DC_AE_F32C32,           # diffusers AutoencoderDC / AutoencoderKL config (no ae_path)
      ae_path="",                # diffusers vae/ directory
      pixel_patch=4,             # autoencoder=pixels: space-to-depth factor
      trainable=True,            # the DiT trains (MetaQuery's Sana configs); False: frozen
  )                              # (the SD1.5 UNet is frozen in the paper)
  c.flow = dict(
      sigma_sampler="uniform_discrete",  # uniform_discrete | logit_normal | uniform
      num_levels=1000,           # quantise sigma to 1000 levels (0: continuous)
      shift=1.0,                 # training sigma shift (MetaQuery: none)
      logit_mean=0.0,
      logit_std=1.0,
  )
  c.ddpm = dict(                 # decoder.kind=sd15: the DDPM schedule (SD1.5's scheduler)
      beta_schedule="scaled_linear",     # scaled_linear | linear
      beta_start=0.00085,
      beta_end=0.012,
      num_train_timesteps=1000,  # training t is uniform over 0..999
      timestep_spacing="",       # sampling: "" = the solver's diffusers default (ddim: leading,
                                 # dpm_solver_2m: linspace) | leading | linspace | trailing
      steps_offset=1,
      set_alpha_to_one=False,    # ddim: the last step ends at abar_0, not 1
  )
  c.sample = dict(
      solver="dpm_solver_2m",    # dpm_solver_2m (DPM-Solver++ 2M) | ddim (decoder.kind=sd15)
      num_steps=30,              # solver steps
      flow_shift=3.0,
      guidance=7.5,              # CFG text scale (GenEval / DPG setting; 3.0 for FID)
      num_images=32,             # sample grid size
      image_guidance=1.5,        # CFG image scale (three-way CFG of the image tasks)
  )
  c.eval = dict(
      num_images=256,            # ShapesEval prompts (step 0 and trained)
      categories="",             # shapes categories ("" = data.categories, else all six)
  )
  c.data.resolution = 512
  c.data.batch_size = 4096
  c.optim.lr = 1e-4
  c.optim.end_lr_ratio = 0.1     # -> 1e-5
  c.optim.warmup_steps = 5000
  c.optim.schedule = "cosine"
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 0.5

  demo, task, sd15 = _presets(arg)
  size = _size_preset(arg)
  if size and demo:
    raise ConfigError(f"presets {arg!r} for configs/metaquery.py: {size} is a paper size, "
                      f"not a CPU demo")
  if size:
    _qwen25_vl(c, size)
  if demo:
    _demo(c)
  if sd15:
    if task:
      raise ConfigError(f"presets {arg!r} for configs/metaquery.py: sd15 is text-to-image only")
    (_demo_sd15 if demo else _sd15)(c)
  if task:
    (_demo_task if demo else _paper_task)(c, task)
  return c


def _presets(arg):
  """``(demo, task, sd15)`` of the comma-separated presets: ``demo_<task>`` is
  ``demo,<task>``; at most one task."""
  names = []
  for p in parse_presets(arg, PRESETS, "configs/metaquery.py"):
    names += ["demo", p[len("demo_"):]] if p.startswith("demo_") else [p]
  if len(set(names)) != len(names):
    raise ConfigError(f"presets {arg!r} for configs/metaquery.py name 'demo' twice")
  tasks = [p for p in names if p in TASK_PRESETS]
  if len(tasks) > 1:
    raise ConfigError(f"presets {arg!r} for configs/metaquery.py name {len(tasks)} tasks "
                      f"({', '.join(tasks)}); a run has one")
  return "demo" in names, (tasks[0] if tasks else None), "sd15" in names


def _size_preset(arg):
  """'l' | 'xl' | None (MetaQuery-B) of the comma-separated presets; at most one."""
  sizes = [p for p in parse_presets(arg, PRESETS, "configs/metaquery.py") if p in SIZE_PRESETS]
  if len(sizes) > 1:
    raise ConfigError(f"presets {arg!r} for configs/metaquery.py name {len(sizes)} sizes")
  return sizes[0] if sizes else None


def _qwen25_vl(c, size):
  """MetaQuery-L (``:l``, Qwen2.5-VL-3B, width 2048: connector ~1.62B) and -XL (``:xl``,
  Qwen2.5-VL-7B, width 3584: connector ~4.95B) -- the reference's qwen2p5vl{3b,7b}_sana.yaml:
  the same queries, connector depth and Sana decoder as B; lr 1e-4 -> 1e-5 (3B), 5e-5 ->
  1e-6 (7B), warmup 5000. Input images (image tasks) are squares of model.image_size px
  through Qwen2.5-VL's processor (256..1280 x 28^2 pixels: 512 px -> 324 tokens).
  --config.mllm.path=/ckpt/Qwen2.5-VL-{3B,7B}-Instruct loads the checkpoint (its own
  config.json, tokenizer and chat template)."""
  c.mllm.family = "qwen2_5_vl"
  c.mllm.hf_config = QWEN25_VL_3B if size == "l" else QWEN25_VL_7B   # replaced, not merged
  c.model.update(image_size=512, image_min_pixels=256 * 28 * 28,
                 image_max_pixels=1280 * 28 * 28)
  if size == "xl":
    c.optim.lr = 5e-5
    c.optim.end_lr_ratio = 1e-6 / 5e-5            # -> 1e-6


def _demo(c):
  """The CPU demo: a tiny random-init text MLLM, a 4-block DiT on 32px pixels, shapes world."""
  c.total_steps = 1200
  c.log_every = 25
  c.checkpoint_every = 600
  c.dtype = "float32"
  c.remat_policy = "none"
  c.scan_layers = False        # XLA:CPU runs the backward of scanned stacks slowly
  c.model.update(init="random", num_queries=16, prompt_len=8, caption_tokens=6,
                 connector_layers=2, connector_head_dim=32)
  # The frozen "MLLM": a random-init 2-layer Qwen2 over the shapes-world word tokenizer
  # (text-to-image only needs the text side). Its init std (0.3) makes it a more
  # caption-sensitive random feature map than the usual 0.02.
  c.mllm.update(family="qwen2", prompt="plain", hf_config=dict(
      model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
      initializer_range=0.3))
  # 32px pixels as 8x8x48 "latents" (no autoencoder); a 4-block Sana DiT at width 64 with
  # its optional sin-cos position table (a tiny DiT learns layouts much faster with it).
  c.decoder.update(autoencoder="pixels", pixel_patch=4, dit=dict(
      in_channels=48, out_channels=48, num_attention_heads=2, attention_head_dim=32,
      num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=32,
      cross_attention_dim=64, caption_channels=64, mlp_ratio=2.5, sample_size=8,
      interpolation_scale=1.0))
  c.flow.sigma_sampler = "logit_normal"   # SD3's density: faster than uniform on CPU budgets
  c.sample.update(num_steps=20, flow_shift=1.0, guidance=3.0, num_images=32)
  c.eval.update(num_images=128)
  c.data.resolution = 32
  c.data.batch_size = 32
  c.data.categories = "single_object,colors"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.01


def _sd15(c):
  """The paper's COCO-FID decoder: frozen SD1.5 UNet + KL autoencoder, 77 queries at caption
  width 768 (the connector's [b, 77, 768] is the UNet's encoder_hidden_states), DDPM epsilon
  loss with uniform t; everything else as MetaQuery-B (the bridge trains). FID's CFG 3.0."""
  c.model.num_queries = 77
  c.decoder.update(kind="sd15", autoencoder="kl", trainable=False)
  c.decoder.ae = SD15_VAE
  c.sample.guidance = 3.0


def _demo_sd15(c):
  """``demo,sd15``: the demo's tiny MLLM and bridge with a tiny random UNet (trainable: there
  are no SD1.5 weights on a laptop) on the demo's 32px pixels, the DDPM loss and DDPM
  samplers. ``decoder.ae`` is a tiny KL autoencoder for ``--config.decoder.autoencoder=kl``
  (random and frozen: plumbing checks only)."""
  c.decoder.update(kind="sd15", trainable=True, unet=dict(
      in_channels=48, out_channels=48, sample_size=8, block_out_channels=[64, 128],
      layers_per_block=1, attention_head_dim=2, cross_attention_dim=64, norm_num_groups=16,
      down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2))
  c.decoder.ae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                      block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                      down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2)


# Image tokens per input image of LLaVA-OneVision-0.5B on MetaQuery's 384x384 crop (anyres:
# base view 27*27 + the 1x1 grid picture 27 rows of 27 + newline).
LLAVA_OV_IMAGE_TOKENS = 27 * 27 + 27 * 28
# Qwen2.5-VL (:l, :xl) on a 512 px square: 504 px, 36 x 36 patches, 2 x 2 merged (+ the
# vision start / end markers, counted in the text budget).
QWEN25_VL_IMAGE_TOKENS = 18 * 18


def _paper_task(c, task):
  """MetaQuery-B stages after text-to-image pretraining (the reference's
  llavaov0p5_sana_{edit,inst}.yaml): the same model; prompts grow by the image tokens
  (text budget 320 + 1485 per image, rounded up to 64). Editing keeps the pretraining
  optimizer (lr 1e-4 -> 1e-5, warmup 5000); instruction tuning: lr 5e-5 -> 1e-6, warmup
  2000, 10 epochs of the 2.4M mined pairs, 2..6 source images. Start from a text-to-image
  checkpoint (the bridge and DiT weights) in practice."""
  c.model.task = task
  images = 6 if task == "instruct" else 1
  text = 64 if task == "reconstruct" else 320        # template (+ caption) budget
  c.model.max_images = images
  per_image = (QWEN25_VL_IMAGE_TOKENS if c.mllm.family == "qwen2_5_vl"
               else LLAVA_OV_IMAGE_TOKENS)
  c.model.prompt_len = -(-(text + images * per_image) // 64) * 64
  if task == "instruct":
    c.model.min_images = 2
    c.total_steps = 10 * 2_400_000 // 4096
    c.optim.lr = 5e-5
    c.optim.end_lr_ratio = 1e-6 / 5e-5            # -> 1e-6
    c.optim.warmup_steps = 2000


def _demo_task(c, task):
  """The CPU demo with an image task. The frozen "MLLM" becomes a tiny random-init
  LLaVA-OneVision: the demo's Qwen2 text side (same sizes, same init) behind a 2-layer
  SigLIP tower on 32px images (patch 8: 16 features + 1 newline per image, ``single`` view)
  and the 2-layer projector. Prompts use the shapes-world word tokenizer extended by the
  instruction words (`mmjax.data.shapes_tasks.EXTRA_WORDS`, 59 ids < the vocabulary of 64);
  its ``<image>`` (id 5) is the image placeholder."""
  text_cfg = c.mllm.hf_config.to_dict()          # the demo's Qwen2, whatever it is tuned to
  c.mllm.update(family="llava_onevision", prompt="plain", hf_config=dict(
      model_type="llava_onevision", image_token_index=5, projector_hidden_act="gelu",
      vision_feature_layer=-1, vision_feature_select_strategy="full",
      vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
      image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
      vision_config=dict(model_type="siglip_vision_model", hidden_size=64, image_size=32,
                         intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                         patch_size=8, layer_norm_eps=1e-6, vision_use_head=False),
      text_config=text_cfg))
  c.model.update(task=task, image_views="single")
  if task == "reconstruct":
    c.model.update(prompt_len=24, caption_tokens=0)            # <bos> + 17 image tokens
  elif task == "edit":
    c.model.update(prompt_len=32, caption_tokens=8)            # "move the red circle left"
    c.data.categories = "single_object,two_object,colors"
  else:
    c.model.update(prompt_len=72, caption_tokens=16, max_images=3)
    c.model.min_images = 1
  c.sample.image_guidance = 1.5

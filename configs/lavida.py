"""LaViDa (masked diffusion VLM): LaViDa-L = LLaDA-8B-Instruct + SigLIP-so400m-patch14-384.

Presets (comma-separated): ``stage1`` (projector only, single view, no pooling, lr 1e-3,
batch 256), ``stage2`` (the default: everything, LLM 2e-5 / vision 2e-6, batch 128, warmup
3%, cosine to 0.1x, bf16), ``stage3`` (stage 2 + FIM insertion), ``dream`` (LaViDa-D: Dream-7B
backbone), ``demo`` (a tiny random-init model on the shapes world, CPU). The paper settings
need the pretrained checkpoints:

  python launch/tpu.py --config configs/lavida.py:stage2 --workdir gs://bucket/lavida \
      --config.model.llm_path=/ckpt/LLaDA-8B-Instruct \
      --config.model.vision_path=/ckpt/siglip-so400m-patch14-384 \
      --config.data.source=array_record --config.data.path='/data/sft-*.array_record' \
      --config.total_steps=$((2 * NUM_EXAMPLES / 128))

``:demo`` trains in a few minutes on 2 CPU cores, then writes WORKDIR/eval/lavida_demo.json
and prints the speed / quality table (caption accuracy and latency per sample at NFE
100 / 50 / 25 %, cache none / prefix / dual, threshold decoding; step 0 vs trained):

  python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida
  python launch/tpu.py --config configs/lavida.py:demo --workdir /tmp/lavida --mode export

From a LaViDa checkpoint as released (or as ``--mode export`` writes it), e.g. stage 3 (FIM)
from LaViDa-L; its directory also gives the tokenizer:

  python launch/tpu.py --config configs/lavida.py:stage3 --workdir gs://bucket/lavida-fim \
      --config.model.init_from=/ckpt/lavida-llada-v1.0-instruct ...

Compile-only pod check (no checkpoints needed):

  python launch/aot.py --config configs/lavida.py:stage2 --topology v5p:4x4x4 \
      --config.model.init=random --config.mesh.fsdp=-1 --config.mesh.data=1
"""
from mmjax.config import base_config
from mmjax.errors import ConfigError, parse_presets

# LLaDA-8B-Instruct config.json (abridged; with model.llm_path its own config.json is used)
LLADA_8B = dict(
    model_type="llada", d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
    mlp_hidden_size=12288, vocab_size=126464, embedding_size=126464, rope_theta=500000.0,
    rms_norm_eps=1e-5, max_sequence_length=4096, weight_tying=False, include_bias=False,
    block_type="llama", activation_type="silu", layer_norm_type="rms", rope=True,
    mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)
# Dream-v0-Instruct-7B config.json (abridged; Qwen2.5-7B architecture)
DREAM_7B = dict(
    model_type="Dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=False, mask_token_id=151666)
# google/siglip-so400m-patch14-384 vision tower
SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, layer_norm_eps=1e-6)
PRESETS = ("stage1", "stage2", "stage3", "dream", "demo", "demo_long")


def get_config(arg=None):
  presets = parse_presets(arg, PRESETS, "configs/lavida.py")
  stages = [p for p in presets if p.startswith("stage")]
  if len(stages) > 1:
    raise ConfigError(f"pick one stage preset for configs/lavida.py, got {stages}")
  stage = int(stages[0][-1]) if stages else 2

  c = base_config()
  c.system = "lavida"
  c.seed = 0
  c.log_every = 50
  c.checkpoint_every = 1000
  c.dtype = "bfloat16"
  c.remat_policy = "dots"
  c.model = dict(
      stage=stage,               # 1 projector only | 2 everything | 3 everything + FIM
      backbone="llada",          # llada (LaViDa-L) | dream (LaViDa-D)
      init="pretrained",         # pretrained: load init_from, else llm_path / vision_path |
                                 # random (the architecture only, e.g. for AOT)
      init_from="",              # a LaViDa checkpoint (a release or --mode export): its LM,
                                 # tower, projector and grid pinpoints; then llm_path,
                                 # vision_path, llm_config, vision_config are unused
      llm_path="",               # LLaDA-8B-Instruct (or Dream-7B) transformers directory
      vision_path="",            # siglip-so400m-patch14-384 directory
      tokenizer_path="",         # tokenizer.json directory ("" = init_from, else llm_path)
      llm_config=LLADA_8B,       # architecture when llm_path is not used (random init / AOT)
      vision_config=SIGLIP_SO400M,
      vision_feature_layer=-2,   # SigLIP's penultimate layer
      anyres=True,               # base view + grid crops (False: the base view alone)
      pool=True,                 # bilinear 27 -> 14 per view after the projector
      prompt="llada",            # chat template: llada | dream | shapes (the demo)
      question="Describe the image.",  # user turn when a record has no 'question'
      max_prompt_text=128,       # prompt text tokens (template + question), left padded
      answer_len=256,            # answer slot: answer + supervised EOS padding
      extra_pad=(-128, 128),     # EOS pad beyond the answer: max(0, U[lo, hi))
      loss="lavida",             # lavida (token mean) | llada (1/p weighted, per answer length)
      complementary=True,        # 2B rows with complementary masks
      prefix_dlm=True,           # the prompt never attends to the answer (exact prefix cache)
      t_sampler="uniform",       # uniform | logit_normal | mode
      fim_prob=0.8,              # stage 3: FIM insertion probability per answer
  )
  c.sample = dict(
      steps=32,                  # total denoising steps (NFE without cache / threshold)
      block_length=32,           # semi-autoregressive blocks (answer_len must divide)
      schedule="shift",          # linear | cosine | shift
      shift_a=1 / 3,
      remasking="low_confidence",
      temperature=0.0,
      cfg_scale=0.0,
      threshold=0.0,             # > 0: confidence-threshold parallel decoding (steps unused)
      cache="prefix",            # none | prefix | block | dual | elastic
      refresh_gamma=0.9,         # cache elastic: refresh when the attention drift test's
                                 # cosine similarity falls below this
      num_images=16,             # sample mode: captions written
  )
  c.eval = dict(
      num_scenes=256,            # held-out shapes scenes for the speed / quality table
      threshold=0.9,             # threshold-decoding rows of the table
      thresholds=(),             # demo_long: the threshold rows (e.g. 0.9, 0.7)
      gen_lengths=(),            # demo_long: answer slots of the table (e.g. 64, 128)
      caches=(),                 # demo_long: the cache modes of the table
      batch=64,                  # demo_long: scenes decoded at once
      timing_repeats=2,          # demo_long: timed runs of every setting, interleaved
      data_path="",              # caption-set eval (data.source array_record / tfds): the
                                 # held-out set ("" = data.path), e.g. a val glob
      split="",                  # its TFDS split ("" = data.split), e.g. "val"
      infill_slots=3 if stage == 3 else 1,   # [M] slots per hole in the infill rows (a FIM
                                             # model fills a hole with words + [S] filler)
  )
  c.data.resolution = 384
  c.data.caption_key = "caption"
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b2 = 0.999

  if stage == 1:                 # LLaVA-style projector pretraining
    c.model.update(anyres=False, pool=False)
    c.data.batch_size = 256
    c.total_steps = 558_000 // 256       # one epoch of LLaVA's 558K caption pairs
    c.optim.lr = 1e-3
    c.optim.warmup_steps = c.total_steps * 3 // 100
  else:
    c.data.batch_size = 128
    c.total_steps = 2 * 1_000_000 // 128  # 2 epochs; set for your data (see the docstring)
    c.optim.lr = 2e-5
    c.optim.warmup_steps = c.total_steps * 3 // 100
    c.optim.lr_groups = [["vision_tower/.*", 0.1]]   # vision 2e-6
  if "dream" in presets:
    c.model.update(backbone="dream", prompt="dream")
    c.model.llm_config = DREAM_7B

  if "demo_long" in presets and "demo" not in presets:
    presets = presets + ["demo"]           # demo_long is the demo with long answers
  if "demo" in presets:
    # what makes the tiny model learn on 2 CPU cores: 64px scenes cut into 32px tiles (objects
    # 13-20 px, 8px patches), SigLIP / projector initialised as the references draw them
    # (Lavida.init), lr 1e-3 (3e-3 stalls on the image), a 12-token answer slot (the longest
    # caption is 8 words + EOS), 4000 steps (1500: attribute accuracy 0.41, 2000: 0.49,
    # 4000: 0.61; unpooled views cost 3x per step)
    c.total_steps = 4000
    c.log_every = 50
    c.checkpoint_every = 500
    c.dtype = "float32"
    c.remat_policy = "none"
    c.model.update(init="random", prompt="shapes", question="", max_prompt_text=4,
                   answer_len=12, extra_pad=(-4, 8))
    # assigned, not update()d: a ConfigDict update would merge with the 8B fields
    c.model.llm_config = (
        dict(model_type="Dream", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, intermediate_size=256, vocab_size=64, rope_theta=10000.0,
             rms_norm_eps=1e-6) if "dream" in presets else
        dict(model_type="llada", d_model=128, n_heads=4, n_layers=2, mlp_hidden_size=256,
             vocab_size=64, embedding_size=64, rope_theta=10000.0, rms_norm_eps=1e-5))
    c.model.vision_config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, image_size=32, patch_size=8,
                                 layer_norm_eps=1e-6)
    c.sample.update(steps=12, block_length=4, cache="prefix", num_images=16)
    if stage == 3:               # room for [S]... [FIM] segments (longer answers skip FIM)
      c.model.answer_len = 24
      c.sample.update(steps=24, block_length=8)
    c.eval.update(num_scenes=256)
    c.data.resolution = 64
    c.data.batch_size = 16
    c.optim.lr = 1e-3
    c.optim.b2 = 0.95
    c.optim.warmup_steps = 100
    c.optim.lr_groups = []
    c.optim.weight_decay = 0.01
  if "demo_long" in presets:
    # long answers (mmjax/data/shapes_describe.py): 2-4 objects, each with its grid cell, and
    # every pair's relation, 26-86 tokens, in a 128-token slot (EOS padding up to the slot's
    # end in training: extra pad up to 48). One 48 px view in 16 px patches, unpooled: a
    # patch is a cell of the 3 x 3 grid the descriptions use. Batch 8 at lr 2e-3: more
    # updates per minute (the model reads colours from the image only after ~1000 steps). The
    # table decodes at 64 (scenes whose description fits) and 128, in blocks of 32
    c.data.source = "shapes_describe"
    c.data.caption_fraction = 0.5   # short captions mixed in (empty question)
    c.data.resolution = 48
    c.data.batch_size = 8
    c.total_steps = 2000
    c.optim.lr = 2e-3
    c.model.update(anyres=False, pool=False, answer_len=128, extra_pad=(-8, 48),
                   max_prompt_text=5)            # + the question 'describe'
    c.model.vision_config.update(image_size=48, patch_size=8)
    c.sample.update(steps=128, block_length=32, cache="dual", threshold=0.9)
    c.eval.update(num_scenes=128, thresholds=(0.9, 0.7), gen_lengths=(64, 128),
                  caches=("none", "prefix", "block", "dual", "elastic"))
  return c

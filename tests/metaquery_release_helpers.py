"""A tiny MetaQuery checkpoint in the authors' layout and the PyTorch reference of what their
model computes with it (not a test module).

``write_release(root)`` builds, offline and random: a LLaVA-OneVision MLLM (transformers),
a Sana DiT, a DC-AE and Sana's scheduler config (diffusers) as the *base* models (config +
tokenizer + chat template, as the hub directories their ``mllm_id`` / ``diffusion_model_id``
/ ``vae_id`` name), and the checkpoint their trainer would save: ``model.mllm_backbone.*``
in transformers-4.49 names with V + N + 2 embedding rows (the vocabulary rows decayed, so
they differ from the base), no lm_head; ``model.connector.{0,1,3,4}``; ``model.transformer.*``
in bf16; ``vae.*``. ``Reference`` runs it the way their code does: their tokenisation
(template + ``\\n<begin_of_img><img0>..<end_of_img><|im_end|>``, tokens appended after
padding the tokenizer to V, left padding), the MLLM with its lm_head an identity, the states
strictly between the markers, the Sequential connector, CFG with the empty prompt first,
DPM-Solver++ from the scheduler config, latents / scaling_factor into the VAE.
"""
import json
import re

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from reference_models import TEMPLATE

V, N, D, C, LAYERS = 64, 4, 128, 48, 2          # vocab, queries, MLLM width, caption width
HEADS = D // 64                                   # their connector: heads of 64
WORDS = ["<unk>", "\n", "a", "red", "blue", "green", "circle", "square", "two", "left", "of",
         "system", "user", "assistant"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
IM_END, IMAGE = len(WORDS) + 2, len(WORDS) + 3
SYSTEM_PROMPT = ("You will be given an image or its caption. Please describe the content of "
                 "the image in detail in your own words.")
DIT = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
           num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
           cross_attention_dim=32, caption_channels=C, sample_size=4)
VAE = dict(latent_channels=4, attention_head_dim=8,
           encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
           decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
           encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
           encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
           encoder_qkv_multiscales=[[], [5], [5]], decoder_qkv_multiscales=[[], [5], [5]],
           upsample_block_type="interpolate", downsample_block_type="Conv", scaling_factor=0.5)


def tokenizer_files(path):
  """tokenizer.json (words, ``\\n`` its own token, Qwen's chat specials) + chat template."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"\n|[^\s]+"), "removed",
                                           invert=True)
  tok.add_special_tokens(SPECIALS)
  tok.save(str(path / "tokenizer.json"))
  (path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))


# ----------------------------------------------------------------------------- connector
class _Gamma(nn.Module):
  def __init__(self):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(HEADS, 1, 64))


class _RMS(nn.Module):
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x):
  """Rotate-half RoPE, theta 1e4, positions 0..len-1 of ``[b, heads, len, 64]``."""
  n, d = x.shape[-2], x.shape[-1]
  inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
  ang = torch.arange(n, dtype=torch.float32)[:, None] * inv
  cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
  x1, x2 = x.chunk(2, -1)
  return x * cos + torch.cat([-x2, x1], -1) * sin


class _Layer(nn.Module):
  """One bidirectional Qwen2-style layer, QK-norm (L2, gamma per head and dim, x8) after RoPE."""

  def __init__(self):
    super().__init__()
    self.self_attn = nn.Module()
    for n in "qkv":
      setattr(self.self_attn, f"{n}_proj", nn.Linear(D, D))
    self.self_attn.o_proj = nn.Linear(D, D, bias=False)
    self.self_attn.q_norm, self.self_attn.k_norm = _Gamma(), _Gamma()
    self.mlp = nn.Module()
    self.mlp.gate_proj = nn.Linear(D, 4 * D, bias=False)
    self.mlp.up_proj = nn.Linear(D, 4 * D, bias=False)
    self.mlp.down_proj = nn.Linear(4 * D, D, bias=False)
    self.input_layernorm, self.post_attention_layernorm = _RMS(D), _RMS(D)

  def forward(self, x):
    a, (b, s, _) = self.self_attn, x.shape
    h = self.input_layernorm(x)
    q, k, v = (getattr(a, f"{n}_proj")(h).view(b, s, HEADS, 64).transpose(1, 2) for n in "qkv")
    q = F.normalize(_rope(q), dim=-1) * a.q_norm.gamma * 8.0
    k = F.normalize(_rope(k), dim=-1) * a.k_norm.gamma * 8.0
    o = F.scaled_dot_product_attention(q, k, v, scale=1 / 8.0)
    x = x + a.o_proj(o.transpose(1, 2).reshape(b, s, D))
    h = self.post_attention_layernorm(x)
    return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class _Encoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def connector():
  from diffusers.models.normalization import RMSNorm
  return nn.Sequential(_Encoder(), nn.Linear(D, C), nn.GELU(approximate="tanh"), nn.Linear(C, C),
                       RMSNorm(C, eps=1e-5, elementwise_affine=True))


# ----------------------------------------------------------------------------- the release
def _perturb(module, std, seed):
  """Random weights: norm weights and QK gains 1 + N(0, 0.1), the rest N(0, std)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      one = "norm" in name or name.endswith("gamma") or name == "4.weight"
      p.copy_(1.0 + 0.1 * noise if one else std * noise)


def to_449(name: str) -> str:
  """A transformers-5 LLaVA-OneVision parameter name -> its transformers-4.49 name."""
  name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
  name = re.sub(r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model.", name)
  name = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)
  return re.sub(r"^model\.image_newline$", "image_newline", name)


def base_llava(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlavaOnevisionConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=28, patch_size=7,
                         vision_use_head=False),
      text_config=dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       eos_token_id=IM_END),
      image_token_index=IMAGE, vision_feature_layer=-1, tie_word_embeddings=True,
      image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
  model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
  _perturb(model, 0.15, seed)
  return model


def write_release(root, seed=0, num_queries=N):
  """Base models under ``root/base_*`` and the checkpoint under ``root/release``; returns
  ``(release dir, parts)`` with the torch parts the reference runs."""
  import diffusers
  from safetensors.torch import save_file
  mllm_dir, sana_dir, out = root / "base_llava_ov", root / "Sana_tiny_diffusers", root / "release"
  for d in (mllm_dir, sana_dir, out):
    d.mkdir(parents=True, exist_ok=True)
  mllm = base_llava(seed)
  mllm.save_pretrained(mllm_dir)
  tokenizer_files(mllm_dir)
  torch.manual_seed(seed + 1)
  dit = diffusers.SanaTransformer2DModel(**DIT).eval()
  _perturb(dit, 0.15, seed + 1)
  dit.save_pretrained(sana_dir / "transformer")
  vae = diffusers.AutoencoderDC(**VAE).eval()
  _perturb(vae, 0.2, seed + 2)
  vae.save_pretrained(sana_dir / "vae")
  diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                        prediction_type="flow_prediction").save_pretrained(
                                            sana_dir / "scheduler")
  conn = connector()
  _perturb(conn, 0.05, seed + 3)
  tensors = {}
  for name, p in mllm.state_dict().items():
    if name == "lm_head.weight":
      continue                            # their lm_head is an identity: nothing stored
    if name.endswith("embed_tokens.weight"):   # decayed vocabulary + markers + queries
      g = torch.Generator().manual_seed(seed + 4)
      p = torch.cat([0.97 * p, 0.5 * torch.randn(num_queries + 2, D, generator=g)])
    tensors["model.mllm_backbone." + to_449(name)] = p
  tensors.update({"model.connector." + k: p for k, p in conn.state_dict().items()})
  tensors.update({"model.transformer." + k: p.to(torch.bfloat16) for k, p in
                  dit.state_dict().items()})
  tensors.update({"vae." + k: p for k, p in vae.state_dict().items()})
  save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
            metadata={"format": "pt"})
  config = {
      "model_type": "metaquery", "architectures": ["MetaQuery"], "mllm_id": str(mllm_dir),
      "diffusion_model_id": str(sana_dir), "vae_id": str(sana_dir),
      "noise_scheduler_id": str(sana_dir), "scheduler_id": str(sana_dir),
      "num_metaqueries": N, "connector_num_hidden_layers": LAYERS, "input_size": 4,
      "in_channels": 4, "vae_downsample_f": 4, "max_input_text_tokens": 256,
      "system_prompt": SYSTEM_PROMPT, "loss_type": "flow", "_gradient_checkpointing": True,
      "modules_to_freeze": ["vae", "model.mllm_backbone"],
      "modules_to_unfreeze": ["model.mllm_backbone.language_model.model.embed_tokens"],
      "torch_dtype": "float32", "transformers_version": "4.49.0"}
  (out / "config.json").write_text(json.dumps(config, indent=2))
  return out, dict(mllm=mllm, connector=conn, tensors=tensors, mllm_dir=mllm_dir,
                   sana_dir=sana_dir)


# ----------------------------------------------------------------------------- reference
class Reference:
  """What the authors' model computes on the release's tensors (fp32)."""

  def __init__(self, parts):
    import diffusers
    t = parts["tensors"]
    inverse = {to_449(k): k for k in parts["mllm"].state_dict()}
    self.mllm = base_llava()
    self.mllm.resize_token_embeddings(V + N + 2)
    state = {inverse[k[len("model.mllm_backbone."):]]: v for k, v in t.items()
             if k.startswith("model.mllm_backbone.")}
    missing, unexpected = self.mllm.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    self.mllm.lm_head = nn.Identity()           # "logits" = final hidden states (post norm)
    self.connector = connector()
    self.connector.load_state_dict({k[len("model.connector."):]: v for k, v in t.items()
                                    if k.startswith("model.connector.")})
    sana = parts["sana_dir"]
    self.dit = diffusers.SanaTransformer2DModel.from_pretrained(sana / "transformer").eval()
    self.dit.load_state_dict({k[len("model.transformer."):]: v.float() for k, v in t.items()
                              if k.startswith("model.transformer.")})
    self.vae = diffusers.AutoencoderDC.from_pretrained(sana / "vae").eval()
    self.vae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("vae.")})
    self.scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(sana / "scheduler")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(parts["mllm_dir"] / "tokenizer.json"), pad_token="<|endoftext|>",
        padding_side="left")
    tok.add_tokens([f"<pad_token_{i}>" for i in range(V - len(tok))], special_tokens=True)
    tok.add_tokens(["<begin_of_img>", "<end_of_img>"] + [f"<img{i}>" for i in range(N)],
                   special_tokens=True)
    self.tok = tok
    self.boi, self.eoi = (tok.convert_tokens_to_ids(x) for x in ("<begin_of_img>", "<end_of_img>"))

  def tokenize(self, captions):
    """Their text-only tokenisation: system + user turn, generation prompt, the queries."""
    tok = self.tok
    suffix = "\n<begin_of_img>" + "".join(f"<img{i}>" for i in range(N)) + "<end_of_img><|im_end|>"
    texts = []
    for cap in captions:
      cap = tok.decode(tok(cap)["input_ids"][:256])
      conv = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
              {"role": "user", "content": [{"type": "text", "text": cap}]}]
      texts.append(tok.apply_chat_template(conv, chat_template=TEMPLATE, tokenize=False,
                                           add_generation_prompt=True) + suffix)
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]

  @torch.no_grad()
  def condition(self, captions):
    ids, mask = self.tokenize(captions)
    h = self.mllm(input_ids=ids, attention_mask=mask).logits
    pos = torch.arange(ids.shape[1])[None]
    boi = torch.where(ids == self.boi)[1][:, None]
    eoi = torch.where(ids == self.eoi)[1][:, None]
    between = (pos > boi) & (pos < eoi)
    return self.connector(h[between].view(len(captions), -1, D))

  @torch.no_grad()
  def sample(self, captions, noise_nhwc, guidance, steps):
    """Their sampling loop: [negative; caption] conditions, CFG, scheduler steps, decode."""
    b = len(captions)
    cond = self.condition([""] * b + list(captions))
    x = torch.as_tensor(noise_nhwc).permute(0, 3, 1, 2).float()
    self.scheduler.set_timesteps(steps)
    for t in self.scheduler.timesteps:
      out = self.dit(hidden_states=torch.cat([x, x]), timestep=t.unsqueeze(0).expand(2 * b),
                     encoder_hidden_states=cond,
                     encoder_attention_mask=torch.ones(2 * b, N)).sample
      u, c = out.chunk(2)
      x = self.scheduler.step(u + guidance * (c - u), t, x).prev_sample
    images = self.vae.decode(x / self.vae.config.scaling_factor).sample
    return images.permute(0, 2, 3, 1).numpy()


def random_params(system, seed=0):
  """Random params of the system's shapes without compiling its init: N(0, 0.1), norm
  scales and QK gains 1 + N(0, 0.1)."""
  import flax.linen as fnn
  import jax
  shapes = fnn.unbox(jax.eval_shape(system.init, jax.random.key(0),
                                    system.dummy_batch(1)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, a):
    x = 0.1 * rng.standard_normal(a.shape)
    one = str(getattr(path[-1], "key", path[-1])) in ("scale", "q_gain", "k_gain")
    return (x + 1.0 if one else x).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def layout_ids(reference, captions):
  """Their ids per caption: left padding dropped, the marker / query block cut out."""
  ids, mask = reference.tokenize(captions)
  block = {reference.boi, reference.eoi} | {reference.boi + 2 + i for i in range(N)}
  return [[i for i, k in zip(row, m) if k and i not in block]
          for row, m in zip(ids.tolist(), mask.tolist())]

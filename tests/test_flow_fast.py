"""Fast flow sampling: query-chunked attention against the 'xla' path, the Sana DiT with its
caption's keys and values computed once (`CaptionKV`, `velocity_fn`: unrolled, partially
unrolled, chunked) against the plain apply, and a whole CFG sample against diffusers'
SanaPipeline on the same weights."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.core import dot_product_attention
from mmjax.core.attention import chunked_attention
from mmjax.diffusion import solvers
from mmjax.interop.diffusers_io import load_diffusers
from mmjax.models import sana_dit

from sana_helpers import inputs, tiny_sana


def _qkv(b=2, s=37, t=11, h=4, kvh=2, d=8, seed=0):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.normal(size=sh).astype(np.float32))
               for sh in ((b, s, h, d), (b, t, kvh, d), (b, t, kvh, d)))


@pytest.mark.parametrize("mask_kind", ["none", "keys", "full", "per_head"])
@pytest.mark.parametrize("q_chunk", [8, 64])
def test_chunked_attention_matches_xla(mask_kind, q_chunk):
  """Query chunks (a ragged last one, one chunk), grouped kv heads, masks of every shape,
  a fully masked row."""
  q, k, v = _qkv()
  b, s, h, _ = q.shape
  t = k.shape[1]
  r = np.random.default_rng(1)
  mask = {"none": None,
          "keys": jnp.asarray(np.arange(t)[None] < np.array([t, 4])[:, None])[:, None, None],
          "full": jnp.asarray(r.random((b, 1, s, t)) < 0.7),
          "per_head": jnp.asarray(r.random((b, h, s, t)) < 0.7)}[mask_kind]
  if mask is not None and mask.shape[2] > 1:
    mask = mask.at[0, :, 3].set(False)                   # a fully masked query row
  ref = dot_product_attention(q, k, v, mask)
  out = jax.jit(lambda q, k, v, m: chunked_attention(q, k, v, m, q_chunk=q_chunk))(q, k, v,
                                                                                  mask)
  assert out.shape == ref.shape and bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask, impl="chunked"), ref,
                             atol=2e-6, rtol=1e-5)


def test_chunked_attention_bf16_and_scale():
  q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(s=20, h=2, kvh=2))
  ref = dot_product_attention(q, k, v, scale=0.3)
  out = chunked_attention(q, k, v, scale=0.3, q_chunk=8)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=2e-2)
  with pytest.raises(ValueError, match="return_weights"):
    dot_product_attention(q, k, v, impl="chunked", return_weights=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("sana")
  ref = tiny_sana(path, seed=3, qk_norm="rms_norm_across_heads", num_layers=3)
  module, params = load_diffusers(str(path))                 # scanned
  return path, ref, module, params


def test_caption_kv_and_velocity_fn_match_plain_apply(tiny):
  _, _, module, params = tiny
  x, t, caption, mask = (jnp.asarray(a) for a in inputs(seed=4))
  unrolled = sana_dit.SanaDiT(module.config.replace(scan_layers=False))

  @jax.jit
  def plain(params, x, t, caption, mask):
    ref = module.apply({"params": params}, x, t, caption, mask)
    kv = module.apply({"params": params}, None, None, caption, mask)
    flat = sana_dit.unstack_blocks(params, 3)
    return (ref, kv, module.apply({"params": params}, x, t, kv),
            unrolled.apply({"params": flat}, x, t, caption, mask))
  ref, kv, with_kv, unrolled_out = plain(params, x, t, caption, mask)
  assert isinstance(kv, sana_dit.CaptionKV) and kv.k.shape == (3, 2, 6, 2, 16)
  np.testing.assert_allclose(with_kv, ref, atol=1e-5)
  np.testing.assert_allclose(unrolled_out, ref, atol=1e-5)
  for unroll, impl in ((True, "chunked"), (2, "xla"), (False, "chunked")):
    out = jax.jit(lambda p, x, t, c, m: sana_dit.velocity_fn(
        module.config, p, c, m, unroll=unroll, attention_impl=impl)(x, t))(
            params, x, t, caption, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"unroll={unroll} {impl}")


def test_cfg_sample_matches_sana_pipeline(tiny):
  """The whole sampler (6 steps, CFG 4.5) against ``SanaPipeline`` from the same noise."""
  _, ref_model, module, params = tiny
  _, _, caption, mask = inputs(seed=5)
  noise = np.random.default_rng(6).normal(size=(1, 8, 8, 4)).astype(np.float32)
  uncond, cond = caption[:1], caption[1:]
  uncond_mask, cond_mask = mask[:1], mask[1:]
  pipe = diffusers.SanaPipeline(
      tokenizer=None, text_encoder=None, vae=None, transformer=ref_model,
      scheduler=diffusers.DPMSolverMultistepScheduler(
          use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"))
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(prompt_embeds=torch.from_numpy(cond),
               prompt_attention_mask=torch.from_numpy(cond_mask),
               negative_prompt=None, negative_prompt_embeds=torch.from_numpy(uncond),
               negative_prompt_attention_mask=torch.from_numpy(uncond_mask),
               latents=torch.from_numpy(noise).permute(0, 3, 1, 2), height=256, width=256,
               num_inference_steps=6, guidance_scale=4.5, output_type="latent",
               use_resolution_binning=False, return_dict=False)[0]
  ref = ref.permute(0, 2, 3, 1).numpy()
  sigmas, timesteps = solvers.flow_sigmas(6, 3.0)

  @jax.jit
  def sample(params, both, both_mask, noise):
    fn = sana_dit.velocity_fn(module.config, params, both, both_mask)
    return solvers.dpm_solver_2m_sample(solvers.cfg_two_way(fn, 4.5), noise, sigmas,
                                        timesteps)
  out = sample(params, caption, mask, noise)
  diff = float(np.abs(np.asarray(out) - ref).max())
  print(f"6-step CFG sample vs SanaPipeline: max |diff| {diff:.1e} "
        f"(|latent| {np.abs(ref).max():.2f})")
  assert diff <= 1e-4

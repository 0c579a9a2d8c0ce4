"""DualToken's tower: the core stack's layer taps (values, params, memory) and the split
SigLIP tower against transformers' SiglipVisionModel (hidden_states[k], pooler_output),
loaded from release-style ``siglip_model.vision_model.*`` names, scanned and unrolled."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from mmjax import core
from mmjax.models import siglip
from mmjax.systems.dualtoken.projections import params_from_tensors, tensors_from_params
from mmjax.systems.dualtoken.tower import (DualTokenTower, siglip_params_from_tower,
                                          tower_params_from_siglip)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def is_box(x):
  return isinstance(x, nn.Partitioned)


# ----------------------------------------------------------------------------- core taps
def test_tap_layers_equal_hidden_states_scanned_and_unrolled():
  """Taps (any order, 0 = the input) equal ``return_hidden_states`` slices; params (values
  and boxes) are the same with or without taps; remat and unrolled give the same taps."""
  cfg = core.TransformerConfig(num_layers=4, d_model=32, num_heads=4, mlp_dim=48,
                               rope_theta=None, norm="layer")
  x = normal((2, 5, 32), 0)
  stack = core.TransformerStack(cfg)
  key = jax.random.key(0, impl="unsafe_rbg")        # compiles far faster than threefry on CPU
  boxed = jax.jit(lambda x: stack.init(key, x, mask=None))(x)
  boxed_taps = jax.jit(lambda x: stack.init(key, x, mask=None, tap_layers=(1, 3)))(x)
  assert (jax.tree.structure(boxed, is_leaf=is_box) ==
          jax.tree.structure(boxed_taps, is_leaf=is_box))
  for a, b in zip(jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(nn.unbox(boxed_taps))):
    np.testing.assert_array_equal(a, b)
  params = nn.unbox(boxed)
  taps = (3, 0, 4, 1, 3)
  flat = {"params": core.unstack_layer_params(params["params"], 4)}
  variants = (cfg, cfg.replace(remat_policy="full"), cfg.replace(scan_layers=False))

  @jax.jit
  def run(params, flat, x):       # one compile: every layer, then taps of each variant
    y, hidden = stack.apply(params, x, mask=None, return_hidden_states=True)
    return y, hidden, [core.TransformerStack(v).apply(flat if not v.scan_layers else params, x,
                                                      mask=None, tap_layers=taps)
                       for v in variants]
  y, hidden, outs = run(params, flat, x)
  full = np.concatenate([np.asarray(x)[None], np.asarray(hidden)])
  for y2, t in outs:
    assert t.shape == (len(taps),) + x.shape
    np.testing.assert_allclose(np.asarray(t), full[list(taps)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=1e-6)
  with pytest.raises(ValueError, match="tap_layers"):
    stack.apply(params, x, mask=None, tap_layers=(5,))


def test_scanned_taps_do_not_hold_every_layer():
  """The scan emits no ``[layers, ...]`` activation stack and the compiled program's output
  is x plus the taps: memory grows with the taps, not with the layers."""
  L, shape = 12, (4, 16, 128)
  cfg = core.TransformerConfig(num_layers=L, d_model=128, num_heads=4, mlp_dim=128,
                               rope_theta=None)
  stack = core.TransformerStack(cfg)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(lambda: nn.unbox(stack.init(jax.random.key(0), jnp.zeros(shape),
                                                      mask=None)))
  xb = np.prod(shape) * 4
  sizes = {}
  for name, kw in (("plain", {}), ("taps", dict(tap_layers=(3, 7))),
                   ("hidden", dict(return_hidden_states=True))):
    fn = lambda p, x, kw=kw: stack.apply(p, x, mask=None, **kw)  # noqa: E731
    scans = [e for e in jax.make_jaxpr(fn)(params, x).jaxpr.eqns if e.primitive.name == "scan"]
    stacked = [v.aval.shape for e in scans for v in e.outvars if v.aval.shape == (L,) + shape]
    assert bool(stacked) == (name == "hidden"), (name, stacked)
    mem = jax.jit(fn).lower(params, x).compile().memory_analysis()
    sizes[name] = (mem.output_size_in_bytes / xb, mem.temp_size_in_bytes / xb)
  print("output / temp bytes in units of one activation:", sizes)
  assert sizes["taps"][0] <= 3.01 and sizes["hidden"][0] >= L
  assert sizes["taps"][1] <= sizes["plain"][1] + 2.01


# ----------------------------------------------------------------------------- the tower
HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
          image_size=28, patch_size=7)
PREFIX = "siglip_model.vision_model."


@pytest.fixture(scope="module")
def reference():
  """A tiny random transformers tower, its release-style tensors and its outputs."""
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.1)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    out = model(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
  # transformers 5 names a SiglipVisionModel's tensors without the full model's
  # 'vision_model.' level; the release's full SiglipModel sits under 'siglip_model.'
  tensors = {PREFIX + k: v.numpy() for k, v in model.state_dict().items()}
  return tensors, images, out


def our_siglip_params(tensors, scan):
  cfg = siglip.from_hf_config(HF, scan_layers=scan)
  boxed = jax.eval_shape(siglip.SiglipVision(cfg).init, jax.random.key(0),
                         jnp.zeros((1, 28, 28, 3)))["params"]
  shapes = {"/".join(k): v.shape
            for k, v in traverse_util.flatten_dict(nn.unbox(boxed)).items()}
  table = siglip.hf_table(cfg, prefix=PREFIX)
  return cfg, params_from_tensors(table, shapes, tensors, what="release SigLIP")


@pytest.mark.parametrize("scan", [True, False])
def test_tower_matches_transformers_hidden_states_and_pooled(reference, scan):
  tensors, images, ref = reference
  cfg, sp = our_siglip_params(tensors, scan)
  tower = DualTokenTower(cfg, pixel_layer=2, shortcut_layer=1, semantic_layer=4)
  params = tower_params_from_siglip(sp, semantic_layer=4)
  assert (jax.tree.structure(params) == jax.tree.structure(
      nn.unbox(jax.eval_shape(tower.init, jax.random.key(0), jnp.asarray(images))["params"])))
  @jax.jit
  def run(p, x):
    feats = tower.apply({"params": p}, x, method="features")
    return (feats,) + tower.apply({"params": p}, feats["semantic"], method="head")
  feats, last, pooled = run(params, jnp.asarray(images))
  diffs = {k: float(np.abs(np.asarray(feats[k]) - ref.hidden_states[i].numpy()).max())
           for k, i in (("pixel", 2), ("shortcut", 1), ("semantic", 4))}
  diffs["last"] = float(np.abs(np.asarray(last) - ref.last_hidden_state.numpy()).max())
  diffs["pooled"] = float(np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max())
  print(f"tower vs transformers (scan={scan}): max abs diffs {diffs}")
  assert max(diffs.values()) <= 1e-5
  # the inverse gives back the SigLIP params and the release tensors, exactly
  back = siglip_params_from_tower(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(sp)):
    np.testing.assert_array_equal(np.asarray(a), b)
  again = tensors_from_params(siglip.hf_table(cfg, prefix=PREFIX), back)
  for k, v in again.items():
    np.testing.assert_array_equal(v, tensors[k], err_msg=k)


def test_tower_init_split_boxed_and_options():
  """Boxed init params join into SigLIP's boxed layout and split back (names kept);
  ``reference_init`` runs on the tower; no shortcut, semantic = last layer (no top stack)."""
  cfg = siglip.from_hf_config(HF)
  tower = DualTokenTower(cfg, pixel_layer=2, shortcut_layer=1, semantic_layer=4)
  images = jnp.zeros((1, 28, 28, 3))
  boxed = jax.eval_shape(tower.init, jax.random.key(0), images)["params"]
  joined = jax.eval_shape(siglip_params_from_tower, boxed)       # boxes kept, nothing computed
  want = jax.eval_shape(siglip.SiglipVision(cfg).init, jax.random.key(0), images)["params"]
  assert (nn.get_partition_spec(joined)["encoder"]["layers"]["mlp"]["fc1"]["kernel"] ==
          nn.get_partition_spec(want)["encoder"]["layers"]["mlp"]["fc1"]["kernel"])
  assert (jax.tree.map(lambda a: a.shape, nn.unbox(joined)) ==
          jax.tree.map(lambda a: a.shape, nn.unbox(want)))
  split = jax.eval_shape(lambda p: tower_params_from_siglip(p, 4), joined)
  assert jax.tree.structure(split, is_leaf=is_box) == jax.tree.structure(boxed, is_leaf=is_box)
  fresh = jax.eval_shape(lambda p: siglip.reference_init(p, jax.random.key(1)), boxed)
  assert jax.tree.structure(fresh, is_leaf=is_box) == jax.tree.structure(boxed, is_leaf=is_box)
  plain = DualTokenTower(cfg, pixel_layer=0, shortcut_layer=None, semantic_layer=5)
  shapes = nn.unbox(jax.eval_shape(plain.init, jax.random.key(0), images)["params"])
  assert "encoder_top" not in shapes
  p = jax.tree.map(lambda a: 0.1 * normal(a.shape, 1), shapes)
  f = jax.jit(lambda p, x: plain.apply({"params": p}, x, method="features"))(p, images + 0.5)
  np.testing.assert_allclose(np.asarray(f["pixel"]), np.asarray(   # tap 0 = the embeddings
      jax.lax.conv_general_dilated(images + 0.5, p["patch_embed_kernel"], (7, 7), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(1, 16, 32)
      + p["patch_embed_bias"] + p["pos_embed"]), atol=1e-5)
  assert sorted(f) == ["pixel", "semantic"]
  with pytest.raises(ValueError, match="pixel_layer"):
    jax.eval_shape(DualTokenTower(cfg, pixel_layer=5, semantic_layer=4).init,
                   jax.random.key(0), images)

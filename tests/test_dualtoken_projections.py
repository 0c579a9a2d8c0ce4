"""DualToken's pre/post-quantisation projections against a small torch re-implementation of
the release's block (written here from its description, fp32): outputs, names, round trip,
causality, init and logical axis names."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmjax.interop import CheckpointMismatchError
from mmjax.systems.dualtoken import projections as P


# ----------------------------------------------------------------------------- torch reference
class RefAttention(torch.nn.Module):
  """q, k, v at the wider dim from one bias-free matrix plus q / v biases (k's bias is a zero
  buffer); down: mean over heads (then adaptive average pooling to out); up: heads concatenated;
  then a Linear out -> out."""

  def __init__(self, d_in, d_out, heads, causal):
    super().__init__()
    wide = max(d_in, d_out)
    self.heads, self.hd, self.down, self.causal, self.d_out = (
        heads, wide // heads, d_in > d_out, causal, d_out)
    self.qkv = torch.nn.Linear(d_in, 3 * wide, bias=False)
    self.q_bias = torch.nn.Parameter(torch.zeros(wide))
    self.v_bias = torch.nn.Parameter(torch.zeros(wide))
    self.register_buffer("zero_k_bias", torch.zeros(wide))
    self.proj = torch.nn.Linear(d_out, d_out)

  def forward(self, x):
    b, n, _ = x.shape
    bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
    q, k, v = (x @ self.qkv.weight.T + bias).view(b, n, 3, self.heads, self.hd).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # [b, H, n, hd]
    logits = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
    if self.causal:
      logits = logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    out = logits.softmax(-1) @ v
    if self.down:
      out = out.mean(1)                                                # [b, n, hd]
      if self.hd != self.d_out:
        out = F.adaptive_avg_pool1d(out, self.d_out)
    else:
      out = out.transpose(1, 2).reshape(b, n, -1)
    return self.proj(out)


class RefMlp(torch.nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.norm = torch.nn.LayerNorm(d, eps=1e-6)
    self.w0, self.w1 = torch.nn.Linear(d, hidden), torch.nn.Linear(d, hidden)
    self.w2 = torch.nn.Linear(hidden, d)

  def forward(self, x):
    x = self.norm(x)
    return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class RefBlock(torch.nn.Module):
  """proj(norm3 x) + attn(norm1 x), then + mlp(norm2 .)."""

  def __init__(self, d_in, d_out, heads, causal):
    super().__init__()
    self.norm1, self.norm3 = torch.nn.LayerNorm(d_in), torch.nn.LayerNorm(d_in)
    self.attn = RefAttention(d_in, d_out, heads, causal)
    self.proj = torch.nn.Linear(d_in, d_out)
    self.norm2 = torch.nn.LayerNorm(d_out)
    self.mlp = RefMlp(d_out, 2 * d_out)

  def forward(self, x):
    x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def random_ref(d_in, d_out, heads, causal, seed):
  torch.manual_seed(seed)
  ref = RefBlock(d_in, d_out, heads, causal).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_((1.0 if "norm" in name and "weight" in name else 0.0) + 0.3 * torch.randn_like(p))
  return ref


# (in, out, heads): down as in the release (heads = in / out, head_dim = out), up, and a
# down block whose head_dim (8) is pooled to out (4).
CASES = [(16, 4, 4), (4, 16, 4), (24, 4, 3)]


@pytest.mark.parametrize("d_in,d_out,heads", CASES)
def test_matches_torch_reference_causal_and_not(d_in, d_out, heads):
  x = np.random.default_rng(0).normal(size=(2, 9, d_in)).astype(np.float32)
  for causal in (False, True):
    ref = random_ref(d_in, d_out, heads, causal, seed=d_in + d_out)
    sd = {"prequant_pix." + k: v.numpy() for k, v in ref.state_dict().items()}
    sd["other.weight"] = np.zeros(3)                        # not under the prefix: ignored
    cfg = P.ProjectionConfig(in_dim=d_in, out_dim=d_out, num_heads=heads)
    params = P.projection_from_torch(sd, cfg, prefix="prequant_pix.")
    with torch.no_grad():
      want = ref(torch.tensor(x)).numpy()
    got = np.asarray(jax.jit(P.QuantProjection(cfg, causal=causal).apply)({"params": params},
                                                                          jnp.asarray(x)))
    err = float(np.abs(got - want).max())
    print(f"projection {d_in}->{d_out} heads {heads} causal {causal}: max abs diff {err:.1e}")
    assert got.shape == (2, 9, d_out) and err <= 1e-5
    back = P.projection_to_torch(params, prefix="prequant_pix.")
    assert set(back) == set(sd) - {"other.weight"}
    for k, v in back.items():
      np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_release_names_and_errors():
  ref = random_ref(16, 4, 4, False, seed=0)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert sorted(sd) == sorted(
      ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
       "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.proj.weight",
       "attn.proj.bias", "proj.weight", "proj.bias", "mlp.norm.weight", "mlp.norm.bias",
       "mlp.w0.weight", "mlp.w0.bias", "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight",
       "mlp.w2.bias"])
  cfg = P.ProjectionConfig(in_dim=16, out_dim=4)
  assert (cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (4, 4, 8)
  with pytest.raises(CheckpointMismatchError, match="missing.*mlp.w2.bias"):
    P.projection_from_torch({k: v for k, v in sd.items() if k != "mlp.w2.bias"}, cfg)
  with pytest.raises(CheckpointMismatchError, match="not zero"):
    P.projection_from_torch({**sd, "attn.zero_k_bias": np.ones(16, np.float32)}, cfg)
  with pytest.raises(CheckpointMismatchError, match="mis-shaped.*proj.weight"):
    P.projection_from_torch({**sd, "proj.weight": np.zeros((4, 15), np.float32)}, cfg)
  with pytest.raises(CheckpointMismatchError, match="unexpected"):
    P.projection_from_torch({**sd, "attn.k_bias": np.zeros(16, np.float32)}, cfg)


def test_causal_up_projection_ignores_later_positions():
  cfg = P.ProjectionConfig(in_dim=4, out_dim=16)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 4)), jnp.float32)
  edited = x.at[:, 4:].set(7.0)
  for causal in (True, False):
    mod = P.QuantProjection(cfg, causal=causal)
    params = mod.init(jax.random.key(0), x)["params"]
    a, b = mod.apply({"params": params}, x), mod.apply({"params": params}, edited)
    same = np.allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), atol=1e-6)
    assert same == causal


def test_init_and_logical_axes():
  """torch-default init (uniform +-1/sqrt(fan_in), q/v biases zero) and a logical name tuple
  on every parameter, width dims 'embed', code dims unnamed."""
  for d_in, d_out in ((64, 8), (8, 64)):
    cfg = P.ProjectionConfig(in_dim=d_in, out_dim=d_out)
    boxed = P.QuantProjection(cfg).init(jax.random.key(0), jnp.zeros((1, 3, d_in)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    p, specs = nn.unbox(boxed), nn.get_partition_spec(boxed)
    np.testing.assert_array_equal(p["attn"]["q_proj"]["bias"], 0.0)
    assert "bias" not in p["attn"]["k_proj"]
    q = np.asarray(p["attn"]["q_proj"]["kernel"])
    assert 0.8 / math.sqrt(d_in) < np.abs(q).max() <= 1 / math.sqrt(d_in)
    w2 = np.asarray(p["mlp"]["down_proj"]["kernel"])
    assert np.abs(w2).max() <= 1 / math.sqrt(2 * d_out)
    assert tuple(specs["proj"]["kernel"]) == ((("embed", None) if d_in > d_out
                                               else (None, "embed")))
    assert tuple(specs["mlp"]["gate_proj"]["kernel"])[1] == "mlp"
    np.testing.assert_array_equal(p["norm2"]["scale"], 1.0)

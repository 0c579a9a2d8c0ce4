"""``interop.subtree.load_into``: one parameter group of a bigger model filled from a
transformers directory -- values, logical boxes kept, nothing read under eval_shape, and one
error naming missing and mis-shaped parameters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.interop import load_hf
from mmjax.interop import subtree


def _tiny(path, hidden=32):
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
      vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


def _boxed_init(path, **overrides):
  module, _ = load_hf(str(path), **overrides)
  ids = jnp.zeros((1, 4), jnp.int32)
  return module, module.init(jax.random.key(1), ids)["params"]


def test_load_into_fills_every_leaf_and_keeps_boxes(tmp_path):
  _tiny(tmp_path)
  _, want = load_hf(str(tmp_path), scan_layers=False)
  _, boxed = _boxed_init(tmp_path, scan_layers=False)
  loaded = jax.jit(lambda t: subtree.load_into(t, "hf", str(tmp_path), scan_layers=False))(boxed)
  def boxes(t):
    return [x.names for x in jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, nn.Partitioned))
            if isinstance(x, nn.Partitioned)]
  assert boxes(loaded) == boxes(boxed) and boxes(boxed)
  got, ref = subtree.flat(nn.unbox(loaded)), subtree.flat(want)
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)


def test_load_into_reads_nothing_under_eval_shape(tmp_path):
  _tiny(tmp_path)
  _, boxed = _boxed_init(tmp_path, scan_layers=False)
  abstract = jax.eval_shape(lambda t: subtree.load_into(t, "hf", str(tmp_path / "absent")),
                            boxed)
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(nn.unbox(boxed))


def test_load_into_names_missing_and_misshaped(tmp_path):
  _tiny(tmp_path / "small", hidden=32)
  _, boxed = _boxed_init(tmp_path / "small", scan_layers=False)
  _tiny(tmp_path / "wide", hidden=48)                       # every matrix mis-shaped
  with pytest.raises(Exception, match=r"mis-shaped \[.*input_norm/scale: \(48,\) vs ours \(32,\)"):
    jax.block_until_ready(subtree.load_into(boxed, "hf", str(tmp_path / "wide"),
                                            scan_layers=False))
  extra = dict(boxed)
  extra["not_in_checkpoint"] = {"kernel": jnp.zeros((2, 2))}
  with pytest.raises(Exception, match=r"missing \['not_in_checkpoint/kernel'\]"):
    jax.block_until_ready(subtree.load_into(extra, "hf", str(tmp_path / "small"),
                                            scan_layers=False))
  with pytest.raises(ValueError, match="not one of"):
    subtree.load_into(boxed, "onnx", str(tmp_path / "small"))


def _mesh():
  from mmjax.parallel.mesh import make_mesh
  return make_mesh(dict(data=2, fsdp=2, tensor=2, context=1))


@pytest.mark.parametrize("scan", [True, False])
def test_load_into_under_sharded_jit_streams_each_shard(tmp_path, monkeypatch, scan):
  """The system-init path: ``jax.jit(init, out_shardings=...)`` under the rules and mesh. Each
  device's callback receives its own shard of the logical sharding, each leaf is built once
  per host from its reference tensors, and the values are load_hf's."""
  from mmjax import config as mcfg
  from mmjax.interop import hf
  from mmjax.parallel import sharding as psharding
  from mmjax.parallel.rules import with_rules
  _tiny(tmp_path)
  module, want = load_hf(str(tmp_path), scan_layers=scan)
  ids = jnp.zeros((1, 4), jnp.int32)
  mesh, rules = _mesh(), mcfg.default_logical_rules()
  builds, served = [], []
  read_shards, shard = hf.read_shards, subtree.Source.shard
  monkeypatch.setattr(hf, "read_shards", lambda entries, shape, dtype, ckpt, keys: (
      builds.append((entries[0].ours, len(keys))) or read_shards(entries, shape, dtype, ckpt,
                                                                  keys)))
  monkeypatch.setattr(subtree.Source, "shard", lambda self, leaf, key, keys: (
      served.append((leaf[0], key)) or shard(self, leaf, key, keys)))

  def init(rng):
    boxed = module.init(rng, ids)["params"]
    return subtree.load_into(boxed, "hf", str(tmp_path), scan_layers=scan)

  _, shardings = psharding.abstract_init(init, mesh, rules, jax.random.key(0))
  with with_rules(rules, mesh):
    got = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(0))
  flat_got, flat_want = subtree.flat(got), subtree.flat(want)
  flat_sh = subtree.flat(shardings)
  assert flat_got.keys() == flat_want.keys()
  split = 0
  for k, v in flat_got.items():
    assert v.sharding.is_equivalent_to(flat_sh[k], v.ndim), k
    split += v.addressable_shards[0].data.shape != v.shape
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_want[k]), err_msg=k)
  assert split >= 4                      # kernels and embeddings really arrive split
  assert sorted(b[0] for b in builds) == sorted(flat_want)     # one build per leaf
  assert len(served) == 8 * len(flat_want)                     # one shard per device
  q = f"decoder/{'layers' if scan else 'layers_0'}/self_attn/q_proj/kernel"
  assert dict(builds)[q] == 4                                  # fsdp x tensor distinct pieces
  assert not subtree.source("hf", str(tmp_path), (("scan_layers", scan),)).pending


def test_load_into_eager_places_each_leaf_on_its_sharding(tmp_path):
  """Outside a trace: ShapeDtypeStructs with shardings become arrays on those shardings."""
  _tiny(tmp_path)
  module, want = load_hf(str(tmp_path), scan_layers=False)
  mesh = _mesh()
  P = jax.sharding.PartitionSpec
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=jax.sharding.NamedSharding(
          mesh, P("fsdp") if x.ndim == 2 and x.shape[0] % 2 == 0 else P())), want)
  got = subtree.load_into(abstract, "hf", str(tmp_path), scan_layers=False)
  for k, v in subtree.flat(got).items():
    ref = subtree.flat(abstract)[k]
    assert v.dtype == jnp.bfloat16 and v.sharding == ref.sharding, k
    np.testing.assert_array_equal(np.asarray(v),
                                  np.asarray(subtree.flat(want)[k]).astype(jnp.bfloat16))

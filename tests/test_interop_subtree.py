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

from mmjax.interop import load_hf, save_hf
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

"""HF import machinery: sharded placement on 8 virtual devices, bad checkpoints, tables."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import jax.numpy as jnp

from mmjax import config as mcfg
from mmjax.interop import CheckpointMismatchError, load_hf
from mmjax.interop.hf import abstract_params, get_family
from mmjax.interop.tables import CONV, LINEAR, LINEAR_OUT, Part, Rule, expand

from reference_models import IDS, MASK, max_diff, tiny_qwen2, torch_logits


def test_sharded_import_places_every_array(tmp_path):
  ref_model = tiny_qwen2(tmp_path, tie=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                           ("data", "fsdp", "tensor"))
  rules = mcfg.default_logical_rules()
  module, params = load_hf(str(tmp_path), mesh=mesh, rules=rules)
  fam = get_family("qwen2")
  _, specs = abstract_params(fam, module.config, module)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  assert set(flat) == set(specs)
  sharded = 0
  for path, arr in flat.items():
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        *[dict(rules).get(n) if n else None for n in specs[path]]))
    assert arr.sharding.is_equivalent_to(want, arr.ndim), (path, arr.sharding, want)
    sharded += any(s is not None for s in want.spec)
  assert sharded >= 8   # kernels and embeddings are really split, norms replicated
  q = flat["decoder/layers/self_attn/q_proj/kernel"]          # [layers, embed, heads, hd]
  assert q.sharding.spec[1:3] == ("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)  # each device holds its slice
  ours = module.apply({"params": params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK, bool))
  assert max_diff(ours, torch_logits(ref_model)) <= 1e-4


def test_bad_checkpoint_names_missing_extra_and_misshaped(tmp_path):
  tiny_qwen2(tmp_path, tie=False)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]                         # missing
  tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)  # extra
  tensors["model.norm.weight"] = np.ones((31,), np.float32)                # mis-shaped
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointMismatchError) as err:
    load_hf(str(tmp_path))
  msg = str(err.value)
  for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.extra.weight",
               "model.norm.weight: checkpoint (31,), model expects (32,)"):
    assert name in msg, msg
  assert "1 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg


def test_unknown_model_type_is_an_error(tmp_path):
  tiny_qwen2(tmp_path, tie=True)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"], cfg["architectures"] = "gpt_neo", ["GPTNeoForCausalLM"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="gpt_neo"):
    load_hf(str(tmp_path))


def test_transforms_are_reversible():
  rng = np.random.default_rng(0)
  table = [Rule("l.{i}.q.weight", "stack/q", LINEAR), Rule("o.weight", "o", LINEAR_OUT),
           Rule("conv.weight", "conv", CONV),
           Rule("in_proj_weight", "pk", Part(LINEAR, 0, 3)),
           Rule("in_proj_weight", "pv", Part(LINEAR, 2, 3))]
  shapes = {"stack/q": (3, 8, 2, 4), "o": (2, 4, 8), "conv": (2, 2, 3, 5), "pk": (8, 8),
            "pv": (8, 8)}
  entries = expand(table, shapes)
  assert [e.hf for e in entries][:3] == ["l.0.q.weight", "l.1.q.weight", "l.2.q.weight"]
  assert {e.hf: e.hf_shape for e in entries} == {
      "l.0.q.weight": (8, 8), "l.1.q.weight": (8, 8), "l.2.q.weight": (8, 8),
      "o.weight": (8, 8), "conv.weight": (5, 3, 2, 2), "in_proj_weight": (24, 8)}
  for e in entries:
    x = rng.normal(size=e.hf_shape)
    ours = e.transform.to_ours(x, e.our_shape)
    assert ours.shape == e.our_shape
    back = e.transform.to_hf(ours)
    if isinstance(e.transform, Part):
      back_full = np.split(x, 3)[e.transform.index]
      np.testing.assert_array_equal(back, back_full)
    else:
      np.testing.assert_array_equal(back, x)


def test_bf16_export_and_import(tmp_path):
  """bf16 tensors are written and read through ml_dtypes; transformers loads the export."""
  import torch
  import transformers
  from mmjax.interop import save_hf
  tiny_qwen2(tmp_path / "src", tie=True)
  module, params = load_hf(str(tmp_path / "src"))
  save_hf(module, params, str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  _, back = load_hf(str(tmp_path / "bf16"))
  rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         back, rounded)
  ref = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "bf16"),
                                                      dtype=torch.float32).eval()
  emb = ref.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(emb, np.asarray(back["embed_tokens"]["embedding"]))

"""Unified DualToken export to PyTorch: the tiny demo_unified model (random tokenizer, every
parameter drawn at random: no zero biases, no unit norms) is exported, rebuilt by
scripts/dualtoken_unified_to_torch.py (transformers Qwen2 + plain torch heads) and one
generation step is compared with ours in fp32: the prompt's LM logits, the guided (CFG 3)
logits of every depth of both heads at the first visual position, the greedy codes (equal)
and the LM state after that position's embedding is fed back."""
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import config as mcfg
from mmjax import core
from mmjax.core.transformer import stack_layer_params
from mmjax.models.lm import DecoderLM
from mmjax.systems.dualtoken import sampling
from mmjax.systems.dualtoken.export import export_unified, visual_state_dict
from mmjax.systems.dualtoken.unified import VOCABS, UnifiedModel
from mmjax.systems.dualtoken.unified_system import UnifiedDualToken
from dualtoken_helpers import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import dualtoken_unified_to_torch as dut  # noqa: E402

PROMPT = "two red circles left of a blue square"
SCALE = 3.0
TOL = dict(rtol=1e-4, atol=1e-4)


def ours_step(system, v, ids, mask):
  """Our side: prompt logits, the prefilled state, every depth's guided logits along the
  greedy path (the sampler's own pieces, KV-cached), and the sampler's next state."""
  model, c, b = system.model, system.cfg, ids.shape[0] // 2
  apply = lambda *a, **k: model.apply(v, *a, **k)   # noqa: E731
  text = DecoderLM(c.lm).apply({"params": v["params"]["lm"]}, ids, attention_mask=mask)
  state = sampling.start_generation(model, v, ids[:b], mask[:b], ids[b:], mask[b:])
  hidden, out = state["hidden"], {"text_logits": text, "hidden": state["hidden"]}
  for vocab in VOCABS:
    head = c.head(vocab)
    cache = core.init_cache(head.stack, 2 * b, head.depths)
    x = apply(vocab, hidden, method=UnifiedModel.head_first_input)
    psum, logits_d, codes = jnp.zeros((2 * b, c.code_embed_dim)), [], []
    for d in range(head.depths):
      logits, cache = apply(vocab, x, d, cache, method=UnifiedModel.head_step)
      guided = sampling.guide(logits, SCALE, True)
      code = jnp.argmax(guided, -1).astype(jnp.int32)
      logits_d.append(guided)
      codes.append(code)
      if d + 1 < head.depths:
        psum = psum + apply(vocab, jnp.tile(code, 2), method=UnifiedModel.code_embeddings)
        x = apply(vocab, psum, d + 1, method=UnifiedModel.head_code_input)
    out[vocab + "_logits"], out[vocab] = jnp.stack(logits_d, 1), jnp.stack(codes, 1)
    out[vocab + "_forced"] = apply(vocab, hidden[:b], out[vocab],     # teacher-forced path
                                   method=UnifiedModel.head_logits)
  keys = system.keys(0, np.arange(b))
  nxt = sampling.position_step(model, v, state, keys, cfg=True, cfg_scale=SCALE,
                               temperature=0.0, top_k=0, top_p=1.0)
  out["sampler"] = {vocab: nxt[vocab][:, 0] for vocab in VOCABS}
  out["next_hidden"] = nxt["hidden"]
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  system = UnifiedDualToken(mcfg.load(os.path.join(ROOT, "configs", "dualtoken.py:demo_unified"),
                                      ["--config.model.train_tokenizer=False"]))
  v = random_variables(system)
  out_dir = str(tmp_path_factory.mktemp("unified_export"))
  paths = export_unified(system, v, out_dir)
  lm, model, config, tok = dut.load(out_dir)
  p = system.prompter
  length = len(p.head) + p.text_len + 1
  ids, mask = p.left_pad([p.generation_prompt(PROMPT), p.generation_prompt("")], length)
  t_ids, t_mask = dut.generation_prompts(config, tok, [PROMPT])
  torch_out = dut.generation_step(lm, model, t_ids, t_mask, cfg_scale=SCALE, temperature=0.0)
  return dict(system=system, v=v, out_dir=out_dir, paths=paths, torch=(lm, model, config, tok),
              ids=ids, mask=mask, t_ids=t_ids, t_mask=t_mask,
              ours=jax.tree.map(np.asarray, jax.jit(functools.partial(ours_step, system))(
                  v, ids, mask)),
              theirs={k: t.numpy() for k, t in torch_out.items()})


def test_layout_config_and_prompts(run):
  system, out_dir, c = run["system"], run["out_dir"], run["system"].cfg
  assert sorted(run["paths"]) == ["config", "lm", "tokenizer", "visual"]
  files = set(os.listdir(out_dir))
  assert {"lm", "visual.safetensors", "visual_config.json", "tokenizer"} <= files
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
      os.listdir(os.path.join(out_dir, "lm")))
  assert {"config.json", "epoch_0.pt"} <= set(os.listdir(os.path.join(out_dir, "tokenizer")))
  cfg = json.load(open(os.path.join(out_dir, "visual_config.json")))
  p = system.prompter
  assert cfg["token_ids"] == {"bos": p.bos_id, "eos": p.eos_id, "pad": p.pad_id,
                              "boi": p.boi_id, "eoi": p.eoi_id}
  assert (cfg["positions"], cfg["depths"], cfg["code_embed_dim"], cfg["hidden_size"]) == (
      c.positions, c.depths, c.code_embed_dim, c.lm.stack.d_model)
  h = cfg["pixel_head"]
  st = c.pixel_head.stack
  assert (h["width"], h["num_layers"], h["num_heads"], h["codebook_size"]) == (
      st.d_model, st.num_layers, st.num_heads, 256)
  assert cfg["text_tokenizer"] == "lm/tokenizer.json" and cfg["image_tokenizer"] == "tokenizer"
  lm_cfg = json.load(open(os.path.join(out_dir, "lm", "config.json")))
  assert lm_cfg["model_type"] == "qwen2" and lm_cfg["tie_word_embeddings"] is True
  # the torch rebuild holds exactly our tensors (torch layout)
  _, model, _, _ = run["torch"]
  params, sd = run["v"]["params"], model.state_dict()
  np.testing.assert_array_equal(sd["visual.proj.weight"].numpy(),
                                np.asarray(params["visual"]["proj"]["kernel"]).T)
  np.testing.assert_array_equal(sd["semantic_head.classifiers.3.weight"].numpy(),
                                np.asarray(params["semantic_head"]["classifier"][3]).T)
  last = st.num_layers - 1
  assert f"pixel_head.layers.{last}.self_attn.o_proj.weight" in sd
  assert f"pixel_head.layers.{last + 1}.self_attn.o_proj.weight" not in sd
  # the script lays out the same prompts from the exported tokenizer.json
  np.testing.assert_array_equal(run["t_ids"].numpy(), run["ids"])
  np.testing.assert_array_equal(run["t_mask"].numpy().astype(bool), run["mask"])


def test_prompt_logits_and_hidden_match(run):
  ours, theirs, mask = run["ours"], run["theirs"], run["mask"]
  np.testing.assert_allclose(theirs["text_logits"][mask], ours["text_logits"][mask], **TOL)
  np.testing.assert_allclose(theirs["hidden"], ours["hidden"], **TOL)


def test_depth_head_logits_and_codes_match(run):
  ours, theirs = run["ours"], run["theirs"]
  for vocab in VOCABS:
    np.testing.assert_allclose(theirs[vocab + "_logits"], ours[vocab + "_logits"], **TOL)
    np.testing.assert_array_equal(theirs[vocab], ours[vocab])
    np.testing.assert_array_equal(ours["sampler"][vocab], ours[vocab])   # our sampler agrees
  # the fed-back visual position (embedding tables, projection, KV cache continuation)
  np.testing.assert_allclose(theirs["next_hidden"], ours["next_hidden"], **TOL)


def test_teacher_forced_heads_match(run):
  """The torch heads' training forward equals ours on the first position's codes."""
  model, ours = run["torch"][1], run["ours"]
  for vocab in VOCABS:
    with torch.no_grad():
      sums = model.visual.table(vocab)(torch.tensor(ours[vocab])).cumsum(1)[:, :-1]   # < d
      theirs = model.head(vocab)(torch.tensor(ours["hidden"][:1]), sums).numpy()
    np.testing.assert_allclose(theirs, ours[vocab + "_forced"], **TOL)


def test_scanned_heads_export_the_same_tensors(run):
  """Scanned head stacks (the paper config) unstack to the same torch tensors."""
  c, params = run["system"].cfg, dict(run["v"]["params"])
  heads = {}
  for vocab in VOCABS:
    h = c.head(vocab)
    heads[vocab + "_head"] = dataclasses.replace(h, stack=h.stack.replace(scan_layers=True))
    params[vocab + "_head"] = {**params[vocab + "_head"], "stack": stack_layer_params(
        params[vocab + "_head"]["stack"], h.stack.num_layers)}
  scanned = visual_state_dict(dataclasses.replace(c, **heads), params)
  unrolled = run["torch"][1].state_dict()
  assert sorted(scanned) == sorted(unrolled)
  for k, x in scanned.items():
    np.testing.assert_array_equal(x, unrolled[k].numpy(), err_msg=k)


def test_cli_and_seeded_sampling(run, capsys):
  out = dut.main([run["out_dir"], "--prompt", PROMPT])
  for vocab in VOCABS:
    np.testing.assert_array_equal(out[vocab].numpy(), run["ours"][vocab])
  assert "pixel codes" in capsys.readouterr().out
  lm, model, config, _ = run["torch"]
  s = config["sampling"]
  kw = dict(cfg_scale=SCALE, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"])
  a = dut.generation_step(lm, model, run["t_ids"], run["t_mask"], seed=1, **kw)
  b = dut.generation_step(lm, model, run["t_ids"], run["t_mask"], seed=1, **kw)
  for vocab in VOCABS:
    assert torch.equal(a[vocab], b[vocab])
    assert a[vocab].shape == (1, config["depths"])
    assert int(a[vocab].max()) < config[vocab + "_head"]["codebook_size"]

"""MetaQuery's image tasks (reconstruct, edit, instruct): the shapes-world task data, the
batch layout (image placeholders, left padding, static shapes with 1..K images), the image
path through the frozen LLaVA-OneVision (against the model's own splicing), condition
dropout, three-way CFG sampling as one program, and one trainer step per task."""
import json
import os
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as mcfg
from mmjax.data import image as image_ops, shapes, shapes_tasks
from mmjax.diffusion import solvers
from mmjax.models import anyres
from mmjax.models import llava_onevision as lov
from mmjax.models.lm import DecoderLM
from mmjax.systems.metaquery import modes
from mmjax.systems.metaquery import tasks as mqt
from mmjax.systems.metaquery.bridge import MetaQueryModel, depth_to_space
from mmjax.systems.metaquery.prompt import PromptFormat
from mmjax.systems.metaquery.system import MetaQuery

from reference_models import TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "metaquery.py")
H = "--config.mllm.hf_config."
# a very small bridge: 1-layer text side at 32, 1-layer SigLIP on 16px (patch 8: 2x2
# features), 4 queries, 1-layer connector, 1-block DiT at 16px, 2 solver steps
TINY = ["--config.model.num_queries=4", "--config.model.connector_layers=1",
        "--config.model.connector_head_dim=16",
        H + "text_config.num_hidden_layers=1", H + "text_config.hidden_size=32",
        H + "text_config.intermediate_size=64",
        H + "vision_config.num_hidden_layers=1", H + "vision_config.hidden_size=32",
        H + "vision_config.intermediate_size=64", H + "vision_config.image_size=16",
        H + "image_grid_pinpoints=[[16,16],[16,32],[32,16],[32,32]]",
        "--config.decoder.dit.num_layers=1", "--config.decoder.dit.num_attention_heads=1",
        "--config.decoder.dit.num_cross_attention_heads=1",
        "--config.decoder.dit.caption_channels=24", "--config.decoder.dit.attention_head_dim=32",
        "--config.decoder.dit.cross_attention_head_dim=32",
        "--config.decoder.dit.cross_attention_dim=32",
        "--config.data.resolution=16", "--config.data.batch_size=4",
        "--config.sample.num_steps=2", "--config.scan_layers=False"]
PROMPT_LEN = {"reconstruct": 8, "edit": 16, "instruct": 32}


def _walk(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (scan / while / cond bodies) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _walk(sub)


def tiny(task, *overrides):
  return MetaQuery(mcfg.load(f"{CONFIG}:demo_{task}", TINY + [
      f"--config.model.prompt_len={PROMPT_LEN[task]}"] + list(overrides)))


_SYSTEMS = {}


def system_of(task):
  """A tiny system and its step-0 parameters (``PRNGKey(config.seed)``, as the trainer's),
  built once per task for the whole module (each init is an XLA compile)."""
  if task not in _SYSTEMS:
    s = tiny(task)
    _SYSTEMS[task] = (s, jax.device_get(s.init_params(jax.random.PRNGKey(s.config.seed))))
  return _SYSTEMS[task]


def records(task, indices, seed=0):
  src = shapes.ShapesSource(seed=seed, resolution=16)
  return [src[i] for i in indices]


def stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------- task data
def test_edit_targets_are_the_edited_scenes():
  kinds = set()
  for i in range(60):
    ex = shapes_tasks.make_example("edit", 0, i, 32)
    again = shapes_tasks.make_example("edit", 0, i, 32)
    assert ex["caption"] == again["caption"] and np.array_equal(ex["image"], again["image"])
    src, tgt = ex["source_scenes"][0], ex["target_scene"]
    assert src == shapes.sample_scene(0, i)                     # = ShapesSource(0)[i]'s scene
    np.testing.assert_array_equal(ex["source_images"][0], shapes.render(src, 32))
    np.testing.assert_array_equal(ex["image"], shapes.render(tgt, 32))
    words = ex["caption"].split()
    keep = lambda o: (o.shape, o.x, o.y, o.size)
    if words[0] == "the":                                       # the same shapes , but <c>
      kinds.add("recolor")
      c = words[-1]
      assert [keep(o) for o in tgt.objects] == [keep(o) for o in src.objects]
      assert {o.color for o in tgt.objects} == {c} != {o.color for o in src.objects}
    elif words[0] == "move":                                    # move the <c> <s> <dir>
      kinds.add("move")
      c, s, d = words[2], words[3], words[4]
      (i_obj,) = [k for k, o in enumerate(src.objects) if (o.color, o.shape) == (c, s)]
      dx, dy = shapes_tasks.DIRECTIONS[d]
      for k, (a, b) in enumerate(zip(src.objects, tgt.objects)):
        want = (a.x + shapes_tasks.MOVE * dx, a.y + shapes_tasks.MOVE * dy) if k == i_obj \
            else (a.x, a.y)
        assert (b.color, b.shape) == (a.color, a.shape)
        np.testing.assert_allclose((b.x, b.y), want, atol=1e-12)
      o = tgt.objects[i_obj]
      assert shapes.BORDER <= o.x - o.size and o.x + o.size <= 1 - shapes.BORDER
    else:                                                       # remove the <c> <s>
      assert words[0] == "remove"
      kinds.add("remove")
      c, s = words[2], words[3]
      assert sum((o.color, o.shape) == (c, s) for o in src.objects) == 1
      assert [keep(o) + (o.color,) for o in tgt.objects] == [
          keep(o) + (o.color,) for o in src.objects if (o.color, o.shape) != (c, s)]
  assert kinds == {"recolor", "move", "remove"}
  # every target is a scene ShapesEval scores as correct on its own render
  from mmjax.eval.shapes_eval import ShapesEval
  exs = [shapes_tasks.make_example("edit", 1, i, 64) for i in range(24)]
  assert ShapesEval().evaluate([e["image"] for e in exs],
                               [e["target_scene"] for e in exs])["overall"] == 1.0


ORD = {w: k for k, w in enumerate(shapes_tasks.ORDINALS)}


def test_instruct_picks_the_right_objects_from_the_right_images():
  counts = set()
  for i in range(40):
    ex = shapes_tasks.make_example("instruct", 0, i, 32, min_images=1, max_images=4)
    assert ex["caption"] == shapes_tasks.make_example(
        "instruct", 0, i, 32, min_images=1, max_images=4)["caption"]
    srcs, tgt = ex["source_scenes"], ex["target_scene"]
    counts.add(len(srcs))
    assert 1 <= len(srcs) <= 4 and len(ex["source_images"]) == len(srcs)
    picks = re.findall(r"the (\w+) from the (\w+) image", ex["caption"])
    assert len(picks) == (1 if len(srcs) == 1 else 2)
    assert " next to ".join(f"the {s} from the {o} image" for s, o in picks) == ex["caption"]
    if len(picks) == 2:
      assert picks[0][1] != picks[1][1]                         # two different images
    for k, (shape, ordinal) in enumerate(picks):
      (obj,) = [o for o in srcs[ORD[ordinal]].objects if o.shape == shape]   # unique there
      t = tgt.objects[k]                                        # k-th from the left
      assert (t.shape, t.color) == (obj.shape, obj.color)
      assert abs(t.x - (k + 1) / (len(picks) + 1)) < 1e-12 and t.y == 0.5
      # the target's pixel at that object's centre has that colour
      px = ex["image"][int(t.y * 32), int(t.x * 32)]
      np.testing.assert_array_equal(px, shapes.COLORS[obj.color])
    for j, s in enumerate(srcs):
      np.testing.assert_array_equal(ex["source_images"][j], shapes.render(s, 32))
      assert len({o.shape for o in s.objects}) == len(s.objects)   # a shape names an object
  assert counts == {1, 2, 3, 4}
  with pytest.raises(ValueError, match="max_images"):
    shapes_tasks.sample_composition(0, 0, 2, 7)


def test_task_tokenizer_extends_the_shapes_vocabulary():
  from mmjax.data.tokenizer import shapes_tokenizer
  base, tok = shapes_tokenizer(), shapes_tasks.task_tokenizer()
  for w, i in base.tokenizer.get_vocab(with_added_tokens=True).items():
    assert tok.token_id(w) == i
  assert tok.token_id("<image>") == 5 and tok.vocab_size <= 64
  text = "the circle from the sixth image next to the square from the first image , but up"
  assert tok.unk_id not in tok.tokenizer.encode(text).ids


# ----------------------------------------------------------------------------- batch layout
def test_batch_layout_per_task():
  t = shapes_tasks.task_tokenizer()
  img_id = 5
  for task in ("reconstruct", "edit", "instruct"):
    system = tiny(task)
    k, p, T = system.images.slots, PROMPT_LEN[task], system.images.tokens_per_image
    assert T == 2 * 2 + 1 and system.images.num_views == 1         # single view + newline
    exs = [system.preprocess(r, None) for r in records(task, range(8))]
    batch = stack(exs)
    dummy = system.dummy_batch(8)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
        {k: (v.shape, v.dtype) for k, v in dummy.items()}             # static shapes
    for r, e in zip(records(task, range(8)), exs):
      ref = mqt.shapes_example(system, r["index"])             # = make_example(task, 0, ...)
      assert ref["caption"] == shapes_tasks.make_example(
          task, 0, r["index"], 16, 16, mqt.categories_of(system.config), min_images=1,
          max_images=k)["caption"]
      n = len(ref["source_images"])
      assert e["input_valid"].tolist() == [True] * n + [False] * (k - n)
      for j in range(k):
        want = anyres.normalize(ref["source_images"][j][None])[0] if j < n else -1.0
        np.testing.assert_array_equal(e["input_views"][j, 0], np.broadcast_to(
            want, (16, 16, 3)))
      np.testing.assert_array_equal(e["images"], image_ops.to_float(ref["image"]))
      ids, mask = e["prompt_ids"], e["prompt_mask"]
      body = [] if task == "reconstruct" else t.tokenizer.encode(ref["caption"]).ids
      want = [t.bos_id] + [img_id] * (n * T) + body                 # <bos> images caption
      assert list(mask) == [False] * (p - len(want)) + [True] * len(want)     # left padded
      assert ids[-len(want):].tolist() == want and not ids[:p - len(want)].any()
      nwant = [t.bos_id] + [img_id] * (n * T)                       # the null prompt
      assert e["null_ids"][-len(nwant):].tolist() == nwant and e["null_mask"].sum() == len(nwant)
  system = tiny("instruct")                                         # 1..3 images all seen
  n = [int(system.preprocess(r, None)["input_valid"].sum())
       for r in records("instruct", range(16))]
  assert set(n) == {1, 2, 3}
  with pytest.raises(ValueError, match="prompt_len >= 32"):
    tiny("instruct", "--config.model.prompt_len=31")


def test_chat_prompt_places_images_where_the_template_does(tmp_path):
  """kind='chat': LLaVA-OneVision's template renders <image> per image item before the text;
  each becomes T placeholder ids -- what Processor.encode makes of the full chat text."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  words = ["<unk>", "system", "user", "assistant", "you", "describe", "the", "picture", "a"]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  fmt = PromptFormat("chat", 40, 4, str(tmp_path), system_prompt="you describe",
                        image_tokens=3)
  proc = lov.Processor.from_dir(str(tmp_path))
  ids, mask = fmt.encode("describe the picture", 2)
  text = proc.chat([{"role": "system", "content": [{"type": "text", "text": "you describe"}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text",
                                                  "text": "describe the picture"}]}]) + "\n"
  want = proc.encode(text, [anyres.ImageLayout(grid=1, rows=1, cols=1, crop=(0, 1, 0, 1))] * 2)
  assert (want == fmt.image_token_id).sum() == 6
  assert ids[-len(want):].tolist() == want.tolist() and mask.sum() == len(want)
  assert not mask[:40 - len(want)].any()
  e_ids, e_mask = fmt.encode("", 2)                          # null prompt: images, no text
  assert (e_ids == fmt.image_token_id).sum() == 6 and e_mask.sum() == len(want) - 3
  with pytest.raises(ValueError, match="needs"):
    fmt.encode("describe the picture", 12)


def test_image_tokens_are_llava_onevision_splicing():
  """Query states with images (anyres views, rows with 2 and 1 images, left padded) equal
  the unpadded sequence built with LlavaOnevision.embed (its own pack + splice)."""
  system = tiny("instruct", "--config.model.image_views=anyres",
                "--config.model.max_images=2", "--config.model.prompt_len=40")
  imgs = system.images
  assert imgs.num_views == 2 and imgs.tokens_per_image == 4 + 2 * 3
  rng = np.random.default_rng(0)
  pics = [rng.integers(0, 256, (16, 16, 3), np.uint8) for _ in range(3)]
  b = stack([system.preprocess({"image": pics[0], "source_images": pics[:2],
                                "caption": "the circle from the second image"}, None),
             system.preprocess({"image": pics[0], "source_images": pics[2:],
                                "caption": "the square from the first image"}, None)])
  ids, mask, views = (jnp.asarray(b[k]) for k in ("prompt_ids", "prompt_mask", "input_views"))
  qs = MetaQueryModel.query_states
  # only what the query states use (mllm, queries, markers) is initialised
  params = nn.unbox(jax.jit(lambda r: system.model.init(r, ids, mask, views, method=qs))(
      jax.random.PRNGKey(1))["params"])

  @jax.jit
  def ours(p):
    states = system.apply(p, ids, mask, views, method=qs)
    swapped = system.apply(p, ids, mask, views[::-1], method=qs)     # other rows' images
    grad = jax.grad(lambda q: system.apply({**p, "queries": q}, ids, mask, views,
                                           method=qs).sum())(p["queries"])
    return states, swapped, grad

  states, swapped, grad = ours(params)
  llava = lov.LlavaOnevision(system.mllm_cfg)
  lm = DecoderLM(system.mllm_cfg.text)

  @jax.jit
  def reference(p, ids, views):
    x = llava.apply({"params": p["mllm"]}, ids[None], views, (imgs.layout,) * (
        views.shape[0] // imgs.num_views), method=lov.LlavaOnevision.embed)[0]
    emb = p["mllm"]["language_model"]["embed_tokens"]["embedding"]
    seq = jnp.concatenate([x, p["markers"][:1], p["queries"], p["markers"][1:],
                           emb[system.prompts.suffix_ids]])[None]
    h = lm.apply({"params": p["mllm"]["language_model"]}, inputs_embeds=seq,
                 method=DecoderLM.features)
    return h[0, ids.shape[0] + 1:ids.shape[0] + 5]

  for row, n in ((0, 2), (1, 1)):
    want = reference(params, jnp.asarray(b["prompt_ids"][row][b["prompt_mask"][row]]),
                     jnp.asarray(b["input_views"][row, :n].reshape((-1, 16, 16, 3))))
    np.testing.assert_allclose(np.asarray(states[row]), np.asarray(want), atol=2e-5)
  # the images matter, and the queries still get gradients (through the frozen LM)
  assert np.abs(np.asarray(swapped) - np.asarray(states)).mean() > 1e-3
  assert np.abs(np.asarray(grad)).min() > 0


# ----------------------------------------------------------------------------- dropout
def test_dropout_statistics_and_branches():
  n = 200_000
  t, i = mqt.dropout_masks("instruct", jax.random.key(0), n, 0.1)
  t, i = np.asarray(t), np.asarray(i)
  for frac, want in (((t & ~i).mean(), 0.1), ((t & i).mean(), 0.1), ((~t & i).mean(), 0.1),
                     ((~t & ~i).mean(), 0.7)):
    assert abs(frac - want) < 0.005, (frac, want)
  for task in ("edit", "reconstruct"):
    t, i = (np.asarray(a) for a in mqt.dropout_masks(task, jax.random.key(1), n, 0.1))
    assert not t.any() and abs(i.mean() - 0.1) < 0.005
  # what each branch looks like, in the batch the loss sees
  system = tiny("instruct", "--config.model.cond_dropout=0.3")   # bands [0,.3) [.3,.6) [.6,.9)
  b = {k: jnp.asarray(v) for k, v in stack(
      [system.preprocess(r, None) for r in records("instruct", range(12))]).items()}
  rng = jax.random.key(5)
  ids, mask, views, metrics = mqt.drop_conditions(system, rng, b)
  t, i = (np.asarray(a) for a in mqt.dropout_masks("instruct", rng, 12, 0.3))
  assert t.any() and i.any() and (t & i).any() and (~t & ~i).any()
  for r in range(12):
    np.testing.assert_array_equal(ids[r], b["null_ids"][r] if t[r] else b["prompt_ids"][r])
    np.testing.assert_array_equal(mask[r], b["null_mask"][r] if t[r] else b["prompt_mask"][r])
    if i[r]:
      assert (np.asarray(views[r]) == -1.0).all()                 # black: all images
    else:
      np.testing.assert_array_equal(views[r], b["input_views"][r])
  np.testing.assert_allclose(float(metrics["dropped_text"]), t.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["dropped_image"]), i.mean(), rtol=1e-6)


def test_edit_dropout_in_the_loss_is_the_black_image():
  keep, drop = tiny("edit", "--config.model.cond_dropout=0.0"), \
      tiny("edit", "--config.model.cond_dropout=1.0")
  params = system_of("edit")[1]
  b = {k: jnp.asarray(v) for k, v in stack(
      [keep.preprocess(r, None) for r in records("edit", range(4))]).items()}
  rng = jax.random.key(3)
  both = jax.jit(lambda p, b, r: (drop.loss(p, b, r), keep.loss(
      p, dict(b, input_views=-jnp.ones_like(b["input_views"])), r)))
  (l_drop, m), (l_black, m0) = both(params, b, rng)
  assert float(m["dropped_image"]) == 1.0 and float(m["dropped_text"]) == 0.0
  assert float(m0["dropped_image"]) == 0.0
  np.testing.assert_allclose(float(l_drop), float(l_black), rtol=1e-6)


# ----------------------------------------------------------------------------- sampling
def test_three_way_cfg_is_one_program_equal_to_per_branch_steps():
  system, params = system_of("instruct")
  exs = [system.preprocess(r, None) for r in records("instruct", range(3))]
  b = stack(exs)
  assert sorted(b["input_valid"].sum(1).tolist()) != [1, 1, 1]       # mixed image counts
  s_txt, s_img, rng = 3.0, 1.5, jax.random.key(7)
  assert (system.config.sample.guidance, system.config.sample.image_guidance) == (s_txt, s_img)
  ours = np.asarray(mqt.generate_fn(system)(params, {k: b[k] for k in mqt.SAMPLE_KEYS}, rng,
                                            s_txt, s_img))
  assert ours.shape == (3, 16, 16, 3)

  # by hand: three conditions separately, two DPM-Solver++ steps with three DiT calls each
  cond = jax.jit(lambda i, m, v: system.apply(params, i, m, v,
                                              method=MetaQueryModel.condition))
  black = -np.ones_like(b["input_views"])
  c_u = cond(b["null_ids"], b["null_mask"], black)
  c_i = cond(b["null_ids"], b["null_mask"], b["input_views"])
  c_f = cond(b["prompt_ids"], b["prompt_mask"], b["input_views"])
  vel = jax.jit(lambda x, t, c: system.apply(params, x, t, c,
                                             method=MetaQueryModel.velocity))
  sig, ts = solvers.flow_sigmas(2, system.config.sample.flow_shift)
  x = jax.random.normal(rng, (3,) + system.latent_shape, jnp.float32)
  lam = lambda s: np.log(1 - s) - np.log(s)
  for k in range(2):
    t = jnp.full((3,), ts[k])
    v_u, v_i, v_f = (vel(x, t, c) for c in (c_u, c_i, c_f))
    v = v_u + s_img * (v_i - v_u) + s_txt * (v_f - v_i)
    x0 = x - sig[k] * v
    if sig[k + 1] == 0:
      x = x0                                                    # last step: its x0
    else:                                                       # first step: first order
      h = lam(sig[k + 1]) - lam(sig[k])
      x = (sig[k + 1] / sig[k]) * x - (1 - sig[k + 1]) * (np.exp(-h) - 1) * x0
  want = np.asarray(depth_to_space(x, system.config.decoder.pixel_patch))
  np.testing.assert_allclose(ours, want, atol=2e-5)

  jaxpr = jax.make_jaxpr(lambda p, b, r: mqt.generate_batch(system, p, b, r))(params, b, rng)
  eqns = list(_walk(jaxpr.jaxpr))
  assert not [e for e in eqns if e.primitive.name == "while"]
  scans = sorted(e.params["length"] for e in eqns if e.primitive.name == "scan")
  assert scans == [1, 2]           # the SigLIP layer scan (1 layer) and the 2 solver steps
  convs = [e.invars[0].aval.shape for e in _walk(jaxpr.jaxpr)
           if e.primitive.name == "conv_general_dilated" and e.invars[0].aval.shape[-1] == 3]
  assert convs == [(3 * 3 * 3, 16, 16, 3)]       # one tower call: 3 branches x 3 rows x K=3



def test_sample_and_eval_modes(tmp_path):
  """Sample: sources | generated | target per row (the same compiled program as above: 3
  rows). Eval: ShapesEval of the generations against the target scenes."""
  from PIL import Image
  system, params = system_of("instruct")
  path = system.modes()["sample"](params, str(tmp_path), num=3)
  assert path.endswith("samples/metaquery_instruct.png")
  grid = np.asarray(Image.open(path))
  r = 16 * 3
  assert grid.shape[0] == 3 * (r + 16 + 4) and grid.shape[1] >= 5 * (r + 4) + 12
  raw = modes.eval_examples(system, 3)
  target = np.asarray(Image.fromarray(raw[0]["image"]).resize((r, r), Image.NEAREST))
  x = 3 * (r + 4) + 8 + r + 4                                   # the target column
  np.testing.assert_array_equal(grid[:r, x:x + r], target)
  first = np.asarray(Image.fromarray(raw[0]["source_images"][0]).resize((r, r), Image.NEAREST))
  np.testing.assert_array_equal(grid[:r, :r], first)
  # eval: ShapesEval against the target scenes + pixel error, step 0 vs trained
  result = system.modes()["eval"](params, str(tmp_path), num=3)
  saved = json.load(open(tmp_path / "eval" / "shapes_eval_instruct.json"))
  assert saved["task"] == "instruct" and saved["num_images"] == 3
  for k in ("step0", "trained"):
    assert 0 <= result[k]["overall"] <= 1 and 0 < result[k]["pixel_mae"] < 1


# ----------------------------------------------------------------------------- training
# instruct (1..K images, all three dropout kinds) runs in CI; the single-image tasks share
# its code path and run with `pytest -m slow`
@pytest.mark.parametrize("task", [pytest.param("reconstruct", marks=pytest.mark.slow),
                                  pytest.param("edit", marks=pytest.mark.slow), "instruct"])
def test_trainer_step_keeps_the_mllm_and_its_vision_tower_bitwise(task, tmp_path):
  from mmjax.train import loop
  cfg = mcfg.load(f"{CONFIG}:demo_{task}", TINY + [
      f"--config.model.prompt_len={PROMPT_LEN[task]}", "--config.total_steps=1",
      "--config.data.batch_size=8",
      "--config.log_every=1", "--config.optim.warmup_steps=0", "--config.optim.lr=1e-2"])
  system = MetaQuery(cfg)
  init = system_of(task)[1]           # the same config but for the schedule: the same init
  result = loop.train(cfg, str(tmp_path), system=system)
  after = jax.device_get(result.state.params)
  assert "vision_tower" in after["mllm"] and "projector" in after["mllm"]
  for a, b in zip(jax.tree.leaves(init["mllm"]), jax.tree.leaves(after["mllm"])):
    assert a.dtype == b.dtype and np.array_equal(a, b)          # bitwise
  assert not np.array_equal(init["queries"], after["queries"])
  m = result.metrics
  assert np.isfinite(m["loss"]) and "dropped_image" in m and "dropped_text" in m


# ----------------------------------------------------------------------------- paper presets
def test_paper_instruct_preset_shapes():
  """:instruct, abstractly: 6 image slots of 1485 LLaVA-OV tokens (anyres on the 384 crop)
  in a 9280-token prompt, the SigLIP tower in the (frozen) MLLM, lr 5e-5 -> 1e-6."""
  import math
  from mmjax.train.optim import make_schedule
  cfg = mcfg.load(f"{CONFIG}:instruct", ["--config.model.init=random"])
  lr = make_schedule(cfg.optim, cfg.total_steps)      # what the trainer steps with
  assert float(lr(0)) < 1e-7 and float(lr(1000)) < float(lr(2000))        # warmup 2000
  assert math.isclose(float(lr(2000)), 5e-5, rel_tol=1e-4)
  assert math.isclose(float(lr(cfg.total_steps)), 1e-6, rel_tol=1e-3)
  system = MetaQuery(cfg)
  imgs = system.images
  assert (imgs.slots, imgs.num_views, imgs.tile, imgs.tokens_per_image) == (6, 2, 384, 1485)
  batch = system.dummy_batch(1)
  assert batch["input_views"].shape == (1, 6, 2, 384, 384, 3)
  assert batch["prompt_ids"].shape == (1, 9280) and 9280 >= 6 * 1485 + 320
  shapes_ = jax.eval_shape(system.init, jax.random.key(0), batch)["params"]
  mllm = nn.unbox(shapes_["mllm"])
  n_vis = sum(math.prod(a.shape) for a in jax.tree.leaves(mllm["vision_tower"]))
  assert 3.9e8 < n_vis < 4.2e8                       # SigLIP-so400m (26 layers)
  mask = system.trainable_mask(shapes_)
  assert not any(jax.tree.leaves(mask["mllm"]))
  t2i = MetaQuery(mcfg.load(CONFIG, ["--config.model.init=random"]))
  vis = imgs.vision_flops(system.mllm_cfg)          # ~2 x 400M x 729 tokens x 12 views
  assert 5e12 < vis < 1e13
  assert system.flops_per_step(1) > t2i.flops_per_step(1) + vis

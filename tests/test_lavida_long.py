"""LaViDa's long-answer task (configs/lavida.py:demo_long): the shapes world's full scene
descriptions, their per-object / per-attribute scorer, the source, and the eval table."""
import json
import os

import numpy as np
import pytest

from mmjax import config as mcfg
from mmjax.data import pipeline, shapes
from mmjax.data import shapes_describe as sd
from mmjax.data.tokenizer import shapes_tokenizer
from mmjax.eval.captions import score_description, score_descriptions
from mmjax.systems.lavida import eval_long

from lavida_helpers import TINY, random_params, tiny_system


def test_descriptions_round_trip_with_their_lengths():
  n_objects = {}
  for i in range(150):
    scene = sd.sample_scene(0, i)
    text = sd.describe(scene)
    assert sd.parse_description(text) == sd.structure(scene)
    n = len(scene.objects)
    n_objects.setdefault(n, []).append(sd.description_length(scene))
    cells = [sd.cell(o) for o in scene.objects]
    assert cells == sorted(cells)                                # reading order
    for o in scene.objects:                                      # never near a cell border
      assert min(abs(v - t) for v in (o.x, o.y) for t in (1 / 3, 2 / 3)) >= sd.CELL_MARGIN
  assert sorted(n_objects) == [2, 3, 4]
  assert max(n_objects[3]) < 64 <= min(n_objects[4]) and max(n_objects[4]) < 128
  for i in range(20):                          # every colour and shape is written once
    scene = sd.sample_scene(0, i)
    words = sd.describe(scene).split()
    assert sum(w in shapes.COLORS for w in words) == len(scene.objects)
  assert sd.sample_scene(0, 7) == sd.sample_scene(0, 7)          # deterministic


def test_hand_made_description():
  objs = (shapes.Object("circle", "red", 0.2, 0.2, 0.1, 0),
          shapes.Object("square", "orange", 0.8, 0.2, 0.1, 1),
          shapes.Object("triangle", "blue", 0.5, 0.8, 0.1, 2))
  scene = shapes.Scene(objects=objs, groups=(), category="")
  assert sd.describe(scene) == (
      "three objects . a red circle at top left , an orange square at top right , a blue "
      "triangle at bottom center . the first is left of the second , the first is above and "
      "left of the third , the second is above and right of the third .")


def test_tokenizer_source_and_pipeline():
  tok, base = sd.describe_tokenizer(), shapes_tokenizer()
  vocab, old = tok.tokenizer.get_vocab(), base.tokenizer.get_vocab()
  assert all(vocab[w] == i for w, i in old.items()) and tok.vocab_size <= 64
  text = sd.describe(sd.sample_scene(0, 5))
  assert tok.unk_id not in tok.tokenizer.encode(text).ids
  rec = sd.DescribeSource(seed=0, resolution=32)[5]
  assert rec["caption"] == text and rec["image"].shape == (32, 32, 3)
  assert rec["category"] == f"{len(sd.sample_scene(0, 5).objects)}_objects"
  cfg = mcfg.load("configs/lavida.py:demo_long", [])
  assert isinstance(pipeline.make_source(cfg.data, 0), sd.DescribeSource)


def test_description_scores():
  ref = sd.describe(sd.sample_scene(0, 5))             # 4 objects, 6 relations: 19 checks
  assert score_description(ref, ref)["attribute_accuracy"] == 1.0
  wrong = ref.replace("purple square at bottom left", "purple circle at bottom right")
  wrong = wrong.replace("the third is above and right of the fourth",
                        "the third is above the fourth")
  s = score_description(wrong, ref)
  assert s["checks"]["shape"] == (3, 4) and s["checks"]["position"] == (3, 4)
  assert s["checks"]["relation"] == (5, 6)
  assert s["attribute_accuracy"] == pytest.approx(16 / 19) and s["parsed"] and not s["exact"]
  cut = score_description(" ".join(ref.split()[:38]), ref)     # cut after one relation
  assert cut["checks"]["relation"] == (1, 6) and cut["attribute_accuracy"] == pytest.approx(
      14 / 19) and not cut["parsed"]
  junk = score_description(" ".join(ref.split()[:40]), ref)    # ... in the middle of one
  assert junk["attribute_accuracy"] == pytest.approx(14 / 20)
  extra = ref.replace(" . the", " , a red circle at top left . the", 1)
  assert score_description(extra, ref)["attribute_accuracy"] == pytest.approx(19 / 20)
  assert score_description("<mask> hello", ref)["attribute_accuracy"] == 0.0
  many = score_descriptions([ref, "x"], [ref, ref], ["4_objects", "4_objects"])
  assert many["per_attribute"]["color"] == 0.5 and many["per_category"] == {"4_objects": 0.5}
  with pytest.raises(ValueError, match="not a shapes-world description"):
    score_description(ref, "a red circle")


@pytest.fixture(scope="module")
def long_system():
  return tiny_system("--config.data.batch_size=4", "--config.model.answer_len=64",
                     "--config.eval.gen_lengths=(32,)", "--config.eval.num_scenes=3",
                     "--config.eval.caches=('none',)", "--config.eval.thresholds=(0.9,)",
                     "--config.eval.timing_repeats=1", "--config.sample.block_length=16",
                     preset="demo_long", tiny=TINY)


def test_demo_long_system_prompts_and_answers(long_system):
  s = long_system
  assert s.config.model.max_prompt_text == 5 and not s.geometry.anyres          # one view
  assert s.prompt_len == 5 + s.geometry.max_tokens
  rec = sd.DescribeSource(seed=0, resolution=64)[0]
  ex = s.preprocess(rec, None)
  answer = ex["tokens"][s.prompt_len:][ex["answer_mask"][s.prompt_len:]]
  assert s.decode(answer) == rec["caption"]
  full = mcfg.load("configs/lavida.py:demo_long", [])
  assert full.model.answer_len == 128 and full.sample.cache == "dual"


def test_long_eval_table(long_system, tmp_path, monkeypatch):
  s = long_system
  recs, batch = eval_long.held_out_fitting(s, 3, 32)
  assert all(sd.description_length(sd.sample_scene(10_000, r["index"])) < 32 for r in recs)
  assert eval_long.settings(s.config, 32) == [
      ("step 0", "none", 32, None), ("trained", "none", 32, None),
      ("trained", "none", 16, None), ("trained", "none", 8, None),
      ("trained", "none", None, 0.9)]
  full = eval_long.settings
  monkeypatch.setattr(eval_long, "settings", lambda c, g: full(c, g)[1:2] + full(c, g)[-1:])
  result = eval_long.eval_mode(s, random_params(s), str(tmp_path))
  with open(os.path.join(tmp_path, "eval", "lavida_long.json")) as f:
    rows = json.load(f)["rows"]
  assert [(r["cache"], r["threshold"]) for r in rows] == [("none", None), ("none", 0.9)]
  for r in rows:
    assert {"model", "cache", "steps", "threshold", "nfe_percent", "attribute_accuracy",
            "exact", "seconds_per_sample", "speedup", "per_attribute"} <= set(r)
  assert rows[0]["speedup"] == 1.0 and rows[0]["nfe_percent"] == 100.0     # the baseline
  assert rows[1]["nfe"] <= 32 and rows[1]["speedup"] > 0
  assert "speedup" in eval_long.format_table(result)
  assert np.isfinite([r["attribute_accuracy"] for r in rows]).all()

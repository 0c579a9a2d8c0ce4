"""CIDEr-D against the COCO toolkit (pycocoevalcap), its tokenizer approximation, and
LaViDa's caption-set eval on ArrayRecord records."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmjax.data import BadRecord, shapes, sources
from mmjax.eval.cider import cider_d, coco_tokenize
from mmjax.systems.lavida import eval_captions

# a dozen images, 3-5 tokenized references each; candidates: copies of a reference, close
# paraphrases, empty and one-word ones, unrelated text, repeated words (clipping)
REFERENCES = {
    "1": ["a man riding a horse on a beach", "a person rides a brown horse along the shore",
          "a man on a horse near the ocean", "horse and rider on the sand"],
    "2": ["two dogs playing with a frisbee", "a pair of dogs play in the grass",
          "two dogs chase a red frisbee in a park"],
    "3": ["a plate of food with broccoli and rice", "rice and vegetables on a white plate",
          "a dinner plate with chicken broccoli and rice", "a healthy meal on a plate",
          "broccoli rice and chicken served on a plate"],
    "4": ["a red double decker bus on a city street", "a bus driving down the street",
          "a double decker bus parked by the curb"],
    "5": ["a cat sleeping on a laptop keyboard", "a cat lying on a computer",
          "a gray cat naps on an open laptop", "the cat is asleep on the keyboard"],
    "6": ["a kitchen with white cabinets and a stove", "a clean kitchen with a window",
          "white kitchen cabinets above a counter"],
    "7": ["a man holding a tennis racket on a court", "a tennis player swings at the ball",
          "a man playing tennis", "a player on a tennis court with a racket"],
    "8": ["a giraffe standing next to a tree", "a tall giraffe eating leaves",
          "a giraffe in a zoo enclosure", "one giraffe near some trees", "a giraffe outside"],
    "9": ["a stop sign on a street corner", "a red stop sign next to a road",
          "a street sign at an intersection"],
    "10": ["people skiing down a snowy hill", "a group of skiers on a mountain",
           "skiers on the snow", "several people ski down a slope"],
    "11": ["a pizza with cheese and pepperoni", "a large pizza on a table",
           "a pepperoni pizza cut into slices"],
    "12": ["a boat on a lake", "a small boat floating on calm water",
           "a boat sailing near the shore", "a white boat on the water"],
}
CANDIDATES = {
    "1": "a man riding a horse on a beach",                   # a reference, verbatim
    "2": "two dogs play with a frisbee in the grass",
    "3": "",                                                   # empty
    "4": "a bus",                                              # two words
    "5": "cat",                                                # one word
    "6": "a kitchen with white cabinets and a stove",          # a reference, verbatim
    "7": "a man playing tennis on a court with a racket",
    "8": "a giraffe a giraffe a giraffe a giraffe",            # repeated: clipped
    "9": "the quick brown fox jumps over the lazy dog",        # unrelated
    "10": "a group of people skiing on a snowy mountain slope",
    "11": "a plate of food with broccoli and rice",            # another image's reference
    "12": "a boat",
}


def test_matches_pycocoevalcap_cider_d():
  cider = pytest.importorskip("pycocoevalcap.cider.cider")
  gts = REFERENCES
  res = {k: [c] for k, c in CANDIDATES.items()}
  want, want_per = cider.Cider().compute_score(gts, res)
  score, per = cider_d(res, gts)
  assert abs(score - want) < 1e-9
  np.testing.assert_allclose(per, want_per, rtol=0, atol=1e-9)
  assert score > 0 and per[0] > per[8] >= 0 and per[2] == 0.0   # the verbatim beats unrelated
  # plain strings, lists in order, and a shuffled dict give the same numbers
  assert cider_d(CANDIDATES, gts) == (score, per)
  keys = list(gts)
  assert cider_d([CANDIDATES[k] for k in keys], [gts[k] for k in keys]) == (score, per)
  shuffled = {k: CANDIDATES[k] for k in reversed(keys)}
  assert cider_d(shuffled, gts) == (score, per)       # per-image order: the references'
  # a subset: the document frequencies are those of the evaluated set
  sub = {k: gts[k] for k in keys[:5]}
  want_sub, want_sub_per = cider.Cider().compute_score(sub, {k: res[k] for k in sub})
  got_sub, got_sub_per = cider_d({k: CANDIDATES[k] for k in sub}, sub)
  assert abs(got_sub - want_sub) < 1e-9
  np.testing.assert_allclose(got_sub_per, want_sub_per, rtol=0, atol=1e-9)


def test_tokenize_option_and_raw_text():
  raw = {"a": "A Man, riding a horse.", "b": "Two dogs!"}
  refs = {"a": ["a man riding a horse", "A man rides a horse."], "b": ["two dogs"]}
  tokenized = cider_d({k: coco_tokenize(v) for k, v in raw.items()},
                      {k: [coco_tokenize(r) for r in v] for k, v in refs.items()})
  assert cider_d(raw, refs, tokenize=True) == tokenized
  assert cider_d(raw, refs) != tokenized             # untokenized: "horse." is not "horse"


@pytest.mark.parametrize("cands, refs, message", [
    ({"1": "a"}, {"1": []}, r"image '1' has no references"),
    ({"1": "a", "2": "b"}, {"1": ["a"], "3": ["b"]},
     r"different image keys \(no candidate for \['3'\], no references for \['2'\]\)"),
    (["a", "b"], [["a"]], r"2 candidates for 1 reference lists"),
    ({"1": ["a", "b"]}, {"1": ["a"]}, r"candidate of image '1' must be a string"),
    ({"1": "a"}, {"1": ["a", 3]}, r"references of image '1' must be strings"),
    (["a"], {"1": ["a"]}, r"both be dicts or both be lists"),
    ([], [], r"no images to score"),
])
def test_bad_input_is_a_one_line_value_error(cands, refs, message):
  with pytest.raises(ValueError, match=message) as e:
    cider_d(cands, refs)
  assert "\n" not in str(e.value)


# what the COCO toolkit's PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase) then its
# punctuation filter give for these lines
TOKENIZED = [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs' toys (red) and a cat's [blue] {green} bowl!",
     "two dogs toys -lrb- red -rrb- and a cat 's -lsb- blue -rsb- -lcb- green -rcb- bowl"),
    ('He said "hello" -- and left... Don\'t, can\'t, won\'t; I\'m gonna go: wanna?',
     "he said hello and left do n't ca n't wo n't i 'm gon na go wan na"),
    ("The U.S. flag, Mr. Smith's 3.5-inch black-and-white TV & a 1/2 pizza * star",
     "the u.s. flag mr. smith 's 3.5-inch black-and-white tv & a 1/2 pizza * star"),
    ("A  Woman   with an umbrella?!  It's 10:30 a.m. ''quoted'' `back` 'single'",
     "a woman with an umbrella ?! it 's 10:30 a.m. quoted back single"),
    ("people @ the #beach $5 50% off; e-mail: a_b@c.com cannot",
     "people @ the #beach $ 5 50 % off e-mail a_b@c.com can not"),
    ("I'd say we'll go, they're here, we've won", "i 'd say we 'll go they 're here we 've won"),
    ("Wait..", "wait"), ("A sign reads \"STOP\".", "a sign reads stop"), ("", ""),
    ("an 8-year-old boy, eating pizza!!", "an 8-year-old boy eating pizza !!"),
]


def test_coco_tokenize():
  for text, want in TOKENIZED:
    assert coco_tokenize(text) == want, text
  assert all(coco_tokenize(want) == want for _, want in TOKENIZED)   # idempotent
  with pytest.raises(ValueError, match="expected a caption string"):
    coco_tokenize(None)


def test_coco_tokenize_matches_the_java_tokenizer():
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  if shutil.which("java") is None:
    pytest.skip("the COCO toolkit's tokenizer needs java")
  lines = [t for t, _ in TOKENIZED] + ["Two Men Play Frisbee In A Park.", "A."]
  got = ptb.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(lines)})
  assert [coco_tokenize(t) for t in lines] == [got[i][0] for i in range(len(lines))]


# ----------------------------------------------------------------------------- LaViDa eval
def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_caption_set_eval_on_array_records(tmp_path, capsys):
  from lavida_helpers import random_params, tiny_system
  src = shapes.ShapesSource(seed=3, resolution=64)
  examples = []
  for i in range(4):
    rec = src[i]
    texts = {"references": [rec["caption"], "a shape"]} if i % 2 == 0 else {}
    examples.append(sources.Example(_png(rec["image"]), rec["caption"], f"s{i}", f"row {i}",
                                    texts=texts))
  examples.insert(1, sources.Example(b"not an image", "a red circle", "bad", "row bad"))
  out = str(tmp_path / "caps")
  sources.write_records(examples, out, shard_size=3)
  system = tiny_system("--config.data.source=array_record",
                       f"--config.data.path={out}-*.array_record",
                       "--config.eval.num_scenes=3", "--config.eval.batch=2")
  assert system.modes()["eval"].func is eval_captions.caption_set_eval   # --mode eval
  result = eval_captions.caption_set_eval(system, random_params(system), str(tmp_path))
  with open(tmp_path / "eval" / "lavida_captions_cider.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert saved["num_samples"] == 3 and saved["bad_records"] == 1
  caps = saved["captions"]
  assert [c["key"] for c in caps] == ["s0", "s1", "s2"]
  assert caps[0]["references"] == [src[0]["caption"], "a shape"]
  assert caps[1]["references"] == [src[1]["caption"]]
  assert all(isinstance(c["generated"], str) for c in caps)
  score, per = cider_d([c["generated"] for c in caps], [c["references"] for c in caps],
                       tokenize=True)
  assert saved["cider_d"] == score and [c["cider_d"] for c in caps] == per
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("caption eval: CIDEr-D ") and "over 3 samples" in line


def test_caption_eval_needs_a_caption_set():
  from lavida_helpers import tiny_system
  with pytest.raises(ValueError, match="reads data.source in"):
    eval_captions.eval_source(tiny_system().config)


def test_references_of_tfds_records_take_every_caption():
  src = object.__new__(sources.TfdsSource)      # no dataset: the raw examples by hand
  src.caption_key = "captions/text"
  src._source = [{"captions": {"text": np.array([b"a dog", b"a brown dog"], object)}},
                 {"captions": {"text": np.array([], object)}}]
  assert eval_captions.references_of(src, 0, {"caption": "a dog"}) == ["a dog", "a brown dog"]
  with pytest.raises(BadRecord, match="no reference caption"):
    eval_captions.references_of(src, 1, {"caption": "", "key": "k"})
  assert eval_captions.references_of(None, 0, {"caption": "x"}) == ["x"]


def test_answer_text_cuts_at_the_end_marker():
  class Tok:
    def decode(self, ids, skip_special_tokens=True):
      return "<|im_end|>\n" if ids == [7, 8] else "?"
  system = type("S", (), {"prompter": type("P", (), {"tokenizer": Tok(), "answer_end": [7, 8]})})
  assert eval_captions.answer_text(system, " a dog runs<|im_end|>\n<|fim_pad|>") == "a dog runs"
  assert eval_captions.answer_text(system, "a dog") == "a dog"

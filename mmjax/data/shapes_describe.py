"""The shapes world's long-answer task: a full scene description (LaViDa's ``demo_long``).

A scene holds ``MIN_OBJECTS .. MAX_OBJECTS`` objects of independent random colour and shape,
each centred inside one cell of a 3 x 3 grid (``ROWS`` x ``COLS``, kept ``CELL_MARGIN`` away
from the cell borders so the cell is never ambiguous). Its description names the count,
every object with its cell, in reading order (row, then column), and the relation of every
pair (earlier object first, from their cells; objects named by their place in the list)::

    three objects . a red circle at top left , an orange square at top right , a blue
    triangle at bottom center . the first is left of the second , the first is above and
    left of the third , the second is above and right of the third .

Each colour and shape is written once, so it can only come from the image (relations that
repeated them let a model copy them from the text instead of looking). 2 objects: ~26
tokens, 3: ~51, 4: ~85 (`description_length`). `parse_description` reads a
description back (leniently: an item outside the grammar is kept as junk, so a scorer can
count it as wrong); ``mmjax.eval.captions.score_description`` scores one per object and
attribute. `DescribeSource` is the Grain source (records like ``ShapesSource``'s, with the
description as ``caption`` and the question `QUESTION`; optionally a fraction of plain
short captions of ``shapes.sample_scene`` scenes without a question, which teach a small
model to read the image far sooner than descriptions alone); `describe_tokenizer` is the shapes-world word tokenizer with
`WORDS` appended (every id of ``shapes_tokenizer()`` unchanged).

Example::

    from mmjax.data import shapes_describe as sd
    scene = sd.sample_scene(seed=0, index=3)
    text = sd.describe(scene)
    assert sd.parse_description(text) == sd.structure(scene)
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from mmjax.data import shapes
from mmjax.data.shapes_tasks import scene_of

MIN_OBJECTS, MAX_OBJECTS = 2, 4
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL_MARGIN = 0.04          # an object's centre stays this far from the 1/3, 2/3 lines
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
# words beyond the caption vocabulary of ``shapes_tokenizer()``
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
QUESTION = "describe"       # the user turn asking for a description
WORDS = ("one", "five", "six", "object", "objects", "at", "top", "middle", "bottom",
         "center", "is", "the", "next", "to", QUESTION) + ORDINALS
_MIX_SALT = 0xCA97
_SALT = 0xDE5C


# ----------------------------------------------------------------------------- scenes
def cell(obj: shapes.Object) -> tuple[int, int]:
  """``(row, col)`` of the grid cell holding the object's centre."""
  return min(int(obj.y * 3), 2), min(int(obj.x * 3), 2)


def _clear_of_lines(v: float) -> bool:
  return all(abs(v - t) >= CELL_MARGIN for t in (1 / 3, 2 / 3))


def sample_scene(seed: int, index: int, min_objects: int = MIN_OBJECTS,
                 max_objects: int = MAX_OBJECTS) -> shapes.Scene:
  """The scene at ``(seed, index)``: ``n ~ U{min_objects .. max_objects}`` objects, colours
  and shapes drawn independently, placed without overlap (``shapes.GAP``), centres clear of
  the cell borders. Deterministic; objects in reading order."""
  if not 1 <= min_objects <= max_objects <= max(NUMBERS):
    raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) "
                     f"<= {max(NUMBERS)}")
  rng = np.random.Generator(np.random.PCG64([int(seed), int(index), _SALT]))
  n = int(rng.integers(min_objects, max_objects + 1))
  colors = [list(shapes.COLORS)[int(i)] for i in rng.integers(len(shapes.COLORS), size=n)]
  kinds = [shapes.SHAPES[int(i)] for i in rng.integers(len(shapes.SHAPES), size=n)]
  while True:                        # rejection sampling on the same rng: deterministic
    sizes = rng.uniform(*shapes.SIZE_RANGE, size=n)
    placed = []
    for s in sizes:
      lo, hi = s + shapes.BORDER, 1.0 - s - shapes.BORDER
      for _ in range(200):
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        if (_clear_of_lines(x) and _clear_of_lines(y) and
            all(max(abs(x - px), abs(y - py)) - (s + ps) >= shapes.GAP
                for px, py, ps in placed)):
          placed.append((x, y, float(s)))
          break
      else:
        break
    if len(placed) == n:
      break
  objects = [shapes.Object(shape=k, color=c, x=x, y=y, size=s, group=0)
             for k, c, (x, y, s) in zip(kinds, colors, placed)]
  objects.sort(key=lambda o: cell(o) + (o.y, o.x))
  return scene_of(objects)


# ----------------------------------------------------------------------------- text
def relation(a: shapes.Object, b: shapes.Object) -> str:
  """Where ``a`` is from ``b`` by their cells: 'above' / 'below' and / or 'left of' /
  'right of' joined by 'and' (vertical first), 'next to' in the same cell."""
  (ra, ca), (rb, cb) = cell(a), cell(b)
  parts = ([] if ra == rb else ["above" if ra < rb else "below"]) + (
      [] if ca == cb else ["left of" if ca < cb else "right of"])
  return " and ".join(parts) or "next to"


def _article(color: str) -> str:
  return "an" if color[0] in "aeiou" else "a"


def structure(scene: shapes.Scene) -> dict:
  """The description's content: ``{'count', 'objects': [{'color', 'shape', 'row', 'col'}],
  'relations': [{'subject': i, 'relation', 'object': j}]}`` (``i < j`` index the objects) in
  description order (what `parse_description` returns for `describe`'s text)."""
  objs = list(scene.objects)
  rows = [cell(o) for o in objs]
  return {"count": len(objs),
          "objects": [{"color": o.color, "shape": o.shape, "row": ROWS[r], "col": COLS[c]}
                      for o, (r, c) in zip(objs, rows)],
          "relations": [{"subject": i, "relation": relation(a, objs[j]), "object": j}
                        for i, a in enumerate(objs) for j in range(i + 1, len(objs))]}


def describe(scene: shapes.Scene) -> str:
  """The scene's full description (module docstring); objects in the scene's order (reading
  order for `sample_scene`'s scenes)."""
  s = structure(scene)
  n = s["count"]
  head = f"{NUMBERS[n]} object{'s' if n > 1 else ''} ."
  objs = " , ".join(f"{_article(o['color'])} {o['color']} {o['shape']} at {o['row']} {o['col']}"
                    for o in s["objects"])
  text = f"{head} {objs} ."
  if s["relations"]:
    text += " " + " , ".join(f"the {ORDINALS[r['subject']]} is {r['relation']} the "
                             f"{ORDINALS[r['object']]}" for r in s["relations"]) + " ."
  return text


def description_length(scene: shapes.Scene) -> int:
  """Tokens of the description (one per word or punctuation mark)."""
  return len(describe(scene).split())


_RELATIONS = ("above", "below", "left of", "right of", "above and left of",
              "above and right of", "below and left of", "below and right of", "next to")
_COUNTS = {w: n for n, w in NUMBERS.items()}


def _object(words: list) -> Optional[dict]:
  if (len(words) != 6 or words[0] not in ("a", "an") or words[1] not in shapes.COLORS or
      words[2] not in shapes.SHAPES or words[3] != "at" or words[4] not in ROWS or
      words[5] not in COLS):
    return None
  return {"color": words[1], "shape": words[2], "row": words[4], "col": words[5]}


def _relation(words: list) -> Optional[dict]:
  if (len(words) < 6 or words[0] != "the" or words[2] != "is" or words[-2] != "the" or
      words[1] not in ORDINALS or words[-1] not in ORDINALS):
    return None
  rel = " ".join(words[3:-2])
  if rel not in _RELATIONS:
    return None
  return {"subject": ORDINALS.index(words[1]), "relation": rel,
          "object": ORDINALS.index(words[-1])}


def parse_description(text: str, lenient: bool = False) -> Optional[dict]:
  """A description's `structure`, or None when it is not exactly in the grammar.

  ``lenient``: never None; the count is None when the head is unreadable, and items
  (objects between commas, relations) outside the grammar are counted in ``'junk'`` instead
  of failing the whole text. Sections are split at ' . ' (head, objects, relations).
  """
  sections = [s.split() for s in text.replace(".", " . ").split(" . ")]
  sections = [s for s in sections if s]
  out = {"count": None, "objects": [], "relations": [], "junk": 0}
  if sections and len(sections[0]) == 2 and sections[0][0] in _COUNTS and sections[0][1] in (
      "object", "objects"):
    out["count"] = _COUNTS[sections[0][0]]
    sections = sections[1:]
  elif not lenient:
    return None
  for k, section in enumerate(sections[:2]):
    items = " ".join(section).split(",")
    for item in items:
      words = item.split()
      if not words:                       # ", ," or a trailing comma: nothing to score
        continue
      parsed = (_object if k == 0 else _relation)(words)
      if parsed is None:
        parsed = (_relation if k == 0 else _object)(words)   # a section cut short
        kind = "relations" if k == 0 else "objects"
      else:
        kind = "objects" if k == 0 else "relations"
      if parsed is None:
        out["junk"] += 1
      else:
        out[kind].append(parsed)
  out["junk"] += max(len(sections) - 2, 0)
  if lenient:
    return out
  strict = (out["junk"] == 0 and len(out["objects"]) == out["count"] and
            text.strip().endswith("."))
  return ({k: out[k] for k in ("count", "objects", "relations")} if strict else None)


# ----------------------------------------------------------------------------- source
class DescribeSource:
  """Grain random-access source of described scenes: records ``{'image': uint8 [R, R, 3],
  'caption': the description, 'question': QUESTION, 'category': '<n>_objects', 'index',
  'scene': Scene JSON}`` (``ShapesSource``'s keys plus the question, so a captioning system
  trains on it unchanged). With ``caption_fraction`` that share of the records (drawn per
  index) is a ``ShapesSource``-style short caption of ``shapes.sample_scene(seed, index)``
  with an empty question, category 'caption'."""

  def __init__(self, seed: int, length: int = 2**31 - 1, resolution: int = 64,
               min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS,
               caption_fraction: float = 0.0):
    self.seed, self.length, self.resolution = int(seed), int(length), resolution
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    if not 0.0 <= caption_fraction < 1.0:
      raise ValueError(f"caption_fraction={caption_fraction} must be in [0, 1)")
    self.caption_fraction = float(caption_fraction)
    sample_scene(0, 0, self.min_objects, self.max_objects)      # validates the counts

  def is_caption(self, index: int) -> bool:
    if not self.caption_fraction:
      return False
    rng = np.random.Generator(np.random.PCG64([self.seed, int(index), _MIX_SALT]))
    return bool(rng.random() < self.caption_fraction)

  def __len__(self) -> int:
    return self.length

  def scene(self, index: int) -> shapes.Scene:
    return sample_scene(self.seed, index, self.min_objects, self.max_objects)

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"index {index} out of range for DescribeSource of length {self.length}")
    if self.is_caption(index):
      scene = shapes.sample_scene(self.seed, index)
      return {"image": shapes.render(scene, self.resolution), "caption": shapes.caption(scene),
              "question": "", "category": "caption", "index": index,
              "scene": scene.to_json()}
    scene = self.scene(index)
    return {"image": shapes.render(scene, self.resolution), "caption": describe(scene),
            "question": QUESTION, "category": f"{len(scene.objects)}_objects",
            "index": index, "scene": scene.to_json()}

  def __repr__(self) -> str:
    return (f"DescribeSource(seed={self.seed}, length={self.length}, "
            f"resolution={self.resolution}, objects={self.min_objects}..{self.max_objects}, "
            f"caption_fraction={self.caption_fraction})")


def describe_tokenizer():
  """``shapes_tokenizer()`` with `WORDS` appended (existing ids unchanged)."""
  from mmjax.data.tokenizer import extended_shapes_tokenizer  # pylint: disable=import-outside-toplevel
  return extended_shapes_tokenizer(tuple(WORDS))


__all__ = ["sample_scene", "describe", "structure", "parse_description", "relation", "cell",
           "description_length", "DescribeSource", "describe_tokenizer"]

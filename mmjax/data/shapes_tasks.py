"""Shapes-world variants of MetaQuery's image-conditioned tasks, deterministic by index.

Each example is ``(source images, instruction) -> target image`` with exact ground truth
(`shapes.Scene`s for the sources and the target), rendered with `shapes.render`:

* ``reconstruct``: the scene's image in, the same image out; the instruction is empty.
* ``edit``: one source scene (``sample_scene(seed, index)``, i.e. the scene of
  ``ShapesSource(seed)[index]``) and one of three edits:

  - recolour: ``"the same shapes , but blue"`` -- every object takes that colour;
  - move: ``"move the red circle left"`` (left | right | up | down by `MOVE`) -- only that
    object moves; chosen only when the (colour, shape) is unique in the scene and the moved
    object stays inside the image without touching another;
  - remove: ``"remove the blue square"`` -- that object is gone (unique (colour, shape),
    at least two objects in the scene).

  An edit that is impossible in a scene (nothing unique to move or remove, no room) falls
  back to move, remove, recolour (the first possible, in that order).
* ``instruct``: ``n`` source scenes (``min_images <= n <= max_images``, each with one or
  two objects of *different* shapes, so a shape names one object of an image) and a
  composition: ``"the circle from the second image next to the square from the first
  image"`` -> a target with those two objects, in that order left to right, centred
  vertically at size `TARGET_SIZE`, colours taken from the sources (the instruction names
  only shapes: the colour must be read from the image). With one source image:
  ``"the circle from the first image"`` -> that object alone, centred.

Targets carry a GenEval-style category (``single_object`` / ``two_object`` / ``counting`` /
``position`` ...) so `mmjax.eval.shapes_eval.ShapesEval` can judge a generated image
against them.

The instruction words outside the shapes-world caption vocabulary are `EXTRA_WORDS`;
`task_tokenizer()` is the shapes-world word tokenizer with them appended (every id of
``shapes_tokenizer()`` is unchanged, ``<image>`` included).

Example::

    from mmjax.data import shapes_tasks
    ex = shapes_tasks.make_example("edit", seed=0, index=3, resolution=32)
    ex["caption"]                    # e.g. 'move the red circle left'
    ex["source_images"][0].shape     # (32, 32, 3) uint8; ex["image"] is the target
    ex["target_scene"]               # a shapes.Scene
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mmjax.data import shapes

TASKS = ("reconstruct", "edit", "instruct")
EDITS = ("recolor", "move", "remove")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOVE = 0.25                 # normalised distance an object moves
TARGET_SIZE = 0.13          # half-side of the objects of an instruct target
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
MAX_SOURCES = len(ORDINALS)
# source scenes of `instruct`: one or two objects of different shapes
SOURCE_CATEGORIES = ("single_object", "two_object", "color_attr", "position")
EXTRA_WORDS = ("the", "same", "shapes", "but", "move", "up", "down", "remove", "from",
               "image", "next", "to") + ORDINALS
_SALT = {"reconstruct": 0x5EC0, "edit": 0xED17, "instruct": 0x1257}


def _rng(seed: int, index: int, task: str) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64([int(seed), int(index), _SALT[task]]))


# ----------------------------------------------------------------------------- scenes
def scene_of(objects: Sequence[shapes.Object], relation: str | None = None) -> shapes.Scene:
  """A `shapes.Scene` of ``objects`` with groups (per colour + shape, first-seen order) and
  a GenEval category recomputed: one group -> single_object / counting; a relation between
  two single objects -> position; otherwise two_object."""
  keys: list[tuple[str, str]] = []
  for o in objects:
    if (o.color, o.shape) not in keys:
      keys.append((o.color, o.shape))
  counts = {k: sum((o.color, o.shape) == k for o in objects) for k in keys}
  groups = tuple((counts[k], k[0], k[1]) for k in keys)
  objs = tuple(dataclasses.replace(o, group=keys.index((o.color, o.shape))) for o in objects)
  if relation is not None and (len(groups) != 2 or any(g[0] != 1 for g in groups)):
    relation = None
  if relation is not None:
    category = "position"
  elif len(groups) == 1:
    category = "counting" if groups[0][0] > 1 else "single_object"
  else:
    category = "two_object"
  return shapes.Scene(objects=objs, groups=groups, category=category, relation=relation)


def _unique(scene: shapes.Scene) -> list[int]:
  """Indices of objects whose (colour, shape) occurs once in the scene."""
  counts = scene.counts
  return [i for i, o in enumerate(scene.objects) if counts[f"{o.color} {o.shape}"] == 1]


def _fits(obj: shapes.Object, others: Sequence[shapes.Object]) -> bool:
  lo, hi = obj.size + shapes.BORDER, 1.0 - obj.size - shapes.BORDER
  if not (lo <= obj.x <= hi and lo <= obj.y <= hi):
    return False
  return all(max(abs(obj.x - o.x), abs(obj.y - o.y)) - (obj.size + o.size) >= shapes.GAP
             for o in others)


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit of a source scene: the instruction and the edited (target) scene."""
  kind: str                       # recolor | move | remove
  instruction: str
  target: shapes.Scene
  obj: int = -1                   # the moved / removed object's index in the source
  color: str = ""                 # recolor: the new colour
  direction: str = ""             # move: left | right | up | down


def recolor(scene: shapes.Scene, color: str) -> Edit:
  objs = [dataclasses.replace(o, color=color) for o in scene.objects]
  return Edit("recolor", f"the same shapes , but {color}", scene_of(objs, scene.relation),
              color=color)


def move(scene: shapes.Scene, i: int, direction: str) -> Edit | None:
  """Object ``i`` moved by `MOVE` towards ``direction``; None if it would leave the image
  or touch another object."""
  o = scene.objects[i]
  dx, dy = DIRECTIONS[direction]
  moved = dataclasses.replace(o, x=o.x + MOVE * dx, y=o.y + MOVE * dy)
  if not _fits(moved, [p for j, p in enumerate(scene.objects) if j != i]):
    return None
  objs = [moved if j == i else p for j, p in enumerate(scene.objects)]
  return Edit("move", f"move the {o.color} {o.shape} {direction}", scene_of(objs), obj=i,
              direction=direction)


def remove(scene: shapes.Scene, i: int) -> Edit:
  o = scene.objects[i]
  objs = [p for j, p in enumerate(scene.objects) if j != i]
  return Edit("remove", f"remove the {o.color} {o.shape}", scene_of(objs), obj=i)


def sample_edit(scene: shapes.Scene, rng: np.random.Generator,
                kinds: Sequence[str] = EDITS) -> Edit:
  """A random edit of ``scene`` (see the module docstring). When the drawn kind is
  impossible in the scene, move, remove and recolour are tried in that order (recolour
  always works)."""
  kind = kinds[int(rng.integers(len(kinds)))]
  unique = _unique(scene)
  for k in [kind] + [k for k in ("move", "remove", "recolor") if k != kind]:
    if k == "move" and unique:
      options = [(i, d) for i in unique for d in DIRECTIONS]
      for j in rng.permutation(len(options)):
        e = move(scene, *options[int(j)])
        if e is not None:
          return e
    if k == "remove" and unique and len(scene.objects) > 1:
      return remove(scene, unique[int(rng.integers(len(unique)))])
    if k == "recolor":
      present = {o.color for o in scene.objects}
      colors = [c for c in shapes.COLORS if present != {c}]     # something must change
      return recolor(scene, colors[int(rng.integers(len(colors)))])
  raise AssertionError("unreachable: recolour is always possible")


@dataclasses.dataclass(frozen=True)
class Composition:
  """An instruct example: source scenes, the picked ``(image, object)`` pairs in mention
  order, the instruction and the target scene."""
  sources: tuple[shapes.Scene, ...]
  picks: tuple[tuple[int, int], ...]
  instruction: str
  target: shapes.Scene


def source_scene(seed: int, index: int, j: int) -> shapes.Scene:
  """The ``j``-th source scene of instruct example ``index`` (one or two objects, distinct
  shapes)."""
  return shapes.sample_scene(int(seed) * (MAX_SOURCES + 1) + j + 1, index, SOURCE_CATEGORIES)


def compose(sources: Sequence[shapes.Scene], picks: Sequence[tuple[int, int]]) -> Composition:
  """The target of ``picks`` (``(image, object)`` in mention order; one or two): the objects
  left to right at ``x = (k + 1) / (len + 1)``, ``y = 0.5``, size `TARGET_SIZE`."""
  if not 1 <= len(picks) <= 2:
    raise ValueError(f"a composition picks one or two objects, got {len(picks)}")
  parts, objs = [], []
  for k, (img, i) in enumerate(picks):
    o = sources[img].objects[i]
    parts.append(f"the {o.shape} from the {ORDINALS[img]} image")
    objs.append(shapes.Object(shape=o.shape, color=o.color, x=(k + 1) / (len(picks) + 1),
                              y=0.5, size=TARGET_SIZE, group=0))
  relation = "left of" if len(objs) == 2 else None
  return Composition(tuple(sources), tuple(tuple(p) for p in picks), " next to ".join(parts),
                     scene_of(objs, relation))


def sample_composition(seed: int, index: int, min_images: int = 2,
                       max_images: int = MAX_SOURCES) -> Composition:
  if not 1 <= min_images <= max_images <= MAX_SOURCES:
    raise ValueError(f"need 1 <= min_images ({min_images}) <= max_images ({max_images}) "
                     f"<= {MAX_SOURCES}")
  rng = _rng(seed, index, "instruct")
  n = int(rng.integers(min_images, max_images + 1))
  sources = [source_scene(seed, index, j) for j in range(n)]
  images = [0] if n == 1 else [int(i) for i in rng.choice(n, size=2, replace=False)]
  picks = [(img, int(rng.integers(len(sources[img].objects)))) for img in images]
  return compose(sources, picks)


# ----------------------------------------------------------------------------- examples
def make_example(task: str, seed: int, index: int, resolution: int,
                 source_resolution: int | None = None,
                 categories: Sequence[str] | None = None, min_images: int = 2,
                 max_images: int = MAX_SOURCES) -> dict:
  """Example ``index`` of ``task``: ``{'source_images': [uint8 [S, S, 3], ...], 'image':
  uint8 [R, R, 3] (the target), 'caption': instruction, 'source_scenes', 'target_scene',
  'index'}`` (S = ``source_resolution``, default R). ``categories`` restrict the scenes of
  reconstruct / edit (as ``ShapesSource``); instruct sources use `SOURCE_CATEGORIES`."""
  s = source_resolution or resolution
  if task in ("reconstruct", "edit"):
    scene = shapes.sample_scene(seed, index, categories or None)
    if task == "reconstruct":
      target, text = scene, ""
    else:
      e = sample_edit(scene, _rng(seed, index, "edit"))
      target, text = e.target, e.instruction
    sources = (scene,)
  elif task == "instruct":
    c = sample_composition(seed, index, min_images, max_images)
    sources, target, text = c.sources, c.target, c.instruction
  else:
    raise ValueError(f"unknown shapes task {task!r}; known: {TASKS}")
  return {"source_images": [shapes.render(sc, s) for sc in sources],
          "image": shapes.render(target, resolution), "caption": text,
          "source_scenes": tuple(sources), "target_scene": target, "index": int(index)}


class ShapesTaskSource:
  """Grain random-access source of `make_example` records (for evaluation and notebooks;
  training reads ``ShapesSource`` records and ``MetaQuery.preprocess`` derives the same
  examples from their index)."""

  def __init__(self, task: str, seed: int, resolution: int = 32,
               source_resolution: int | None = None, categories: Sequence[str] | None = None,
               min_images: int = 2, max_images: int = MAX_SOURCES, length: int = 2**31 - 1):
    if task not in TASKS:
      raise ValueError(f"unknown shapes task {task!r}; known: {TASKS}")
    self.task, self.seed, self.length = task, int(seed), int(length)
    self.kw = dict(resolution=resolution, source_resolution=source_resolution,
                   categories=tuple(categories) if categories else None,
                   min_images=min_images, max_images=max_images)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index) -> dict:
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"index {index} out of range for a source of length {self.length}")
    return make_example(self.task, self.seed, index, **self.kw)

  def __repr__(self) -> str:
    return f"ShapesTaskSource({self.task!r}, seed={self.seed}, {self.kw})"


def task_tokenizer():
  """``shapes_tokenizer()`` with `EXTRA_WORDS` appended (existing ids unchanged)."""
  from mmjax.data.tokenizer import extended_shapes_tokenizer  # pylint: disable=import-outside-toplevel
  return extended_shapes_tokenizer(tuple(EXTRA_WORDS))

"""Scores generated shapes-world captions against the ground truth, attribute by attribute.

Used by every system that writes text about shapes-world images (the captioner demo,
LaViDa's demo). A caption outside the shapes grammar scores zero.

Attribute checks per reference group ``(count, colour, shape)``: the shape is named (a
generated group of that shape, same colour preferred), its colour is right, its count is
right; plus the relation when the reference has one. Every extra generated group, and a
relation the reference does not have, is one failed check.

Long answers (``mmjax.data.shapes_describe``: a full scene description) are scored per
object and attribute by `score_description`: the count, each reference object's shape,
colour and grid cell (matched to the generated object that agrees most), each pair's
relation; every extra object or relation, and every item outside the grammar, is one failed
check.

Example::

    from mmjax.eval.captions import score_caption
    score_caption("two red circles", "two red circles")["attribute_accuracy"]   # 1.0
    score_caption("a red circle", "two red circles")["attribute_accuracy"]      # 2/3
"""
from __future__ import annotations

import numpy as np

from mmjax.data import shapes
from mmjax.data.shapes_describe import parse_description


def _attribute_checks(gen: dict | None, ref: dict) -> tuple[int, int]:
  """(passed, total) attribute checks of a parsed caption against a parsed reference."""
  total = 3 * len(ref["groups"]) + (1 if ref["relation"] else 0)
  if gen is None:
    return 0, total
  passed = 0
  free = list(gen["groups"])
  for g in ref["groups"]:
    same_shape = [h for h in free if h["shape"] == g["shape"]]
    if not same_shape:
      continue
    match = next((h for h in same_shape if h["color"] == g["color"]), same_shape[0])
    free.remove(match)
    passed += 1 + (match["color"] == g["color"]) + (match["count"] == g["count"])
  total += len(free)  # extra objects named in the caption
  if ref["relation"]:
    passed += gen["relation"] == ref["relation"]
  elif gen["relation"]:
    total += 1
  return passed, total


def score_caption(generated: str, reference: str) -> dict:
  """``{'exact': bool, 'parsed': bool, 'attribute_accuracy': float}`` for one caption."""
  ref = shapes.parse_caption(reference)
  if ref is None:
    raise ValueError(f"reference caption {reference!r} is not in the shapes grammar")
  gen = shapes.parse_caption(generated)
  passed, total = _attribute_checks(gen, ref)
  return {"exact": gen == ref, "parsed": gen is not None,
          "attribute_accuracy": passed / max(total, 1)}


def score_captions(generated, references, categories=None) -> dict:
  """Means over a set: exact match, parse rate, attribute accuracy, and per category."""
  if len(generated) != len(references):
    raise ValueError(f"{len(generated)} generated captions for {len(references)} references")
  rows = [score_caption(g, r) for g, r in zip(generated, references)]
  out = {k: float(np.mean([r[k] for r in rows])) if rows else 0.0
         for k in ("exact", "parsed", "attribute_accuracy")}
  if categories is not None:
    out["per_category"] = {
        c: float(np.mean([r["attribute_accuracy"] for r, cc in zip(rows, categories) if cc == c]))
        for c in sorted(set(categories))}
  return out


# ----------------------------------------------------------------------------- descriptions
DESCRIPTION_ATTRIBUTES = ("count", "shape", "color", "position", "relation")


def _description_checks(gen: dict, ref: dict) -> tuple[dict, int]:
  """Passed checks per attribute and the number of extra (failed) checks of a leniently
  parsed description against a reference one."""
  passed = dict.fromkeys(DESCRIPTION_ATTRIBUTES, 0)
  passed["count"] = int(gen["count"] == ref["count"])
  free = list(gen["objects"])
  for o in ref["objects"]:           # the unused generated object that agrees most
    agree = [(h["shape"] == o["shape"]) + (h["color"] == o["color"]) +
             ((h["row"], h["col"]) == (o["row"], o["col"])) for h in free]
    if not agree or max(agree) == 0:
      continue
    h = free.pop(int(np.argmax(agree)))
    passed["shape"] += h["shape"] == o["shape"]
    passed["color"] += h["color"] == o["color"]
    passed["position"] += (h["row"], h["col"]) == (o["row"], o["col"])
  rels = list(gen["relations"])
  for r in ref["relations"]:         # the generated relation of the same pair
    same = [i for i, g in enumerate(rels)
            if (g["subject"], g["object"]) == (r["subject"], r["object"])]
    if same:
      i = next((i for i in same if rels[i]["relation"] == r["relation"]), same[0])
      passed["relation"] += rels.pop(i)["relation"] == r["relation"]
  return passed, len(free) + len(rels) + gen["junk"]


def score_description(generated: str, reference: str) -> dict:
  """``{'exact', 'parsed', 'attribute_accuracy', 'checks': {attribute: (passed, total)}}``
  for one long description (module docstring): 1 count check, 3 per reference object
  (shape, colour, cell), 1 per reference relation; extras and junk add failed checks."""
  ref = parse_description(reference)
  if ref is None:
    raise ValueError(f"reference {reference!r} is not a shapes-world description")
  gen = parse_description(generated, lenient=True)
  passed, extra = _description_checks(gen, ref)
  totals = {"count": 1, "shape": len(ref["objects"]), "color": len(ref["objects"]),
            "position": len(ref["objects"]), "relation": len(ref["relations"])}
  strict = parse_description(generated)
  return {"exact": strict == ref, "parsed": strict is not None,
          "attribute_accuracy": sum(passed.values()) / (sum(totals.values()) + extra),
          "checks": {k: (passed[k], totals[k]) for k in DESCRIPTION_ATTRIBUTES}}


def score_descriptions(generated, references, categories=None) -> dict:
  """Means over a set (exact, parsed, attribute accuracy), the accuracy of each attribute
  over all its checks (``per_attribute``), and per category."""
  if len(generated) != len(references):
    raise ValueError(f"{len(generated)} generated descriptions for {len(references)} "
                     f"references")
  rows = [score_description(g, r) for g, r in zip(generated, references)]
  out = {k: float(np.mean([r[k] for r in rows])) if rows else 0.0
         for k in ("exact", "parsed", "attribute_accuracy")}
  out["per_attribute"] = {
      a: sum(r["checks"][a][0] for r in rows) / max(sum(r["checks"][a][1] for r in rows), 1)
      for a in DESCRIPTION_ATTRIBUTES}
  if categories is not None:
    out["per_category"] = {
        c: float(np.mean([r["attribute_accuracy"] for r, cc in zip(rows, categories) if cc == c]))
        for c in sorted(set(categories))}
  return out

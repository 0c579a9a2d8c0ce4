"""LaViDa's eval mode on a real caption set (``data.source`` ``array_record`` or ``tfds``):
CIDEr-D (``mmjax.eval.cider``, COCO's tokenization approximated) of the generated captions.

The first ``eval.num_scenes`` records of the configured source (``eval.data_path`` /
``eval.split`` when the config has them and they are set, else ``data.path`` /
``data.split``) are prompted as training prompts them (``Lavida.preprocess``, no answer
needed) and captioned with ``config.sample``'s decoding. References per record: its
``references`` field (a list of strings, e.g. written with
``sources.serialize_record(..., texts={"references": [...]})``) when present, else its
``caption`` (or ``answer``); for TFDS every caption of ``data.caption_key`` when the feature
is a sequence (COCO: 5 per image). Records that fail to decode are skipped and counted.

Writes WORKDIR/eval/lavida_captions_cider.json (score, latency, per-sample captions with
their references and score) and prints a one-line summary. Example::

    python launch/tpu.py --config configs/lavida.py:stage2 --workdir gs://bucket/lavida \\
        --mode eval --config.data.source=tfds --config.data.path=coco_captions \\
        --config.data.split=val --config.data.caption_key=captions/text
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from mmjax.data import BadRecord, sources
from mmjax.data.pipeline import make_source
from mmjax.eval.cider import cider_d
from mmjax.systems.lavida import eval as lavida_eval

SOURCES = ("array_record", "tfds")
_PLACEHOLDER = "a"   # the answer a prompt-only example carries (generation never reads it)


def references_of(source, index: int, record: dict) -> list[str]:
  """The reference captions of record ``index`` (module docstring)."""
  refs = record.get("references")
  if isinstance(refs, str):
    refs = [refs]
  if refs is None and isinstance(source, sources.TfdsSource):    # every caption, not the 1st
    raw = source._source[int(index)]  # pylint: disable=protected-access
    refs = sources._lookup(raw, source.caption_key)  # pylint: disable=protected-access
    if isinstance(refs, (str, bytes)) or getattr(refs, "ndim", 1) == 0:
      refs = None
  if refs is None:
    text = record.get("caption") or record.get("answer")
    refs = [text] if isinstance(text, str) and text.strip() else []
  refs = [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in refs]
  if not refs:
    raise BadRecord(f"record {record.get('key', index)!r} has no reference caption")
  return refs


def answer_text(system, text: str) -> str:
  """A decoded answer up to its end marker (``Prompter.answer_end``: LLaDA's
  ``<|eot_id|>``, Dream's ``<|im_end|>``; ``Lavida.decode`` keeps markers and cuts at EOS)."""
  p = system.prompter
  end = p.tokenizer.decode(list(p.answer_end), skip_special_tokens=False).strip()
  return (text.split(end, 1)[0] if end else text).strip()


def eval_source(config):
  """The source the caption eval reads: ``config.data`` with ``eval.data_path`` /
  ``eval.split`` in place of ``data.path`` / ``data.split`` when those are set."""
  if config.data.source not in SOURCES:
    raise ValueError(f"the caption-set eval reads data.source in {SOURCES}, got "
                     f"{config.data.source!r}")
  data = config.data.copy_and_resolve_references()
  data.path = config.eval.get("data_path", "") or data.path
  data.split = config.eval.get("split", "") or data.split
  return make_source(data, seed=config.seed)


def read_examples(system, source, num: int):
  """``(records, references, batch, bad)``: the first ``num`` records of ``source`` that
  decode (``bad`` counts the others), their references and their prompts as one batch."""
  recs, refs, examples, bad = [], [], [], 0
  for index in range(len(source)):
    if len(recs) == num:
      break
    try:
      record = source[index]
      r = references_of(source, index, record)
      prompt = {k: v for k, v in record.items() if k not in ("caption", "references")}
      examples.append(system.preprocess(dict(prompt, answer=_PLACEHOLDER), None))
    except BadRecord as e:
      bad += 1
      logging.warning("caption eval: record %d skipped: %s", index, e)
      continue
    recs.append(record)
    refs.append(r)
  if not recs:
    raise ValueError(f"no readable caption records in {source!r} ({bad} bad)")
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  return recs, refs, batch, bad


def caption_set_eval(system, params, workdir: str) -> dict:
  """CIDEr-D of ``eval.num_scenes`` captions of the configured caption set (module
  docstring): WORKDIR/eval/lavida_captions_cider.json and a printed line."""
  config = system.config
  source = eval_source(config)
  recs, refs, batch, bad = read_examples(system, source, int(config.eval.num_scenes))
  texts, seconds, nfe = lavida_eval.captions(system, params, batch,
                                             bs=int(config.eval.get("batch", 64)),
                                             **system.sample_options())
  texts = [answer_text(system, t) for t in texts]
  score, per_sample = cider_d(texts, refs, tokenize=True)
  result = {"metric": "CIDEr-D", "cider_d": score, "num_samples": len(recs),
            "bad_records": bad, "source": repr(source), "nfe": nfe,
            "seconds_per_sample": seconds,
            "captions": [{"key": str(r.get("key", "")), "generated": t, "references": ref,
                          "cider_d": s}
                         for r, t, ref, s in zip(recs, texts, refs, per_sample)]}
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", "lavida_captions_cider.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"caption eval: CIDEr-D {score:.4f} over {len(recs)} samples of {source!r} "
        f"({bad} bad records skipped, NFE {nfe:.1f}, {1e3 * seconds:.1f} ms/sample) -> {path}",
        flush=True)
  return result

"""Sequences of the unified model: text and one image between its markers, fixed length.

Text-to-image (``t2i``), right-padded to ``length``::

    [bos] caption... <boi> v_1 ... v_N <eoi> eos pad...     targets: v_1..v_N, <eoi>, eos

Image-to-text (``i2t``)::

    [bos] <boi> v_1 ... v_N <eoi> question... caption... eos pad...   targets: caption, eos

``v_j`` are placeholders (``pad``) that the model replaces with the visual embeddings of
position ``j``; ``start`` is the index of ``v_1``. A blank caption is the unconditional
prompt of classifier-free guidance (caption dropout in training, the second half of the
batch in sampling). Text ids come from any ``tokenizers.Tokenizer`` (the shapes-world one in
the demo, the LM's own ``tokenizer.json`` otherwise); ``bos`` is optional (Qwen has none).

Example::

    p = Prompter.from_tokenizer(tok, bos="<bos>", eos="<eos>", pad="<pad>", boi="<boi>",
                                eoi="<eoi>", positions=64, text_len=12)
    ex = p.t2i("a red circle")      # ids, mask, start, targets, weights, image_weight
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.errors import ConfigError


@dataclasses.dataclass
class Prompter:
  tokenizer: object               # tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int
  pad_id: int
  boi_id: int
  eoi_id: int
  positions: int                  # visual positions per image (N)
  text_len: int                   # caption tokens kept
  question: str = ""              # text after the image in image-to-text examples

  @classmethod
  def from_tokenizer(cls, tokenizer, *, bos: str, eos: str, pad: str, boi: str, eoi: str,
                     positions: int, text_len: int, question: str = "") -> "Prompter":
    def tid(name, token):
      i = tokenizer.token_to_id(token)
      if i is None:
        raise ConfigError(f"text.{name} = {token!r} is not a token of the tokenizer")
      return i
    return cls(tokenizer, tid("bos", bos) if bos else None, tid("eos", eos), tid("pad", pad),
               tid("boi", boi), tid("eoi", eoi), positions, text_len, question)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def head(self) -> list[int]:
    return [] if self.bos_id is None else [self.bos_id]

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tokenizer.decode([i for i in ids if i != self.pad_id and i < self.vocab_size],
                                 skip_special_tokens=True).strip()

  @property
  def length(self) -> int:
    """The fixed training length: the longer of the two layouts."""
    return len(self.head) + self.positions + 3 + self.text_len + len(self.encode(self.question))

  def caption_ids(self, caption: str) -> list[int]:
    return self.encode(caption)[:self.text_len]

  # -- training examples --------------------------------------------------------------------
  def _example(self, seq: list[int], start: int, supervised: list[int], image: bool) -> dict:
    n = self.length
    ids = np.full((n,), self.pad_id, np.int32)
    ids[:len(seq)] = seq
    mask = np.zeros((n,), bool)
    mask[:len(seq)] = True
    targets = np.full((n,), self.pad_id, np.int32)
    weights = np.zeros((n,), np.float32)
    for t in supervised:                     # row t - 1 predicts token t
      targets[t - 1], weights[t - 1] = seq[t], 1.0
    return {"ids": ids, "mask": mask, "start": np.int32(start), "targets": targets,
            "weights": weights, "image_weight": np.float32(image)}

  def t2i(self, caption: str) -> dict:
    """``caption`` -> the image it describes (a blank caption: unconditional)."""
    head = self.head + self.caption_ids(caption) + [self.boi_id]
    start = len(head)
    seq = head + [self.pad_id] * self.positions + [self.eoi_id, self.eos_id]
    return self._example(seq, start, [len(seq) - 2, len(seq) - 1], True)

  def i2t(self, caption: str) -> dict:
    """The image -> ``caption`` (after the optional question)."""
    head = self.head + [self.boi_id]
    start = len(head)
    prompt = head + [self.pad_id] * self.positions + [self.eoi_id] + self.encode(self.question)
    seq = prompt + self.caption_ids(caption) + [self.eos_id]
    return self._example(seq, start, list(range(len(prompt), len(seq))), False)

  # -- sampling prompts ---------------------------------------------------------------------
  def generation_prompt(self, caption: str) -> list[int]:
    """Ids that end with ``<boi>``: the model continues with the image."""
    return self.head + self.caption_ids(caption) + [self.boi_id]

  def understanding_prompt(self) -> tuple[list[int], int]:
    """``(ids, start)``: the image block (placeholders) and the question; the answer follows."""
    head = self.head + [self.boi_id]
    ids = head + [self.pad_id] * self.positions + [self.eoi_id] + self.encode(self.question)
    return ids, len(head)

  def left_pad(self, seqs: list[list[int]], length: int | None = None):
    """``(ids [b, length], mask [b, length])`` with each sequence at the right end."""
    length = max(len(s) for s in seqs) if length is None else length
    ids = np.full((len(seqs), length), self.pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
      if len(s) > length:
        raise ValueError(f"prompt of {len(s)} tokens does not fit {length}")
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = True
    return ids, mask

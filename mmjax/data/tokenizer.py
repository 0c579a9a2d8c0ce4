"""Text tokenizers: a thin fixed-length wrapper over HF ``tokenizers``, and the shapes-world
word-level tokenizer.

``TextTokenizer`` turns text into right-padded ``int32`` ids with a mask (``<bos>`` ...
``<eos>`` ``<pad>`` ...) and back. ``shapes_tokenizer()`` trains a word-level vocabulary on
generated shapes-world captions; special ids are fixed: ``<pad>=0, <bos>=1, <eos>=2,
<unk>=3``, then markers (``<mask>``, ``<image>``, ``<boi>``, ``<eoi>``, ``<extra_0..7>``)
that systems may use, then the words in sorted order.

Example::

    from mmjax.data.tokenizer import shapes_tokenizer
    tok = shapes_tokenizer()
    ids, mask = tok.encode("two red circles", max_len=8)   # int32 [8], bool [8]
    assert tok.decode(ids) == "two red circles"
"""
from __future__ import annotations

import functools

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
MARKER_TOKENS = ("<mask>", "<image>", "<boi>", "<eoi>") + tuple(f"<extra_{i}>" for i in range(8))


class TextTokenizer:
  """Fixed-length encode/decode around a ``tokenizers.Tokenizer``.

  >>> tok = shapes_tokenizer()
  >>> ids, mask = tok.encode("a blue square", max_len=6)
  >>> ids.tolist()[0] == tok.bos_id, mask.tolist()
  (True, [True, True, True, True, True, False])
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, pad: str = "<pad>", bos: str = "<bos>",
               eos: str = "<eos>", unk: str = "<unk>"):
    self.tokenizer = tokenizer
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
        self.token_id(t) for t in (pad, bos, eos, unk))

  @classmethod
  def from_file(cls, path: str, **special) -> "TextTokenizer":
    """Loads a ``tokenizer.json`` (any HF fast tokenizer), e.g. a model's own."""
    return cls(tokenizers.Tokenizer.from_file(path), **special)

  def save(self, path: str) -> None:
    self.tokenizer.save(path)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    """Id of a token (e.g. a marker such as '<image>'); KeyError if absent."""
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return i

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [max_len], mask bool [max_len])``: <bos> text <eos>, right-padded.

    Text longer than ``max_len - 2`` tokens is truncated (<eos> is kept).
    """
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for <bos> and <eos>")
    body = self.tokenizer.encode(text, add_special_tokens=False).ids[:max_len - 2]
    seq = [self.bos_id, *body, self.eos_id]
    ids = np.full((max_len,), self.pad_id, np.int32)
    ids[:len(seq)] = seq
    mask = np.zeros((max_len,), bool)
    mask[:len(seq)] = True
    return ids, mask

  def encode_batch(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacked `encode`: ``(ids int32 [B, max_len], mask bool [B, max_len])``."""
    pairs = [self.encode(t, max_len) for t in texts]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def decode(self, ids) -> str:
    """Text of ``ids`` up to the first <eos>, <bos>/<pad> dropped (<unk>, markers kept)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
    return self.tokenizer.decode(ids, skip_special_tokens=False)


def _training_text(num_captions: int, seed: int):
  # Imported here so the tokenizer module does not need the shapes world to be loaded.
  from mmjax.data import shapes  # pylint: disable=import-outside-toplevel
  words = (list(shapes.COLORS) + list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES]
           + list(shapes.COUNT_WORDS.values()) + ["an", "and", ".", ","]
           + [w for r in shapes.RELATIONS for w in r.split()])
  yield " ".join(words)  # every word of the grammar, however rare in the sample
  for i in range(num_captions):
    yield shapes.caption(shapes.sample_scene(seed, i))


@functools.lru_cache(maxsize=None)
def shapes_tokenizer(num_captions: int = 512, seed: int = 0) -> TextTokenizer:
  """Word-level tokenizer for the shapes world, built in memory (~0.1 s), same ids every time.

  The ``tokenizers`` WordLevel trainer collects the vocabulary from generated captions;
  ids are then assigned specials first and words sorted, so they do not depend on how the
  trainer breaks frequency ties.

  >>> tok = shapes_tokenizer()
  >>> tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id
  (0, 1, 2, 3)
  """
  specials = list(SPECIAL_TOKENS + MARKER_TOKENS)
  norm = normalizers.Lowercase()
  pre = pre_tokenizers.Whitespace()
  draft = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  draft.normalizer, draft.pre_tokenizer = norm, pre
  trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1,
                                      show_progress=False)
  draft.train_from_iterator(_training_text(num_captions, seed), trainer=trainer)
  words = sorted(w for w in draft.get_vocab() if w not in specials)
  vocab = {t: i for i, t in enumerate(specials + words)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.normalizer, tok.pre_tokenizer = norm, pre
  tok.add_special_tokens(specials)
  return TextTokenizer(tok)


@functools.lru_cache(maxsize=None)
def extended_shapes_tokenizer(words: tuple) -> TextTokenizer:
  """``shapes_tokenizer()`` with ``words`` appended in order (every existing id unchanged):
  the shapes-world tasks with a few more words (``shapes_tasks``, ``shapes_describe``)."""
  base = shapes_tokenizer()
  vocab = dict(base.tokenizer.get_vocab(with_added_tokens=True))
  for w in words:
    if w not in vocab:
      vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.normalizer, tok.pre_tokenizer = base.tokenizer.normalizer, base.tokenizer.pre_tokenizer
  tok.add_special_tokens(list(SPECIAL_TOKENS + MARKER_TOKENS))
  return TextTokenizer(tok)

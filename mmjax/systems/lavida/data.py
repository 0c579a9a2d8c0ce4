"""LaViDa's inputs on the host: anyres views as a static gather, the chat prompt, the answer.

Everything here is numpy, run per example in the Grain pipeline (``Lavida.preprocess``), and
produces fixed shapes so one compiled train step serves every image size:

* **Views** (`VisionGeometry`): the base view (the whole image resized to ``tile x tile``,
  not padded) plus the anyres grid crops (``models.anyres.image_views`` with LaViDa's grid
  pinpoints), padded with blank views to ``max_views``. How the per-view feature grids become
  image tokens -- base view, then the grid picture unpadded to the image's aspect with an
  ``image_newline`` after each row -- is a host-computed *gather index* into the table
  ``[views * grid^2 features, newline]``: the image's layout varies per example, the model's
  program does not. (``LlavaOnevision.pack`` builds the same tokens from a static layout;
  ``tests/test_lavida.py`` checks the two agree.) Stage 1 uses the base view alone, unpooled,
  without newline.
* **Prompt** (`Prompter`): the chat template around one ``<image>`` placeholder, expanded to
  ``max_tokens`` image slots holding LaViDa's ``IMAGE_TOKEN_INDEX`` (-200; slots past the
  image's own token count are padding), left padded to the prompt length. LLaDA: LLaMA-3
  headers with ``<|eot_id|>``; Dream: Qwen's ``<|im_start|>``, answers end ``<|im_end|>\n``;
  both with LaViDa's system message. The shapes demo: marker tokens of the shapes-world
  tokenizer standing in for the headers. The template's special tokens are encoded without
  the tokenizer's own additions (one BOS, even from a tokenizer that adds one).
* **Answer**: the answer's tokens (stage 3: [S]/[FIM] segments from
  ``mmjax.data.masked_text.fim_insert``), the end-of-turn marker, then EOS padding that is
  *supervised*: the row is padded with EOS to ``answer + max(0, e)`` tokens,
  ``e ~ U[extra_pad)``, clipped to the answer slot; positions past that are padding (never
  attended, never in the loss). LaViDa's collator pads to the batch's longest answer plus
  such a random extra: ``Lavida.loss`` extends every row to the batch's longest
  (``Lavida.pad_to_batch``), so a row's slot does not give away its answer's length.

Example::

    import numpy as np
    from mmjax.data.tokenizer import shapes_tokenizer
    from mmjax.systems.lavida import data as ld
    geo = ld.VisionGeometry(tile=16, patch=2, anyres=True, pool=True)
    views, index = geo.views(np.zeros((32, 32, 3), np.uint8))   # [5, 16, 16, 3], [88]
    prompter = ld.Prompter.shapes(shapes_tokenizer())
    ex = ld.make_example(prompter, geo, np.zeros((32, 32, 3), np.uint8), "a red circle",
                         np.random.default_rng(0), max_prompt_text=8, answer_len=16)
    sorted(ex)   # ['answer_mask', 'fim_mask', 'image_index', 'images', 'slot_mask', 'tokens']
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from mmjax.data import BadRecord
from mmjax.data import image as image_ops
from mmjax.data import masked_text
from mmjax.models import anyres

# LaViDa's anyres grid resolutions (height, width) for 384px views.
GRID_PINPOINTS = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
BASE_TILE = 384
# LaViDa's system message: its "llada" and "dream" conversation templates both use it (not
# Dream's default "You are a helpful assistant.").
LAVIDA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                 "the visual content that the user provides, and assist the user with a variety "
                 "of tasks using natural language.")
# The image's place in the prompt ids: LLaVA's IMAGE_TOKEN_INDEX sentinel, no vocabulary id
# (LaViDa's release has no image token; ``<image>`` only exists in a copy of its tokenizer).
IMAGE_TOKEN_INDEX = -200
PROMPT_KINDS = ("llada", "dream", "shapes")
PAD_INDEX = -1        # image slot without a feature (the image has fewer tokens than max)


# ============================================================================ views
@dataclasses.dataclass(frozen=True)
class VisionGeometry:
  """Static image geometry: view side ``tile`` px, ``patch`` px per SigLIP patch, anyres grid
  or a single view, bilinear pooling of each view's ``g x g`` features to ``ceil(g / 2)``.

  LaViDa-L: tile 384, patch 14 (27 x 27 features), pooled to 14 x 14; a square image gets
  196 (base) + 28 * 28 (2 x 2 grid) + 28 newlines = 1008 tokens.
  """
  tile: int
  patch: int
  anyres: bool = True
  pool: bool = True
  pinpoints: tuple = GRID_PINPOINTS   # for tile 384; scaled to `tile`

  def __post_init__(self):
    scaled = [(h * self.tile / BASE_TILE, w * self.tile / BASE_TILE) for h, w in self.pinpoints]
    if any(h % self.tile or w % self.tile for h, w in scaled):
      raise ValueError(f"grid pinpoints {self.pinpoints} do not scale to whole {self.tile}px "
                       f"tiles")

  @property
  def feature_grid(self) -> int:
    """SigLIP features per view side (27 for 384 / 14: the stride-14 patch conv drops the
    last 6 pixels)."""
    return self.tile // self.patch

  @property
  def grid(self) -> int:
    """Tokens per view side after pooling (14), or the feature grid without pooling."""
    return math.ceil(self.feature_grid / 2) if self.pool else self.feature_grid

  @property
  def resolutions(self) -> tuple:
    return tuple((h * self.tile // BASE_TILE, w * self.tile // BASE_TILE)
                 for h, w in self.pinpoints)

  @property
  def max_views(self) -> int:
    if not self.anyres:
      return 1
    return 1 + max((h // self.tile) * (w // self.tile) for h, w in self.resolutions)

  @property
  def max_tokens(self) -> int:
    """Image slots in the prompt: the most tokens any image can need."""
    g = self.grid
    if not self.anyres:
      return g * g
    grids = [(h // self.tile, w // self.tile) for h, w in self.resolutions]
    return g * g + max(r * g * (c * g + 1) for r, c in grids)

  @property
  def newline_index(self) -> int:
    """Row of ``image_newline`` in the per-example feature table."""
    return self.max_views * self.grid ** 2

  def layout_index(self, layout: anyres.ImageLayout) -> np.ndarray:
    """Gather index ``[max_tokens]`` of one image's tokens into the feature table
    ``[max_views * grid^2 + 1]`` (newline last); ``PAD_INDEX`` past the image's tokens."""
    g, newline = layout.grid, self.newline_index
    if layout.resize_to is not None:
      raise ValueError("LaViDa's layout never shrinks the grid picture (max_views=None)")
    out = [np.arange(g * g)]                                    # the base view
    if layout.rows:
      top, bottom, left, right = layout.crop
      r = np.arange(top, bottom)[:, None]
      c = np.arange(left, right)[None, :]
      view = 1 + (r // g) * layout.cols + c // g                 # grid crops are row-major
      picture = view * g * g + (r % g) * g + c % g               # [h, w]
      out.append(np.concatenate([picture, np.full((len(picture), 1), newline)], 1).reshape(-1))
    index = np.concatenate(out)
    if len(index) > self.max_tokens:
      raise ValueError(f"layout needs {len(index)} tokens, geometry allows {self.max_tokens}")
    return np.pad(index, (0, self.max_tokens - len(index)),
                  constant_values=PAD_INDEX).astype(np.int32)

  def views(self, image: np.ndarray):
    """uint8 ``[H, W, 3]`` -> (normalised views ``[max_views, tile, tile, 3]`` float32,
    gather index ``[max_tokens]`` int32). Blank views pad the grid to ``max_views``."""
    if self.anyres:
      views, layout = anyres.image_views(image, self.resolutions, self.tile, self.grid,
                                         max_views=None)
    else:
      views = image_ops.resize(image, self.tile, "bicubic")[None]
      layout = None
    views = np.concatenate([views, np.zeros((self.max_views - len(views),) + views.shape[1:],
                                            views.dtype)])
    if layout is None:
      index = np.arange(self.grid ** 2, dtype=np.int32)
    else:
      index = self.layout_index(layout)
    return anyres.normalize(views), index


# ============================================================================ prompt
def _special_ids(tokenizer, model: str, names: Sequence[str]):
  """``token_to_id`` after checking the chat template's special tokens are single tokens of
  ``tokenizer`` (a tokenizer without them would silently split the markers into text)."""
  missing = [n for n in names if tokenizer.token_to_id(n) is None]
  if missing:
    raise ValueError(f"the tokenizer has no {', '.join(missing)} token(s): the chat template "
                     f"needs {model}'s tokenizer (tokenizer.json)")
  return tokenizer.token_to_id


class Prompter:
  """Chat template + tokenizer: prompt ids with one image placeholder, answers as words.

  ``tokenizer`` is a ``tokenizers.Tokenizer``. Special ids: ``mask_id`` ([MASK]), ``eos_id``
  (EOS padding), ``fim_id`` / ``s_id`` (stage 3), ``image_id`` (placeholder, replaced by
  image features: ``IMAGE_TOKEN_INDEX``), ``answer_end`` (ids closing the answer:
  ``<|eot_id|>`` for LLaDA, ``<|im_end|>\n`` for Dream).
  """

  def __init__(self, kind: str, tokenizer, *, prefix: str, suffix: str, mask_id: int,
               eos_id: int, fim_id: int, s_id: int, answer_end: Sequence[int],
               image_id: int = IMAGE_TOKEN_INDEX,
               bos: Sequence[int] = (), pad_id: Optional[int] = None,
               question: str = ""):
    if kind not in PROMPT_KINDS:
      raise ValueError(f"prompt kind {kind!r} is not one of {PROMPT_KINDS}")
    self.kind, self.tokenizer = kind, tokenizer
    self.prefix_ids = list(bos) + self._ids(prefix)
    self.suffix_template = suffix
    self.mask_id, self.eos_id, self.fim_id, self.s_id = mask_id, eos_id, fim_id, s_id
    self.image_id, self.answer_end = image_id, list(answer_end)
    self.pad_id = eos_id if pad_id is None else pad_id
    self.question = question

  def _ids(self, text: str) -> list:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  # -- the three templates ----------------------------------------------------------------
  @classmethod
  def shapes(cls, tok, question: str = "") -> "Prompter":
    """The CPU demo: shapes-world word tokenizer (``mmjax.data.tokenizer``); markers stand in
    for the chat headers (<extra_0> system, <extra_1> user, <extra_2> assistant, <extra_3>
    end of turn), <extra_4> is [FIM], <extra_5> is [S]; the answer ends with <eos>."""
    t = tok.token_id
    return cls("shapes", tok.tokenizer, prefix="<extra_1>", suffix="{question}<extra_3><extra_2>",
               mask_id=t("<mask>"), eos_id=tok.eos_id, fim_id=t("<extra_4>"),
               s_id=t("<extra_5>"), answer_end=[tok.eos_id],
               bos=[tok.bos_id], pad_id=tok.pad_id, question=question)

  @classmethod
  def llada(cls, tokenizer, question: str = "Describe the image.") -> "Prompter":
    """LLaDA-8B-Instruct's tokenizer with LaViDa's "llada" conversation template: one
    ``<|startoftext|>``, LLaMA-3 headers, LaViDa's system message; answers end
    ``<|eot_id|>``."""
    t = _special_ids(tokenizer, "LLaDA-8B-Instruct", ("<|startoftext|>", "<|start_header_id|>",
                                                      "<|end_header_id|>", "<|eot_id|>"))
    head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    return cls("llada", tokenizer,
               prefix=head("system") + LAVIDA_SYSTEM + "<|eot_id|>" + head("user"),
               suffix="\n{question}<|eot_id|>" + head("assistant"),
               mask_id=126336, eos_id=126081, fim_id=126085, s_id=126086,
               answer_end=[t("<|eot_id|>")],
               bos=[t("<|startoftext|>")], question=question)

  @classmethod
  def dream(cls, tokenizer, question: str = "Describe the image.") -> "Prompter":
    """Dream-7B's (Qwen2.5) tokenizer and ChatML template as LaViDa-Dream trains and infers
    with it: LaViDa's system message in place of Dream's default, answers end
    ``<|im_end|>\n``; [FIM] / [S] are Qwen's ``<|fim_middle|>`` / ``<|fim_pad|>``."""
    t = _special_ids(tokenizer, "Dream-v0-Instruct-7B", ("<|im_start|>", "<|im_end|>",
                                                         "<|fim_middle|>", "<|fim_pad|>"))
    newline = list(tokenizer.encode("\n", add_special_tokens=False).ids)
    return cls("dream", tokenizer,
               prefix=f"<|im_start|>system\n{LAVIDA_SYSTEM}<|im_end|>\n<|im_start|>user\n",
               suffix="\n{question}<|im_end|>\n<|im_start|>assistant\n",
               mask_id=151666, eos_id=151643, fim_id=t("<|fim_middle|>"),
               s_id=t("<|fim_pad|>"), answer_end=[t("<|im_end|>")] + newline,
               question=question)

  # -- encoding -----------------------------------------------------------------------------
  def template_len(self) -> int:
    """Prompt text tokens (placeholder excluded) with an empty question."""
    return len(self.prefix_ids) + len(self._ids(self.suffix_template.replace("{question}", "")))

  def prompt(self, question: Optional[str], image_slots: int, max_text: int):
    """Prompt ids ``[max_text + image_slots]``, left padded, with ``image_slots``
    placeholders; and its mask (True on real text; the caller masks padded image slots)."""
    question = self.question if question is None else question
    suffix = self._ids(self.suffix_template.replace("{question}", question))
    text = len(self.prefix_ids) + len(suffix)
    if text > max_text:
      raise BadRecord(f"prompt of {text} text tokens exceeds model.max_prompt_text={max_text}")
    ids = self.prefix_ids + [self.image_id] * image_slots + suffix
    pad = max_text - text
    return (np.asarray([self.pad_id] * pad + ids, np.int32),
            np.asarray([False] * pad + [True] * (text + image_slots)))

  def draft(self, pieces, fim: bool = False, complete: bool = True) -> np.ndarray:
    """An infill draft's ids from pieces: a string is encoded as written, an int ``n >= 1``
    is a hole of ``n`` ``mask_id`` slots (then a [FIM] marker when ``fim``: LaViDa-FIM
    marks where each hole ends). ``complete``: the pieces are the whole answer, so the
    answer's end marker (``answer_end``) follows them, as in training; without it a hole at
    the end reads as the answer's end and tends to be filled with EOS.

    >>> prompter.draft(["a", 2, "circle"])        # [id('a'), M, M, id('circle')]
    """
    if isinstance(pieces, (str, int)):
      raise ValueError(f"a draft is a list of pieces (str or int), got {pieces!r}")
    ids = []
    for piece in pieces:
      if isinstance(piece, bool) or not isinstance(piece, (str, int, np.integer)):
        raise ValueError(f"draft piece {piece!r} is not a string or a hole length")
      if isinstance(piece, str):
        ids += self._ids(piece)
      elif piece < 1:
        raise ValueError(f"a draft hole needs at least one slot, got {piece}")
      else:
        ids += [self.mask_id] * int(piece) + ([self.fim_id] if fim else [])
    if self.mask_id not in ids:
      raise ValueError(f"draft {pieces!r} has no hole (an int piece) to fill")
    return np.asarray(ids + (list(self.answer_end) if complete else []), np.int32)

  def answer_words(self, answer: str) -> list:
    """The answer's token ids grouped by word (what FIM inserts between)."""
    enc = self.tokenizer.encode(answer, add_special_tokens=False)
    words, last = [], object()
    for i, w in zip(enc.ids, enc.word_ids):
      if w is None or w != last:
        words.append([])
      words[-1].append(i)
      last = w
    return [np.asarray(w, np.int32) for w in words]


def make_example(prompter: Prompter, geometry: VisionGeometry, image: np.ndarray, answer: str,
                 rng: Optional[np.random.Generator], *, max_prompt_text: int, answer_len: int,
                 question: Optional[str] = None, extra_pad=(0, 1), fim: bool = False,
                 fim_prob: float = 0.8) -> dict:
  """One training / prompting example as fixed-shape arrays (``T = P + answer_len``,
  ``P = max_prompt_text + geometry.max_tokens``):

  ``tokens [T]`` int32 (prompt then answer), ``slot_mask [T]`` (real positions),
  ``answer_mask [T]`` (answer and its supervised EOS padding: what the forward process may
  mask), ``fim_mask [T]`` ([FIM] markers: never masked), ``images [V, tile, tile, 3]``,
  ``image_index [max_tokens]``. ``rng=None`` (prompting): no extra pad, no FIM.
  An answer longer than ``answer_len`` (with its end marker) is a ``BadRecord``; a FIM
  insertion that would not fit is skipped for that example (it trains without FIM).
  """
  views, index = geometry.views(image)
  prompt, prompt_mask = prompter.prompt(question, geometry.max_tokens, max_prompt_text)
  slots = np.flatnonzero(prompt == prompter.image_id)
  if len(slots) != geometry.max_tokens:
    raise BadRecord(f"the prompt has {len(slots)} image placeholders, expected "
                    f"{geometry.max_tokens} (does the question contain the placeholder?)")
  prompt_mask[slots] = index != PAD_INDEX

  words = prompter.answer_words(answer)
  end = np.asarray(prompter.answer_end, np.int32)
  ids = np.concatenate(words) if words else np.zeros((0,), np.int32)
  fim_marks = np.zeros(ids.shape, bool)
  if len(ids) + len(end) > answer_len:      # never cut an answer short: a visible bad record
    raise BadRecord(f"answer of {len(ids) + len(end)} tokens (with its end marker) exceeds "
                    f"model.answer_len={answer_len}")
  if fim and rng is not None:
    fim_ids, fim_fim = masked_text.fim_insert(words, rng, prompter.s_id, prompter.fim_id,
                                              prob=fim_prob)
    if len(fim_ids) + len(end) <= answer_len:   # else this example stays without FIM
      ids, fim_marks = fim_ids, fim_fim
  ids = np.concatenate([ids, end])
  fim_marks = np.concatenate([fim_marks, np.zeros(end.shape, bool)])
  extra = int(rng.integers(*extra_pad)) if rng is not None else 0
  body, supervised = masked_text.pad_answers_with_eos([ids], [len(ids)], prompter.eos_id,
                                                      extra_pad=extra, max_len=answer_len)
  n = body.shape[1]
  answer = np.full((answer_len,), prompter.eos_id, np.int32)
  answer[:n] = body[0]
  answer_mask = np.zeros((answer_len,), bool)
  answer_mask[:n] = supervised[0]
  fim_answer = np.zeros((answer_len,), bool)
  fim_answer[:min(n, len(fim_marks))] = fim_marks[:n]
  p = len(prompt)
  return {"tokens": np.concatenate([prompt, answer]),
          "slot_mask": np.concatenate([prompt_mask, answer_mask]),
          "answer_mask": np.concatenate([np.zeros((p,), bool), answer_mask]),
          "fim_mask": np.concatenate([np.zeros((p,), bool), fim_answer]),
          "images": views, "image_index": index}

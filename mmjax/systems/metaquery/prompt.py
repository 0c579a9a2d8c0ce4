"""MetaQuery's prompt layout: caption -> left-padded prompt ids, and what follows the queries.

The sequence the frozen MLLM reads (spec "Prompt layout")::

    prompt (left padded to model.prompt_len) | <begin_of_img> q_0 .. q_{N-1} <end_of_img> | suffix

``PromptFormat`` makes the prompt part and names the suffix; the queries and markers are
parameters (`mmjax.systems.metaquery.bridge`). ``chat``: the MLLM's chat template with the
reference's system prompt; ``plain``: ``<bos> caption`` over a word tokenizer (CPU demos).

Example::

    fmt = PromptFormat("plain", max_len=8, caption_tokens=6)
    ids, mask = fmt.encode("a red circle")        # int32 [8], bool [8], left padded
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mmjax.data.tokenizer import shapes_tokenizer
from mmjax.errors import ConfigError
from mmjax.models import llava_onevision as lov
from mmjax.models import qwen2_5_vl as qvl

# The reference's system prompt (spec: "Prompt layout").
SYSTEM_PROMPT = ("You will be given an image or its caption. Please describe the content of "
                 "the image in detail in your own words.")


def qvl_image_token() -> str:
  """Qwen2.5-VL's image placeholder (its checkpoints' tokenizer)."""
  return "<|image_pad|>"


class PromptFormat:
  """Caption -> left-padded prompt ids ``[max_len]`` + mask, and the tokens that follow the
  ``<end_of_img>`` marker.

  ``kind='chat'``: the MLLM's own chat template (``llava_onevision.Processor``): system
  prompt, user turn with the caption (truncated to ``caption_tokens``), generation prompt,
  then ``"\\n"``; after the queries come ``<end_of_img><|im_end|>``.
  ``kind='plain'``: ``<bos> caption`` with a word tokenizer (the shapes-world demo MLLM has
  no chat template; ``tokenizer`` overrides ``shapes_tokenizer()``); ``<eos>`` follows the
  end marker.

  Input images (MetaQuery's image tasks): ``encode(caption, num_images=n)`` puts ``n`` image
  placeholders where the template puts them -- chat: the user turn's ``{"type": "image"}``
  items, rendered by the checkpoint's template (LLaVA-OneVision: ``<image>`` before the
  text; Qwen2.5-VL, ``image_token='<|image_pad|>'``: ``<|vision_start|><|image_pad|>
  <|vision_end|>``); plain: right after ``<bos>`` -- each expanded to ``image_tokens`` copies of the
  image token id (``image_token_id``), which the model replaces by the image's features.

  A text-only prompt longer than ``max_len`` keeps its *end* (the caption is already
  truncated, so only an absurdly long template would lose its start) -- the queries always
  see the generation prompt. A prompt with images that does not fit is a configuration
  error (``model.prompt_len`` too small), never silently cut.
  """

  def __init__(self, kind: str, max_len: int, caption_tokens: int = 256,
               tokenizer_dir: str = "", system_prompt: str = SYSTEM_PROMPT,
               suffix_ids: Sequence[int] = (), image_tokens: int = 0, tokenizer=None,
               image_token: str = "<image>"):
    self.kind, self.max_len, self.caption_tokens = kind, int(max_len), int(caption_tokens)
    self.image_tokens, self.image_token_id = int(image_tokens), None
    self.system_prompt = system_prompt
    self._encode, self._render, self._parts_cache = None, None, {}
    self._head = self._tail = None      # ids around the caption (None: no tokenizer)
    if kind == "plain":
      self.tokenizer = shapes_tokenizer() if tokenizer is None else tokenizer
      self._encode = lambda text: self.tokenizer.tokenizer.encode(
          text, add_special_tokens=False).ids
      self._head, self._tail = [self.tokenizer.bos_id], []
      self.suffix_ids = np.asarray([self.tokenizer.eos_id], np.int32)
      self.vocab_size = self.tokenizer.vocab_size
      self.image_token_id = self.tokenizer.tokenizer.token_to_id("<image>")
    elif kind == "chat" and tokenizer_dir:
      cls = qvl.Processor if image_token == qvl_image_token() else lov.Processor
      proc = cls.from_dir(tokenizer_dir, image_token)   # Qwen2.5-VL: its default template
      self.tokenizer = proc.tokenizer
      self._encode = lambda text: proc.tokenizer.encode(text, add_special_tokens=False).ids
      self._render = proc.chat
      self._head, self._tail = self._chat_parts(0)
      self.suffix_ids = np.asarray(self._encode("<|im_end|>"), np.int32)
      self.vocab_size = proc.tokenizer.get_vocab_size(with_added_tokens=True)
      self.image_token_id = proc.image_token_id
    elif kind == "chat":   # no tokenizer (random init, AOT): the layout's shapes only
      self.tokenizer, self.vocab_size = None, None
      self.suffix_ids = np.asarray(suffix_ids, np.int32)
    else:
      raise ConfigError(f"prompt kind {kind!r} is not 'plain' or 'chat'")

  @property
  def head_ids(self) -> Optional[list]:
    """Token ids before the caption (text-only prompts); None without a tokenizer."""
    return None if self._head is None else list(self._head)

  @property
  def tail_ids(self) -> Optional[list]:
    """Token ids after the caption (text-only prompts); None without a tokenizer."""
    return None if self._tail is None else list(self._tail)

  _SENTINEL = "\x00CAPTION\x00"

  def _chat_parts(self, num_images: int) -> tuple[list, list]:
    """Token ids before / after the caption in the chat template with ``num_images``
    image items (image token ids not yet expanded)."""
    user = [{"type": "image"}] * num_images + [{"type": "text", "text": self._SENTINEL}]
    text = self._render([{"role": "system",
                          "content": [{"type": "text", "text": self.system_prompt}]},
                         {"role": "user", "content": user}])
    before, after = (text + "\n").split(self._SENTINEL)
    return self._encode(before), self._encode(after)

  def parts(self, num_images: int = 0) -> tuple[list, list]:
    """``(head, tail)`` ids around the caption, image placeholders expanded."""
    if num_images == 0:
      return self._head, self._tail
    if num_images not in self._parts_cache:
      if self._encode is None:
        raise ConfigError("prompts need the MLLM's tokenizer: set mllm.path or "
                          "mllm.tokenizer_dir")
      if self.image_token_id is None or self.image_tokens <= 0:
        raise ValueError("this prompt format has no image placeholders (image_tokens=0)")
      if self.kind == "plain":
        head, tail = self._head + [self.image_token_id] * num_images, list(self._tail)
      else:
        head, tail = self._chat_parts(num_images)
      expand = lambda ids: [j for i in ids for j in (
          [i] * self.image_tokens if i == self.image_token_id else [i])]
      head, tail = expand(head), expand(tail)
      found = (head + tail).count(self.image_token_id)
      if found != num_images * self.image_tokens:
        raise ValueError(f"the prompt template rendered {found // self.image_tokens} image "
                         f"placeholders for {num_images} images")
      self._parts_cache[num_images] = (head, tail)
    return self._parts_cache[num_images]

  def min_len(self, num_images: int = 0, caption_tokens: Optional[int] = None) -> int:
    """Length of a prompt with ``num_images`` images and a caption of ``caption_tokens``
    (default: the longest allowed) tokens."""
    head, tail = self.parts(num_images)
    return len(head) + len(tail) + (self.caption_tokens if caption_tokens is None
                                    else caption_tokens)

  def encode(self, caption: str, num_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [max_len], mask bool [max_len])``, left padded (pad id 0)."""
    if self._encode is None:
      if not caption and not num_images:
        # Layout only (random init without a tokenizer, e.g. launch/aot.py): the empty
        # prompt's *shape* is all a compile needs. Real captions cannot be encoded, so no
        # data (and no trained model) ever sees this placeholder.
        ids, mask = np.zeros((self.max_len,), np.int32), np.zeros((self.max_len,), bool)
        mask[-1] = True
        return ids, mask
      raise ConfigError("prompts need the MLLM's tokenizer: set mllm.path or mllm.tokenizer_dir")
    head, tail = self.parts(num_images)
    body = self._encode(caption)[:self.caption_tokens] if caption else []
    seq = head + body + tail
    if num_images and len(seq) > self.max_len:
      raise ConfigError(f"a prompt with {num_images} image(s) needs {len(seq)} tokens, "
                        f"model.prompt_len is {self.max_len}")
    seq = seq[-self.max_len:]
    ids = np.zeros((self.max_len,), np.int32)
    mask = np.zeros((self.max_len,), bool)
    if seq:
      ids[-len(seq):], mask[-len(seq):] = seq, True
    return ids, mask

  def encode_batch(self, captions: Sequence[str],
                   num_images: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    counts = [num_images] * len(captions) if isinstance(num_images, int) else num_images
    pairs = [self.encode(c, n) for c, n in zip(captions, counts)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class ImageSlots:
  """What both kinds of image inputs share (LLaVA-OneVision views: `tasks.ImageInputs`;
  Qwen2.5-VL patches: `mllm_qwen25vl.ImageInputs`), from their ``task``, ``slots``,
  ``view_shape`` and ``tokens_per_image``."""

  def dummy(self, batch_size: int, prompt_len: int) -> dict:
    return {"null_ids": np.zeros((batch_size, prompt_len), np.int32),
            "null_mask": np.ones((batch_size, prompt_len), bool),
            "input_views": np.zeros((batch_size,) + self.view_shape, np.float32),
            "input_valid": np.ones((batch_size, self.slots), bool)}

  def check_prompts(self, prompts, mllm_cfg) -> None:
    """The tokenizer's placeholder is the MLLM's image token, and the longest prompt (K
    images, a full caption) fits ``model.prompt_len`` (only when a tokenizer is there)."""
    if prompts.tokenizer is None:
      return
    if prompts.image_token_id != mllm_cfg.image_token_id:
      raise ConfigError(f"the tokenizer's image token id {prompts.image_token_id} is not the "
                        f"MLLM's image token id {mllm_cfg.image_token_id}")
    need = prompts.min_len(self.slots, 0 if self.task == "reconstruct" else None)
    if need > prompts.max_len:
      raise ConfigError(f"model.task={self.task!r} with {self.slots} image(s) of "
                        f"{self.tokens_per_image} tokens needs model.prompt_len >= {need}, "
                        f"got {prompts.max_len}")

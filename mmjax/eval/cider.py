"""CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it, in pure Python.

Per image: the candidate and each reference become tf-idf vectors of their 1..4-grams; a
term's frequency is its raw count in the sentence, its idf ``log(N) - log(max(1, df))``
with ``N`` the number of images evaluated and ``df`` the number of images whose references
contain the n-gram (so the statistics are those of the evaluated set, as in the toolkit).
For each n and reference, the clipped cosine ``sum_g min(c_g, r_g) r_g / (|c| |r|)`` (0 when
either vector is empty) times the Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 6^2))``;
the image's score is 10 x the mean over n of the mean over references. The corpus score is
the mean over images. A sentence's length is the toolkit's: its number of bigrams
(``max(words - 1, 0)``), which differs from the word count only in the penalty of one-word
or empty sentences.

Inputs are tokenized text (words split on whitespace), as ``pycocoevalcap``'s ``Cider``
expects them after its PTB tokenizer; ``tokenize=True`` runs `coco_tokenize` first, a
pure-Python approximation of that tokenizer (Stanford PTBTokenizer ``-lowerCase``, then the
toolkit's punctuation list removed; brackets stay as ``-lrb-`` and friends, as there).

Example::

    from mmjax.eval.cider import cider_d, coco_tokenize
    score, per_image = cider_d({1: "a dog runs", 2: "a cat"},
                               {1: ["a dog is running", "a dog runs"], 2: ["a black cat"]})
    coco_tokenize("A man's hat (red).")          # "a man 's hat -lrb- red -rrb-"
"""
from __future__ import annotations

import collections
import math
import re
from typing import Mapping, Sequence, Union

MAX_N = 4
SIGMA = 6.0
# the tokens the COCO toolkit drops after PTB tokenization (pycocoevalcap's PUNCTUATIONS,
# lower-cased brackets excepted: -lowerCase turns -LRB- into -lrb-, which it keeps)
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?",
                         "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.",
                            "inc.", "co.", "no.", "ft.", "mt.", "ave.", "jan.", "feb.", "aug.",
                            "sept.", "oct.", "nov.", "dec."])
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na",
                "gotta": "got ta", "gimme": "gim me", "lemme": "lem me"}
_PIECES = re.compile(r"\.\.\.|--|[?!]+|[(){}\[\],;\"$%]|:(?!\d)"       # punctuation
                     r"|[^\s(){}\[\],;\"$%?!:]+(?::\d+)*|:")       # words, 10:30
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
Captions = Union[Mapping, Sequence]


def coco_tokenize(text: str) -> str:
  """Lower-cased PTB-style tokens of ``text`` joined by spaces, without the punctuation the
  COCO toolkit removes: ``"Don't (go)!"`` -> ``"do n't -lrb- go -rrb-"``. Splits clitics
  (``n't 's 'm 're 've 'll 'd``), ``cannot`` / ``gonna`` ..., ``$`` and ``%``, sentence
  periods (not those of ``u.s.``, ``3.5`` or common abbreviations); keeps ``?!`` runs,
  hyphenated words, ``10:30``, ``&``, ``@``, ``#``, ``*``, ``/`` inside words."""
  if not isinstance(text, str):
    raise ValueError(f"expected a caption string, got {type(text).__name__}")
  out = []
  text = re.sub(r"\.\.+", " ... ", text.lower().replace("\n", " "))   # "left..", "a...b"
  for piece in _PIECES.findall(text):
    out.extend(_word_tokens(piece))
  return " ".join(t for t in out if t not in PUNCTUATION)


def _word_tokens(piece: str) -> list[str]:
  """PTB tokens of one whitespace- and punctuation-delimited piece."""
  if piece in _BRACKETS:
    return [_BRACKETS[piece]]
  if piece == '"':
    return ["''"]
  head, tail = [], []
  while piece.startswith(("'", "`")) and not _CLITIC.match("x" + piece):
    head.append(piece[0])                                # opening single quote
    piece = piece[1:]
  if piece.endswith(".") and _sentence_period(piece):
    piece, tail = piece[:-1], ["."]
  while piece.endswith(("'", "`")) and not piece.endswith("n't"):
    tail.insert(0, piece[-1])                          # closing quote, plural possessive
    piece = piece[:-1]
  if piece in _SPLIT_WORDS:
    return head + _SPLIT_WORDS[piece].split() + tail
  m = _CLITIC.match(piece)
  if m and m.group(1) not in ("'", "`"):
    word, clitic = m.groups()
    return head + [word, clitic] + tail
  return head + ([piece] if piece else []) + tail


def _sentence_period(piece: str) -> bool:
  """Whether the final period of ``piece`` is its own token (not ``u.s.``, ``a.``, ``mr.``)."""
  word = piece[:-1]
  return not (piece in _ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha()))


def _ngram_counts(sentence: str) -> collections.Counter:
  """Counts of the sentence's 1..4-grams (tuples of words)."""
  words = sentence.split()
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, MAX_N + 1)
                             for i in range(len(words) - k + 1))


def _as_pairs(candidates: Captions, references: Captions) -> tuple[list, list[str],
                                                                    list[list[str]]]:
  """``(keys, candidate per image, references per image)``, checked; dict keys in the
  order of ``references``."""
  if isinstance(candidates, Mapping) != isinstance(references, Mapping):
    raise ValueError("candidates and references must both be dicts or both be lists")
  if isinstance(references, Mapping):
    if set(candidates) != set(references):
      missing = sorted(map(str, set(references) - set(candidates)))[:5]
      extra = sorted(map(str, set(candidates) - set(references)))[:5]
      raise ValueError(f"candidates and references have different image keys (no candidate "
                       f"for {missing}, no references for {extra})")
    keys = list(references)
    cands, refs = [candidates[k] for k in keys], [references[k] for k in keys]
  else:
    if len(candidates) != len(references):
      raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    keys = list(range(len(references)))
    cands, refs = list(candidates), list(references)
  if not keys:
    raise ValueError("no images to score")
  for i, (key, c) in enumerate(zip(keys, cands)):
    if isinstance(c, (list, tuple)) and len(c) == 1:
      c = cands[i] = c[0]                            # COCO results: a list of one caption
    if not isinstance(c, str):
      raise ValueError(f"the candidate of image {key!r} must be a string (or a list of one), "
                       f"got {c!r}")
  for i, (key, r) in enumerate(zip(keys, refs)):
    if isinstance(r, str):
      r = refs[i] = [r]
    if not isinstance(r, (list, tuple)) or not r:
      raise ValueError(f"image {key!r} has no references (got {r!r})")
    if not all(isinstance(s, str) for s in r):
      raise ValueError(f"the references of image {key!r} must be strings, got {r!r}")
  return keys, cands, [list(r) for r in refs]


def _tfidf(counts: collections.Counter, df: Mapping, log_n: float) -> tuple[list, list, int]:
  """``(vectors per n, their norms, length in bigrams)`` of one sentence's n-gram counts."""
  vec = [{} for _ in range(MAX_N)]
  sq = [0.0] * MAX_N
  length = 0
  for gram, tf in counts.items():
    n = len(gram) - 1
    w = float(tf) * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
    vec[n][gram] = w
    sq[n] += w ** 2
    if n == 1:
      length += tf
  return vec, [math.sqrt(s) for s in sq], length


def _similarity(cand: tuple, ref: tuple) -> list[float]:
  """Per n: the clipped cosine of candidate and reference times the length penalty."""
  (vc, nc, lc), (vr, nr, lr) = cand, ref
  penalty = math.exp(-float(lc - lr) ** 2 / (2 * SIGMA ** 2))
  out = []
  for n in range(MAX_N):
    val = 0.0
    for gram, w in vc[n].items():
      r = vr[n].get(gram, 0.0)
      val += min(w, r) * r
    if nc[n] != 0 and nr[n] != 0:
      val /= nc[n] * nr[n]
    out.append(val * penalty)
  return out


def cider_d(candidates: Captions, references: Captions, *,
            tokenize: bool = False) -> tuple[float, list[float]]:
  """``(corpus score, per-image scores)`` of CIDEr-D (module docstring).

  ``candidates``: ``{image: caption}`` (or ``{image: [caption]}``, COCO's results layout)
  or a list of captions; ``references``: ``{image: [caption, ...]}`` with the same keys, or
  a list of reference lists of the same length (a single string is one reference).
  Per-image scores follow the order of ``references``. ``tokenize``: apply `coco_tokenize`
  to every caption first (else they are split on whitespace as given)."""
  keys, cands, refs = _as_pairs(candidates, references)
  if tokenize:
    cands = [coco_tokenize(c) for c in cands]
    refs = [[coco_tokenize(s) for s in r] for r in refs]
  cand_counts = [_ngram_counts(c) for c in cands]
  ref_counts = [[_ngram_counts(s) for s in r] for r in refs]
  df = collections.Counter()
  for counts in ref_counts:                 # images whose references contain the n-gram
    df.update(set().union(*counts))
  log_n = math.log(float(len(keys)))
  scores = []
  for cc, rcs in zip(cand_counts, ref_counts):
    cand = _tfidf(cc, df, log_n)
    total = [0.0] * MAX_N
    for rc in rcs:
      total = [t + s for t, s in zip(total, _similarity(cand, _tfidf(rc, df, log_n)))]
    scores.append(10.0 * (sum(total) / MAX_N) / len(rcs))
  return sum(scores) / len(scores), scores

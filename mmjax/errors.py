"""Typed errors of the library. The launcher prints any ``MmjaxError`` as one line, without
a traceback; everything else is a bug and keeps its traceback.

* ``ConfigError``        a config field, preset or value that does not exist or does not fit
  (``UnknownField``, ``UnknownPreset``: both suggest the closest known name);
* ``MissingCheckpoint``  pretrained weights a config needs are not where it says (names each);
* ``NoCheckpoint``       a mode that needs a trained checkpoint found none in the workdir;
* ``DataInputError``, ``MissingDataInput``  data the converter (``mmjax.data.convert``)
  cannot use: a malformed captions file or row, an image or tar that does not exist.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class MmjaxError(Exception):
  """Base of the errors a user can fix; printed as one line by the launcher."""


class ConfigError(MmjaxError, ValueError):
  """A config value that cannot be used."""


def closest(name: str, known: Iterable[str]) -> str:
  """``" (did you mean 'x'?)"`` for the closest known name, or ``""``."""
  match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
  return f" (did you mean {match[0]!r}?)" if match else ""


class UnknownField(ConfigError, KeyError):
  """A config field that does not exist (override or assignment)."""

  def __init__(self, field: str, known: Iterable[str] = (), where: str = ""):
    self.field = field
    super().__init__(f"unknown config field {field!r}{closest(field, known)}"
                     + (f" ({where})" if where else ""))

  def __str__(self):  # KeyError would quote the message
    return self.args[0]


class UnknownPreset(ConfigError):
  """A ``configs/X.py:preset`` name that the config file does not define."""


class MissingCheckpoint(MmjaxError, FileNotFoundError):
  """Pretrained weights a config needs are missing; ``missing`` maps field -> path."""

  def __init__(self, missing: dict, hint: str = ""):
    self.missing = dict(missing)
    items = "; ".join(f"{k} = {v!r}" if v else f"{k} is not set"
                      for k, v in self.missing.items())
    super().__init__(f"missing checkpoint(s): {items}" + (f". {hint}" if hint else ""))


class NoCheckpoint(MmjaxError, FileNotFoundError):
  """A mode that needs trained parameters found no checkpoint in the workdir."""


class DataInputError(MmjaxError, ValueError):
  """Data to convert that cannot be used (a malformed captions file, row or sample)."""


class MissingDataInput(MmjaxError, FileNotFoundError):
  """Data to convert that does not exist (a captions file, an image, no tar matching)."""


def parse_presets(arg: str | None, known: Sequence[str], file: str) -> list[str]:
  """The comma-separated presets of ``configs/X.py:a,b`` (every config file uses this).

  ``None`` or ``""`` -> ``[]``; an unknown name raises ``UnknownPreset`` naming the file, the
  known presets and the closest one.
  """
  presets = [p.strip() for p in (arg or "").split(",") if p.strip()]
  for p in presets:
    if p not in known:
      raise UnknownPreset(f"unknown preset {p!r} for {file}{closest(p, known)}; "
                          f"known: {', '.join(known)}")
  if len(set(presets)) != len(presets):
    raise UnknownPreset(f"preset repeated in {arg!r} for {file}")
  return presets

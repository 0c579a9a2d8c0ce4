"""Launcher config for the training tests' tiny system (``tests/train_helpers.py``).

  python launch/tpu.py --config tests/train_config.py --workdir /tmp/tiny --config.total_steps=8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_helpers  # noqa: E402  (registers the test systems)


def get_config(arg=None):
  """``tests/train_config.py`` (TinyMLP) or ``tests/train_config.py:tokenizer`` (the toy
  multi-objective tokenizer)."""
  if arg == "tokenizer":
    return train_helpers.toy_tokenizer_config()
  if arg:
    raise ValueError(f"unknown preset {arg!r} (known: tokenizer)")
  return train_helpers.tiny_config()

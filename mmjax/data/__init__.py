"""Data: the shapes world, user sources (ArrayRecord, TFDS), image ops, tokenizers, Grain
pipelines.

Modules: ``shapes`` (procedural world + ground truth), ``tokenizer`` (shapes-world word
tokenizer), ``image`` (decode / resize / crop / normalise), ``sources`` (converters to
ArrayRecord, ArrayRecord and TFDS sources), ``convert`` (their command line:
``python -m mmjax.data.convert``), ``pipeline`` (seeded, per-host, checkpointable Grain
iterators).
"""


class BadRecord(ValueError):
  """A record that cannot be turned into an example (undecodable image, empty caption, ...).

  Raised by ``System.preprocess``; the pipeline skips and counts it or fails, per
  ``config.data.bad_record_policy``.
  """

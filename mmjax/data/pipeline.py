"""Grain input pipelines: seeded global shuffle, per-host slices, bad-record policy, full
static-shape batches, checkpointable iterator state.

The global stream is a function of ``(source, shuffle seed)`` only::

    stream position g = 0, 1, 2, ...  ->  source index  shuffle_e(g mod N)  (reshuffled per epoch)

Global batch ``b`` is positions ``start_index + [b*B, (b+1)*B)``; host ``i`` of ``P`` reads
rows ``[i*B/P, (i+1)*B/P)`` of it, so the hosts' slices are disjoint, cover the stream, and
the global batch is the same rows in the same order whatever ``P`` is. Each example
is ``preprocess(record, rng)`` with ``rng = Generator(PCG64([seed, g]))``: augmentation
randomness is reproducible and independent of host count and worker count.

Bad records (``preprocess`` or the source raising `mmjax.data.BadRecord`): policy ``'skip'``
counts the record and fills its slot with the next good one (batches are always full), and
fails once bad records exceed ``max_bad_fraction`` of those read (with a grace of
``max_bad_fraction * 100`` records at the start); policy ``'fail'`` raises at once, naming
the record. ``iterator.stats()`` reports the counts, which are part of the iterator state.

Example::

    from mmjax import config as mcfg
    from mmjax.data import pipeline, image
    cfg = mcfg.base_config()
    def preprocess(record, rng):
      return {"image": image.to_float(record["image"]), "label": np.int32(len(record["caption"]))}
    it = pipeline.make_iterator(cfg.data, seed=0, preprocess=preprocess)
    batch = next(it)                 # {'image': float32 [8, 32, 32, 3], 'label': int32 [8]}
    state = it.get_state()           # JSON-serialisable; it.set_state(state) resumes exactly
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import grain
import numpy as np

from mmjax.data import BadRecord

Preprocess = Callable[[dict, np.random.Generator], dict]
POLICIES = ("skip", "fail")
_GRACE_RECORDS = 100  # the bad fraction is measured over at least this many records


class TooManyBadRecords(RuntimeError):
  """Policy 'skip': the fraction of bad records went over ``max_bad_fraction``."""


def make_source(data_cfg, seed: int):
  """The random-access source that ``data_cfg.source`` names.

  ``shapes``: the shapes world (``data_cfg.resolution``; optional ``data_cfg.categories``).
  ``shapes_describe``: shapes scenes with their full descriptions as captions
  (``shapes_describe.DescribeSource``, ``data_cfg.resolution``, optional
  ``data_cfg.caption_fraction`` of short captions mixed in).
  ``array_record``: ``ArrayRecordSource(data_cfg.path)`` (a glob). ``tfds``:
  ``TfdsSource(data_cfg.path, data_cfg.split)``, optional fields ``data_dir``,
  ``image_key``, ``caption_key``.

  >>> from mmjax import config as mcfg
  >>> make_source(mcfg.base_config().data, seed=0)
  ShapesSource(seed=0, length=2147483647, resolution=32, categories=None)
  """
  kind = data_cfg.source
  if kind == "shapes":
    from mmjax.data.shapes import ShapesSource  # pylint: disable=import-outside-toplevel
    categories = data_cfg.categories or None
    if isinstance(categories, str):
      categories = tuple(c.strip() for c in categories.split(",") if c.strip())
    return ShapesSource(seed=seed, resolution=data_cfg.resolution, categories=categories)
  if kind == "shapes_describe":
    from mmjax.data.shapes_describe import DescribeSource  # pylint: disable=import-outside-toplevel
    return DescribeSource(seed=seed, resolution=data_cfg.resolution,
                          caption_fraction=data_cfg.get("caption_fraction", 0.0))
  if kind == "array_record":
    from mmjax.data.sources import ArrayRecordSource  # pylint: disable=import-outside-toplevel
    if not data_cfg.path:
      raise ValueError("data.source='array_record' needs data.path (a glob of .array_record)")
    return ArrayRecordSource(data_cfg.path)
  if kind == "tfds":
    from mmjax.data.sources import TfdsSource  # pylint: disable=import-outside-toplevel
    if not data_cfg.path:
      raise ValueError("data.source='tfds' needs data.path (the TFDS dataset name)")
    return TfdsSource(data_cfg.path, data_cfg.split, data_dir=data_cfg.get("data_dir", None) or None,
                      image_key=data_cfg.get("image_key", "image"),
                      caption_key=data_cfg.get("caption_key", "caption"))
  raise ValueError(f"unknown data.source {kind!r}; known: shapes | shapes_describe | "
                   f"array_record | tfds")


class _Bad:
  """Marker for a record that raised BadRecord (picklable: crosses worker processes)."""

  def __init__(self, position: int, index: int, key: str, cause: str):
    self.position, self.index, self.key, self.cause = position, index, key, cause

  def describe(self, source) -> str:
    key = f", key {self.key!r}" if self.key else ""
    return (f"record {self.index}{key} of {source!r} (stream position {self.position}): "
            f"{self.cause}")


class _HostPositions:
  """This host's j-th example -> ``(global stream position, source index)``.

  Host i of P owns rows ``[i*per_host, (i+1)*per_host)`` of every global batch, so the
  global batch is the same rows in the same order whatever the number of hosts (per-row
  randomness in a loss then does not depend on the host layout).
  """

  def __init__(self, order, start: int, batch_size: int, per_host: int, process_index: int):
    self.order, self.start = order, int(start)
    self.batch_size, self.per_host, self.process_index = batch_size, per_host, process_index

  def __call__(self, j: int) -> tuple[int, int]:
    b, r = divmod(int(j), self.per_host)
    position = self.start + b * self.batch_size + self.process_index * self.per_host + r
    return position, int(self.order[position])


class _Example:
  """``(position, source index) -> (index, example) | _Bad``: read + preprocess."""

  def __init__(self, source, preprocess: Preprocess, seed: int):
    self.source, self.preprocess, self.seed = source, preprocess, int(seed)

  def __call__(self, item: tuple[int, int]):
    position, index = item
    record = None
    try:
      record = self.source[index]
      rng = np.random.Generator(np.random.PCG64([self.seed, position]))
      return index, self.preprocess(record, rng)
    except BadRecord as e:
      key = record.get("key", "") if isinstance(record, dict) else ""
      return _Bad(position, index, str(key), f"{type(e).__name__}: {e}")


class _FullBatches(grain.IterDataset):
  """Drops bad records (or fails), stacks ``batch_size`` good examples per batch."""

  def __init__(self, parent, source, batch_size: int, policy: str, max_bad_fraction: float,
               layout: dict):
    super().__init__(parent)
    self.source, self.batch_size = source, batch_size
    self.policy, self.max_bad_fraction, self.layout = policy, max_bad_fraction, layout

  def __iter__(self):
    return FullBatchIterator(self._parent.__iter__(), self)


class FullBatchIterator(grain.DatasetIterator):
  """What `make_iterator` returns: a grain ``DatasetIterator`` of full batches.

  ``get_state()`` / ``set_state()`` cover the read position and the bad-record counters;
  ``stats()`` -> ``{'read': int, 'bad': int, 'bad_fraction': float, 'last_bad': str}``.
  """

  def __init__(self, parent: grain.DatasetIterator, ds: _FullBatches):
    super().__init__(parent)
    self._batches = ds
    self._read, self._bad, self._last_bad = 0, 0, ""
    self._spec: dict[str, tuple[tuple[int, ...], str]] | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    ds, examples = self._batches, []
    while len(examples) < ds.batch_size:
      item = next(self._parent)
      self._read += 1
      if isinstance(item, _Bad):
        self._on_bad(item)
        continue
      index, example = item
      self._check_spec(index, example)
      examples.append(example)
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}

  def _on_bad(self, bad: _Bad) -> None:
    ds = self._batches
    message = bad.describe(ds.source)
    if ds.policy == "fail":
      raise BadRecord(f"bad {message} (data.bad_record_policy='fail'; set it to 'skip' to "
                      f"skip up to data.max_bad_fraction of the records)")
    self._bad += 1
    self._last_bad = message
    if self._bad <= 10 or self._bad % 100 == 0:
      logging.warning("skipping bad %s [%d bad of %d read]", message, self._bad, self._read)
    allowed = ds.max_bad_fraction * max(self._read, _GRACE_RECORDS)
    if self._bad > allowed:
      raise TooManyBadRecords(
          f"{self._bad} bad records of {self._read} read ({self._bad / self._read:.2%}) exceed "
          f"data.max_bad_fraction={ds.max_bad_fraction}; last: {message}")

  def _check_spec(self, index: int, example: dict) -> None:
    spec = {k: (np.shape(v), np.asarray(v).dtype.str) for k, v in example.items()}
    if self._spec is None:
      self._spec = spec
    elif spec != self._spec:
      diff = {k: (self._spec.get(k), spec.get(k)) for k in set(spec) | set(self._spec)
              if self._spec.get(k) != spec.get(k)}
      raise ValueError(f"preprocess must return fixed shapes/dtypes; record {index} of "
                       f"{self._batches.source!r} differs (expected, got): {diff}")

  def stats(self) -> dict[str, Any]:
    return {"read": self._read, "bad": self._bad,
            "bad_fraction": self._bad / max(self._read, 1), "last_bad": self._last_bad}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "read": self._read, "bad": self._bad,
            "last_bad": self._last_bad, "layout": dict(self._batches.layout)}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["layout"] != self._batches.layout:
      raise ValueError(f"iterator state was saved for {state['layout']}, this pipeline is "
                       f"{self._batches.layout}; restore with the same batch size and hosts")
    self._parent.set_state(state["parent"])
    self._read, self._bad, self._last_bad = state["read"], state["bad"], state["last_bad"]


def make_iterator(data_cfg, *, seed: int, preprocess: Preprocess, process_index: int = 0,
                  process_count: int = 1, start_index: int = 0, source=None,
                  read_threads: int = 2) -> FullBatchIterator:
  """This host's iterator of ``batch_size // process_count`` examples per batch.

  Args:
    data_cfg: ``config.data`` (source, path, split, batch_size = *global* batch,
      resolution, shuffle_seed (-1: ``seed``), num_workers, bad_record_policy,
      max_bad_fraction).
    seed: seeds the shuffle (unless ``data_cfg.shuffle_seed >= 0``), the shapes world and
      the per-example rngs.
    preprocess: ``(record, rng) -> dict of fixed-shape numpy arrays`` (``System.preprocess``);
      raises `mmjax.data.BadRecord` for records it cannot use.
    process_index, process_count: this host and the number of hosts.
    start_index: first global stream position (e.g. ``step * batch_size`` when no iterator
      state was saved; with skipped bad records only the saved state is exact).
    source: overrides ``make_source(data_cfg, seed)``.
    read_threads: threads preparing examples ahead in each process (0: none).

  >>> from mmjax import config as mcfg
  >>> cfg = mcfg.base_config().data
  >>> it = make_iterator(cfg, seed=0, preprocess=lambda r, rng: {"x": r["image"][:2, :2]})
  >>> next(it)["x"].shape
  (8, 2, 2, 3)
  """
  batch_size = int(data_cfg.batch_size)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"data.batch_size={batch_size} (global) is not divisible by "
                     f"process_count={process_count}")
  policy = data_cfg.bad_record_policy
  if policy not in POLICIES:
    raise ValueError(f"data.bad_record_policy={policy!r}; known: {POLICIES}")
  source = make_source(data_cfg, seed) if source is None else source
  if len(source) == 0:
    raise ValueError(f"data source {source!r} is empty")
  shuffle_seed = seed if data_cfg.shuffle_seed < 0 else data_cfg.shuffle_seed
  per_host = batch_size // process_count

  order = grain.MapDataset.range(len(source)).shuffle(seed=int(shuffle_seed) % 2**32).repeat()
  ds = grain.MapDataset.range(2**62 // batch_size).map(          # -> (position, source index)
      _HostPositions(order, start_index, batch_size, per_host, process_index))
  ds = ds.map(_Example(source, preprocess, seed))              # -> (index, example) | _Bad
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=2 * per_host))
  if data_cfg.num_workers > 0:
    _absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  layout = {"batch_size": batch_size, "process_index": process_index,
            "process_count": process_count, "start_index": start_index}
  return iter(_FullBatches(it_ds, source, per_host, policy, float(data_cfg.max_bad_fraction),
                           layout))


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside ``absl.app`` nothing parsed them
  (google/grain#1355), so use their defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
  """Orbax args that save (or restore in place) a grain iterator's state.

  Each process writes ``process_{i}-of-{n}.json`` (grain's ``CheckpointHandler``). With an
  ``ocp.CheckpointManager``::

      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=pipeline.checkpoint_args(it)))
      mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=pipeline.checkpoint_args(it, restore=True)))     # `it` now resumes
  """
  import grain.checkpoint as gc  # pylint: disable=import-outside-toplevel
  cls = getattr(gc, "CheckpointRestore" if restore else "CheckpointSave", None)
  if cls is None:
    raise ImportError("grain.checkpoint.CheckpointSave/Restore need orbax-checkpoint installed")
  return cls(iterator)

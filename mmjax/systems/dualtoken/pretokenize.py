"""Pre-tokenise a dataset with a frozen DualToken tokenizer, for the unified model.

  python -m mmjax.systems.dualtoken.pretokenize --config configs/dualtoken.py:demo_unified \\
      --tokenizer_workdir /tmp/dtu/tokenizer --out /data/shapes_codes --num 100000
  python -m mmjax.systems.dualtoken.pretokenize --config configs/dualtoken.py:unified \\
      --tokenizer_workdir gs://bucket/dt --out /data/cc12m_codes --num 12000000 \\
      --config.data.source=array_record --config.data.path='/data/cc12m-*.array_record'

Reads ``--num`` records of the config's data source (``config.data``: the shapes world by
default, or converted shards), encodes each image (resized and centre-cropped to the
tokenizer's resolution) with the tokenizer of ``--tokenizer_workdir`` (an mmjax tokenizer
run; default: the config's ``model.tokenizer_workdir``), and writes ArrayRecord shards in
the record format of `mmjax.data.sources` whose body is the codes (int32, ``[2, N, D]``:
pixel then semantic) and whose header carries the caption and ``codes_shape``. Train on
them with ``--config.data.pretokenized=True --config.data.source=array_record
--config.data.path='PREFIX-*.array_record'``: no tokenizer runs in the training step.
A record whose image does not decode is left out and named in the summary.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from mmjax.errors import MmjaxError

PROG = "python -m mmjax.systems.dualtoken.pretokenize"
CODES_SHAPE = "codes_shape"


def codes_record(pixel: np.ndarray, semantic: np.ndarray, caption: str, key: str = "") -> bytes:
  """One record: the caption in the header, the codes ``[2, N, D]`` int32 as the body."""
  from mmjax.data.sources import serialize_record  # pylint: disable=import-outside-toplevel
  codes = np.stack([pixel, semantic]).astype("<i4")
  return serialize_record(codes.tobytes(), caption, key,
                          texts={CODES_SHAPE: list(codes.shape)})


def read_codes(record: dict, positions: int, depths: int) -> tuple[np.ndarray, np.ndarray]:
  """``(pixel, semantic)`` ``[N, D]`` of a pre-tokenised record; ``BadRecord`` when it has no
  codes or codes of another shape (another tokenizer)."""
  from mmjax.data import BadRecord  # pylint: disable=import-outside-toplevel
  shape = record.get(CODES_SHAPE)
  want = [2, positions, depths]
  if shape is None:
    raise BadRecord(f"record {record.get('key', '')!r} has no codes (data.pretokenized=True "
                    "reads shards written by pretokenize)")
  if list(shape) != want:
    raise BadRecord(f"record {record.get('key', '')!r} has codes {shape}, this model reads "
                    f"{want} (a different tokenizer)")
  codes = np.frombuffer(record["image"], "<i4").reshape(want).astype(np.int32)
  return codes[0], codes[1]


def parse_args(argv):
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="FILE[:preset] of the unified model")
  p.add_argument("--out", required=True, help="output prefix of the shards")
  p.add_argument("--num", type=int, required=True, help="records to read from the source")
  p.add_argument("--tokenizer_workdir", default="", help="an mmjax tokenizer run")
  p.add_argument("--batch", type=int, default=64, help="images per tokenizer call")
  p.add_argument("--shard_size", type=int, default=10_000)
  args, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  return args, rest


def pretokenize(config, tokenizer_workdir: str, out: str, num: int, batch: int = 64,
                shard_size: int = 10_000, log=print, system=None):
  """Writes the shards; returns ``(paths, records written, [(index, reason) left out])``.
  ``system``: a unified system whose tokenizer is already read (``prepare_tokenizer``)."""
  from mmjax.data import BadRecord, image as image_ops  # pylint: disable=import-outside-toplevel
  from mmjax.data.pipeline import make_source  # pylint: disable=import-outside-toplevel
  from mmjax.data.sources import _ShardWriter  # pylint: disable=import-outside-toplevel
  from mmjax.systems.base import get_system  # pylint: disable=import-outside-toplevel
  if system is None:
    system = get_system(config)
    path = tokenizer_workdir or config.model.tokenizer_workdir
    if not path:
      raise MmjaxError("no tokenizer: pass --tokenizer_workdir (an mmjax tokenizer run)")
    system.prepare_tokenizer(path)
  variables = system.tokenizer_variables()
  source = make_source(config.data, seed=config.seed)
  r = system.resolution
  writer, bad, pending = _ShardWriter(out, shard_size), [], []

  def flush():
    if not pending:
      return
    images = np.stack([p[2] for p in pending])
    pix, sem = (np.asarray(x) for x in system.tokenize(variables, images))
    for (index, caption, _), p, s in zip(pending, pix, sem):
      writer.write(codes_record(p, s, caption, key=str(index)))
    pending.clear()

  try:
    for i in range(min(num, len(source))):
      rec = source[i]
      try:
        img = image_ops.decode_image(rec["image"])
      except BadRecord as e:
        bad.append((i, str(e)))
        continue
      if img.shape[:2] != (r, r):
        img = image_ops.resize_crop(img, r)
      pending.append((i, str(rec["caption"]), image_ops.to_float(img)))
      if len(pending) == batch:
        flush()
      if (i + 1) % (batch * 20) == 0:
        log(f"{i + 1}/{num} records", flush=True)
    flush()
  except BaseException:
    writer.abort()
    raise
  paths = writer.close()
  log(f"wrote {writer.count} records in {len(paths)} shard(s) at {out}-*; "
      f"{len(bad)} left out" + "".join(f"\n  record {i}: {why}" for i, why in bad[:20]),
      flush=True)
  return paths, writer.count, bad


def main(argv=None):
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = config_lib.load(args.config, overrides)
    pretokenize(cfg, args.tokenizer_workdir, args.out, args.num, args.batch, args.shard_size)
  except MmjaxError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()

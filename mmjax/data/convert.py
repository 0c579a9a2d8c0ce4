"""Convert your images and captions into the ArrayRecord shards mmjax trains on.

  python -m mmjax.data.convert --images photos/ --captions photos/captions.jsonl \\
      --out /data/photos --check
  python -m mmjax.data.convert --images photos/ --captions photos/captions.csv --out /data/photos
  python -m mmjax.data.convert --webdataset '/data/laion/shards-*.tar' --out /data/laion
  python -m mmjax.data.convert --images edits/ --captions edits/edits.jsonl --out /data/edits

Inputs (paths in a captions file are relative to ``--images``):

* JSONL, one object per line: ``{"image": "a/b.jpg", "caption": "a red bicycle"}``; edit /
  instruct records: ``{"source_images": ["src1.jpg", "src2.jpg"], "caption": "the
  instruction", "image": "target.jpg"}`` (``"source_image"`` for one); LaViDa's
  ``"question"`` / ``"answer"`` are kept (a row with an answer needs no caption).
* CSV with a header: columns ``image,caption`` (optional ``source_images`` as
  ``a.jpg|b.jpg``, ``question``, ``answer``).
* webdataset tars: ``KEY.jpg|png|...`` + ``KEY.txt`` or ``KEY.json`` (``caption`` / ``text``);
  edit / instruct samples add ``KEY.source0.jpg``, ``KEY.source1.jpg``, ...

Writes ``PREFIX-00000-of-0000N.array_record`` (``--shard-size`` records each; the record
format is `mmjax.data.sources`), shows a progress bar, and ends with a summary: records,
shards, bytes, and every input left out with the reason (a missing image, a row without a
caption, with ``--check`` an image that does not decode), also written to
``PREFIX.bad_inputs.txt``. Without ``--check`` images are copied undecoded (fast); a corrupt
one is then counted or fatal at training time (``data.bad_record_policy``). Exit status: 0
when records were written, 1 when none were, 2 for a usage error (one line). Train on it::

  python launch/tpu.py --config configs/metaquery.py:demo --workdir /tmp/mine \\
      --config.data.source=array_record --config.data.path='/data/photos-*.array_record'
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mmjax.data import sources
from mmjax.errors import MmjaxError

PROG = "python -m mmjax.data.convert"
_SHOW_BAD = 20   # bad inputs printed in the summary (all of them go to PREFIX.bad_inputs.txt)


class UsageError(MmjaxError):
  """A command line that cannot run (unknown flag, missing path, conflicting inputs)."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not argparse's usage block
    raise UsageError(f"{message} (see {PROG} --help)")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description=__doc__, allow_abbrev=False,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", metavar="DIR", help="folder the captions file's paths are under")
  p.add_argument("--captions", metavar="FILE", help="captions: .jsonl or .csv (with --images)")
  p.add_argument("--webdataset", metavar="TARS", nargs="+",
                 help="webdataset tars: globs (quoted) or paths")
  p.add_argument("--out", metavar="PREFIX", required=True,
                 help="output prefix: PREFIX-00000-of-0000N.array_record")
  p.add_argument("--check", action="store_true",
                 help="decode every image; leave out (and name) the undecodable ones")
  p.add_argument("--shard-size", type=int, default=10_000, metavar="N",
                 help="records per shard (default 10000)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the shards of an earlier conversion at PREFIX")
  return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Flags -> namespace; a flag that does not exist or a wrong combination is a
  `UsageError` (paths are checked by `run`)."""
  args = parser().parse_args(list(argv))
  if args.webdataset and (args.images or args.captions):
    raise UsageError("give either --images with --captions, or --webdataset, not both")
  if not args.webdataset and not (args.images and args.captions):
    raise UsageError("give --images DIR with --captions FILE.jsonl|.csv, or --webdataset "
                     f"'shards-*.tar' (see {PROG} --help)")
  if args.shard_size <= 0:
    raise UsageError(f"--shard-size must be positive, got {args.shard_size}")
  return args


def _progress(total: Optional[int]):
  """A tqdm bar on stderr (off when stderr is not a terminal)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, unit=" inputs", file=sys.stderr, disable=None, dynamic_ncols=True)


def run(args: argparse.Namespace) -> sources.Conversion:
  """Converts what ``args`` names; prints the summary; returns what was written."""
  if args.webdataset:
    tars = sources.webdataset_tars(args.webdataset)
    examples, total = sources.webdataset_examples(tars), None
    what = f"{len(tars)} tar(s)"
  else:
    if not os.path.isdir(args.images):
      raise UsageError(f"--images {args.images!r} is not a directory")
    if not args.captions.endswith((".jsonl", ".csv")):
      raise UsageError(f"--captions {args.captions!r}: expected a .jsonl or .csv file")
    rows = sources.read_caption_rows(args.captions)
    examples, total = sources.folder_examples(args.images, rows), len(rows)
    what = f"{len(rows)} row(s) of {args.captions}"
  with _progress(total) as bar:
    result = sources.write_records(examples, args.out, args.shard_size, check=args.check,
                                   on_bad="report", overwrite=args.overwrite,
                                   progress=bar.update)
  print(summary(result, args.out, what, args.check), flush=True)
  bad_file = args.out + ".bad_inputs.txt"
  if result.bad:
    with open(bad_file, "w", encoding="utf-8") as f:
      f.writelines(f"{b}\n" for b in result.bad)
  elif os.path.exists(bad_file):   # from an earlier conversion at this prefix
    os.remove(bad_file)
  return result


def summary(result: sources.Conversion, out: str, what: str, checked: bool) -> str:
  """The end-of-run report: records, shards, bytes, bad inputs with their reasons."""
  lines = [f"read       {what}",
           f"records    {result.records:,}",
           f"shards     {len(result.paths)}"
           + (f"  ({result.paths[0]} ...)" if result.paths else ""),
           f"bytes      {result.bytes:,}",
           f"bad        {len(result.bad)}" + (" (left out):" if result.bad else "")]
  lines += [f"  {b}" for b in result.bad[:_SHOW_BAD]]
  if len(result.bad) > _SHOW_BAD:
    lines.append(f"  ... and {len(result.bad) - _SHOW_BAD} more")
  if result.bad:
    lines.append(f"all bad inputs: {out}.bad_inputs.txt")
  if not checked:
    lines.append("images were copied undecoded; --check decodes each one")
  if result.records:
    lines.append(f"train on it: --config.data.source=array_record "
                 f"--config.data.path='{out}-*.array_record'")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command; a usage or input error is one line on stderr, exit status 2."""
  try:
    result = run(parse_args(sys.argv[1:] if argv is None else argv))
  except MmjaxError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  if not result.records:
    print("error: no records written", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

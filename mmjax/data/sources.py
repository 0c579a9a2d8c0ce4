"""User data: converters to ArrayRecord, and random-access sources for Grain.

Record format (one ArrayRecord record per example; see `serialize_record`)::

    b"MMJX" | uint32 little-endian n | n bytes of UTF-8 JSON header | encoded image bytes

The header holds ``{"caption": str, "key": str}`` (``key``: the image's relative path or
webdataset key, for error messages), optionally the texts ``question`` / ``answer`` (LaViDa
reads them) and, for edit / instruct records, ``source_sizes``: the byte lengths of the
source images that follow the target image. Image bytes are stored exactly as found (JPEG,
PNG, ...): conversion decodes only with ``check=True``, so otherwise a corrupt image surfaces
at training time as a `mmjax.data.BadRecord` that the pipeline counts or fails on.

Shards are named ``{out_path}-00000-of-00004.array_record``; read them back with
``ArrayRecordSource(out_path + "-*.array_record")``. ``python -m mmjax.data.convert`` is the
command line over `convert_folder` / `convert_webdataset`.

Example::

    from mmjax.data import sources
    paths = sources.convert_folder("photos/", "photos/captions.jsonl", "/data/photos",
                                   shard_size=10_000)
    src = sources.ArrayRecordSource("/data/photos-*.array_record")
    rec = src[0]                      # {'image': b'\\xff\\xd8...', 'caption': '...', 'key': ...}
    # an edit / instruct record also has 'source_images': [b'...', ...]
"""
from __future__ import annotations

import csv
import dataclasses
import glob as globlib
import json
import logging
import os
import re
import struct
import tarfile
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from mmjax.data import BadRecord
from mmjax.errors import DataInputError, MissingDataInput

_MAGIC = b"MMJX"
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TEXT_FIELDS = ("question", "answer")   # optional texts a record carries besides its caption
_RESERVED = ("caption", "key", "source_sizes")


def serialize_record(image: bytes, caption: str, key: str = "",
                     source_images: Sequence[bytes] = (), texts: Optional[dict] = None) -> bytes:
  """One record: magic, header length, JSON header, the target image's bytes, then the
  source images' bytes (edit / instruct; their lengths are in the header)."""
  header = {"caption": caption, "key": key}
  for name, text in (texts or {}).items():
    if name in _RESERVED or name in ("image", "source_images"):
      raise ValueError(f"text field {name!r} is reserved by the record format")
    header[name] = text
  if source_images:
    header["source_sizes"] = [len(s) for s in source_images]
  header = json.dumps(header).encode("utf-8")
  return (_MAGIC + struct.pack("<I", len(header)) + header + bytes(image)
          + b"".join(bytes(s) for s in source_images))


def parse_record(data: bytes) -> dict:
  """Inverse of `serialize_record` -> ``{'image': bytes, 'caption': str, 'key': str}``, plus
  ``'source_images': [bytes, ...]`` and text fields when the record has them."""
  if len(data) < 8 or data[:4] != _MAGIC:
    raise BadRecord(f"not an mmjax record (starts with {bytes(data[:8])!r})")
  (n,) = struct.unpack("<I", data[4:8])
  try:
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
  except ValueError as e:
    raise BadRecord(f"corrupt record header: {e}") from e
  sizes = header.pop("source_sizes", [])
  body = bytes(data[8 + n:])
  if sum(sizes) > len(body):
    raise BadRecord(f"record {header.get('key')!r} is shorter than its source images")
  end = len(body) - sum(sizes)
  record = dict(header, image=body[:end])
  if sizes:
    record["source_images"] = []
    for size in sizes:
      record["source_images"].append(body[end:end + size])
      end += size
  return record


@dataclasses.dataclass
class Example:
  """One record before it is written: encoded images and texts. ``where`` names its input
  (a captions-file line, a tar member) for messages; ``source_keys`` its source images."""
  image: bytes
  caption: str
  key: str
  where: str
  source_images: tuple = ()
  source_keys: tuple = ()
  texts: dict = dataclasses.field(default_factory=dict)

  def serialize(self) -> bytes:
    return serialize_record(self.image, self.caption, self.key, self.source_images, self.texts)


@dataclasses.dataclass(frozen=True)
class BadInput:
  """An input the converter left out: ``where`` it is and ``reason``; ``kind`` is missing
  (a file that does not exist), malformed (a row or sample without what a record needs) or
  undecodable (``check=True``)."""
  where: str
  reason: str
  kind: str = "malformed"

  def __str__(self) -> str:
    return f"{self.where}: {self.reason}"

  def error(self) -> Exception:
    cls = MissingDataInput if self.kind == "missing" else DataInputError
    return cls(str(self))


@dataclasses.dataclass
class Conversion:
  """What a conversion wrote: shard ``paths``, ``records``, ``bytes`` on disk, and the
  inputs it left out (``bad``, in input order)."""
  paths: list
  records: int
  bytes: int
  bad: list


def shards_of(out_path: str) -> list[str]:
  """The shards a conversion wrote (or would overwrite) at ``out_path``."""
  return sorted(globlib.glob(globlib.escape(out_path) + "-[0-9]*-of-[0-9]*.array_record"))


class _ShardWriter:
  """Writes records into shards of ``shard_size``; final names carry ``-of-N``."""

  def __init__(self, out_path: str, shard_size: int):
    if shard_size <= 0:
      raise ValueError(f"shard_size must be positive, got {shard_size}")
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    self._module = array_record_module
    self.out_path, self.shard_size = out_path, shard_size
    self._tmp_paths: list[str] = []
    self._writer, self._in_shard, self.count = None, 0, 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

  def write(self, record: bytes) -> None:
    if self._writer is None or self._in_shard == self.shard_size:
      self._close_shard()
      path = f"{self.out_path}-{len(self._tmp_paths):05d}.tmp"
      self._tmp_paths.append(path)
      # group_size:1 makes every record individually addressable (fast random access).
      self._writer = self._module.ArrayRecordWriter(path, "group_size:1")
    self._writer.write(record)
    self._in_shard += 1
    self.count += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self) -> list[str]:
    self._close_shard()
    n = len(self._tmp_paths)
    final = [f"{self.out_path}-{i:05d}-of-{n:05d}.array_record" for i in range(n)]
    for tmp, path in zip(self._tmp_paths, final):
      os.replace(tmp, path)
    return final

  def abort(self) -> None:
    self._close_shard()
    for tmp in self._tmp_paths:
      if os.path.exists(tmp):
        os.remove(tmp)


def _checked(example: Example) -> Union[Example, BadInput]:
  """The example if every image in it decodes, else the first undecodable one as bad."""
  from mmjax.data.image import decode_image  # pylint: disable=import-outside-toplevel
  images = [("image", example.key, example.image)] + [
      (f"source image {j}", key, img)
      for j, (key, img) in enumerate(zip(example.source_keys, example.source_images))]
  for what, key, data in images:
    try:
      decode_image(data)
    except BadRecord as e:
      return BadInput(example.where, f"{what} {key!r}: {e}", "undecodable")
  return example


def write_records(examples: Iterable[Union[Example, BadInput]], out_path: str,
                  shard_size: int = 10_000, *, check: bool = False, on_bad: str = "raise",
                  overwrite: bool = True,
                  progress: Optional[Callable[[int], object]] = None) -> Conversion:
  """Writes examples as ArrayRecord shards at ``out_path``.

  ``check``: decode every image first (an undecodable one makes its example bad).
  ``on_bad``: ``raise`` the first bad input as `mmjax.errors.MissingDataInput` /
  `mmjax.errors.DataInputError` (nothing is written), or ``report`` it in the result.
  ``overwrite``: replace the shards of an earlier conversion at ``out_path`` (False: an
  error naming them); they stay until this one succeeds, after which ``shards_of(out_path)``
  is exactly its ``paths``. ``progress(1)`` is called per input.
  """
  if on_bad not in ("raise", "report"):
    raise ValueError(f"on_bad must be 'raise' or 'report', got {on_bad!r}")
  old = shards_of(out_path)
  if old and not overwrite:
    raise DataInputError(f"{len(old)} shard(s) of an earlier conversion exist at {out_path}-* "
                         f"(e.g. {old[0]}); pass --overwrite (overwrite=True) to replace them")
  writer, bad = _ShardWriter(out_path, shard_size), []
  try:
    for item in examples:
      if check and isinstance(item, Example):
        item = _checked(item)
      if isinstance(item, BadInput):
        if on_bad == "raise":
          raise item.error()
        bad.append(item)
      else:
        writer.write(item.serialize())
      if progress is not None:
        progress(1)
  except BaseException:
    writer.abort()
    raise
  paths = writer.close()
  for path in set(old) - set(paths):   # the earlier conversion had more shards
    os.remove(path)
  return Conversion(paths, writer.count, sum(os.path.getsize(p) for p in paths), bad)


# ------------------------------------------------------------------------- a folder + captions
def read_caption_rows(captions_file: str) -> list[tuple[str, object]]:
  """``[(where, row dict | BadInput)]`` of a JSONL or CSV (``.csv``) captions file; ``where``
  is ``file:line``. A file that does not exist, or a CSV without the columns ``image`` and
  ``caption`` (or ``answer``), is an error."""
  if not os.path.isfile(captions_file):
    raise MissingDataInput(f"captions file {captions_file!r} does not exist")
  rows = []
  if captions_file.endswith(".csv"):
    with open(captions_file, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = {"image"} - set(reader.fieldnames or ())
      if missing or not {"caption", "answer"} & set(reader.fieldnames or ()):
        raise DataInputError(f"{captions_file}: a CSV needs the columns image and caption "
                             f"(or answer); it has {reader.fieldnames}")
      for line, row in enumerate(reader, start=2):
        # empty optional cells are absent; source_images is 'a.png|b.png'
        row = {k: v for k, v in row.items() if k == "caption" or v not in (None, "")}
        if "source_images" in row:
          row["source_images"] = row["source_images"].split("|")
        rows.append((f"{captions_file}:{line}", row))
    return rows
  with open(captions_file, encoding="utf-8") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      where = f"{captions_file}:{line}"
      try:
        row = json.loads(text)
      except ValueError as e:
        rows.append((where, BadInput(where, f"not JSON ({e}): {text.strip()[:80]!r}")))
        continue
      if not isinstance(row, dict):
        row = BadInput(where, f"expected a JSON object, got {text.strip()[:80]!r}")
      rows.append((where, row))
  return rows


def _row_example(where: str, row: dict, images_dir: str) -> Union[Example, BadInput]:
  """One captions row -> an example (its image files read), or why it cannot be one."""
  image = row.get("image")
  caption = row.get("caption", "" if isinstance(row.get("answer"), str) else None)
  sources = row.get("source_images", [row["source_image"]] if "source_image" in row else [])
  if not isinstance(image, str) or not isinstance(caption, str):
    return BadInput(where, "expected 'image' (a path) and 'caption' (or 'answer') strings, "
                           f"got {json.dumps(row)[:120]}")
  if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
    return BadInput(where, f"'source_images' must be a list of paths, got {sources!r}")
  texts = {k: row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str)}
  data = []
  for rel in [image] + list(sources):
    path = os.path.join(images_dir, rel)
    if not os.path.isfile(path):
      return BadInput(where, f"image {rel!r} not found under {images_dir!r}", "missing")
    with open(path, "rb") as f:
      data.append(f.read())
  return Example(data[0], caption, image, where, tuple(data[1:]), tuple(sources), texts)


def folder_examples(images_dir: str, rows: Sequence[tuple[str, object]]
                    ) -> Iterator[Union[Example, BadInput]]:
  """`read_caption_rows` rows -> examples (or bad inputs), in order."""
  for where, row in rows:
    yield row if isinstance(row, BadInput) else _row_example(where, row, images_dir)


def convert_folder(images_dir: str, captions_file: str, out_path: str,
                   shard_size: int = 10_000, check: bool = False, on_bad: str = "raise"
                   ) -> list[str]:
  """Images in a folder + a captions file -> ArrayRecord shards; returns their paths.

  ``captions_file``: JSONL lines ``{"image": relpath, "caption": ...}`` or a CSV (``.csv``)
  with columns ``image,caption``; paths are relative to ``images_dir``. Edit / instruct
  records add ``"source_images": [relpath, ...]`` (CSV: ``a.png|b.png``; the caption is the
  instruction, ``image`` the target); ``question`` / ``answer`` are kept when present. With
  ``on_bad='raise'`` a missing image is a `mmjax.errors.MissingDataInput` naming the line
  (``'report'``: see `write_records`). Image bytes are copied undecoded unless ``check``.

  >>> import tempfile; d = tempfile.mkdtemp()
  >>> _ = open(f"{d}/a.png", "wb").write(b"...png bytes...")
  >>> _ = open(f"{d}/caps.jsonl", "w").write('{"image": "a.png", "caption": "a cat"}\\n')
  >>> [os.path.basename(p) for p in convert_folder(d, f"{d}/caps.jsonl", f"{d}/out", 10)]
  ['out-00000-of-00001.array_record']
  """
  rows = read_caption_rows(captions_file)
  result = write_records(folder_examples(images_dir, rows), out_path, shard_size,
                         check=check, on_bad=on_bad)
  _log_result("convert_folder", result, out_path)
  return result.paths


def _log_result(what: str, result: Conversion, out_path: str) -> None:
  if result.bad:
    logging.warning("%s: left out %d bad input(s), e.g. %s", what, len(result.bad),
                    result.bad[0])
  logging.info("%s: %d records -> %d shard(s) at %s-*", what, result.records,
               len(result.paths), out_path)


# ------------------------------------------------------------------------- webdataset tars
def _webdataset_samples(tar_path: str) -> Iterable[tuple[str, dict[str, bytes]]]:
  """``(key, {ext: bytes})`` per sample; a sample's files are consecutive in the tar."""
  key, files = None, {}
  with tarfile.open(tar_path, "r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      dirname, base = os.path.split(member.name)
      if "." not in base:
        continue
      stem, ext = base.split(".", 1)
      k = os.path.join(dirname, stem)
      if k != key and key is not None:
        yield key, files
        files = {}
      key = k
      files[ext.lower()] = tar.extractfile(member).read()
  if key is not None:
    yield key, files


def _webdataset_texts(files: dict[str, bytes]) -> tuple[Optional[str], dict]:
  """``(caption or None, {question / answer})`` of a sample's ``.txt`` / ``.json``."""
  meta = json.loads(files["json"]) if "json" in files else {}
  meta = meta if isinstance(meta, dict) else {}
  texts = {k: meta[k] for k in TEXT_FIELDS if isinstance(meta.get(k), str)}
  if "txt" in files:
    return files["txt"].decode("utf-8").strip(), texts
  for field in ("caption", "text", "txt"):
    if isinstance(meta.get(field), str):
      return meta[field], texts
  return ("" if "answer" in texts else None), texts


_SOURCE_EXT = re.compile(r"source(\d+)\.(%s)$" % "|".join(_IMAGE_EXTS))


def webdataset_tars(patterns: Union[str, Sequence[str]]) -> list[str]:
  """Tar paths from globs or paths (sorted per pattern); one that matches nothing is an
  error naming it."""
  tars = []
  for pattern in [patterns] if isinstance(patterns, str) else patterns:
    found = sorted(globlib.glob(pattern))
    if not found:
      raise MissingDataInput(f"no tar files match {pattern!r}")
    tars += found
  return tars


def webdataset_examples(tars: Sequence[str]) -> Iterator[Union[Example, BadInput]]:
  """Samples of webdataset tars -> examples (or bad inputs: no image, no caption, an
  unreadable tar). Edit / instruct samples hold ``KEY.source0.png``, ``KEY.source1.jpg``,
  ... beside the target ``KEY.png``."""
  for tar_path in tars:
    try:
      for key, files in _webdataset_samples(tar_path):
        where = f"{tar_path}:{key}"
        image_ext = next((e for e in _IMAGE_EXTS if e in files), None)
        try:
          caption, texts = _webdataset_texts(files)
        except (ValueError, UnicodeDecodeError) as e:
          yield BadInput(where, f"unreadable caption: {e}")
          continue
        if image_ext is None or caption is None:
          missing = " and ".join(n for n, v in (("image", image_ext), ("caption", caption))
                                 if v is None)
          yield BadInput(where, f"no {missing} (has {', '.join(sorted(files))})")
          continue
        sources = sorted((int(m.group(1)), ext) for ext in files
                         if (m := _SOURCE_EXT.fullmatch(ext)))
        yield Example(files[image_ext], caption, key, where,
                      tuple(files[ext] for _, ext in sources),
                      tuple(f"{key}.{ext}" for _, ext in sources), texts)
    except (tarfile.TarError, OSError) as e:
      yield BadInput(tar_path, f"unreadable tar ({type(e).__name__}: {e}); the samples "
                               f"before the damage were kept")


def convert_webdataset(tar_paths: Union[str, Sequence[str]], out_path: str,
                       shard_size: int = 10_000, check: bool = False) -> list[str]:
  """Webdataset tar shards (``key.jpg|png|...`` + ``key.txt`` or ``key.json`` with a
  'caption'/'text' field) -> ArrayRecord shards; returns their paths.

  ``tar_paths``: a glob or a list of globs / paths, each read in sorted order. Samples
  without an image or a caption are left out and counted in a warning.
  """
  result = write_records(webdataset_examples(webdataset_tars(tar_paths)), out_path,
                         shard_size, check=check, on_bad="report")
  _log_result("convert_webdataset", result, out_path)
  return result.paths


class ArrayRecordSource:
  """Random-access source over shards written by the converters.

  Records: ``{'image': encoded bytes, 'caption': str, 'key': str}``; a record that is not
  in our format raises `mmjax.data.BadRecord`.
  """

  def __init__(self, paths: str | Sequence[str]):
    if isinstance(paths, str):
      self.paths = sorted(globlib.glob(paths))
      if not self.paths:
        raise FileNotFoundError(f"no ArrayRecord files match {paths!r}")
    else:
      self.paths = list(paths)
    import grain  # pylint: disable=import-outside-toplevel
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    return parse_record(self._source[int(index)])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} file(s), first {self.paths[0]!r})"


def _lookup(example: dict, path: str):
  """``example['a']['b']`` for ``path='a/b'``."""
  value = example
  for part in path.split("/"):
    value = value[part]
  return value


class TfdsSource:
  """A TFDS dataset through ``tfds.data_source`` (prepared in ArrayRecord format).

  Records: ``{'image': uint8 [H, W, 3], 'caption': str, 'key': str}``. ``image_key`` /
  ``caption_key`` name the features ('a/b' for nested ones); a caption feature that is a
  sequence (several captions per image) gives its first caption.

  Example::

      src = TfdsSource("coco_captions", "train", data_dir="/data/tfds",
                       caption_key="captions/text")
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", caption_key: str = "caption"):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key, caption_key
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    return adapt_example(self._source[int(index)], self.image_key, self.caption_key,
                         key=f"{self.name}/{self.split}/{int(index)}")

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def adapt_example(example: dict, image_key: str, caption_key: str, key: str = "") -> dict:
  """A TFDS example -> our record ``{'image', 'caption', 'key'}``."""
  try:
    image, caption = _lookup(example, image_key), _lookup(example, caption_key)
  except KeyError as e:
    raise KeyError(f"TFDS example has no feature {e}; features: {sorted(example)}") from e
  if isinstance(caption, (list, tuple)) or getattr(caption, "ndim", 0) > 0:
    if len(caption) == 0:
      raise BadRecord(f"example {key!r} has no caption in {caption_key!r}")
    caption = caption[0]  # several captions per image: the first
  if hasattr(caption, "item"):  # numpy scalar / 0-d array
    caption = caption.item()
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  return {"image": image, "caption": str(caption), "key": key}

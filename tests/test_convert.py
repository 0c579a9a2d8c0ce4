"""``python -m mmjax.data.convert``: folders + JSONL/CSV, webdataset tars, edit / instruct
records -> ArrayRecord; bad inputs named in the summary; read back through the pipeline
with each system's preprocess."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmjax import config as mcfg
from mmjax.data import convert, image, pipeline, sources
from mmjax.systems.base import get_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(k: int, size=(6, 4)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, (10 * k, 0, 0)).save(buf, "PNG")
  return buf.getvalue()


def _red(data: bytes) -> int:
  return int(image.decode_image(data)[0, 0, 0])


def _run(capsys, *argv):
  """``(exit status, stdout, stderr)`` of the command line, in-process."""
  rc = convert.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _messy_folder(tmp_path):
  """6 good images, a corrupt one, a row naming a missing file, a row that is not JSON and
  one without a caption; LaViDa texts on one row."""
  d = tmp_path / "photos"
  d.mkdir()
  lines = []
  for k in range(6):
    (d / f"img{k}.png").write_bytes(_png(k))
    row = {"image": f"img{k}.png", "caption": f"caption {k}"}
    if k == 1:
      row.update(question="what colour?", answer="red")
    lines.append(json.dumps(row))
  (d / "bad.png").write_bytes(_png(9)[:30])                       # truncated PNG
  lines.insert(2, json.dumps({"image": "bad.png", "caption": "corrupt"}))
  lines.insert(4, json.dumps({"image": "gone.png", "caption": "missing"}))
  lines.append("{not json")
  lines.append(json.dumps({"image": "img0.png"}))
  (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return d


def test_folder_names_missing_corrupt_and_malformed_inputs(tmp_path, capsys):
  d = _messy_folder(tmp_path)
  out = tmp_path / "out" / "photos"
  rc, text, err = _run(capsys, "--images", d, "--captions", d / "captions.jsonl", "--out", out,
                       "--check", "--shard-size", 4)
  assert rc == 0, err
  caps = d / "captions.jsonl"
  assert "records    6\n" in text and "shards     2" in text
  nbytes = sum(os.path.getsize(p) for p in sources.shards_of(str(out)))
  assert f"bytes      {nbytes:,}" in text
  assert "bad        4 (left out):" in text
  assert f"{caps}:3: image 'bad.png': undecodable image" in text          # --check
  assert f"{caps}:5: image 'gone.png' not found under" in text
  assert f"{caps}:9: not JSON" in text
  assert f"{caps}:10: expected 'image' (a path) and 'caption'" in text
  assert f"--config.data.path='{out}-*.array_record'" in text
  assert len((tmp_path / "out" / "photos.bad_inputs.txt").read_text().splitlines()) == 4

  src = sources.ArrayRecordSource(f"{out}-*.array_record")
  recs = [src[i] for i in range(len(src))]
  assert [r["caption"] for r in recs] == [f"caption {k}" for k in range(6)]
  assert [_red(r["image"]) for r in recs] == [10 * k for k in range(6)]
  assert recs[1]["question"] == "what colour?" and recs[1]["answer"] == "red"
  assert "question" not in recs[0] and "source_images" not in recs[0]

  # the same prefix again: refused without --overwrite (one line); without --check the
  # corrupt image is copied (the pipeline's bad-record policy meets it at training time)
  rc, _, err = _run(capsys, "--images", d, "--captions", caps, "--out", out)
  assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err
  rc, text, _ = _run(capsys, "--images", d, "--captions", caps, "--out", out, "--overwrite")
  assert rc == 0 and "records    7\n" in text and "bad        3" in text
  assert "--check decodes each one" in text
  assert len(sources.shards_of(str(out))) == 1                      # the old 2 are gone


def test_round_trip_through_the_pipeline_with_metaquery_preprocess(tmp_path, capsys):
  d = _messy_folder(tmp_path)
  with open(d / "captions.csv", "w", newline="") as f:    # the same images as a CSV
    w = csv.DictWriter(f, fieldnames=["image", "caption"])
    w.writeheader()
    w.writerows({"image": f"img{k}.png", "caption": f"a red circle {k}"} for k in range(6))
  out = tmp_path / "csv"
  assert _run(capsys, "--images", d, "--captions", d / "captions.csv", "--out", out)[0] == 0
  cfg = mcfg.load(os.path.join(ROOT, "configs/metaquery.py:demo"), [
      "--config.data.source=array_record", f"--config.data.path={out}-*.array_record",
      "--config.data.batch_size=4"])
  system = get_system(cfg)
  source = pipeline.make_source(cfg.data, seed=0)
  assert len(source) == 6
  it = pipeline.make_iterator(cfg.data, seed=0, preprocess=system.preprocess, read_threads=0)
  batch = next(it)
  assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
  assert batch["prompt_ids"].shape == (4, cfg.model.prompt_len)
  red = sorted(np.rint((batch["images"][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist())
  assert set(red) <= {0, 10, 20, 30, 40, 50} and len(set(red)) == 4  # 4 distinct records
  assert it.stats()["bad"] == 0


def _edit_folder(tmp_path):
  """Instruct records with 1..3 source images (JSONL, and ``source_image`` for one)."""
  d = tmp_path / "edits"
  d.mkdir()
  for k in range(10):
    (d / f"{k}.png").write_bytes(_png(k, size=(8, 8)))
  rows = [{"source_images": [f"{k}.png" for k in range(1, 1 + n)], "caption": f"combine {n}",
           "image": "0.png"} for n in (1, 2, 3, 2, 1)]
  rows.append({"source_image": "9.png", "caption": "edit one", "image": "8.png"})
  rows.append({"source_images": ["1.png", "nope.png"], "caption": "x", "image": "0.png"})
  (d / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return d


def test_edit_and_instruct_records_round_trip(tmp_path, capsys):
  d = _edit_folder(tmp_path)
  out = tmp_path / "edits_ar"
  rc, text, _ = _run(capsys, "--images", d, "--captions", d / "edits.jsonl", "--out", out,
                     "--check")
  assert rc == 0 and "records    6\n" in text
  assert "edits.jsonl:7: image 'nope.png' not found" in text
  src = sources.ArrayRecordSource(f"{out}-*.array_record")
  want = [[1], [1, 2], [1, 2, 3], [1, 2], [1], [9]]
  for i, ks in enumerate(want):
    rec = src[i]
    assert [_red(s) for s in rec["source_images"]] == [10 * k for k in ks]
    assert _red(rec["image"]) == (80 if i == 5 else 0)
  (d / "edits.csv").write_text("image,caption,source_images\n0.png,two,1.png|2.png\n"
                               "8.png,plain,\n")
  assert _run(capsys, "--images", d, "--captions", d / "edits.csv", "--out", out / "c")[0] == 0
  csv_src = sources.ArrayRecordSource(f"{out}/c-*.array_record")
  assert len(csv_src) == 2
  two, plain = csv_src[0], csv_src[1]
  assert [_red(s) for s in two["source_images"]] == [10, 20] and two["caption"] == "two"
  assert "source_images" not in plain and _red(plain["image"]) == 80

  # instruct (up to 3 source images): the pipeline with MetaQuery's task preprocess
  cfg = mcfg.load(os.path.join(ROOT, "configs/metaquery.py:demo_instruct"), [
      "--config.data.source=array_record", f"--config.data.path={out}-*.array_record",
      "--config.data.batch_size=6"])
  system = get_system(cfg)

  def preprocess(record, rng):
    return dict(system.preprocess(record, rng), n=np.int32(len(record["source_images"])))

  batch = next(pipeline.make_iterator(cfg.data, seed=0, preprocess=preprocess,
                                      read_threads=0))
  assert batch["input_views"].shape[:2] == (6, 3)
  np.testing.assert_array_equal(batch["input_valid"].sum(-1), batch["n"])
  assert sorted(batch["n"].tolist()) == [1, 1, 1, 2, 2, 3]


def _tar(path, files):
  with tarfile.open(path, "w") as tar:
    for name, data in files:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_through_the_command(tmp_path):
  _tar(tmp_path / "shards-0.tar", [
      ("a/s0.png", _png(0)), ("a/s0.txt", b"caption 0"),
      ("a/s1.jpg", _png(1)), ("a/s1.json", json.dumps({"caption": "caption 1"}).encode()),
      ("a/s2.png", _png(2)),                                       # no caption
      ("a/s3.png", _png(3)[:25]), ("a/s3.txt", b"corrupt")])
  _tar(tmp_path / "shards-1.tar", [                                # an edit sample
      ("e0.png", _png(4)), ("e0.source0.png", _png(5)), ("e0.source1.png", _png(6)),
      ("e0.txt", b"swap them")])
  (tmp_path / "shards-2.tar").write_bytes(b"\0" * 100)              # not a tar
  out = tmp_path / "wds"
  # as a user types it: python -m, a quoted glob
  r = subprocess.run([sys.executable, "-m", "mmjax.data.convert", "--webdataset",
                      str(tmp_path / "shards-*.tar"), "--out", str(out), "--check"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "read       3 tar(s)" in r.stdout and "records    3\n" in r.stdout
  assert f"{tmp_path}/shards-0.tar:a/s2: no caption (has png)" in r.stdout
  assert f"{tmp_path}/shards-0.tar:a/s3: image 'a/s3': undecodable image" in r.stdout
  assert f"{tmp_path}/shards-2.tar: unreadable tar" in r.stdout
  src = sources.ArrayRecordSource(f"{out}-*.array_record")
  recs = [src[i] for i in range(3)]
  assert [r["caption"] for r in recs] == ["caption 0", "caption 1", "swap them"]
  assert [_red(s) for s in recs[2]["source_images"]] == [50, 60]
  assert _red(recs[2]["image"]) == 40 and recs[2]["key"] == "e0"


@pytest.mark.parametrize("argv,message", [
    (["--images", "photos", "--captions", "c.jsonl", "--out", "o", "--bogus"],
     "unrecognized arguments: --bogus"),
    (["--images", "photos", "--captions", "c.jsonl"], "--out"),
    (["--images", "photos", "--out", "o"], "give --images DIR with --captions"),
    (["--webdataset", "x.tar", "--images", "photos", "--captions", "c.jsonl", "--out", "o"],
     "not both"),
    (["--images", "nowhere", "--captions", "c.jsonl", "--out", "o"],
     "--images 'nowhere' is not a directory"),
    (["--images", "{tmp}", "--captions", "{tmp}/none.jsonl", "--out", "o"],
     "captions file '{tmp}/none.jsonl' does not exist"),
    (["--images", "{tmp}", "--captions", "{tmp}/c.txt", "--out", "o"],
     "expected a .jsonl or .csv file"),
    (["--images", "{tmp}", "--captions", "{tmp}/cols.csv", "--out", "o"],
     "a CSV needs the columns image and caption"),
    (["--webdataset", "{tmp}/none-*.tar", "--out", "o"], "no tar files match"),
    (["--webdataset", "x.tar", "--out", "o", "--shard-size", "0"], "must be positive"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, argv, message):
  (tmp_path / "cols.csv").write_text("path,text\na.png,x\n")
  fill = lambda s: s.replace("{tmp}", str(tmp_path))
  rc, out, err = _run(capsys, *map(fill, argv))
  assert rc == 2 and out == ""
  assert err.startswith("error: ") and err.count("\n") == 1 and fill(message) in err, err


def test_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--images", "--captions", "--webdataset", "--out", "--check", "--shard-size",
               "--overwrite"):
    assert flag in text

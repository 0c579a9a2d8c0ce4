"""README.md stays true: every command in "Which command do I want" and "Train on your own
data" parses (flags, config file, presets, ``--config.*`` overrides, ``--mode``), the
table's data row runs in a tiny form (convert a small folder, read it back through the
pipeline with the system's preprocess), paths chain (a train command reads what a convert
command wrote, the export script reads what ``--mode export`` wrote), links resolve. No
training: the whole module takes seconds."""
import importlib.util
import inspect
import json
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import config as mcfg
from mmjax.data import convert, pipeline
from mmjax.errors import MissingCheckpoint
from mmjax.systems.base import get_system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE, OWN_DATA = "Which command do I want", "Train on your own data"


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _section(title: str) -> str:
  text = _readme()
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
  assert match, f"README.md has no '## {title}' section"
  return match.group(1)


def _table_rows() -> list[list[str]]:
  lines = [l for l in _section(TABLE).splitlines() if l.startswith("|")]
  return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


def _spans(cell: str) -> list[str]:
  return re.findall(r"`([^`]+)`", cell)


def _block_commands(section: str) -> list[str]:
  """The ``python ...`` lines of a section's bash blocks, continuations joined."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", section, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if line.strip().startswith("python "):
        out.append(re.sub(r"\s+#.*$", "", line).strip())     # an inline comment
  return out


def _script(name: str):
  path = os.path.join(ROOT, "launch", name)
  spec = importlib.util.spec_from_file_location(f"readme_launch_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rooted(spec: str) -> str:
  return os.path.join(ROOT, spec) if not os.path.isabs(spec) else spec


def check_command(cmd: str, seen: dict) -> dict:
  """Parses one README command the way its program does; ``seen`` collects what earlier
  commands wrote (convert outputs, export dirs) so later ones can be checked against it."""
  argv = shlex.split(cmd)
  assert argv[0] == "python", cmd
  if argv[1:3] == ["-m", "mmjax.data.convert"]:
    args = convert.parse_args(argv[3:])
    seen.setdefault("converted", []).append(args.out)
    return {"kind": "convert", "args": args}
  if argv[1] == "launch/tpu.py":
    args, overrides = _script("tpu.py").parse_args(argv[2:])
    cfg = mcfg.load(_rooted(args.config), overrides)
    if cfg.data.source == "array_record":
      assert cfg.data.path in [f"{o}-*.array_record" for o in seen.get("converted", [])], (
          f"{cmd}: data.path {cfg.data.path!r} is not what a convert command above wrote")
    if args.mode != "train":
      assert args.mode in get_system(cfg).modes(), cmd
    if args.mode == "export":
      seen.setdefault("exported", []).append(os.path.join(args.workdir, "export"))
    return {"kind": "tpu", "args": args, "config": cfg, "overrides": overrides}
  if argv[1] == "launch/aot.py":
    args, overrides = _script("aot.py").parse_args(argv[2:])
    cfg = mcfg.load(_rooted(args.config), overrides)
    from mmjax.train import aot  # pylint: disable=import-outside-toplevel
    assert aot._TOPOLOGY.match(args.topology), cmd  # pylint: disable=protected-access
    return {"kind": "aot", "args": args, "config": cfg}
  if argv[1].startswith("scripts/"):
    assert os.path.isfile(os.path.join(ROOT, argv[1])), cmd
    assert argv[2:] and argv[2] in seen.get("exported", []), (
        f"{cmd}: reads {argv[2:]}, not an export directory of a command above")
    return {"kind": "script"}
  raise AssertionError(f"test_readme does not know how to check {cmd!r}; teach it")


def test_table_has_the_newcomer_rows_and_links_resolve():
  rows = _table_rows()
  wants = [r[0].lower() for r in rows]
  for topic in ("demo", "my own data", "import", "export", "pod", "notebook"):
    assert any(topic in w for w in wants), (topic, wants)
  headings = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
              for h in re.findall(r"^#+ (.+)$", _readme(), re.M)}
  for row in rows:
    for target in re.findall(r"\]\(([^)]+)\)", " ".join(row)):
      if target.startswith("#"):
        assert target[1:] in headings, target
      else:
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_table_commands_parse_and_chain():
  seen, kinds = {}, set()
  for row in _table_rows():
    for span in _spans(row[1]):
      if span.startswith("python "):
        kinds.add(check_command(span, seen)["kind"])
  assert kinds == {"convert", "tpu", "aot", "script"}, kinds


def test_table_python_calls_bind():
  """``mmjax.x.f(...)`` spans: the function exists and takes those arguments."""
  calls = [s for r in _table_rows() for s in _spans(r[1]) if s.startswith("mmjax.")]
  assert calls
  for call in calls:
    name, args = re.fullmatch(r"([\w.]+)\((.*)\)", call).groups()
    fn = mmjax
    for part in name.split(".")[1:]:
      fn = getattr(fn, part) if hasattr(fn, part) else importlib.import_module(
          f"{fn.__name__}.{part}")
    inspect.signature(fn).bind(*eval(f"({args},)"))  # pylint: disable=eval-used


def test_pretrained_row_names_the_checkpoints_the_system_loads():
  row = next(r for r in _table_rows() if "import" in r[0].lower())
  cmd = next(s for s in _spans(row[1]) if s.startswith("python launch/tpu.py"))
  got = check_command(cmd, {})
  paths = [o.split("=", 1)[1] for o in got["overrides"] if o.split("=")[0].endswith("path")]
  assert len(paths) == 3
  with pytest.raises(MissingCheckpoint) as e:   # the system reads exactly these fields
    get_system(got["config"])
  assert all(repr(p) in str(e.value) for p in paths), str(e.value)


def test_notebooks_row_is_true():
  row = next(r for r in _table_rows() if "notebook" in r[0].lower())
  notebooks = os.path.join(ROOT, "notebooks")
  have = sorted(f for f in os.listdir(notebooks) if f.endswith(".ipynb")) if os.path.isdir(
      notebooks) else []
  if "(coming)" in row[1]:
    assert not have, f"notebooks exist ({have}): link them in the README table"
  else:
    linked = re.findall(r"notebooks/[\w\-.]+\.ipynb", row[1])
    assert linked and all(os.path.isfile(os.path.join(ROOT, p)) for p in linked), row[1]


def test_table_data_row_runs_tiny(tmp_path, monkeypatch, capsys):
  """The 'my own data' row for real, on 4 images: convert, then the train command's config
  reads them through the pipeline and the system's preprocess (no training)."""
  row = next(r for r in _table_rows() if "my own data" in r[0].lower())
  cmds = [s for s in _spans(row[1]) if s.startswith("python ")]
  conv = shlex.split(cmds[0])
  args = convert.parse_args(conv[3:])
  monkeypatch.chdir(tmp_path)
  os.makedirs(args.images)
  with open(args.captions, "w") as f:
    for k in range(4):
      Image.new("RGB", (40, 30), (60 * k, 0, 0)).save(os.path.join(args.images, f"{k}.png"))
      f.write(json.dumps({"image": f"{k}.png", "caption": f"a red circle {k}"}) + "\n")
  relocate = lambda s: s.replace(args.out, str(tmp_path / "out" / "shards"))
  assert convert.main([relocate(a) for a in conv[3:]]) == 0
  assert "records    4" in capsys.readouterr().out
  train = check_command(relocate(cmds[1]), {"converted": [relocate(args.out)]})
  cfg = train["config"]
  cfg.data.batch_size = 4
  system = get_system(cfg)
  it = pipeline.make_iterator(cfg.data, seed=0, preprocess=system.preprocess, read_threads=0)
  batch = next(it)
  r = cfg.data.resolution
  assert batch["images"].shape == (4, r, r, 3) and it.stats()["bad"] == 0
  assert np.unique(batch["images"][:, 0, 0, 0]).size == 4


def test_own_data_section_commands_parse_and_chain():
  seen = {}
  checked = [check_command(cmd, seen) for cmd in _block_commands(_section(OWN_DATA))]
  kinds = [c["kind"] for c in checked]
  assert kinds.count("convert") >= 2 and kinds.count("tpu") >= 3, kinds
  assert {c["args"].mode for c in checked if c["kind"] == "tpu"} >= {"train", "sample", "eval"}

"""Config files: presets, overrides with types, unknown fields are errors naming the field."""
import os

import pytest

from mmjax import config as config_lib
from mmjax.errors import ConfigError, UnknownField, UnknownPreset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONER = os.path.join(ROOT, "configs", "captioner.py")


def test_preset_and_overrides():
  cfg = config_lib.load(CAPTIONER + ":demo",
                        ["--config.total_steps=7", "--config.optim.lr=1", "--config.dtype=bfloat16",
                         "--config.mesh.fsdp=-1", "--config.optim.frozen=['stack/.*']"])
  assert cfg.total_steps == 7
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
  assert cfg.dtype == "bfloat16"
  assert cfg.mesh.fsdp == -1
  assert list(cfg.optim.frozen) == ["stack/.*"]
  for field in ("seed", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    assert field in cfg


def test_unknown_field_is_an_error_naming_it_and_the_closest():
  with pytest.raises(UnknownField, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\)"):
    config_lib.load(CAPTIONER + ":demo", ["--config.optim.lrr=1"])
  with pytest.raises(UnknownField, match="'nosuch'"):
    config_lib.load(CAPTIONER, ["--config.nosuch.field=1"])
  with pytest.raises(UnknownField, match="did you mean 'total_steps'"):
    config_lib.load(CAPTIONER, ["--config.totl_steps=1"])
  cfg = config_lib.load(CAPTIONER)
  with pytest.raises(AttributeError):
    cfg.totl_steps = 3  # locked: typos in code are errors too


def test_bad_preset_and_bad_override_syntax():
  with pytest.raises(UnknownPreset, match="unknown preset 'dmeo'.*did you mean 'demo'"):
    config_lib.load(CAPTIONER + ":dmeo")
  with pytest.raises(ConfigError, match="=value"):
    config_lib.load(CAPTIONER, ["--config.seed"])
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load("configs/does_not_exist.py")
  with pytest.raises(ConfigError, match="seed"):
    config_lib.load(CAPTIONER, ["--config.seed=[1, 2]"])


@pytest.mark.parametrize("spec", ["captioner.py", "metaquery.py", "lavida.py"])
def test_every_config_file_parses_presets_the_same_way(spec):
  """One preset mechanism: an unknown name is the same typed error with a suggestion."""
  with pytest.raises(UnknownPreset, match=f"unknown preset 'nosuch' for configs/{spec}"):
    config_lib.load(os.path.join(ROOT, "configs", spec) + ":nosuch")


def test_launcher_prints_library_errors_as_one_line(tmp_path):
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"),
                                   "--config", CAPTIONER + ":demo", "--workdir", str(tmp_path),
                                   *a], capture_output=True, text=True, env=env, timeout=120)
  out = run("--config.optim.lrr=1")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: unknown config field 'optim.lrr' (did you mean 'optim.lr'?) "
      "(from override '--config.optim.lrr=1')"]
  out = run("--mode", "sample")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: no checkpoint in "), out.stderr

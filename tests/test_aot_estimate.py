"""``launch/aot.py --estimate``: the config surgery behind it, and the extrapolation against a
whole unrolled compile on a small model (libtpu's TPU compiler, no TPU needed)."""
import os

import pytest

from mmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def quiet_libtpu(monkeypatch):
  # what aot.topology_devices sets; monkeypatch keeps them out of the other tests' env
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    monkeypatch.setenv(k, os.environ.get(k, v))


def _launcher():
  from launch import aot     # launch/ on the path: the repository root (a namespace package)
  return aot


def test_depths_and_unrolling_of_nested_configs():
  launch = _launcher()
  cfg = config_lib.load(os.path.join(ROOT, "configs/dualtoken.py:unified"))
  stacks = launch.stacks_of(cfg)
  assert [(s.name, full) for s, _, full in stacks] == [("lm", 36), ("tokenizer tower", 26)]
  small = launch.at_depths(cfg, stacks, {"lm": 2, "tokenizer tower": 8})
  assert small.model.lm_config.num_hidden_layers == 2
  # the tower keeps its one layer above the semantic layer
  assert small.tokenizer.model.semantic_layer == 8
  assert small.tokenizer.model.vision_config.num_hidden_layers == 9
  assert small.scan_layers is False and small.tokenizer.scan_layers is False
  assert small.tokenizer.model.distance_chunk == 0          # COST_OVERRIDES: no lax.map
  assert cfg.scan_layers is True and cfg.model.lm_config.num_hidden_layers == 36   # a copy


def test_every_paper_config_names_its_stacks():
  launch = _launcher()
  for spec, names in (("configs/metaquery.py", ["mllm", "connector", "dit"]),
                      ("configs/lavida.py:stage2", ["llm", "vision"]),
                      ("configs/lavida.py:stage2,dream", ["llm", "vision"]),
                      ("configs/dualtoken.py", ["tower"]),
                      ("configs/captioner.py", ["decoder"])):
    stacks = launch.stacks_of(config_lib.load(os.path.join(ROOT, spec)))
    assert [s.name for s, _, _ in stacks] == names, spec
    assert all(full > 4 for _, _, full in stacks), spec


@pytest.mark.slow   # three TPU compiles, ~3 min on 2 cores; bench/aot_estimate.py checks the same
def test_estimate_matches_the_whole_model_unrolled():
  pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU topologies")
  from mmjax.train import aot
  launch = _launcher()
  cfg = config_lib.load(os.path.join(ROOT, "configs/captioner.py:demo"), [
      "--config.model.num_layers=8", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
      "--config.dtype=bfloat16"])
  devices = aot.topology_devices("v5p:2x2x1")
  est = launch.estimate_cost(cfg, devices, (3, 4), log=lambda *_: None)
  assert len(est["compiles"]) == 2 and not est["loops_remaining"]
  check = launch.check_unrolled(cfg, devices, est)
  err = check["relative_error"]
  assert abs(err["flops_per_chip"]) < 0.01
  assert abs(err["estimated_seconds"]) < 0.05
  mfu = launch.estimate_mfu(launch_system(cfg), cfg, est, len(devices),
                            devices[0].device_kind)
  assert 0 < mfu["estimated_mfu"] < 1


def launch_system(cfg):
  from mmjax.systems.base import get_system
  return get_system(cfg)

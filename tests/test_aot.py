"""AOT compilation of the real train step against TPU topologies (libtpu, no TPU needed)."""
import importlib.util
import json
import os

import jax
import pytest

from mmjax.train import aot

pytest.importorskip(
    "libtpu", reason=f"libtpu is not installed (pip install 'jax[tpu]=={jax.__version__}'); "
    "TPU topologies cannot be described without it")

import train_helpers  # noqa: E402  (registers the tiny_mlp system)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(hidden=32, data=2, fsdp=2, tensor=1, dcn_data=1):
  """train_helpers' tiny MLP with every mesh field set here (its defaults may change)."""
  return train_helpers.tiny_config(**{
      "model.hidden": hidden, "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
      "mesh.context": 1, "mesh.dcn_data": dcn_data})


@pytest.fixture(autouse=True)
def quiet_libtpu(monkeypatch):
  # what aot.topology_devices sets; monkeypatch keeps them out of the other tests' env
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    monkeypatch.setenv(k, os.environ.get(k, v))


@pytest.mark.parametrize("name,kind,chips", [
    ("v5p:2x2x1", "TPU v5", 4), ("v4:2x2x1", "TPU v4", 4),
    ("v5e:2x2", "TPU v5 lite", 4), ("v6e:2x2", "TPU v6 lite", 4)])
def test_topology_names(name, kind, chips):
  devices = aot.topology_devices(name)
  assert len(devices) == chips and devices[0].device_kind == kind
  assert aot.hbm_bytes(kind) in (16 * aot.GiB, 32 * aot.GiB, 95 * aot.GiB)


def test_bad_topology_name():
  with pytest.raises(ValueError, match="should look like v5p:4x4x4"):
    aot.topology_devices("v5p-128")


def test_tiny_step_compiles_and_fits_on_v5e():
  cfg = _config(hidden=1024)
  r = aot.aot_report(cfg, "v5e:2x2")
  assert r["chips"] == 4 and r["mesh"] == dict(data=2, fsdp=2, tensor=1, context=1)
  m = r["memory"]
  assert m["fits"] is True and m["over_by"] == 0 and m["hbm"] == 16 * aot.GiB
  # the donated state is aliased; what is passed in holds at least this chip's shards
  state_bytes = r["params"]["per_device_bytes"] + r["optimizer_state"]["per_device_bytes"]
  assert m["arguments"] >= state_bytes and m["aliased"] >= 0.9 * state_bytes
  assert 0 < m["total"] < 64 << 20
  # embed (16) splits over fsdp; the 'mlp'-only vectors are replicated (tensor=1)
  assert r["params"]["per_device_bytes"] < r["params"]["total_bytes"]
  assert 0.5 < r["params"]["sharded_fraction"] < 1
  assert r["cost"]["flops_per_chip"] > 0 and r["cost"]["estimated_seconds"] > 0
  assert r["mfu"]["model_flops_source"] == "analytic"
  assert r["mfu"]["peak_flops_per_chip"] == 197e12
  assert 0 < r["mfu"]["implied_mfu"] < 1
  assert "fits:" in aot.format_report(r)


def test_multislice_mesh_over_dcn():
  cfg = _config(data=-1, dcn_data=2)
  r = aot.aot_report(cfg, "v5p:2x2x1", num_slices=2)
  assert r["chips"] == 8 and r["mesh"]["data"] == 4 and r["memory"]["fits"]


def test_xla_counts_loop_bodies_once():
  """Why the report flags scanned programs: XLA's flops cover one iteration of a loop."""
  mesh = jax.sharding.Mesh(aot.topology_devices("v5e:2x2")[:1], ("x",))
  x = jax.ShapeDtypeStruct((256, 256), jax.numpy.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  looped = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, b: b @ a, a)).lower(x).compile()
  cost = aot.cost_report(looped)
  assert cost["loop_bodies_counted_once"] is True
  assert cost["flops_per_chip"] < 3 * 2 * 256 ** 3  # ~one matmul, not ten
  mfu = aot.mfu_report(train_helpers.TinyMLP(_config()), _config(), cost, 1, "TPU v5 lite")
  assert mfu["implied_mfu"] is None and "one loop iteration" in mfu["note"]


def test_parse_oom_messages():
  assert aot.parse_oom("Used 17.5G of 15.75G hbm. Exceeded hbm capacity by 1.75G.") == (
      int(17.5 * aot.GiB), int(15.75 * aot.GiB))
  assert aot.parse_oom("some other failure") is None


def _launcher():
  spec = importlib.util.spec_from_file_location("launch_aot", os.path.join(ROOT, "launch", "aot.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_reports_a_step_that_does_not_fit(tmp_path, capsys):
  config_file = tmp_path / "huge.py"
  config_file.write_text(
      "import train_helpers\n"
      "def get_config(arg=None):\n"
      "  c = train_helpers.tiny_config()\n"
      "  c.model.hidden = int(arg)\n"
      "  return c\n")
  out = tmp_path / "report.json"
  # 60M hidden units: ~2e9 fp32 params + Adam, half of it per chip on fsdp=2 -> > 16 GiB
  rc = _launcher().main([f"--config={config_file}:60000000", "--topology", "v5e:2x2",
                         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
                         "--out", str(out)])
  assert rc == 1
  printed = capsys.readouterr().out
  assert "DOES NOT FIT" in printed and "over by" in printed
  report = json.loads(out.read_text())
  assert report["memory"]["fits"] is False and report["memory"]["over_by"] > 0
  assert report["params"]["total_params"] > 1_900_000_000

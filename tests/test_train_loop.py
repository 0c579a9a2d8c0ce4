"""The training loop end to end, through the real launcher in subprocesses (8 CPU devices):
the captioner resumes exactly after SIGKILL (and restores onto another mesh), SIGTERM saves
and exits 0, a corrupt latest checkpoint falls back to the previous one, a NaN stops the
run without saving, 2 hosts x 4 devices match 1 host x 8 devices. The tiny system of
``train_helpers`` runs through ``tests/train_config.py``.

Subprocesses share a persistent XLA compilation cache so each program compiles once.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_helpers as th
from mmjax import parallel
from mmjax.train import checkpoint as ckpt_lib, loop, state as state_lib
from mmjax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "tpu.py")
CONFIG = os.path.join(REPO, "tests", "train_config.py")
TOTAL = 8          # steps of every run; checkpoints every 4 (tiny_config)
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
           PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return e


def launch(env, workdir, *overrides, extra_env=None, config=CONFIG, total=TOTAL):
  cmd = [sys.executable, LAUNCHER, "--config", config, "--workdir", str(workdir),
         f"--config.total_steps={total}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env={**env, **(extra_env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=TIMEOUT):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def wait_for(predicate, proc, timeout=TIMEOUT, what=""):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n"
                           + proc.stdout.read())
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


def restore_params(workdir, step, config=None, system=None):
  """Params of ``step`` in ``workdir`` restored in this process on ``config``'s mesh."""
  c = config or th.tiny_config()
  system = system or th.TinyMLP(c)
  mesh, rules = parallel.make_mesh(c.mesh), parallel.logical_rules(c)
  abstract, _, _ = state_lib.abstract_train_state(system, c, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(str(workdir), c)
  try:
    return jax.device_get(ckpt.restore(step, abstract).state.params)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
  """An uninterrupted run of TOTAL steps (the reference for the other runs)."""
  workdir = tmp_path_factory.mktemp("straight")
  rc, out = finish(launch(env, workdir, "--config.profile_steps=2,3"))
  assert rc == 0, out
  # the profiled steps are a TensorBoard profile-plugin trace (numbers unchanged: the other
  # runs compare their losses with these)
  traces = [f for _, _, fs in os.walk(os.path.join(workdir, "profile")) for f in fs]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  assert "profile of steps 2-3" in out
  assert ckpt_lib.step_dirs(workdir) == [4, 8]
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
  for key in ("loss", "grad_norm", "lr", "steps_per_sec", "mfu", "mse"):
    assert key in rows[-1], key
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert "parameters: 1,360 trainable, 0 frozen" in out
  assert os.listdir(os.path.join(workdir, "tb"))
  return workdir


def assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


def test_captioner_resume_after_sigkill_is_exact(env, tmp_path):
  """The real system: kill right after the first checkpoint lands, restart, compare."""
  total, spec = 24, os.path.join(REPO, "configs", "captioner.py") + ":demo"
  overrides = ["--config.checkpoint_every=4", "--config.log_every=1",
               "--config.data.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
  straight = tmp_path / "cap_straight"
  rc, out = finish(launch(env, straight, *overrides, config=spec, total=total))
  assert rc == 0, out
  assert ckpt_lib.step_dirs(straight) == [16, 20, 24]  # keep_checkpoints=3

  workdir = tmp_path / "cap_killed"
  proc = launch(env, workdir, *overrides, config=spec, total=total)
  wait_for(lambda: ckpt_lib.step_dirs(workdir), proc, what="a checkpoint")
  proc.kill()
  proc.wait()
  resumed = max(ckpt_lib.step_dirs(workdir))
  assert resumed < total
  rc, out = finish(launch(env, workdir, *overrides, config=spec, total=total))
  assert rc == 0, out
  assert f"resuming from step {resumed}" in out
  assert losses(workdir) == losses(straight)
  assert len(losses(straight)) == total

  from mmjax import config as config_lib
  from mmjax.systems.captioner import Captioner
  c = config_lib.load(spec, overrides)
  final = restore_params(straight, total, c, Captioner(c))
  assert_bitwise(final, restore_params(workdir, total, c, Captioner(c)))
  # the same checkpoint restored onto another mesh holds the same numbers
  other = config_lib.load(spec, overrides + ["--config.mesh.data=1", "--config.mesh.fsdp=8"])
  assert_bitwise(final, restore_params(straight, total, other, Captioner(other)))


def test_run_mode_gets_the_latest_params(straight):
  seen = {}

  class WithEval(th.TinyMLP):
    def modes(self):
      return {"eval": lambda params, workdir: seen.update(params=jax.device_get(params))}

  c = th.tiny_config()
  loop.run_mode(c, str(straight), WithEval(c), "eval")
  assert_bitwise(seen["params"], restore_params(straight, TOTAL))


def test_sigterm_saves_and_exits_zero(env, tmp_path):
  workdir = tmp_path / "preempted"
  proc = launch(env, workdir, "--config.model.slow_data=0.05", "--config.total_steps=1000")
  metrics = os.path.join(workdir, "metrics.jsonl")
  wait_for(lambda: os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3, proc,
           what="3 logged steps")
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc)
  assert rc == 0, out
  last = read_jsonl(metrics)[-1]["step"]
  assert f"SIGTERM: saved step {last}" in out
  assert ckpt_lib.step_dirs(workdir) == [last]

  rc, out = finish(launch(env, workdir, f"--config.total_steps={last + 1}"))
  assert rc == 0, out
  assert f"resuming from step {last}" in out


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back(env, straight, tmp_path, damage):
  workdir = tmp_path / "corrupt"
  shutil.copytree(straight, workdir)
  state_dir = workdir / "checkpoints" / str(TOTAL) / "state"
  data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for p in data_files:
    if damage == "truncate":
      with open(p, "r+b") as f:
        f.truncate(max(p.stat().st_size // 2, 1))
    else:
      p.unlink()

  rc, out = finish(launch(env, workdir))
  assert rc == 0, out
  assert f"checkpoint step {TOTAL} in" in out and "cannot be restored" in out
  assert "resuming from step 4" in out
  assert ckpt_lib.step_dirs(workdir) == [4, TOTAL]          # the good one kept, 8 redone
  assert len(os.listdir(workdir / "checkpoints_corrupt")) == 1
  assert losses(workdir) == losses(straight)


def test_nan_stops_without_saving(env, tmp_path):
  workdir = tmp_path / "nan"
  rc, out = finish(launch(
      env, workdir, "--config.model.nan_after=5", "--config.optim.clip_norm=0",
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
      "--config.optim.weight_decay=0", "--config.checkpoint_every=2"))
  assert rc != 0
  assert "non-finite metric at step 6: loss = nan" in out, out
  assert "the last good checkpoint is step 4" in out
  assert ckpt_lib.step_dirs(workdir) == [2, 4]
  assert max(losses(workdir)) <= 5


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_hosts_match_one_host(env, straight, tmp_path):
  workdir = tmp_path / "multihost"
  port = _free_port()
  menv = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")
          and k != "JAX_COMPILATION_CACHE_DIR"}
  menv["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  procs = [launch(menv, workdir, extra_env={"MMJAX_COORDINATOR": f"localhost:{port}",
                                            "MMJAX_NUM_PROCESSES": "2",
                                            "MMJAX_PROCESS_ID": str(i)})
           for i in range(2)]
  outs = [finish(p) for p in procs]
  for rc, out in outs:
    assert rc == 0, out
  assert "in 2 process(es)" in outs[0][1]
  got, want = losses(workdir), losses(straight)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert ckpt_lib.step_dirs(workdir) == [4, 8]

  # one host resumes what two hosts saved: the state restores, the stream restarts at its
  # global position (step x batch) since per-host positions do not carry over
  rc, out = finish(launch(env, workdir, "--config.total_steps=9"))
  assert rc == 0, out
  assert "resuming from step 8" in out and "saved by 2 process(es)" in out
  assert max(losses(workdir)) == 9


def test_profile_steps_must_be_a_range():
  from mmjax.errors import ConfigError
  for bad in ("3", "3,2", "0,1", "a,b"):
    with pytest.raises(ConfigError, match="profile_steps"):
      loop._Profiler(bad, "/tmp/unused", print)   # pylint: disable=protected-access

"""The trainer: one loop for every system.

``train(config, workdir)`` builds the mesh, the system, this host's data iterator and the
train state (or resumes both from the newest readable checkpoint in ``WORKDIR``), then runs
``config.total_steps`` optimizer steps:

* logging every ``log_every`` steps: ``metrics.jsonl``, TensorBoard, a tqdm bar (process 0);
* checkpoints every ``checkpoint_every`` steps and at the end (async Orbax, keep-N);
* SIGTERM (preemption): save at the current step, wait for it, return (exit code 0);
* a non-finite metric (loss, grad_norm, ...) stops the run with ``NonFiniteError`` naming the
  step and the metric; the bad state is never saved and earlier checkpoints stay.

Example::

    from mmjax import config as mcfg
    from mmjax.train import loop
    cfg = mcfg.load("configs/captioner.py:demo", ["--config.total_steps=50"])
    result = loop.train(cfg, "/tmp/cap")      # TrainResult(state, step, metrics, preempted)
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mmjax import parallel
from mmjax.errors import ConfigError, NoCheckpoint
from mmjax.data.pipeline import make_iterator
from mmjax.train import flops as flops_lib
from mmjax.train.checkpoint import Checkpointer, step_dirs
from mmjax.train.metrics import MetricsWriter, read_jsonl
from mmjax.train.state import TrainState, abstract_train_state, create_train_state
from mmjax.train.step import build_train_step

# Metrics checked first when looking for the first non-finite one.
_FIRST_METRICS = ("loss", "grad_norm")


class NonFiniteError(FloatingPointError):
  """A training metric became NaN/Inf; the run stopped without saving the bad state."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int                 # completed optimizer steps
  metrics: dict             # the last logged row (host floats), {} if nothing was logged
  preempted: bool           # True when SIGTERM stopped the run early (after saving)


class _Preemption:
  """SIGTERM sets a flag; the loop saves and returns at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _first_non_finite(metrics: dict) -> tuple[str, float] | None:
  """``(name, value)`` of the first NaN/Inf metric (loss, grad_norm, then by name)."""
  names = [k for k in _FIRST_METRICS if k in metrics]
  names += sorted(k for k in metrics if k not in _FIRST_METRICS)
  for name in names:
    value = np.asarray(metrics[name], np.float64)
    bad = value[~np.isfinite(value)]
    if bad.size:
      return name, float(bad.reshape(-1)[0])
  return None


def _any_process(flag: bool) -> bool:
  """True if ``flag`` is set on any process (a collective: call on every process)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


@jax.jit
def _params_finite(params):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops ``metrics.jsonl`` rows after ``last_step`` (written by a run that died later)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


class _MetricsBuffer:
  """Device metrics of the steps since the last fetch. Fetching (which waits for the device)
  happens only at log/checkpoint steps, yet every step is checked for NaN/Inf, so the error
  names the exact step."""

  def __init__(self, writer: MetricsWriter, log_every: int, total: int, step: int,
               flops_per_step: float | None, peak: float | None):
    self.writer, self.log_every, self.total = writer, log_every, total
    self.flops_per_step, self.peak = flops_per_step, peak
    self.pending: list[tuple[int, dict]] = []
    self.last_row: dict = {}
    self._t, self._step = time.perf_counter(), step

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self, force_log: bool, last_good: int | None) -> None:
    """Raises ``NonFiniteError`` for the first bad step, else writes the rows that are due
    (every ``log_every``-th step, the last step, and the newest one if ``force_log``)."""
    if not self.pending:
      return
    host = parallel.global_to_host([m for _, m in self.pending])
    now, newest = time.perf_counter(), self.pending[-1][0]
    rate = (newest - self._step) / max(now - self._t, 1e-9)  # the first includes compiling
    for (step, _), values in zip(self.pending, host):
      bad = _first_non_finite(values)
      if bad is not None:
        raise NonFiniteError(
            f"non-finite metric at step {step}: {bad[0]} = {bad[1]}; stopping without saving "
            f"(the last good checkpoint is step {last_good})")
    for (step, _), values in zip(self.pending, host):
      if step % self.log_every == 0 or step == self.total or (force_log and step == newest):
        row = {**values, "steps_per_sec": rate,
               "mfu": flops_lib.mfu(self.flops_per_step, rate, jax.device_count(), self.peak)}
        self.writer.write(step, row)
        self.last_row = {"step": step, **row}
    self.pending, self._t, self._step = [], now, newest


def _log_on_main(writer_ref: list) -> Callable[[str], None]:
  def log(text: str) -> None:
    if jax.process_index() != 0:
      return
    if writer_ref and writer_ref[0] is not None:
      writer_ref[0].message(text)  # keeps the progress bar intact
    else:
      print(text, flush=True)
  return log


class _Profiler:
  """``config.profile_steps = "a,b"``: a ``jax.profiler`` trace of train steps a..b (1-based,
  inclusive) in WORKDIR/profile (TensorBoard's profile plugin reads it:
  ``tensorboard --logdir WORKDIR/profile``). Empty: off."""

  def __init__(self, spec: str, workdir: str, log):
    self.first = self.last = None
    self.active, self.log = False, log
    self.path = os.path.join(workdir, "profile")
    if spec:
      try:
        self.first, self.last = (int(x) for x in str(spec).split(","))
      except ValueError:
        raise ConfigError(f"profile_steps = {spec!r}; expected 'first,last' step numbers, "
                          "e.g. '10,12'") from None
      if not 1 <= self.first <= self.last:
        raise ConfigError(f"profile_steps = {spec!r}; expected 1 <= first <= last")

  def before(self, step: int) -> None:
    if self.first is not None and step == self.first and not self.active:
      jax.profiler.start_trace(self.path)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(metrics)
      self.close()
      self.log(f"profile of steps {self.first}-{self.last}: {self.path} "
               f"(tensorboard --logdir {self.path})")

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def train(config: Any, workdir: str, system: Any = None) -> TrainResult:
  """Trains ``config.system`` (or ``system``) in ``workdir``, resuming when it can.

  Raises ``NonFiniteError`` for NaN/Inf metrics and ``RuntimeError`` when checkpoints exist
  but none can be restored.
  """
  if system is None:
    from mmjax.systems.base import get_system
    system = get_system(config)
  writer_ref: list = []
  log = _log_on_main(writer_ref)
  profiler = _Profiler(config.get("profile_steps", ""), workdir, log)
  system.prepare(workdir)
  total = int(config.total_steps)

  # -- mesh, state, data (resumed when there is a checkpoint) -------------------------------
  mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config)
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"devices in {jax.process_count()} process(es)")
  abstract, shardings, optimizer = abstract_train_state(system, config, mesh, rules)
  n_train, n_frozen = optimizer.counts(abstract.params)
  log(f"parameters: {n_train:,} trainable, {n_frozen:,} frozen")
  log(parallel.format_report(parallel.param_report(
      abstract.params, warn_bytes=config.unsharded_warn_bytes)))

  def make_data(start_index: int = 0):
    return make_iterator(config.data, seed=config.seed, preprocess=system.preprocess,
                         process_index=jax.process_index(),
                         process_count=jax.process_count(), start_index=start_index)

  ckpt = Checkpointer(workdir, config, log=log)
  restored = ckpt.restore_latest(abstract, make_data)
  if restored is not None:
    step, state, data_iter = restored
    log(f"resuming from step {step} ({ckpt.directory})")
    if data_iter is None:
      log(f"the data iterator of step {step} was saved by "
          f"{ckpt.data_process_count(step)} process(es), this run has {jax.process_count()}: "
          "restarting the stream at step x batch_size (exact unless records were skipped)")
      data_iter = make_data(step * int(config.data.batch_size))
  else:
    state, _, _ = create_train_state(system, config, mesh, rules, optimizer)
    step, data_iter = 0, make_data()
  if jax.process_index() == 0:
    _truncate_metrics(workdir, step)

  batch_shardings = parallel.batch_sharding(mesh, rules, system.batch_axes)
  train_step = build_train_step(system, optimizer, mesh, rules, shardings, batch_shardings)
  flops_per_step = system.flops_per_step(int(config.data.batch_size))
  peak = flops_lib.peak_flops(config.dtype, config.device_peak_flops) if flops_per_step else None
  writer = MetricsWriter(workdir, total, initial_step=step, enabled=jax.process_index() == 0)
  writer_ref.append(writer)
  buffer = _MetricsBuffer(writer, max(int(config.log_every), 1), total, step, flops_per_step,
                          peak)

  # -- the steps ----------------------------------------------------------------------------
  ckpt_every = int(config.checkpoint_every)
  sync_every = min(max(int(config.log_every), 1), 10)  # hosts agree on SIGTERM this often
  preempted = False
  try:
    with _Preemption() as preemption:
      while step < total:
        batch = parallel.host_local_to_global(next(data_iter), mesh, batch_shardings)
        profiler.before(step + 1)
        state, metrics = train_step(state, batch)
        step += 1
        profiler.after(step, metrics)
        buffer.add(step, metrics)
        if jax.process_count() == 1 or step % sync_every == 0:
          preempted = _any_process(preemption.requested)
        save = step == total or preempted or (ckpt_every > 0 and step % ckpt_every == 0)
        if save or step % buffer.log_every == 0:
          buffer.flush(force_log=save, last_good=ckpt.latest_step())
        if save:
          if not parallel.global_to_host(_params_finite(state.params)):
            raise NonFiniteError(f"non-finite parameters after step {step}; stopping without "
                                 f"saving (the last good checkpoint is step "
                                 f"{ckpt.latest_step()})")
          ckpt.save(step, state, data_iter)
        if preempted:
          log(f"SIGTERM: saved step {step}; waiting for the checkpoint to finish, then exiting")
          ckpt.wait()
          break
  finally:
    profiler.close()
    ckpt.close()  # waits for in-flight saves (only ever of good states)
    writer.close()
    if hasattr(data_iter, "stats"):
      s = data_iter.stats()
      log(f"data: {s['read']} records read, {s['bad']} bad ({s['bad_fraction']:.2%})"
          + (f"; last bad: {s['last_bad']}" if s["bad"] else ""))
  last = buffer.last_row
  if not preempted:
    log(f"done: step {step}" + (f", loss {last['loss']:.4g}"
                                if isinstance(last.get("loss"), float) else ""))
  return TrainResult(state=state, step=step, metrics=last, preempted=preempted)


def restore_params(config: Any, workdir: str, system: Any) -> tuple[Any, int]:
  """``(params, step)`` of the newest readable checkpoint, on the current mesh; with
  ``optim.ema_decay`` set, the EMA parameters (what sampling and evaluation use). For a
  system with mutable collections (EMA codebooks) ``params`` is the variables dict
  ``{'params': ..., 'codebook': ...}`` its modes need."""
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config)
  if not step_dirs(workdir):  # before Orbax starts its background work on the directory
    raise NoCheckpoint(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                       "train first (--mode train)")
  abstract, _, optimizer = abstract_train_state(system, config, mesh, rules)
  ckpt = Checkpointer(workdir, config)
  try:
    restored = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  if restored is None:
    raise NoCheckpoint(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                       "train first (--mode train)")
  params = restored.state.eval_params(optimizer)
  if restored.state.mutables:
    params = {"params": params, **restored.state.mutables}
  return params, restored.step


def run_mode(config: Any, workdir: str, system: Any, mode: str) -> Any:
  """Runs ``system.modes()[mode](params, workdir)`` on the newest checkpoint's params (the
  variables dict for a system with mutable collections, see ``restore_params``)."""
  modes = system.modes()
  if mode not in modes:
    raise KeyError(f"system {config.system!r} has no mode {mode!r}; it has {sorted(modes)}")
  params, step = restore_params(config, workdir, system)
  if jax.process_index() == 0:
    print(f"{mode}: params of step {step}", flush=True)
  mesh = parallel.make_mesh(config.mesh)
  with parallel.with_rules(parallel.logical_rules(config), mesh):
    return modes[mode](params, workdir)

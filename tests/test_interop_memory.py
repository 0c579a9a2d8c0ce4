"""Host memory while streaming a checkpoint: a fresh process loads a ~460 MB checkpoint
(three wide layers, unrolled, largest tensor 40 MB) through ``interop.load`` (eager, onto a
4-device fsdp x tensor mesh) and through ``subtree.load_into`` inside a jitted init (one
device, and per device under ``shard_map`` on the mesh). Its peak resident memory beyond the loaded
parameters themselves (which live in host memory on the CPU backend) stays under
2 x the largest tensor + 64 MB, far below the checkpoint. (The old ``load_into`` read the
whole checkpoint on the host: ~970 MB beyond the parameters here.)

The big tensors are >= 32 MB, as in real checkpoints: glibc serves such allocations with
``mmap`` and returns them on free. Smaller pieces freed on XLA's callback threads may stay
cached in those threads' malloc arenas (bounded by the arenas, not by the checkpoint)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.interop import hf
from mmjax.interop.tables import expand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20
REF = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=8192,
           hidden_size=1024, intermediate_size=10240, num_hidden_layers=3,
           num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
           rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu")

# Runs in a fresh process: compile first, then reset the high-water mark (clear_refs 5) and
# measure only the load. argv: mode, checkpoint directory.
PROBE = r"""
import gc, json, os, sys
mode, path = sys.argv[1], sys.argv[2]
import jax, flax.linen as nn, numpy as np
from mmjax import config as mcfg, interop
from mmjax.interop import hf, subtree
from mmjax.parallel.mesh import make_mesh
from mmjax.parallel.rules import with_rules

def status():
  with open("/proc/self/status") as f:
    kb = {l.split(":")[0]: int(l.split()[1]) << 10 for l in f if l.startswith(("Vm", "Rss"))}
  return kb["VmRSS"], kb["VmHWM"], kb["RssAnon"], kb["RssFile"]

ref = hf.read_config(path)
family = hf.family_for_config(ref)
cfg = family.from_hf_config(ref, scan_layers=False)
module, args = family.make_model(cfg), family.init_args(cfg)
mesh = make_mesh(dict(data=1, fsdp=2, tensor=2, context=1)) if mode != "load_into" else None
rules = mcfg.default_logical_rules()

def init():
  boxed = module.init(jax.random.key(0), *args)["params"]
  return nn.unbox(subtree.load_into(boxed, "hf", path, scan_layers=False))

if mode == "load":
  run = lambda: interop.load(path, mesh=mesh, rules=rules, scan_layers=False)[1]
else:
  with with_rules(rules, mesh):
    compiled = jax.jit(init).lower().compile()
  run = compiled
# warm the runtime's callback paths (their code pages count as resident memory too)
def warm():
  one = lambda: jax.pure_callback(lambda: np.ones(8, np.float32),
                                  jax.ShapeDtypeStruct((8,), np.float32))
  return one() if mesh is None else jax.shard_map(one, mesh=mesh, in_specs=(),
                                                  out_specs=jax.P())()
with with_rules(rules, mesh):
  jax.block_until_ready(jax.jit(warm)())
gc.collect()
try:
  with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
    f.write("5")
except OSError:
  print(json.dumps(dict(skip="cannot reset the high-water mark")))
  sys.exit(0)
before, _, anon0, file0 = status()
params = jax.block_until_ready(run())
after, peak, anon1, file1 = status()
result = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
devices = {s.device for x in jax.tree.leaves(params) for s in x.addressable_shards}
print(json.dumps(dict(before=before, peak=peak, after=after, result=result,
                      devices=len(devices), anon=anon1 - anon0, file=file1 - file0)))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The checkpoint, written from numpy in three ~140 MB files (sharded index)."""
  path = str(tmp_path_factory.mktemp("wide"))
  family = hf.family_for_config(REF)
  cfg = family.from_hf_config(REF, scan_layers=False)
  shapes, _ = hf.abstract_params(family, cfg)
  entries = expand(family.table(cfg), {k: v.shape for k, v in shapes.items()})
  tensors = {e.hf: (np.arange(np.prod(e.hf_shape), dtype=np.float32) % 251 + i)
             .reshape(e.hf_shape) for i, e in enumerate(entries)}
  files = hf.write_checkpoint(path, REF, tensors, max_shard_bytes=160 * MB)
  assert len(files) >= 4                                   # config, index, >= 2 shards
  sizes = [x.nbytes for x in tensors.values()]
  return path, sum(sizes), max(sizes)


def _probe(mode, path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", PROBE, mode, path], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.loads(out.stdout.strip().splitlines()[-1])
  if "skip" in m:
    pytest.skip(m["skip"])
  return m


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("mode,devices", [("load", 4), ("load_into", 1), ("load_into_mesh", 4)])
def test_peak_host_memory_stays_near_one_tensor(checkpoint, mode, devices):
  path, total, largest = checkpoint
  m = _probe(mode, path)
  assert m["devices"] == devices
  assert total <= m["result"] < 1.01 * total      # norms and biases are replicated
  overhead = m["peak"] - m["before"] - m["result"]
  print(f"{mode}: checkpoint {total / MB:.0f} MB, largest tensor {largest / MB:.0f} MB, "
        f"loaded params {m['result'] / MB:.0f} MB, peak rise {(m['peak'] - m['before']) / MB:.0f}"
        f" MB, overhead beyond the params {overhead / MB:.0f} MB (anonymous memory "
        f"{m['anon'] / MB:+.0f} MB after the load)")
  assert total > 400 * MB
  assert overhead < 2 * largest + 64 * MB < total / 3

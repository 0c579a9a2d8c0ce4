"""Lazy reads of safetensors checkpoints: names and shapes from the headers, one tensor at a
time from the file, nothing memory-mapped.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [start, end]}}``) and the raw little-endian
data. ``Checkpoint`` reads the headers of a directory's file(s) and, per ``read``, exactly
one tensor's bytes with ``readinto`` into a fresh numpy buffer: the process holds only what
it asked for (a memory map would leave every touched page of the file resident). Reads are
thread-safe (each opens its own file object), so device callbacks may read concurrently.

Example::

    ckpt = Checkpoint("/ckpt/qwen2")                    # model.safetensors or sharded index
    ckpt.shapes["model.norm.weight"], ckpt.read("model.norm.weight").dtype
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


MMAP_MIN_BYTES = 1 << 20


def host_empty(shape, dtype) -> np.ndarray:
  """``np.empty(shape, dtype)``; from 1 MiB on backed by its own anonymous memory map, so
  the memory goes back to the OS when the array is freed, whichever thread frees it (malloc
  keeps freed blocks under 32 MiB in per-thread arenas: pieces handed to the runtime's
  callback threads would stay resident)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if nbytes < MMAP_MIN_BYTES:
    return np.empty(shape, dtype)
  return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                       dtype).reshape(shape)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped
  tensor (and any of our parameters no table rule fills)."""


def read_config(path: str) -> dict:
  """The ``config.json`` of a model directory."""
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


class SafetensorsFile:
  """Header of one ``.safetensors`` file, and single-tensor reads from it."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.header = header

  def keys(self):
    return self.header.keys()

  def shape(self, key: str) -> tuple:
    return tuple(int(d) for d in self.header[key]["shape"])

  def read(self, key: str) -> np.ndarray:
    """The tensor ``key`` as a new numpy array (bf16 as ``ml_dtypes.bfloat16``)."""
    info = self.header[key]
    if info["dtype"] not in DTYPES:
      raise CheckpointMismatchError(f"{self.path}: tensor {key!r} has dtype {info['dtype']} "
                                    f"(readable: {sorted(DTYPES)})")
    start, end = (int(x) for x in info["data_offsets"])
    out = host_empty((end - start,), np.uint8)
    view = memoryview(out)
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self.data_start + start)
      done = 0
      while done < len(out):  # a single read returns at most ~2 GiB
        n = f.readinto(view[done:])
        if not n:
          raise CheckpointMismatchError(f"{self.path}: tensor {key!r} is truncated")
        done += n
    return out.view(DTYPES[info["dtype"]]).reshape(self.shape(key))  # little-endian hosts


class Checkpoint:
  """Lazy view of the safetensors file(s) of a directory: names, shapes, one-tensor reads.

  ``weights`` / ``index`` are the file names: transformers' ``model.safetensors`` and
  ``model.safetensors.index.json`` by default, diffusers' ``diffusion_pytorch_model.*`` in
  ``diffusers_io``. ``renames`` (``(regex, replacement)`` pairs) map stored names to the
  names tables use.
  """

  def __init__(self, path: str, renames=(), *, weights: str = SINGLE_FILE,
               index: str = INDEX_FILE):
    index_path = os.path.join(path, index)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(path, weights)):
      weight_map = None
    else:
      raise FileNotFoundError(f"{path!r} has neither {weights} nor {index}")
    self.path = path
    files = sorted(set(weight_map.values())) if weight_map else [weights]
    self._files = {f: SafetensorsFile(os.path.join(path, f)) for f in files}
    self.file_of, self.stored, self.shapes = {}, {}, {}
    for fname, h in self._files.items():
      for key in h.keys():
        name = key
        for pattern, repl in renames:
          name = re.sub(pattern, repl, name)
        if name in self.stored:
          raise CheckpointMismatchError(f"checkpoint names {self.stored[name]!r} and {key!r} "
                                        f"both mean {name!r}")
        self.file_of[name], self.stored[name] = fname, key
        self.shapes[name] = h.shape(key)
    if weight_map:
      found = {self.stored[n]: self.file_of[n] for n in self.stored}
      lost = sorted(k for k, f in weight_map.items() if found.get(k) != f)
      if lost:
        raise CheckpointMismatchError(f"{index} lists tensors absent from their files: {lost}")
    self._last = (None, None)
    self._lock = threading.Lock()

  def keys(self) -> set:
    return set(self.shapes)

  def read(self, name: str, keep: bool = False) -> np.ndarray:
    """One tensor as numpy. With ``keep`` the tensor is remembered until the next kept read,
    so rules sharing one reference tensor (``Part``) read it once; otherwise nothing of it
    stays referenced here."""
    last = self._last
    if last[0] == name:
      return last[1]
    x = self._files[self.file_of[name]].read(self.stored[name])
    if keep:
      with self._lock:
        self._last = (name, x)
    return x

  def forget(self) -> None:
    """Drops the remembered tensor."""
    with self._lock:
      self._last = (None, None)

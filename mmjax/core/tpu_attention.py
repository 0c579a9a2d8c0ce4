"""Softmax attention on TPU with jax's splash-attention Pallas kernel (attention impl 'splash').

``dot_product_attention(..., impl="splash")`` (``TransformerConfig.attention_impl="splash"``)
runs ``jax.experimental.pallas.ops.tpu.splash_attention`` instead of the einsum-softmax-einsum
XLA path: a flash-attention kernel (online softmax over key blocks, no ``[q, kv]`` logits in
HBM, a fused backward kernel for dK/dV and dQ) that skips key blocks the mask hides entirely
(half the work for causal masks).

**Masks.** Every mmjax attention takes a dense boolean mask ``[batch|1, 1|heads, q, kv]``
(``mmjax.core.masks``: causal, bidirectional, prefix-LM, padding, packed segment ids, KV-cache
slots), so the kernel runs on splash's *dynamic* masks: the mask is cut into
``block_q x block_kv`` tiles, tiles that are all False are skipped, tiles that are all True
run unmasked, and the others read their tile of the mask. Any mask works, with the XLA
path's semantics for every row that sees at least one key; a row that sees none (a padded
query under a causal mask) gets a finite, meaningless output, as on the XLA path (here
``v`` of key 0, there the average of all).

**Batch and heads.** The kernel works on ``[heads, len, head_dim]``; we fold the batch into
the head axis (``b * h`` query heads over ``b * kv_heads`` kv heads: grouped-query attention
maps batch ``i``'s head ``j`` to its kv head ``j // groups``) and repeat the per-block mask
tables per head (small int8 tables in scalar memory; the mask tiles themselves are stored
once per batch row). Lengths are padded to multiples of 128 (padded keys masked, padded
queries dropped). Under a mesh (``jax.set_mesh``, as the train step traces) the kernel runs
inside ``shard_map`` with the batch and heads sharded by the logical rules of
``act_batch`` / ``act_heads`` (a custom call cannot be partitioned by GSPMD); the sequence is
not split (a ``context`` axis is gathered).

**Where it runs.** On a TPU (the context mesh's devices, or the default backend): compiled
for the chip, including ahead-of-time compiles for a TPU topology on a CPU host
(``launch/aot.py --attention_impl splash``). Elsewhere ``impl="splash"`` falls back to the
XLA path, unless the kernel's interpreter is switched on (``interpret(True)``: CPU tests
of mask parity). Queries shorter than ``MIN_Q_LEN`` (one decoding step) and
``return_weights`` also use the XLA path.

Example::

    from mmjax.core import tpu_attention
    out = dot_product_attention(q, k, v, mask, impl="splash")   # TPU: the kernel
    with tpu_attention.interpret(True):                          # CPU: the interpreter
      out = dot_product_attention(q, k, v, mask, impl="splash")
    with tpu_attention.default_impl("splash"):   # every 'xla' / 'dot_product_attention'
      lowered = step.lower(state, batch)         # call traced in the block uses the kernel
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

SPLASH = "splash"
MIN_Q_LEN = 128          # shorter query blocks (decoding) take the XLA path
LANE = 128               # lengths are padded to a multiple of this
BLOCK = 512              # largest tile along q and kv (a divisor of the padded length)
# Scalar-memory budget (bytes) of one kernel call's per-block mask tables (3 tables of
# [batch * heads, q_blocks, kv_blocks]); a larger local batch is split into several calls.
SMEM_TABLE_BYTES = 256 * 1024
OVERRIDDEN = ("xla", "dot_product_attention", "chunked")   # what ``default_impl`` replaces

_DEFAULT = contextvars.ContextVar("mmjax_attention_default", default=None)
_INTERPRET = contextvars.ContextVar("mmjax_attention_interpret", default=False)


@contextlib.contextmanager
def default_impl(name: Optional[str]) -> Iterator[None]:
  """While tracing inside the block, softmax attention of impl 'xla', 'dot_product_attention'
  or 'chunked' uses ``name`` ('splash', or None / 'xla' for no override)."""
  if name not in (None, "xla", SPLASH):
    raise ValueError(f"default attention impl {name!r}: expected 'splash', 'xla' or None")
  token = _DEFAULT.set(None if name == "xla" else name)
  try:
    yield
  finally:
    _DEFAULT.reset(token)


@contextlib.contextmanager
def interpret(on: bool = True) -> Iterator[None]:
  """Run the kernel in Pallas' interpreter where no TPU is the target (CPU tests)."""
  token = _INTERPRET.set(bool(on))
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def _target_platform() -> str:
  """The platform the traced program is for: the context mesh's devices, else the backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if not mesh.empty and device is not None and getattr(device, "platform", None):
    return device.platform
  return jax.default_backend()


def choose_impl(impl: str, q_shape: tuple, k_shape: tuple, return_weights: bool) -> str:
  """The impl ``dot_product_attention`` runs: 'splash' where the kernel applies (asked for,
  or the ``default_impl`` override), else ``impl`` ('xla' for a 'splash' that falls back)."""
  wanted = impl == SPLASH or (_DEFAULT.get() == SPLASH and impl in OVERRIDDEN)
  if not wanted:
    return impl
  fallback = "xla" if impl == SPLASH else impl
  if return_weights or q_shape[1] < MIN_Q_LEN:
    return fallback
  if _target_platform() != "tpu" and not _INTERPRET.get():
    return fallback
  return SPLASH


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(n: int) -> int:
  """Largest tile (<= BLOCK, a multiple of 128) dividing the padded length ``n``."""
  for b in (BLOCK, 256, LANE):
    if b <= n and n % b == 0:
      return b
  return LANE


def _mesh_axes(logical: str) -> tuple:
  """Mesh axes (of the context mesh, size > 1) the logical rules give ``logical``."""
  try:
    spec = nn.logical_to_mesh_axes((logical,))
  except Exception:  # no rules installed
    return ()
  if spec is None or spec[0] is None:
    return ()
  axes = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _size(axes: tuple) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def splash_attention(q, k, v, mask=None, *, scale: Optional[float] = None):
  """Softmax attention by the splash kernel; the arguments and result of
  ``mmjax.core.dot_product_attention`` (q ``[b, s, h, d]``, k, v ``[b, t, kv_heads, d]``,
  mask bool ``[b|1, 1|h, s, t]`` or None)."""
  b, s, h, d = q.shape
  kvh = k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  run = functools.partial(_splash_local, scale=scale, interpret=_target_platform() != "tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v, mask)
  batch_axes = _mesh_axes("act_batch")
  if b % _size(batch_axes):
    batch_axes = ()
  head_axes = tuple(a for a in _mesh_axes("act_heads") if a not in batch_axes)
  if h % _size(head_axes) or kvh % _size(head_axes):
    head_axes = ()
  P = jax.sharding.PartitionSpec
  bspec, hspec = batch_axes or None, head_axes or None
  qspec = P(bspec, None, hspec, None)
  if mask is None:
    return jax.shard_map(lambda q, k, v: run(q, k, v, None), in_specs=(qspec,) * 3,
                         out_specs=qspec, check_vma=False)(q, k, v)
  mspec = P(bspec if mask.shape[0] == b and b > 1 else None,
            hspec if mask.shape[1] == h and h > 1 else None, None, None)
  return jax.shard_map(run, in_specs=(qspec, qspec, qspec, mspec), out_specs=qspec,
                       check_vma=False)(q, k, v, mask)


class _PallasWithCost:
  """jax's ``pallas`` module as the splash kernel module sees it, with a cost estimate on the
  splash kernels' ``pallas_call``s (jax gives none, and XLA's cost model counts a custom call
  without one as free: an AOT step-time estimate would leave attention out)."""

  def __init__(self, pallas):
    self._pallas = pallas

  def __getattr__(self, name):
    return getattr(self._pallas, name)

  def pallas_call(self, kernel, *args, cost_estimate=None, name=None, **kwargs):
    make = functools.partial(self._pallas.pallas_call, kernel, *args, name=name, **kwargs)
    if cost_estimate is not None or not (name or "").startswith("splash_"):
      return make(cost_estimate=cost_estimate)
    grid = tuple(kwargs["grid_spec"].grid) if kwargs.get("grid_spec") is not None else ()

    def call(*operands):
      return make(cost_estimate=splash_cost(name, grid, *operands[3:6]))(*operands)
    return call


def splash_cost(name: str, grid: tuple, q, k, v):
  """``pl.CostEstimate`` of one splash kernel call, as *dense* attention (every block; the
  kernel skips blocks its mask hides, which a static estimate cannot know): the forward's
  two ``[s, t] x d`` matmuls per head, the fused backward's five (``q k^T`` again,
  ``do v^T``, ``dv``, ``dk``, ``dq``); bytes: q, k, v, outputs, and the re-reads of k, v per
  query block (forward) or of q, do per key block (backward). The mask tiles are left out."""
  from jax.experimental import pallas as pl
  h, s, d = q.shape
  t = k.shape[-2]
  hkv = 1 if k.ndim == 2 else k.shape[0]
  isz = jnp.dtype(q.dtype).itemsize
  matmul = 2.0 * h * s * t * d                       # one [s, t] x d product, all heads
  qbytes, kvbytes = h * s * d * isz, 2 * hkv * t * d * isz
  if "_fwd" in name:
    flops, reads = 2 * matmul, qbytes * 2 + kvbytes * (grid[1] if len(grid) > 1 else 1)
  elif "_dkv" in name:   # fused: dq partial sums per key block, fp32
    blocks = grid[0] if grid else 1
    flops = 5 * matmul
    reads = kvbytes * 2 + blocks * (3 * qbytes + h * s * d * 4)
  else:                  # "_dq"
    flops, reads = 3 * matmul, 3 * qbytes + kvbytes * (grid[1] if len(grid) > 1 else 1)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(h * s * t),
                         bytes_accessed=int(reads))


def _splash_module():
  """jax's splash kernel module, with ``_PallasWithCost`` installed (once)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if not isinstance(sk.pl, _PallasWithCost):
    sk.pl = _PallasWithCost(sk.pl)
  return sk


def _splash_local(q, k, v, mask, *, scale: float, interpret: bool):
  """The kernel on one device's shards (no mesh collectives)."""
  sk = _splash_module()

  b, s, h, d = q.shape
  t, kvh = k.shape[1], k.shape[2]
  sp, tp = _round_up(s, LANE), _round_up(t, LANE)
  bq, bkv = _block(sp), _block(tp)
  if mask is None:
    mask = jnp.ones((1, 1, s, t), bool)
  mask = jnp.asarray(mask, bool)
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (s, t))
  mb, mh = mask.shape[:2]
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, sp - s), (0, tp - t)))   # padding: False
  # a row that sees no key would divide by zero in the kernel: let it see key 0
  key0 = jnp.arange(tp) == 0
  mask = mask | (~jnp.any(mask, axis=-1, keepdims=True) & key0)
  mask = mask.reshape(mb * mh, sp, tp)

  block_sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                              block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                              use_fused_bwd_kernel=True)

  def fold(x, length, heads):   # [b', len, heads, d] -> [b' * heads, padded len, d]
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2).reshape(x.shape[0] * heads, length, x.shape[-1])

  # rows of the batch per kernel call, so its mask tables stay within scalar memory
  entries = h * (sp // bq) * (tp // bkv) * 6   # bytes per batch row (int8/int8/int32)
  chunk = b if mb == 1 and mh == 1 else max(1, min(b, SMEM_TABLE_BYTES // max(entries, 1)))
  qs = (q * jnp.asarray(scale, q.dtype)).astype(q.dtype)
  outs = []
  for start in range(0, b, chunk):
    n = min(chunk, b - start)
    rows = slice(start, start + n)
    m = mask if mb == 1 else mask.reshape(mb, mh, sp, tp)[rows].reshape(n * mh, sp, tp)
    kernel = sk.make_splash_mha(m, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    kernel = _per_head_tables(kernel, m.shape[0] // mh if mb > 1 else 1, mh, n, h)
    out = kernel(fold(qs[rows], sp, h), fold(k[rows].astype(q.dtype), tp, kvh),
                 fold(v[rows].astype(q.dtype), tp, kvh))                # [n * h, sp, d]
    outs.append(out.reshape(n, h, sp, d)[:, :, :s])
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)                        # [b, s, h, d]


def _per_head_tables(kernel, mb: int, mh: int, n: int, h: int):
  """Repeat the mask tables (one row per mask ``[mb * mh]``) to the folded heads
  ``[n * h]`` (batch row ``i``, head ``j`` reads mask row ``i * mh + j`` with ``i`` and ``j``
  clamped to the mask's broadcast dims). One mask for everything stays one row: the kernel
  reads row 0 for every head then."""
  def expand(table):
    if table is None or mb * mh == 1:
      return table
    table = table.reshape((mb, mh) + table.shape[1:])
    table = jnp.broadcast_to(table, (n, h) + table.shape[2:])
    return table.reshape((n * h,) + table.shape[2:])

  def fix(info):
    if info is None:
      return None
    # (make_splash_mha turns the is_dynamic_mask flag into an array, a tracer under jit)
    return info._replace(data_next=expand(info.data_next), mask_next=expand(info.mask_next),
                         block_mask=expand(info.block_mask), is_dynamic_mask=True)

  return type(kernel)(fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info),
                      fix(kernel.dkv_mask_info), **kernel.kwargs)

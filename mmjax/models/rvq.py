"""Residual vector quantiser (RQ-VAE / DualToken) with an EMA codebook and dead-code restart.

At depth ``d`` the residual ``r_d`` (``r_0 = stop_gradient(x)``) picks its nearest code ``e``
(fp32 distances whatever the compute dtype), ``r_{d+1} = r_d - e``; the output is the sum of
the codes with a straight-through estimator (``x + sg(q - x)``) and the commitment loss is
``mean_d mean((x - sg(q_<=d))^2)``. By default one codebook is shared by every depth and
updated by EMA (decay 0.99, Laplace eps 1e-5) from the residuals of *all* depths, counted over
the global batch (sums over the sharded batch axis inside ``jit``); codes whose EMA count
falls below ``dead_threshold`` are restarted from vectors of the batch drawn with one key.

The codebook lives in the mutable collection ``codebook`` (``embed [K, dim]``,
``cluster_size [K]``, ``embed_sum [K, dim]``; logical names ``('vocab', None)``: K shards over
``tensor``; with ``shared_codebook=False`` a leading depth axis). ``ema=False`` makes
``embed`` a parameter trained by the codebook loss ``mean((sg(r_d) - e_d)^2)`` instead.

Example::

    from mmjax.models import rvq
    cfg = rvq.RVQConfig(depths=8, codebook_size=16384, dim=32)
    model = rvq.ResidualVQ(cfg)
    variables = model.init(jax.random.key(0), x)              # x [b, 729, 32]
    out, new = model.apply(variables, x, update=True, rng=key, mutable=["codebook"])
    out["codes"]            # [b, 729, 8] int32
    out["quantized"]        # [b, 729, 32], straight-through
    loss = cfg.commitment_weight * out["commitment_loss"]    # == out["loss"] with EMA
    aux = {"mutables": new}                                   # the trainer keeps the new codebook
    rvq.usage(out["codes"], cfg.codebook_size)                # [8] distinct codes / K per depth
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

CODEBOOK = "codebook"            # the mutable collection holding the EMA codebook
CODE_NAMES = ("vocab", None)     # logical names of [K, dim]: K over 'tensor' by default
F32 = jnp.float32
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class RVQConfig:
  """Residual VQ settings (defaults: DualToken's release, 8 x 16384 x 32, shared, EMA)."""
  depths: int = 8                  # D: codes per vector
  codebook_size: int = 16384       # K
  dim: int = 32                    # code dimension
  decay: float = 0.99              # EMA decay of cluster sizes and sums
  eps: float = 1e-5                # Laplace smoothing of the cluster sizes
  commitment_weight: float = 1.0   # weight of the commitment loss in out["loss"]
  codebook_weight: float = 1.0     # weight of the codebook loss (ema=False only)
  restart_dead_codes: bool = True  # restart codes whose EMA count < dead_threshold every update
  dead_threshold: float = 1.0
  shared_codebook: bool = True     # one codebook for every depth (else one per depth)
  ema: bool = True                 # EMA codebook (collection 'codebook'); False: a parameter
  # 'joint' (the release's rq_ema): one update per step from all depths' residuals, after the
  # forward. 'per_depth' (the release's plain rq): with a shared codebook the update runs after
  # each depth, so depth d+1 searches the codebook depth d just updated (D updates per step).
  ema_schedule: str = "joint"
  # Rows per chunk of the nearest-code search, per batch shard when a mesh and logical rules
  # are installed (mmjax.parallel.with_rules), else of the whole batch; 0: one chunk.
  distance_chunk: int = 8192
  init_std: float = 1.0            # codes ~ N(0, init_std^2) (torch nn.Embedding's default)
  precision: str = "highest"       # of the r.e matmul ('highest': true fp32 on TPU / GPU)
  # Nearest-code search: 0 = argmax over all K scores; B > 0 = best of each block of B codes
  # first, then the best block again (see ``nearest``); -1 = 64 on CPU, else 0. Set 0 when
  # compiling ahead of time for TPU / GPU on a CPU host.
  search_block: int = -1

  def __post_init__(self):
    if self.ema_schedule not in ("joint", "per_depth"):
      raise ValueError(f"ema_schedule must be 'joint' or 'per_depth', got {self.ema_schedule!r}")
    if min(self.depths, self.codebook_size, self.dim) < 1:
      raise ValueError(f"depths, codebook_size and dim must be >= 1: {self}")


# ---------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def num_chunks(batch: int, inner: int, chunk: int) -> int:
  """How many chunks split ``batch * inner`` rows into chunks of at most ``chunk`` rows.

  A divisor of ``inner`` (positions per example) when one is enough, so every chunk takes
  rows from every example and keeps the batch sharding (see ``map_rows``); else a divisor of
  all rows. ``chunk <= 0``: 1.
  """
  n = batch * inner
  if chunk <= 0 or n <= chunk:
    return 1
  need = -(-n // chunk)
  for d in _divisors(inner) + _divisors(n):
    if d >= need:
      return d
  return n


def map_rows(fn: Callable, x: jax.Array, chunks: int) -> Any:
  """``fn`` over ``x [n, ...]`` in ``chunks`` strided chunks (rows ``j, j + chunks, ...``).

  Row ``i`` goes to chunk ``i % chunks``: a batch sharded in contiguous blocks stays sharded
  inside each chunk (no all-gather), and each device works on its own rows."""
  if chunks == 1:
    return fn(x)
  n = x.shape[0]
  xs = jnp.swapaxes(x.reshape(n // chunks, chunks, *x.shape[1:]), 0, 1)
  out = jax.lax.map(fn, xs)
  return jax.tree.map(lambda o: jnp.swapaxes(o, 0, 1).reshape(n, *o.shape[2:]), out)


def nearest(r: jax.Array, book: jax.Array, half_sq: jax.Array, precision: str,
            block: int = 0) -> jax.Array:
  """Index of the nearest code: argmin ||r - e||^2 = argmax (r.e - ||e||^2 / 2), fp32.

  (||r||^2 is the same for every code of a row, so it is left out: fewer operations on the
  [rows, K] block and no cancellation error.) ``block > 0`` (CPU): a pass over blocks of
  ``block`` codes keeps only each block's best score (XLA fuses the matmul with the max, no
  [rows, K] array), then the best block is searched again; ties go to the lowest index, as
  with a plain argmax."""
  K, dim = book.shape
  if block <= 0 or K <= block or K % block:
    scores = jnp.dot(r, book.T, precision=precision, preferred_element_type=F32) - half_sq
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  eb, hb = book.reshape(K // block, block, dim), half_sq.reshape(K // block, block)
  best = jax.lax.map(lambda e: jnp.max(jnp.dot(r, e[0].T, precision=precision) - e[1], -1),
                     (eb, hb))                                   # [K / block, rows]
  b = jnp.argmax(best, axis=0)
  scores = jnp.einsum("nd,nkd->nk", r, jnp.take(eb, b, axis=0),
                      precision=precision) - jnp.take(hb, b, axis=0)
  return (b * block + jnp.argmax(scores, axis=-1)).astype(jnp.int32)


def search(r0: jax.Array, books: jax.Array, config: RVQConfig, chunks: int = 1,
           depths: range | None = None) -> tuple[jax.Array, jax.Array]:
  """Residual search with fixed codebooks: ``(codes [n, D'] int32, inputs [n, D', dim])``.

  ``r0 [n, dim]`` fp32, ``books [B, K, dim]`` (``B = 1``: shared). ``inputs[:, d]`` is the
  residual that depth ``d`` quantised. ``depths`` picks which codebook each step uses."""
  depths = range(config.depths) if depths is None else depths
  books = sg(books.astype(F32))
  half_sq = 0.5 * jnp.sum(books * books, axis=-1)
  block = config.search_block
  if block < 0:  # auto: the two-pass search wins on CPU; a plain argmax on TPU / GPU
    block = 64 if jax.default_backend() == "cpu" else 0

  def run(r):
    codes, inputs = [], []
    for d in depths:
      b = 0 if config.shared_codebook else d
      idx = nearest(r, books[b], half_sq[b], config.precision, block)
      inputs.append(r)
      codes.append(idx)
      r = r - jnp.take(books[b], idx, axis=0)
    return jnp.stack(codes, -1), jnp.stack(inputs, 1)

  return map_rows(run, r0, chunks)


# ---------------------------------------------------------------------------- EMA update


def batch_statistics(vectors: jax.Array, codes: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
  """``(counts [K], sums [K, dim])`` of ``vectors [n, dim]`` assigned to ``codes [n]``.

  Inside ``jit`` with a sharded ``n`` these are global-batch sums (GSPMD adds the
  all-reduce); with gradient accumulation, add them over the microbatches."""
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, F32), codes, K)
  sums = jax.ops.segment_sum(vectors.astype(F32), codes, K)
  return counts, sums


def restart_vectors(pool: jax.Array, K: int, rng: jax.Array) -> jax.Array:
  """``K`` distinct rows of ``pool [n, dim]`` in random order (one key: the same rows on any
  mesh). With fewer than ``K`` rows the pool is tiled and jittered by uniform noise of scale
  ``0.01 / sqrt(dim)`` first (as the release does)."""
  n, dim = pool.shape
  pool = pool.astype(F32)
  if n < K:
    rng, noise_rng = jax.random.split(rng)
    pool = jnp.tile(pool, (-(-K // n), 1))
    pool = pool + jax.random.uniform(noise_rng, pool.shape, F32) * (0.01 / math.sqrt(dim))
  idx = jax.random.permutation(rng, pool.shape[0])[:K]
  return jnp.take(pool, idx, axis=0)


def ema_from_statistics(stats: dict, counts: jax.Array, sums: jax.Array, pool: jax.Array,
                        rng: jax.Array | None, config: RVQConfig) -> dict:
  """New ``{embed, cluster_size, embed_sum}`` of one codebook from global-batch statistics.

  cluster_size <- decay cs + (1 - decay) counts; embed_sum <- decay es + (1 - decay) sums;
  embed = es / ((cs + eps) / (n + K eps) * n), n = sum(cs). Restart (when enabled): codes
  with cs < dead_threshold get a row of ``pool`` each, cs = 1 and embed_sum = row x its
  smoothed count, so that embed is exactly the row (the release sets embed_sum = row, which
  gives embed = row x (n + K eps) / (n (1 + eps)))."""
  K, decay, eps = config.codebook_size, config.decay, config.eps
  cs = decay * stats["cluster_size"].astype(F32) + (1.0 - decay) * counts
  es = decay * stats["embed_sum"].astype(F32) + (1.0 - decay) * sums
  if config.restart_dead_codes:
    if rng is None:
      raise ValueError("restart_dead_codes needs an rng (one key shared by every host)")
    dead = cs < config.dead_threshold
    cs = jnp.where(dead, 1.0, cs)
  n = jnp.sum(cs)
  norm = (cs + eps) / (n + K * eps) * n
  embed = es / norm[:, None]
  if config.restart_dead_codes:
    fresh = restart_vectors(pool, K, rng)
    embed = jnp.where(dead[:, None], fresh, embed)
    es = jnp.where(dead[:, None], fresh * norm[:, None], es)
  return {"embed": embed, "cluster_size": cs, "embed_sum": es}


def ema_update(stats: dict, vectors: jax.Array, codes: jax.Array, rng: jax.Array | None,
               config: RVQConfig) -> dict:
  """One codebook's EMA update from ``vectors [n, dim]`` (residual inputs, every depth that
  uses the codebook) assigned to ``codes [n]``; restart rows are drawn from ``vectors``."""
  counts, sums = batch_statistics(vectors, codes, config.codebook_size)
  return ema_from_statistics(stats, counts, sums, vectors, rng, config)


# ---------------------------------------------------------------------------- evaluation


def _histograms(codes: jax.Array, K: int) -> jax.Array:
  flat = codes.reshape(-1, codes.shape[-1])
  return jax.vmap(lambda c: jax.ops.segment_sum(jnp.ones(c.shape, F32), c, K),
                  in_axes=1)(flat)                               # [D, K]


def usage(codes: jax.Array, K: int) -> jax.Array:
  """Per depth, the fraction of the ``K`` codes used at least once: ``codes [..., D]`` -> [D]."""
  return jnp.sum(_histograms(codes, K) > 0, axis=-1) / K


def entropy_fraction(codes: jax.Array, K: int) -> jax.Array:
  """Per depth, the entropy of the code histogram over log2 K (1: uniform use): -> [D]."""
  hist = _histograms(codes, K)
  p = hist / jnp.sum(hist, axis=-1, keepdims=True)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return h / math.log2(K) if K > 1 else jnp.zeros_like(h)


# ---------------------------------------------------------------------------- module


def _batch_shards() -> int:
  """Devices the batch is split over, from the mesh and rules in context (1 without)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return 1
  try:
    axes = nn.logical_to_mesh_axes(("act_batch",))[0]
  except Exception:  # pylint: disable=broad-except
    return 1
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape.get(a, 1) for a in axes)


def _take_books(books: jax.Array, codes: jax.Array, shared: bool) -> jax.Array:
  """Code vectors ``[n, D, dim]`` of ``codes [n, D]`` (gradient flows to ``books``)."""
  if shared:
    return jnp.take(books[0], codes, axis=0)
  return jax.vmap(lambda b, c: jnp.take(b, c, axis=0), in_axes=(0, 1), out_axes=1)(books, codes)


class ResidualVQ(nn.Module):
  """Residual VQ over the last axis of ``x [..., dim]`` (leading axis: the batch).

  ``__call__(x, update=False, rng=None)`` returns a dict: ``quantized`` (x's dtype,
  straight-through), ``codes [..., D]`` int32, ``cumulative [..., D, dim]`` fp32 (sum of the
  codes of depths <= d), ``commitment_loss``, ``codebook_loss`` (0 with EMA) and ``loss``
  (weighted sum). ``update=True`` (training) writes the new EMA codebook: apply with
  ``mutable=['codebook']`` and pass ``rng`` (the same key on every host) for restarts.
  """
  config: RVQConfig

  def setup(self):
    c = self.config
    shape = (c.codebook_size, c.dim) if c.shared_codebook else (c.depths, c.codebook_size, c.dim)
    names = CODE_NAMES if c.shared_codebook else (None,) + CODE_NAMES
    init = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), names)
    if not c.ema:
      self.embed = self.param("embed", init, shape)
      return
    embed = self.variable(CODEBOOK, "embed", lambda: init(self.make_rng("params"), shape))
    size = self.variable(CODEBOOK, "cluster_size", lambda: nn.with_logical_partitioning(
        lambda: jnp.zeros(shape[:-1], F32), names[:-1])())
    total = self.variable(CODEBOOK, "embed_sum", lambda: nn.with_logical_partitioning(
        lambda: jnp.array(embed.value, F32), names)())
    self.ema_vars = (embed, size, total)

  def _codebook(self):
    if not self.config.ema:
      return self.embed, None
    return self.ema_vars[0].value, self.ema_vars

  def _books(self, embed):
    return embed[None] if self.config.shared_codebook else embed

  def __call__(self, x: jax.Array, *, update: bool = False,
               rng: jax.Array | None = None) -> dict:
    c = self.config
    if x.shape[-1] != c.dim:
      raise ValueError(f"ResidualVQ expects [..., {c.dim}], got {x.shape}")
    embed, ema_vars = self._codebook()
    books = self._books(embed).astype(F32)
    lead = x.shape[:-1]
    batch = lead[0] if lead else 1
    xf = x.astype(F32).reshape(-1, c.dim)
    chunks = num_chunks(batch, xf.shape[0] // max(batch, 1),
                        c.distance_chunk * _batch_shards() if c.distance_chunk > 0 else 0)
    updating = update and c.ema and not self.is_initializing()
    if updating and not self.is_mutable_collection(CODEBOOK):
      raise ValueError("ResidualVQ(update=True) writes the EMA codebook: "
                       "apply(..., mutable=['codebook'])")
    if updating and c.restart_dead_codes and rng is None:
      raise ValueError("ResidualVQ(update=True) restarts dead codes: pass rng (one key)")
    r0 = sg(xf)
    new = inputs = None
    if updating and c.shared_codebook and c.ema_schedule == "per_depth":
      codes, q, new = self._per_depth(r0, ema_vars, rng, chunks)
    else:
      codes, inputs = search(r0, books, c, chunks)
      q = _take_books(books, codes, c.shared_codebook)            # [n, D, dim]
      if updating:
        new = self._joint_update(ema_vars, inputs, codes, rng)
    cum, acc = [], jnp.zeros_like(xf)
    for d in range(c.depths):
      acc = acc + q[:, d]
      cum.append(acc)
    cum = jnp.stack(cum, 1)                                      # [n, D, dim]
    commitment = jnp.mean((xf[:, None] - sg(cum)) ** 2)
    if c.ema:
      codebook_loss = jnp.zeros((), F32)
    else:  # gradient-trained codebook: pull the chosen codes toward their residuals
      codebook_loss = jnp.mean((inputs - q) ** 2)               # inputs: sg(r_d)
    quantized = (xf + sg(cum[:, -1] - xf)).astype(x.dtype)
    if new is not None:
      for var, key in zip(ema_vars, ("embed", "cluster_size", "embed_sum")):
        var.value = new[key]
    return {
        "quantized": quantized.reshape(x.shape),
        "codes": codes.reshape(*lead, c.depths),
        "cumulative": cum.reshape(*lead, c.depths, c.dim),
        "commitment_loss": commitment,
        "codebook_loss": codebook_loss,
        "loss": c.commitment_weight * commitment + c.codebook_weight * codebook_loss,
    }

  def _stats(self, ema_vars):
    return {k: v.value for k, v in zip(("embed", "cluster_size", "embed_sum"), ema_vars)}

  def _joint_update(self, ema_vars, inputs, codes, rng):
    c = self.config
    stats = self._stats(ema_vars)
    if c.shared_codebook:  # every depth's residuals count for the one codebook
      return ema_update(stats, inputs.reshape(-1, c.dim), codes.reshape(-1), rng, c)
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, c.depths)
    return jax.vmap(lambda s, v, i, k: ema_update(s, v, i, k, c),
                    in_axes=(0, 1, 1, 0))(stats, inputs, codes, keys)

  def _per_depth(self, r0, ema_vars, rng, chunks):
    c = self.config
    stats = self._stats(ema_vars)
    r, codes, q = r0, [], []
    for d in range(c.depths):
      idx, _ = search(r, stats["embed"][None], c, chunks, depths=range(1))
      idx = idx[:, 0]
      e = jnp.take(stats["embed"].astype(F32), idx, axis=0)
      key = None if rng is None else jax.random.fold_in(rng, d)
      stats = ema_update(stats, r, idx, key, c)
      codes.append(idx)
      q.append(e)
      r = r - e
    return jnp.stack(codes, -1), jnp.stack(q, 1), stats

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """Per-depth code vectors ``[..., D, dim]`` (fp32) of ``codes [..., D]``."""
    embed, _ = self._codebook()
    flat = codes.reshape(-1, self.config.depths)
    out = _take_books(self._books(embed).astype(F32), flat, self.config.shared_codebook)
    return out.reshape(*codes.shape, self.config.dim)

  def decode(self, codes: jax.Array) -> jax.Array:
    """The quantised vector ``[..., dim]``: the sum over depths of the code vectors."""
    return jnp.sum(self.embed_codes(codes), axis=-2)

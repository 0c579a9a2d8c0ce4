"""Residual VQ (mmjax.models.rvq): exact residual search, straight-through, EMA and restart
formulas against numpy, the same update on several meshes, and vector-quantize-pytorch."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as mcfg
from mmjax import parallel
from mmjax.models import rvq
from mmjax.parallel import rules as prules
from mmjax.parallel import sharding as psharding

CFG = rvq.RVQConfig(depths=3, codebook_size=64, dim=8, decay=0.9, distance_chunk=0)


def cfg(**kw):
  return dataclasses.replace(CFG, **kw)


def data(shape=(4, 9), dim=8, seed=1, scale=1.0):
  return jax.random.normal(jax.random.key(seed), (*shape, dim)) * scale


def unbox(tree):
  return jax.tree.map(np.array, jax.tree.map(
      lambda v: v.unbox() if hasattr(v, "unbox") else v, tree,
      is_leaf=lambda v: hasattr(v, "unbox")))


def np_search(x, book, depths):
  """Brute-force residual quantisation: codes [n, D], inputs [n, D, dim] (float64)."""
  r = np.asarray(x, np.float64).reshape(-1, book.shape[-1])
  codes, inputs = [], []
  for _ in range(depths):
    d2 = ((r[:, None, :] - np.asarray(book, np.float64)[None]) ** 2).sum(-1)
    idx = d2.argmin(-1)
    inputs.append(r.copy())
    codes.append(idx)
    r = r - book[idx]
  return np.stack(codes, -1), np.stack(inputs, 1)


def np_ema(stats, vecs, codes, c):
  """The EMA formulas by hand (no restart)."""
  K = c.codebook_size
  counts = np.bincount(codes, minlength=K).astype(np.float64)
  sums = np.zeros((K, vecs.shape[-1]))
  np.add.at(sums, codes, vecs)
  cs = c.decay * stats["cluster_size"] + (1 - c.decay) * counts
  es = c.decay * stats["embed_sum"] + (1 - c.decay) * sums
  n = cs.sum()
  embed = es / ((cs + c.eps) / (n + K * c.eps) * n)[:, None]
  return {"embed": embed, "cluster_size": cs, "embed_sum": es}


@functools.lru_cache(maxsize=None)
def _jitted(c, update):
  model = rvq.ResidualVQ(c)
  if not update:
    return jax.jit(model.apply)
  return jax.jit(lambda v, x, k: model.apply(v, x, update=True, rng=k, mutable=[rvq.CODEBOOK]))


def run(c, x, variables=None, update=False, rng=2):
  """One (jitted) forward; with ``update`` also the new codebook (numpy)."""
  if variables is None:
    variables = unbox(jax.jit(rvq.ResidualVQ(c).init)(jax.random.key(0), x))
  if not update:
    return _jitted(c, False)(variables, x), variables
  out, new = _jitted(c, True)(variables, x, jax.random.key(rng))
  return (out, unbox(new)), variables


def test_exact_residual_nearest_neighbour_and_outputs():
  x = data()
  out, v = run(CFG, x)
  book = v["codebook"]["embed"]
  codes, _ = np_search(x, book, 3)
  np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1, 3), codes)
  assert out["codes"].dtype == jnp.int32 and out["codes"].shape == (4, 9, 3)
  assert (np.asarray(out["codes"]) >= 0).all() and (np.asarray(out["codes"]) < 64).all()
  cum = np.cumsum(book[codes], axis=1)
  np.testing.assert_allclose(np.asarray(out["cumulative"]).reshape(-1, 3, 8), cum, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, 8), cum[:, -1], atol=1e-5)
  commit = np.mean([(((np.asarray(x).reshape(-1, 8) - cum[:, d]) ** 2).mean())
                    for d in range(3)])
  np.testing.assert_allclose(float(out["commitment_loss"]), commit, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), commit, rtol=1e-5)
  # decode / embed_codes give the same vectors from the codes
  model = rvq.ResidualVQ(CFG)
  np.testing.assert_allclose(jax.jit(functools.partial(model.apply, method="decode"))(
                                 v, out["codes"]),
                             out["quantized"], atol=1e-5)


def test_straight_through_gradient_is_identity():
  x = data()
  model = rvq.ResidualVQ(CFG)
  v = jax.jit(model.init)(jax.random.key(0), x)
  ct = jax.random.normal(jax.random.key(5), x.shape)

  @jax.jit
  def grads(x):
    _, vjp = jax.vjp(lambda x: model.apply(v, x)["quantized"], x)
    g = jax.grad(lambda x: model.apply(v, x)["commitment_loss"])(x)
    return vjp(ct)[0], g, model.apply(v, x)["cumulative"]

  st, g, cum = grads(x)
  np.testing.assert_array_equal(st, ct)
  # the commitment loss pulls x toward the (stopped) cumulative sums
  want = 2 * (x[..., None, :] - cum).sum(-2) / (3 * x.size)
  np.testing.assert_allclose(g, want, atol=1e-6)


def test_bf16_input_searches_in_fp32():
  x = data().astype(jnp.bfloat16)
  out, v = run(CFG, x)
  ref, _ = run(CFG, x.astype(jnp.float32), variables=v)
  np.testing.assert_array_equal(out["codes"], ref["codes"])
  codes, _ = np_search(np.asarray(x, np.float32), v["codebook"]["embed"], 3)
  np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1, 3), codes)
  assert out["quantized"].dtype == jnp.bfloat16 and out["cumulative"].dtype == jnp.float32


def test_block_search_equals_argmax():
  x = data((6, 9))
  ref, v = run(cfg(search_block=0), x)
  codes, _ = np_search(x, v["codebook"]["embed"], 3)
  np.testing.assert_array_equal(np.asarray(ref["codes"]).reshape(-1, 3), codes)
  for block in (8, 16):
    out, _ = run(cfg(search_block=block), x, variables=v)
    np.testing.assert_array_equal(out["codes"], ref["codes"], err_msg=f"block={block}")
  # ties go to the lowest index, as with argmax: duplicate every code
  book = np.array(v["codebook"]["embed"])
  book[32:] = book[:32]
  v2 = {"codebook": dict(v["codebook"], embed=book)}
  a, _ = run(cfg(search_block=0), x, variables=v2)
  b, _ = run(cfg(search_block=8), x, variables=v2)
  np.testing.assert_array_equal(a["codes"], b["codes"])
  assert (np.asarray(a["codes"]) < 32).all()


def test_chunked_equals_unchunked():
  assert rvq.num_chunks(4, 9, 0) == 1 and rvq.num_chunks(4, 9, 36) == 1
  assert rvq.num_chunks(4, 9, 12) == 3          # a divisor of the positions per example
  assert rvq.num_chunks(36, 1, 5) == 9          # else a divisor of all rows
  x = data((6, 9))
  ref, v = run(CFG, x)
  for chunk in (5, 18):
    out, _ = run(cfg(distance_chunk=chunk), x, variables=v)
    for k in ("codes", "quantized", "cumulative"):
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"chunk={chunk} {k}")
  (o1, n1), _ = run(cfg(distance_chunk=7), x, variables=v, update=True)
  (o2, n2), _ = run(CFG, x, variables=v, update=True)
  jax.tree.map(np.testing.assert_array_equal, n1, n2)


def test_ema_update_matches_formulas_without_restart():
  c = cfg(restart_dead_codes=False)
  x = data((8, 9))
  v = unbox(jax.jit(rvq.ResidualVQ(c).init)(jax.random.key(0), x))
  v["codebook"]["cluster_size"] = np.linspace(0.0, 3.0, 64).astype(np.float32)  # some dead
  (out, new), _ = run(c, x, variables=v, update=True)
  codes, inputs = np_search(x, v["codebook"]["embed"], 3)
  np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1, 3), codes)
  stats = {k: np.asarray(a, np.float64) for k, a in v["codebook"].items()}
  # every depth's residual inputs count for the shared codebook
  want = np_ema(stats, inputs.reshape(-1, 8), codes.reshape(-1), c)
  for k in want:
    np.testing.assert_allclose(new["codebook"][k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # outputs of the step use the codebook before the update
  np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, 8),
                             v["codebook"]["embed"][codes].sum(1), atol=1e-5)


def test_dead_code_restart():
  c = cfg(decay=0.5)
  x = data((8, 9))
  v = unbox(jax.jit(rvq.ResidualVQ(c).init)(jax.random.key(0), x))
  v["codebook"]["cluster_size"] = np.full((64,), 5.0, np.float32)
  v["codebook"]["cluster_size"][:20] = 0.0            # these stay below 1 unless used a lot
  (out, new), _ = run(c, x, variables=v, update=True)
  codes, inputs = np_search(x, v["codebook"]["embed"], 3)
  stats = {k: np.asarray(a, np.float64) for k, a in v["codebook"].items()}
  ref = np_ema(stats, inputs.reshape(-1, 8), codes.reshape(-1), c)
  dead = ref["cluster_size"] < 1.0
  assert 0 < dead.sum() < 64
  nb = new["codebook"]
  np.testing.assert_array_equal(nb["cluster_size"][dead], 1.0)
  pool = inputs.reshape(-1, 8)
  for k in np.flatnonzero(dead):  # each restarted code is a vector of the batch (any depth)
    assert np.abs(pool - nb["embed"][k]).max(-1).min() < 1e-6, k
  assert len({tuple(np.round(nb["embed"][k], 5)) for k in np.flatnonzero(dead)}) == dead.sum()
  # embed_sum agrees with embed through the smoothed counts (embed == es / norm)
  cs = nb["cluster_size"].astype(np.float64)
  norm = (cs + c.eps) / (cs.sum() + 64 * c.eps) * cs.sum()
  np.testing.assert_allclose(nb["embed_sum"] / norm[:, None], nb["embed"], rtol=1e-5, atol=1e-6)
  # live codes follow the formulas (n now includes the restarted counts)
  live = ~dead
  n = cs.sum()
  want = ref["embed_sum"] / ((cs + c.eps) / (n + 64 * c.eps) * n)[:, None]
  np.testing.assert_allclose(nb["embed"][live], want[live], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(nb["cluster_size"][live], ref["cluster_size"][live], rtol=1e-6)
  # restart off: the dead codes are not replaced
  (_, off), _ = run(cfg(decay=0.5, restart_dead_codes=False), x, variables=v, update=True)
  np.testing.assert_allclose(off["codebook"]["embed"], ref["embed"], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(off["codebook"]["cluster_size"], ref["cluster_size"], rtol=1e-6)
  # a different key draws different vectors; the same key the same ones
  (_, again), _ = run(c, x, variables=v, update=True, rng=2)
  (_, other), _ = run(c, x, variables=v, update=True, rng=3)
  np.testing.assert_array_equal(again["codebook"]["embed"], nb["embed"])
  assert not np.array_equal(other["codebook"]["embed"][dead], nb["embed"][dead])


def test_restart_from_a_pool_smaller_than_the_codebook():
  pool = np.asarray(data((5,)), np.float32)            # 5 vectors, K = 64
  fresh = np.asarray(jax.jit(rvq.restart_vectors, static_argnums=1)(
      jnp.asarray(pool), 64, jax.random.key(0)))
  assert fresh.shape == (64, 8)
  gap = np.abs(fresh[:, None] - pool[None]).max(-1).min(-1)
  assert (gap <= 0.01 / np.sqrt(8) + 1e-6).all()       # jittered copies of the batch


def test_per_depth_schedule_matches_sequential_updates():
  """The release's plain 'rq': depth d+1 searches the codebook depth d just updated."""
  c = cfg(ema_schedule="per_depth", restart_dead_codes=False)
  x = data((8, 9))
  v = unbox(jax.jit(rvq.ResidualVQ(c).init)(jax.random.key(0), x))
  v["codebook"]["cluster_size"] = np.full((64,), 2.0, np.float32)
  (out, new), _ = run(c, x, variables=v, update=True)
  stats = {k: np.asarray(a, np.float64) for k, a in v["codebook"].items()}
  r, codes = np.asarray(x, np.float64).reshape(-1, 8), []
  for _ in range(3):
    idx = ((r[:, None] - stats["embed"][None]) ** 2).sum(-1).argmin(-1)
    e = stats["embed"][idx]
    stats = np_ema(stats, r, idx, c)
    codes.append(idx)
    r = r - e
  np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1, 3), np.stack(codes, -1))
  for k in stats:
    np.testing.assert_allclose(new["codebook"][k], stats[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_codebook_per_depth():
  c = cfg(shared_codebook=False)
  x = data((4, 9))
  (out, new), v = run(c, x, update=True)
  books = v["codebook"]["embed"]
  assert books.shape == (3, 64, 8) and new["codebook"]["cluster_size"].shape == (3, 64)
  r = np.asarray(x, np.float64).reshape(-1, 8)
  for d in range(3):
    idx = ((r[:, None] - books[d][None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(np.asarray(out["codes"]).reshape(-1, 3)[:, d], idx)
    r = r - books[d][idx]


def test_gradient_trained_codebook():
  c = cfg(ema=False, codebook_weight=0.5)
  x = data()
  model = rvq.ResidualVQ(c)
  v = jax.jit(model.init)(jax.random.key(0), x)
  assert set(v) == {"params"} and v["params"]["embed"].names == rvq.CODE_NAMES
  params = unbox(v)
  out, g = jax.jit(lambda p: (model.apply(p, x),
                              jax.grad(lambda p: model.apply(p, x)["loss"])(p)))(params)
  g = g["params"]["embed"]
  codes, inputs = np_search(x, params["params"]["embed"], 3)
  want = ((inputs - params["params"]["embed"][codes]) ** 2).mean()
  np.testing.assert_allclose(float(out["codebook_loss"]), want, rtol=1e-5)
  used = np.zeros(64, bool)
  used[codes.reshape(-1)] = True
  assert (np.abs(g[used]).sum(-1) > 0).all() and (np.asarray(g)[~used] == 0).all()


def test_usage_and_entropy():
  codes = jnp.array([[0, 1], [1, 1], [2, 1], [3, 1]])    # depth 0: 4 codes once; depth 1: one
  np.testing.assert_allclose(rvq.usage(codes, 8), [0.5, 0.125])
  np.testing.assert_allclose(rvq.entropy_fraction(codes, 8), [2 / 3, 0.0], atol=1e-6)


def test_errors():
  x = data()
  model = rvq.ResidualVQ(CFG)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="mutable"):
    jax.eval_shape(lambda v: model.apply(v, x, update=True, rng=jax.random.key(0)), v)
  with pytest.raises(ValueError, match="rng"):
    jax.eval_shape(lambda v: model.apply(v, x, update=True, mutable=[rvq.CODEBOOK]), v)
  with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
    jax.eval_shape(lambda v: model.apply(v, x[..., :4]), v)


def _step_on_mesh(c, x, sizes, devices, steps=2):
  mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor", "context"), sizes)), devices)
  rules = prules.logical_rules(mcfg.default_logical_rules())
  model = rvq.ResidualVQ(c)
  variables, _ = psharding.sharded_init(model.init, mesh, rules, jax.random.key(0), x)
  xs = jax.device_put(x, psharding.batch_sharding(mesh, rules, ("act_batch", None, None)))

  @jax.jit
  def step(variables, x, key):
    out, new = model.apply(variables, x, update=True, rng=key, mutable=[rvq.CODEBOOK])
    return out, new

  outs = []
  with prules.with_rules(rules, mesh):
    for i in range(steps):
      out, variables = step(variables, xs, jax.random.key(10 + i))
      outs.append(out)
  if sizes[2] > 1:  # the codebook stays sharded over 'tensor' by its logical names
    assert variables["codebook"]["embed"].sharding.spec[0] == "tensor"
  return jax.tree.map(np.asarray, (outs, variables))


def test_same_update_on_every_mesh():
  # chunked search under sharding (chunks per batch shard; K over 'tensor' on (2, 2, 2)),
  # blocked on one device and (8, 1, 1), the plain argmax on (2, 2, 2)
  c = cfg(distance_chunk=6, search_block=16)
  x = data((8, 9))
  ref = _step_on_mesh(c, x, (1, 1, 1, 1), jax.devices()[:1])
  (outs, new) = ref
  assert (new["codebook"]["cluster_size"] == 1.0).any()          # restarts happened
  for sizes, block in (((8, 1, 1, 1), 16), ((2, 2, 2, 1), 0)):
    got = _step_on_mesh(cfg(distance_chunk=6, search_block=block), x, sizes, jax.devices())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                                         err_msg=str(sizes)), got, ref)
    np.testing.assert_array_equal(got[0][1]["codes"], outs[1]["codes"])


def test_against_vector_quantize_pytorch():
  """Same codes as lucidrains' ResidualVQ on a shared codebook (eval); the same EMA step
  with one depth. (With D > 1 the package decays the shared EMA once per depth, the release
  once per step on the summed counts, so full training steps differ by design.)"""
  torch = pytest.importorskip("torch")
  vqp = pytest.importorskip("vector_quantize_pytorch")
  torch.set_num_threads(1)
  x = data((4, 9))
  xt = torch.from_numpy(np.array(x))
  out, v = run(CFG, x)
  ref = vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=64, shared_codebook=True,
                       kmeans_init=False).eval()
  ref.layers[0]._codebook.embed.data[0] = torch.from_numpy(v["codebook"]["embed"])
  with torch.no_grad():
    _, idx, _ = ref(xt)
  np.testing.assert_array_equal(np.asarray(out["codes"]), idx.numpy())

  c = cfg(depths=1, restart_dead_codes=False)
  v1 = unbox(jax.jit(rvq.ResidualVQ(c).init)(jax.random.key(0), x))
  v1["codebook"]["cluster_size"] = np.full((64,), 2.0, np.float32)
  (_, new), _ = run(c, x, variables=v1, update=True)
  ema = vqp.ResidualVQ(dim=8, num_quantizers=1, codebook_size=64, shared_codebook=True,
                       kmeans_init=False, decay=c.decay, eps=c.eps,
                       threshold_ema_dead_code=0).train()
  cb = ema.layers[0]._codebook
  cb.embed.data[0] = torch.from_numpy(v1["codebook"]["embed"])
  cb.embed_avg.data[0] = torch.from_numpy(v1["codebook"]["embed_sum"])
  cb.cluster_size.data[0] = torch.from_numpy(v1["codebook"]["cluster_size"])
  with torch.no_grad():
    ema(xt)
  np.testing.assert_allclose(cb.cluster_size[0].numpy(), new["codebook"]["cluster_size"],
                             rtol=1e-6)
  np.testing.assert_allclose(cb.embed_avg[0].numpy(), new["codebook"]["embed_sum"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cb.embed[0].numpy(), new["codebook"]["embed"], rtol=1e-5,
                             atol=1e-6)

"""A tiny System for the training tests: a 2-layer MLP regression with logical axis names.

Registered as ``tiny_mlp`` so subprocess runs can build it with ``get_system(config)``.
``config.model.slow_data = t`` sleeps ``t`` seconds per example (time to kill a run between
two checkpoints). ``config.model.nan_after = K`` (> 0) adds a scalar ``probe`` parameter that Adam pushes up
by ~lr per step; the loss turns NaN once ``probe > (K - 0.5) * lr`` (constant lr, no
clipping), i.e. in update K + 1 -- a deterministic, in-graph NaN for the guard test.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import base_config
from mmjax.systems import base

FEATURES = 16


def dense(n, names, name):
  """A Dense layer with logical names on its kernel (``names``) and bias (the last one)."""
  return nn.Dense(
      n, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class MLP(nn.Module):
  hidden: int
  probe: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ("act_batch", "act_embed"))
    h = jax.nn.gelu(dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    h = nn.with_logical_constraint(h, ("act_batch", "act_mlp"))
    scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                   ("mlp",)), (self.hidden,))
    h = h * scale
    y = dense(FEATURES, ("mlp", "embed"), "fc2")(h)
    # a frozen-able "tower": a fixed random projection added to the output
    tower = self.param("tower", nn.with_logical_partitioning(nn.initializers.normal(0.1),
                                                             ("embed", None)),
                       (FEATURES, FEATURES))
    y = y + x @ tower
    probe = self.param("probe", nn.initializers.zeros, ()) if self.probe else None
    return y, probe


class TinyMLP(base.System):
  """Regresses a fixed nonlinear function of features derived from each record."""

  def __init__(self, config):
    super().__init__(config)
    self.nan_after = int(config.model.get("nan_after", 0))
    self.model = MLP(hidden=int(config.model.hidden), probe=self.nan_after > 0)
    self.target = np.random.RandomState(123).normal(size=(FEATURES, FEATURES)) / 4

  def preprocess(self, record, rng):
    if self.config.model.slow_data:
      time.sleep(self.config.model.slow_data)
    image = np.asarray(record["image"], np.float32)
    flat = image.reshape(-1)
    x = flat[: FEATURES * (flat.size // FEATURES)].reshape(FEATURES, -1).mean(-1) / 255.0
    x = (x - x.mean()).astype(np.float32) * 4
    return {"x": x, "y": np.tanh(x @ self.target).astype(np.float32)}

  def dummy_batch(self, batch_size):
    z = np.zeros((batch_size, FEATURES), np.float32)
    return {"x": z, "y": z}

  def init(self, rng, batch):
    return self.model.init(rng, batch["x"])

  def loss(self, params, batch, rng):
    # per-step randomness that does not depend on the order of rows in the global batch
    # (that order differs between 1 and 2 hosts): a random scale of the whole prediction
    pred, probe = self.model.apply({"params": params}, batch["x"])
    pred = pred * (1.0 + 0.01 * jax.random.normal(rng, ()))
    mse = jnp.mean((pred - batch["y"]) ** 2)
    loss = mse
    if probe is not None:
      lr = self.config.optim.lr
      loss = jnp.where(probe > (self.nan_after - 0.5) * lr, jnp.nan, mse - probe)
    return loss, {"mse": mse}

  def flops_per_step(self, batch_size):
    h = int(self.config.model.hidden)
    return 6.0 * batch_size * (FEATURES * h * 2 + FEATURES * FEATURES)


base.register("tiny_mlp", "train_helpers:TinyMLP")


def set_fields(c, overrides: dict):
  """``c`` with ``{'a.b': value}`` fields set (dotted paths)."""
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def tiny_config(**overrides):
  """A base config for TinyMLP: 8-example batches, constant-ish lr, small everything."""
  c = base_config()
  c.system = "tiny_mlp"
  c.model = dict(hidden=32, nan_after=0, slow_data=0.0)
  c.total_steps = 8
  c.log_every = 1
  c.checkpoint_every = 4
  c.data.batch_size = 8
  c.data.resolution = 16
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 2
  c.optim.weight_decay = 0.01
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return set_fields(c, overrides)


def random_batch(batch_size, seed=0):
  rs = np.random.RandomState(seed)
  x = rs.normal(size=(batch_size, FEATURES)).astype(np.float32)
  y = np.tanh(x @ np.random.RandomState(123).normal(size=(FEATURES, FEATURES)) / 4)
  return {"x": x, "y": y.astype(np.float32)}


# --------------------------------------------------------------------------------------
# A multi-objective system: an EMA-codebook autoencoder with a discriminator (a toy VQ-GAN)


CODES, CODE_DIM = 8, 4


class ToyVQ(nn.Module):
  """enc -> nearest code of an EMA codebook (mutable collection ``codebook``: embed,
  counts, sums, with logical names) -> dec."""

  @nn.compact
  def __call__(self, x):
    z = dense(CODE_DIM, ("embed", "mlp"), "enc")(x)
    boxed = lambda init, names, shape: lambda: nn.with_logical_partitioning(init, names)(
        self.make_rng("params"), shape)
    embed = self.variable("codebook", "embed", boxed(nn.initializers.normal(1.0),
                                                     ("mlp", "embed"), (CODES, CODE_DIM)))
    counts = self.variable("codebook", "counts", boxed(nn.initializers.ones, ("mlp",),
                                                       (CODES,)))
    sums = self.variable("codebook", "sums", boxed(nn.initializers.zeros, ("mlp", "embed"),
                                                   (CODES, CODE_DIM)))
    dist = jnp.sum((z[:, None] - embed.value[None]) ** 2, -1)
    idx = jnp.argmin(dist, -1)
    q = embed.value[idx]
    zq = z + jax.lax.stop_gradient(q - z)                     # straight-through
    xrec = dense(FEATURES, ("mlp", "embed"), "dec")(zq)
    return dict(z=z, q=q, idx=idx, xrec=xrec, counts=counts.value, sums=sums.value)


class ToyTokenizer(TinyMLP):
  """Objectives ``main`` (reconstruction + commitment + adaptive-weight GAN term from
  ``model.disc_start``; returns the EMA codebook update and hands its reconstructions on)
  and ``disc`` (hinge loss from ``model.disc_start``, its own Adam)."""

  def __init__(self, config):
    base.System.__init__(self, config)
    self.model = _ToyWithDisc()
    self.target = np.random.RandomState(123).normal(size=(FEATURES, FEATURES)) / 4

  def init(self, rng, batch):
    return self.model.init(rng, batch["x"])

  def objectives(self):
    from mmjax.train.objectives import Objective
    return [Objective("main", self.generator_loss),
            Objective("disc", self.disc_loss, params=r"discriminator/.*")]

  def generator_loss(self, params, batch, rng, ctx):
    from mmjax.train import objectives as obj
    del rng
    variables = {"params": params, **ctx.mutables}
    x = batch["x"]

    def terms(p):
      out = self.model.apply({**variables, "params": p}, x)
      rec = jnp.mean((out["xrec"] - x) ** 2)
      gan = -jnp.mean(self.model.apply({"params": p}, out["xrec"], method=_ToyWithDisc.disc))
      return (rec, gan), out

    (rec, gan), (g_rec, g_gan), out = obj.layer_grads(terms, params, "vq/dec/kernel",
                                                      has_aux=True)
    on = obj.starts_at(ctx.step, self.config.model.disc_start)
    weight = obj.adaptive_weight(g_rec, g_gan)
    commit = jnp.mean((out["z"] - jax.lax.stop_gradient(out["q"])) ** 2)
    loss = rec + 0.25 * commit + on * weight * gan
    # EMA codebook over the global batch (decay 0.99, Laplace smoothing)
    onehot = jax.nn.one_hot(out["idx"], CODES, dtype=jnp.float32)
    z = jax.lax.stop_gradient(out["z"])
    counts = 0.99 * out["counts"] + 0.01 * onehot.sum(0)
    sums = 0.99 * out["sums"] + 0.01 * onehot.T @ z
    n = counts.sum()
    smoothed = (counts + 1e-5) / (n + CODES * 1e-5) * n
    codebook = dict(embed=sums / smoothed[:, None], counts=counts, sums=sums)
    return loss, {"rec": rec, "commit": commit, "gan_weight": weight,
                  "mutables": {"codebook": {"vq": codebook}}, "carry": {"xrec": out["xrec"]}}

  def disc_loss(self, params, batch, rng, ctx):
    from mmjax.train import objectives as obj
    del rng
    fake = ctx.carry["main"]["xrec"]
    d = lambda v: self.model.apply({"params": params}, v, method=_ToyWithDisc.disc)
    on = obj.starts_at(ctx.step, self.config.model.disc_start)
    hinge = jnp.mean(jax.nn.relu(1.0 - d(batch["x"]))) + jnp.mean(jax.nn.relu(1.0 + d(fake)))
    loss = on * hinge
    if self.config.model.disc_nan_at:
      loss = jnp.where(ctx.step + 1 >= self.config.model.disc_nan_at, jnp.nan, loss)
    return loss, {"hinge": hinge}

  def flops_per_step(self, batch_size):
    return None


class _ToyWithDisc(nn.Module):
  def setup(self):
    self.vq = ToyVQ()
    self.discriminator = _Disc()

  def __call__(self, x):
    out = self.vq(x)
    self.discriminator(out["xrec"])                            # creates the disc params
    return out

  def disc(self, x):
    return self.discriminator(x)


class _Disc(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.leaky_relu(nn.Dense(16, name="fc1")(x), 0.2)
    return nn.Dense(1, name="fc2")(h)[:, 0]


base.register("toy_tokenizer", "train_helpers:ToyTokenizer")


def toy_tokenizer_config(**overrides):
  """TinyMLP's config for the toy tokenizer: the discriminator starts at step 3 with Adam
  betas (0.5, 0.9) and its own learning rate."""
  from ml_collections import ConfigDict
  c = tiny_config()
  c.system = "toy_tokenizer"
  c.model = dict(hidden=32, nan_after=0, slow_data=0.0, disc_start=3, disc_nan_at=0)
  c.optim.groups.disc = ConfigDict(dict(lr=3e-3, b1=0.5, b2=0.9, weight_decay=0.0,
                                        warmup_steps=0, schedule="constant"))
  return set_fields(c, overrides)


class DeterministicMLP(TinyMLP):
  """TinyMLP without per-step randomness (a loss that is a mean over rows, nothing else):
  what gradient-accumulation equality is checked on."""

  def loss(self, params, batch, rng):
    pred, _ = self.model.apply({"params": params}, batch["x"])
    mse = jnp.mean((pred - batch["y"]) ** 2)
    return mse, {"mse": mse}


def get_test_system(config):
  return {"tiny_mlp": TinyMLP, "toy_tokenizer": ToyTokenizer}[config.system](config)


def assert_same(a, b):
  """Two pytrees with the same structure and bitwise-equal leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                          jax.tree.structure(b))
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


def wait_for_checkpoint(proc, workdir, timeout=300):
  """Blocks until ``workdir`` has a finalised checkpoint (or fails if ``proc`` ends)."""
  import os as _os
  t0 = time.time()
  directory = _os.path.join(str(workdir), "checkpoints")
  while not (_os.path.isdir(directory) and any(d.isdigit() for d in _os.listdir(directory))):
    if proc.poll() is not None:
      raise AssertionError(f"process ended (rc {proc.returncode}) before a checkpoint:\n"
                           + proc.stdout.read())
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for a checkpoint")
    time.sleep(0.01)

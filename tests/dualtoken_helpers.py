"""Shared by the DualToken unified-model tests (not a test module)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_variables(system, seed=0):
  """Variables of the system's shapes without the (slow) jitted init: N(0, 0.1), norm scales
  1 + N(0, 0.1), codebook counts positive."""
  shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    x = 0.1 * rng.standard_normal(a.shape)
    if name == "scale":
      x = x + 1.0
    elif name == "cluster_size":
      x = np.abs(x) + 1.0
    return jnp.asarray(x.astype(a.dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)

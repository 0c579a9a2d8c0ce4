"""Shared helpers of the LaViDa tests (tests/test_lavida*.py): tiny configs, batches of the
shapes world, cheap random params."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import config as mcfg
from mmjax.data import shapes
from mmjax.systems.lavida.system import Lavida

TINY_VISION = ["--config.model.vision_config.hidden_size=16",
               "--config.model.vision_config.intermediate_size=32",
               "--config.model.vision_config.num_hidden_layers=2", "--config.data.batch_size=4"]
TINY = TINY_VISION + ["--config.model.llm_config.d_model=32",
                      "--config.model.llm_config.n_layers=1",
                      "--config.model.llm_config.mlp_hidden_size=64"]


def tiny_system(*overrides, preset="demo", tiny=TINY) -> Lavida:
  return Lavida(mcfg.load(f"configs/lavida.py:{preset}", tiny + list(overrides)))


def shapes_batch(system, n, seed=0, rng=0):
  """``n`` preprocessed shapes scenes as one batch (``rng=None``: prompts, no extra pad)."""
  src = shapes.ShapesSource(seed=seed, resolution=system.config.data.resolution)
  gen = None if rng is None else np.random.default_rng(rng)
  examples = [system.preprocess(src[i], gen) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def random_params(system, seed=0):
  """Params of the system's shapes drawn in numpy (norm scales 1, biases 0, else N(0, 0.02)):
  compiling the real initialiser costs more than these tests."""
  boxed = jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name in ("scale", "bias"):
      return jnp.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed))

"""Image features into token sequences: one packer and one splicer for every system.

LLaVA-OneVision, MetaQuery (images through the frozen MLLM) and LaViDa all turn per-view
vision features into image tokens the same way (the anyres base view, then the grid picture
cropped to the image's aspect / resized, with a learned ``newline`` after each row) and put
them at the placeholder positions of the prompt.

* ``pack_views(feats, layout, newline)``  images sharing one static layout, batched;
* ``pack(feats, layouts, newline)``       images of different layouts, concatenated;
* ``splice(x, is_image, feats)``          image tokens into the embeddings, flat or per row.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def pack_views(feats, layout, newline):
  """Projected per-view features ``[n, V, g*g, D]`` of ``n`` images that share one static
  ``anyres.ImageLayout`` -> their image tokens ``[n, T, D]`` (``T = layout.num_tokens``):
  the base view, then the grid picture unpadded / resized with ``newline`` after each row
  (a base-only layout gets one newline)."""
  n, _, _, d = feats.shape
  nl = newline.astype(feats.dtype)
  base = feats[:, 0]
  if not layout.rows:
    return jnp.concatenate([base, jnp.broadcast_to(nl, (n, 1, d))], axis=1)
  g = layout.grid
  pic = feats[:, 1:].reshape(n, layout.rows, layout.cols, g, g, d).transpose(0, 1, 3, 2, 4, 5)
  pic = pic.reshape(n, layout.rows * g, layout.cols * g, d)
  top, bottom, left, right = layout.crop
  pic = pic[:, top:bottom, left:right]
  if layout.resize_to is not None:
    pic = jax.image.resize(pic, (n,) + tuple(layout.resize_to) + (d,), "linear",
                           antialias=False)
  h, w = layout.picture_hw
  pic = jnp.concatenate([pic, jnp.broadcast_to(nl, (n, h, 1, d))], axis=2)
  return jnp.concatenate([base, pic.reshape(n, h * (w + 1), d)], axis=1)


def pack(feats, layouts: Sequence, newline):
  """Per-view features ``[views, g*g, D]`` of images with their own layouts (in order) ->
  the image tokens of all images ``[tokens, D]``."""
  out, k = [], 0
  for lay in layouts:
    out.append(pack_views(feats[None, k:k + lay.num_views], lay, newline)[0])
    k += lay.num_views
  if k != feats.shape[0]:
    raise ValueError(f"layouts need {k} views, images has {feats.shape[0]}")
  return jnp.concatenate(out, axis=0)


def splice(x, is_image, feats):
  """The embeddings ``x [b, L, D]`` at ``is_image [b, L]`` replaced by image tokens.

  ``feats [tokens, D]``: taken in row-major order over the whole batch;
  ``feats [b, M, D]``: per row, row ``i``'s k-th image position gets ``feats[i, k]`` (rows
  may hold fewer than ``M``).
  """
  if feats.ndim == 2:
    b, s, d = x.shape
    flat = is_image.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, feats.shape[0] - 1)
    out = jnp.where(flat[:, None], feats[idx].astype(x.dtype), x.reshape(b * s, d))
    return out.reshape(b, s, d)
  idx = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1, 0, feats.shape[1] - 1)
  picked = jnp.take_along_axis(feats, idx[..., None], axis=1)
  return jnp.where(is_image[..., None], picked.astype(x.dtype), x)

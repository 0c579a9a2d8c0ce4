"""Pictures people look at rather than read: sample grids written as PNG."""
from __future__ import annotations

import numpy as np


def caption_grid(images, captions, references=None, cols=4, scale=3):
  """A PNG-able PIL grid: each image enlarged, the generated caption (and reference) below."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  h, w = images[0].shape[:2]
  cw, ch = max(w * scale, 220), h * scale + 30
  rows = -(-len(images) // cols)
  grid = Image.new("RGB", (cols * cw, rows * ch), "white")
  draw = ImageDraw.Draw(grid)
  for k, (img, cap) in enumerate(zip(images, captions)):
    x, y = (k % cols) * cw, (k // cols) * ch
    grid.paste(Image.fromarray(np.asarray(img)).resize((w * scale, h * scale), Image.NEAREST),
               (x, y))
    ok = references is None or cap == references[k]
    draw.text((x + 2, y + h * scale + 2), cap[:40], fill=(0, 0, 0) if ok else (200, 0, 0))
    if references is not None and not ok:
      draw.text((x + 2, y + h * scale + 15), references[k][:40], fill=(0, 120, 0))
  return grid

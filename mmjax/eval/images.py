"""Reconstruction metrics: PSNR, SSIM (on [0, 1] RGB) and the Frechet distance behind rFID.

* ``psnr(a, b)``       per image, ``10 log10(1 / MSE)`` on [0, 1] RGB;
* ``ssim(a, b)``       per image, Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5),
                       K1 = 0.01, K2 = 0.03, valid positions, mean over positions and
                       channels (what ``skimage.metrics.structural_similarity(...,
                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                       data_range=1, channel_axis=-1)`` computes);
* ``frechet_distance(mu1, cov1, mu2, cov2)`` and ``rfid(real, fake, features)``: rFID with
  *user-supplied* Inception features (no weights ship with mmjax and none are downloadable
  here): ``features(images [b, H, W, 3] in [0, 1]) -> [b, 2048]``, e.g. clean-fid's or
  torchvision's InceptionV3 pool features wrapped by the user. Not run in CI.

Example::

    from mmjax.eval import images as im
    im.psnr(x, y).mean(), im.ssim(x, y).mean()          # x, y: [b, H, W, 3] in [0, 1]
    score = im.rfid(real, recon, features=my_inception_pool3)
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _check(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"expected two [b, H, W, C] batches of the same shape, got {a.shape} "
                     f"and {b.shape}")
  return a, b


def psnr(a, b, data_range: float = 1.0) -> np.ndarray:
  """``[b]`` PSNR in dB of images in ``[0, data_range]`` (inf for identical images)."""
  a, b = _check(a, b)
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter(x, g):
  """Separable valid filtering of ``[b, H, W, C]`` along H then W."""
  k = len(g)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  y = sum(g[i] * x[:, i:i + h] for i in range(k))
  return sum(g[j] * y[:, :, j:j + w] for j in range(k))


def ssim(a, b, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> np.ndarray:
  """``[b]`` mean SSIM over valid window positions and channels."""
  a, b = _check(a, b)
  if min(a.shape[1:3]) < win:
    raise ValueError(f"images {a.shape[1:3]} are smaller than the {win}x{win} SSIM window")
  g = _gaussian(win, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = _filter(a, g), _filter(b, g)
  var_a = _filter(a * a, g) - mu_a ** 2
  var_b = _filter(b * b, g) - mu_b ** 2
  cov = _filter(a * b, g) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return s.mean(axis=(1, 2, 3))


def _sqrtm_psd_product(c1, c2):
  """``sqrtm(c1 @ c2)`` trace via the symmetric form ``sqrt(c1) c2 sqrt(c1)`` (PSD)."""
  w, v = np.linalg.eigh(c1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root @ c2 @ root
  return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 sqrt(cov1 cov2))`` of two Gaussians."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
               - 2.0 * _sqrtm_psd_product(cov1, cov2))


def rfid(real, fake, features: Callable[[np.ndarray], np.ndarray], batch: int = 50) -> float:
  """rFID between ``real`` and reconstructed ``fake`` images ([n, H, W, 3] in [0, 1]) with
  the user's Inception feature function (see the module docstring)."""
  def stats(images):
    f = np.concatenate([np.asarray(features(images[i:i + batch]), np.float64)
                        for i in range(0, len(images), batch)])
    if f.ndim != 2 or len(f) < 2:
      raise ValueError(f"features must give [n >= 2, dim] arrays, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)
  return frechet_distance(*stats(real), *stats(fake))

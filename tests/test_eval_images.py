"""PSNR / SSIM against scikit-image, the Frechet distance against scipy's sqrtm."""
import numpy as np
import pytest
import scipy.linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mmjax.eval import images as im


def _pair(seed=0, shape=(3, 24, 20, 3)):
  rs = np.random.RandomState(seed)
  a = rs.uniform(size=shape)
  b = np.clip(a + rs.normal(scale=0.1, size=shape), 0, 1)
  return a, b


def test_psnr_and_ssim_match_scikit_image():
  a, b = _pair()
  for i in range(len(a)):
    assert im.psnr(a, b)[i] == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=1))
    ref = structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1, channel_axis=-1)
    assert im.ssim(a, b)[i] == pytest.approx(ref, rel=1e-6)
  assert np.all(im.ssim(a, a) == pytest.approx(1.0)) and np.isinf(im.psnr(a, a)).all()
  with pytest.raises(ValueError, match="same shape"):
    im.psnr(a, b[:, :10])
  with pytest.raises(ValueError, match="smaller than"):
    im.ssim(a[:, :8, :8], b[:, :8, :8])


def test_frechet_distance_and_rfid_hook():
  rs = np.random.RandomState(0)
  x, y = rs.normal(size=(200, 6)), rs.normal(1.0, 2.0, size=(300, 6)) @ rs.normal(size=(6, 6))
  mu1, c1, mu2, c2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2)
         - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
  assert im.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-6)
  a, b = _pair(shape=(20, 12, 12, 3))
  feats = lambda imgs: imgs.reshape(len(imgs), -1)[:, :5]
  assert im.rfid(a, a, feats) == pytest.approx(0.0, abs=1e-6)
  assert im.rfid(a, b, feats, batch=7) > 0

"""LPIPS against the ``lpips`` package (``lpips.LPIPS(net='vgg')``, its own code and its
shipped linear heads) on a random VGG16 backbone. PyPI's torchvision does not load beside this
torch build, so a minimal stand-in ``torchvision`` (``models.vgg16(...).features`` = a random
torchvision-layout VGG16 built here) is put in ``sys.modules`` while the package is imported
and built. Loading from files (torchvision state dict + the package's ``vgg.pth``) and from the
package module's own state dict; export round trip; gradients; errors."""
import copy
import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from mmjax.errors import MissingCheckpoint
from mmjax.models import lpips as ours

pytest.importorskip("scipy")
if importlib.util.find_spec("lpips") is None:
  pytest.skip("lpips is not installed (pip install --no-deps lpips==0.1.4)",
              allow_module_level=True)

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_features(seed=0):
  """torchvision's ``vgg16().features`` layout (indices 0..30), random weights."""
  torch.manual_seed(seed)
  layers, cin = [], 3
  for v in CFG:
    if v == "M":
      layers.append(tnn.MaxPool2d(2, 2))
    else:
      layers += [tnn.Conv2d(cin, v, 3, padding=1), tnn.ReLU(inplace=True)]
      cin = v
  return tnn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference():
  """(lpips.LPIPS module, torchvision-style VGG16 state dict, path of the package heads)."""
  features = vgg16_features()
  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.vgg16 = lambda *a, **k: types.SimpleNamespace(features=features)
  saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
  sys.modules.update({"torchvision": tv, "torchvision.models": tv.models})
  try:
    import lpips
    model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  vgg_sd = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
  return model, vgg_sd, ours.package_lin_path()


def images(seed, b=2, size=48):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  return x, y


def torch_distance(model, x, y):
  nchw = lambda a: torch.tensor(a).permute(0, 3, 1, 2)  # noqa: E731
  with torch.no_grad():
    return model(nchw(x), nchw(y)).reshape(-1).numpy()


_dist = jax.jit(lambda p, a, b: ours.LPIPS().apply({"params": p}, a, b))


def test_parity_from_files(reference, tmp_path):
  model, vgg_sd, lin_path = reference
  torch.save(vgg_sd, tmp_path / "vgg16.pth")
  params = ours.load_lpips(str(tmp_path / "vgg16.pth"), lin_path)
  heads = torch.load(lin_path, map_location="cpu")
  assert all(float(v.min()) >= 0 for v in heads.values())   # the package's heads: w >= 0
  x, y = images(0)
  got, want = np.asarray(_dist(params, x, y)), torch_distance(model, x, y)
  print("lpips relative error", np.max(np.abs(got - want) / want), got, want)
  assert got.shape == (2,) and np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_parity_from_package_state_dict_and_export(reference):
  model = copy.deepcopy(reference[0])
  sd = {k: v.numpy() for k, v in model.state_dict().items()}   # net.slice{s}.{N}.*, lin*, ...
  with torch.no_grad():   # random non-negative heads, set in the reference too
    for k in range(5):
      getattr(model, f"lin{k}").model[1].weight.uniform_(0.0, 1.0)
  sd.update({k: v.numpy() for k, v in model.state_dict().items() if k.startswith("lin")})
  params = ours.from_state_dict(sd)
  x, y = images(1, b=3, size=40)
  np.testing.assert_allclose(np.asarray(_dist(params, x, y)), torch_distance(model, x, y),
                             rtol=1e-5)
  out = ours.to_state_dict(params)
  assert len(out) == 31 and out["lin4.model.1.weight"].shape == (1, 512, 1, 1)
  assert out["features.28.weight"].shape == (512, 512, 3, 3)
  np.testing.assert_array_equal(out["features.0.weight"], sd["net.slice1.0.weight"])
  np.testing.assert_array_equal(out["lin2.model.1.weight"], sd["lin2.model.1.weight"])


def test_identity_zero_gradients_and_bf16(reference, tmp_path):
  _, vgg_sd, lin_path = reference
  heads = torch.load(lin_path, map_location="cpu")
  params = ours.from_state_dict({k: v.numpy() for k, v in {**vgg_sd, **heads}.items()})
  x, y = images(2)
  np.testing.assert_allclose(np.asarray(_dist(params, x, x)), 0.0, atol=1e-7)
  g = jax.jit(jax.grad(lambda a: ours.LPIPS().apply({"params": params}, a, y).mean()))(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  bf = ours.LPIPS(ours.LPIPSConfig(dtype=jnp.bfloat16))
  d16 = np.asarray(jax.jit(lambda p: bf.apply({"params": p}, x, y))(params))
  assert d16.dtype == np.float32
  np.testing.assert_allclose(d16, np.asarray(_dist(params, x, y)), rtol=0.05)


def test_missing_files_and_tensors(tmp_path, reference, monkeypatch):
  _, vgg_sd, lin_path = reference
  with pytest.raises(MissingCheckpoint, match="lpips_vgg"):
    ours.load_lpips(str(tmp_path / "nope.pth"), lin_path)
  sd = {k: v.numpy() for k, v in vgg_sd.items()}
  sd.pop("features.26.bias")
  from mmjax.interop import CheckpointMismatchError
  with pytest.raises(CheckpointMismatchError, match="features.26.bias"):
    ours.from_state_dict(sd)   # no heads either: every lin{k} named
  from mmjax.models.vqgan import TorchMissing
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` fails: a clear error
  with pytest.raises(TorchMissing, match="needs PyTorch"):
    ours.load_lpips(lin_path)

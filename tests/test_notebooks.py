"""notebooks/*.ipynb: committed without outputs, each with a papermill-style ``parameters``
cell, linked from the README (an "Open in Colab" link each), and executed end to end on
CPU with few-step parameters (nbclient; the parameters go into a cell inserted after the
``parameters`` cell, as papermill does). Timings: ``pytest -s tests/test_notebooks.py``."""
import os
import re
import time

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

# What CI runs: a few steps, small evaluations, one CPU device.
CI_PARAMETERS = {
    "quickstart": dict(STEPS=4, NUM_SAMPLES=8, NUM_EVAL=8, SOLVER_STEPS=4),
    "lavida": dict(STEPS=4, NUM_CAPTIONS=4, NUM_SCENES=4),   # infill reuses the eval's program
    "dualtoken": dict(STEPS=4, NUM_SAMPLES=8, NUM_EVAL=8),
    "checkpoint_import": dict(),
}


def _read(name: str):
  return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def _parameters_index(nb) -> int:
  found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(found) == 1, f"{len(found)} cells tagged 'parameters'"
  return found[0]


def test_every_notebook_is_executed_here():
  names = sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
  assert names == sorted(CI_PARAMETERS)


@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_committed_without_outputs_and_with_a_parameters_cell(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"notebooks/{name}.ipynb cell {i} has outputs: clear them before committing "
          "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")
  params = nb.cells[_parameters_index(nb)].source
  assigned = set(re.findall(r"^([A-Z_]+) =", params, re.M))
  assert set(CI_PARAMETERS[name]) <= assigned, (name, assigned)
  assert {"CPU_DEVICES", "MMJAX_REPO"} <= assigned


def _colab_repo(text: str, name: str):
  m = re.search(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/"
                rf"notebooks/{name}\.ipynb", text)
  return m and m.group(1)


def test_readme_links_every_notebook_and_colab():
  """The README links each notebook and its Colab page; the notebook's own badge and the
  repository its setup cell clones (``MMJAX_REPO``) name the same GitHub repository."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  repos = set()
  for name in CI_PARAMETERS:
    assert f"](notebooks/{name}.ipynb)" in readme, name
    nb = _read(name)
    params = nb.cells[_parameters_index(nb)].source
    clone = re.search(r'^MMJAX_REPO = "https://github\.com/([\w.-]+/[\w.-]+)"', params, re.M)
    found = [_colab_repo(readme, name), _colab_repo(nb.cells[0].source, name),
             clone and clone.group(1)]
    assert all(found), (name, found)     # README link, the notebook's badge, MMJAX_REPO
    repos.update(found)
  assert len(repos) == 1, repos


@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  nb = _read(name)
  params = dict(CI_PARAMETERS[name], WORKDIR=str(tmp_path / "workdir"), CPU_DEVICES=1)
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, cell)
  # the kernel inherits this environment: one CPU device (not the tests' 8), and XLA:CPU
  # without LLVM's expensive optimisations -- a few steps are all compile time
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("PYTHONWARNINGS", "ignore")
  start = time.perf_counter()
  km = KernelManager(kernel_name="python3", transport="ipc",     # local sockets, not TCP
                     connection_file=str(tmp_path / "kernel.json"))
  try:
    NotebookClient(nb, km=km, timeout=600, allow_errors=False,
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()
  finally:
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  print(f"notebooks/{name}.ipynb ran in {time.perf_counter() - start:.1f}s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images or name == "checkpoint_import", f"{name}: no picture shown"

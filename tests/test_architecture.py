"""The shape of the code base: the import graph of ``mmjax/`` (imports inside functions
counted) has no cycle, the layers do not reach upwards (``parallel`` never imports ``train``
or ``systems``; nothing but the systems and the trainer's tools import a system), no file in
``mmjax/`` is over 600 lines, and no test module imports another test module."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mmjax")
MAX_LINES = 600


def _modules() -> dict[str, str]:
  """``{dotted module name: file}`` for every ``.py`` under ``mmjax/``."""
  out = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _resolve(name: str, modules: dict) -> list[str]:
  """The modules executed by importing ``name``: its parent packages and itself (or, for
  ``from pkg import attr``, the package that defines ``attr``)."""
  parts = name.split(".")
  out = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
  return [m for m in out if m in modules]


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for mod, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    deps = set()
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative import
          base = mod.split(".") if is_pkg else mod.split(".")[:-1]
          base = base[:len(base) - node.level + 1]
          prefix = ".".join(base + ([node.module] if node.module else []))
        else:
          prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
      for n in names:
        if n.split(".")[0] == "mmjax":
          deps.update(_resolve(n, modules))
    deps.discard(mod)
    # a module's own parent packages are executed before it: not a dependency of it
    parents = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")))}
    graph[mod] = deps - parents
  return graph


def _cycle(graph):
  color, stack = {}, []

  def visit(n):
    color[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if color.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if color.get(m) is None:
        found = visit(m)
        if found:
          return found
    stack.pop()
    color[n] = 2
    return None

  for n in sorted(graph):
    if color.get(n) is None:
      found = visit(n)
      if found:
        return found
  return None


def test_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 50
  cycle = _cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("low,high", [
    ("mmjax.parallel", ("mmjax.train", "mmjax.systems", "mmjax.interop", "mmjax.data")),
    ("mmjax.core", ("mmjax.models", "mmjax.train", "mmjax.systems", "mmjax.parallel")),
    ("mmjax.models", ("mmjax.train", "mmjax.systems")),
    ("mmjax.interop", ("mmjax.train", "mmjax.systems")),
    ("mmjax.diffusion", ("mmjax.train", "mmjax.systems", "mmjax.data")),
    ("mmjax.eval", ("mmjax.train", "mmjax.systems")),
])
def test_layers_do_not_import_upwards(low, high):
  bad = sorted((m, d) for m, deps in import_graph().items() if m.startswith(low)
               for d in deps if d.startswith(high))
  assert not bad, bad


def test_a_system_is_imported_only_by_itself():
  bad = []
  for m, deps in import_graph().items():
    for d in deps:
      if d.startswith("mmjax.systems.") and d != "mmjax.systems.base":
        system = ".".join(d.split(".")[:3])
        if not m.startswith(system):
          bad.append((m, d))
  assert not bad, bad


def test_no_file_over_600_lines():
  lengths = {}
  for mod, path in _modules().items():
    with open(path) as f:
      lengths[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
  over = {p: n for p, n in lengths.items() if n > MAX_LINES}
  assert not over, over


def test_no_test_module_imports_another():
  tests_dir = os.path.join(ROOT, "tests")
  test_modules = {f[:-3] for f in os.listdir(tests_dir) if f.startswith("test_")
                  and f.endswith(".py")}
  bad = []
  for name in sorted(test_modules):
    with open(os.path.join(tests_dir, name + ".py")) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        hit = [a.name for a in node.names if a.name in test_modules]
      elif isinstance(node, ast.ImportFrom):
        hit = [node.module] if node.module in test_modules else []
      else:
        hit = []
      bad += [(name, h) for h in hit]
  assert not bad, bad

"""No module imports upward: fml_jax's modules form layers, and each imports only from
its own layer or those below (WORKSPACE.md draws the same picture)."""

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module's layer is that of the longest prefix listed.
LAYERS = [
    ["fml_jax.errors", "fml_jax.settings", "fml_jax.trees", "fml_jax.stats"],
    ["fml_jax.tasks", "fml_jax.conv", "fml_jax.schedules", "fml_jax.optimizers",
     "fml_jax.losses", "fml_jax.models", "fml_jax.data", "fml_jax.local_training",
     "fml_jax.outputs", "fml_jax.checkpoints", "fml_jax.reporting", "fml_jax.plot",
     "fml_jax.privacy", "fml_jax.distributed"],
    ["fml_jax.rounds.types"],
    ["fml_jax.rounds.algorithm", "fml_jax.evaluation"],
    ["fml_jax.rounds", "fml_jax.preflight"],
    ["fml_jax.algorithms"],
    ["fml_jax.configs"],
    ["fml_jax.config_checks", "fml_jax.replicas", "fml_jax.train"],
    ["fml_jax.main", "fml_jax"],
]


def layer_of(module: str) -> int:
  best, layer = -1, None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (module == name or module.startswith(name + ".")) and len(name) > best:
        best, layer = len(name), i
  assert layer is not None, f"{module} is in no layer of tests/test_layers.py"
  return layer


def imports_of(path: Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fml_jax"):
      for alias in node.names:   # `from fml_jax import train` imports fml_jax.train
        found.add(f"{node.module}.{alias.name}" if node.module == "fml_jax" else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("fml_jax"))
  return found


def test_no_module_imports_upward():
  upward = []
  for path in sorted((REPO / "fml_jax").rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    for imported in imports_of(path):
      if layer_of(imported) > layer_of(module):
        upward.append(f"{module} (layer {layer_of(module)}) imports {imported} "
                      f"(layer {layer_of(imported)})")
  assert not upward, "\n".join(upward)

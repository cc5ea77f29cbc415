"""Every experiment of experiments/run.py at its --quick size: tables and figures appear."""

import importlib.util

import pytest

from conftest import REPO, SHARED_TFDS, requires_mnist

spec = importlib.util.spec_from_file_location("experiments_run", REPO / "experiments" / "run.py")
experiments = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiments)


@requires_mnist
@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_quick_experiment_writes_table_and_figure(name, tmp_path):
  table = experiments.run_experiment(name, tmp_path, True, SHARED_TFDS)
  rows = [l for l in table.read_text().splitlines() if l.startswith("| ") and "---" not in l]
  assert set(experiments.QUICK_RUNS[name]) <= set(experiments.EXPERIMENTS[name]())
  assert len(rows) == 1 + len(experiments.QUICK_RUNS[name])   # header + one row per run
  assert (tmp_path / name / f"{name}.png").stat().st_size > 10_000
  if name == "fedmd":
    assert "gain" in (tmp_path / name / "bounds.md").read_text()
  # A second call reuses the finished runs instead of training again.
  assert experiments.run_experiment(name, tmp_path, True, SHARED_TFDS).read_text() == \
      table.read_text()


def test_quick_keeps_the_experiment_small_and_on_mnist():
  for make in experiments.EXPERIMENTS.values():
    for overrides in make().values():
      q = experiments.quick(overrides)
      assert q["num_rounds"] == 2 and q["num_clients"] == 4
      assert q.get("dataset", "synthetic") in ("mnist", "synthetic")
      assert "lenet5" not in q.get("local_models", "") and "fedmd_" not in q.get(
          "local_models", "")

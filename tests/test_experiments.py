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


@requires_mnist
def test_table_covers_runs_finished_in_earlier_batches(tmp_path):
  """`--only` batches add up: the table lists every finished run of the experiment in the
  folder, in the experiment's order, not just the batch just run."""
  import shutil  # pylint: disable=g-import-not-at-top
  experiments.run_experiment("baselines", tmp_path, True, SHARED_TFDS)
  folder = tmp_path / "baselines"
  # Stands for a run finished by an earlier batch (same files as a real one).
  shutil.copytree(folder / "mnist-dir0.1-fml", folder / "mnist-iid-fml")
  table = experiments.run_experiment("baselines", tmp_path, True, SHARED_TFDS,
                                     only=["mnist-dir0.1-fml"])
  names = [l.split("|")[1].strip() for l in table.read_text().splitlines()[2:]]
  assert names == ["mnist-iid-fml", "mnist-dir0.1-fml"]

"""Every experiment of experiments/run.py at its --quick size: tables and figures appear."""

import importlib.util
import json

import numpy as np
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


def test_set_reads_each_value_as_its_fields_type_and_reaches_every_run(monkeypatch, tmp_path):
  extra = experiments.parse_settings(["local_models=htfe_cpu_img", "client_max_examples=0",
                                      "fedproto.weight=3", "eval_clients_on_global_test=false"])
  assert extra == {"local_models": "htfe_cpu_img", "client_max_examples": 0,
                   "fedproto.weight": 3.0, "eval_clients_on_global_test": False}
  assert isinstance(extra["fedproto.weight"], float)
  for bad, field in [("nosuch=1", "nosuch"), ("num_rounds=ten", "num_rounds"),
                     ("batch_size", "--set"), ("dirichlet_cap=maybe", "dirichlet_cap")]:
    with pytest.raises(experiments.ConfigError) as error:
      experiments.parse_settings([bad])
    assert field in str(error.value)
  seen = []

  def capture(config, workdir):
    seen.append(config)
    raise KeyboardInterrupt   # stop before training

  monkeypatch.setattr(experiments.train, "run", capture)
  with pytest.raises(KeyboardInterrupt):
    experiments.run_experiment("htfl", tmp_path, False, only=["cifar10-fedproto"],
                               extra={"client_max_examples": 0, "fedproto.weight": 3.0})
  assert seen[0].client_max_examples == 0 and seen[0].fedproto.weight == 3.0
  assert seen[0].dataset == "cifar10" and seen[0].feature_dim == 512   # the run's own settings


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


# --seeds: tables across seeds and paired differences, from fabricated run folders (the
# numbers are made up; the code under test only reads config.json and summary.json).
SEEDS = (0, 1, 2, 3, 4)
LOCAL_A = (0.81, 0.84, 0.79, 0.86, 0.83)
LOCAL_B = (0.78, 0.82, 0.78, 0.83, 0.80)
GLOBAL_A = (0.70, 0.72, 0.69, 0.75, 0.71)
GLOBAL_B = (0.71, 0.70, 0.72, 0.73, 0.69)


def replica_summary(local, global_=None, seeds=SEEDS):
  """A multi-replica summary.json as train.run writes it (no sweep: one point)."""
  from fml_jax import stats  # pylint: disable=g-import-not-at-top
  global_ = global_ or [None] * len(local)
  finals = [{"round": 3, "local_test_acc_mean": l, "local_test_acc_min": l - 0.1,
             "global_test_acc": g, "bytes_up_total": 2e6, "bytes_down_total": 1e6}
            for l, g in zip(local, global_)]
  replicas = [{"replica": i, "seed": s, "sweep": {}, "final": f, "best_global_test_acc": g,
               "best_local_test_acc_mean": f["local_test_acc_mean"]}
              for i, (s, f, g) in enumerate(zip(seeds, finals, global_))]
  point = {"sweep": {}, "seeds": list(seeds), "replicas": list(range(len(seeds))),
           "final": {k: stats.interval([f[k] for f in finals]) for k in finals[0]},
           "best_global_test_acc": stats.interval(global_),
           "best_local_test_acc_mean": stats.interval(local)}
  return {"num_rounds": 3, "total_seconds": 42.0, "replicas": replicas, "points": [point],
          "final": {k: v["mean"] for k, v in point["final"].items()},
          "best_global_test_acc": point["best_global_test_acc"]["mean"],
          "best_local_test_acc_mean": point["best_local_test_acc_mean"]["mean"]}


def run_config(**overrides):
  import json  # pylint: disable=g-import-not-at-top
  config = experiments.make_config(overrides, "")
  return dict(json.loads(json.dumps(config.to_dict())), seeds=len(SEEDS), sweep="")


def scipy_paired(a, b):
  """The paired t interval straight from scipy (no fml_jax code)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  d = np.subtract(a, b)
  ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  return d.mean(), d.std(ddof=1), ci.low, ci.high


def test_paired_difference_pairs_replicas_by_seed():
  a = replica_summary(LOCAL_A, GLOBAL_A)
  b = replica_summary(LOCAL_B, GLOBAL_B)
  b["replicas"].reverse()   # pairing goes by seed, not by position
  pair = experiments.paired_difference(a, b, "local_test_acc_mean")
  mean, std, low, high = scipy_paired(LOCAL_A, LOCAL_B)
  assert pair["seeds"] == list(SEEDS)
  assert pair["mean_a"] == pytest.approx(0.826) and pair["mean_b"] == pytest.approx(0.802)
  d = pair["difference"]
  assert d["n"] == 5 and d["mean"] == pytest.approx(0.024) and mean == pytest.approx(0.024)
  assert d["std"] == pytest.approx(std) and d["low"] == pytest.approx(low)
  assert d["high"] == pytest.approx(high)
  assert (d["low"], d["high"]) == pytest.approx((0.0128942196, 0.0351057804))
  assert experiments.verdict(d) == "A better"
  global_pair = experiments.paired_difference(a, b, "global_test_acc")["difference"]
  _, _, low, high = scipy_paired(GLOBAL_A, GLOBAL_B)
  assert (global_pair["low"], global_pair["high"]) == pytest.approx((low, high))
  assert experiments.verdict(global_pair) == "undecided"   # -0.0246..0.0326 holds 0


def test_paired_difference_uses_the_seeds_both_runs_have_the_metric_for():
  a = replica_summary(LOCAL_A, GLOBAL_A)
  a["replicas"][1]["final"]["global_test_acc"] = None   # seed 1: no global accuracy in A
  b = replica_summary(LOCAL_B, GLOBAL_B)
  b["replicas"][3]["final"]["global_test_acc"] = float("nan")   # seed 3 diverged in B
  pair = experiments.paired_difference(a, b, "global_test_acc")
  keep = [0, 2, 4]
  mean, std, low, high = scipy_paired([GLOBAL_A[i] for i in keep], [GLOBAL_B[i] for i in keep])
  assert pair["seeds"] == keep and pair["difference"]["n"] == 3
  assert pair["mean_a"] == pytest.approx((0.70 + 0.69 + 0.71) / 3)
  assert pair["mean_b"] == pytest.approx((0.71 + 0.72 + 0.69) / 3)
  assert (pair["difference"]["mean"], pair["difference"]["std"]) == pytest.approx((mean, std))
  assert (pair["difference"]["low"], pair["difference"]["high"]) == pytest.approx((low, high))
  # No global model in B at all (local-only): nothing to pair.
  assert experiments.paired_difference(a, replica_summary(LOCAL_B), "global_test_acc") is None


def test_verdict_needs_an_interval_that_excludes_zero():
  def interval(mean, low, high, n=5):
    return {"mean": mean, "std": 0.01, "low": low, "high": high, "n": n}
  assert experiments.verdict(interval(0.02, 0.001, 0.04)) == "A better"
  assert experiments.verdict(interval(-0.02, -0.04, -0.001)) == "B better"
  assert experiments.verdict(interval(0.01, -0.001, 0.02)) == "undecided"
  assert experiments.verdict(interval(0.0, 0.0, 0.02)) == "undecided"   # touches 0
  assert experiments.verdict(interval(0.02, 0.02, 0.02, n=1)) == "undecided"   # one seed


def test_runs_pair_when_they_differ_only_in_the_algorithm_and_its_settings():
  fml = run_config(algorithm="fml")
  differs = experiments.differs_only_in_algorithm
  assert differs(fml, run_config(algorithm="fedprox", fedprox__mu=0.1))
  assert differs(fml, run_config(algorithm="fml", fml__alpha=0.3))   # a section only
  assert differs(fml, run_config(algorithm="fml", server__optimizer="adam"))
  assert differs(fml, run_config(algorithm="fml", aggregation="weighted"))
  assert not differs(fml, run_config(algorithm="fedavg", learning_rate=0.05))
  assert not differs(fml, run_config(algorithm="fedavg", seed=5))
  assert not differs(fml, dict(run_config(algorithm="fedavg"), seeds=3))
  assert not differs(fml, run_config(algorithm="fml"))   # the same run: nothing to compare
  assert not differs(fml, run_config(algorithm="fml", data_dir="/elsewhere"))
  assert differs(fml, run_config(algorithm="fedavg", data_dir="/elsewhere", checkpoint_every=0))
  assert experiments.outputs.flat_fields({"a": 1, "fml": {"alpha": 0.5, "beta": {"x": 2}}}) == {
      "a": 1, "fml.alpha": 0.5, "fml.beta.x": 2}


def fabricated_runs():
  """(name, config.json, summary.json) in an experiment's order."""
  other_seeds = tuple(s + 10 for s in SEEDS)
  return [
      ("fml", run_config(algorithm="fml"), replica_summary(LOCAL_A, GLOBAL_A)),
      ("fedavg", run_config(algorithm="fedavg"), replica_summary(LOCAL_B, GLOBAL_B)),
      ("fml-lr", run_config(algorithm="fml", learning_rate=0.05),
       replica_summary(LOCAL_B, GLOBAL_B)),
      ("local", run_config(algorithm="local"), replica_summary(LOCAL_B)),
      # Stands for a run whose summary holds other seeds (never paired with the rest).
      ("fedprox", run_config(algorithm="fedprox"),
       replica_summary(LOCAL_B, GLOBAL_B, seeds=other_seeds)),
  ]


def test_paired_rows_cover_every_two_runs_that_differ_only_in_the_algorithm():
  rows = experiments.paired_rows(fabricated_runs())
  assert [(r["run_a"], r["run_b"], r["metric"], r["verdict"]) for r in rows] == [
      ("fml", "fedavg", "local_test_acc_mean", "A better"),
      ("fml", "fedavg", "global_test_acc", "undecided"),
      ("fml", "local", "local_test_acc_mean", "A better"),   # local has no global model
      ("fedavg", "local", "local_test_acc_mean", "undecided"),   # identical numbers
  ]
  assert rows[3]["difference"] == {"mean": 0.0, "std": 0.0, "low": 0.0, "high": 0.0, "n": 5}
  # A single-replica run (no "replicas") pairs with nothing.
  single = {"final": {"local_test_acc_mean": 0.8}, "num_rounds": 3}
  assert experiments.paired_rows([("a", run_config(algorithm="fml"), single),
                                  ("b", run_config(algorithm="fedavg"), single)]) == []


def write_fabricated(folder, runs):
  import json  # pylint: disable=g-import-not-at-top
  for name, config, summary in runs:
    (folder / name).mkdir(parents=True)
    (folder / name / "config.json").write_text(json.dumps(config))
    (folder / name / "summary.json").write_text(json.dumps(summary))


def test_tables_show_the_spread_across_seeds_and_the_paired_differences(tmp_path):
  runs = fabricated_runs()
  write_fabricated(tmp_path, runs)
  table = experiments.write_tables(tmp_path, [name for name, _, _ in runs], seeds=5)
  fml_row = table.read_text().splitlines()[2]
  # LOCAL_A: mean 0.826, sample std 0.02702; GLOBAL_A: mean 0.714, std 0.02302.
  assert fml_row == ("| fml (5 seeds) | 3 | 0.7140 +- 0.0230 | 0.7140 +- 0.0230 | "
                     "0.8260 +- 0.0270 | 0.7260 +- 0.0270 | n/a | 3.0 | 42 |")
  assert "| local (5 seeds) | 3 | n/a | n/a | 0.8020 +- 0.0228 |" in table.read_text()
  paired = (tmp_path / "paired.md").read_text()
  assert ("| fml | fedavg | local_test_acc_mean | 0.8260 | 0.8020 | +0.0240 | "
          "+0.0129..+0.0351 (n=5) | A better |") in paired
  assert ("| fml | fedavg | global_test_acc | 0.7140 | 0.7100 | +0.0040 | "
          "-0.0246..+0.0326 (n=5) | undecided |") in paired
  assert len([l for l in paired.splitlines() if l.startswith("| ") and "---" not in l]) == 5


def test_paired_md_explains_itself_without_a_table(tmp_path):
  assert "need --seeds >= 2" in experiments.paired_markdown([], seeds=1)
  assert "No two finished runs" in experiments.paired_markdown([], seeds=3)
  single = {"final": {"global_test_acc": 0.7, "local_test_acc_mean": 0.8,
                      "local_test_acc_min": 0.6}, "num_rounds": 3, "total_seconds": 5.0,
            "best_global_test_acc": 0.72}
  write_fabricated(tmp_path, [("fml", run_config(algorithm="fml"), single),
                              ("fedavg", run_config(algorithm="fedavg"), single)])
  table = experiments.write_tables(tmp_path, ["fml", "fedavg"], seeds=1)
  assert table.read_text().splitlines()[2] == \
      "| fml | 3 | 0.7000 | 0.7200 | 0.8000 | 0.6000 | n/a | 0.0 | 5 |"   # as before --seeds
  assert "need --seeds >= 2" in (tmp_path / "paired.md").read_text()


def test_seeds_reach_every_run_and_one_seed_changes_no_config():
  assert experiments.seeds_overrides(1) == {}
  assert experiments.seeds_overrides(5) == {"seeds": 5}
  with pytest.raises(SystemExit):
    experiments.main(["dom", "--seeds", "0"])


def test_fedmd_collaboration_gain_is_paired_by_seed(tmp_path):
  # Each seed's last round minus its own round 0 (after transfer learning), with the
  # Student-t interval of the three differences, computed here by hand.
  run = tmp_path / "fedmd-run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  rows = [(0, 0, 0.50), (0, 1, 0.40), (0, 2, 0.60), (1, 0, 0.55), (1, 1, 0.48),
          (1, 2, 0.62), (2, 0, 0.61), (2, 1, 0.52), (2, 2, 0.66)]
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r, "replica": i, "seed": 10 + i, "client_global_test_acc_mean": v})
      + "\n" for r, i, v in rows))
  gain = experiments.collaboration_gain(run)
  differences = np.array([0.61 - 0.50, 0.52 - 0.40, 0.66 - 0.60])
  half = 4.302652729911275 * differences.std(ddof=1) / np.sqrt(3)   # t(0.975, 2 df)
  assert gain["seeds"] == [10, 11, 12] and gain["round"] == 2
  np.testing.assert_allclose([gain["gain"]["mean"], gain["gain"]["low"], gain["gain"]["high"]],
                             [differences.mean(), differences.mean() - half,
                              differences.mean() + half], rtol=1e-9)
  assert gain["alone"]["mean"] == pytest.approx(0.5)
  experiments._fedmd_party_table(tmp_path, ["fedmd-run"])   # no bounds.json: the gain alone
  text = (tmp_path / "bounds.md").read_text()
  assert "0.5000 (round 0" in text and "collaboration helps" in text
  # One seed cannot decide: no gain is reported.
  (run / "metrics.jsonl").write_text(json.dumps(
      {"round": 0, "replica": 0, "seed": 0, "client_global_test_acc_mean": 0.5}) + "\n")
  assert experiments.collaboration_gain(run) is None

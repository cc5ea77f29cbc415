"""`fml_jax.plot` on runs of several replicas (seeds, a sweep): the mean over each sweep
point's replicas in a band of one standard deviation, from fabricated run folders."""

import json

import numpy as np
import pytest

from fml_jax import plot

# Replica r of sweep point p (learning_rate LRS[p]) at round k: fabricated numbers with a
# different spread per point and round, so a wrong grouping or ddof shows.
LRS = (0.01, 0.05)
SEEDS = (7, 8, 9)
ROUNDS = (2, 4)


def local_acc(point, seed, k):
  return 0.5 + 0.1 * point + 0.02 * k + 0.01 * (seed - 7) ** 2 * (1 + point)


def global_acc(point, seed, k):
  return 0.4 + 0.1 * point + 0.03 * k - 0.015 * (seed - 7) * k


def bytes_up(point, seed, k):
  return 1000 * k + 10 * seed + point   # slightly different per replica: x is their mean


def replica_records():
  records = []
  for k in ROUNDS:   # written round by round, as one program of all replicas writes them
    for p, lr in enumerate(LRS):
      for s, seed in enumerate(SEEDS):
        records.append({
            "round": k, "replica": p * len(SEEDS) + s, "seed": seed,
            "sweep": {"learning_rate": lr},
            # Seed 9 has no global accuracy at round 2: left out of that round's band.
            "global_test_acc": None if (seed == 9 and k == 2) else global_acc(p, seed, k),
            "local_test_acc_mean": local_acc(p, seed, k),
            "bytes_up_total": bytes_up(p, seed, k), "bytes_down_total": 500 * k})
  return records


def write_run(folder, config, records):
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(folder)


@pytest.fixture
def runs(tmp_path):
  swept = write_run(tmp_path / "swept", {"algorithm": "fml", "seed": 7, "seeds": 3,
                                         "sweep": "learning_rate=0.01,0.05"},
                    replica_records())
  single = write_run(tmp_path / "single", {"algorithm": "local", "seed": 7},
                     [{"round": k, "global_test_acc": None, "local_test_acc_mean": 0.3 + 0.1 * k,
                       "bytes_up_total": 0, "bytes_down_total": 0} for k in ROUNDS])
  return swept, single


def expected(fn, point, rounds=ROUNDS, seeds_at=lambda k: SEEDS):
  values = [[fn(point, seed, k) for seed in seeds_at(k)] for k in rounds]
  return [np.mean(v) for v in values], [np.std(v, ddof=1) for v in values]


def test_bands_are_mean_and_sample_std_over_each_points_replicas():
  bands = plot.replica_bands(replica_records(), "local_test_acc_mean")
  assert list(bands) == ["learning_rate=0.01", "learning_rate=0.05"]
  for p, label in enumerate(bands):
    rounds, mean, std = bands[label]
    want_mean, want_std = expected(local_acc, p)
    assert rounds == [2, 4]
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(std, want_std, rtol=1e-12)
  # Spot check one number by hand: point 1, round 4, seeds 7, 8, 9 -> 0.68, 0.70, 0.76.
  assert bands["learning_rate=0.05"][1][1] == pytest.approx(np.mean([0.68, 0.70, 0.76]))
  assert bands["learning_rate=0.05"][2][1] == pytest.approx(0.0416333199893, rel=1e-9)


def test_a_missing_value_leaves_that_replica_out_of_that_round():
  rounds, mean, std = plot.replica_bands(replica_records(), "global_test_acc")["learning_rate=0.01"]
  want_mean, want_std = expected(global_acc, 0,
                                 seeds_at=lambda k: (7, 8) if k == 2 else SEEDS)
  assert rounds == [2, 4]
  np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
  np.testing.assert_allclose(std, want_std, rtol=1e-12)
  # A key no record has gives no band at all (the plot then falls back, as for one run).
  assert plot.replica_bands(replica_records(), "client_global_test_acc_mean") == {}


def test_one_record_per_replica_and_round_counts_once():
  records = replica_records()
  # A resumed run wrote replica 0's round 4 again, with another value: the last one counts.
  records.append(dict(records[-6], local_test_acc_mean=0.0))
  mean = plot.replica_bands(records, "local_test_acc_mean")["learning_rate=0.01"][1]
  assert mean[1] == pytest.approx(np.mean([0.0, local_acc(0, 8, 4), local_acc(0, 9, 4)]))


def test_figure_draws_each_point_as_a_band_and_a_single_run_as_before(runs):
  fig = plot.draw_runs(list(runs))
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [
      "fml, learning_rate=0.01 (3 seeds)", "fml, learning_rate=0.05 (3 seeds)",
      "local (no bytes sent)"]
  (top_rounds, top_bytes), (local_rounds, local_bytes) = fig.axes[0:2], fig.axes[2:4]
  for p in range(len(LRS)):
    want_mean, want_std = expected(local_acc, p)
    line = local_rounds.get_lines()[p]
    np.testing.assert_allclose(line.get_xdata(), ROUNDS)
    np.testing.assert_allclose(line.get_ydata(), want_mean, rtol=1e-12)
    # fill_between's polygon: at each round, from mean - std up to mean + std.
    vertices = local_rounds.collections[p].get_paths()[0].vertices
    for k, m, s in zip(ROUNDS, want_mean, want_std):
      ys = vertices[np.isclose(vertices[:, 0], k), 1]
      assert ys.min() == pytest.approx(m - s) and ys.max() == pytest.approx(m + s)
    # Against bytes, each round sits at its replicas' mean bytes (up + down).
    want_bytes = [np.mean([bytes_up(p, s, k) + 500 * k for s in SEEDS]) for k in ROUNDS]
    np.testing.assert_allclose(local_bytes.get_lines()[p].get_xdata(), want_bytes)
    np.testing.assert_allclose(
        top_rounds.get_lines()[p].get_ydata(),
        expected(global_acc, p, seeds_at=lambda k: (7, 8) if k == 2 else SEEDS)[0])
  # The single-replica run: its own numbers, no band; nothing against bytes (it sends none).
  single = local_rounds.get_lines()[2]
  np.testing.assert_allclose(single.get_ydata(), [0.5, 0.7])
  assert len(local_rounds.collections) == 2 and len(local_bytes.get_lines()[2].get_xdata()) == 0
  assert len(top_rounds.get_lines()) == 2 and len(top_bytes.collections) == 2


def test_without_a_global_model_the_clients_models_are_dashed_bands(tmp_path):
  records = [dict(r, global_test_acc=None, client_global_test_acc_mean=r["local_test_acc_mean"] / 2)
             for r in replica_records()]
  fig = plot.draw_runs([write_run(tmp_path / "fedmd", {"algorithm": "fedmd"}, records)])
  lines = fig.axes[0].get_lines()
  assert [l.get_linestyle() for l in lines] == ["--", "--"]
  np.testing.assert_allclose(lines[0].get_ydata(), np.array(expected(local_acc, 0)[0]) / 2)


def test_up_to_twenty_lines_never_share_a_color(tmp_path):
  """The default cycle has 10 colors; HtFLlib's experiment draws 13 runs."""
  folders = [write_run(tmp_path / f"run{i}", {"algorithm": "local", "seed": i},
                       [{"round": k, "local_test_acc_mean": 0.1 * i + 0.01 * k} for k in ROUNDS])
             for i in range(13)]
  lines = plot.draw_runs(folders).axes[2].get_lines()
  assert len(lines) == 13 and len({l.get_color() for l in lines}) == 13


def test_plot_of_replica_runs_writes_a_png(runs, tmp_path):
  out = plot.plot_runs(list(runs), str(tmp_path / "figs" / "replicas.png"), title="t")
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
  assert not list(out.parent.glob(".*tmp*"))


def test_sweep_label_keeps_the_sweeps_order():
  assert plot.sweep_label({"learning_rate": 0.05, "fml.alpha": 0.3}) == \
      "learning_rate=0.05, fml.alpha=0.3"
  assert plot.sweep_label({}) == ""


def test_point_labels_name_the_settings_and_the_seeds():
  assert plot.point_label("fml", "learning_rate=0.05", 5) == "fml, learning_rate=0.05 (5 seeds)"
  assert plot.point_label("local", "", 1, sends_nothing=True) == "local (1 seed, no bytes sent)"

r"""Plots runs side by side: accuracy against rounds and against bytes communicated.

  python -m fml_jax.plot /tmp/fml_dom /tmp/local_dom --out /tmp/dom.png

Each WORKDIR is a run's folder (`metrics.jsonl` and `config.json`). The figure has
two rows: the global model's test accuracy and the mean personalized accuracy,
against rounds (left) and against the total bytes sent up and down (right). Runs
that have no global model (local, FedMD, FedH2L) are left out of the global panels;
with FedMD/FedH2L the global panels show each client's model on the whole test set
instead, dashed. Each run's legend is its algorithm plus the config fields in which
the runs differ. Headless (matplotlib's object API, no pyplot).

A run of several replicas (`--config.seeds`, `--config.sweep`: its metrics records
carry `replica`, `seed` and `sweep`) shows each sweep point as the mean over its
replicas per round, in a band of mean +- one standard deviation across them (on the
bytes axis, at the replicas' mean bytes); the legend adds the point's settings and
`(n seeds)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fml_jax import stats
from fml_jax.errors import UserError

# Config fields that never tell runs apart in a legend. `seeds` and `sweep` are told by
# each sweep point's own label ("learning_rate=0.05 (5 seeds)") instead.
IGNORED_FIELDS = {"algorithm", "data_dir", "checkpoint_every", "checkpoints_to_keep",
                  "eval_every", "strategy", "chunk_size", "mesh_shape", "seeds", "sweep"}
# A band's opacity: light enough that overlapping runs stay readable.
BAND_ALPHA = 0.2


def load_run(workdir: str) -> tuple[dict, list[dict]]:
  path = Path(workdir)
  metrics, config = path / "metrics.jsonl", path / "config.json"
  if not metrics.exists() or not config.exists():
    raise UserError(f"{workdir} is not a run folder (it needs metrics.jsonl and "
                    "config.json, written by fml_jax.main)")
  records = []
  for line in metrics.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue   # a torn last line of a run still being written
  if not records:
    raise UserError(f"{metrics} has no evaluated rounds yet")
  return json.loads(config.read_text()), records


def legend_labels(configs: list[dict]) -> list[str]:
  """'fml', or 'fml, local_models=mlp,cnn' when the runs differ in that field."""
  fields = sorted({k for c in configs for k in c} - IGNORED_FIELDS)
  differing = [f for f in fields if len({json.dumps(c.get(f)) for c in configs}) > 1]
  labels = []
  for c in configs:
    parts = [str(c.get("algorithm", "?"))] + [f"{f}={c.get(f)}" for f in differing]
    labels.append(", ".join(parts))
  return labels


def _series(records, x_key, y_key):
  points = [(r.get(x_key), r.get(y_key)) for r in records]
  points = [(x, y) for x, y in points if x is not None and y is not None]
  return [p[0] for p in points], [p[1] for p in points]


def has_replicas(records: list[dict]) -> bool:
  """Whether the records come from a run of several replicas (seeds or a sweep)."""
  return any("replica" in r for r in records)


def sweep_label(sweep: dict) -> str:
  """'learning_rate=0.05, fml.alpha=0.3' in the sweep's own order; '' without a sweep."""
  return ", ".join(f"{k}={v}" for k, v in sweep.items())


def _by_point(records: list[dict], y_key: str) -> dict[str, dict[int, dict[int, float]]]:
  """{sweep label: {round: {replica: value}}}, points in replica order. Keyed by replica,
  so a record written twice for one round (a resumed run) counts once: the last wins."""
  points = {}
  for r in sorted(records, key=lambda r: r["replica"]):
    by_round = points.setdefault(sweep_label(r.get("sweep") or {}), {})
    if r.get(y_key) is not None:
      by_round.setdefault(r["round"], {})[r["replica"]] = r[y_key]
  return points


def replica_seeds(records: list[dict]) -> dict[str, int]:
  """{sweep label: how many replicas (seeds) the point has}, in replica order."""
  seen = {}
  for r in sorted(records, key=lambda r: r["replica"]):
    seen.setdefault(sweep_label(r.get("sweep") or {}), set()).add(r["replica"])
  return {label: len(replicas) for label, replicas in seen.items()}


def replica_bands(records: list[dict], y_key: str) -> dict[str, tuple]:
  """{sweep label: (rounds, mean, std)} of `y_key` across each sweep point's replicas,
  per round (`fml_jax.stats.interval`: the sample std, 0 with one replica). A replica
  without the value at a round (null, or a run still being written) is left out of
  that round; points with the value at no round are left out."""
  bands = {}
  for label, by_round in _by_point(records, y_key).items():
    summaries = {k: stats.interval(list(v.values())) for k, v in sorted(by_round.items())}
    rounds = [k for k, s in summaries.items() if s["n"]]   # n = 0: only NaNs that round
    if rounds:
      bands[label] = (rounds, np.array([summaries[k]["mean"] for k in rounds]),
                      np.array([summaries[k]["std"] for k in rounds]))
  return bands


def _band_series(records: list[dict], x_key: str, y_key: str) -> dict[str, tuple]:
  """`replica_bands` against `x_key`: rounds as they are, any other key (bytes) as its
  mean over the point's replicas at each round; rounds without an x are dropped."""
  bands = replica_bands(records, y_key)
  if x_key == "round":
    return bands
  x_bands = replica_bands(records, x_key)
  series = {}
  for label, (rounds, mean, std) in bands.items():
    x_rounds, x_mean, _ = x_bands.get(label, ([], [], []))
    x_at = dict(zip(x_rounds, x_mean))
    keep = [i for i, k in enumerate(rounds) if k in x_at]
    if keep:
      series[label] = ([x_at[rounds[i]] for i in keep], mean[keep], std[keep])
  return series


def _plot_band(ax, xs, mean, std, style, color, label) -> None:
  ax.plot(xs, mean, style, marker=".", color=color, label=label)
  # The band has no label: the legend shows the line once.
  ax.fill_between(xs, mean - std, mean + std, color=color, alpha=BAND_ALPHA, linewidth=0)


def point_label(run_label: str, sweep: str, seeds: int, sends_nothing: bool = False) -> str:
  """'fml, learning_rate=0.05 (5 seeds)': a sweep point's legend entry."""
  notes = [f"{seeds} seed{'s' if seeds != 1 else ''}"]
  if sends_nothing:
    notes.append("no bytes sent")
  return f"{run_label}{', ' + sweep if sweep else ''} ({', '.join(notes)})"


def draw_runs(workdirs: list[str], title: str = "", labels=None):
  """The figure of `plot_runs`, not yet written (a matplotlib `Figure`): for a notebook,
  or to read back what was drawn. Uses matplotlib's object API (no pyplot), so it needs
  no display and leaves a notebook's backend alone."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure   # pylint: disable=g-import-not-at-top

  runs = [load_run(w) for w in workdirs]
  if labels is not None and len(labels) != len(runs):
    raise UserError(f"{len(labels)} labels for {len(runs)} runs")
  labels = list(labels) if labels is not None else legend_labels([c for c, _ in runs])
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  num_lines = sum(len(replica_seeds(r)) if has_replicas(r) else 1 for _, r in runs)
  if num_lines > len(colors):   # more lines than the default cycle's 10: no color twice
    colors = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
  fig = Figure(figsize=(12, 8))
  axes = fig.subplots(2, 2, squeeze=False)
  lines = 0   # one color per line (a run, or a sweep point of one) in every panel
  for (_, records), label in zip(runs, labels):
    for r in records:
      total = (r["bytes_up_total"] + r["bytes_down_total"] if "bytes_up_total" in r else None)
      # A log axis has no 0: runs that send nothing (local) appear against rounds only.
      r["bytes_total"] = total if total else None
    sends_nothing = all(r["bytes_total"] is None for r in records)
    if has_replicas(records):
      points = replica_seeds(records)
      _plot_replicas(axes, records,
                     {p: point_label(label, p, n, sends_nothing) for p, n in points.items()},
                     {p: colors[(lines + i) % len(colors)] for i, p in enumerate(points)})
      lines += len(points)
    else:
      _plot_single(axes, records, label + (" (no bytes sent)" if sends_nothing else ""),
                   colors[lines % len(colors)])
      lines += 1
  for row, what in enumerate(("global test accuracy\n(dashed: clients' own models)",
                              "mean personalized accuracy")):
    for col, x_label in enumerate(("round", "bytes communicated (up + down)")):
      ax = axes[row][col]
      ax.set_xlabel(x_label)
      ax.set_ylabel(what)
      ax.grid(alpha=0.3)
      if col == 1:
        ax.set_xscale("log")
  handles, names = axes[1][0].get_legend_handles_labels()
  fig.legend(handles, names, loc="lower center", ncol=1, fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.025 * len(names) + 0.01, 1, 1))
  return fig


def plot_runs(workdirs: list[str], out: str, title: str = "", labels=None) -> Path:
  """Writes the figure to `out` (PNG) and returns its path; `labels` name the runs in
  the legend (default: `legend_labels` of their configs)."""
  fig = draw_runs(workdirs, title, labels)
  out_path = Path(out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name("." + out_path.name + ".tmp.png")
  fig.savefig(tmp, dpi=110)
  tmp.replace(out_path)   # never a half-written figure under the real name
  return out_path


def _plot_single(axes, records: list[dict], label: str, color: str) -> None:
  """A run of one replica: its own curves, as metrics.jsonl has them."""
  for col, x_key in enumerate(("round", "bytes_total")):
    xs, ys = _series(records, x_key, "global_test_acc")
    style = "-"
    if not ys:   # no global model: each client's own model on the global test set
      xs, ys = _series(records, x_key, "client_global_test_acc_mean")
      style = "--"
    if ys:
      axes[0][col].plot(xs, ys, style, marker=".", color=color, label=label)
    xs, ys = _series(records, x_key, "local_test_acc_mean")
    axes[1][col].plot(xs, ys, marker=".", color=color, label=label)


def _plot_replicas(axes, records: list[dict], labels: dict[str, str],
                   colors: dict[str, str]) -> None:
  """A multi-replica run's sweep points as bands, in the same panels and styles as a
  single run (dashed: the clients' own models, when there is no global model)."""
  for col, x_key in enumerate(("round", "bytes_total")):
    global_bands = _band_series(records, x_key, "global_test_acc")
    style = "-"
    if not global_bands:
      global_bands = _band_series(records, x_key, "client_global_test_acc_mean")
      style = "--"
    for point, (xs, mean, std) in global_bands.items():
      _plot_band(axes[0][col], xs, mean, std, style, colors[point], labels[point])
    for point, (xs, mean, std) in _band_series(records, x_key, "local_test_acc_mean").items():
      _plot_band(axes[1][col], xs, mean, std, "-", colors[point], labels[point])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m fml_jax.plot", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run folders (--workdir of fml_jax.main)")
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--title", default="")
  parser.add_argument("--labels", default="", help="comma-separated legend names, one per run")
  args = parser.parse_args(argv)
  labels = [l.strip() for l in args.labels.split(",")] if args.labels else None
  try:
    path = plot_runs(args.workdirs, args.out, args.title, labels)
  except UserError as e:
    print(f"fml_jax.plot: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  main()

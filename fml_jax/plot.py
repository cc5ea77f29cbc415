r"""Plots runs side by side: accuracy against rounds and against bytes communicated.

  python -m fml_jax.plot /tmp/fml_dom /tmp/local_dom --out /tmp/dom.png

Each WORKDIR is a run's folder (`metrics.jsonl` and `config.json`). The figure has
two rows: the global model's test accuracy and the mean personalized accuracy,
against rounds (left) and against the total bytes sent up and down (right). Runs
that have no global model (local, FedMD, FedH2L) are left out of the global panels;
with FedMD/FedH2L the global panels show each client's model on the whole test set
instead, dashed. Each run's legend is its algorithm plus the config fields in which
the runs differ. Headless (matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fml_jax.errors import UserError

# Config fields that never tell runs apart in a legend.
IGNORED_FIELDS = {"algorithm", "data_dir", "checkpoint_every", "checkpoints_to_keep",
                  "eval_every", "strategy", "chunk_size", "mesh_shape"}


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


def plot_runs(workdirs: list[str], out: str, title: str = "", labels=None) -> Path:
  """Writes the figure to `out` (PNG) and returns its path; `labels` name the runs in
  the legend (default: `legend_labels` of their configs). Uses matplotlib's object API
  (no pyplot), so it needs no display and leaves a notebook's backend alone."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure   # pylint: disable=g-import-not-at-top

  runs = [load_run(w) for w in workdirs]
  if labels is not None and len(labels) != len(runs):
    raise UserError(f"{len(labels)} labels for {len(runs)} runs")
  labels = list(labels) if labels is not None else legend_labels([c for c, _ in runs])
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig = Figure(figsize=(12, 8))
  axes = fig.subplots(2, 2, squeeze=False)
  for i, ((config, records), label) in enumerate(zip(runs, labels)):
    color = colors[i % len(colors)]   # one color per run in every panel
    for r in records:
      total = (r["bytes_up_total"] + r["bytes_down_total"] if "bytes_up_total" in r else None)
      # A log axis has no 0: runs that send nothing (local) appear against rounds only.
      r["bytes_total"] = total if total else None
    if all(r["bytes_total"] is None for r in records):
      label += " (no bytes sent)"
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
  out_path = Path(out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name("." + out_path.name + ".tmp.png")
  fig.savefig(tmp, dpi=110)
  tmp.replace(out_path)   # never a half-written figure under the real name
  return out_path


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

r"""The experiments of experiments/RESULTS.md: each a named set of runs, a table and a figure.

  TFDS_DATA_DIR=../shared/tfds python experiments/run.py baselines --out /tmp/experiments
  TFDS_DATA_DIR=../shared/tfds python experiments/run.py dom --quick --out /tmp/exp_quick

Experiments (`python experiments/run.py --list` prints them with their runs):

  baselines     FML vs FedAvg vs FedProx vs local-only on MNIST and CIFAR-10, IID and
                non-IID (2 shards per client, Dirichlet 0.1 and 0.5)
  dom           FML under model heterogeneity, objective heterogeneity, a catfish, and the
                official dynamic alpha/beta schedule, each against local-only / constant
  fedmd         FedMD: each party with collaboration vs without, vs pooled; per-party gain
  fedmr         FedMR vs FedAvg vs FedProx under Dirichlet 0.1 / 0.5 / 1.0
  distillation  FedH2L vs FML vs FedMD with heterogeneous architectures: accuracy on the
                global test distribution and bytes communicated

Every run is a normal `fml_jax.train.run` in OUT/EXPERIMENT/RUN (a finished run is
reused, so an interrupted experiment continues where it stopped). Afterwards
OUT/EXPERIMENT/table.md holds one row per finished run in the folder (final and best
accuracies, bytes, seconds; runs made by earlier `--only` batches included) and
OUT/EXPERIMENT/EXPERIMENT.png their curves (`fml_jax.plot`).

`--quick` runs one representative run of each experiment at a size that takes
seconds (few clients, rounds and examples; MNIST and MLPs only): what CI runs so
the scripts cannot rot. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fml_jax import plot, settings, train  # noqa: E402  pylint: disable=g-import-not-at-top
from fml_jax.configs import default  # noqa: E402  pylint: disable=g-import-not-at-top

# Shared by every run of an experiment unless a run overrides it.
MNIST = dict(dataset="mnist", num_clients=10, clients_per_round=10, local_epochs=1,
             batch_size=32, eval_every=5, checkpoint_every=0)
CIFAR = dict(MNIST, dataset="cifar10", model="lenet5", local_models="")
PARTITIONS = {"iid": dict(partition="iid"),
              "shards2": dict(partition="shards", shards_per_client=2),
              "dir0.1": dict(partition="dirichlet", dirichlet_alpha=0.1),
              "dir0.5": dict(partition="dirichlet", dirichlet_alpha=0.5)}
FEDMD_SMALL = ",".join(f"fedmd_small_p{i}" for i in range(10))


def _baselines():
  runs = {}
  for data_name, data in (("mnist", dict(MNIST, num_rounds=30)),
                          ("cifar10", dict(CIFAR, num_rounds=30))):
    for part_name, part in PARTITIONS.items():
      for algorithm in ("fml", "fedavg", "fedprox", "local"):
        runs[f"{data_name}-{part_name}-{algorithm}"] = dict(data, **part, algorithm=algorithm)
  return runs


def _dom():
  base = dict(MNIST, partition="dirichlet", dirichlet_alpha=0.1, client_max_examples=100,
              local_models="mlp_small,mlp,lenet5", num_rounds=50, eval_every=10,
              eval_clients_on_global_test=True)
  return {
      "models-fml": dict(base, algorithm="fml"),
      "models-local": dict(base, algorithm="local"),
      "tasks-fml": dict(base, algorithm="fml", client_tasks="full,parity"),
      "tasks-local": dict(base, algorithm="local", client_tasks="full,parity"),
      "catfish-fml": dict(base, algorithm="fml", local_models="mlp", catfish_clients="0",
                          catfish_model="lenet5"),
      "homogeneous-fml": dict(base, algorithm="fml", local_models="mlp"),
      "balance-official": dict(base, algorithm="fml", fml__beta=0.1, fml__alpha_schedule="official",
                               fml__beta_schedule="official", fml__lr_schedule="official"),
      "balance-constant": dict(base, algorithm="fml", fml__beta=0.1),
  }


def _fedmd():
  from fml_jax.configs import fedmd   # pylint: disable=g-import-not-at-top
  # The official protocol (configs/fedmd.py) at a size a 2-core CPU runs in about half
  # an hour: 1/8-width parties, 3,000 public images, alignment 1,000, 8 rounds.
  base = dict(fedmd.get_config().to_dict(), local_models=FEDMD_SMALL, public_size=3000,
              fedmd__alignment_size=1000, fedmd__public_epochs=3, fedmd__private_epochs=10,
              num_rounds=8, checkpoint_every=0)
  return {"fedmd-small-family": base}


def _fedmr():
  runs = {}
  for alpha in (0.1, 0.5, 1.0):
    for algorithm in ("fedmr", "fedavg", "fedprox"):
      runs[f"dir{alpha}-{algorithm}"] = dict(
          MNIST, model="lenet5", num_clients=100, clients_per_round=10, local_epochs=5,
          batch_size=50, learning_rate=0.01, momentum=0.5, weight_decay=0.0,
          partition="dirichlet", dirichlet_alpha=alpha, num_rounds=50, eval_every=5,
          algorithm=algorithm)
  return runs


def _distillation():
  base = dict(MNIST, partition="dirichlet", dirichlet_alpha=0.1, client_max_examples=300,
              local_models="mlp_small,mlp,lenet5", public_size=500, num_rounds=20,
              local_epochs=2, eval_clients_on_global_test=True)
  return {
      "fedh2l": dict(base, algorithm="fedh2l"),
      "fml": dict(base, algorithm="fml"),
      "fedmd": dict(base, algorithm="fedmd", optimizer="adam", learning_rate=1e-3,
                    momentum=0.0, weight_decay=0.0, fedmd__alignment_size=500,
                    fedmd__public_epochs=5, fedmd__private_epochs=5, fedmd__report_bounds=False),
      "local": dict(base, algorithm="local"),
  }


EXPERIMENTS = {"baselines": _baselines, "dom": _dom, "fedmd": _fedmd, "fedmr": _fedmr,
               "distillation": _distillation}

# --quick: the same runs, shrunk to seconds each (MNIST only).
QUICK = dict(num_clients=4, clients_per_round=4, num_rounds=2, eval_every=1, local_epochs=1,
             client_max_examples=40, public_size=0, fedmd__public_epochs=1,
             fedmd__private_epochs=1, fedmd__alignment_size=64, fedmd__digest_batch_size=32)


# --quick runs one run per experiment that stands for the rest (the features of the
# others have their own unit tests); enough to keep the script, tables and figures alive.
QUICK_RUNS = {"baselines": ("mnist-dir0.1-fml",),
              "dom": ("tasks-fml",),
              "fedmd": ("fedmd-small-family",),
              "fedmr": ("dir0.5-fedmr",),
              "distillation": ("fedh2l",)}


def quick(overrides: dict) -> dict:
  o = dict(overrides, **QUICK)
  if o.get("dataset") == "cifar10":
    o.update(dataset="mnist", model="mlp")
  if o.get("algorithm") in ("fedmd", "fedh2l"):
    o["public_size"] = 100
  if o.get("local_models"):
    o["local_models"] = ",".join(n if not n.startswith(("fedmd", "lenet5")) else "mlp_small"
                                 for n in o["local_models"].split(","))
  if o.get("model") == "lenet5":
    o["model"] = "mlp"
  if o.get("catfish_model") == "lenet5":
    o["catfish_model"] = "mlp_small"
  return o


def make_config(overrides: dict, data_dir: str):
  c = default.get_config()
  settings.apply_overrides(c, overrides)
  if data_dir:
    c.data_dir = data_dir
  return c


def table_row(name: str, summary: dict) -> str:
  final = summary["final"]

  def f(v):
    return "n/a" if v is None else f"{v:.4f}"
  client_global = final.get("client_global_test_acc_mean")
  bytes_total = final.get("bytes_up_total", 0) + final.get("bytes_down_total", 0)
  return (f"| {name} | {summary['num_rounds']} | {f(final['global_test_acc'])} | "
          f"{f(summary['best_global_test_acc'])} | {f(final['local_test_acc_mean'])} | "
          f"{f(final['local_test_acc_min'])} | {f(client_global)} | {bytes_total / 1e6:.1f} | "
          f"{summary['total_seconds']:.0f} |")


TABLE_HEADER = ("| run | rounds | global acc | best global | personalized mean | personalized min "
                "| clients' models on global test | MB sent (up+down) | seconds |\n"
                "|---|---|---|---|---|---|---|---|---|")


def run_experiment(name: str, out: Path, is_quick: bool, data_dir: str = "",
                   only: list[str] | None = None) -> Path:
  runs = EXPERIMENTS[name]()
  if is_quick:
    runs = {k: v for k, v in runs.items() if k in QUICK_RUNS[name]}
  if only:
    runs = {k: v for k, v in runs.items() if k in only}
  folder = out / name
  for run_name, overrides in runs.items():
    overrides = quick(overrides) if is_quick else overrides
    workdir = folder / run_name
    t0 = time.perf_counter()
    summary = train.run(make_config(overrides, data_dir), str(workdir))
    print(f"[{name}] {run_name}: personalized {summary['final']['local_test_acc_mean']:.4f}, "
          f"global {summary['final']['global_test_acc']} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
  # The table and figure cover every finished run of the experiment in the folder, so
  # runs made in several `--only` batches end up in one table, in the experiment's order.
  finished = [r for r in EXPERIMENTS[name]() if (folder / r / "summary.json").exists()]
  rows = [table_row(r, json.loads((folder / r / "summary.json").read_text())) for r in finished]
  table = folder / "table.md"
  table.write_text(f"{TABLE_HEADER}\n" + "\n".join(rows) + "\n")
  plot.plot_runs([str(folder / r) for r in finished], str(folder / f"{name}.png"), title=name,
                 labels=finished)
  if name == "fedmd":
    _fedmd_party_table(folder, finished)
  return table


def _fedmd_party_table(folder: Path, runs: list[str]) -> None:
  """Per-party accuracy (each party's model on the whole private test set) without
  collaboration, after the last round, and pooled."""
  lines = []
  for run_name in runs:
    bounds = folder / run_name / "bounds.json"
    if not bounds.exists():
      continue
    b = json.loads(bounds.read_text())
    summary = json.loads((folder / run_name / "summary.json").read_text())
    alone = b["no_collaboration"]["client_global_test_acc_mean"]
    final = summary["final"]["client_global_test_acc_mean"]
    pooled = b["pooled"]["client_global_test_acc_mean"]
    lines.append(f"| {run_name}: mean over parties | {alone:.4f} | {final:.4f} | {pooled:.4f} | "
                 f"{final - alone:+.4f} |")
    per_party = zip(b["no_collaboration"].get("client_global_test_acc", []),
                    summary["final"].get("client_global_test_acc", []),
                    b["pooled"].get("client_global_test_acc", []))
    for party, (a, f, p) in enumerate(per_party):
      lines.append(f"| party {party} | {a:.4f} | {f:.4f} | {p:.4f} | {f - a:+.4f} |")
  if lines:
    (folder / "bounds.md").write_text(
        "| run | no collaboration | FedMD (last round) | pooled | gain |\n|---|---|---|---|---|\n"
        + "\n".join(lines) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("experiments", nargs="*", help=f"any of {', '.join(EXPERIMENTS)}")
  parser.add_argument("--out", default="/tmp/fml_experiments")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
  parser.add_argument("--data_dir", default="", help="tfds data_dir (default $TFDS_DATA_DIR)")
  parser.add_argument("--only", default="", help="comma-separated run names to run")
  parser.add_argument("--list", action="store_true", help="list experiments and runs")
  args = parser.parse_args(argv)
  if args.list or not args.experiments:
    for name, make in EXPERIMENTS.items():
      print(f"{name}: {', '.join(make())}")
    return
  unknown = [e for e in args.experiments if e not in EXPERIMENTS]
  if unknown:
    parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
  only = [r.strip() for r in args.only.split(",") if r.strip()]
  for name in args.experiments:
    table = run_experiment(name, Path(args.out), args.quick, args.data_dir, only)
    print(table.read_text())


if __name__ == "__main__":
  main()

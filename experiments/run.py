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
  federations   dropouts and stragglers for FedAvg, FedProx, SCAFFOLD and FML; DP-FedAvg at
                three noise levels; FML's local models against Ditto, FedRep and local-only
  distillation  FedH2L vs FML vs FedMD with heterogeneous architectures: accuracy on the
                global test distribution and bytes communicated
  official      the authors' regimes (configs/fml_official.py, fedmr_official.py), cut
                to a CPU's size: FML vs FedAvg on MNIST and CIFAR-10, FedMR vs FedAvg
  htfl          HtFLlib's benchmark protocol at a CPU's size: every heterogeneous-model
                algorithm (FedDistill, LG-FedAvg, FedProto, FedGH, FedTGP, FedKD,
                FedGen, FML, FedMD, FedH2L, local-only)
                on one model family, MNIST and CIFAR-10

Every run is a normal `fml_jax.train.run` in OUT/EXPERIMENT/RUN (a finished run is
reused, so an interrupted experiment continues where it stopped). Afterwards
OUT/EXPERIMENT/table.md holds one row per finished run in the folder (final and best
accuracies, bytes, seconds; runs made by earlier `--only` batches included) and
OUT/EXPERIMENT/EXPERIMENT.png their curves (`fml_jax.plot`).

`--seeds N` runs every run as N independent federations (seeds seed..seed+N-1, one
program: `--config.seeds`): the table shows each final metric as mean +- std across
the seeds, the figure their mean in a band of one std, and OUT/EXPERIMENT/paired.md
compares every two finished runs that differ only in the algorithm and its settings
(the sections in ALGORITHM_FIELDS) seed by seed: the paired difference A - B of the
final accuracies, its 95% Student-t interval, and which run is better when that
interval excludes 0. Replica seed s of one run and of the other draw the same random
numbers wherever the two algorithms draw alike, so pairing by seed takes out the spread
they share and decides with fewer seeds than comparing the two runs' own intervals.

`--set FIELD=VALUE` (repeatable) changes a setting in every run of the experiment, e.g.
the CNN family of `htfl` on an accelerator; give it a fresh --out, since a run folder
refuses a config other than its own.

`--quick` runs one representative run of each experiment at a size that takes
seconds (few clients, rounds and examples; MNIST and MLPs only): what CI runs so
the scripts cannot rot. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fml_jax import algorithms, outputs, plot, settings  # noqa: E402  pylint: disable=g-import-not-at-top
from fml_jax import stats, train  # noqa: E402  pylint: disable=g-import-not-at-top
from fml_jax.configs import default  # noqa: E402  pylint: disable=g-import-not-at-top
from fml_jax.errors import ConfigError  # noqa: E402  pylint: disable=g-import-not-at-top

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


def _federations():
  """Realistic federations on Dirichlet(0.1) MNIST, 20 clients (10 per round) with at
  most 300 examples each, plain SGD (SCAFFOLD's option II assumes it; the others get the
  same, so runs pair): dropouts, stragglers, DP-FedAvg, and personalization."""
  base = dict(MNIST, partition="dirichlet", dirichlet_alpha=0.1, num_clients=20,
              clients_per_round=10, client_max_examples=300, num_rounds=30, eval_every=5,
              momentum=0.0, weight_decay=0.0, learning_rate=0.05)
  runs = {}
  for rate in (0.0, 0.3, 0.6):
    for algorithm in ("fedavg", "fedprox", "scaffold", "fml"):
      runs[f"dropout{rate}-{algorithm}"] = dict(base, algorithm=algorithm, dropout_rate=rate)
  for algorithm in ("fedavg", "fedprox", "scaffold", "fml"):   # partial work aggregated
    runs[f"stragglers0.5-{algorithm}"] = dict(base, algorithm=algorithm, straggler_rate=0.5)
  # FedProx's paper: FedAvg drops its stragglers.
  runs["stragglers0.5-fedavg-drop"] = dict(base, algorithm="fedavg", straggler_rate=0.5,
                                           straggler_policy="drop")
  for z in (0.3, 1.0, 3.0):
    runs[f"dp-z{z}-fedavg"] = dict(base, algorithm="fedavg", aggregation="uniform",
                                   dp_clip=0.5, dp_noise_multiplier=z)
  for algorithm in ("ditto", "fedrep", "local"):   # against dropout0.0-fml's local models
    runs[f"personal-{algorithm}"] = dict(base, algorithm=algorithm)
  return runs


def _official():
  """The authors' own regimes, each algorithm against FedAvg in the same regime, cut to
  what a 2-core CPU runs with 3 seeds in about an hour (the cuts: each client's data,
  the rounds; the full regimes are configs/fml_official.py and configs/fedmr_official.py
  as they are, for an accelerator). The learning-rate steps of fml_official follow the
  rounds run (x0.1 every num_rounds // 3)."""
  from fml_jax.configs import fedmr_official, fml_official   # pylint: disable=g-import-not-at-top
  fml = dict(fml_official.get_config().to_dict(), client_max_examples=1000, num_rounds=20,
             eval_every=5, checkpoint_every=0)
  fedmr = dict(fedmr_official.get_config().to_dict(), num_rounds=20, eval_every=5,
               checkpoint_every=0)
  runs = {}
  for dataset, rounds in (("mnist", 20), ("cifar10", 10)):
    for algorithm in ("fml", "fedavg"):
      runs[f"fml-{dataset}-{algorithm}"] = dict(fml, dataset=dataset, num_rounds=rounds,
                                                algorithm=algorithm)
  for algorithm in ("fedmr", "fedavg"):
    runs[f"fedmr-cifar10-{algorithm}"] = dict(fedmr, algorithm=algorithm)
  return runs


def _htfl():
  """HtFLlib's protocol (ALGORITHMS.md, "Shared HtFLlib mechanics"; total.sh): 20
  clients, all of them every round, Dirichlet 0.1, batch 10, plain SGD 0.01, one local
  epoch, split models with feature_dim 512, a model family round-robin. The CPU cuts:
  each client capped at 500 training examples, 30 rounds (HtFLlib: up to 2000), the MLP
  family `htfe_cpu_vec` (HtFLlib: HtFE-img-8's CNN and ResNets; `htfe_cpu_img` here on an
  accelerator); our test splits come from the test set under the same partition, where
  HtFLlib cuts 75/25 from each client's data. 500 training examples are held out as the
  public / seed set of FedMD and FedH2L in every run, so all runs train on the same data
  and pair by seed. FML's meme is the family's `mlp`. The CNN family on an accelerator,
  every client's data: `--set local_models=htfe_cpu_img --set client_max_examples=0`."""
  base = dict(partition="dirichlet", dirichlet_alpha=0.1, num_clients=20, clients_per_round=20,
              client_max_examples=500, batch_size=10, optimizer="sgd", learning_rate=0.01,
              momentum=0.0, weight_decay=0.0, local_epochs=1, num_rounds=30, eval_every=10,
              checkpoint_every=0, feature_dim=512, model="mlp", local_models="htfe_cpu_vec",
              public_size=500, eval_clients_on_global_test=True)
  algorithms_settings = {
      "feddistill": {}, "lgfedavg": {}, "fedproto": {}, "fedgh": {}, "fedtgp": {},
      # FedKD and FedGen as their authors' code runs them (the defaults), and as HtFLlib
      # does: FedKD truncating the mentee's parameters instead of its change, FedGen
      # sending the initial generator every round (HtFLlib never keeps the trained one).
      "fedkd": {}, "fedkd_htfllib": dict(algorithm="fedkd", fedkd__compress="parameters"),
      "fedgen": {}, "fedgen_htfllib": dict(algorithm="fedgen", fedgen__keep_generator=False),
      "fml": {},
      "fedmd": dict(fedmd__public_epochs=1, fedmd__private_epochs=1, fedmd__alignment_size=500,
                    fedmd__report_bounds=False),
      "fedh2l": {}, "local": {}}
  runs = {}
  for dataset in ("mnist", "cifar10"):
    for label, extra in algorithms_settings.items():
      runs[f"{dataset}-{label}"] = dict(base, dataset=dataset, **{"algorithm": label, **extra})
  return runs


EXPERIMENTS = {"baselines": _baselines, "dom": _dom, "fedmd": _fedmd, "fedmr": _fedmr,
               "distillation": _distillation, "federations": _federations, "official": _official,
               "htfl": _htfl}

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
              "distillation": ("fedh2l",),
              "federations": ("dropout0.3-scaffold",),
              "official": ("fml-mnist-fml",),
              "htfl": ("mnist-fedproto",)}


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


def seeds_overrides(seeds: int) -> dict:
  """The overrides that make every run `seeds` replicas. One seed is the default, so it
  adds nothing: run folders made before --seeds keep an identical config.json and are
  reused."""
  return {"seeds": seeds} if seeds != 1 else {}


def parse_settings(pairs: list[str]) -> dict:
  """`--set field=value` pairs as overrides, each value read as its field's type in the
  default config (booleans: true / false). Names the field and what it takes."""
  base = default.get_config()
  overrides = {}
  for pair in pairs:
    field, sep, text = pair.partition("=")
    if not sep:
      raise ConfigError("--set", f"'{pair}' is not field=value")
    if not settings.has(base, field):
      raise ConfigError(field, "no such setting (fml_jax/configs/default.py lists them)")
    current = settings.get(base, field)
    try:
      if isinstance(current, bool):
        value = {"true": True, "false": False}[text.lower()]
      else:
        value = type(current)(text)
    except (KeyError, ValueError):
      raise ConfigError(field, f"'{text}' is not a {type(current).__name__}") from None
    overrides[field] = value
  return overrides


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


def _spread(summary: dict | None) -> str:
  """'0.8123 +- 0.0040' (mean +- std across seeds) of a `fml_jax.stats.interval`."""
  if not summary or not summary["n"]:
    return "n/a"
  if summary["n"] == 1:
    return f"{summary['mean']:.4f}"
  return f"{summary['mean']:.4f} +- {summary['std']:.4f}"


def point_row(name: str, summary: dict, point: dict) -> str:
  """`table_row` of one sweep point of a multi-replica run: each cell across its seeds."""
  final = point["final"]
  bytes_total = sum((final.get(k) or {}).get("mean") or 0
                    for k in ("bytes_up_total", "bytes_down_total"))
  sweep = plot.sweep_label(point["sweep"])
  label = f"{name}{', ' + sweep if sweep else ''} ({len(point['seeds'])} seeds)"
  cells = [_spread(final.get("global_test_acc")), _spread(point["best_global_test_acc"]),
           _spread(final.get("local_test_acc_mean")), _spread(final.get("local_test_acc_min")),
           _spread(final.get("client_global_test_acc_mean"))]
  return (f"| {label} | {summary['num_rounds']} | {' | '.join(cells)} | "
          f"{bytes_total / 1e6:.1f} | {summary['total_seconds']:.0f} |")


def table_rows(name: str, summary: dict) -> list[str]:
  """One row per sweep point of a multi-replica run (one without a sweep), else
  `table_row`."""
  if "points" not in summary:
    return [table_row(name, summary)]
  return [point_row(name, summary, point) for point in summary["points"]]


TABLE_HEADER = ("| run | rounds | global acc | best global | personalized mean | personalized min "
                "| clients' models on global test | MB sent (up+down) | seconds |\n"
                "|---|---|---|---|---|---|---|---|---|")


def run_experiment(name: str, out: Path, is_quick: bool, data_dir: str = "",
                   only: list[str] | None = None, seeds: int = 1,
                   extra: dict | None = None) -> Path:
  """Runs experiment `name` into out/name; `extra` overrides (`--set`) apply to every
  run, after the experiment's own settings."""
  runs = EXPERIMENTS[name]()
  if is_quick:
    runs = {k: v for k, v in runs.items() if k in QUICK_RUNS[name]}
  if only:
    runs = {k: v for k, v in runs.items() if k in only}
  folder = out / name
  for run_name, overrides in runs.items():
    overrides = dict(quick(overrides) if is_quick else overrides, **seeds_overrides(seeds),
                     **(extra or {}))
    workdir = folder / run_name
    t0 = time.perf_counter()
    summary = train.run(make_config(overrides, data_dir), str(workdir))
    print(f"[{name}] {run_name}: personalized {summary['final']['local_test_acc_mean']:.4f}, "
          f"global {summary['final']['global_test_acc']} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
  # The table and figure cover every finished run of the experiment in the folder, so
  # runs made in several `--only` batches end up in one table, in the experiment's order.
  finished = [r for r in EXPERIMENTS[name]() if (folder / r / "summary.json").exists()]
  table = write_tables(folder, finished, seeds)
  plot.plot_runs([str(folder / r) for r in finished], str(folder / f"{name}.png"), title=name,
                 labels=finished)
  if name == "fedmd":
    _fedmd_party_table(folder, finished)
  return table


# What says which algorithm runs and how it is tuned: two runs that differ in nothing
# else ran the same federations (data, partition, models, seeds), so their replicas
# pair by seed.
ALGORITHM_FIELDS = frozenset({"algorithm", "aggregation", "server", *algorithms.section_defaults()})
# Where a run keeps its files: never a difference between two runs' results.
BOOKKEEPING_FIELDS = frozenset({"data_dir", "checkpoint_every", "checkpoints_to_keep"})
PAIRED_METRICS = ("local_test_acc_mean", "global_test_acc", "client_global_test_acc_mean")


def differs_only_in_algorithm(config_a: dict, config_b: dict) -> bool:
  """Whether two runs' configs differ, and only in ALGORITHM_FIELDS (bookkeeping aside)."""
  a, b = outputs.flat_fields(config_a), outputs.flat_fields(config_b)
  missing = object()
  differing = {k.split(".")[0] for k in a.keys() | b.keys()
               if a.get(k, missing) != b.get(k, missing)} - BOOKKEEPING_FIELDS
  return bool(differing) and differing <= ALGORITHM_FIELDS


def replica_finals(summary: dict, metric: str) -> dict[int, float]:
  """{seed: that replica's final `metric`} of a multi-replica summary, finite values
  only; {} for a single-replica summary (it has no "replicas")."""
  values = {r["seed"]: r["final"].get(metric) for r in summary.get("replicas", [])}
  return {seed: v for seed, v in values.items() if v is not None and math.isfinite(v)}


def paired_difference(summary_a: dict, summary_b: dict, metric: str) -> dict | None:
  """The final `metric` of A and B paired by seed, over the seeds where both have it:
  {"seeds", "mean_a", "mean_b", "difference": `stats.interval` of A - B per seed};
  None when no seed has it in both."""
  a, b = replica_finals(summary_a, metric), replica_finals(summary_b, metric)
  seeds = sorted(a.keys() & b.keys())
  if not seeds:
    return None
  return {"seeds": seeds, "mean_a": sum(a[s] for s in seeds) / len(seeds),
          "mean_b": sum(b[s] for s in seeds) / len(seeds),
          "difference": stats.interval([a[s] - b[s] for s in seeds])}


def verdict(difference: dict) -> str:
  """'A better' / 'B better' when the interval of A - B excludes 0, else 'undecided'
  (always with one seed: its interval is a point and says nothing)."""
  if difference["n"] >= 2 and difference["low"] > 0:
    return "A better"
  if difference["n"] >= 2 and difference["high"] < 0:
    return "B better"
  return "undecided"


def pairable_seeds(summary: dict) -> list[int]:
  """The seeds of a multi-replica run without a sweep (one replica per seed); [] for a
  single-replica run or a sweep (several replicas per seed: no one pairing)."""
  if len(summary.get("points") or []) != 1:
    return []
  return sorted(r["seed"] for r in summary["replicas"])


def paired_rows(runs: list[tuple[str, dict, dict]]) -> list[dict]:
  """Every two of `runs` ((name, config.json, summary.json), in the experiment's order:
  A is the earlier) that differ only in the algorithm and ran the same seeds, for each
  of PAIRED_METRICS both have: {"run_a", "run_b", "metric", **paired_difference,
  "verdict"}."""
  rows = []
  for (name_a, config_a, summary_a), (name_b, config_b, summary_b) in itertools.combinations(
      runs, 2):
    if not pairable_seeds(summary_a) or pairable_seeds(summary_a) != pairable_seeds(summary_b):
      continue
    if not differs_only_in_algorithm(config_a, config_b):
      continue
    for metric in PAIRED_METRICS:
      pair = paired_difference(summary_a, summary_b, metric)
      if pair:
        rows.append({"run_a": name_a, "run_b": name_b, "metric": metric, **pair,
                     "verdict": verdict(pair["difference"])})
  return rows


PAIRED_HEADER = ("| run A | run B | metric | mean A | mean B | paired difference mean | 95% CI "
                 "| verdict |\n|---|---|---|---|---|---|---|---|")


def paired_markdown(rows: list[dict], seeds: int) -> str:
  """paired.md: the table of `paired_rows`, or why there is none."""
  if not rows and seeds < 2:
    return ("Paired differences need --seeds >= 2 (each run as several seeds); this "
            f"experiment ran with --seeds {seeds}.\n")
  if not rows:
    return ("No two finished runs of this experiment differ only in the algorithm (and its "
            "settings) with the same seeds.\n")
  lines = []
  for r in rows:
    d = r["difference"]
    lines.append(f"| {r['run_a']} | {r['run_b']} | {r['metric']} | {r['mean_a']:.4f} | "
                 f"{r['mean_b']:.4f} | {d['mean']:+.4f} | {d['low']:+.4f}..{d['high']:+.4f} "
                 f"(n={d['n']}) | {r['verdict']} |")
  return ("Final accuracy of run A minus run B, seed by seed over the seeds both ran, with "
          "the 95% Student-t interval of the mean difference; a verdict only when that "
          "interval excludes 0.\n\n"
          f"{PAIRED_HEADER}\n" + "\n".join(lines) + "\n")


def write_tables(folder: Path, runs: list[str], seeds: int) -> Path:
  """FOLDER/table.md (a row per run, or per sweep point of one) and FOLDER/paired.md
  (`paired_rows` of the runs) from the finished runs' files; returns table.md's path."""
  summaries = {r: json.loads((folder / r / "summary.json").read_text()) for r in runs}
  configs = {r: json.loads((folder / r / "config.json").read_text()) for r in runs}
  rows = [row for r in runs for row in table_rows(r, summaries[r])]
  table = folder / "table.md"
  table.write_text(f"{TABLE_HEADER}\n" + "\n".join(rows) + "\n")
  (folder / "paired.md").write_text(paired_markdown(
      paired_rows([(r, configs[r], summaries[r]) for r in runs]), seeds))
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
    # The bounds are computed for the run's first seed (replica 0): compare that replica.
    last = summary["replicas"][0]["final"] if "replicas" in summary else summary["final"]
    if "replicas" in summary:
      run_name = f"{run_name} (seed {summary['replicas'][0]['seed']})"
    alone = b["no_collaboration"]["client_global_test_acc_mean"]
    final = last["client_global_test_acc_mean"]
    pooled = b["pooled"]["client_global_test_acc_mean"]
    lines.append(f"| {run_name}: mean over parties | {alone:.4f} | {final:.4f} | {pooled:.4f} | "
                 f"{final - alone:+.4f} |")
    per_party = zip(b["no_collaboration"].get("client_global_test_acc", []),
                    last.get("client_global_test_acc", []),
                    b["pooled"].get("client_global_test_acc", []))
    for party, (a, f, p) in enumerate(per_party):
      lines.append(f"| party {party} | {a:.4f} | {f:.4f} | {p:.4f} | {f - a:+.4f} |")
  gains = [g for g in (collaboration_gain(folder / r) for r in runs) if g]
  if lines or gains:
    table = ("| run | no collaboration | FedMD (last round) | pooled | gain |\n|---|---|---|---|---|\n"
             + "\n".join(lines) + "\n") if lines else ""
    (folder / "bounds.md").write_text(table + "".join(
        f"\n{g['run']}: the parties' mean on the whole private test set went from "
        f"{g['alone']['mean']:.4f} (round 0, after transfer learning) to "
        f"{g['final']['mean']:.4f} (round {g['round']}); the paired gain over seeds "
        f"{g['seeds']}: {stats.describe(g['gain'])}: {GAIN_VERDICT[verdict(g['gain'])]}.\n"
        for g in gains))


GAIN_VERDICT = {"A better": "collaboration helps", "B better": "collaboration hurts",
                "undecided": "undecided"}


def collaboration_gain(run_folder: Path, metric: str = "client_global_test_acc_mean"):
  """FedMD's gain over no collaboration, seed by seed: each replica's `metric` after the
  last round minus its own at round 0 (after transfer learning, before any
  collaboration: the same parties, data and initial weights). None without replicas
  (one seed cannot decide) or before a round after 0 is logged."""
  if not (run_folder / "metrics.jsonl").exists():
    return None
  _, records = plot.load_run(str(run_folder))
  first, last = {}, {}
  for record in records:
    if "replica" not in record or record.get(metric) is None:
      continue
    seed = record.get("seed", record["replica"])
    if record["round"] == 0:
      first[seed] = record[metric]
    elif record["round"] >= last.get(seed, (0, None))[0]:
      last[seed] = (record["round"], record[metric])
  seeds = sorted(first.keys() & last.keys())
  if len(seeds) < 2:
    return None
  return {"run": run_folder.name, "seeds": seeds, "round": min(last[s][0] for s in seeds),
          "alone": stats.interval([first[s] for s in seeds]),
          "final": stats.interval([last[s][1] for s in seeds]),
          "gain": stats.interval([last[s][1] - first[s] for s in seeds])}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("experiments", nargs="*", help=f"any of {', '.join(EXPERIMENTS)}")
  parser.add_argument("--out", default="/tmp/fml_experiments")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
  parser.add_argument("--data_dir", default="", help="tfds data_dir (default $TFDS_DATA_DIR)")
  parser.add_argument("--only", default="", help="comma-separated run names to run")
  parser.add_argument("--list", action="store_true", help="list experiments and runs")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a setting for every run, e.g. --set local_models=htfe_cpu_img "
                           "(repeatable; use a fresh --out)")
  parser.add_argument("--seeds", type=int, default=1,
                      help="replicas (seeds) per run, in one program; >= 2 for paired.md")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds {args.seeds}: needs at least 1")
  if args.list or not args.experiments:
    for name, make in EXPERIMENTS.items():
      print(f"{name}: {', '.join(make())}")
    return
  unknown = [e for e in args.experiments if e not in EXPERIMENTS]
  if unknown:
    parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
  only = [r.strip() for r in args.only.split(",") if r.strip()]
  try:
    extra = parse_settings(args.set)
  except ConfigError as e:
    parser.error(str(e))
  for name in args.experiments:
    table = run_experiment(name, Path(args.out), args.quick, args.data_dir, only, args.seeds,
                           extra)
    print(table.read_text())
    print((table.parent / "paired.md").read_text())


if __name__ == "__main__":
  main()

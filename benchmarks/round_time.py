r"""Seconds per federated round, per execution strategy, side by side in one run.

  python benchmarks/round_time.py                 # default job + FML on MNIST (10 clients)
  python benchmarks/round_time.py --quick         # a few rounds of the default job only
  python benchmarks/round_time.py --out=/tmp/round_time.json
  python benchmarks/round_time.py --conv_forms    # the CPU convolution forms on and off

For each workload and strategy: the first round (which includes compiling) and the
median of the following rounds (training only: sampling, the clients' local
training and aggregation; no evaluation). Strategies of one workload run
interleaved, round by round, so a noisy shared machine slows them alike; the
ratio is what to compare across machines. Prints a markdown table, writes JSON.

`--conv_forms` times convnet jobs instead, each traced three ways and run interleaved
the same way: with the CPU convolution forms training uses (`fml_jax.conv`: im2col for
3x3 kernels over RGB, the space-to-depth grid for few channels), without im2col, and
with XLA's kernel alone; so what each form buys is read at the job level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top

from fml_jax import conv  # pylint: disable=g-import-not-at-top
from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
from fml_jax.configs import default, fml  # pylint: disable=g-import-not-at-top
from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top

STRATEGIES = ("sequential", "vmap")


def mnist_fml(model: str):
  c = fml.get_config()
  c.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  c.model = model
  return c


def workloads(quick: bool, with_cnn: bool):
  yield "default (synthetic, FML mlp, 10 of 30 clients)", default.get_config()
  if not quick:
    yield "fml.py (MNIST dirichlet 0.5, FML mlp, 10 of 10 clients)", mnist_fml("mlp")
    if with_cnn:
      yield "fml.py --config.model=cnn (MNIST, FML cnn, 10 of 10 clients)", mnist_fml("cnn")


# What `measure` compares: the execution strategies with the convolution forms training
# uses, or (`--conv_forms`) the forms fml_jax.conv.cpu_forms allows, under `auto`.
STRATEGY_VARIANTS = {s: {"strategy": s, "forms": {}} for s in STRATEGIES}
CONV_FORMS = {
    "as trained": {"strategy": "auto", "forms": dict(im2col=True, space_to_depth=True)},
    "no im2col": {"strategy": "auto", "forms": dict(im2col=False, space_to_depth=True)},
    "XLA's kernel only": {"strategy": "auto", "forms": dict(im2col=False, space_to_depth=False)}}


def conv_workloads(quick: bool):
  """The official FML regime on CIFAR-10 (its CNN as meme and local model, crop and
  flip), each client cut to 1,280 examples and one epoch so that a round takes
  seconds; and FedAvg with LeNet-5 on the same data."""
  from fml_jax.configs import fml_official  # pylint: disable=g-import-not-at-top

  def cut():
    c = fml_official.get_config()
    c.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
    c.client_max_examples, c.local_epochs, c.eval_every = 1280, 1, 0
    return c

  c = cut()
  if quick:   # tests: seconds in all (FedAvg compiles one model, not two)
    c.algorithm, c.client_max_examples, c.batch_size = "fedavg", 64, 32
  yield "fml_official.py, CIFAR-10 cut (FML, fml_cnn x2, 5 clients x 1,280)", c
  if not quick:
    f = cut()
    f.algorithm, f.model, f.batch_size = "fedavg", "lenet5", 64
    yield "FedAvg, CIFAR-10, LeNet-5 (5 clients x 1,280, batch 64)", f


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):  # Linux
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def measure(config, rounds: int, variants: dict | None = None) -> dict:
  """Rounds of one workload, one runner per variant, run interleaved round by round so
  a noisy shared machine slows them alike. A variant is {"strategy": the runner's
  strategy, "forms": `conv.cpu_forms` settings its round is traced under}."""
  variants = STRATEGY_VARIANTS if variants is None else variants
  data = load_federated_data(config)
  runners, states, times = {}, {}, {v: [] for v in variants}
  for name, variant in variants.items():
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    runners[name] = Runner(algorithm, data, config.clients_per_round, config.aggregation,
                           variant["strategy"])
    states[name] = runners[name].init(config.seed)
  for _ in range(rounds):
    for name, variant in variants.items():
      t0 = time.perf_counter()
      with conv.cpu_forms(**variant["forms"]):   # the first round traces and compiles
        states[name], report = runners[name].run_round(states[name])
      jax.block_until_ready((states[name], report))
      times[name].append(time.perf_counter() - t0)
  steps = int(jax.device_get(-(-data.train_n // config.batch_size)).sum())
  return {v: {"first_round_s": t[0], "median_round_s": statistics.median(t[1:]),
              "rounds_timed": len(t) - 1} for v, t in times.items()} | {
                  "client_steps_per_round_max": steps * config.local_epochs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="default job only, 4 rounds")
  parser.add_argument("--rounds", type=int, default=6, help="rounds per strategy (first is warm-up)")
  parser.add_argument("--cnn", action="store_true",
                      help="also FML with the CNN on MNIST (minutes per round on a 2-core CPU)")
  parser.add_argument("--conv_forms", action="store_true",
                      help="convnet jobs with fml_jax.conv's CPU forms on and off")
  parser.add_argument("--out", default="benchmarks/results/round_time.json")
  args = parser.parse_args()
  rounds = 4 if args.quick else args.rounds
  result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d"), "workloads": {}}
  print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['backend']}, jax {jax.__version__}\n")
  if args.conv_forms:
    jobs, variants, column, base = conv_workloads(args.quick), CONV_FORMS, "convolutions", \
        "XLA's kernel only"
  else:
    jobs, variants, column, base = workloads(args.quick, args.cnn), STRATEGY_VARIANTS, \
        "strategy", "sequential"
  print(f"| workload | {column} | first round (s, with compile) | median round (s) | "
        f"speed-up over {base} |")
  print("|---|---|---|---|---|")
  for name, config in jobs:
    r = measure(config, rounds, variants)
    result["workloads"][name] = r
    for v in variants:
      ratio = r[base]["median_round_s"] / r[v]["median_round_s"]
      print(f"| {name} | {v} | {r[v]['first_round_s']:.2f} | {r[v]['median_round_s']:.3f} | "
            f"{ratio:.2f}x |", flush=True)
  write(result, args.out)


def write(result: dict, out: str):
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  Path(out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()

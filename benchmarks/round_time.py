r"""Seconds per federated round, per execution strategy, side by side in one run.

  python benchmarks/round_time.py                 # default job + FML on MNIST (10 clients)
  python benchmarks/round_time.py --quick         # a few rounds of the default job only
  python benchmarks/round_time.py --out=/tmp/round_time.json

For each workload and strategy: the first round (which includes compiling) and the
median of the following rounds (training only: sampling, the clients' local
training and aggregation; no evaluation). Strategies of one workload run
interleaved, round by round, so a noisy shared machine slows them alike; the
ratio is what to compare across machines. Prints a markdown table, writes JSON.
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


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):  # Linux
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def measure(config, rounds: int) -> dict:
  data = load_federated_data(config)
  runners, states, times = {}, {}, {s: [] for s in STRATEGIES}
  for strategy in STRATEGIES:
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    runners[strategy] = Runner(algorithm, data, config.clients_per_round, config.aggregation,
                               strategy)
    states[strategy] = runners[strategy].init(config.seed)
  for _ in range(rounds):
    for strategy in STRATEGIES:   # interleaved: both see the same machine load
      t0 = time.perf_counter()
      states[strategy], report = runners[strategy].run_round(states[strategy])
      jax.block_until_ready((states[strategy], report))
      times[strategy].append(time.perf_counter() - t0)
  steps = int(jax.device_get(-(-data.train_n // config.batch_size)).sum())
  return {s: {"first_round_s": t[0], "median_round_s": statistics.median(t[1:]),
              "rounds_timed": len(t) - 1} for s, t in times.items()} | {
                  "client_steps_per_round_max": steps * config.local_epochs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="default job only, 4 rounds")
  parser.add_argument("--rounds", type=int, default=6, help="rounds per strategy (first is warm-up)")
  parser.add_argument("--cnn", action="store_true",
                      help="also FML with the CNN on MNIST (minutes per round on a 2-core CPU)")
  parser.add_argument("--out", default="benchmarks/results/round_time.json")
  args = parser.parse_args()
  rounds = 4 if args.quick else args.rounds
  result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d"), "workloads": {}}
  print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['backend']}, jax {jax.__version__}\n")
  print("| workload | strategy | first round (s, with compile) | median round (s) | vs sequential |")
  print("|---|---|---|---|---|")
  for name, config in workloads(args.quick, args.cnn):
    r = measure(config, rounds)
    result["workloads"][name] = r
    for s in STRATEGIES:
      ratio = r["sequential"]["median_round_s"] / r[s]["median_round_s"]
      print(f"| {name} | {s} | {r[s]['first_round_s']:.2f} | {r[s]['median_round_s']:.3f} | "
            f"{ratio:.2f}x |", flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()

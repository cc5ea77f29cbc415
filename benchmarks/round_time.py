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


# The forms each `--conv_forms` variant allows (fml_jax.conv.cpu_forms).
CONV_FORMS = {"as trained": dict(im2col=True, space_to_depth=True),
              "no im2col": dict(im2col=False, space_to_depth=True),
              "XLA's kernel only": dict(im2col=False, space_to_depth=False)}


def conv_workloads(quick: bool):
  """The official FML regime on CIFAR-10 (its CNN as meme and local model, crop and
  flip), each client cut to 1,280 examples and one epoch so that a round takes
  seconds; and FedAvg with LeNet-5 on the same data."""
  from fml_jax.configs import fml_official  # pylint: disable=g-import-not-at-top
  c = fml_official.get_config()
  c.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  c.client_max_examples, c.local_epochs, c.eval_every = 1280, 1, 0
  if quick:   # tests: seconds in all (FedAvg compiles one model, not two)
    c.algorithm, c.client_max_examples, c.batch_size = "fedavg", 64, 32
  yield "fml_official.py, CIFAR-10 cut (FML, fml_cnn x2, 5 clients x 1,280)", c
  if not quick:
    f = fml_official.get_config()
    f.data_dir, f.algorithm, f.model, f.batch_size = c.data_dir, "fedavg", "lenet5", 64
    f.client_max_examples, f.local_epochs, f.eval_every = 1280, 1, 0
    yield "FedAvg, CIFAR-10, LeNet-5 (5 clients x 1,280, batch 64)", f


def measure_conv_forms(config, rounds: int) -> dict:
  """`measure`'s interleaved rounds, one runner per CONV_FORMS variant (what the
  runner's `auto` strategy picks), each traced inside its variant's forms."""
  data = load_federated_data(config)
  runners, states, times = {}, {}, {v: [] for v in CONV_FORMS}
  for variant in CONV_FORMS:
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    runners[variant] = Runner(algorithm, data, config.clients_per_round, config.aggregation)
    states[variant] = runners[variant].init(config.seed)
  for _ in range(rounds):
    for variant, forms in CONV_FORMS.items():
      t0 = time.perf_counter()
      with conv.cpu_forms(**forms):   # the first round traces and compiles
        states[variant], report = runners[variant].run_round(states[variant])
      jax.block_until_ready((states[variant], report))
      times[variant].append(time.perf_counter() - t0)
  return {v: {"first_round_s": t[0], "median_round_s": statistics.median(t[1:]),
              "rounds_timed": len(t) - 1} for v, t in times.items()}


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
    print("| workload | convolutions | first round (s, with compile) | median round (s) | "
          "speed-up over XLA's kernel only |")
    print("|---|---|---|---|---|")
    for name, config in conv_workloads(args.quick):
      r = measure_conv_forms(config, rounds)
      result["workloads"][name] = r
      for v in CONV_FORMS:
        ratio = r["XLA's kernel only"]["median_round_s"] / r[v]["median_round_s"]
        print(f"| {name} | {v} | {r[v]['first_round_s']:.2f} | {r[v]['median_round_s']:.3f} | "
              f"{ratio:.2f}x |", flush=True)
    write(result, args.out)
    return
  print("| workload | strategy | first round (s, with compile) | median round (s) | vs sequential |")
  print("|---|---|---|---|---|")
  for name, config in workloads(args.quick, args.cnn):
    r = measure(config, rounds)
    result["workloads"][name] = r
    for s in STRATEGIES:
      ratio = r["sequential"]["median_round_s"] / r[s]["median_round_s"]
      print(f"| {name} | {s} | {r[s]['first_round_s']:.2f} | {r[s]['median_round_s']:.3f} | "
            f"{ratio:.2f}x |", flush=True)
  write(result, args.out)


def write(result: dict, out: str):
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  Path(out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()

r"""Evaluation of per-client models: vmapped over the clients, or one model at a time.

  TFDS_DATA_DIR=../shared/tfds python benchmarks/evaluation.py   # MNIST: CNNs and MLPs
  python benchmarks/evaluation.py --quick                         # synthetic MLPs, seconds

Every evaluation scores each client's own model on its test split (FML's local models,
local-only, ...) and, for FedMD/FedH2L or with eval_clients_on_global_test, on the
whole test set. fml_jax/evaluation.py runs the clients of a chunk either vmapped (one
batched program: on XLA:CPU every convolution becomes a grouped convolution) or one
after another inside the same program (`lax.map`); on the CPU it picks one at a time.
This times both, alternating, and prints the median seconds per evaluation and the
ratio. Writes JSON; numbers and the machine: benchmarks/RESULTS.md ("Evaluation").
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

from fml_jax import evaluation, settings  # pylint: disable=g-import-not-at-top
from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
from fml_jax.configs import default  # pylint: disable=g-import-not-at-top
from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top

# name -> (config overrides, whether the models are scored on the whole test set)
CASES = {
    "fml_cnn x5, whole MNIST test set": (dict(
        dataset="mnist", partition="iid", num_clients=5, clients_per_round=5,
        model="fml_cnn", client_max_examples=2000), True),
    "lenet5 x100, own MNIST test splits": (dict(
        dataset="mnist", partition="dirichlet", num_clients=100, clients_per_round=10,
        local_models="lenet5"), False),
    "mlp x1000, own synthetic test splits": (dict(num_clients=1000, clients_per_round=10),
                                             False),
}
QUICK_CASES = {"mlp x50, own synthetic test splits": (dict(num_clients=50,
                                                           clients_per_round=5), False)}


def time_case(overrides: dict, on_global_test: bool, repeats: int) -> dict:
  config = settings.apply_overrides(default.get_config(), overrides)
  data = load_federated_data(config)
  algorithm = build_algorithm(config, data.num_classes, data.input_shape)
  state = Runner(algorithm, data, config.clients_per_round, config.aggregation,
                 "sequential").init(0)
  models = algorithm.personalized_models(state.server, state.population)
  run = lambda mode: evaluation.evaluate_all_personalized(models, data, on_global_test, mode)
  accuracies = {mode: run(mode) for mode in (False, True)}   # compiles, and agree?
  seconds = {False: [], True: []}
  for _ in range(repeats):   # alternating, so a noisy machine slows both alike
    for mode in (False, True):
      start = time.perf_counter()
      run(mode)
      seconds[mode].append(time.perf_counter() - start)
  vmap_s, one_s = (statistics.median(seconds[m]) for m in (False, True))
  return {"vmap_s": vmap_s, "one_at_a_time_s": one_s, "speedup": vmap_s / one_s,
          "max_accuracy_difference": float(abs(accuracies[False] - accuracies[True]).max()),
          "repeats": repeats}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="one synthetic case, seconds")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="/tmp/fml_jax_evaluation.json")
  args = parser.parse_args()
  cases = QUICK_CASES if args.quick else CASES
  results = {name: time_case(o, g, 2 if args.quick else args.repeats)
             for name, (o, g) in cases.items()}
  print("| models evaluated | vmapped (s) | one at a time (s) | speed-up |")
  print("|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['vmap_s']:.2f} | {r['one_at_a_time_s']:.2f} | {r['speedup']:.2f}x |")
  machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "backend": jax.default_backend(), "jax": jax.__version__}
  Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

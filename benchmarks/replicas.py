r"""Replicas: seconds per round for R federations in one program against R separate runs.

  python benchmarks/replicas.py                    # FML MLP on MNIST, 1, 4 and 16 replicas
  python benchmarks/replicas.py --quick            # a small synthetic job, 1 and 2 replicas
  python benchmarks/replicas.py --replicas=1,4,16 --rounds=5 --out=/tmp/replicas.json

For each replica count R it times, round by round and interleaved (so a noisy shared
machine slows them alike):

  separate       one replica, with the strategy a single run would pick (`auto`): R
                 separate runs cost R times its round (their compiles too, which this
                 does not count);
  separate_vmap  one replica with `strategy=vmap` (what vmap adds by itself);
  loop           R replicas, `replica_strategy=loop` (the round of each in turn, one
                 compile);
  vmap           R replicas, `replica_strategy=vmap` (one program with a replica axis;
                 the clients' round is vmapped too, `strategy=vmap`).

and prints the median seconds per round, per replica, and how many times faster per
replica than separate runs (above 1: replicas pay), and for vmap also than separate
vmapped runs (what the replica axis itself costs or saves). The first round (compiling) is
not in the median. Writes JSON. Numbers and the machine are in benchmarks/RESULTS.md
("Replicas").
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

from fml_jax.configs import default, fml  # pylint: disable=g-import-not-at-top
from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
from fml_jax.replicas import ReplicaSet  # pylint: disable=g-import-not-at-top

MODES = ("separate", "separate_vmap", "loop", "vmap")


def mnist_fml_mlp():
  """fml.py's job: FML on MNIST, Dirichlet 0.5, 10 of 10 clients, the MLP."""
  c = fml.get_config()
  c.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  c.model = "mlp"
  return c


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def replica_set(config, data, replicas: int, mode: str) -> ReplicaSet:
  c = config.copy_and_resolve_references()
  with c.unlocked():
    single = mode.startswith("separate")
    c.seeds = 1 if single else replicas
    c.replica_strategy = "loop" if single else mode
    if mode.endswith("vmap"):
      c.strategy = "vmap"
  return ReplicaSet(c, data)


def measure(config, replicas: int, rounds: int) -> dict:
  data = load_federated_data(config)
  sets = {mode: replica_set(config, data, replicas, mode) for mode in MODES}
  states = {mode: s.init() for mode, s in sets.items()}
  times = {mode: [] for mode in MODES}
  for _ in range(rounds + 1):   # the first round compiles
    for mode, s in sets.items():
      t0 = time.perf_counter()
      states[mode], reports = s.run_round(states[mode])
      jax.block_until_ready((states[mode], [r.all_finite for r in reports]))
      times[mode].append(time.perf_counter() - t0)
  out = {}
  for mode, t in times.items():
    median = statistics.median(t[1:])
    count = 1 if mode.startswith("separate") else replicas
    out[mode] = {"first_round_s": t[0], "median_round_s": median,
                 "per_replica_s": median / count, "rounds_timed": len(t) - 1,
                 "client_strategy": sets[mode].runner.strategy}
  for mode in ("loop", "vmap"):
    out[mode]["speedup_vs_separate"] = out["separate"]["per_replica_s"] / out[mode]["per_replica_s"]
  out["vmap"]["speedup_vs_separate_vmap"] = (out["separate_vmap"]["per_replica_s"]
                                             / out["vmap"]["per_replica_s"])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a small synthetic FML job (for the tests), 1 and 2 replicas, "
                           "2 rounds")
  parser.add_argument("--replicas", default="1,4,16")
  parser.add_argument("--rounds", type=int, default=4, help="timed rounds (after one to compile)")
  parser.add_argument("--out", default="benchmarks/results/replicas.json")
  args = parser.parse_args()
  if args.quick:   # the default job shrunk: the tests check the tables, not the times
    config = default.get_config()
    config.update(num_clients=8, clients_per_round=4, local_epochs=1,
                  synthetic_max_client_examples=200)
    name, counts, rounds = "quick (synthetic, FML mlp, 4 of 8 clients)", [1, 2], 2
  else:
    name, config = "fml.py (MNIST Dirichlet 0.5, FML mlp, 10 of 10 clients)", mnist_fml_mlp()
    counts, rounds = [int(n) for n in args.replicas.split(",")], args.rounds
  result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                        "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d"), "workload": name, "replicas": {}}
  print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['backend']}, jax {jax.__version__}; {name}\n")
  print("| replicas | mode | clients run by | first round (s) | median round (s) | "
        "per replica (s) | vs separate runs | vs separate vmapped runs |")
  print("|---|---|---|---|---|---|---|---|")
  for count in counts:
    r = measure(config, count, rounds)
    result["replicas"][str(count)] = r
    for mode in MODES:
      m = r[mode]
      speedup = f"{m['speedup_vs_separate']:.2f}x" if "speedup_vs_separate" in m else ""
      vs_vmap = f"{m['speedup_vs_separate_vmap']:.2f}x" if mode == "vmap" else ""
      print(f"| {count} | {mode} | {m['client_strategy']} | {m['first_round_s']:.2f} | "
            f"{m['median_round_s']:.3f} | {m['per_replica_s']:.3f} | {speedup} | {vs_vmap} |",
            flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()

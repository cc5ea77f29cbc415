r"""Client-count scaling of one FML step per client: every strategy, side by side with
the peers' way (a PyTorch loop over clients), in the same run.

  python benchmarks/client_scaling.py                 # mlp and cnn, cohorts 1 .. 4096
  python benchmarks/client_scaling.py --quick         # mlp, cohort 8 only (CI smoke test)
  python benchmarks/client_scaling.py --models=mlp --cohorts=1,64,4096,32768
  python benchmarks/client_scaling.py --models=mlp --cohorts=10,64 --steps=8 \
      --strategies=sequential,vmap,auto --torch_clients=0   # where vmap stops paying on a CPU

What is timed: a federated round in which each of `cohort` clients takes `--steps`
FML steps (default 1; meme and local model, batch 32, MNIST-shaped inputs):
sampling, gathering, the steps, scattering and averaging, as `Runner.run_round`
does it. One step per round measures the per-round overheads; `--steps=32` is
closer to real local training. The PyTorch
reference runs the same FML step (same architectures, losses and SGD settings) in
a Python loop over clients, forking the meme from the global model each time, as
the official FML code and PFLlib do; its throughput does not depend on the cohort,
so it is measured on min(cohort, --torch_clients) clients. Reported: client-steps/s,
examples/s, achieved GFLOP/s (XLA's cost analysis of the compiled round) and its
share of a float32 matmul peak measured in the same run (FLOPs: XLA's count
for one client's step, times the cohort), XLA's memory estimate for
the round, and each strategy's speed relative to the PyTorch loop. Sizes whose
memory estimate does not fit are skipped with a message. Writes JSON, a markdown
table and (with matplotlib) a log-log plot.

At each cohort size every strategy and the PyTorch loop are set up first and then
timed round-robin (one round of each in turn, --reps times; medians reported), so a
slow spell of a shared machine hits all of them alike. `auto` is the runner's own
rule, reported as the strategy it picks. The JSON and markdown are rewritten after
every cohort, marked incomplete until the last one.
"""

from __future__ import annotations

import argparse
import functools
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
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from fml_jax import preflight  # pylint: disable=g-import-not-at-top
from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
from fml_jax.configs import default  # pylint: disable=g-import-not-at-top
from fml_jax.data import from_client_lists  # pylint: disable=g-import-not-at-top
from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top

BATCH = 32
INPUT_SHAPE = (28, 28, 1)
STRATEGIES = ("sequential", "vmap", "chunked", "auto")


def fml_config(model: str, cohort: int, chunk_size: int):
  c = default.get_config()
  c.update(algorithm="fml", model=model, local_models="", num_clients=cohort,
           clients_per_round=cohort, local_epochs=1, batch_size=BATCH, optimizer="sgd",
           learning_rate=0.01, momentum=0.9, weight_decay=5e-4, chunk_size=chunk_size)
  return c


def benchmark_data(cohort: int, steps: int = 1, seed: int = 0):
  """MNIST-shaped random data, exactly `steps` full batches per client (one epoch is
  `steps` local steps for every client, none masked)."""
  rng = np.random.default_rng(seed)
  n = steps * BATCH
  x = rng.integers(0, 256, (cohort * n, *INPUT_SHAPE), dtype=np.uint8)
  y = rng.integers(0, 10, cohort * n).astype(np.int32)
  parts = [np.arange(i * n, (i + 1) * n) for i in range(cohort)]
  return from_client_lists(x, y, x[:BATCH], y[:BATCH], parts, [np.arange(BATCH)] * cohort, 10)


def matmul_peak_gflops(n: int = 4096, reps: int = 5, dtype=jnp.float32, precision=None) -> float:
  """GFLOP/s of one n x n matmul in `dtype` at `precision` (median of `reps` after a
  warm-up): the machine's reference peak for the tables' "% of matmul peak"."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(functools.partial(jnp.matmul, precision=precision))
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9


_PER_CLIENT_FLOPS = {}


def per_client_flops(model: str) -> float:
  """XLA's FLOP count of one client's FML step (cost analysis of the compiled single-client
  update). The GFLOP/s column uses it times the cohort for every strategy: the same useful
  work, and XLA counts a `lax.map` loop body only once, so a whole-round count would
  undercount `chunked`."""
  if model not in _PER_CLIENT_FLOPS:
    config = fml_config(model, 1, 1)
    runner = Runner(build_algorithm(config, 10, INPUT_SHAPE), benchmark_data(1), 1, "uniform",
                    "sequential")
    runner.compile(runner.abstract_state(0))
    _PER_CLIENT_FLOPS[model] = runner.compiled_flops
  return _PER_CLIENT_FLOPS[model]


def setup_jax(model: str, cohort: int, steps: int, strategy: str, chunk_size: int,
              reserved: int = 0):
  """An runner ready to time (compiled, warmed up), or {"skipped": why} when XLA's memory
  estimate does not fit in the free memory less `reserved` (runners already set up)."""
  config = fml_config(model, cohort, min(chunk_size, cohort))
  data = benchmark_data(cohort, steps)
  runner = Runner(build_algorithm(config, 10, INPUT_SHAPE), data, cohort, "uniform", strategy,
                  chunk_size=config.chunk_size)
  abstract = runner.abstract_state(0)
  estimate = preflight.estimate_memory(runner, abstract)
  available = preflight.available_memory()
  if available is not None and estimate.total + reserved > preflight.HEADROOM * available:
    held = f" beside {preflight.gib(reserved)} held by the other strategies" if reserved else ""
    return {"skipped": f"needs {preflight.gib(estimate.total)}{held}, "
                       f"{preflight.gib(available)} free"}
  holder = {"state": runner.init(0)}

  def one_round():
    holder["state"], report = runner.run_round(holder["state"])
    jax.block_until_ready((holder["state"], report))

  one_round()   # warm-up (compiled already; first-run effects)
  return {"run": one_round, "memory_bytes": estimate.total, "resolved": runner.strategy}


def jax_result(setup: dict, times: list, model: str, cohort: int, steps: int) -> dict:
  t = statistics.median(times)
  flops = per_client_flops(model) * cohort * steps
  return {"round_s": t, "client_steps_per_s": cohort * steps / t,
          "examples_per_s": cohort * steps * BATCH / t,
          "gflops": flops / t / 1e9 if flops else None, "memory_bytes": setup["memory_bytes"]}


def setup_torch(model: str, cohort: int, steps: int, max_clients: int):
  """The peers' way: a Python loop over clients of the same FML step in PyTorch. Returns
  (one round over min(cohort, max_clients) clients, clients timed), or None without torch."""
  if max_clients < 1:
    return None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  nn = torch.nn

  def make():
    if model == "mlp":
      return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200),
                           nn.ReLU(), nn.Linear(200, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10))

  n = min(cohort, max_clients)
  global_model = make()
  locals_ = [make() for _ in range(n)]
  local_opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                for m in locals_]
  meme = make()
  kl = nn.KLDivLoss(reduction="batchmean")
  x = torch.rand(BATCH, 1, 28, 28)
  y = torch.randint(0, 10, (BATCH,))

  def one_round():
    for local, local_opt in zip(locals_, local_opts):
      meme.load_state_dict(global_model.state_dict())           # fork the meme
      meme_opt = torch.optim.SGD(meme.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
      for _ in range(steps):
        lm, ll = meme(x), local(x)
        loss_local = 0.5 * F.cross_entropy(ll, y) + 0.5 * kl(F.log_softmax(ll, 1),
                                                              F.softmax(lm.detach(), 1))
        loss_meme = 0.5 * F.cross_entropy(lm, y) + 0.5 * kl(F.log_softmax(lm, 1),
                                                             F.softmax(ll.detach(), 1))
        meme_opt.zero_grad()
        local_opt.zero_grad()
        (loss_meme + loss_local).backward()
        meme_opt.step()
        local_opt.step()

  one_round()   # warm-up
  return one_round, n, torch.__version__


def measure_cohort(model: str, cohort: int, steps: int, strategies: list, reps: int,
                   chunk_size: int, torch_clients: int, too_slow: set,
                   max_round_s: float) -> dict:
  """Every strategy and the PyTorch loop at one cohort size, timed round-robin (one
  round of each in turn, `reps` times), so a slow spell of a shared machine hits all
  of them alike. `auto` is reported as the strategy it resolves to, not run twice."""
  row, setups, reserved = {}, {}, 0
  for strategy in [s for s in strategies if s != "auto"]:
    if strategy in too_slow:
      row[strategy] = {"skipped": f"a round took over {max_round_s:.0f} s at a smaller cohort"}
      continue
    setup = setup_jax(model, cohort, steps, strategy, chunk_size, reserved)
    if "skipped" in setup:
      row[strategy] = setup
    else:
      setups[strategy] = setup
      reserved += setup["memory_bytes"]
  torch_setup = setup_torch(model, cohort, steps, torch_clients)
  times = {name: [] for name in setups}
  torch_times = []
  for _ in range(reps):
    for name, setup in setups.items():
      t0 = time.perf_counter()
      setup["run"]()
      times[name].append(time.perf_counter() - t0)
    if torch_setup:
      t0 = time.perf_counter()
      torch_setup[0]()
      torch_times.append(time.perf_counter() - t0)
  for name, setup in setups.items():
    row[name] = jax_result(setup, times[name], model, cohort, steps)
    if row[name]["round_s"] > max_round_s:
      too_slow.add(name)
  if torch_setup:
    t = statistics.median(torch_times) / (torch_setup[1] * steps)   # s per client-step
    row["pytorch_loop"] = {"client_steps_per_s": 1 / t, "examples_per_s": BATCH / t,
                           "clients_timed": torch_setup[1], "torch_version": torch_setup[2]}
  if "auto" in strategies:
    resolved = auto_strategy(model, steps)
    row["auto"] = {**row.get(resolved, {"skipped": f"{resolved} was not measured"}),
                   "resolves_to": resolved}
  return row


_AUTO = {}


def auto_strategy(model: str, steps: int) -> str:
  """What `strategy=auto` picks for this model and steps on this backend (the runner's
  own rule)."""
  if (model, steps) not in _AUTO:
    config = fml_config(model, 1, 1)
    _AUTO[model, steps] = Runner(build_algorithm(config, 10, INPUT_SHAPE),
                                 benchmark_data(1, steps), 1, "uniform", "auto").strategy
  return _AUTO[model, steps]


def plot(results: dict, path: Path, steps: int) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)")
    return False
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
  for ax, (model, by_cohort) in zip(axes[0], results.items()):
    cohorts = sorted(int(c) for c in by_cohort)
    for name in [s for s in STRATEGIES if s != "auto"] + ["pytorch_loop"]:
      pts = [(c, by_cohort[str(c)].get(name, {}).get("client_steps_per_s")) for c in cohorts]
      pts = [(c, v) for c, v in pts if v]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if "pytorch" in name else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients per round")
    ax.set_ylabel("client-steps / s")
    ax.set_title(f"FML, {model}, batch {BATCH}, {steps} step(s)/round, "
                 f"{jax.default_backend()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def save(out: Path, machine: dict, results: dict, lines: list, complete: bool):
  """JSON and markdown of the rows so far, each written whole (temp file, then rename);
  until the last cohort they say the run is incomplete."""
  note = "" if complete else "\n(incomplete: the run stopped or is still running)\n"
  for suffix, text in ((".json", json.dumps({"machine": machine, "complete": complete,
                                              "results": results}, indent=2) + "\n"),
                       (".md", "\n".join(lines) + "\n" + note)):
    tmp = out.with_suffix(suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out.with_suffix(suffix))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="mlp, cohort 8 (CI smoke test)")
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--cohorts", default="1,8,64,512,4096")
  parser.add_argument("--strategies", default=",".join(STRATEGIES))
  parser.add_argument("--reps", type=int, default=5, help="timed rounds per point (median)")
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=1,
                      help="local steps per client per round (one epoch of this many batches)")
  parser.add_argument("--torch_clients", type=int, default=64,
                      help="clients the PyTorch loop is timed on (its throughput is per "
                           "client); 0: no PyTorch loop")
  parser.add_argument("--max_round_s", type=float, default=60.0,
                      help="stop growing the cohort for a strategy once a round takes longer")
  parser.add_argument("--out", default="benchmarks/results/client_scaling")
  args = parser.parse_args()
  if args.quick:
    args.models, args.cohorts, args.reps, args.torch_clients = "mlp", "8", 2, 8
  models = args.models.split(",")
  cohorts = [int(c) for c in args.cohorts.split(",")]
  strategies = args.strategies.split(",")

  peak = matmul_peak_gflops(1024 if args.quick else 4096)
  machine = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
             "cpu_count": os.cpu_count(), "jax": jax.__version__,
             "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
             "matmul_peak_gflops": peak, "local_steps_per_round": args.steps}
  print(f"{machine['devices'][0]} x{len(jax.devices())}, {machine['cpu_count']} CPU cores, "
        f"jax {jax.__version__}; float32 matmul peak {peak:.0f} GFLOP/s\n")
  header = ("| model | cohort | strategy | round (s) | client-steps/s | examples/s | GFLOP/s | "
            "% of matmul peak | memory est. | vs PyTorch loop |")
  lines = [header, "|" + "---|" * 10]
  print(lines[0]), print(lines[1])
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results = {}
  for model in models:
    results[model] = {}
    too_slow = set()
    for cohort in cohorts:
      row = results[model][str(cohort)] = measure_cohort(
          model, cohort, args.steps, strategies, args.reps, args.chunk_size, args.torch_clients, too_slow,
          args.max_round_s)
      torch_result = row.get("pytorch_loop")
      for strategy in strategies:
        r = row[strategy]
        label = f"auto (= {r['resolves_to']})" if strategy == "auto" else strategy
        if "skipped" in r:
          line = f"| {model} | {cohort} | {label} | skipped: {r['skipped']} |||||||"
        else:
          ratio = (r["client_steps_per_s"] / torch_result["client_steps_per_s"]
                   if torch_result else None)
          r["vs_pytorch_loop"] = ratio
          gf = r["gflops"]
          line = (f"| {model} | {cohort} | {label} | {r['round_s']:.4f} | "
                  f"{r['client_steps_per_s']:.1f} | {r['examples_per_s']:.0f} | "
                  f"{gf:.1f} | {100 * gf / peak:.1f}% | {preflight.gib(r['memory_bytes'])} | "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append(line)
        print(line, flush=True)
      if torch_result:
        line = (f"| {model} | {cohort} | pytorch loop ({torch_result['clients_timed']} clients "
                f"timed) | | {torch_result['client_steps_per_s']:.1f} | "
                f"{torch_result['examples_per_s']:.0f} | | | | 1.00x |")
      else:
        why = "--torch_clients=0" if args.torch_clients < 1 else "torch is not installed"
        line = f"| {model} | {cohort} | pytorch loop | skipped: {why} |||||||"
      lines.append(line)
      print(line, flush=True)
      save(out, machine, results, lines, complete=False)   # an interrupted run keeps its rows
  save(out, machine, results, lines, complete=True)
  plotted = plot(results, out.with_suffix(".png"), args.steps)
  print(f"\nwrote {out.with_suffix('.json')}, {out.with_suffix('.md')}"
        f"{', ' + str(out.with_suffix('.png')) if plotted else ''}")


if __name__ == "__main__":
  main()

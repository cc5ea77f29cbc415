r"""The accelerator suite (issue 14): one command that measures fml_jax on a GPU and
prints markdown tables, every result under one output folder.

  python benchmarks/accelerator_suite.py --tiny --out /tmp/suite_tiny  # CPU rehearsal, 1-2 min
  python benchmarks/accelerator_suite.py --carry carry --out /tmp/suite  # ~6 min on an H200
  python benchmarks/accelerator_suite.py --parts 3b,6 ...                # some parts only

On the lent GPU machine (no registry there: build the carry folder here first with
`bash benchmarks/prepare_carry.sh`, which downloads the wheels the machine lacks and
copies the prepared MNIST into `carry/`):

  run(command="python3 benchmarks/accelerator_suite.py --carry carry --pack --out $OUT/suite",
      carry=["carry"], timeout_s=450)

`--pack` keeps the detail files in a scratch folder and rewrites `detail.tar.gz` after
every part, so at most four files come back (summary.md, summary.json, suite.log,
detail.tar.gz; the device tool returns at most 8). Nobody has run the suite on a GPU yet:
no GPU machine was lent to issue 14, so the budgets below are estimates.

The parts, in order, each in its own process (a crash, an out-of-memory error or a hang
is recorded, with its error text, and the suite goes on; the parent never initializes
the accelerator, so each part has the whole device), each with a time budget:

  part  what                                                         budget (s)  tiny
  1     environment (jax, backend, device, memory) and a measured        15      n=512
        bf16 / fp32 / fp32-highest matmul peak (8192^3 jitted matmul)
  2     the equivalence tests (vmap == chunked == sequential for FML,    60      1 test
        FedAvg, FedMD: 5 tests of tests/test_rounds.py and
        tests/test_sharding.py, cheapest first, 62 s on this project's
        CPU with a warm compilation cache) as a pytest subset; failures
        are rerun at highest matmul precision, to tell TF32 rounding
        from a wrong executor
  3a    client_scaling, MLP, cohorts 1,64,512,4096,32768, every          65      1,8
        strategy beside the PyTorch loop (on CUDA when there is one),
        3 timed rounds each; a strategy whose round passes 3 s stops
  3b    client_scaling, CNN, cohorts 1,64,512,4096, likewise             75      2
  3c    the CNN through the chunked executor with chunk 1 (lax.map)      25      2
        at 64,512,4096, against 3b's vmap: which is faster, by how much
  4     configs/fml.py on MNIST (MLP, then the CNN if half the budget     35      MLP, 64
        is left): rounds/s per strategy, beside the PyTorch loop's                 examples
        estimate (its time per step x the job's client-steps)                     per client
  5     100,000 synthetic FML clients (mlp_small, 1% per round) on the    50      200
        device store, 4 rounds; the largest MNIST-MLP population
        that fits (computed from the per-client bytes, not run)
  6     FedMD with the ten full-size party CNNs (configs/fedmd.py):       45      2 parties,
        transfer learning, two rounds, one evaluation                              fedmd_small_p0

Where the time goes on the H200 is a guess: compiling (XLA's autotuning of each new
shape) more than running, for the CNN parts; the synthetic generator on the host for
part 5 (about 5 s per 10,000 clients on this project's CPU); FedMD's ten architectures
compile one after another. The budgets add up to 370 s. `--budget` (default 375 s, the
whole run including the carry install) is enforced: each part may use its own budget
plus whatever earlier parts left unused, but never time that the later parts' minimums
need; a part that runs out is killed (its partial tables are kept) and marked as timed
out. The budgets are guesses from CPU measurements: the first GPU run will say how good
they are (summary.md lists each part's seconds). With the device tool's 15 minutes (a
machine start of a minute or two included), a run with timeout_s=450 leaves about 5
minutes: enough to rerun the parts that failed or ran out, e.g.
`--parts 3b,6 --budget 200` with timeout_s=260.

`--carry DIR` (default `carry`): when the modules fml_jax needs are missing and DIR
exists, its wheels (DIR/wheels) are installed with `pip --no-index --no-deps --target`
into a site folder put on the parts' PYTHONPATH (DIR/fallback's protobuf only if the
tfds import fails without it), and TFDS_DATA_DIR is set to DIR/tfds.

Writes summary.json (every part's status, seconds, error text and results) and
summary.md (the tables) in --out; the detail files (client_scaling JSON/markdown/plot,
pytest's log, each part's log and JSON) beside them or in detail.tar.gz.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# Modules fml_jax needs beyond what the GPU machine's image has (issue 14).
CARRIED_MODULES = ("ml_collections", "tensorboardX", "tensorflow_datasets.core", "array_record",
                   "dm_pix", "dp_accounting")

SLOW_RUN_FLAGS = ("--xla_backend_optimization_level", "--xla_llvm_disable_expensive_passes",
                  "--xla_cpu_use_fusion_emitters")
# The equivalence tests, cheapest first (pytest runs node ids in the order given), so a
# part stopped at its budget has run the most of them: the chunked executor with a padded
# chunk; then every executor and store against the sequential reference (and a resume
# from a checkpoint) for FedAvg, FML and FedMD; then FML with tasks and a catfish.
EXECUTORS_TEST = ("tests/test_rounds.py::"
                  "test_executors_and_stores_equal_the_sequential_reference_and_resume")
EQUIVALENCE_TESTS = ("tests/test_sharding.py::test_chunked_equals_vmap[fml]",
                     f"{EXECUTORS_TEST}[fedavg]", f"{EXECUTORS_TEST}[fml]",
                     f"{EXECUTORS_TEST}[fedmd]",
                     "tests/test_rounds.py::test_vmap_equals_sequential_with_tasks_and_a_catfish")
EQUIVALENCE_TESTS_TINY = EQUIVALENCE_TESTS[:1]


@dataclasses.dataclass(frozen=True)
class Part:
  key: str
  title: str
  budget_s: float      # on the GPU machine
  min_s: float         # never start it with less
  tiny_budget_s: float


PARTS = (
    Part("1", "Environment and matmul peak", 15, 10, 60),
    Part("2", "Equivalence tests (vmap == chunked == sequential)", 60, 20, 120),
    Part("3a", "client_scaling: MLP", 65, 20, 120),
    Part("3b", "client_scaling: CNN", 75, 20, 120),
    Part("3c", "CNN: vmap against lax.map (chunked, chunk 1)", 25, 10, 90),
    Part("4", "Real job: configs/fml.py on MNIST", 35, 15, 120),
    Part("5", "Scale: 100,000 synthetic FML clients", 50, 15, 90),
    Part("6", "FedMD with the full-size party CNNs, two rounds", 45, 20, 120),
)
DEFAULT_BUDGET_S = 375
TINY_BUDGET_S = 600


# ==========================================================================================
# Shared by the parts (each part runs in a child process: `--run-part KEY`).
# ==========================================================================================


class PartContext:
  """What a part's child process knows: where to write, how long it has, tiny or not.
  `emit` rewrites the part's JSON, so a part killed at its budget keeps what it had."""

  def __init__(self, key: str, detail: Path, tiny: bool, budget_s: float):
    self.key, self.detail, self.tiny = key, detail, tiny
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.result = {"table": [], "notes": []}

  def left(self) -> float:
    return self.budget_s - (time.perf_counter() - self.start)

  def emit(self, **fields):
    self.result.update(fields)
    path = self.detail / f"part_{self.key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.result, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def _fmt(x, spec=".3f", missing="n/a"):
  return missing if x is None else format(x, spec)


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _benchmark_module(name: str):
  sys.path.insert(0, str(BENCHMARKS))
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(name)


def _torch_on_cuda(client_scaling) -> str:
  """client_scaling's PyTorch loop, unchanged, on the GPU when torch sees one: its models
  and tensors are made on CUDA (torch's default device) and each timed round ends with a
  synchronize. TF32 matmuls are allowed, as JAX's default precision does on a GPU.
  Returns where the loop runs."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "no torch"
  if not torch.cuda.is_available():
    return "cpu"
  torch.set_default_device("cuda")
  torch.set_float32_matmul_precision("high")
  original = client_scaling.setup_torch

  def setup_torch_cuda(*args, **kwargs):
    made = original(*args, **kwargs)
    if made is None:
      return None
    run, clients, version = made

    def synced():
      run()
      torch.cuda.synchronize()

    synced()
    return synced, clients, f"{version} on {torch.cuda.get_device_name()}"

  client_scaling.setup_torch = setup_torch_cuda
  return f"cuda ({torch.cuda.get_device_name()})"


# --- part 1: environment and matmul peak --------------------------------------------------


def part_environment(ctx: PartContext):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  env = {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or
         _version("jaxlib"), "backend": jax.default_backend(), "device_kind": device.device_kind,
         "devices": [str(d) for d in jax.devices()], "device_count": jax.device_count(),
         "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "date": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": platform.platform()}
  for name in ("flax", "optax", "numpy", "torch", "tensorflow_datasets", "ml_collections",
               "protobuf"):
    env[f"{name}_version"] = _version(name)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    env["torch_cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
  except ImportError:
    env["torch_cuda"] = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  env["memory_bytes_limit"] = (stats or {}).get("bytes_limit")
  env["memory_bytes_in_use"] = (stats or {}).get("bytes_in_use")
  ctx.emit(environment=env)

  n = 512 if ctx.tiny else 8192
  peaks = {}
  matmul_peak_gflops = _benchmark_module("client_scaling").matmul_peak_gflops
  for label, dtype, precision in (("bf16", jnp.bfloat16, None), ("fp32", jnp.float32, None),
                                  ("fp32_highest", jnp.float32, jax.lax.Precision.HIGHEST)):
    gflops = matmul_peak_gflops(n, 5 if ctx.tiny else 20, dtype, precision)
    peaks[label] = {"n": n, "seconds": 2 * n**3 / gflops / 1e9, "tflops": gflops / 1e3}
    ctx.emit(matmul_peak=peaks)
  memory = env["memory_bytes_limit"]
  table = ["| item | value |", "|---|---|",
           f"| jax / jaxlib | {env['jax']} / {env['jaxlib']} |",
           f"| backend, device | {env['backend']}, {env['device_kind']} x{env['device_count']} |",
           f"| device memory (allocator limit) | "
           f"{'n/a' if memory is None else f'{memory / 2**30:.1f} GiB'} |",
           f"| python, CPU cores | {env['python']}, {env['cpu_count']} |",
           f"| flax, optax, numpy | {env['flax_version']}, {env['optax_version']}, "
           f"{env['numpy_version']} |",
           f"| torch (CUDA device) | {env['torch_version']} ({env['torch_cuda']}) |",
           f"| tensorflow_datasets, ml_collections | {env['tensorflow_datasets_version']}, "
           f"{env['ml_collections_version']} |"]
  for label, p in peaks.items():
    table.append(f"| matmul peak {label} ({n}^3) | {p['tflops']:.2f} TFLOP/s |")
  ctx.emit(table=table)


def _version(dist: str):
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  for name in (dist, dist.replace("_", "-")):
    try:
      return md.version(name)
    except md.PackageNotFoundError:
      continue
  return None


# --- part 2: the equivalence tests --------------------------------------------------------


def part_equivalence(ctx: PartContext):
  tests = list(EQUIVALENCE_TESTS_TINY if ctx.tiny else EQUIVALENCE_TESTS)
  runs = []

  def pytest_run(label: str, node_ids: list, extra_env: dict):
    """pytest -v into a log, read line by line: a run stopped at the budget still counts
    the tests it finished."""
    log_path = ctx.detail / f"part_2_{label}.log"
    command = [sys.executable, "-m", "pytest", "-n", "0", "-v", "-p", "no:cacheprovider",
               *node_ids]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
      proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **extra_env}, start_new_session=True)
      try:
        returncode = proc.wait(timeout=max(ctx.left() - 3, 5))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
    output = log_path.read_text(errors="replace")
    outcome = {}
    for node in node_ids:
      found = re.search(re.escape(node) + r" (PASSED|FAILED|ERROR|SKIPPED)", output)
      outcome[node] = found.group(1) if found else "not run (budget)"
    runs.append({"label": label, "command": " ".join(command[1:]), "returncode": returncode,
                 "seconds": time.perf_counter() - t0, "outcome": outcome,
                 "passed": sum(o == "PASSED" for o in outcome.values()),
                 "failed": sum(o in ("FAILED", "ERROR") for o in outcome.values()),
                 "not_run": sum(o.startswith("not run") for o in outcome.values()),
                 "tail": output[-3000:] if returncode else ""})
    ctx.emit(runs=runs)
    return [n for n, o in outcome.items() if o in ("FAILED", "ERROR")]

  failed = pytest_run("default", tests, {})
  if failed and ctx.left() > 15:
    # TF32 (JAX's default f32 matmul on a GPU) or a wrong executor: the failed tests again
    # with every matmul at full float32 precision.
    pytest_run("highest_precision", failed, {"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
  table = ["| test | " + " | ".join(r["label"] for r in runs) + " |",
           "|---|" + "---|" * len(runs)]
  for node in tests:
    table.append(f"| {node.split('::', 1)[1]} | "
                 + " | ".join(r["outcome"].get(node, "") for r in runs) + " |")
  table.append("| passed / failed / not run (seconds) | " + " | ".join(
      f"{r['passed']} / {r['failed']} / {r['not_run']} ({r['seconds']:.0f} s)" for r in runs)
               + " |")
  first = runs[0]
  ok = first["passed"] == len(tests)
  error = None
  if not ok:
    bad = [n for n, o in first["outcome"].items() if o != "PASSED"]
    error = (f"{first['failed']} failed, {first['not_run']} not run of {len(tests)}: "
             + ", ".join(n.split("::", 1)[1] for n in bad) + "\n" + first["tail"][-1500:])
  ctx.emit(table=table, ok=ok, selection=tests, **({"error": error} if error else {}))


# --- part 3: client_scaling ---------------------------------------------------------------


def _client_scaling(ctx: PartContext, name: str, argv: list):
  cs = _benchmark_module("client_scaling")
  torch_where = _torch_on_cuda(cs)
  if ctx.tiny:   # its 4096^3 reference matmul takes seconds on a CPU; part 1 measures the peak
    peak = cs.matmul_peak_gflops
    cs.matmul_peak_gflops = lambda n=1024, reps=5: peak(min(n, 1024), reps)
  out = ctx.detail / name
  ctx.emit(table_file=f"{name}.md", json_file=f"{name}.json", pytorch_loop_on=torch_where,
           argv=argv)
  saved = sys.argv
  sys.argv = ["client_scaling.py", *argv, f"--out={out}"]
  try:
    cs.main()
  finally:
    sys.argv = saved
  result = json.loads(out.with_suffix(".json").read_text())
  ctx.emit(ok=bool(result.get("complete")), client_scaling=result)
  return result


def part_scaling_mlp(ctx: PartContext):
  cohorts = "1,8" if ctx.tiny else "1,64,512,4096,32768"
  _client_scaling(ctx, "client_scaling_mlp", [
      "--models=mlp", f"--cohorts={cohorts}", f"--reps={1 if ctx.tiny else 3}",
      f"--torch_clients={2 if ctx.tiny else 64}",
      f"--max_round_s={30 if ctx.tiny else 3}"])


def part_scaling_cnn(ctx: PartContext):
  cohorts = "2" if ctx.tiny else "1,64,512,4096"   # a CNN round is seconds on a CPU
  _client_scaling(ctx, "client_scaling_cnn", [
      "--models=cnn", f"--cohorts={cohorts}", f"--reps={1 if ctx.tiny else 3}",
      f"--torch_clients={1 if ctx.tiny else 64}",
      f"--max_round_s={30 if ctx.tiny else 3}"])


def part_lax_map(ctx: PartContext):
  """The chunked executor with chunk 1 is a lax.map over clients; against 3b's vmap."""
  cohorts = "2" if ctx.tiny else "64,512,4096"
  result = _client_scaling(ctx, "client_scaling_cnn_laxmap", [
      "--models=cnn", f"--cohorts={cohorts}", "--strategies=chunked", "--chunk_size=1",
      f"--reps={1 if ctx.tiny else 3}", "--torch_clients=0",
      f"--max_round_s={30 if ctx.tiny else 3}"])
  vmap_file = ctx.detail / "client_scaling_cnn.json"
  vmap = (json.loads(vmap_file.read_text())["results"].get("cnn", {})
          if vmap_file.exists() else {})
  table = ["| cohort | vmap client-steps/s | chunked (64) client-steps/s | lax.map (chunk 1) "
           "client-steps/s | faster | by |", "|---|---|---|---|---|---|"]
  rows = []
  for cohort, row in result["results"]["cnn"].items():
    lax_map = row.get("chunked", {}).get("client_steps_per_s")
    v = vmap.get(cohort, {}).get("vmap", {}).get("client_steps_per_s")
    c64 = vmap.get(cohort, {}).get("chunked", {}).get("client_steps_per_s")
    if v and lax_map:
      faster, by = ("vmap", v / lax_map) if v >= lax_map else ("lax.map", lax_map / v)
    else:
      faster, by = "n/a (not both measured)", None
    rows.append({"cohort": int(cohort), "vmap": v, "chunked_64": c64, "lax_map": lax_map,
                 "faster": faster, "by": by})
    table.append(f"| {cohort} | {_fmt(v, '.1f')} | {_fmt(c64, '.1f')} | {_fmt(lax_map, '.1f')} | "
                 f"{faster} | {_fmt(by, '.2f')}{'x' if by else ''} |")
  ctx.emit(table=table, table_file=None, comparison=rows)


# --- part 4: the real job -----------------------------------------------------------------


def part_real_job(ctx: PartContext):
  import jax  # pylint: disable=g-import-not-at-top
  rt = _benchmark_module("round_time")
  cs = _benchmark_module("client_scaling")
  torch_where = _torch_on_cuda(cs)
  from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
  from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
  from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top
  models = ["mlp"] if ctx.tiny else ["mlp", "cnn"]
  rounds = 2 if ctx.tiny else 5   # the first compiles; the median of the rest
  jobs, table = {}, ["| job | strategy | first round (s, with compile) | median round (s) | "
                     "rounds/s | vs PyTorch loop |", "|---|---|---|---|---|---|"]
  ctx.emit(table=table, jobs=jobs, pytorch_loop_on=torch_where)
  for model in models:
    if model != models[0] and ctx.left() < 0.5 * ctx.budget_s:
      ctx.result["notes"].append(f"fml.py with model={model} skipped: "
                                 f"{ctx.left():.0f} s of the budget left")
      continue
    config = rt.mnist_fml(model)
    if ctx.tiny:
      config.client_max_examples = 64   # one step of 64 per client: a rehearsal
    name = f"fml.py, model={model}" + (", client_max_examples=64" if ctx.tiny else "")
    t0 = time.perf_counter()
    data = load_federated_data(config)
    load_s = time.perf_counter() - t0
    rt.load_federated_data = lambda _config, data=data: data   # measure() loads it once more
    auto = Runner(build_algorithm(config, data.num_classes, data.input_shape), data,
                  config.clients_per_round, config.aggregation, "auto").strategy
    r = rt.measure(config, rounds)
    total_steps = r["client_steps_per_round_max"]
    # The PyTorch loop (client_scaling's, the same FML step) at this job's batch size,
    # on 2 clients with the job's mean steps per client; its round = steps x s per step.
    steps = max(1, round(total_steps / config.clients_per_round))
    saved_batch = cs.BATCH
    cs.BATCH = config.batch_size
    try:
      made = cs.setup_torch(model, 2, steps, 2)
    finally:
      cs.BATCH = saved_batch
    torch_round_s = None
    if made:
      per_step = _median_time(made[0], 3) / (2 * steps)
      torch_round_s = per_step * total_steps
    row = {"load_s": load_s, "auto_resolves_to": auto, "client_steps_per_round": total_steps,
           "pytorch_round_s_estimate": torch_round_s, **r}
    jobs[name] = row
    for s in rt.STRATEGIES:
      m = r[s]["median_round_s"]
      label = s + (" (= auto)" if s == auto else "")
      vs = f"{torch_round_s / m:.2f}x" if torch_round_s else "n/a"
      table.append(f"| {name} | {label} | {r[s]['first_round_s']:.2f} | {m:.4f} | "
                   f"{1 / m:.2f} | {vs} |")
    table.append(f"| {name} | PyTorch loop ({torch_where}; estimate: {total_steps} client-steps"
                 f" x the loop's time per step) | | {_fmt(torch_round_s, '.4f')} | "
                 f"{_fmt(1 / torch_round_s if torch_round_s else None, '.2f')} | 1.00x |")
    ctx.emit(table=table, jobs=jobs)
  ctx.emit(ok=bool(jobs), backend=jax.default_backend())


# --- part 5: scale ------------------------------------------------------------------------


def part_scale(ctx: PartContext):
  import jax  # pylint: disable=g-import-not-at-top
  from fml_jax import preflight  # pylint: disable=g-import-not-at-top
  from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
  from fml_jax.configs import default  # pylint: disable=g-import-not-at-top
  from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
  from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top
  clients = 200 if ctx.tiny else 100_000
  rounds = 3 if ctx.tiny else 4
  config = default.get_config()
  config.update(num_clients=clients, clients_per_round=clients // 100, model="mlp_small",
                synthetic_max_client_examples=300, placement="device")
  row = {"clients": clients, "clients_per_round": clients // 100, "model": "mlp_small"}
  t0 = time.perf_counter()
  data = load_federated_data(config)
  row["data_s"] = time.perf_counter() - t0
  ctx.emit(scale=row)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data,
                  config.clients_per_round, config.aggregation, "auto")
  abstract = runner.abstract_state(config.seed)
  estimate = preflight.estimate_memory(runner, abstract)
  row.update(strategy=runner.strategy, per_client_bytes=estimate.per_client_bytes,
             population_bytes=estimate.population_bytes, estimate_total_bytes=estimate.total,
             available_bytes=preflight.available_memory())
  t0 = time.perf_counter()
  state = runner.init(config.seed)
  jax.block_until_ready(state)
  row["init_s"] = time.perf_counter() - t0
  ctx.emit(scale=row)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    state, report = runner.run_round(state)
    jax.block_until_ready((state, report))
    times.append(time.perf_counter() - t0)
    row.update(round_s=times, all_finite=bool(report.all_finite))
    ctx.emit(scale=row)
    if ctx.left() < 5:
      break
  row["first_round_s"] = times[0]
  row["median_round_s"] = statistics.median(times[1:] or times)
  # The largest MNIST-MLP FML population that would fit, from the per-client bytes
  # (local model and its SGD momentum; the meme is forked each round).
  cs = _benchmark_module("client_scaling")
  mnist_config = cs.fml_config("mlp", 2, 1)
  mnist_runner = Runner(build_algorithm(mnist_config, 10, cs.INPUT_SHAPE), cs.benchmark_data(2),
                        2, "uniform", "vmap")
  mnist = preflight.estimate_memory(mnist_runner, mnist_runner.abstract_state(0))
  # Against the allocator's whole limit (the 100,000 clients above hold part of it now).
  available = (jax.devices()[0].memory_stats() or {}).get("bytes_limit") or row["available_bytes"]
  largest = None
  if available:
    # The same MNIST training data (60,000 x 784 uint8) beside it; the round's working
    # memory of 1,000 clients (1% of 100,000) is left for as headroom.
    largest = int((preflight.HEADROOM * available - 60_000 * 784) // mnist.per_client_bytes)
  row.update(mnist_mlp_per_client_bytes=mnist.per_client_bytes,
             mnist_mlp_largest_population=largest)
  gib = preflight.gib
  table = ["| clients | per round | model | strategy | data (s) | init (s) | first round (s) | "
           "median round (s) | population | per client | estimate (all) | free on device |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|",
           f"| {clients:,} | {clients // 100:,} | mlp_small | {row['strategy']} | "
           f"{row['data_s']:.1f} | {row['init_s']:.2f} | {row['first_round_s']:.2f} | "
           f"{row['median_round_s']:.3f} | {gib(row['population_bytes'])} | "
           f"{gib(row['per_client_bytes'])} | {gib(row['estimate_total_bytes'])} | "
           f"{'n/a' if available is None else gib(available)} |",
           f"| MNIST MLP (FML, computed, not run): {gib(mnist.per_client_bytes)} per client, "
           f"largest population that fits: "
           f"{'n/a' if largest is None else f'{largest:,}'} |||||||||||"]
  ctx.emit(scale=row, table=table, ok=bool(row["all_finite"]))


# --- part 6: FedMD ------------------------------------------------------------------------


def part_fedmd(ctx: PartContext):
  import jax  # pylint: disable=g-import-not-at-top
  from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
  from fml_jax.configs import fedmd  # pylint: disable=g-import-not-at-top
  from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
  from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top
  from fml_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  config = fedmd.get_config()   # the official protocol; bounds.json's pooled bound not run
  config.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  config.num_rounds = 2
  if ctx.tiny:   # two parties of one 1/8-width CNN, tiny public and private sets
    config.update(num_clients=2, clients_per_round=2, public_size=300, client_max_examples=40,
                  local_models="fedmd_small_p0,fedmd_small_p0", local_epochs=1)
    config.fedmd.update(public_epochs=1, private_epochs=1, alignment_size=100)
  row = {"parties": config.num_clients, "models": config.local_models, "round_s": []}
  columns = (("data (s)", "data_s", ".1f"), ("init (s)", "init_s", ".2f"),
             ("transfer learning (s)", "transfer_learning_s", ".1f"),
             ("round 1 (s, with compile)", "round_1_s", ".2f"), ("round 2 (s)", "round_2_s", ".2f"),
             ("evaluation (s)", "eval_s", ".2f"), ("personalized acc", "personalized_acc", ".4f"),
             ("parties on the global test set", "global_test_acc_of_parties", ".4f"))

  def emit(**fields):   # the table so far: a part killed at its budget shows how far it got
    row.update(fields)
    for i, t in enumerate(row["round_s"]):
      row[f"round_{i + 1}_s"] = t
    parties = f"{row['parties']} ({'fedmd_small_p0' if ctx.tiny else 'fedmd_p0..p9'})"
    table = ["| parties | strategy | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns),
             f"| {parties} | {row.get('strategy', 'n/a')} | "
             + " | ".join(_fmt(row.get(key), spec, "not reached") for _, key, spec in columns)
             + " |"]
    ctx.emit(fedmd=row, table=table)

  t0 = time.perf_counter()
  data = load_federated_data(config)
  emit(data_s=time.perf_counter() - t0)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data,
                  config.clients_per_round, config.aggregation, "auto")
  t0 = time.perf_counter()
  state = runner.init(config.seed)
  jax.block_until_ready(state)
  emit(strategy=runner.strategy, init_s=time.perf_counter() - t0)
  t0 = time.perf_counter()
  state = runner.warm_start(state)
  jax.block_until_ready(state)
  emit(transfer_learning_s=time.perf_counter() - t0)
  for _ in range(config.num_rounds):
    t0 = time.perf_counter()
    state, report = runner.run_round(state)
    jax.block_until_ready((state, report))
    row["round_s"].append(time.perf_counter() - t0)
    emit(all_finite=bool(report.all_finite))
  t0 = time.perf_counter()
  metrics = evaluate(runner, state, data)
  emit(eval_s=time.perf_counter() - t0, personalized_acc=metrics.get("local_test_acc_mean"),
       global_test_acc_of_parties=metrics.get("client_global_test_acc_mean"))
  ctx.emit(ok=bool(row["all_finite"]))


PART_FUNCTIONS = {"1": part_environment, "2": part_equivalence, "3a": part_scaling_mlp,
                  "3b": part_scaling_cnn, "3c": part_lax_map, "4": part_real_job,
                  "5": part_scale, "6": part_fedmd}


def run_part_child(key: str, detail: Path, tiny: bool, budget_s: float) -> int:
  ctx = PartContext(key, detail, tiny, budget_s)
  try:
    PART_FUNCTIONS[key](ctx)
  except BaseException as e:  # pylint: disable=broad-except
    ctx.emit(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    traceback.print_exc()
    return 1
  if "ok" not in ctx.result:
    ctx.emit(ok=True)
  return 0 if ctx.result["ok"] else 1


# ==========================================================================================
# The parent: carry, budgets, guards, summary.
# ==========================================================================================


class Log:
  """Prints and keeps a copy in suite.log."""

  def __init__(self, path: Path):
    self.file = open(path, "a", encoding="utf-8")

  def __call__(self, text: str = ""):
    print(text, flush=True)
    self.file.write(text + "\n")
    self.file.flush()


def _imports_ok(env: dict) -> tuple[bool, str]:
  code = "import " + ", ".join(CARRIED_MODULES)
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)
  lines = proc.stderr.strip().splitlines()
  return proc.returncode == 0, lines[-1] if lines else ""


def setup_carry(carry: Path, site: Path, env: dict, log) -> dict:
  """Installs the carry folder's wheels when the modules fml_jax needs are missing;
  points TFDS_DATA_DIR at its datasets. Changes `env` (the parts' environment)."""
  info = {"dir": str(carry), "present": carry.is_dir()}
  if (carry / "tfds").is_dir():
    env["TFDS_DATA_DIR"] = str((carry / "tfds").resolve())
    info["tfds_data_dir"] = env["TFDS_DATA_DIR"]
  wheels = sorted((carry / "wheels").glob("*.whl")) if info["present"] else []
  if not wheels:
    info["installed"] = f"nothing: no wheels in {carry}/wheels"
    return info
  ok, error = _imports_ok(env)
  if ok:
    info["installed"] = "not needed: the modules import without it"
    return info

  def install(paths):
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                           "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                           "--target", str(site), *map(str, paths)],
                          capture_output=True, text=True, timeout=300)

  t0 = time.perf_counter()
  proc = install(wheels)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
  ok, error = _imports_ok(env)
  fallback = sorted((carry / "fallback").glob("*.whl"))
  if not ok and fallback:   # e.g. a protobuf older than tensorflow_metadata's generated code
    log(f"carry: imports failed after installing the wheels ({error}); adding "
        f"{', '.join(p.name for p in fallback)}")
    install(fallback)
    ok, error = _imports_ok(env)
    info["fallback_installed"] = [p.name for p in fallback]
  info.update(wheels=[p.name for p in wheels], site=str(site), pip_returncode=proc.returncode,
              pip_stderr=proc.stderr[-1000:], seconds=time.perf_counter() - t0,
              imports_ok=ok, import_error=None if ok else error,
              installed=f"{len(wheels)} wheels into {site} in {time.perf_counter() - t0:.0f} s;"
                        f" imports {'ok' if ok else 'FAILED: ' + error}")
  return info


def _timeout_for(index: int, parts: list, deadline: float, tiny: bool) -> float:
  """Its own budget plus whatever earlier parts left, never the later parts' minimums."""
  remaining = deadline - time.monotonic()
  later = parts[index + 1:]
  if tiny:
    return min(parts[index].tiny_budget_s, remaining - sum(p.min_s for p in later))
  slack_floor = remaining - sum(p.budget_s for p in later)
  return min(max(parts[index].budget_s, slack_floor), remaining - sum(p.min_s for p in later))


def run_part(part: Part, timeout: float, detail: Path, args, env: dict) -> dict:
  """One part in a child process (its own process group, killed at `timeout`)."""
  result_file = detail / f"part_{part.key}.json"
  result_file.unlink(missing_ok=True)
  command = [sys.executable, str(Path(__file__).resolve()), "--run-part", part.key,
             "--detail", str(detail), "--part-budget", f"{timeout:.1f}"] + (
                 ["--tiny"] if args.tiny else [])
  t0 = time.perf_counter()
  with open(detail / f"part_{part.key}.log", "w", encoding="utf-8") as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      returncode = proc.wait(timeout=timeout)
      timed_out = False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      returncode = proc.wait()
      timed_out = True
  seconds = time.perf_counter() - t0
  try:
    result = json.loads(result_file.read_text())
  except (OSError, json.JSONDecodeError):
    result = {"table": []}
  if result.get("table_file"):
    table_path = detail / result["table_file"]
    if table_path.exists():
      result["table"] = [l for l in table_path.read_text().splitlines() if l.strip()]
  tail = (detail / f"part_{part.key}.log").read_text(errors="replace")[-3000:]
  if timed_out:
    status = "timeout"
    result["error"] = (f"killed at its time budget ({timeout:.0f} s); tables hold what it had "
                       f"finished. Last output:\n{tail[-1500:]}")
  elif returncode != 0 or not result.get("ok", False):
    status = "failed"
    result.setdefault("error", f"exit code {returncode}. Last output:\n{tail[-1500:]}")
  else:
    status = "ok"
  return {"key": part.key, "title": part.title, "status": status, "seconds": seconds,
          "budget_s": part.tiny_budget_s if args.tiny else part.budget_s, "timeout_s": timeout,
          "returncode": returncode, **result}


def targets(parts: dict) -> list:
  """Issue 14's targets, read from the tables (None where not measured)."""
  rows = []

  def scaling(key, model):
    return (parts.get(key, {}).get("client_scaling") or {}).get("results", {}).get(model, {})

  peaks = (parts.get("1", {}).get("matmul_peak") or {})
  for model, factor in (("mlp", 20), ("cnn", 5)):
    r = scaling("3a" if model == "mlp" else "3b", model).get("512", {})
    v = r.get("vmap", {}).get("client_steps_per_s")
    t = r.get("pytorch_loop", {}).get("client_steps_per_s")
    ratio = v / t if v and t else None
    rows.append({"target": f"{model.upper()} at cohort 512: vmap >= {factor}x the PyTorch loop",
                 "measured": None if ratio is None else f"{ratio:.1f}x",
                 "met": None if ratio is None else ratio >= factor})
  r = scaling("3b", "cnn").get("4096", {})
  best = max((s.get("gflops") or 0 for k, s in r.items() if k in ("vmap", "chunked",
                                                                    "sequential")), default=0)
  for label in ("fp32", "bf16"):
    peak = peaks.get(label, {}).get("tflops")
    share = best / 1e3 / peak if best and peak else None
    rows.append({"target": f"CNN at cohort 4096 above 30% of the measured {label} matmul peak",
                 "measured": None if share is None else f"{100 * share:.1f}%",
                 "met": None if share is None else share > 0.3})
  for key, model in (("3a", "mlp"), ("3b", "cnn")):
    for cohort, r in scaling(key, model).items():
      measured = {s: r[s]["client_steps_per_s"] for s in ("sequential", "vmap", "chunked")
                  if r.get(s, {}).get("client_steps_per_s")}
      if "auto" not in r or not measured:
        continue
      fastest = max(measured, key=measured.get)
      picked = r["auto"]["resolves_to"]
      rows.append({"target": f"auto picks the fastest: {model}, cohort {cohort}",
                   "measured": f"auto = {picked}, fastest = {fastest}"
                               + ("" if picked == fastest or picked not in measured else
                                  f" ({measured[fastest] / measured[picked]:.2f}x)"),
                   "met": picked == fastest})
  return rows


def markdown(summary: dict) -> str:
  lines = [f"# fml_jax accelerator suite{' (--tiny)' if summary['tiny'] else ''}", "",
           f"{summary['date']}; command: `{summary['command']}`; "
           f"budget {summary['budget_s']:.0f} s, took {summary.get('seconds', 0):.0f} s", "",
           "| part | what | status | seconds | budget (s) | note |", "|---|---|---|---|---|---|"]
  for p in summary["parts"].values():
    note = (p.get("error") or "").splitlines()[0][:160] if p["status"] != "ok" else ""
    note = note.replace("|", "/")
    shown = "ok" if p["status"] == "ok" else p["status"].upper()
    lines.append(f"| {p['key']} | {p['title']} | {shown} | {p['seconds']:.1f} | "
                 f"{p['budget_s']:.0f} | {note} |")
  carry = summary.get("carry", {})
  lines += ["", f"Carry: {carry.get('installed')}"
            + (f"; TFDS_DATA_DIR={carry['tfds_data_dir']}" if carry.get("tfds_data_dir") else "")]
  for p in summary["parts"].values():
    lines += ["", f"## {p['key']}. {p['title']}", ""]
    if p["status"] != "ok":
      first = (p.get("error") or "").splitlines()[:1] or [""]
      reason = first[0][:300].replace("|", "/")
      lines += [f"| part {p['key']} | FAILED ({p['status']}) | {reason} |",
                "|---|---|---|", ""]
    lines += p.get("table") or ["(no table)"]
    for note in p.get("notes") or []:
      lines += ["", note]
  rows = summary.get("targets") or []
  if rows:
    lines += ["", "## Targets (issue 14)", "", "| target | measured | met |", "|---|---|---|"]
    for r in rows:
      met = "not measured" if r["met"] is None else ("yes" if r["met"] else "NO")
      lines.append(f"| {r['target']} | {r['measured'] or 'n/a'} | {met} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/fml_jax_accelerator")
  parser.add_argument("--tiny", action="store_true",
                      help="the same parts at tiny sizes, for a CPU (about a minute or two)")
  parser.add_argument("--carry", default="carry",
                      help="folder from benchmarks/prepare_carry.sh (wheels/, fallback/, tfds/)")
  parser.add_argument("--site", default="/tmp/fml_jax_carry_site",
                      help="where the carry's wheels are installed (pip --target)")
  parser.add_argument("--budget", type=float, default=None,
                      help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}; "
                           f"--tiny: {TINY_BUDGET_S})")
  parser.add_argument("--parts", default="", help="comma-separated part keys (default: all)")
  parser.add_argument("--pack", action="store_true",
                      help="detail files in a scratch folder, packed into detail.tar.gz")
  parser.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--detail", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--part-budget", type=float, default=60.0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run_part:
    sys.path.insert(0, str(REPO))
    sys.exit(run_part_child(args.run_part, Path(args.detail), args.tiny, args.part_budget))

  start, t_start = time.monotonic(), time.perf_counter()
  budget = args.budget or (TINY_BUDGET_S if args.tiny else DEFAULT_BUDGET_S)
  deadline = start + budget
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  detail = Path(tempfile.mkdtemp(prefix="fml_jax_suite_")) if args.pack else out
  log = Log(out / "suite.log")
  wanted = set(filter(None, args.parts.split(",")))
  parts = [p for p in PARTS if not wanted or p.key in wanted]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # The tests' fast-compile flags (tests/conftest.py; inherited when the tests run the
  # suite) make the programs run several times slower: this is a benchmark, drop them.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if f.split("=")[0] not in SLOW_RUN_FLAGS]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  if args.tiny:
    # Compiling dominates tiny runs on a CPU: the tests' persistent compilation cache
    # (not their fast-compile flags: those make FedMD's CNNs run several times slower).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(env.get(
        "XDG_CACHE_HOME", Path.home() / ".cache")) / "fml_jax" / "jax_test_cache"))
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")   # the rest: torch's loop
  env.setdefault("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  command = " ".join([Path(sys.executable).name, *sys.argv])
  summary = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny,
             "budget_s": budget, "out": str(out), "parts": {}}
  log(f"fml_jax accelerator suite{' (--tiny)' if args.tiny else ''}: {len(parts)} parts, "
      f"budget {budget:.0f} s, out {out}")
  summary["carry"] = setup_carry(Path(args.carry), Path(args.site), env, log)
  log(f"carry: {summary['carry']['installed']}")

  def write():
    summary["seconds"] = time.perf_counter() - t_start
    summary["targets"] = targets(summary["parts"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    if args.pack:
      tmp = out / "detail.tar.gz.tmp"
      with tarfile.open(tmp, "w:gz") as tar:
        tar.add(detail, arcname="detail")
      tmp.replace(out / "detail.tar.gz")

  for i, part in enumerate(parts):
    timeout = _timeout_for(i, parts, deadline, args.tiny)
    if timeout < part.min_s:
      summary["parts"][part.key] = {
          "key": part.key, "title": part.title, "status": "skipped", "seconds": 0.0,
          "budget_s": part.tiny_budget_s if args.tiny else part.budget_s, "table": [],
          "error": f"skipped: {timeout:.0f} s left for it, under its minimum {part.min_s:.0f} s"}
      log(f"\n## {part.key}. {part.title}: SKIPPED (no time left)")
      write()
      continue
    log(f"\n## {part.key}. {part.title} (up to {timeout:.0f} s)\n")
    result = run_part(part, timeout, detail, args, env)
    summary["parts"][part.key] = result
    if result["status"] != "ok":
      first = (result.get("error") or "").splitlines()[:1] or [""]
      log(f"| part {part.key} | FAILED ({result['status']}) | {first[0][:300]} |")
      log("|---|---|---|\n")
    for line in result.get("table") or []:
      log(line)
    log(f"\n({result['status']}, {result['seconds']:.1f} s)")
    write()
  write()
  log("\n## Summary\n")
  for line in markdown(summary).split("\n## ")[0].splitlines()[2:]:
    log(line)
  rows = summary["targets"]
  if rows:
    log("\n| target | measured | met |\n|---|---|---|")
    for r in rows:
      met = "not measured" if r["met"] is None else ("yes" if r["met"] else "NO")
      log(f"| {r['target']} | {r['measured'] or 'n/a'} | {met} |")
  log(f"\nwrote {out / 'summary.md'}, {out / 'summary.json'}"
      + (f", {out / 'detail.tar.gz'}" if args.pack else ""))
  if args.pack:
    shutil.rmtree(detail, ignore_errors=True)
  failed = [k for k, p in summary["parts"].items() if p["status"] != "ok"]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()

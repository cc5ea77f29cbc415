r"""Whole jobs against the peers' way of running them: fml_jax beside a PyTorch loop.

  TFDS_DATA_DIR=../shared/tfds python benchmarks/vs_pytorch.py            # every job
  TFDS_DATA_DIR=../shared/tfds python benchmarks/vs_pytorch.py --jobs=fml_mnist_cnn
  TFDS_DATA_DIR=../shared/tfds python benchmarks/vs_pytorch.py --quick    # tiny, for the tests

Each job is a real federated run: MNIST or CIFAR-10 split IID over 10 clients, every
client every round, 1 local epoch of batch 64, SGD (lr 0.01, momentum 0.9, weight decay
5e-4), no augmentation. fml_jax runs it as `python -m fml_jax.main` would (the runner,
`strategy=auto`). Beside it, the same job written the way the official FML code and
PFLlib run it: a Python loop over clients, the meme forked from the global model, meme
and local model stepping together on each batch, then the memes merged (uniformly for
FML, by example count for FedAvg, as fml_jax's `aggregation=auto` does). Both sides use
the same partition, the same number of steps per client (a last partial batch
included) and the same losses; they differ in initial weights and batch order.

The two run alternately, round by round, so a noisy shared machine slows both alike.
Timed: each round's training (sampling, local training and merging; no evaluation),
the first round of each side taken as warm-up (it compiles). Reported per job: the
median round of each, their ratio (above 1: fml_jax is faster), and each side's
global-model test accuracy after the last round, to show both trained. PyTorch is an
optional dependency: without it the PyTorch column says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top

from fml_jax.algorithms import build_algorithm  # pylint: disable=g-import-not-at-top
from fml_jax.configs import default  # pylint: disable=g-import-not-at-top
from fml_jax.data import load_federated_data  # pylint: disable=g-import-not-at-top
from fml_jax.rounds import Runner  # pylint: disable=g-import-not-at-top
from fml_jax.train import evaluate  # pylint: disable=g-import-not-at-top
from round_time import cpu_name  # pylint: disable=g-import-not-at-top  (benchmarks/)

# name -> (algorithm, dataset, model)
JOBS = {
    "fml_mnist_mlp": ("fml", "mnist", "mlp"),
    "fedavg_mnist_mlp": ("fedavg", "mnist", "mlp"),
    "fml_mnist_cnn": ("fml", "mnist", "cnn"),
    "fedavg_mnist_cnn": ("fedavg", "mnist", "cnn"),
    "fml_cifar10_lenet5": ("fml", "cifar10", "lenet5"),
    "fedavg_cifar10_lenet5": ("fedavg", "cifar10", "lenet5"),
}
QUICK_JOBS = ("fml_mnist_mlp", "fedavg_mnist_cnn")


def job_config(name: str, clients: int, batch_size: int, max_examples: int):
  algorithm, dataset, model = JOBS[name]
  c = default.get_config()
  c.algorithm, c.dataset, c.model = algorithm, dataset, model
  c.data_dir = os.environ.get("TFDS_DATA_DIR", str(REPO.parent / "shared" / "tfds"))
  c.partition = "iid"
  c.num_clients = c.clients_per_round = clients
  c.local_epochs, c.batch_size = 1, batch_size
  c.augment = "none"
  c.client_max_examples = max_examples
  return c


class FmlJaxJob:
  """The job in fml_jax: the runner a `python -m fml_jax.main` run builds."""

  def __init__(self, config, data):
    self.data = data
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    self.runner = Runner(algorithm, data, config.clients_per_round, config.aggregation,
                         config.strategy)
    self.state = self.runner.init(config.seed)
    self.strategy = self.runner.executor.name

  def round(self):
    self.state, report = self.runner.run_round(self.state)
    jax.block_until_ready((self.state, report))

  def global_test_acc(self) -> float:
    return evaluate(self.runner, self.state, self.data)["global_test_acc"]


def torch_model(torch, model: str, input_shape: tuple, num_classes: int):
  """fml_jax.models' MLP, CNN and LeNet-5, layer for layer, in PyTorch."""
  nn = torch.nn
  if model == "mlp":
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 200), nn.ReLU(),
                         nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes))
  h, _, c = input_shape
  if model == "cnn":
    return nn.Sequential(nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * (h // 4) ** 2, 512), nn.ReLU(),
                         nn.Linear(512, num_classes))
  if model == "lenet5":
    side = ((h // 2) - 4) // 2
    return nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, num_classes))
  raise ValueError(f"no PyTorch version of model '{model}'")


class TorchLoopJob:
  """The job as the official FML code runs it: a loop over clients in PyTorch."""

  def __init__(self, config, data, torch):
    self.torch, self.config = torch, config
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    mean = np.asarray(data.input_mean, np.float32)
    std = np.asarray(data.input_std, np.float32)

    def tensor(x):   # the inputs normalized as fml_jax does, NCHW, once outside the timing
      x = (np.asarray(x, np.float32) / 255.0 - mean) / std
      return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    self.x_train, self.y_train = tensor(data.x_train), torch.from_numpy(
        np.asarray(data.y_train, np.int64))
    self.x_test, self.y_test = tensor(data.x_test), torch.from_numpy(
        np.asarray(data.y_test, np.int64))
    flat, start, n = (np.asarray(a) for a in (data.train_flat, data.train_start, data.train_n))
    self.client_idx = [torch.from_numpy(flat[s:s + k].astype(np.int64)) for s, k in zip(start, n)]
    make = lambda: torch_model(torch, config.model, data.input_shape, data.num_classes)
    self.global_model = make()
    self.fml = config.algorithm == "fml"
    self.locals = [make() for _ in self.client_idx] if self.fml else []
    self.local_opts = [self.sgd(m) for m in self.locals]
    sizes = np.asarray(n, np.float64)
    uniform = self.fml if config.aggregation == "auto" else config.aggregation == "uniform"
    self.weights = np.full(len(sizes), 1 / len(sizes)) if uniform else sizes / sizes.sum()
    self.generator = torch.Generator().manual_seed(config.seed)

  def sgd(self, model):
    c = self.config
    return self.torch.optim.SGD(model.parameters(), lr=c.learning_rate, momentum=c.momentum,
                                weight_decay=c.weight_decay)

  def round(self):
    torch, F = self.torch, self.torch.nn.functional
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    alpha = beta = 0.5
    merged = None
    for i, idx in enumerate(self.client_idx):
      meme = copy.deepcopy(self.global_model)          # fork the meme from the global model
      meme_opt = self.sgd(meme)
      order = idx[torch.randperm(len(idx), generator=self.generator)]
      for batch in order.split(self.config.batch_size):
        x, y = self.x_train[batch], self.y_train[batch]
        meme_opt.zero_grad()
        lm = meme(x)
        if self.fml:
          local, local_opt = self.locals[i], self.local_opts[i]
          local_opt.zero_grad()
          ll = local(x)
          loss_local = alpha * F.cross_entropy(ll, y) + (1 - alpha) * kl(
              F.log_softmax(ll, 1), F.softmax(lm.detach(), 1))
          loss_meme = beta * F.cross_entropy(lm, y) + (1 - beta) * kl(
              F.log_softmax(lm, 1), F.softmax(ll.detach(), 1))
          (loss_meme + loss_local).backward()
          local_opt.step()
        else:
          F.cross_entropy(lm, y).backward()
        meme_opt.step()
      with torch.no_grad():
        state = {k: v * self.weights[i] for k, v in meme.state_dict().items()}
        merged = state if merged is None else {k: merged[k] + v for k, v in state.items()}
    self.global_model.load_state_dict(merged)

  def global_test_acc(self) -> float:
    with self.torch.no_grad():
      correct = sum(int((self.global_model(x).argmax(1) == y).sum())
                    for x, y in zip(self.x_test.split(1000), self.y_test.split(1000)))
    return correct / len(self.y_test)


def measure(name: str, config, rounds: int, torch, data) -> dict:
  sides = {"fml_jax": FmlJaxJob(config, data)}
  if torch is not None:
    sides["pytorch_loop"] = TorchLoopJob(config, data, torch)
  times = {side: [] for side in sides}
  for _ in range(rounds):
    for side, job in sides.items():   # alternating: both see the same machine load
      t0 = time.perf_counter()
      job.round()
      times[side].append(time.perf_counter() - t0)
  steps = int(np.sum(-(-np.asarray(data.train_n) // config.batch_size)))
  result = {"job": dict(zip(("algorithm", "dataset", "model"), JOBS[name]),
                        clients=config.num_clients, batch_size=config.batch_size,
                        client_steps_per_round=steps, examples=int(np.sum(data.train_n))),
            "fml_jax_strategy": sides["fml_jax"].strategy}
  for side, job in sides.items():
    result[side] = {"first_round_s": times[side][0],
                    "median_round_s": statistics.median(times[side][1:]),
                    "rounds_s": times[side], "global_test_acc": job.global_test_acc()}
  if torch is not None:
    result["speedup"] = (result["pytorch_loop"]["median_round_s"]
                         / result["fml_jax"]["median_round_s"])
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated: {', '.join(JOBS)}")
  parser.add_argument("--rounds", type=int, default=4, help="rounds per side (the first is warm-up)")
  parser.add_argument("--clients", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_examples", type=int, default=0,
                      help="keep at most this many training examples per client (0: all)")
  parser.add_argument("--quick", action="store_true",
                      help=f"{', '.join(QUICK_JOBS)} on 2 clients of 128 examples, 3 rounds")
  parser.add_argument("--no_torch", action="store_true", help="time fml_jax only")
  parser.add_argument("--out", default="benchmarks/results/vs_pytorch.json")
  args = parser.parse_args()
  if args.quick:
    args.jobs, args.rounds = ",".join(QUICK_JOBS), 3
    args.clients, args.max_examples = 2, 128
  names = [j for j in args.jobs.split(",") if j]
  unknown = [j for j in names if j not in JOBS]
  if unknown:
    parser.error(f"--jobs: unknown {', '.join(unknown)}; choose from {', '.join(JOBS)}")
  if args.rounds < 2:
    parser.error("--rounds: at least 2 (the first is warm-up)")
  torch, why_no_torch = None, "--no_torch"
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      why_no_torch = "torch is not installed (pip install torch)"
  result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "backend": jax.default_backend(),
                        "jax": jax.__version__, "python": platform.python_version(),
                        "torch": torch.__version__ if torch else None},
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "jobs": {}}
  print(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['backend']}, jax {jax.__version__}, "
        f"torch {result['machine']['torch'] or 'absent'}\n")
  print("| job | client-steps per round | fml_jax (strategy) | fml_jax round (s) | "
        "PyTorch loop round (s) | fml_jax speed-up | test acc fml_jax / PyTorch |")
  print("|---|---|---|---|---|---|---|")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  datasets = {}   # the jobs on one dataset share its loaded partition
  for name in names:
    config = job_config(name, args.clients, args.batch_size, args.max_examples)
    if config.dataset not in datasets:
      datasets[config.dataset] = load_federated_data(config)
    r = measure(name, config, args.rounds, torch, datasets[config.dataset])
    result["jobs"][name] = r
    j = r["fml_jax"]
    if torch is not None:
      t = r["pytorch_loop"]
      torch_cols = (f"{t['median_round_s']:.3f} | {r['speedup']:.2f}x | "
                    f"{j['global_test_acc']:.3f} / {t['global_test_acc']:.3f}")
    else:
      torch_cols = f"skipped: {why_no_torch} | | {j['global_test_acc']:.3f} / -"
    print(f"| {name} | {r['job']['client_steps_per_round']} | {r['fml_jax_strategy']} | "
          f"{j['median_round_s']:.3f} | {torch_cols} |", flush=True)
    # Written after every job, complete or not, so an interrupted run keeps what it measured.
    result["complete"] = name == names[-1]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()

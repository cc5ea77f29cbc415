"""One experiment: load data, build the algorithm, run rounds, evaluate, write results.

    summary = fml_jax.train.run(config, workdir)

The loop is deliberately thin: everything per client happens inside the engine's
jitted functions; the host only times rounds, evaluates every `eval_every` rounds
and writes what it measured.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import logging

from fml_jax import config_checks, evaluation, outputs
from fml_jax.algorithms import build_algorithm
from fml_jax.data import FederatedData, load_federated_data
from fml_jax.engine import Engine, RoundState


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def evaluate(engine: Engine, state: RoundState, data: FederatedData) -> dict:
  """The metrics of one evaluation: global model on the global test set, and each
  client's personalized model on its own test split."""
  algorithm = engine.algorithm
  result = {"global_test_acc": None, "global_test_loss": None}
  global_model = algorithm.global_model(state.server)
  if global_model is not None:
    acc, loss = evaluation.evaluate_global(global_model[0], global_model[1], data)
    result.update(global_test_acc=float(acc), global_test_loss=float(loss))
  accs, _ = evaluation.evaluate_personalized(
      algorithm.personalized_model(state.server, state.population), data)
  result.update(local_test_acc_mean=float(accs.mean()), local_test_acc_min=float(accs.min()),
                local_test_acc_max=float(accs.max()))
  return result


def _fmt(value, spec=".4f") -> str:
  return "n/a" if value is None else format(value, spec)


def log_round(record: dict, num_rounds: int) -> None:
  logging.info(
      "round %d/%d  global acc %s loss %s | personalized acc %s [min %s, max %s] | "
      "train loss %s | %.3f s/round", record["round"], num_rounds,
      _fmt(record["global_test_acc"]), _fmt(record["global_test_loss"]),
      _fmt(record["local_test_acc_mean"]), _fmt(record["local_test_acc_min"]),
      _fmt(record["local_test_acc_max"]), _fmt(record["train_loss"]), record["round_seconds"])


def run(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs the experiment described by `config`; returns (and writes) its summary."""
  config_checks.validate(config)
  path = outputs.prepare_workdir(workdir, overwrite)
  start = time.perf_counter()
  data = load_federated_data(config)
  algorithm = build_algorithm(config, data.num_classes, data.input_shape)
  engine = Engine(algorithm, data, config.clients_per_round, config.aggregation, config.strategy)
  state = engine.init(config.seed)
  logging.info(
      "%s on %s: %d clients (%d per round), %d train / %d test examples, client sizes %d-%d; "
      "strategy %s on %s, aggregation %s", config.algorithm, config.dataset, data.num_clients,
      config.clients_per_round, data.x_train.shape[0], data.x_test.shape[0],
      int(data.train_n.min()), int(data.train_n.max()), engine.strategy, jax.default_backend(),
      engine.aggregation)
  outputs.atomic_write_json(path / "config.json", config.to_dict())
  writer = outputs.MetricsWriter(path / "metrics.jsonl")
  round_seconds, records = [], []
  try:
    for r in range(1, config.num_rounds + 1):
      t0 = time.perf_counter()
      state, train_metrics = engine.run_round(state)
      jax.block_until_ready((state, train_metrics))
      round_seconds.append(time.perf_counter() - t0)
      if r % config.eval_every and r != config.num_rounds:
        continue
      record = {"round": r, **evaluate(engine, state, data),
                **{k: float(v) for k, v in train_metrics.items()},
                "round_seconds": round_seconds[-1],
                "elapsed_seconds": time.perf_counter() - start}
      writer.write(record)
      log_round(record, config.num_rounds)
      records.append(record)
  finally:
    writer.close()
  steady = round_seconds[1:] or round_seconds
  global_model = algorithm.global_model(state.server)
  summary = {
      "final": records[-1],
      "best_global_test_acc": _best(records, "global_test_acc"),
      "best_local_test_acc_mean": _best(records, "local_test_acc_mean"),
      "num_rounds": config.num_rounds,
      "first_round_seconds": round_seconds[0],   # includes compilation
      "median_round_seconds": statistics.median(steady),
      "total_seconds": time.perf_counter() - start,
      "strategy": engine.strategy,
      "aggregation": engine.aggregation,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "jax_version": jax.__version__,
      "global_model_params": count_params(global_model[1]) if global_model else 0,
  }
  outputs.atomic_write_json(path / "summary.json", summary)
  return summary


def _best(records: list[dict], key: str):
  values = [r[key] for r in records if r[key] is not None]
  return max(values) if values else None

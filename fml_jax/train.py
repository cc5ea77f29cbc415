"""One experiment: load data, build the algorithm, run rounds, evaluate, write results.

    summary = fml_jax.train.run(config, workdir)

The loop is deliberately thin: everything per client happens inside the round
(fml_jax/rounds/); the host only times rounds, evaluates every `eval_every` rounds
and writes what it measured.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import logging

from fml_jax import config_checks, evaluation, outputs, preflight, reporting
from fml_jax.checkpoints import Checkpointer
from fml_jax.algorithms import build_algorithm
from fml_jax.data import FederatedData, load_federated_data
from fml_jax.errors import UserError
from fml_jax.rounds import RoundState, Runner, client_mesh


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# Up to this many clients, metrics lines also list each client's accuracy on the global test set.
PER_CLIENT_LIMIT = 100


def evaluate(runner: Runner, state: RoundState, data: FederatedData) -> dict:
  """The metrics of one evaluation: global model on the global test set, and each
  client's personalized model on its own test split."""
  algorithm = runner.algorithm
  result = {"global_test_acc": None, "global_test_loss": None}
  global_model = algorithm.global_model(state.server)
  if global_model is not None:
    acc, loss = evaluation.evaluate_global(global_model[0], global_model[1], data)
    result.update(global_test_acc=float(acc), global_test_loss=float(loss))
  models = algorithm.personalized_models(state.server, state.population)
  accs = evaluation.evaluate_all_personalized(models, data)
  result.update(local_test_acc_mean=float(accs.mean()), local_test_acc_min=float(accs.min()),
                local_test_acc_max=float(accs.max()))
  if algorithm.evaluates_clients_on_global_test or algorithm.config.get(
      "eval_clients_on_global_test", False):
    # Each client's own model on the whole test distribution (FedMD, FedH2L aim at it).
    accs = evaluation.evaluate_all_personalized(models, data, on_global_test=True)
    result.update(client_global_test_acc_mean=float(accs.mean()),
                  client_global_test_acc_min=float(accs.min()),
                  client_global_test_acc_max=float(accs.max()))
    if len(accs) <= PER_CLIENT_LIMIT:   # per-party gains (FedMD's table); in client-id order
      ids = np.concatenate([np.arange(data.num_clients) if m.client_ids is None
                            else np.asarray(m.client_ids) for m in models])
      per_client = np.full(data.num_clients, np.nan)
      per_client[ids] = accs
      result["client_global_test_acc"] = [round(float(a), 6) for a in per_client]
  return result


class DivergenceError(UserError):
  """Training produced NaN or inf; the run stopped and kept its last good checkpoint."""


def _check_finite(report, r: int, config, checkpointer) -> None:
  if bool(report.all_finite):   # one scalar fetched per round
    return
  finite = np.asarray(report.client_finite)
  bad = np.asarray(report.cohort)[~finite].tolist()
  where = (f"on clients {bad} (of the {len(finite)} sampled)" if bad
           else "in the aggregated server state")
  steps = checkpointer.steps() if checkpointer else []
  kept = (f"the last good checkpoint (round {steps[-1]}) is kept in {checkpointer.directory}"
          if steps else "no checkpoint was saved before it")
  raise DivergenceError(
      f"round {r}: {config.algorithm} diverged: non-finite loss, parameters or optimizer state "
      f"{where}; {kept}. Lower learning_rate (now {config.learning_rate}) or check the data")


def run(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs the experiment described by `config`, or resumes it from its workdir;
  returns (and writes) its summary."""
  config_checks.validate(config)
  config_dict = json.loads(json.dumps(config.to_dict()))
  path, resuming = outputs.prepare_workdir(workdir, config_dict, overwrite)
  if resuming and (path / "summary.json").exists():
    summary = json.loads((path / "summary.json").read_text())
    if summary.get("num_rounds") == config.num_rounds:
      logging.info("the run in %s is already complete (%d rounds); nothing to do", path,
                    config.num_rounds)
      return summary
  start = time.perf_counter()
  data = load_federated_data(config)
  algorithm = build_algorithm(config, data.num_classes, data.input_shape)
  runner = Runner(algorithm, data, config.clients_per_round, config.aggregation, config.strategy,
                  chunk_size=config.chunk_size, mesh=client_mesh(config.mesh_shape),
                  placement=config.placement)
  data = runner.data   # replicated over the mesh, if there is one
  abstract_state = runner.abstract_state(config.seed)
  traffic = runner.communication(abstract_state)   # bytes per round, from shapes
  memory = preflight.estimate_memory(runner, abstract_state)
  preflight.check_memory(memory, preflight.available_memory(),
                         preflight.available_host_memory())
  checkpointer = None
  if config.checkpoint_every > 0:
    preflight.check_disk(path, preflight.tree_bytes(abstract_state), config.checkpoints_to_keep)
    checkpointer = Checkpointer(path / outputs.CHECKPOINT_DIR, config.checkpoint_every,
                                config.checkpoints_to_keep)
  first_round = 0
  if resuming and checkpointer:
    first_round, state = checkpointer.restore_latest(abstract_state)
    first_round = first_round or 0
    if first_round > config.num_rounds:
      raise UserError(f"--workdir {workdir} already holds {first_round} rounds, more than "
                      f"num_rounds={config.num_rounds}; raise num_rounds or use another workdir")
    if first_round:
      state = runner.place(state)
  warm_record = None
  if not first_round:
    state = runner.init(config.seed)
    if algorithm.has_warm_start:   # FedMD's transfer learning, before round 1
      t0 = time.perf_counter()
      state = runner.warm_start(state)
      warm_record = {"round": 0, **evaluate(runner, state, data),
                     "warm_start_seconds": time.perf_counter() - t0}
      logging.info("after transfer learning (no collaboration): personalized acc %.4f, "
                   "on the global test set %.4f (%.1f s)", warm_record["local_test_acc_mean"],
                   warm_record.get("client_global_test_acc_mean", float("nan")),
                   warm_record["warm_start_seconds"])
      algorithm.after_warm_start(runner, lambda s: evaluate(runner, s, data), warm_record,
                                 path, config.seed)
  # A fresh start with a warm start rewrites its round-0 line, so keep nothing before it.
  keep_up_to = first_round if warm_record is None else -1
  records = outputs.read_metrics(path, keep_up_to) if resuming else []
  if (path / "summary.json").exists():
    (path / "summary.json").unlink()   # the run is being extended: no longer complete
  logging.info(
      "%s on %s: %d clients (%d per round), %d train / %d test examples, client sizes %d-%d; "
      "strategy %s on %s, aggregation %s; memory: %s%s", config.algorithm, config.dataset,
      data.num_clients, config.clients_per_round, data.x_train.shape[0], data.x_test.shape[0],
      int(data.train_n.min()), int(data.train_n.max()), runner.strategy, jax.default_backend(),
      runner.aggregation, memory.describe(),
      f"; resuming after round {first_round}" if first_round else "")
  outputs.atomic_write_json(path / "config.json", config_dict)
  writer = outputs.MetricsWriter(path / "metrics.jsonl")
  board = reporting.TensorBoardWriter(path, first_round)
  if warm_record is not None:
    writer.write(warm_record)
    board.write(warm_record)
    records = [warm_record]
  progress = reporting.Progress(first_round, config.num_rounds)
  round_seconds = []
  try:
    for r in range(first_round + 1, config.num_rounds + 1):
      t0 = time.perf_counter()
      state, report = runner.run_round(state)
      _check_finite(report, r, config, checkpointer)   # waits for the round to finish
      round_seconds.append(time.perf_counter() - t0)
      if r % config.eval_every == 0 or r == config.num_rounds:
        record = {"round": r, **evaluate(runner, state, data),
                  **{k: float(v) for k, v in report.metrics.items()},
                  **traffic, "bytes_up_total": r * traffic["bytes_up"],
                  "bytes_down_total": r * traffic["bytes_down"],
                  "round_seconds": round_seconds[-1],
                  "elapsed_seconds": time.perf_counter() - start}
        writer.write(record)
        board.write(record)
        records.append(record)
      else:
        record = None
      progress.round_done(r, record)
      if checkpointer and checkpointer.should_save(r, config.num_rounds):
        checkpointer.save(r, state)
  finally:
    progress.close()
    writer.close()
    board.close()
    if checkpointer:
      checkpointer.close()
  steady = round_seconds[1:] or round_seconds or [float("nan")]
  global_model = algorithm.global_model(state.server)
  summary = {
      "final": records[-1],
      "best_global_test_acc": _best(records, "global_test_acc"),
      "best_local_test_acc_mean": _best(records, "local_test_acc_mean"),
      "num_rounds": config.num_rounds,
      "resumed_after_round": first_round,
      "first_round_seconds": round_seconds[0] if round_seconds else None,  # includes compiling
      "median_round_seconds": statistics.median(steady),
      "total_seconds": time.perf_counter() - start,
      "memory_estimate_bytes": memory.total,
      "strategy": runner.strategy,
      "aggregation": runner.aggregation,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "mesh_devices": runner.mesh.size if runner.mesh is not None else 1,
      "jax_version": jax.__version__,
      "global_model_params": count_params(global_model[1]) if global_model else 0,
  }
  outputs.atomic_write_json(path / "summary.json", summary)
  return summary


def _best(records: list[dict], key: str):
  values = [r[key] for r in records if r[key] is not None]
  return max(values) if values else None

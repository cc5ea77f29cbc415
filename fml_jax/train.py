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
from pathlib import Path

import jax
import numpy as np
from absl import logging

from fml_jax import config_checks, distributed, evaluation, outputs, preflight, reporting, stats
from fml_jax.checkpoints import Checkpointer
from fml_jax.configs import default as default_config
from fml_jax.data import FederatedData, load_federated_data
from fml_jax.errors import UserError
from fml_jax.privacy import PrivacyAccountant
from fml_jax.replicas import Replica, ReplicaSet
from fml_jax.rounds import GlobalModel, RoundState, Runner, client_mesh


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
    model, params, model_state = GlobalModel(*global_model)
    acc, loss = evaluation.evaluate_global(model, params, data, model_state=model_state)
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


def _check_finite(report, r: int, config, checkpointer, who: str = "") -> None:
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
      f"round {r}: {config.algorithm}{who} diverged: non-finite loss, parameters or optimizer "
      f"state {where}; {kept}. Lower learning_rate (now {config.learning_rate}) or check the "
      "data")


def _describe_replica(replica: Replica) -> str:
  sweep = "".join(f", {k}={v}" for k, v in replica.values.items())
  return f" (replica {replica.index}: seed {replica.seed}{sweep})"


def run(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs the experiment described by `config`, or resumes it from its workdir;
  returns (and writes) its summary. With `seeds` > 1 or a `sweep`, every replica runs
  in this one program (fml_jax/replicas.py)."""
  config_checks.validate(config)
  config_dict = json.loads(json.dumps(config.to_dict()))
  # Across processes: the same settings everywhere; process 0 alone writes the run's files.
  distributed.check_same_config(config_dict)
  writes = distributed.is_writer()
  # Fields fml_jax gained after an older run was written count as their defaults.
  defaults = json.loads(json.dumps(default_config.get_config().to_dict()))
  path, resuming = _prepare_workdir(workdir, config_dict, overwrite, defaults)
  if resuming and (path / "summary.json").exists():
    summary = json.loads((path / "summary.json").read_text())
    if summary.get("num_rounds") == config.num_rounds:
      logging.info("the run in %s is already complete (%d rounds); nothing to do", path,
                    config.num_rounds)
      return summary
  start = time.perf_counter()
  data = load_federated_data(config)
  replicas = ReplicaSet(config, data, client_mesh(config.mesh_shape))
  if distributed.process_count() > 1 and replicas.num_replicas > 1:
    raise UserError("seeds and sweeps run as replicas within one process; across processes run "
                    "one replica per launch (seeds=1, no sweep)")
  runner, algorithm = replicas.runner, replicas.runner.algorithm
  data = replicas.data   # replicated over the mesh, if there is one
  num_replicas = replicas.num_replicas
  one_state = runner.abstract_state(config.seed)
  traffic = runner.communication(one_state)   # bytes per round, from shapes
  memory = preflight.for_replicas(preflight.estimate_memory(runner, one_state), num_replicas,
                                  vmapped=replicas.strategy == "vmap")
  preflight.check_memory(memory, preflight.available_memory(),
                         preflight.available_host_memory())
  abstract_state = replicas.abstract_state()
  checkpointer = None
  if config.checkpoint_every > 0:
    preflight.check_disk(path, preflight.tree_bytes(abstract_state), config.checkpoints_to_keep)
    checkpointer = Checkpointer(path / outputs.CHECKPOINT_DIR, config.checkpoint_every,
                                config.checkpoints_to_keep)
  # What each replica's metrics lines say about it (nothing for a single run).
  labels = [r.fields() if num_replicas > 1 else {} for r in replicas.replicas]
  first_round = 0
  if resuming and checkpointer:
    first_round, restored = checkpointer.restore_latest(abstract_state)
    first_round = first_round or 0
    if first_round > config.num_rounds:
      raise UserError(f"--workdir {workdir} already holds {first_round} rounds, more than "
                      f"num_rounds={config.num_rounds}; raise num_rounds or use another workdir")
    if first_round:
      states = replicas.from_checkpoint(restored)
  warm_records = None
  if not first_round:
    states = replicas.init()
    if algorithm.has_warm_start:   # FedMD's transfer learning, before round 1
      t0 = time.perf_counter()
      states = replicas.warm_start(states)
      seconds = time.perf_counter() - t0
      warm_records = [{"round": 0, **labels[i], **evaluate(replicas.runner_of(i),
                                                           replicas.state_of(states, i), data),
                       "warm_start_seconds": seconds} for i in range(num_replicas)]
      logging.info("after transfer learning (no collaboration): personalized acc %.4f, "
                   "on the global test set %.4f (%.1f s)", warm_records[0]["local_test_acc_mean"],
                   warm_records[0].get("client_global_test_acc_mean", float("nan")), seconds)
      algorithm.after_warm_start(runner, lambda s: evaluate(runner, s, data), warm_records[0],
                                 path, config.seed)
  # A fresh start with a warm start rewrites its round-0 lines, so keep nothing before it.
  keep_up_to = first_round if warm_records is None else -1
  records = outputs.read_metrics(path, keep_up_to, rewrite=writes) if resuming else []
  if writes and (path / "summary.json").exists():
    (path / "summary.json").unlink()   # the run is being extended: no longer complete
  logging.info(
      "%s on %s: %d clients (%d per round), %d train / %d test examples, client sizes %d-%d; "
      "strategy %s on %s, aggregation %s%s; memory: %s%s", config.algorithm, config.dataset,
      data.num_clients, config.clients_per_round, data.x_train.shape[0], data.x_test.shape[0],
      int(data.train_n.min()), int(data.train_n.max()), runner.strategy, jax.default_backend(),
      runner.aggregation,
      f"; {num_replicas} replicas ({len(replicas.points)} grid points x {config.seeds} seeds), "
      f"run by {replicas.strategy}" if num_replicas > 1 else "",
      memory.describe(), f"; resuming after round {first_round}" if first_round else "")
  if writes:
    outputs.atomic_write_json(path / "config.json", config_dict)
  writer = outputs.MetricsWriter(path / "metrics.jsonl") if writes else _Discard()
  boards = reporting.TensorBoardBoards(path, first_round, replicas) if writes else _Discard()
  if warm_records is not None:
    for record in warm_records:
      writer.write(record)
    boards.write(warm_records)
    records = list(warm_records)
  progress = reporting.Progress(first_round, config.num_rounds) if writes else _Discard()
  accountant = PrivacyAccountant.from_config(config)   # DP-FedAvg's epsilon per round
  round_seconds = []
  try:
    for r in range(first_round + 1, config.num_rounds + 1):
      t0 = time.perf_counter()
      states, reports = replicas.run_round(states)
      for replica, report in zip(replicas.replicas, reports):   # waits for the round to finish
        _check_finite(report, r, config, checkpointer,
                      _describe_replica(replica) if num_replicas > 1 else "")
      round_seconds.append(time.perf_counter() - t0)
      shown = None
      if r % config.eval_every == 0 or r == config.num_rounds:
        evaluated = []
        for i, report in enumerate(reports):
          evaluated.append({
              "round": r, **labels[i],
              **evaluate(replicas.runner_of(i), replicas.state_of(states, i), data),
              **traffic, "bytes_up_total": r * traffic["bytes_up"],
              "bytes_down_total": r * traffic["bytes_down"],
              # An algorithm whose traffic depends on the data (FedKD's truncated SVDs)
              # reports it in its metrics, which replace the static count.
              **{k: float(v) for k, v in report.metrics.items()},
              **({"dp_epsilon": accountant.epsilon(r)} if accountant else {}),
              "round_seconds": round_seconds[-1],
              "elapsed_seconds": time.perf_counter() - start})
          writer.write(evaluated[-1])
        boards.write(evaluated)
        records.extend(evaluated)
        shown = evaluated[0] if num_replicas == 1 else stats.mean_record(evaluated)
        if num_replicas > 1:
          _log_spread(r, replicas, evaluated)
      progress.round_done(r, shown)
      if checkpointer and checkpointer.should_save(r, config.num_rounds):
        checkpointer.save(r, replicas.checkpoint_state(states))
  finally:
    progress.close()
    writer.close()
    boards.close()
    if checkpointer:
      checkpointer.close()
  steady = round_seconds[1:] or round_seconds or [float("nan")]
  global_model = algorithm.global_model(replicas.state_of(states, 0).server)
  summary = {
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
      "processes": distributed.process_count(),
      "mesh_devices": runner.mesh.size if runner.mesh is not None else 1,
      "jax_version": jax.__version__,
      "global_model_params": count_params(global_model[1]) if global_model else 0,
  }
  if num_replicas == 1:
    summary.update(final=records[-1], best_global_test_acc=_best(records, "global_test_acc"),
                   best_local_test_acc_mean=_best(records, "local_test_acc_mean"))
  else:
    summary.update(replica_summaries(replicas, records), num_replicas=num_replicas,
                   replica_strategy=replicas.strategy)
  if writes:
    outputs.atomic_write_json(path / "summary.json", summary)
  return summary


class _Discard:
  """What a process other than process 0 writes its metrics, boards and progress to."""

  def write(self, *args, **kwargs):
    del args, kwargs

  round_done = write

  def close(self):
    pass


def _prepare_workdir(workdir: str, config: dict, overwrite: bool, defaults: dict):
  """`outputs.prepare_workdir` on process 0; every process then knows whether the run
  resumes, and stops with process 0 when it refused the workdir."""
  if distributed.process_count() == 1:
    return outputs.prepare_workdir(workdir, config, overwrite, defaults)
  refusal, path, resuming = None, Path(workdir).expanduser(), False
  if distributed.is_writer():
    try:
      path, resuming = outputs.prepare_workdir(workdir, config, overwrite, defaults)
    except UserError as e:
      refusal = e
  status = distributed.agree(-1 if refusal else int(resuming))
  if refusal is not None:
    raise refusal
  if status < 0:
    raise UserError(f"process 0 refused --workdir {workdir} (its output says why)")
  distributed.check_shared_workdir(path)
  return path, status == 1


def replica_summaries(replicas: ReplicaSet, records: list[dict]) -> dict:
  """The summary of a multi-replica run: each replica's final record and bests
  ("replicas"), and per grid point the mean, std and 95% interval across its seeds
  ("points"); "final" and the bests are the means over the replicas when there is
  one grid point (no sweep), else None (read "points")."""
  per_replica = []
  for replica in replicas.replicas:
    own = [r for r in records if r.get("replica") == replica.index]
    per_replica.append({**replica.fields(), "final": own[-1],
                        "best_global_test_acc": _best(own, "global_test_acc"),
                        "best_local_test_acc_mean": _best(own, "local_test_acc_mean")})
  points = []
  for p, values in enumerate(replicas.points):
    members = [s for s, r in zip(per_replica, replicas.replicas) if r.point == p]
    points.append({
        "sweep": dict(values), "seeds": [m["seed"] for m in members],
        "replicas": [m["replica"] for m in members],
        "final": stats.record_intervals([m["final"] for m in members]),
        **{key: stats.interval([m[key] for m in members])
           for key in ("best_global_test_acc", "best_local_test_acc_mean")}})
  single_point = len(points) == 1
  return {
      "replicas": per_replica, "points": points,
      "final": stats.mean_record([m["final"] for m in per_replica]) if single_point else None,
      **{key: points[0][key]["mean"] if single_point else None
         for key in ("best_global_test_acc", "best_local_test_acc_mean")}}


# The metrics the console summarizes across replicas at every evaluation.
SPREAD_METRICS = ("global_test_acc", "local_test_acc_mean", "client_global_test_acc_mean")


def _log_spread(r: int, replicas: ReplicaSet, evaluated: list[dict]) -> None:
  for p, values in enumerate(replicas.points):
    members = [rec for rec, rep in zip(evaluated, replicas.replicas) if rep.point == p]
    parts = [f"{key} {stats.describe(stats.interval([m.get(key) for m in members]))}"
             for key in SPREAD_METRICS if any(m.get(key) is not None for m in members)]
    where = f" {values}" if values else ""
    logging.info("round %d%s over %d seeds: %s", r, where, len(members), "; ".join(parts))


def _best(records: list[dict], key: str):
  values = [r[key] for r in records if r[key] is not None]
  return max(values) if values else None

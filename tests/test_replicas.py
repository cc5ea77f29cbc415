"""Replicas (seeds and sweeps in one program) against single runs, and pairing across
algorithms (common random numbers)."""

import json

import chex
import jax
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fml_jax import config_checks, stats, train
from fml_jax.data import load_federated_data
from fml_jax.errors import ConfigError
from fml_jax.replicas import ReplicaSet, grid_points, parse_sweep, replicas_of

from conftest import make_runner, small_config
from test_rounds import REGISTERED, registry_config

ROUNDS = 2


def single_run(config, rounds=ROUNDS):
  """The reference: one run through a plain Runner (warm start, then rounds)."""
  runner = make_runner(config, config.strategy)
  state = runner.warm_start(runner.init(config.seed))
  for _ in range(rounds):
    state, report = runner.run_round(state)
    assert bool(report.all_finite)
  return jax.device_get(state)


def replica_runs(config, rounds=ROUNDS):
  """Every replica's state after `rounds` rounds of a ReplicaSet."""
  replicas = ReplicaSet(config, load_federated_data(config))
  assert replicas.strategy == config.replica_strategy
  states = replicas.warm_start(replicas.init())
  for _ in range(rounds):
    states, reports = replicas.run_round(states)
    assert len(reports) == replicas.num_replicas
    assert all(bool(r.all_finite) for r in reports)
  return [jax.device_get(replicas.state_of(states, i)) for i in range(replicas.num_replicas)]


def assert_states_equal(a, b, exact):
  tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(a.population, b.population, **tolerance)
  chex.assert_trees_all_close(a.server, b.server, **tolerance)
  assert int(a.round) == int(b.round) == ROUNDS
  np.testing.assert_array_equal(a.key, b.key)


# --- replica i is the single run with seed seed+i ----------------------------------------

@pytest.mark.parametrize("name", REGISTERED)
def test_each_replica_equals_the_single_run_with_its_seed(name):
  references = [single_run(registry_config(name, strategy="vmap", seed=3 + i, data_seed=3))
                for i in range(2)]
  # The two seeds really differ (else the test could not tell replicas apart).
  leaves = [jax.tree.leaves((state.server, state.population)) for state in references]
  assert not all(np.array_equal(a, b) for a, b in zip(*leaves))
  for replica_strategy in ("loop", "vmap"):
    config = registry_config(name, strategy="vmap", seed=3, seeds=2,
                             replica_strategy=replica_strategy)
    for state, reference in zip(replica_runs(config), references):
      # The loop runs the single run's own program; vmap adds a replica axis to it.
      assert_states_equal(state, reference, exact=replica_strategy == "loop")


# --- a sweep point is the single run with that value ---------------------------------------

SWEEPS = {
    # Every sweepable field: FML's own, the clients' and the server's learning rates
    # (1.0 is the plain average in the single run, an optimizer step under vmap).
    "fml": "fml.alpha=0.3;fml.beta=0.8;learning_rate=0.05;server.learning_rate=0.5,1.0",
    # mu = 0 leaves FedProx's term out of the single run, traced it is multiplied by 0.
    "fedprox": "fedprox.mu=0.0,0.5",
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_each_sweep_point_equals_the_single_run_with_its_values(name):
  # Swept alpha and beta need constant schedules under vmap (FML's small config has one).
  common = dict(strategy="vmap", fml__alpha_schedule="")
  base = registry_config(name, sweep=SWEEPS[name], **common)
  points = grid_points(base)
  assert len(points) == 2
  references = [single_run(registry_config(name, **common, **{
      k.replace(".", "__"): v for k, v in point.items()})) for point in points]
  for replica_strategy in ("loop", "vmap"):
    config = registry_config(name, sweep=SWEEPS[name], replica_strategy=replica_strategy,
                             **common)
    for state, reference in zip(replica_runs(config), references):
      exact = replica_strategy == "loop"
      chex.assert_trees_all_close(state.population, reference.population,
                                  **(dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)))
      # Structures differ where the vmapped sweep keeps a server optimizer state.
      chex.assert_trees_all_close(state.server["params"], reference.server["params"],
                                  **(dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)))
  # The sweep changes something: the two points end apart.
  a, b = (r.server["params"] for r in references)
  assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b))) > 1e-4


def test_replicas_are_ordered_grid_point_then_seed():
  config = small_config(seed=5, seeds=2, sweep="learning_rate=0.01,0.02;fml.alpha=0.3,0.6")
  replicas = replicas_of(config)
  assert [(r.index, r.seed, r.point) for r in replicas] == [
      (0, 5, 0), (1, 6, 0), (2, 5, 1), (3, 6, 1), (4, 5, 2), (5, 6, 2), (6, 5, 3), (7, 6, 3)]
  assert [r.values for r in replicas[::2]] == [
      {"learning_rate": 0.01, "fml.alpha": 0.3}, {"learning_rate": 0.01, "fml.alpha": 0.6},
      {"learning_rate": 0.02, "fml.alpha": 0.3}, {"learning_rate": 0.02, "fml.alpha": 0.6}]


@pytest.mark.parametrize("overrides, field, message", [
    (dict(sweep="learning_rate"), "sweep", "field=v1,v2"),
    (dict(sweep="batch_size=16,32"), "sweep", "cannot be swept"),
    (dict(sweep="learning_rate=0.1,abc"), "sweep", "are not numbers"),
    (dict(sweep="learning_rate=0.1,0.1"), "sweep", "twice"),
    (dict(sweep="fedprox.mu=0.1,0.2"), "sweep", "is a setting of fedprox, not of fml"),
    (dict(algorithm="local", sweep="server.learning_rate=0.5"), "sweep", "no server optimizer"),
    (dict(sweep="learning_rate=0.1,-1"), "sweep", "learning_rate"),
    (dict(sweep="fml.alpha=0.5,1.5"), "sweep", "fml.alpha"),
    (dict(seeds=0), "seeds", "outside"),
    (dict(replica_strategy="parallel"), "replica_strategy", "auto, vmap, loop"),
])
def test_bad_replica_settings_name_the_setting(overrides, field, message):
  with pytest.raises(ConfigError) as error:
    config_checks.validate(small_config(**overrides))
  assert error.value.field == field and message in str(error.value)


@pytest.mark.parametrize("overrides, reason", [
    (dict(strategy="sequential"), "strategy vmap or chunked"),
    (dict(strategy="vmap", placement="host"), "placement=host"),
    (dict(strategy="vmap", sweep="fml.alpha=0.3,0.6", fml__alpha_schedule="0:0.7,1:0.4"),
     "fml.alpha_schedule"),
])
def test_vmapped_replicas_are_refused_where_they_cannot_run(overrides, reason):
  config = small_config(seeds=2, replica_strategy="vmap", **overrides)
  with pytest.raises(ConfigError, match=reason):
    ReplicaSet(config, load_federated_data(config))
  # auto falls back to the loop there (and on this CPU anyway).
  config = small_config(seeds=2, **overrides)
  assert ReplicaSet(config, load_federated_data(config)).strategy == "loop"


def test_parse_sweep():
  assert parse_sweep("") == []
  assert parse_sweep(" learning_rate = 0.1, 0.2 ; fml.beta=0.5 ") == [
      ("learning_rate", [0.1, 0.2]), ("fml.beta", [0.5])]


# --- pairing: the same seed, the same start, cohorts and batches, whatever the algorithm -----

def test_same_seed_pairs_initial_weights_cohorts_and_batch_keys_across_algorithms():
  runners = {name: make_runner(small_config(algorithm=name, clients_per_round=3), "vmap")
             for name in ("fml", "fedavg", "fedprox", "fedmr", "local")}
  states = {name: jax.device_get(r.init(7)) for name, r in runners.items()}
  global_params = states["fml"].server["params"]   # FML's meme is the global model
  # Equal to float32 rounding: each algorithm's init is its own compiled program, and
  # XLA may fuse the initializers' arithmetic differently (seen: 6e-8 apart).
  same = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  same(states["fedavg"].server["params"], global_params)
  same(states["fedprox"].server["params"], global_params)
  same(jax.tree.map(lambda x: x[0], states["fedmr"].server["slots"]), global_params)
  same(states["local"].population, states["fml"].population)
  # FML's local models are not the meme: they are drawn from the clients' key.
  assert not np.allclose(global_params["Dense_0"]["kernel"],
                         states["fml"].population[0].params["Dense_0"]["kernel"][0])
  for r in range(3):   # cohorts and each member's key (its batch order and dropout)
    cohorts = {}
    for name, runner in runners.items():
      (cohort,), _ = runner.begin_round(states[name].replace(round=np.int32(r)))
      cohorts[name] = (np.asarray(cohort.clients.id), np.asarray(cohort.clients.key))
    for name in runners:
      np.testing.assert_array_equal(cohorts[name][0], cohorts["fml"][0])
      np.testing.assert_array_equal(cohorts[name][1], cohorts["fml"][1])


def test_same_seed_pairs_private_models_across_heterogeneous_algorithms():
  shared = dict(local_models="mlp,mlp_small", public_size=60)
  params = {}
  for name in ("fml", "local", "fedmd", "fedh2l"):
    overrides = registry_config(name).to_dict() if name in ("fedmd", "fedh2l") else {}
    config = small_config(**{**overrides, **shared, "algorithm": name,
                             "client_tasks": "", "seed": 4})
    state = jax.device_get(make_runner(config, "vmap").init(4))
    params[name] = [group.params for group in state.population]
  for name in ("local", "fedmd", "fedh2l"):   # to float32 rounding, as above
    chex.assert_trees_all_close(params[name], params["fml"], rtol=1e-6, atol=1e-7)


# --- a multi-seed run: what it writes, and resume --------------------------------------------

def read_records(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


TIMES = ("round_seconds", "elapsed_seconds")


def without_times(records):
  return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


@pytest.mark.parametrize("replica_strategy", ["loop", "vmap"])
def test_multi_seed_run_writes_each_replica_and_resumes_exactly(replica_strategy, tmp_path):
  config = small_config(seeds=3, num_rounds=3, checkpoint_every=1, strategy="vmap",
                        replica_strategy=replica_strategy)
  summary = train.run(config, str(tmp_path / "whole"))
  records = read_records(tmp_path / "whole")
  assert [(r["round"], r["replica"], r["seed"], r["sweep"]) for r in records] == [
      (round_, i, i, {}) for round_ in (1, 2, 3) for i in range(3)]
  assert summary["num_replicas"] == 3 and summary["replica_strategy"] == replica_strategy
  finals = [r for r in records if r["round"] == 3]
  assert [s["final"] for s in summary["replicas"]] == finals
  (point,) = summary["points"]
  assert point["seeds"] == [0, 1, 2] and point["replicas"] == [0, 1, 2]
  accs = [r["local_test_acc_mean"] for r in finals]
  low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(accs), scale=scipy_stats.sem(accs))
  np.testing.assert_allclose([point["final"]["local_test_acc_mean"][k] for k in
                              ("mean", "low", "high")], [np.mean(accs), low, high], rtol=1e-9)
  assert summary["final"]["global_test_acc"] == pytest.approx(
      np.mean([r["global_test_acc"] for r in finals]))
  boards = sorted(p.name for p in (tmp_path / "whole" / "tensorboard").iterdir())
  assert boards == ["mean", "replica_000_seed0", "replica_001_seed1", "replica_002_seed2"]
  # Resume: stop after round 2, extend to 3; every replica continues exactly.
  config.num_rounds = 2
  train.run(config, str(tmp_path / "resumed"))
  config.num_rounds = 3
  resumed = train.run(config, str(tmp_path / "resumed"))
  assert resumed["resumed_after_round"] == 2
  assert without_times(read_records(tmp_path / "resumed")) == without_times(records)


# --- the statistics ---------------------------------------------------------------------------

def test_interval_is_the_student_t_interval_of_the_mean():
  values = [0.81, 0.79, 0.84, 0.80, 0.83]
  got = stats.interval(values)
  low, high = scipy_stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy_stats.sem(values))
  assert got["n"] == 5
  np.testing.assert_allclose([got["mean"], got["std"], got["low"], got["high"]],
                             [np.mean(values), np.std(values, ddof=1), low, high], rtol=1e-12)
  assert stats.interval([0.5, None, float("nan")]) == {
      "mean": 0.5, "std": 0.0, "low": 0.5, "high": 0.5, "n": 1}
  assert stats.interval([])["n"] == 0


def test_mean_record_averages_numbers_and_leaves_out_the_rest():
  records = [{"round": 3, "acc": 0.5, "global": None, "per_client": [1, 2], "sweep": {}},
             {"round": 3, "acc": 0.7, "global": None, "per_client": [3, 4], "sweep": {}}]
  assert stats.mean_record(records) == {"round": 3.0, "acc": pytest.approx(0.6), "global": None}


def test_looped_replicas_with_the_host_store_equal_single_runs():
  references = []
  for seed in (0, 1):
    config = small_config(strategy="vmap", placement="host", seed=seed, data_seed=0)
    runner = make_runner(config, "vmap", "host")
    state = runner.init(seed)
    for _ in range(ROUNDS):
      state, _ = runner.run_round(state)
    references.append(jax.device_get(state))
  config = small_config(strategy="vmap", placement="host", seeds=2, replica_strategy="loop")
  for state, reference in zip(replica_runs(config), references):
    assert_states_equal(state, reference, exact=True)

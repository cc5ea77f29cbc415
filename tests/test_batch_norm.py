"""Batch-norm models in the algorithms that average models (fml_jax/algorithms/batch_norm.py):
running statistics averaged with the parameters (FedAvg, FML), recombined with their
layers (FedMR), kept on the clients (FedBN), each against a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import config_checks
from fml_jax.algorithms import batch_norm, fedmr
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.errors import ConfigError
from fml_jax.rounds.types import RoundContext

from conftest import make_runner, small_config

MODEL = "mlp_bn"   # dense 200 + batch norm + relu, dense 200 + batch norm + relu, dense out


def cohort_uploads(runner, state):
  """Every cohort member's upload, computed one client at a time outside the round."""
  (cohort,), context = runner.begin_round(state)
  k = cohort.clients.id.shape[0]
  population = state.population[0]
  uploads, client_states = [], []
  for i in range(k):
    client = jax.tree.map(lambda a: a[i], cohort.clients)
    client_state = (jax.tree.map(lambda a: a[int(client.id)], population)
                    if jax.tree.leaves(population) else population)
    result = runner.algorithm.client_update(state.server, client_state, client, runner.data, 0)
    uploads.append(result.upload)
    client_states.append(result.client_state)
  return cohort, context, uploads, client_states


def weighted(trees, weights):
  return jax.tree.map(lambda *xs: np.tensordot(np.asarray(weights), np.stack(xs), axes=1), *trees)


def assert_trees_close(a, b, rtol=1e-4, atol=5e-4):
  """Equal up to float32 rounding (the round runs the clients vmapped, the test one by one).
  On an AVX-512 Xeon one of FML's 200 averaged statistics after two local epochs differs
  by 2.6e-4 between the two (also at the commit before issue 20's changes), hence atol."""
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


def test_server_averages_statistics_with_the_parameters_weights():
  params = {"Dense_0": {"kernel": jnp.ones((2, 3))}}
  server = {"params": params, "model_state": {"batch_stats": {"BatchNorm_0": {
      "mean": jnp.zeros(3), "var": jnp.ones(3)}}}}
  uploads = {"params": {"Dense_0": {"kernel": jnp.arange(12.0).reshape(2, 2, 3)}},
             "model_state": {"batch_stats": {"BatchNorm_0": {
                 "mean": jnp.array([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]),
                 "var": jnp.array([[1.0, 1.0, 1.0], [3.0, 5.0, 9.0]])}}}}
  weights = jnp.array([0.25, 0.75])
  context = RoundContext(round=jnp.int32(0), clients=None, weights=weights,
                         key=jax.random.PRNGKey(0))
  new, _ = ServerOptimizer(small_config().server).update(server, uploads, context)
  stats = new["model_state"]["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], [4.0, 5.0, 6.0])      # 0.25 * 1 + 0.75 * 5 ...
  np.testing.assert_allclose(stats["var"], [2.5, 4.0, 7.0])
  np.testing.assert_allclose(new["params"]["Dense_0"]["kernel"],
                             0.25 * np.arange(6.0).reshape(2, 3) + 0.75 * np.arange(6.0, 12.0)
                             .reshape(2, 3))
  # FedAdam moves the parameters; the statistics are still their plain weighted mean.
  adam = small_config(server__optimizer="adam", server__learning_rate=0.1).server
  optimizer = ServerOptimizer(adam)
  new, _ = optimizer.update({**server, **optimizer.init(params)}, uploads, context)
  np.testing.assert_allclose(new["model_state"]["batch_stats"]["BatchNorm_0"]["mean"],
                             [4.0, 5.0, 6.0])


@pytest.mark.parametrize("algorithm", ["fedavg", "fml"])
def test_global_statistics_are_the_weighted_mean_of_the_clients(algorithm):
  config = small_config(algorithm=algorithm, model=MODEL, aggregation="weighted")
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  assert "model_state" in state.server
  _, context, uploads, _ = cohort_uploads(runner, state)
  before = jax.device_get(state)   # the round donates its input state
  new, report = runner.run_round(state)
  assert bool(report.all_finite)
  statistics = [u["model_state"] for u in uploads]
  assert_trees_close(new.server["model_state"], weighted(statistics, context.weights))
  assert_trees_close(new.server["params"], weighted([u["params"] for u in uploads],
                                                    context.weights))
  # The statistics moved away from their initial values (the clients trained).
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       new.server["model_state"], before.server["model_state"])
  assert min(jax.tree.leaves(moved)) > 0


def test_batch_norm_params_are_the_layers_with_statistics():
  runner = make_runner(small_config(algorithm="fedavg", model=MODEL), "vmap")
  state = runner.init(0)
  bn = batch_norm.batch_norm_params(state.server["params"], state.server["model_state"])
  assert sorted(bn) == ["BatchNorm_0/bias", "BatchNorm_0/scale", "BatchNorm_1/bias",
                        "BatchNorm_1/scale"]
  zeros = {name: jnp.zeros_like(v) for name, v in bn.items()}
  merged = batch_norm.with_batch_norm_params(state.server["params"], zeros)
  assert float(jnp.abs(merged["BatchNorm_1"]["scale"]).max()) == 0.0
  np.testing.assert_array_equal(merged["Dense_0"]["kernel"],
                                state.server["params"]["Dense_0"]["kernel"])


def test_fedbn_keeps_each_clients_batch_norm_layers():
  config = small_config(algorithm="fedavg", model=MODEL, batch_norm="local")
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  cohort, context, uploads, client_states = cohort_uploads(runner, state)
  before = jax.device_get(state)   # the round donates its input state
  new, _ = runner.run_round(state)
  ids = [int(i) for i in cohort.clients.id]
  population = new.population[0]
  for i, client in enumerate(ids):   # a trained client holds what it trained
    assert_trees_close(jax.tree.map(lambda a: a[client], population), client_states[i])
  for client in set(range(config.num_clients)) - set(ids):   # the others kept their start
    assert_trees_close(jax.tree.map(lambda a: a[client], population),
                       jax.tree.map(lambda a: a[client], before.population[0]))
  # Clients' layers now differ from each other; every layer is averaged into the global model.
  scales = np.asarray(population["bn_params"]["BatchNorm_0/scale"])[ids]
  assert np.abs(scales[0] - scales[1]).max() > 0
  assert_trees_close(new.server["params"], weighted([u["params"] for u in uploads],
                                                    context.weights))
  # Personalized evaluation: the global model with each client's own batch-norm layers.
  (models,) = runner.algorithm.personalized_models(new.server, new.population)
  assert models.per_client
  client = ids[0]
  np.testing.assert_array_equal(models.params["Dense_0"]["kernel"][client],
                                new.server["params"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(models.params["BatchNorm_0"]["scale"][client],
                                population["bn_params"]["BatchNorm_0/scale"][client])
  np.testing.assert_array_equal(models.model_state["batch_stats"]["BatchNorm_0"]["mean"][client],
                                population["model_state"]["batch_stats"]["BatchNorm_0"]["mean"]
                                [client])


def test_fedbn_client_starts_from_the_global_model_with_its_own_layers():
  runner = make_runner(small_config(algorithm="fedavg", model=MODEL, batch_norm="local"), "vmap")
  state = runner.init(0)
  client_state = jax.tree.map(lambda a: a[0] + 1.0, state.population[0])
  params, model_state = runner.algorithm.client_params(state.server, client_state)
  np.testing.assert_array_equal(params["Dense_1"]["kernel"],
                                state.server["params"]["Dense_1"]["kernel"])
  np.testing.assert_array_equal(params["BatchNorm_1"]["bias"],
                                client_state["bn_params"]["BatchNorm_1/bias"])
  assert model_state is client_state["model_state"]


def test_fedmr_recombines_statistics_with_their_layers():
  params = {"BatchNorm_0": {"bias": jnp.zeros((4, 2)), "scale": jnp.zeros((4, 2))},
            "Dense_0": {"bias": jnp.zeros((4, 2)), "kernel": jnp.zeros((4, 3, 2))},
            "Dense_1": {"bias": jnp.zeros((4, 5)), "kernel": jnp.zeros((4, 2, 5))}}
  stats = {"batch_stats": {"BatchNorm_0": {"mean": jnp.zeros((4, 2)), "var": jnp.zeros((4, 2))}}}
  # Layer granularity: the statistics share the group of their layer's scale and bias.
  assert fedmr.recombination_groups(params, "layer", 0.5, stats) == [0, 0, 1, 1, 2, 2, 0, 0]
  # Tensor granularity: every statistic is a group of its own (the official per-key
  # permutation); without statistics the groups are those of the parameters alone.
  assert fedmr.recombination_groups(params, "tensor", 0.5, stats) == list(range(8))
  assert fedmr.recombination_groups(params, "layer", 0.5) == [0, 0, 1, 1, 2, 2]
  key = jax.random.PRNGKey(3)
  param_perms, stat_perms = fedmr.recombination_permutations(params, key, 4, "layer", 0.5, stats)
  np.testing.assert_array_equal(stat_perms["batch_stats"]["BatchNorm_0"]["mean"],
                                param_perms["BatchNorm_0"]["scale"])
  np.testing.assert_array_equal(stat_perms["batch_stats"]["BatchNorm_0"]["var"],
                                param_perms["BatchNorm_0"]["bias"])
  # The parameters' permutations are the ones drawn without statistics.
  assert_trees_close(param_perms, fedmr.recombination_permutations(params, key, 4, "layer", 0.5))


def test_fedmr_slots_carry_statistics_through_both_stages():
  config = small_config(algorithm="fedmr", model=MODEL, clients_per_round=4,
                        fedmr__first_stage_rounds=1, fedmr__granularity="layer")
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  _, context, uploads, _ = cohort_uploads(runner, state)
  state, _ = runner.run_round(state)   # first stage: every slot gets the mean
  mean_stats = weighted([u["model_state"] for u in uploads], context.weights)
  for s in range(4):
    assert_trees_close(jax.tree.map(lambda a: a[s], state.server["slot_stats"]), mean_stats)
  _, context, uploads, _ = cohort_uploads(runner, state)
  new, _ = runner.run_round(state)   # recombination: slot i's layer from slot perm[i]
  trained = jax.tree.map(lambda *u: np.stack(u), *[u["params"] for u in uploads])
  trained_stats = jax.tree.map(lambda *u: np.stack(u), *[u["model_state"] for u in uploads])
  perms, stat_perms = fedmr.recombination_permutations(
      trained, context.key, 4, "layer", config.fedmr.block_fraction, trained_stats)
  assert_trees_close(new.server["slot_stats"], fedmr.recombine(trained_stats, stat_perms))
  assert_trees_close(new.server["slots"], fedmr.recombine(trained, perms))
  # The model evaluated globally: the slots' mean, statistics included.
  global_model = runner.algorithm.global_model(new.server)
  assert_trees_close(global_model.model_state,
                     jax.tree.map(lambda s: np.mean(np.asarray(s), 0), trained_stats))


@pytest.mark.parametrize("overrides, field", [
    ({"algorithm": "scaffold", "model": MODEL}, "model"),
    ({"algorithm": "fml", "model": MODEL, "batch_norm": "local"}, "batch_norm"),
    ({"algorithm": "fedavg", "model": "mlp", "batch_norm": "local"}, "batch_norm"),
    ({"algorithm": "fedavg", "model": MODEL, "batch_norm": "shared"}, "batch_norm"),
    ({"algorithm": "fedavg", "model": MODEL, "dp_clip": 1.0, "aggregation": "uniform"},
     "dp_clip"),
])
def test_batch_norm_settings_that_cannot_run_are_refused(overrides, field):
  with pytest.raises(ConfigError) as error:
    config_checks.validate(small_config(**overrides))
  assert error.value.field == field

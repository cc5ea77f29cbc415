"""Unreliable clients (fml_jax/rounds/availability.py): dropouts keep their state and
weigh nothing, stragglers take a share of their steps, every executor agrees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import config_checks, local_training
from fml_jax.errors import ConfigError
from fml_jax.rounds.availability import Availability

from conftest import client_row, make_runner, small_config



def test_draws_depend_on_the_round_key_and_the_client_only():
  availability = Availability(dropout_rate=0.3, straggler_rate=0.5, straggler_min_work=0.2)
  key = jax.random.PRNGKey(3)
  ids = jnp.arange(200)
  reports, work = availability.draw(key, ids)
  order = np.random.default_rng(0).permutation(200)
  reports_p, work_p = availability.draw(key, ids[order])
  np.testing.assert_array_equal(np.asarray(reports)[order], reports_p)
  np.testing.assert_array_equal(np.asarray(work)[order], work_p)
  reports, work = np.asarray(reports), np.asarray(work)
  assert 0.2 < 1 - reports.mean() < 0.4                      # about 30% drop
  straggling = work < 1
  assert not (straggling & ~reports).any()                    # a dropout is not a straggler
  assert 0.25 < straggling.mean() < 0.45                      # about 0.5 of the 70% left
  assert work[straggling].min() >= 0.2 and work.max() == 1.0
  # Policy drop: stragglers count as dropouts.
  dropping = Availability(dropout_rate=0.3, straggler_rate=0.5, straggler_min_work=0.2,
                          straggler_policy="drop")
  reports_d, work_d = dropping.draw(key, ids)
  np.testing.assert_array_equal(np.asarray(reports_d), reports & ~straggling)
  np.testing.assert_array_equal(np.asarray(work_d), work)


@pytest.mark.parametrize("work, steps_taken", [(None, 8), (1.0, 8), (0.5, 4), (0.3, 2),
                                               (0.01, 1)])
def test_a_straggler_takes_the_first_share_of_its_own_steps(work, steps_taken):
  """50 examples, batch 16, 2 epochs: 8 steps of its own (the row is padded to 100,
  so 14 steps are scanned); a straggler takes the first floor(work * 8), at least 1."""
  class Data:   # what run_local_steps reads of FederatedData; the step ignores it
    x_train, y_train = jnp.zeros((100, 3)), jnp.zeros(100, jnp.int32)
    normalize = staticmethod(lambda v: v)
    augment_batch = staticmethod(lambda v, key: v)

  def count_steps(carry, x, y, mask, key):
    return carry + 1, {"valid": jnp.sum(mask).astype(jnp.float32)}

  carry, metrics = local_training.run_local_steps(
      count_steps, jnp.int32(0), Data, jnp.arange(100), jnp.asarray(50), jax.random.PRNGKey(0),
      local_epochs=2, batch_size=16, work=None if work is None else jnp.float32(work))
  assert int(carry) == steps_taken
  # Metrics average over the steps taken: each full batch has 16 valid examples, the
  # last of an epoch 2.
  expected = [16, 16, 16, 2, 16, 16, 16, 2][:steps_taken]
  assert float(metrics["valid"]) == pytest.approx(np.mean(expected))


@pytest.mark.parametrize("name", ["fml", "fedavg"])
def test_dropped_clients_keep_their_state_and_the_server_averages_the_others(name):
  """FML averages the reporting memes uniformly, FedAvg weighs the reporting clients by
  their example counts; the others weigh nothing and keep their state."""
  config = small_config(algorithm=name, dropout_rate=0.5, clients_per_round=6, seed=1)
  runner = make_runner(config, "vmap")
  algorithm = runner.algorithm
  state = runner.init(config.seed)
  before = jax.device_get(state)
  (cohort,), context = runner.begin_round(state)
  reports = np.asarray(context.reports)
  assert reports.any() and not reports.all(), reports   # seed 1 drops some, not all
  sizes = np.asarray(cohort.clients.train_n, np.float64) if name == "fedavg" else np.ones(6)
  weights = np.where(reports, sizes, 0.0)
  np.testing.assert_allclose(np.asarray(context.weights), weights / weights.sum(), rtol=1e-6)
  # The reference: each reporting client's update on its own, averaged with its weight.
  uploads = []
  for i in np.flatnonzero(reports):
    result = algorithm.client_update(before.server, client_row(cohort.client_state, i),
                                     client_row(cohort.clients, i), runner.data, 0)
    uploads.append(jax.tree.map(lambda u, w=weights[i] / weights.sum(): w * np.asarray(u),
                                result.upload))
  expected = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *uploads)
  after, report = runner.run_round(state)
  after = jax.device_get(after)
  chex.assert_trees_all_close(after.server["params"], expected, rtol=1e-5, atol=1e-6)
  ids = np.asarray(cohort.clients.id)
  for i, client in enumerate(ids):   # all 6 clients take part: row = id
    same = jax.tree.map(lambda a, b: np.array_equal(a[client], b[client]),
                        after.population[0], before.population[0])
    if jax.tree.leaves(same):   # FedAvg's clients keep no state
      assert all(jax.tree.leaves(same)) == (not reports[i]), (client, reports[i])
  assert float(report.metrics["clients_dropped"]) == (~reports).sum()
  assert float(report.metrics["round_skipped"]) == 0.0


def test_a_round_nobody_reports_keeps_every_state():
  config = small_config(algorithm="fedavg", dropout_rate=0.999)
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  before = jax.device_get(state)
  after, report = runner.run_round(state)
  chex.assert_trees_all_equal(jax.device_get(after.server), before.server)
  assert float(report.metrics["round_skipped"]) == 1.0
  assert float(report.metrics["clients_dropped"]) == config.clients_per_round
  assert bool(report.all_finite)


UNRELIABLE = dict(dropout_rate=0.3, straggler_rate=0.5, straggler_min_work=0.2)


@pytest.mark.parametrize("name", ["fml", "fedavg", "local"])
def test_every_executor_and_store_agree_with_unreliable_clients(name):
  config = small_config(algorithm=name, **UNRELIABLE)
  finals = {}
  for strategy, placement in (("sequential", "device"), ("vmap", "device"), ("vmap", "host")):
    runner = make_runner(config, strategy, placement)
    state = runner.init(config.seed)
    metrics = []
    for _ in range(3):
      state, report = runner.run_round(state)
      metrics.append(jax.device_get(report.metrics))
    finals[(strategy, placement)] = (jax.device_get(state), metrics)
  reference, reference_metrics = finals[("sequential", "device")]
  dropped = sum(m["clients_dropped"] for m in reference_metrics)
  straggling = sum(m["clients_straggling"] for m in reference_metrics)
  assert dropped > 0 and straggling > 0   # the three rounds exercise both
  for (state, metrics) in finals.values():
    chex.assert_trees_all_close(state.server, reference.server, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(state.population, reference.population, rtol=1e-4, atol=1e-5)
    for m, r in zip(metrics, reference_metrics):
      assert m["clients_dropped"] == r["clients_dropped"]
      assert m["clients_straggling"] == r["clients_straggling"]


def test_stragglers_change_fedavgs_result():
  plain = make_runner(small_config(algorithm="fedavg"), "vmap")
  slow = make_runner(small_config(algorithm="fedavg", straggler_rate=1.0,
                                  straggler_min_work=0.1), "vmap")
  a, _ = plain.run_round(plain.init(0))
  b, report = slow.run_round(slow.init(0))
  assert float(report.metrics["clients_straggling"]) == 4
  diff = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                      a.server["params"], b.server["params"])
  assert max(jax.tree.leaves(diff)) > 1e-4


@pytest.mark.parametrize("overrides, field, message", [
    (dict(dropout_rate=1.0), "dropout_rate", "outside"),
    (dict(straggler_rate=-0.1), "straggler_rate", "outside"),
    (dict(straggler_min_work=0.0), "straggler_min_work", "outside"),
    (dict(straggler_policy="wait"), "straggler_policy", "keep, drop"),
    (dict(algorithm="fedmd", public_size=60, dropout_rate=0.2), "dropout_rate",
     "those that do: ditto, fedavg, feddistill, fedgen, fedgh, fedkd, fedproto, fedprox, "
         "fedrep, fedtgp, fml, lgfedavg, local, scaffold"),
    (dict(algorithm="fedmr", straggler_rate=0.2), "straggler_rate", "does not model"),
])
def test_bad_availability_settings_name_the_setting(overrides, field, message):
  with pytest.raises(ConfigError) as error:
    config_checks.validate(small_config(**overrides))
  assert error.value.field == field and message in str(error.value)

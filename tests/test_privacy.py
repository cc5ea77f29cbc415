"""DP-FedAvg: clipping, the noise's scale, and epsilon against dp-accounting itself."""

import json

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import rdp

from fml_jax import config_checks, train
from fml_jax.algorithms.aggregation import ServerOptimizer, private_mean
from fml_jax.errors import ConfigError
from fml_jax.privacy import PrivacyAccountant, quiet_accountant

from conftest import make_runner, small_config

PLAIN_SERVER = small_config().server


def test_each_update_is_clipped_to_the_norm_before_the_mean():
  params = {"w": jnp.zeros((3,)), "b": jnp.ones(())}
  # Three clients' updates with norms 5, 0.5 and 2 (over both leaves).
  uploads = {"w": jnp.array([[3.0, 4.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 2.0]]),
             "b": jnp.array([1.0, 1.4, 1.0])}
  mean, clipped = private_mean(params, uploads, clip=1.0, noise_multiplier=0.0,
                               key=jax.random.PRNGKey(0))
  deltas = np.array([[3, 4, 0, 0], [0.3, 0, 0, 0.4], [0, 0, 2, 0]], np.float64)
  norms = np.linalg.norm(deltas, axis=1)
  expected = (deltas * np.minimum(1, 1.0 / norms)[:, None]).sum(0) / 3
  np.testing.assert_allclose(np.asarray(mean["w"]), expected[:3], rtol=1e-6)
  np.testing.assert_allclose(float(mean["b"]), 1 + expected[3], rtol=1e-6)
  assert float(clipped) == pytest.approx(2 / 3)
  # No update moves the mean by more than clip / cohort size.
  for i in range(3):
    one = jax.tree.map(lambda u, i=i: u.at[i].set(u[i] * 100), uploads)
    moved, _ = private_mean(params, one, 1.0, 0.0, jax.random.PRNGKey(0))
    shift = np.sqrt(sum(float(jnp.sum((moved[k] - mean[k]) ** 2)) for k in mean))
    assert shift <= 2 * 1.0 / 3 + 1e-6


def test_the_noise_has_the_stated_standard_deviation():
  """Identical uploads equal to the global model: the mean moves by the noise alone,
  N(0, (noise_multiplier * clip)^2) per coordinate divided by the cohort size."""
  k, clip, z = 4, 0.5, 1.3
  params = {"w": jnp.zeros((200_000,))}
  uploads = {"w": jnp.zeros((k, 200_000))}
  mean, _ = private_mean(params, uploads, clip, z, jax.random.PRNGKey(7))
  noise = np.asarray(mean["w"], np.float64)
  target = z * clip / k
  # The sample std of 200,000 normals is within 1% of the truth with overwhelming
  # probability (its relative standard error is 1 / sqrt(2n) = 0.16%).
  assert np.std(noise) == pytest.approx(target, rel=0.01)
  assert abs(np.mean(noise)) < 5 * target / np.sqrt(noise.size)


def test_the_server_optimizer_with_dp_reports_the_clipped_share():
  optimizer = ServerOptimizer(PLAIN_SERVER, dp_clip=1.0, dp_noise_multiplier=0.0)
  params = {"w": jnp.zeros(2)}
  uploads = {"w": jnp.array([[3.0, 4.0], [0.1, 0.0]])}
  new, _, metrics = optimizer.step(params, {}, uploads, jnp.array([0.5, 0.5]),
                                   jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(new["w"]), [(0.6 + 0.1) / 2, 0.8 / 2], rtol=1e-6)
  assert float(metrics["dp_clipped_share"]) == 0.5


@pytest.mark.parametrize("num_clients, per_round, z", [(100, 10, 1.0), (30, 10, 2.0),
                                                       (10, 10, 1.5)])
def test_epsilon_matches_dp_accounting_called_directly(num_clients, per_round, z):
  accountant = PrivacyAccountant(num_clients, per_round, z, 1e-5)
  for rounds in (1, 7, 30):
    gaussian = dp_accounting.GaussianDpEvent(z / 2)   # replace-one: sensitivity 2 * clip
    event = (gaussian if per_round == num_clients else
             dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, gaussian))
    direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    with quiet_accountant():   # (and leaves absl's logger as it was for later tests)
      direct.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
      epsilon = direct.get_epsilon(1e-5)
    assert accountant.epsilon(rounds) == pytest.approx(epsilon, rel=1e-9)
  assert accountant.epsilon(0) == 0.0
  assert accountant.epsilon(30) > accountant.epsilon(7) > accountant.epsilon(1)
  assert PrivacyAccountant(num_clients, per_round, 0.0, 1e-5).epsilon(3) == float("inf")


def test_dp_fedavg_run_reports_epsilon_and_clipping(tmp_path):
  config = small_config(algorithm="fedavg", aggregation="uniform", dp_clip=0.5,
                        dp_noise_multiplier=1.0, num_rounds=3, checkpoint_every=0)
  summary = train.run(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  accountant = PrivacyAccountant(config.num_clients, config.clients_per_round, 1.0, 1e-5)
  assert [r["dp_epsilon"] for r in records] == pytest.approx(
      [accountant.epsilon(r) for r in (1, 2, 3)])
  assert all(0.0 <= r["dp_clipped_share"] <= 1.0 for r in records)
  assert summary["final"]["dp_epsilon"] == records[-1]["dp_epsilon"]


@pytest.mark.parametrize("name", ["ditto", "fedrep"])
def test_dp_applies_to_the_personalized_algorithms_uploads(name):
  config = small_config(algorithm=name, aggregation="uniform", dp_clip=0.2,
                        dp_noise_multiplier=0.0)
  runner = make_runner(config, "vmap")
  state, report = runner.run_round(runner.init(0))
  assert bool(report.all_finite)
  assert float(report.metrics["dp_clipped_share"]) > 0   # updates longer than 0.2 were cut
  # Without noise the global part moved by the mean of updates clipped to 0.2: at most 0.2.
  assert float(report.metrics["server_update_norm"]) <= 0.2 + 1e-6


def test_dp_noise_is_identical_across_strategies():
  config = small_config(algorithm="fml", dp_clip=0.3, dp_noise_multiplier=0.8)
  finals = []
  for strategy in ("sequential", "vmap"):
    runner = make_runner(config, strategy)
    state = runner.init(config.seed)
    for _ in range(2):
      state, _ = runner.run_round(state)
    finals.append(jax.device_get(state.server))
  chex.assert_trees_all_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, field, message", [
    (dict(algorithm="fedavg", dp_clip=1.0), "aggregation", "set aggregation=uniform"),
    (dict(dp_clip=-1.0), "dp_clip", "outside"),
    (dict(dp_clip=1.0, dp_delta=0.0), "dp_delta", "outside"),
    (dict(dp_clip=1.0, dp_noise_multiplier=-1.0), "dp_noise_multiplier", "outside"),
    (dict(algorithm="local", dp_clip=1.0), "dp_clip", "does not send model updates"),
    (dict(dp_clip=1.0, dropout_rate=0.2), "dropout_rate", "not both"),
])
def test_bad_dp_settings_name_the_setting(overrides, field, message):
  with pytest.raises(ConfigError) as error:
    config_checks.validate(small_config(**overrides))
  assert error.value.field == field and message in str(error.value)

"""lr_schedule: one factor on every algorithm's client learning rate, per round."""

import chex
import jax
import pytest

from fml_jax import config_checks, schedules
from fml_jax.errors import ConfigError

from conftest import make_runner, small_config


def test_fml_official_steps_by_a_tenth_every_third_of_the_rounds():
  assert schedules.clients_lr_table("fml_official", 50) == (
      [0, 16, 32, 48], [1.0, 0.1, pytest.approx(0.01), pytest.approx(0.001)])
  assert schedules.clients_lr_table("", 50) == ([0], [1.0])
  assert schedules.clients_lr_table("0:1,3:0.5", 10) == ([0, 3], [1.0, 0.5])


def run(config, rounds=2):
  runner = make_runner(config, "vmap")
  state = runner.init(0)
  for _ in range(rounds):
    state, _ = runner.run_round(state)
  return jax.device_get(state)


# Plain SGD: a factor on every update is a factor on the learning rate. SCAFFOLD's
# control variates must divide by the learning rate in force, not the configured one.
@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedrep", "ditto", "local", "fml", "fedmr"])
def test_a_constant_factor_equals_that_learning_rate(name):
  base = dict(algorithm=name, momentum=0.0, weight_decay=0.0)
  scheduled = run(small_config(**base, learning_rate=0.02, lr_schedule="0:0.5"))
  halved = run(small_config(**base, learning_rate=0.01))
  chex.assert_trees_all_close(scheduled.server, halved.server, rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(scheduled.population, halved.population, rtol=2e-4, atol=1e-6)


def test_the_factor_changes_at_its_round():
  """'0:1,1:0' trains in round 0 only: round 1 leaves FedAvg's model where it was."""
  base = dict(algorithm="fedavg", momentum=0.0, weight_decay=0.0)
  one_round = run(small_config(**base), rounds=1)
  frozen_after = run(small_config(**base, lr_schedule="0:1,1:1e-30"), rounds=2)
  chex.assert_trees_all_close(frozen_after.server["params"], one_round.server["params"],
                              rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_schedule="1:0.5"), "rounds must start at 0"),
    (dict(lr_schedule="0:0"), "outside"),
    (dict(algorithm="fedmd", public_size=60, lr_schedule="fml_official"), "own optimizer"),
])
def test_bad_lr_schedules_name_the_setting(overrides, message):
  with pytest.raises(ConfigError) as error:
    config_checks.validate(small_config(**overrides))
  assert error.value.field == "lr_schedule" and message in str(error.value)

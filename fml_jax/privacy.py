"""DP-FedAvg's privacy accounting (McMahan et al. 2018), by Google's `dp-accounting`.

The mechanism (fml_jax/algorithms/aggregation.py, `ServerOptimizer`): every sampled
client's update (its upload minus the global model) is clipped to L2 norm `dp_clip`,
the clipped updates are summed, Gaussian noise of standard deviation
`dp_noise_multiplier * dp_clip` is added to the sum, and the sum is divided by the
cohort size (uniform weights). User-level privacy: a neighbouring federation differs
in one client's whole data.

The accountant: each round samples `clients_per_round` of `num_clients` clients
without replacement, a fixed-size sample, which dp-accounting's RDP accountant
models under *replace-one* adjacency (Wang, Balle and Kasiviswanathan 2019). Replacing
one client moves the clipped sum by up to 2 * dp_clip, so the accountant sees the
noise multiplier dp_noise_multiplier / 2 (conservative: the same noise counts for
half as much as under add-or-remove adjacency with Poisson sampling, which this
program does not do). Rounds compose; `epsilon(rounds)` is the epsilon at `dp_delta`.

Against the paper (../shared/ALGORITHMS.md, DP-FedAvg): the paper Poisson-samples users
with probability q, divides the sum by the fixed qW and projects every local step onto
the clipping ball; this program keeps its fixed-size cohorts, divides by the cohort
size and clips once per round (as Flower's fixed-clipping wrappers do), and its
accountant is the one that models that sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Optional

from fml_jax import settings
from fml_jax.errors import ConfigError


@contextlib.contextmanager
def quiet_accountant():
  """dp-accounting warns through absl for every RDP order whose series it cannot sum
  (those orders are then left out, as they should be); keep the console readable."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def one_round_event(num_clients: int, clients_per_round: int, noise_multiplier: float):
  """The dp-accounting event of one round (see the module docstring)."""
  import dp_accounting   # pylint: disable=g-import-not-at-top  (only runs with DP need it)
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)   # sensitivity 2 * clip
  if clients_per_round == num_clients:   # everyone every round: no amplification
    return gaussian
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)


def make_accountant():
  import dp_accounting   # pylint: disable=g-import-not-at-top
  from dp_accounting import rdp   # pylint: disable=g-import-not-at-top
  return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


@dataclasses.dataclass(frozen=True)
class PrivacyAccountant:
  """Epsilon after r rounds: the RDP of one round is computed once (the accountant's
  slow part) and scaled by r, which is exactly what composing r rounds does."""
  num_clients: int
  clients_per_round: int
  noise_multiplier: float
  delta: float

  @classmethod
  def from_config(cls, config) -> Optional["PrivacyAccountant"]:
    if not config.get("dp_clip", 0.0):
      return None
    return cls(config.num_clients, config.clients_per_round, config.dp_noise_multiplier,
               config.dp_delta)

  def __post_init__(self):
    if self.noise_multiplier <= 0:
      object.__setattr__(self, "_rdp_one_round", None)   # no noise: no guarantee
      return
    accountant = make_accountant()
    with quiet_accountant():
      accountant.compose(one_round_event(self.num_clients, self.clients_per_round,
                                         self.noise_multiplier))
    # The accountant's RDP at each of its orders after one round (rounds add up).
    object.__setattr__(self, "_rdp_one_round", (accountant._orders, accountant._rdp))  # pylint: disable=protected-access

  def epsilon(self, rounds: int) -> float:
    """Epsilon at `delta` after `rounds` rounds (inf without noise, 0 before any)."""
    if rounds <= 0:
      return 0.0
    if self._rdp_one_round is None:
      return math.inf
    from dp_accounting.rdp import rdp_privacy_accountant   # pylint: disable=g-import-not-at-top
    orders, rdp = self._rdp_one_round
    with quiet_accountant():
      epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, self.delta)
    return float(epsilon)


def check_dp_settings(config, cls) -> None:
  """The dp_* settings: numbers in range, an algorithm whose server averages models
  through the server optimizer, and aggregation the accountant can vouch for."""
  settings.number(config, "dp_clip", 0)
  if not config.dp_clip:
    return
  settings.number(config, "dp_noise_multiplier", 0)
  settings.number(config, "dp_delta", 0, 1, low_open=True, high_open=True)
  if not cls.supports_dp:
    raise ConfigError("dp_clip", f"{cls.name} does not send model updates through the "
                      "server's averaging, so DP-FedAvg's clipping and noise do not apply")
  aggregation = cls.default_aggregation if config.aggregation == "auto" else config.aggregation
  if aggregation != "uniform":
    raise ConfigError("aggregation", f"DP-FedAvg averages clipped updates with uniform weights "
                      f"(a weight per example count would let one client's data weigh more "
                      f"than dp_clip); set aggregation=uniform ({cls.name}'s auto is "
                      f"{cls.default_aggregation})")
  if config.dropout_rate:
    raise ConfigError("dropout_rate", "with dropouts the number of updates summed varies, "
                      "which the accountant does not model; use dp_clip or dropout_rate, "
                      "not both")

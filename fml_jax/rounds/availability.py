"""Unreliable clients: dropouts and stragglers, drawn inside the round.

  dropout_rate        each sampled client fails to report with this probability: its
                      upload gets weight 0 (the others' weights renormalize) and its
                      persistent state stays as it was. If nobody reports, the server
                      state stays as it was too (metric `round_skipped`).
  straggler_rate      each reporting client is a straggler with this probability: it
                      completes only a share of its local steps, uniform in
                      [straggler_min_work, 1) (at least one step), the systems
                      heterogeneity of FedProx (Li et al. 2020).
  straggler_policy    keep: a straggler's partial work is aggregated (FedProx);
                      drop: it counts as a dropout (FedAvg in the FedProx paper).

Every draw is a function of the round's key and the client's id alone, so the same
clients drop and straggle whatever the executor, store or device count, after a
resume, and in every algorithm run with the same seed (paired runs). Metrics per
round: `clients_dropped`, `clients_straggling` (of the cohort) and `round_skipped`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

STRAGGLER_POLICIES = ("keep", "drop")
# The round key is folded with 0 (sampling), 1 (clients), 2 (server); this is 3.
AVAILABILITY_FOLD = 3


@dataclasses.dataclass(frozen=True)
class Availability:
  dropout_rate: float = 0.0
  straggler_rate: float = 0.0
  straggler_min_work: float = 0.1
  straggler_policy: str = "keep"

  @classmethod
  def from_config(cls, config) -> Optional["Availability"]:
    """The config's availability settings; None when every client always reports
    everything (the round then compiles exactly as without this module)."""
    if not config.get("dropout_rate", 0.0) and not config.get("straggler_rate", 0.0):
      return None
    return cls(config.dropout_rate, config.straggler_rate, config.straggler_min_work,
               config.straggler_policy)

  @property
  def has_stragglers(self) -> bool:
    return self.straggler_rate > 0

  def draw(self, round_key: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """((k,) bool: the client reports, (k,) float32: the share of its local steps it
    completes) for the clients `ids`, from the round's key."""
    key = jax.random.fold_in(round_key, AVAILABILITY_FOLD)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (3,)))(ids)
    dropped = u[:, 0] < self.dropout_rate
    straggling = (u[:, 1] < self.straggler_rate) & ~dropped
    work = jnp.where(straggling, self.straggler_min_work + (1 - self.straggler_min_work) * u[:, 2],
                     1.0).astype(jnp.float32)
    reports = ~dropped
    if self.straggler_policy == "drop":
      reports = reports & ~straggling
    return reports, work

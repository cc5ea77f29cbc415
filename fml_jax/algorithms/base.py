"""What an algorithm is, as far as the engine is concerned.

An algorithm supplies pure functions; the engine decides how clients execute
(vmapped, or one by one) and does sampling, gathering, scattering and averaging:

  init(key, num_clients)          -> (server_state, population)
      `population` holds every client's persistent state, each leaf with a
      leading axis of size num_clients (FML: local params + optimizer state).
  client_update(server_state, client_state, train_idx, train_n, key, data)
                                  -> ClientResult (one client; no client axis)
  server_update(server_state, mean_upload) -> server_state
      `mean_upload` is the (uniform or example-weighted) mean over the cohort
      of every client's `upload`.
  global_model / personalized_model: what evaluation runs.

Add an algorithm by subclassing `Algorithm` and registering it in
`fml_jax/algorithms/__init__.py`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax

from fml_jax.data import FederatedData
from fml_jax.local_training import run_local_steps


@flax.struct.dataclass
class ClientResult:
  client_state: Any   # the client's new persistent state (same structure as its population slice)
  upload: Any         # what the server averages (may be an empty tuple)
  metrics: dict       # scalar training metrics, e.g. {"train_loss": ...}


class Algorithm(abc.ABC):
  """Base class: holds the settings, models and optimizer; all methods are pure."""

  name: str = ""
  default_aggregation: str = "uniform"   # "uniform" | "weighted" (by train example count)

  def __init__(self, config, num_classes: int, input_shape: tuple):
    self.config = config
    self.num_classes = num_classes
    self.input_shape = input_shape

  @abc.abstractmethod
  def init(self, key: jax.Array, num_clients: int) -> tuple[Any, Any]:
    ...

  @abc.abstractmethod
  def client_update(self, server_state, client_state, train_idx: jax.Array, train_n: jax.Array,
                    key: jax.Array, data: FederatedData) -> ClientResult:
    ...

  def server_update(self, server_state, mean_upload):
    return server_state

  def global_model(self, server_state) -> Optional[tuple[nn.Module, Any]]:
    """(model, params) of the global model, or None if the algorithm has none."""
    return None

  @abc.abstractmethod
  def personalized_model(self, server_state, population) -> tuple[nn.Module, Any, bool]:
    """(model, params, per_client): each client's model for personalized evaluation.

    per_client=True: params have a leading client axis; False: one set shared by all.
    """

  def train(self, step_fn, carry, train_idx, train_n, key, data):
    """Runs this algorithm's step over the client's local epochs (shared machinery)."""
    return run_local_steps(step_fn, carry, data, train_idx, train_n, key,
                           self.config.local_epochs, self.config.batch_size)

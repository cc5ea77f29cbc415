"""What an algorithm is, as far as the engine is concerned.

An algorithm supplies pure functions; the engine decides how clients execute
(vmapped, or one by one) and does sampling, gathering, scattering and averaging:

  init(key, num_clients)          -> (server_state, population)
      `population` holds every client's persistent state, each leaf with a
      leading axis of size num_clients (FML: local params + optimizer state).
  client_update(server_state, client_state, client: ClientInfo, data)
                                  -> ClientResult (one client; no client axis)
  server_update(server_state, uploads, context: RoundContext) -> server_state
      `uploads` stacks every cohort member's upload (leading axis k); most
      algorithms average them with `mean_over_clients(uploads, context.weights)`
      (the weights are uniform or by example count, per `aggregation`).
  global_model / personalized_model: what evaluation runs.

Add an algorithm by subclassing `Algorithm` and registering it in
`fml_jax/algorithms/__init__.py`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fml_jax import losses
from fml_jax.data import FederatedData
from fml_jax.local_training import run_local_steps
from fml_jax.models import apply_model


@flax.struct.dataclass
class ClientInfo:
  """Who a client is this round (batched over the cohort in `RoundContext.clients`)."""
  id: jax.Array         # () int32, index into the population
  position: jax.Array   # () int32, place in the cohort: 0 .. clients_per_round - 1
  train_idx: jax.Array  # (max_n,) its row of the data's index table
  train_n: jax.Array    # () how many entries of the row are real
  key: jax.Array        # its PRNG key for this round (depends on round and id only)


@flax.struct.dataclass
class RoundContext:
  """What the server sees when it updates at the end of a round."""
  round: jax.Array      # () int32, 0-based index of the round that just ran
  clients: ClientInfo   # the cohort, leading axis k
  weights: jax.Array    # (k,) aggregation weights, summing to 1
  key: jax.Array        # PRNG key for the server's own randomness this round


def mean_over_clients(tree, weights: jax.Array):
  """Weighted mean over the leading (client) axis of every leaf; weights sum to 1."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


@dataclasses.dataclass(frozen=True)
class PersonalizedModels:
  """The models personalized evaluation runs, and on whose test splits.

  per_client=True: `params` have a leading axis, one entry per evaluated client;
  False: one set of params shared by all. `client_ids` (numpy/jax ints) names the
  clients whose test splits are used, in the order of that axis; None means all
  clients 0 .. num_clients - 1.
  """
  model: nn.Module
  params: Any
  per_client: bool
  client_ids: Any = None


def supervised_step(model: nn.Module, optimizer, regularizer=None):
  """An optimizer step on masked cross-entropy (plus `regularizer(params)` if given):
  the local step of FedAvg, FedProx, FedMR and local-only training."""
  def step(state, x, y, mask, key):
    del key

    def loss_fn(params):
      loss = losses.cross_entropy(apply_model(model, params, x), y, mask)
      return loss + regularizer(params) if regularizer is not None else loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads, optimizer), {"train_loss": loss}
  return step


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
  def client_update(self, server_state, client_state, client: ClientInfo,
                    data: FederatedData) -> ClientResult:
    ...

  def server_update(self, server_state, uploads, context: RoundContext):
    return server_state

  def global_model(self, server_state) -> Optional[tuple[nn.Module, Any]]:
    """(model, params) of the global model, or None if the algorithm has none."""
    return None

  @abc.abstractmethod
  def personalized_model(self, server_state, population) -> PersonalizedModels:
    """Each client's model for personalized evaluation on its own test split."""

  def train(self, step_fn, carry, client: ClientInfo, data):
    """Runs this algorithm's step over the client's local epochs (shared machinery)."""
    return run_local_steps(step_fn, carry, data, client.train_idx, client.train_n, client.key,
                           self.config.local_epochs, self.config.batch_size)

"""What an algorithm is, as far as the engine is concerned.

An algorithm supplies pure functions; the engine decides how clients execute
(vmapped, or one by one) and does sampling, gathering, scattering and averaging:

  client_groups(num_clients)      -> (num_clients,) int: each client's architecture
      group (clients whose persistent state has the same shapes; default: one group).
  init(key, group_sizes)          -> (server_state, population)
      `population` is a tuple with one entry per group: that group's clients'
      persistent state, each leaf with a leading axis of the group's size
      (FML: local params + optimizer state).
  warm_start(client_state, client, data, group) -> client_state   (optional)
      training before the first round, every client (FedMD's transfer learning).
  prepare_round(server_state, context, data) -> server_state   (optional)
      server-side work before clients run (FedMD: draw the alignment subset).
  client_message(server_state, client_state, client, data, group) -> message
  exchange(server_state, messages, context) -> server_state
      (only if `exchanges_messages`): a first pass over the cohort whose outputs,
      stacked over the whole cohort, the server combines before training (FedMD's
      consensus, FedH2L's peer posteriors).
  client_update(server_state, client_state, client: ClientInfo, data, group)
                                  -> ClientResult (one client; no client axis)
  server_update(server_state, uploads, context: RoundContext) -> server_state
      `uploads` stacks every cohort member's upload (leading axis k, all groups
      concatenated); most algorithms average them with
      `mean_over_clients(uploads, context.weights)` (the weights are uniform or by
      example count, per `aggregation`).
  global_model / personalized_models: what evaluation runs.
  communication(...): bytes sent up and down per round.

Add an algorithm by subclassing `Algorithm` and registering it in
`fml_jax/algorithms/__init__.py`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fml_jax import losses
from fml_jax.data import FederatedData
from fml_jax.errors import ConfigError
from fml_jax.local_training import run_local_steps
from fml_jax.models import forward


@flax.struct.dataclass
class ClientInfo:
  """Who a client is this round (batched over the cohort in `RoundContext.clients`)."""
  id: jax.Array         # () int32, index into the population
  position: jax.Array   # () int32, place in the cohort: 0 .. clients_per_round - 1
  train_idx: jax.Array  # (max_train,) its indices into x_train (data.train_rows), 0-padded
  train_n: jax.Array    # () how many entries of the row are real
  key: jax.Array        # its PRNG key for this round (depends on round and id only)
  round: jax.Array      # () int32, 0-based index of the round being run


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

  per_client=True: `params` (and `model_state`) have a leading axis, one entry per
  evaluated client; False: one set shared by all. `client_ids` (numpy/jax ints)
  names the clients whose test splits are used, in the order of that axis; None
  means all clients 0 .. num_clients - 1. `label_map` (numpy int array over the
  dataset's classes) maps a label into the clients' task (-1: not part of it);
  None for the dataset's own labels.
  """
  model: nn.Module
  params: Any
  per_client: bool
  client_ids: Any = None
  model_state: Any = None
  label_map: Any = None


def split_list(value: str) -> list[str]:
  """'a, b,c' -> ['a', 'b', 'c']; '' -> []."""
  return [v.strip() for v in str(value).split(",") if v.strip()]


def assign_to_clients(names: Sequence, num_clients: int, field: str) -> list:
  """Round-robin assignment of `names` to clients (client i gets names[i % len]); a
  list of exactly num_clients entries is an explicit per-client assignment."""
  names = list(names)
  if not names:
    raise ConfigError(field, "is empty")
  return [names[i % len(names)] for i in range(num_clients)]


def groups_of(keys: Sequence) -> tuple[np.ndarray, list]:
  """Clients with equal keys form a group; groups are numbered by first appearance.
  Returns ((num_clients,) group ids, the key of each group)."""
  distinct = list(dict.fromkeys(keys))
  return np.array([distinct.index(k) for k in keys], np.int32), distinct


def supervised_step(model: nn.Module, optimizer, regularizer=None, label_map=None):
  """An optimizer step on masked cross-entropy (plus `regularizer(params)` if given):
  the local step of FedAvg, FedProx, FedMR, FedMD and local-only training. With
  `label_map`, labels are first mapped into the model's task."""
  def step(state, x, y, mask, key):
    if label_map is not None:
      y = jnp.asarray(label_map)[y]

    def loss_fn(params):
      logits, model_state = forward(model, params, state.model_state, x, True, key)
      loss = losses.cross_entropy(logits, y, mask)
      return (loss + regularizer(params) if regularizer is not None else loss), model_state

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, optimizer).replace(model_state=model_state)
    return state, {"train_loss": loss}
  return step


def tree_bytes(tree) -> int:
  """Bytes of every leaf of a tree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@flax.struct.dataclass
class ClientResult:
  client_state: Any   # the client's new persistent state (same structure as its population slice)
  upload: Any         # what the server averages (may be an empty tuple)
  metrics: dict       # scalar training metrics, e.g. {"train_loss": ...}


class Algorithm(abc.ABC):
  """Base class: holds the settings, models and optimizer; all methods are pure."""

  name: str = ""
  default_aggregation: str = "uniform"   # "uniform" | "weighted" (by train example count)
  exchanges_messages: bool = False       # whether client_message / exchange run
  # Whether evaluation also scores every client's own model on the whole global test
  # set (methods that aim at models good on the whole distribution: FedMD, FedH2L).
  evaluates_clients_on_global_test: bool = False

  def __init__(self, config, num_classes: int, input_shape: tuple):
    self.config = config
    self.num_classes = num_classes
    self.input_shape = input_shape

  def client_groups(self, num_clients: int) -> np.ndarray:
    """(num_clients,) each client's architecture group; one group by default."""
    return np.zeros(num_clients, np.int32)

  @abc.abstractmethod
  def init(self, key: jax.Array, group_sizes: tuple) -> tuple[Any, tuple]:
    ...

  def prepare_round(self, server_state, context: RoundContext, data: FederatedData):
    return server_state

  has_warm_start: bool = False

  def warm_start(self, client_state, client: ClientInfo, data: FederatedData, group: int):
    """Training before the first round (FedMD's transfer learning), one client."""
    return client_state

  def client_message(self, server_state, client_state, client: ClientInfo,
                     data: FederatedData, group: int):
    raise NotImplementedError(f"{self.name} exchanges no messages")

  def exchange(self, server_state, messages, context: RoundContext):
    return server_state

  @abc.abstractmethod
  def client_update(self, server_state, client_state, client: ClientInfo,
                    data: FederatedData, group: int) -> ClientResult:
    ...

  def server_update(self, server_state, uploads, context: RoundContext):
    return server_state

  def global_model(self, server_state) -> Optional[tuple[nn.Module, Any]]:
    """(model, params) of the global model, or None if the algorithm has none."""
    return None

  @abc.abstractmethod
  def personalized_models(self, server_state, population) -> list[PersonalizedModels]:
    """Each client's model for personalized evaluation on its own test split
    (one entry per architecture group, or one shared model)."""

  def broadcast(self, server_state):
    """What every cohort member downloads at the start of a round (for the byte count)."""
    return server_state

  def communication(self, server_shapes, upload_bytes: int, message_bytes: int,
                    cohort_size: int) -> dict:
    """Bytes per round: up = every upload and message of the cohort; down = the
    broadcast, once per cohort member. Algorithms with peer-to-peer traffic override."""
    return {"bytes_up": upload_bytes + message_bytes,
            "bytes_down": cohort_size * tree_bytes(self.broadcast(server_shapes))}

  def train(self, step_fn, carry, client: ClientInfo, data):
    """Runs this algorithm's step over the client's local epochs (shared machinery)."""
    return run_local_steps(step_fn, carry, data, client.train_idx, client.train_n, client.key,
                           self.config.local_epochs, self.config.batch_size,
                           min_examples=data.min_train)

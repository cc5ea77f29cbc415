"""What an algorithm is, as far as a round is concerned: pure functions and what it can do.

An algorithm supplies pure functions; the round (fml_jax/rounds/protocol.py) decides
nothing about how clients execute (executors) or where their state lives (stores):

  client_groups(num_clients)      -> (num_clients,) int: each client's architecture
      group (clients whose persistent state has the same shapes; default: one group).
  init(key, group_sizes)          -> (server_state, population)
      draw the global model from `global_model_key(key)` and clients' private models
      from `client_models_key(key)` (below), so that runs pair across algorithms.
      `population` is a tuple with one entry per group: that group's clients'
      persistent state, each leaf with a leading axis of the group's size.
  warm_start(client_state, client, data, group) -> client_state   (if `has_warm_start`)
      training before the first round, every client (FedMD's transfer learning).
  prepare_round(server_state, context, data) -> server_state
      server-side work before clients run (FedMD: draw the alignment subset).
  client_message(server_state, client_state, client, data, group) -> message
  exchange(server_state, messages, context) -> server_state
      (only if `exchanges_messages`): a first pass over the cohort whose outputs,
      stacked over the whole cohort, the server combines before training.
  client_update(server_state, client_state, client, data, group) -> ClientResult
      one client, no client axis.
  server_update(server_state, uploads, context) -> (server_state, metrics)
      `uploads` stacks every cohort member's upload (all groups concatenated, in
      cohort order); `metrics` is a dict of scalars written beside the client means
      (fml_jax/algorithms/aggregation.py averages and applies the server optimizer).
  global_model / personalized_models: what evaluation runs.
  broadcast / communication: bytes sent up and down per round.

Settings: an algorithm owns one config section (`config_section`, e.g. `fml` for
`--config.fml.alpha`) whose defaults are `defaults()` and whose values
`check_config(config)` validates; capability attributes say what it can take
instead of lists of names elsewhere. Register a class in fml_jax/algorithms/__init__.py,
or name it on the command line as `--config.algorithm=my_module:MyAlgorithm`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import jax
import numpy as np

from fml_jax import schedules
from fml_jax.local_training import run_local_steps
from fml_jax.rounds.types import (ClientInfo, ClientResult, GlobalModel, PersonalizedModels,
                                  RoundContext)
from fml_jax.trees import tree_bytes


# Common random numbers: every algorithm draws the same model from the same key, so runs
# with the same seed start from the same weights whatever the algorithm (FML's meme,
# FedAvg's and FedMR's global model; client i's private model in FML, local-only,
# FedMD and FedH2L), and a paired comparison carries only the algorithm's difference.
def global_model_key(init_key: jax.Array) -> jax.Array:
  """The key the global (FML: meme) model is initialized from."""
  return jax.random.fold_in(init_key, 0)


def client_models_key(init_key: jax.Array) -> jax.Array:
  """The key the clients' private models are initialized from (client i: key i of
  its split, whatever its architecture group)."""
  return jax.random.fold_in(init_key, 1)


class Algorithm(abc.ABC):
  """Base class: holds the settings, models and optimizer; all methods are pure."""

  name: str = ""
  # The config section this algorithm owns ("" for none) and its defaults.
  config_section: str = ""
  default_aggregation: str = "uniform"   # "uniform" | "weighted" (by train example count)
  exchanges_messages: bool = False       # whether client_message / exchange run
  has_warm_start: bool = False           # whether warm_start runs before round 1
  # Capabilities, read by the generic config checks.
  averages_models: bool = False          # the server averages parameters
  # Batch-norm models (running statistics averaged with the parameters: batch_norm.py);
  # an algorithm that averages models without it refuses them.
  supports_batch_norm: bool = False
  supports_fedbn: bool = False           # batch_norm=local: FedBN's private batch-norm layers
  uses_server_optimizer: bool = False    # the `server` section applies to its averaging
  needs_public_data: bool = False        # a public / seed set (public_size or public_dataset)
  supports_client_tasks: bool = False    # client_tasks other than the dataset's own
  supports_catfish: bool = False         # catfish_clients
  # dropout_rate / straggler_rate (rounds/availability.py): the server weighs uploads by
  # `context.weights` and clients train through `Algorithm.train`.
  supports_availability: bool = False
  # DP-FedAvg (dp_clip; fml_jax/privacy.py): its server averages parameter uploads through
  # `ServerOptimizer.step`, passing the round's key.
  supports_dp: bool = False
  # lr_schedule: every local step takes `lr_scale(client)` (loss_step / supervised_step).
  supports_lr_schedule: bool = True
  # Whether evaluation also scores every client's own model on the whole global test
  # set (methods that aim at models good on the whole distribution: FedMD, FedH2L).
  evaluates_clients_on_global_test: bool = False

  def __init__(self, config, num_classes: int, input_shape: tuple):
    self.config = config
    self.num_classes = num_classes
    self.input_shape = input_shape
    # `lr_schedule`: a per-round factor on the clients' learning rate (schedules.py).
    self.lr_table = schedules.clients_lr_table(config.get("lr_schedule", ""),
                                               config.get("num_rounds", 1))

  def local_batch_size(self) -> int:
    """The batch size of a client's local steps in a round (what the runner's `auto`
    rule counts steps with)."""
    return self.config.batch_size

  def lr_scale(self, client: ClientInfo):
    """The factor on the clients' learning rate in this client's round (a Python 1.0
    without a schedule, so nothing is added to the step)."""
    return schedules.value_at(self.lr_table, client.round)

  @property
  def settings(self):
    """This algorithm's config section."""
    return self.config[self.config_section]

  @classmethod
  def defaults(cls) -> dict:
    """The defaults of this algorithm's config section (field -> value)."""
    return {}

  @classmethod
  def check_config(cls, config) -> None:
    """Raises ConfigError (naming `section.field`) for a value this algorithm refuses."""

  @classmethod
  def small_overrides(cls) -> Optional[dict]:
    """Required: settings (dotted paths) on top of the tests' tiny synthetic config
    (6 clients, 4 per round, 2 local epochs; tests/conftest.py) that make a short run
    of this algorithm meaningful, e.g. two architecture groups or a public set. The
    registry-driven tests (tests/test_rounds.py, tests/test_sharding.py) run every
    registered algorithm with them: executors, stores, devices and resume agree."""
    return None

  def client_groups(self, num_clients: int) -> np.ndarray:
    """(num_clients,) each client's architecture group; one group by default."""
    return np.zeros(num_clients, np.int32)

  @abc.abstractmethod
  def init(self, key: jax.Array, group_sizes: tuple) -> tuple[Any, tuple]:
    ...

  def prepare_round(self, server_state, context: RoundContext, data):
    return server_state

  def warm_start(self, client_state, client: ClientInfo, data, group: int):
    """Training before the first round (FedMD's transfer learning), one client."""
    return client_state

  def after_warm_start(self, runner, evaluate, warm_record: dict, workdir, seed: int) -> None:
    """Extra reports after the warm start (FedMD's bounds); `evaluate(state)` gives the
    metrics of a state in the metrics' format."""

  def client_message(self, server_state, client_state, client: ClientInfo, data, group: int):
    raise NotImplementedError(f"{self.name} exchanges no messages")

  def exchange(self, server_state, messages, context: RoundContext):
    return server_state

  @abc.abstractmethod
  def client_update(self, server_state, client_state, client: ClientInfo, data,
                    group: int) -> ClientResult:
    ...

  def server_update(self, server_state, uploads, context: RoundContext) -> tuple[Any, dict]:
    return server_state, {}

  def global_model(self, server_state) -> Optional[GlobalModel]:
    """The global model (module, params, batch-norm statistics), or None if the
    algorithm has none."""
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
                           min_examples=data.min_train, work=client.work)

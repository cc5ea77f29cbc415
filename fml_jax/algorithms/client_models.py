"""Which private model each client holds: architecture (`local_models`, the catfish)
and task (`client_tasks`). Clients with the same (architecture, task) form one
architecture group, whose states a store (fml_jax/rounds/stores.py) keeps as one
stacked pytree.

  local_models     "mlp,cnn": assigned round-robin (client i gets entry i % n); a
                   list of num_clients entries is an explicit per-client choice;
                   a family name (models.MODEL_FAMILIES) its members round-robin;
                   "" = the global `model`.
  feature_dim      > 0: every model split HtFLlib's way (models.HeadSplit).
  catfish_clients  "0" or "0,3": these clients' local model is `catfish_model`
                   instead (FML's "catfish effect" experiment).
  client_tasks     "full,parity": each client's task, assigned the same way
                   (see fml_jax/tasks.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fml_jax import tasks
from typing import Sequence

from fml_jax.errors import ConfigError
from fml_jax.models import build_model, expand_family, init_variables
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, client_models_key
from fml_jax.rounds.types import PersonalizedModels


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


@dataclasses.dataclass(frozen=True)
class ClientModelGroup:
  model_name: str
  task: tasks.Task
  model: nn.Module


def local_model_names(config, num_clients: int) -> list[str]:
  names = assign_to_clients(expand_family(split_list(config.local_models)) or [config.model],
                            num_clients, "local_models")
  for text in split_list(config.catfish_clients):
    try:
      client = int(text)
    except ValueError:
      raise ConfigError("catfish_clients", f"'{text}' is not a client id") from None
    if not 0 <= client < num_clients:
      raise ConfigError("catfish_clients", f"client {client} does not exist; ids are "
                        f"0..{num_clients - 1}")
    names[client] = config.catfish_model
  return names


def client_model_groups(config, num_classes: int, input_shape: tuple,
                        num_clients: int) -> tuple[np.ndarray, list[ClientModelGroup]]:
  """((num_clients,) group of each client, the groups)."""
  names = local_model_names(config, num_clients)
  client_tasks = tasks.client_tasks(config, num_classes, num_clients)
  group_of, keys = groups_of(list(zip(names, client_tasks)))
  catfish = {names[int(c)] for c in split_list(config.catfish_clients)}

  def build(name, task):
    # Name the setting the model came from: local_models is "" when it defaults to model.
    field = ("catfish_model" if name in catfish else
             "local_models" if config.local_models else "model")
    return ClientModelGroup(name, task, build_model(name, task.num_outputs, input_shape, field,
                                                    config.get("feature_dim", 0)))

  groups = [build(name, task) for name, task in keys]
  return group_of, groups


INIT_BATCH = 256   # clients initialized at once (bounds the memory init needs)


def map_in_place(fn, xs: jax.Array, batch: int):
  """vmap(fn)(xs), computed `batch` rows at a time into one preallocated output.

  Same values as the vmap, but only one batch's temporaries (random bits, ...) live
  at once, and nothing is concatenated: a plain vmap over 10,000 FML MLPs needed
  half the population again in temporaries (XLA's memory analysis: 7.6 GiB on top of
  14.8 GiB) and was killed on a 24 GiB machine. The last batch starts at n - batch,
  overlapping the one before; the overlap is recomputed to the same values."""
  n = xs.shape[0]
  if n <= batch:
    return jax.vmap(fn)(xs)
  shapes = jax.eval_shape(jax.vmap(fn), xs[:batch])
  out = jax.tree.map(lambda s: jnp.zeros((n, *s.shape[1:]), s.dtype), shapes)

  def body(i, out):
    start = jnp.minimum(i * batch, n - batch)
    part = jax.vmap(fn)(jax.lax.dynamic_slice_in_dim(xs, start, batch))
    return jax.tree.map(lambda o, p: jax.lax.dynamic_update_slice_in_dim(o, p, start, 0),
                        out, part)
  return jax.lax.fori_loop(0, -(-n // batch), body, out)


def init_group_states(groups: list[ClientModelGroup], group_of: np.ndarray, key: jax.Array,
                      input_shape: tuple, optimizer) -> tuple:
  """Every client's fresh local TrainState, stacked per group. Client i's model is
  initialized from key i of one split, whatever group it is in."""
  keys = jax.random.split(key, len(group_of))
  states = []
  for g, group in enumerate(groups):
    members = np.flatnonzero(group_of == g)
    init = lambda k, m=group.model: TrainState.from_variables(init_variables(m, k, input_shape),
                                                              optimizer)
    states.append(map_in_place(init, keys[members], INIT_BATCH))
  return tuple(states)


def personalized(groups: list[ClientModelGroup], group_of: np.ndarray,
                 population: tuple) -> list[PersonalizedModels]:
  """Each client's local model on its own test split, with its task's labels."""
  return [PersonalizedModels(
      g.model, state.params, per_client=True, client_ids=np.flatnonzero(group_of == i),
      model_state=state.model_state or None,
      label_map=None if g.task.is_identity else np.asarray(g.task.label_map))
          for i, (g, state) in enumerate(zip(groups, population))]


class ClientModelsAlgorithm(Algorithm):
  """Base of the algorithms whose clients keep private models (FML's local models,
  local-only, FedMD's and FedH2L's parties): builds the groups from the config, one
  optimizer, every client's fresh TrainState, and personalized evaluation of them.
  The server state is empty unless a subclass says otherwise."""

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.group_of, self.groups = client_model_groups(config, num_classes, input_shape,
                                                     config.num_clients)
    self.optimizer = make_optimizer(config)

  def client_groups(self, num_clients):
    return self.group_of

  def init_clients(self, init_key) -> tuple:
    """Every client's fresh private model, from the run's init key (paired across
    algorithms: client i's model is the same wherever it has the same architecture)."""
    return init_group_states(self.groups, self.group_of, client_models_key(init_key),
                             self.input_shape, self.optimizer)

  def init(self, key, group_sizes):
    return {}, self.init_clients(key)

  def personalized_models(self, server_state, population):
    return personalized(self.groups, self.group_of, population)

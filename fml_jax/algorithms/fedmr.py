"""FedMR: federated learning by layer-wise model recombination (Hu et al. 2022/2024).

The server keeps K model slots (K = clients_per_round), all from one
initialization. Each round the i-th sampled client trains slot i (plain CE), then
the server either resets every slot to their mean (the first
`fedmr.first_stage_rounds` rounds: FedAvg, through the
`server` section's optimizer) or **recombines** them: for every
parameter group an independent random permutation `perm` of the K slots, and slot
i receives that group from slot perm[i]. On stacked pytrees this is one gather
along the slot axis per leaf. The model evaluated globally is the unweighted mean
of the slots (recombination preserves it).

Settings: the `fedmr` config section. `fedmr.granularity` sets what a group is:
  tensor  every parameter leaf on its own (the official code: a kernel and its bias
          may come from different slots);
  layer   all leaves of one module together (kernel with its bias);
  block   consecutive layers, `fedmr.block_fraction` of the layers per block, in the
          order of the flattened parameter tree (for our models: input to output).

`fedmr.optimizer_state`: `reset` (default, as the official code, which builds a new
optimizer every round), `keep` (each slot keeps its optimizer state, which stays
with the slot), or `recombine` (the parameter-shaped parts of the optimizer state
move with their parameters).

Batch-norm models (FedMR's ResNet-20 and VGG-16): every slot keeps its running
statistics (`slot_stats`); the first stage averages them, recombination moves them
like parameters: each statistic on its own at tensor granularity (the official code
permutes every state-dict key, buffers included), with its layer at layer and block
granularity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from fml_jax import settings
from fml_jax.algorithms.aggregation import ServerOptimizer, weighted_mean
from fml_jax.algorithms.steps import supervised_step
from fml_jax.models import build_model, init_variables
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel, PersonalizedModels

GRANULARITIES = ("tensor", "layer", "block")
OPTIMIZER_STATE_MODES = ("reset", "keep", "recombine")


def _module_paths(params, model_state) -> tuple[list, list]:
  """The module path (key names without the leaf's own) of every leaf of `params` and
  of `model_state` (whose collection name, e.g. "batch_stats", is dropped, so a batch
  norm layer's statistics have the module path of its scale and bias)."""
  keys = lambda path: tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
  param_paths = [keys(path)[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  state_paths = [keys(path)[1:-1] for path, _ in
                 jax.tree_util.tree_flatten_with_path(model_state or {})[0]]
  return param_paths, state_paths


def recombination_groups(params, granularity: str, block_fraction: float,
                         model_state=None) -> list[int]:
  """The group number of every leaf of `params`, then of every leaf of `model_state`
  (batch norm statistics; in `jax.tree.leaves` order). A statistic is its own group at
  tensor granularity (the official code permutes every state-dict key on its own) and
  goes with its layer at layer and block granularity."""
  param_paths, state_paths = _module_paths(params, model_state)
  if granularity == "tensor":
    return list(range(len(param_paths) + len(state_paths)))
  # Modules in parameter order (input to output for our models); a module with only
  # statistics (batch norm without scale and bias) comes after them.
  layers = list(dict.fromkeys(param_paths + state_paths))
  layer_of = [layers.index(path) for path in param_paths + state_paths]
  if granularity == "layer":
    return layer_of
  per_block = max(1, math.ceil(block_fraction * len(layers)))
  return [layer // per_block for layer in layer_of]


def recombination_permutations(params, key: jax.Array, num_slots: int, granularity: str,
                               block_fraction: float, model_state=None):
  """A pytree like `params` (one level: a (K,) int32 permutation per leaf); leaves of the
  same group share their permutation. With `model_state`, (that, the same for the
  statistics)."""
  groups = recombination_groups(params, granularity, block_fraction, model_state)
  perms = [jax.random.permutation(jax.random.fold_in(key, g), num_slots) for g in groups]
  n = len(jax.tree.leaves(params))
  param_perms = jax.tree.unflatten(jax.tree.structure(params), perms[:n])
  if model_state is None:
    return param_perms
  return param_perms, jax.tree.unflatten(jax.tree.structure(model_state), perms[n:])


def recombine(slots, perms):
  """Slot i of each leaf receives slot perms[i] of that leaf."""
  return jax.tree.map(lambda leaf, perm: leaf[perm], slots, perms)


class FedMR(Algorithm):
  name = "fedmr"
  config_section = "fedmr"
  default_aggregation = "uniform"
  averages_models = True
  supports_batch_norm = True     # statistics averaged in the first stage, then recombined
  uses_server_optimizer = True   # in the first stage

  @classmethod
  def defaults(cls):
    return {
        "first_stage_rounds": 0,     # rounds of plain averaging before recombination
        "granularity": "tensor",     # tensor | layer (kernel with bias) | block
        "block_fraction": 0.25,      # block granularity: share of the layers per block
        "optimizer_state": "reset",  # reset | keep | recombine (moves with its layers)
    }

  @classmethod
  def check_config(cls, config):
    settings.choice(config, "fedmr.granularity", GRANULARITIES)
    settings.choice(config, "fedmr.optimizer_state", OPTIMIZER_STATE_MODES)
    settings.number(config, "fedmr.first_stage_rounds", 0, integer=True)
    settings.number(config, "fedmr.block_fraction", 0, 1, low_open=True)

  @classmethod
  def small_overrides(cls):
    return {"clients_per_round": 3, "fedmr.first_stage_rounds": 1}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model",
                             config.get("feature_dim", 0))
    self.optimizer = make_optimizer(config)
    self.server_optimizer = ServerOptimizer.from_config(config)
    self.num_slots = config.clients_per_round
    self.keeps_optimizer_state = self.settings.optimizer_state != "reset"

  def init(self, key, group_sizes):
    variables = init_variables(self.model, global_model_key(key), self.input_shape)
    params = variables.pop("params")
    stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_slots, *x.shape)),
                                      tree)
    server = {"slots": stack(params),
              "last_client": jnp.full((self.num_slots,), -1, jnp.int32),
              **self.server_optimizer.init(params)}
    if variables:   # batch norm: each slot's running statistics
      server["slot_stats"] = stack(variables)
    if self.keeps_optimizer_state:
      server["opt_state"] = stack(self.optimizer.init(params))
    return server, ((),)

  def client_update(self, server_state, client_state, client, data, group):
    slot = lambda tree: jax.tree.map(lambda x: x[client.position], tree)
    params = slot(server_state["slots"])
    opt_state = (slot(server_state["opt_state"]) if self.keeps_optimizer_state
                 else self.optimizer.init(params))
    model_state = slot(server_state["slot_stats"]) if "slot_stats" in server_state else {}

    step = supervised_step(self.model, self.optimizer, lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, TrainState(params=params, opt_state=opt_state,
                                                 model_state=model_state), client, data)
    upload = {"params": state.params}
    if model_state:
      upload["model_state"] = state.model_state
    if self.keeps_optimizer_state:
      upload["opt_state"] = state.opt_state
    return ClientResult(client_state=client_state, upload=upload, metrics=metrics)

  def server_update(self, server_state, uploads, context):
    # uploads are stacked in cohort-position order: entry i is the trained slot i.
    c = self.settings
    trained, trained_stats = uploads["params"], uploads.get("model_state")
    # In the first stage every slot holds the global model (all slots start equal, and
    # each first-stage round sets them all to one model), so it is the slots' mean.
    previous = jax.tree.map(lambda s: jnp.mean(s, axis=0), server_state["slots"])
    averaged, averaged_opt, metrics = self.server_optimizer.step(previous, server_state,
                                                                 trained, context.weights)
    perms = recombination_permutations(trained, context.key, self.num_slots, c.granularity,
                                       c.block_fraction, trained_stats)
    if trained_stats is not None:
      perms, stat_perms = perms
    first_stage = context.round < c.first_stage_rounds
    spread = lambda mean, like: jax.tree.map(lambda m, t: jnp.broadcast_to(m, t.shape), mean,
                                             like)
    slots = jax.lax.cond(first_stage, lambda: spread(averaged, trained),
                         lambda: recombine(trained, perms))
    server = {"slots": slots, "last_client": context.clients.id}
    if trained_stats is not None:   # statistics: averaged, or recombined with their layers
      averaged_stats = weighted_mean(trained_stats, context.weights)
      server["slot_stats"] = jax.lax.cond(first_stage,
                                          lambda: spread(averaged_stats, trained_stats),
                                          lambda: recombine(trained_stats, stat_perms))
    if averaged_opt:   # the server optimizer moves only in the first stage
      server.update(jax.lax.cond(first_stage, lambda: averaged_opt,
                                 lambda: {"server_opt_state": server_state["server_opt_state"]}))
    if self.keeps_optimizer_state:
      opt_state = uploads["opt_state"]
      if c.optimizer_state == "recombine":
        moved = optax.tree_utils.tree_map_params(self.optimizer, lambda s, p: s[p], opt_state,
                                                 perms)
        opt_state = jax.lax.cond(first_stage, lambda: opt_state, lambda: moved)
      server["opt_state"] = opt_state
    return server, metrics

  def global_model(self, server_state):
    mean = lambda tree: jax.tree.map(lambda s: jnp.mean(s, axis=0), tree)
    return GlobalModel(self.model, mean(server_state["slots"]),
                       mean(server_state["slot_stats"]) if "slot_stats" in server_state else None)

  def broadcast(self, server_state):
    # Each client downloads one slot (its statistics, and its optimizer state if kept).
    one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
    return {k: one(v) for k, v in server_state.items()
            if k in ("slots", "slot_stats", "opt_state")}

  def personalized_models(self, server_state, population):
    # Each slot on the test split of the client that trained it last.
    return [PersonalizedModels(self.model, server_state["slots"], per_client=True,
                               client_ids=server_state["last_client"],
                               model_state=server_state.get("slot_stats"))]

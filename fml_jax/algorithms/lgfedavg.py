"""LG-FedAvg (Liang et al. 2020), as HtFLlib runs it: private bodies, one global head.

Every client's model is HtFLlib's split model (`feature_dim` > 0: its own architecture's
layers as the body, features pooled to `feature_dim`, then a Dense head), so the heads
have the same shape whatever the architecture (`local_models`, grouped). Each round

  1. every client's head is the global head (HtFLlib overwrites all clients' heads
     when it sends the head; before the first aggregation clients keep their own);
  2. a cohort member trains body and head together with cross-entropy and uploads
     its head;
  3. the server averages the heads, weighted by training examples (HtFLlib's
     `uploaded_weights`; `aggregation=uniform` for the plain mean).

Clients predict with their own body and the global head (evaluated on their own test
split, and on the whole test set). Communication: the head, feature_dim * C + C values,
each way. The paper's split (which layers are global) is a choice of the paper's
experiments; HtFLlib makes only the final Dense layer global, as here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax.algorithms.aggregation import weighted_mean
from fml_jax.algorithms.client_models import ClientModelsAlgorithm, personalized
from fml_jax.algorithms.steps import supervised_step
from fml_jax.errors import ConfigError
from fml_jax.rounds.types import ClientResult


def require_split_models(config, name: str, what: str) -> None:
  """ConfigError unless `feature_dim` > 0 and the clients predict the dataset's classes
  (what HtFLlib's head- and prototype-sharing algorithms exchange)."""
  if config.algorithm != name:
    return
  if not config.feature_dim:
    raise ConfigError("feature_dim", f"{name} exchanges {what}, so every model needs HtFLlib's "
                      "body + head split: set feature_dim > 0 (HtFLlib uses 512)")
  if config.client_tasks:
    raise ConfigError("client_tasks", f"{name} exchanges {what} over the dataset's classes, so "
                      "every client must predict them; leave client_tasks empty")


def with_head(params, head, use):
  """`params` with its `head` replaced by `head` where `use` (a traced bool)."""
  return {**params, "head": jax.tree.map(lambda g, own: jnp.where(use, g, own), head,
                                         params["head"])}


def under_global_head(groups, group_of, population, head, use=True):
  """Personalized evaluation of every client's own body under the global `head` (where
  `use`, a traced bool; else its own head)."""
  return personalized(groups, group_of, [
      state.replace(params=jax.vmap(lambda p: with_head(p, head, use))(state.params))
      for state in population])


class LGFedAvg(ClientModelsAlgorithm):
  name = "lgfedavg"
  default_aggregation = "weighted"   # HtFLlib weighs heads by training examples
  supports_availability = True       # a dropped client's head is not averaged
  evaluates_clients_on_global_test = True

  @classmethod
  def check_config(cls, config):
    require_split_models(config, cls.name, "heads")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "feature_dim": 8}

  def init(self, key, group_sizes):
    population = self.init_clients(key)
    head = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype),
                        population[0].params["head"])
    return {"head": head, "has_head": jnp.zeros((), bool)}, population

  def client_update(self, server_state, client_state, client, data, group):
    state = client_state.replace(params=with_head(client_state.params, server_state["head"],
                                                  server_state["has_head"]))
    step = supervised_step(self.groups[group].model, self.optimizer,
                           lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, state, client, data)
    return ClientResult(client_state=state, upload=state.params["head"], metrics=metrics)

  def server_update(self, server_state, uploads, context):
    # Rounds where nobody reports keep the server state (fml_jax/rounds/protocol.py).
    return {"head": weighted_mean(uploads, context.weights),
            "has_head": jnp.ones((), bool)}, {}

  def broadcast(self, server_state):
    return server_state["head"]

  def personalized_models(self, server_state, population):
    return under_global_head(self.groups, self.group_of, population, server_state["head"],
                             server_state["has_head"])

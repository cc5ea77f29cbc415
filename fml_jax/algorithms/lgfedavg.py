"""LG-FedAvg (Liang et al. 2020), as HtFLlib runs it: private bodies, one global head.

Every client's model is HtFLlib's split model (`feature_dim` > 0: its own architecture's
layers as the body, features pooled to `feature_dim`, then a Dense head), so the heads
have the same shape whatever the architecture (`local_models`, grouped). Each round

  1. every client's head is the global head (HtFLlib overwrites all clients' heads
     when it sends the head; the server's head starts as client 0's initial head, so
     from the first round every client trains under it, as HtFLlib's current code has
     it; its earlier code let clients keep their own heads until the first average);
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


def client_zero_head(population, group_of):
  """Client 0's initial head: where HtFLlib's server head starts (LG-FedAvg, FedGH,
  FedGen), given to every client from the first round."""
  return jax.tree.map(lambda x: x[0], population[int(group_of[0])].params["head"])


def with_head(params, head):
  """`params` (one client's) with its head replaced by the global `head`."""
  return {**params, "head": head}


def under_global_head(groups, group_of, population, head):
  """Personalized evaluation of every client's own body under the global `head`."""
  return personalized(groups, group_of, [
      state.replace(params=jax.vmap(lambda p: with_head(p, head))(state.params))
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
    return {"head": client_zero_head(population, self.group_of)}, population

  def client_update(self, server_state, client_state, client, data, group):
    state = client_state.replace(params=with_head(client_state.params, server_state["head"]))
    step = supervised_step(self.groups[group].model, self.optimizer,
                           lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, state, client, data)
    return ClientResult(client_state=state, upload=state.params["head"], metrics=metrics)

  def server_update(self, server_state, uploads, context):
    # Rounds where nobody reports keep the server state (fml_jax/rounds/protocol.py).
    return {"head": weighted_mean(uploads, context.weights)}, {}

  def broadcast(self, server_state):
    return server_state["head"]

  def personalized_models(self, server_state, population):
    return under_global_head(self.groups, self.group_of, population, server_state["head"])

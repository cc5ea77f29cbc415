"""Local-only training: every client trains its own model and never communicates.

The lower bound every collaborative method should beat. There is no global model.
Clients may hold different architectures and tasks (`local_models`,
`catfish_clients`, `client_tasks`), as FML's local models do, so the two compare
like for like.
"""

from __future__ import annotations

import jax.numpy as jnp

from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import supervised_step
from fml_jax.rounds.types import ClientResult


class LocalOnly(ClientModelsAlgorithm):
  name = "local"
  supports_client_tasks = True
  supports_catfish = True
  supports_availability = True   # a client that drops keeps its model as it was

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "client_tasks": "subset_0-6,full"}

  def client_update(self, server_state, client_state, client, data, group):
    task = self.groups[group].task
    step = supervised_step(self.groups[group].model, self.optimizer,
                           label_map=None if task.is_identity else jnp.asarray(task.label_map),
                           lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, client_state, client, data)
    return ClientResult(client_state=state, upload=(), metrics=metrics)

"""Local-only training: every client trains its own model and never communicates.

The lower bound every collaborative method should beat. There is no global model.
Clients may hold different architectures and tasks (`local_models`,
`catfish_clients`, `client_tasks`), as FML's local models do, so the two compare
like for like.
"""

from __future__ import annotations

import jax.numpy as jnp

from fml_jax.algorithms import client_models
from fml_jax.algorithms.base import Algorithm, ClientResult, supervised_step
from fml_jax.optimizers import make_optimizer


class LocalOnly(Algorithm):
  name = "local"

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.group_of, self.groups = client_models.client_model_groups(
        config, num_classes, input_shape, config.num_clients)
    self.optimizer = make_optimizer(config)

  def client_groups(self, num_clients):
    return self.group_of

  def init(self, key, group_sizes):
    return (), client_models.init_group_states(self.groups, self.group_of, key,
                                               self.input_shape, self.optimizer)

  def client_update(self, server_state, client_state, client, data, group):
    task = self.groups[group].task
    step = supervised_step(self.groups[group].model, self.optimizer,
                           label_map=None if task.is_identity else jnp.asarray(task.label_map))
    state, metrics = self.train(step, client_state, client, data)
    return ClientResult(client_state=state, upload=(), metrics=metrics)

  def personalized_models(self, server_state, population):
    return client_models.personalized(self.groups, self.group_of, population)

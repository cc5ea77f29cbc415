"""Local-only training: every client trains its own model and never communicates.

The lower bound every collaborative method should beat. There is no global model.
"""

from __future__ import annotations

import jax

from fml_jax.algorithms.base import Algorithm, ClientResult, PersonalizedModels, supervised_step
from fml_jax.models import build_model, init_params
from fml_jax.optimizers import TrainState, make_optimizer


class LocalOnly(Algorithm):
  name = "local"

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.local_model or config.model, num_classes, input_shape,
                             "local_model")
    self.optimizer = make_optimizer(config)

  def init(self, key, num_clients):
    def init_client(k):
      return TrainState.create(init_params(self.model, k, self.input_shape), self.optimizer)
    return (), jax.vmap(init_client)(jax.random.split(key, num_clients))

  def client_update(self, server_state, client_state, client, data):
    step = supervised_step(self.model, self.optimizer)
    state, metrics = self.train(step, client_state, client, data)
    return ClientResult(client_state=state, upload=(), metrics=metrics)

  def personalized_model(self, server_state, population):
    return PersonalizedModels(self.model, population.params, per_client=True)

"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).

FedProx is FedAvg with (mu / 2) * ||w - w_global||^2 added to every client's loss;
with mu = 0 the two are the same computation (the term is left out statically).
Clients keep no state between rounds: each round starts from the global model
with a fresh optimizer.
"""

from __future__ import annotations

from fml_jax import losses
from fml_jax.algorithms.base import (Algorithm, ClientResult, PersonalizedModels,
                                     mean_over_clients, supervised_step)
from fml_jax.models import build_model, init_params
from fml_jax.optimizers import TrainState, make_optimizer


class FedAvg(Algorithm):
  name = "fedavg"
  default_aggregation = "weighted"   # McMahan et al. weight by client example count

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model")
    self.optimizer = make_optimizer(config)
    self.prox_mu = 0.0

  def init(self, key, group_sizes):
    return {"params": init_params(self.model, key, self.input_shape)}, ((),)

  def client_update(self, server_state, client_state, client, data, group):
    global_params = server_state["params"]
    regularizer = None
    if self.prox_mu:
      regularizer = lambda p: 0.5 * self.prox_mu * losses.proximal_term(p, global_params)
    step = supervised_step(self.model, self.optimizer, regularizer)
    state, metrics = self.train(step, TrainState.create(global_params, self.optimizer),
                                client, data)
    return ClientResult(client_state=client_state, upload=state.params, metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return {"params": mean_over_clients(uploads, context.weights)}

  def global_model(self, server_state):
    return self.model, server_state["params"]

  def personalized_models(self, server_state, population):
    # No personalization: every client is evaluated with the global model.
    return [PersonalizedModels(self.model, server_state["params"], per_client=False)]


class FedProx(FedAvg):
  name = "fedprox"

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.prox_mu = float(config.prox_mu)

"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).

FedProx is FedAvg with (mu / 2) * ||w - w_global||^2 added to every client's loss
(`--config.fedprox.mu`); with mu = 0 the two are the same computation (the term is
left out statically). Clients keep no state between rounds: each round starts from
the global model with a fresh optimizer. The server step is the `server` section's
optimizer on the averaged uploads (fml_jax/algorithms/aggregation.py): FedAvg's plain
average by default, FedAvgM / FedAdam / FedYogi / FedAdagrad by setting.
"""

from __future__ import annotations

from fml_jax import losses, settings
from fml_jax.settings import is_static_zero
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.steps import supervised_step
from fml_jax.models import build_model, init_params
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, global_model_key
from fml_jax.rounds.types import ClientResult, PersonalizedModels


class FedAvg(Algorithm):
  name = "fedavg"
  default_aggregation = "weighted"   # McMahan et al. weight by client example count
  averages_models = True
  supports_availability = True
  supports_dp = True
  uses_server_optimizer = True

  @classmethod
  def small_overrides(cls):
    return {}   # one model; weighted by example count, partial participation

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model")
    self.optimizer = make_optimizer(config)
    self.server_optimizer = ServerOptimizer.from_config(config)
    self.prox_mu = 0.0

  def init(self, key, group_sizes):
    params = init_params(self.model, global_model_key(key), self.input_shape)
    return {"params": params, **self.server_optimizer.init(params)}, ((),)

  def client_update(self, server_state, client_state, client, data, group):
    global_params = server_state["params"]
    regularizer = None
    if not is_static_zero(self.prox_mu):
      regularizer = lambda p: 0.5 * self.prox_mu * losses.proximal_term(p, global_params)
    step = supervised_step(self.model, self.optimizer, regularizer,
                           lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, TrainState.create(global_params, self.optimizer),
                                client, data)
    return ClientResult(client_state=client_state, upload=state.params, metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return self.server_optimizer.update(server_state, uploads, context)

  def broadcast(self, server_state):
    return {"params": server_state["params"]}   # not the server optimizer's moments

  def global_model(self, server_state):
    return self.model, server_state["params"]

  def personalized_models(self, server_state, population):
    # No personalization: every client is evaluated with the global model.
    return [PersonalizedModels(self.model, server_state["params"], per_client=False)]


class FedProx(FedAvg):
  name = "fedprox"
  config_section = "fedprox"

  @classmethod
  def defaults(cls):
    return {"mu": 0.01}   # the proximal weight

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedprox.mu", 0)

  @classmethod
  def small_overrides(cls):
    return {"fedprox.mu": 0.1}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.prox_mu = self.settings.mu   # a number, or traced in a vmapped sweep (replicas.py)

"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).

FedProx is FedAvg with (mu / 2) * ||w - w_global||^2 added to every client's loss
(`--config.fedprox.mu`); with mu = 0 the two are the same computation (the term is
left out statically). Clients keep no state between rounds: each round starts from
the global model with a fresh optimizer. The server step is the `server` section's
optimizer on the averaged uploads (fml_jax/algorithms/aggregation.py): FedAvg's plain
average by default, FedAvgM / FedAdam / FedYogi / FedAdagrad by setting.

Batch-norm models (fml_jax/algorithms/batch_norm.py): the running statistics travel
with the parameters and are averaged with them (`batch_norm=average`), or each client
keeps its batch-norm layers across rounds (`batch_norm=local`: FedBN, whose clients
then hold that private part as their persistent state).
"""

from __future__ import annotations

from fml_jax import losses, settings
from fml_jax.settings import is_static_zero
import jax

from fml_jax.algorithms import batch_norm
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.steps import supervised_step
from fml_jax.models import build_model, init_variables
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel, PersonalizedModels


class FedAvg(Algorithm):
  name = "fedavg"
  default_aggregation = "weighted"   # McMahan et al. weight by client example count
  averages_models = True
  supports_availability = True
  supports_batch_norm = True
  supports_fedbn = True
  supports_dp = True
  uses_server_optimizer = True

  @classmethod
  def small_overrides(cls):
    return {}   # one model; weighted by example count, partial participation

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model",
                             config.get("feature_dim", 0))
    self.optimizer = make_optimizer(config)
    self.server_optimizer = ServerOptimizer.from_config(config)
    self.prox_mu = 0.0
    self.fedbn = config.get("batch_norm", "average") == "local"

  def init(self, key, group_sizes):
    variables = init_variables(self.model, global_model_key(key), self.input_shape)
    params = variables.pop("params")
    server = {"params": params, **self.server_optimizer.init(params)}
    if variables:   # batch norm: the global model's running statistics
      server["model_state"] = variables
    if self.fedbn:   # every client starts with the global model's batch-norm layers
      return server, (batch_norm.init_local_layers(params, variables, group_sizes[0]),)
    return server, ((),)

  def client_params(self, server_state, client_state):
    """(params, model_state) a client starts its round from."""
    if self.fedbn:
      return (batch_norm.with_batch_norm_params(server_state["params"],
                                                client_state["bn_params"]),
              client_state["model_state"])
    return server_state["params"], server_state.get("model_state")

  def client_update(self, server_state, client_state, client, data, group):
    params, model_state = self.client_params(server_state, client_state)
    regularizer = None
    if not is_static_zero(self.prox_mu):   # toward the model the client started from
      regularizer = lambda p: 0.5 * self.prox_mu * losses.proximal_term(p, params)
    step = supervised_step(self.model, self.optimizer, regularizer,
                           lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, TrainState.create(params, self.optimizer, model_state),
                                client, data)
    if self.fedbn:
      client_state = batch_norm.local_layers(state.params, state.model_state)
    return ClientResult(client_state=client_state, upload=batch_norm.model_upload(state),
                        metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return self.server_optimizer.update(server_state, uploads, context)

  def broadcast(self, server_state):
    # The model, not the server optimizer's moments.
    return {k: v for k, v in server_state.items() if k in ("params", "model_state")}

  def global_model(self, server_state):
    return GlobalModel(self.model, server_state["params"], server_state.get("model_state"))

  def personalized_models(self, server_state, population):
    if self.fedbn:   # each client with its own batch-norm layers
      params, model_state = jax.vmap(lambda c: self.client_params(server_state, c))(
          population[0])
      return [PersonalizedModels(self.model, params, per_client=True, model_state=model_state)]
    # No personalization: every client is evaluated with the global model.
    return [PersonalizedModels(self.model, server_state["params"], per_client=False,
                               model_state=server_state.get("model_state"))]


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

"""SCAFFOLD (Karimireddy et al. 2020), option II, as PFLlib runs it.

Every client keeps a control variate c_i (parameter-shaped, zero at the start); the
server keeps the global model x and a global control variate c. Each round a client
starts from x and takes K local steps on its loss with the gradient corrected by
c - c_i (client drift), then

  c_i+  = c_i - c + (x - y_i) / (K * lr)      (option II; K = the steps it took)

and uploads y_i and delta c_i = c_i+ - c_i. The server:

  x <- x + server.learning_rate * mean_i (y_i - x)      (uniform, the `server` section's
                                                         optimizer: sgd 1.0 by default)
  c <- c + sum_i delta c_i / num_clients

The option II formula assumes plain SGD: `configs/scaffold.py` sets momentum and
weight decay to 0 as PFLlib's SCAFFOLD optimizer has them; with momentum the local
steps follow the optimizer and the control variates are an approximation. A client
that drops out (rounds/availability.py) neither moves x nor c; a straggler's K is the
number of steps it took.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.steps import counted, supervised_step
from fml_jax.models import build_model, init_params
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel, PersonalizedModels


def zeros_like_stacked(params, n: int):
  return jax.tree.map(lambda p: jnp.zeros((n, *p.shape), p.dtype), params)


class Scaffold(Algorithm):
  name = "scaffold"
  default_aggregation = "uniform"   # PFLlib: x and c both move by unweighted means
  averages_models = True
  uses_server_optimizer = True
  supports_availability = True

  @classmethod
  def small_overrides(cls):
    return {"momentum": 0.0, "weight_decay": 0.0, "learning_rate": 0.05}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model",
                             config.get("feature_dim", 0))
    self.optimizer = make_optimizer(config)
    self.server_optimizer = ServerOptimizer.from_config(config)

  def init(self, key, group_sizes):
    params = init_params(self.model, global_model_key(key), self.input_shape)
    server = {"params": params, "control": jax.tree.map(jnp.zeros_like, params),
              **self.server_optimizer.init(params)}
    return server, ({"control": zeros_like_stacked(params, group_sizes[0])},)

  def client_update(self, server_state, client_state, client, data, group):
    x, c, c_i = server_state["params"], server_state["control"], client_state["control"]
    lr_scale = self.lr_scale(client)
    step = supervised_step(self.model, self.optimizer,
                           grad_offset=jax.tree.map(jnp.subtract, c, c_i), lr_scale=lr_scale)
    (state, steps), metrics = self.train(counted(step), (TrainState.create(x, self.optimizer),
                                                         jnp.int32(0)), client, data)
    y = state.params
    scale = 1.0 / (jnp.maximum(steps, 1) * self.config.learning_rate * lr_scale)   # the lr in force
    new_c_i = jax.tree.map(lambda ci, cc, xx, yy: ci - cc + (xx - yy) * scale, c_i, c, x, y)
    return ClientResult(client_state={"control": new_c_i},
                        upload={"params": y, "delta_control": jax.tree.map(jnp.subtract,
                                                                           new_c_i, c_i)},
                        metrics={**metrics, "local_steps": steps.astype(jnp.float32)})

  def server_update(self, server_state, uploads, context):
    params, opt_state, metrics = self.server_optimizer.step(
        server_state["params"], server_state, uploads["params"], context.weights, context.key)
    reported = (jnp.ones(context.weights.shape, jnp.float32) if context.reports is None
                else context.reports.astype(jnp.float32))
    control = jax.tree.map(
        lambda cc, d: cc + jnp.tensordot(reported.astype(d.dtype), d, axes=1)
        / self.config.num_clients, server_state["control"], uploads["delta_control"])
    return {"params": params, "control": control, **opt_state}, metrics

  def broadcast(self, server_state):
    return {"params": server_state["params"], "control": server_state["control"]}

  def global_model(self, server_state):
    return GlobalModel(self.model, server_state["params"])

  def personalized_models(self, server_state, population):
    return [PersonalizedModels(self.model, server_state["params"], per_client=False)]

"""Federated Mutual Learning (Shen et al. 2020), as in the official code.

Each client holds a *meme* (forked from the global model at the start of every
round, with a fresh optimizer) and a private *local* model (kept across rounds
with its optimizer state, possibly of another architecture). Both see the same
batch and are updated in the same step by deep mutual learning; the server
averages the memes.
"""

from __future__ import annotations

import jax

from fml_jax import losses
from fml_jax.algorithms.base import Algorithm, ClientResult, PersonalizedModels, mean_over_clients
from fml_jax.models import apply_model, build_model, init_params
from fml_jax.optimizers import TrainState, make_optimizer


class FML(Algorithm):
  name = "fml"
  default_aggregation = "uniform"   # the official code averages memes uniformly

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.meme_model = build_model(config.model, num_classes, input_shape, "model")
    self.local_model = build_model(config.local_model or config.model, num_classes, input_shape,
                                   "local_model")
    self.optimizer = make_optimizer(config)

  def init(self, key, num_clients):
    meme_key, local_key = jax.random.split(key)
    server = {"params": init_params(self.meme_model, meme_key, self.input_shape)}

    def init_local(k):
      return TrainState.create(init_params(self.local_model, k, self.input_shape), self.optimizer)

    population = jax.vmap(init_local)(jax.random.split(local_key, num_clients))
    return server, population

  def step(self, carry, x, y, mask, key):
    del key
    meme, local = carry
    c = self.config

    def joint_loss(meme_params, local_params):
      meme_logits = apply_model(self.meme_model, meme_params, x)
      local_logits = apply_model(self.local_model, local_params, x)
      loss_meme, loss_local = losses.fml_losses(meme_logits, local_logits, y, mask, c.alpha,
                                                c.beta, c.temperature)
      # Targets are stop-gradient constants, so d(sum)/d(meme) is dL_meme/d(meme), etc.
      return loss_meme + loss_local, (loss_meme, loss_local)

    grads, (loss_meme, loss_local) = jax.grad(joint_loss, argnums=(0, 1), has_aux=True)(
        meme.params, local.params)
    meme = meme.apply_gradients(grads[0], self.optimizer)
    local = local.apply_gradients(grads[1], self.optimizer)
    metrics = {"train_loss": (loss_meme + loss_local) / 2, "train_loss_meme": loss_meme,
               "train_loss_local": loss_local}
    return (meme, local), metrics

  def client_update(self, server_state, client_state, client, data):
    meme = TrainState.create(server_state["params"], self.optimizer)   # fork + fresh optimizer
    (meme, local), metrics = self.train(self.step, (meme, client_state), client, data)
    return ClientResult(client_state=local, upload=meme.params, metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return {"params": mean_over_clients(uploads, context.weights)}

  def global_model(self, server_state):
    return self.meme_model, server_state["params"]

  def personalized_model(self, server_state, population):
    return PersonalizedModels(self.local_model, population.params, per_client=True)

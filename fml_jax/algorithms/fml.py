"""Federated Mutual Learning (Shen et al. 2020), as in the official code, in the full
DOM setting (data, objective and model heterogeneity).

Each client holds a *meme* (forked from the global model at the start of every
round, with a fresh optimizer) and a private *local* model (kept across rounds
with its optimizer state). Both see the same batch and are updated in the same
step by deep mutual learning; the server averages the memes.

- Model heterogeneity: clients' local models may differ (`local_models`, the
  catfish); each architecture is a group, the meme keeps the global architecture.
- Objective heterogeneity: a client's local model may solve its own task
  (`client_tasks`); the meme keeps the global task and the KL terms compare the
  two in the client's task space (fml_jax/tasks.py).
- Dynamic balance: alpha, beta and the learning rate follow schedules over rounds
  (fml_jax/schedules.py), reported in the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax import losses, schedules
from fml_jax.algorithms.base import ClientResult, mean_over_clients
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.models import build_model, forward, init_params
from fml_jax.optimizers import TrainState


def balance_schedules(config) -> dict:
  """The alpha, beta and learning-rate-factor tables of a config."""
  base = {"alpha": config.alpha, "beta": config.beta, "lr": 1.0}
  return {kind: schedules.to_table(config[f"{kind}_schedule"], kind, base[kind],
                                   config.schedule_step_rounds, config.schedule_stop_round)
          for kind in schedules.KINDS}


class FML(ClientModelsAlgorithm):
  name = "fml"
  default_aggregation = "uniform"   # the official code averages memes uniformly

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.meme_model = build_model(config.model, num_classes, input_shape, "model")
    self.schedules = balance_schedules(config)

  def init(self, key, group_sizes):
    meme_key, local_key = jax.random.split(key)
    server = {"params": init_params(self.meme_model, meme_key, self.input_shape)}
    return server, self.init_clients(local_key)

  def make_step(self, group: int, alpha, beta, lr_scale):
    local_model, task = self.groups[group].model, self.groups[group].task
    label_map = None if task.is_identity else jnp.asarray(task.label_map)
    temperature = self.config.temperature

    def step(carry, x, y, mask, key):
      meme, local = carry
      meme_key, local_key = jax.random.split(key)

      def joint_loss(meme_params, local_params):
        meme_logits, meme_state = forward(self.meme_model, meme_params, meme.model_state, x,
                                          True, meme_key)
        local_logits, local_state = forward(local_model, local_params, local.model_state, x,
                                            True, local_key)
        loss_meme, loss_local = losses.fml_losses(
            meme_logits, local_logits, y, mask, alpha, beta, temperature, task=task,
            local_labels=None if label_map is None else label_map[y])
        # Targets are stop-gradient constants, so d(sum)/d(meme) is dL_meme/d(meme), etc.
        return loss_meme + loss_local, (loss_meme, loss_local, meme_state, local_state)

      grads, (loss_meme, loss_local, meme_state, local_state) = jax.grad(
          joint_loss, argnums=(0, 1), has_aux=True)(meme.params, local.params)
      meme = meme.apply_gradients(grads[0], self.optimizer, lr_scale).replace(
          model_state=meme_state)
      local = local.apply_gradients(grads[1], self.optimizer, lr_scale).replace(
          model_state=local_state)
      metrics = {"train_loss": (loss_meme + loss_local) / 2, "train_loss_meme": loss_meme,
                 "train_loss_local": loss_local}
      return (meme, local), metrics
    return step

  def client_update(self, server_state, client_state, client, data, group):
    alpha, beta, lr_scale = (schedules.value_at(self.schedules[kind], client.round)
                             for kind in schedules.KINDS)
    meme = TrainState.create(server_state["params"], self.optimizer)   # fork + fresh optimizer
    (meme, local), metrics = self.train(self.make_step(group, alpha, beta, lr_scale),
                                        (meme, client_state), client, data)
    metrics.update(alpha=jnp.float32(alpha), beta=jnp.float32(beta),
                   lr_scale=jnp.float32(lr_scale))
    return ClientResult(client_state=local, upload=meme.params, metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return {"params": mean_over_clients(uploads, context.weights)}

  def global_model(self, server_state):
    return self.meme_model, server_state["params"]

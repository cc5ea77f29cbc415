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

A batch-norm meme (`model`) carries its running statistics: clients fork them with the
meme and the server averages them with it (fml_jax/algorithms/batch_norm.py).

Settings: the `fml` config section (`--config.fml.alpha=0.3`); the memes' average
goes through the `server` section's optimizer (fml_jax/algorithms/aggregation.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax import losses, schedules, settings
from fml_jax.algorithms import batch_norm
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import loss_step
from fml_jax.models import build_model, forward, init_variables
from fml_jax.optimizers import TrainState
from fml_jax.rounds.algorithm import global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel

# The `fml` config section.
DEFAULTS = {
    "alpha": 0.5,              # weight of CE in the local model's loss (KL: 1 - alpha)
    "beta": 0.5,               # weight of CE in the meme's loss (KL: 1 - beta)
    "temperature": 1.0,        # softmax temperature of the KL terms
    # Dynamic balance: "" constant | official (step schedule) | "0:0.1,10:0.5" piecewise.
    "alpha_schedule": "",
    "beta_schedule": "",
    "lr_schedule": "",         # a learning-rate factor, same forms
    "schedule_step_rounds": 10,  # official schedule: a step every N rounds ...
    "schedule_stop_round": 30,   # ... while the round is below this
}


def balance_schedules(section) -> dict:
  """The alpha, beta and learning-rate-factor tables of the `fml` section."""
  base = {"alpha": section.alpha, "beta": section.beta, "lr": 1.0}
  return {kind: schedules.to_table(section[f"{kind}_schedule"], kind, base[kind],
                                   section.schedule_step_rounds, section.schedule_stop_round,
                                   field=f"fml.{kind}_schedule")
          for kind in schedules.KINDS}


class FML(ClientModelsAlgorithm):
  name = "fml"
  config_section = "fml"
  default_aggregation = "uniform"   # the official code averages memes uniformly
  averages_models = True
  supports_batch_norm = True   # a batch-norm meme: its statistics are averaged with it
  uses_server_optimizer = True
  supports_client_tasks = True
  supports_availability = True
  supports_dp = True
  supports_catfish = True

  @classmethod
  def defaults(cls):
    return dict(DEFAULTS)

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fml.alpha", 0, 1)
    settings.number(config, "fml.beta", 0, 1)
    settings.number(config, "fml.temperature", 0, low_open=True)
    settings.number(config, "fml.schedule_step_rounds", 1, integer=True)
    settings.number(config, "fml.schedule_stop_round", 0, integer=True)
    balance_schedules(config.fml)

  @classmethod
  def small_overrides(cls):
    # Two local architectures (groups of 3, 2 of each per round) and a schedule.
    return {"local_models": "mlp,mlp_small", "fml.alpha_schedule": "0:0.7,1:0.4"}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.meme_model = build_model(config.model, num_classes, input_shape, "model",
                                  config.get("feature_dim", 0))
    self.schedules = balance_schedules(self.settings)
    self.server_optimizer = ServerOptimizer.from_config(config)

  def init(self, key, group_sizes):
    variables = init_variables(self.meme_model, global_model_key(key), self.input_shape)
    params = variables.pop("params")
    server = {"params": params, **self.server_optimizer.init(params)}
    if variables:   # a batch-norm meme: the global model's running statistics
      server["model_state"] = variables
    return server, self.init_clients(key)

  def make_step(self, group: int, alpha, beta, lr_scale):
    local_model, task = self.groups[group].model, self.groups[group].task
    label_map = None if task.is_identity else jnp.asarray(task.label_map)
    temperature = self.settings.temperature

    def step(carry, x, y, mask, key):
      meme_key, local_key = jax.random.split(key)

      def joint_loss(params, model_states):
        meme_logits, meme_state = forward(self.meme_model, params[0], model_states[0], x,
                                          True, meme_key)
        local_logits, local_state = forward(local_model, params[1], model_states[1], x,
                                            True, local_key)
        loss_meme, loss_local = losses.fml_losses(
            meme_logits, local_logits, y, mask, alpha, beta, temperature, task=task,
            local_labels=None if label_map is None else label_map[y])
        # Targets are stop-gradient constants, so d(sum)/d(meme) is dL_meme/d(meme), etc.
        return loss_meme + loss_local, ((meme_state, local_state), (loss_meme, loss_local))

      (meme, local), _, (loss_meme, loss_local) = loss_step(carry, joint_loss, self.optimizer,
                                                            lr_scale)
      metrics = {"train_loss": (loss_meme + loss_local) / 2, "train_loss_meme": loss_meme,
                 "train_loss_local": loss_local}
      return (meme, local), metrics
    return step

  def client_update(self, server_state, client_state, client, data, group):
    alpha, beta, lr_scale = (schedules.value_at(self.schedules[kind], client.round)
                             for kind in schedules.KINDS)
    lr_scale = lr_scale * self.lr_scale(client)   # fml.lr_schedule and the clients' lr_schedule
    meme = TrainState.create(server_state["params"], self.optimizer,   # fork + fresh optimizer
                             server_state.get("model_state"))
    (meme, local), metrics = self.train(self.make_step(group, alpha, beta, lr_scale),
                                        (meme, client_state), client, data)
    metrics.update(alpha=jnp.float32(alpha), beta=jnp.float32(beta),
                   lr_scale=jnp.float32(lr_scale))
    return ClientResult(client_state=local, upload=batch_norm.model_upload(meme),
                        metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return self.server_optimizer.update(server_state, uploads, context)

  def broadcast(self, server_state):
    # The meme, not the server optimizer's moments.
    return {k: v for k, v in server_state.items() if k in ("params", "model_state")}

  def global_model(self, server_state):
    return GlobalModel(self.meme_model, server_state["params"], server_state.get("model_state"))

"""Ditto (Li et al. 2021), as PFLlib runs it: a personal model beside FedAvg's.

Every client keeps a personal model v (and its optimizer state) across rounds. Each
round it receives the global model w and

  1. trains v for `ditto.personal_epochs` epochs on CE + (lam / 2) ||v - w||^2, so its
     gradient is g + lam (v - w) (PFLlib's perturbed SGD; PFLlib calls lam `-mu`);
  2. trains a copy of w for `local_epochs` epochs on CE, as FedAvg does (the same
     batch order as FedAvg's client with the same seed: paired runs), and uploads it.

The server averages the uploads weighted by example count (PFLlib's default), through
the `server` section's optimizer. Evaluation: the global model on the global test set,
each client's personal v on its own split.

lam: PFLlib's default 0 turns Ditto into local training beside FedAvg, so the default
here is the paper's middle value 0.1 (its grid: 0.05 to 2).
"""

from __future__ import annotations

import jax

from fml_jax import losses, settings
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import supervised_step
from fml_jax.errors import ConfigError
from fml_jax.local_training import run_local_steps
from fml_jax.models import build_model, init_params
from fml_jax.optimizers import TrainState
from fml_jax.rounds.algorithm import global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel

DEFAULTS = {
    "lam": 0.1,              # weight of the proximal term pulling v toward w
    "personal_epochs": 1,    # epochs of the personal model per round (PFLlib's -pls)
}
# The personal model's batches: another order than the global copy's (which pairs
# with FedAvg's).
PERSONAL_FOLD = 1


class Ditto(ClientModelsAlgorithm):
  name = "ditto"
  config_section = "ditto"
  default_aggregation = "weighted"   # PFLlib's server averages by training examples
  averages_models = True
  uses_server_optimizer = True
  supports_availability = True
  supports_dp = True

  @classmethod
  def defaults(cls):
    return dict(DEFAULTS)

  @classmethod
  def check_config(cls, config):
    settings.number(config, "ditto.lam", 0)
    settings.number(config, "ditto.personal_epochs", 1, integer=True)
    if config.algorithm == cls.name and config.local_models not in ("", config.model):
      raise ConfigError("local_models", "Ditto's personal model is pulled toward the global "
                        "one, so it has the global architecture: leave local_models empty")

  @classmethod
  def small_overrides(cls):
    return {"ditto.lam": 0.5}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model",
                             config.get("feature_dim", 0))
    self.server_optimizer = ServerOptimizer.from_config(config)

  def init(self, key, group_sizes):
    params = init_params(self.model, global_model_key(key), self.input_shape)
    return {"params": params, **self.server_optimizer.init(params)}, self.init_clients(key)

  def client_update(self, server_state, client_state, client, data, group):
    w, lam = server_state["params"], self.settings.lam
    lr_scale = self.lr_scale(client)
    personal_step = supervised_step(
        self.model, self.optimizer, regularizer=lambda v: 0.5 * lam * losses.proximal_term(v, w),
        lr_scale=lr_scale)
    personal, personal_metrics = run_local_steps(
        personal_step, client_state, data, client.train_idx, client.train_n,
        jax.random.fold_in(client.key, PERSONAL_FOLD), self.settings.personal_epochs,
        self.config.batch_size, min_examples=data.min_train, work=client.work)
    copy, metrics = self.train(supervised_step(self.model, self.optimizer, lr_scale=lr_scale),
                               TrainState.create(w, self.optimizer), client, data)
    return ClientResult(client_state=personal, upload=copy.params,
                        metrics={**metrics, "train_loss_personal": personal_metrics["train_loss"]})

  def server_update(self, server_state, uploads, context):
    return self.server_optimizer.update(server_state, uploads, context)

  def broadcast(self, server_state):
    return {"params": server_state["params"]}

  def global_model(self, server_state):
    return GlobalModel(self.model, server_state["params"])

"""FedRep (Collins et al. 2021), as PFLlib runs it: a shared body, a personal head.

The model is split into its body (every layer but the output one) and its head (the
final Dense layer). The server keeps the body; every client keeps its own head across
rounds. Each round a client receives the body and

  1. trains its head for `fedrep.head_epochs` epochs with the body frozen (PFLlib's -pls);
  2. trains the body for `local_epochs` epochs with the new head frozen (-ls),

and uploads the body; the server averages the bodies weighted by example count
(PFLlib's default) through the `server` section's optimizer. Each phase starts a
fresh optimizer (PFLlib's plain SGD keeps no state between rounds). There is no
global model to evaluate: each client predicts with the body and its own head.

The original code runs 10 local epochs, 1 of them for the representation: set
`local_epochs=1 fedrep.head_epochs=9` for that split.
"""

from __future__ import annotations

import jax

from fml_jax import losses, settings
from fml_jax.algorithms.aggregation import ServerOptimizer
from fml_jax.algorithms.client_models import map_in_place, INIT_BATCH
from fml_jax.algorithms.steps import loss_step
from fml_jax.errors import ConfigError
from fml_jax.local_training import run_local_steps
from fml_jax.models import build_model, forward, init_params, output_layer
from fml_jax.optimizers import TrainState, make_optimizer
from fml_jax.rounds.algorithm import Algorithm, client_models_key, global_model_key
from fml_jax.rounds.types import ClientResult, PersonalizedModels

DEFAULTS = {"head_epochs": 1}   # epochs of the personal head per round (PFLlib's -pls)
HEAD_FOLD = 1   # the head phase's batch order (the body's is the client's own key)


def head_layer(params) -> str:
  """The output layer (models.output_layer): `head` of a split model, else the
  highest-numbered Dense layer."""
  name = output_layer(params)
  if name is None:
    raise ValueError(f"no output layer among {sorted(params)}: FedRep needs a model whose "
                     "output layer is a Dense_<k> module, or feature_dim > 0")
  return name


def split(params) -> tuple[dict, dict]:
  """(body, head) of a model's parameters."""
  head = head_layer(params)
  return {k: v for k, v in params.items() if k != head}, {head: params[head]}


class FedRep(Algorithm):
  name = "fedrep"
  config_section = "fedrep"
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
    settings.number(config, "fedrep.head_epochs", 1, integer=True)
    if config.algorithm == cls.name and config.model == "logreg":
      raise ConfigError("model", "logreg is a single layer: FedRep needs a body below the head "
                        "(mlp, cnn, lenet5)")

  @classmethod
  def small_overrides(cls):
    return {"fedrep.head_epochs": 2}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.model = build_model(config.model, num_classes, input_shape, "model",
                             config.get("feature_dim", 0))
    self.optimizer = make_optimizer(config)
    self.server_optimizer = ServerOptimizer.from_config(config)

  def init(self, key, group_sizes):
    body, _ = split(init_params(self.model, global_model_key(key), self.input_shape))
    # Client i's head: the head of the model drawn from key i of the clients' split.
    keys = jax.random.split(client_models_key(key), group_sizes[0])
    heads = map_in_place(lambda k: split(init_params(self.model, k, self.input_shape))[1],
                         keys, INIT_BATCH)
    return {"params": body, **self.server_optimizer.init(body)}, (heads,)

  def _phase(self, trainable, frozen, epochs: int, key, client, data):
    """Trains the `trainable` half of the model for `epochs` with the other half fixed."""
    def step(state, x, y, mask, step_key):
      def loss_fn(params, model_state):
        whole = {**frozen, **params}
        logits, model_state = forward(self.model, whole, model_state, x, True, step_key)
        return losses.cross_entropy(logits, y, mask), (model_state, None)
      state, loss, _ = loss_step(state, loss_fn, self.optimizer, self.lr_scale(client))
      return state, {"train_loss": loss}
    return run_local_steps(step, TrainState.create(trainable, self.optimizer), data,
                           client.train_idx, client.train_n, key, epochs,
                           self.config.batch_size, min_examples=data.min_train, work=client.work)

  def client_update(self, server_state, client_state, client, data, group):
    body = server_state["params"]
    head, head_metrics = self._phase(client_state, body, self.settings.head_epochs,
                                     jax.random.fold_in(client.key, HEAD_FOLD), client, data)
    body, metrics = self._phase(body, head.params, self.config.local_epochs, client.key,
                                client, data)
    return ClientResult(client_state=head.params, upload=body.params,
                        metrics={**metrics, "train_loss_head": head_metrics["train_loss"]})

  def server_update(self, server_state, uploads, context):
    return self.server_optimizer.update(server_state, uploads, context)

  def broadcast(self, server_state):
    return {"params": server_state["params"]}

  def personalized_models(self, server_state, population):
    (heads,) = population
    n = jax.tree.leaves(heads)[0].shape[0]
    whole = {**jax.tree.map(lambda b: jax.numpy.broadcast_to(b, (n, *b.shape)),
                            server_state["params"]), **heads}
    return [PersonalizedModels(self.model, whole, per_client=True)]

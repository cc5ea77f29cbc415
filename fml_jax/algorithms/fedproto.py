"""FedProto (Tan et al., AAAI 2022), as HtFLlib runs it: class prototypes instead of
parameters, and nearest-prototype prediction.

Every client keeps its own split model (`feature_dim` > 0; architectures may differ,
grouped). Each round a cohort member

  1. trains `local_epochs` with
         loss = CE(head(rep), y) + `fedproto.weight` * MSE(rep, P[y]),
     where rep is the model's pooled representation and P the global prototypes;
     MSE averages over all batch x feature_dim elements, and a row whose class has
     no global prototype contributes 0 (HtFLlib fills it with the row's own detached
     representation);
  2. uploads, for every class it saw, the mean representation of that class over the
     round (train mode, every local epoch, as computed for the loss).

The server keeps, per class, the unweighted mean over the cohort members that
reported that class this round (HtFLlib and the official code; the paper describes a
count-weighted mean). Prediction ignores the head: a client predicts the class whose
global prototype is nearest (mean squared distance) to its representation; classes
with no prototype never win, and before any prototype exists every prediction is
wrong (HtFLlib counts accuracy 0 then). Clients are scored on their own test split and
on the whole test set.

`fedproto.weight` (lambda): 10 is HtFLlib's benchmark script (total.sh, the setting
`experiments/run.py htfl` reproduces); 1 is HtFLlib's main.py default and the official
repository's `--ld`. The official repository also trains with SGD momentum 0.5
(`--momentum=0.5`); HtFLlib's plain SGD is `momentum=0`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fml_jax import losses, settings
from fml_jax.algorithms import per_class
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.lgfedavg import require_split_models
from fml_jax.algorithms.steps import loss_step
from fml_jax.models import HeadSplit, features
from fml_jax.rounds.types import ClientResult, PersonalizedModels

NO_PROTOTYPE = -1e9   # the score of a class without a global prototype


def prototype_loss(logits, rep, labels, mask, prototypes, has, weight: float):
  """(total, cross-entropy, prototype term) of one batch: the prototype term is the
  mean over the valid rows' rep x feature_dim entries of (P[y] - rep)^2, rows whose
  class has no prototype counting 0."""
  ce = losses.cross_entropy(logits, labels, mask)
  valid = mask.astype(rep.dtype)
  use = has[labels].astype(rep.dtype) * valid
  sq = jnp.sum(jnp.square(prototypes[labels] - rep), axis=-1) * use
  proto = jnp.sum(sq) / (jnp.maximum(jnp.sum(valid), 1.0) * rep.shape[-1])
  return ce + weight * proto, ce, proto


def prototype_scores(rep, prototypes, has):
  """(B, C + 1) scores: -MSE(rep, P_c) for classes with a prototype, NO_PROTOTYPE for
  the others, and a last column that wins only when no class has a prototype (it is
  no class, so every prediction is wrong then, as HtFLlib counts it)."""
  mse = jnp.mean(jnp.square(rep[:, None, :] - prototypes[None]), axis=-1)
  scores = jnp.where(has[None], -mse, NO_PROTOTYPE)
  none = jnp.where(has.any(), 2 * NO_PROTOTYPE, 0.0)
  return jnp.concatenate([scores, jnp.broadcast_to(none, (rep.shape[0], 1))], axis=-1)


class NearestPrototype(nn.Module):
  """A split model predicting by its nearest global prototype. Variables: the model's
  under `net` ({"params": {"net": ...}}, likewise its batch statistics) and the
  prototypes in the "prototypes" collection ({"centers": (C, D), "has": (C,)})."""
  net: HeadSplit

  @nn.compact
  def __call__(self, x, train: bool = False):
    centers = self.variable("prototypes", "centers", lambda: None).value
    has = self.variable("prototypes", "has", lambda: None).value
    return prototype_scores(self.net.features(x, train), centers, has)


class FedProto(ClientModelsAlgorithm):
  name = "fedproto"
  config_section = "fedproto"
  supports_availability = True   # a client that drops keeps its model; its prototypes count not
  evaluates_clients_on_global_test = True

  @classmethod
  def defaults(cls):
    return {"weight": 10.0}   # lambda: HtFLlib's total.sh (-lam 10); main.py and the paper's code: 1

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedproto.weight", 0)
    require_split_models(config, cls.name, "class prototypes")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "feature_dim": 8}

  def init(self, key, group_sizes):
    c, d = self.num_classes, self.config.feature_dim
    server = {"prototypes": jnp.zeros((c, d), jnp.float32), "has": jnp.zeros((c,), bool)}
    return server, self.init_clients(key)

  def train_toward_prototypes(self, server_state, client_state, client, data, group):
    """The client's local epochs under CE + weight x MSE(rep, P[y]) toward the server's
    prototypes. Returns (state, (C, fd) per-class sums of its train-mode
    representations over the epochs, (C,) their counts, metrics)."""
    model, c = self.groups[group].model, self.num_classes
    weight = self.settings.weight

    def step(carry, x, y, mask, key):
      state, sums, counts = carry

      def loss_fn(params, model_state):
        rep, logits, model_state = features(model, params, model_state, x, True, key)
        loss, ce, proto = prototype_loss(logits, rep, y, mask, server_state["prototypes"],
                                         server_state["has"], weight)
        return loss, (model_state, (rep, ce, proto))

      state, loss, (rep, ce, proto) = loss_step(state, loss_fn, self.optimizer,
                                                self.lr_scale(client))
      batch_sums, batch_counts = per_class.class_sums(rep, y, mask, c)
      return (state, sums + batch_sums, counts + batch_counts), {
          "train_loss": loss, "train_ce": ce, "prototype_loss": proto}

    d = self.config.feature_dim
    start = (client_state, jnp.zeros((c, d), jnp.float32), jnp.zeros((c,), jnp.float32))
    (state, sums, counts), metrics = self.train(step, start, client, data)
    return state, sums, counts, metrics

  def client_update(self, server_state, client_state, client, data, group):
    state, sums, counts, metrics = self.train_toward_prototypes(server_state, client_state,
                                                                client, data, group)
    prototypes, has = per_class.means(sums, counts)
    return ClientResult(client_state=state, upload={"prototypes": prototypes, "has": has},
                        metrics=metrics)

  def server_update(self, server_state, uploads, context):
    # From this round's uploads only, as HtFLlib does.
    prototypes, has = per_class.mean_over_reports(
        uploads["prototypes"], uploads["has"], per_class.reported(uploads["has"], context))
    return {"prototypes": prototypes, "has": has}, {
        "classes_with_prototypes": has.sum().astype(jnp.float32)}

  def personalized_models(self, server_state, population):
    models = []
    for g, (group, state) in enumerate(zip(self.groups, population)):
      n = jax.tree.leaves(state.params)[0].shape[0]
      tile = lambda x: jnp.broadcast_to(x, (n, *x.shape))
      model_state = {name: {"net": value} for name, value in state.model_state.items()}
      model_state["prototypes"] = {"centers": tile(server_state["prototypes"]),
                                   "has": tile(server_state["has"])}
      models.append(PersonalizedModels(
          NearestPrototype(net=group.model), {"net": state.params}, per_client=True,
          client_ids=np.flatnonzero(self.group_of == g), model_state=model_state))
    return models

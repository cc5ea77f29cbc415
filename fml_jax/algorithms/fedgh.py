"""FedGH (Yi et al., ACM MM 2023), as HtFLlib runs it: the server trains one global
head on the clients' class prototypes.

Every client keeps its own split model (`feature_dim` > 0; architectures may differ,
grouped). The server's head starts as client 0's initial head. Each round

  1. every client's head is the global head (written into all clients, as HtFLlib's
     `send_parameters`, so evaluation too uses body + global head);
  2. a cohort member trains body and head with plain cross-entropy, then computes
     the mean representation of each class it holds with the trained model in
     inference mode over its whole training set, and uploads those prototypes;
  3. the server trains the head with cross-entropy on the round's (prototype, class)
     pairs: `fedgh.server_epochs` shuffled passes in batches of `batch_size`, plain SGD
     at `fedgh.server_learning_rate` (the last batch of a pass is partial, as
     PyTorch's DataLoader without drop_last).

Communication: at most C x feature_dim floats (and C flags) up, the head down.
HtFLlib's loaders drop the last partial batch (`drop_last=True`, unshuffled), so its
prototypes leave out a client's last few examples; here every example counts.
`fedgh.server_epochs`: 1 is HtFLlib's benchmark script (total.sh, `-se 1`), 100 its
main.py default. Dropped clients' prototypes are left out (`supports_availability`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax import losses, settings
from fml_jax.algorithms import per_class
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.lgfedavg import (client_zero_head, require_split_models,
                                         under_global_head, with_head)
from fml_jax.algorithms.steps import supervised_step
from fml_jax.models import features
from fml_jax.rounds.types import ClientResult

PROTOTYPE_BATCH = 256   # examples per forward pass when a client computes its prototypes


def head_logits(head, rep):
  """The Dense head `{"kernel", "bias"}` on representations (B, fd)."""
  return rep @ head["kernel"] + head["bias"]


def train_head(head, prototypes, has, key, epochs: int, batch_size: int, learning_rate: float):
  """HtFLlib's server step: plain SGD on mean cross-entropy of `head` over the valid
  (prototype, class) pairs of (k, C, fd) `prototypes` (`has` (k, C)), `epochs` passes in
  a fresh random order each, batches of `batch_size`, the last one partial."""
  loss_fn = lambda h, reps, labels, mask: losses.cross_entropy(head_logits(h, reps), labels, mask)
  return per_class.sgd_over_pairs(head, loss_fn, prototypes, has, key, epochs, batch_size,
                                  learning_rate)[0]


def class_prototypes(model, state, data, client, num_classes: int, feature_dim: int):
  """((C, fd) mean inference-mode representation of each class over the client's
  whole training set, (C,) which classes it holds)."""
  max_n = client.train_idx.shape[0]
  batch = min(PROTOTYPE_BATCH, max_n)
  num_batches = -(-max_n // batch)
  positions = jnp.arange(num_batches * batch).reshape(num_batches, batch)

  def body(carry, pos):
    sums, counts = carry
    rows = client.train_idx[jnp.minimum(pos, max_n - 1)]
    x = data.normalize(data.x_train[rows])
    rep, _, _ = features(model, state.params, state.model_state, x, False, client.key)
    batch_sums, batch_counts = per_class.class_sums(rep, data.y_train[rows],
                                                    pos < client.train_n, num_classes)
    return (sums + batch_sums, counts + batch_counts), None

  start = (jnp.zeros((num_classes, feature_dim), jnp.float32),
           jnp.zeros((num_classes,), jnp.float32))
  sums, counts = jax.lax.scan(body, start, positions)[0]
  return per_class.means(sums, counts)


class FedGH(ClientModelsAlgorithm):
  name = "fedgh"
  config_section = "fedgh"
  supports_availability = True   # a dropped client's prototypes are not trained on
  evaluates_clients_on_global_test = True

  @classmethod
  def defaults(cls):
    return {"server_epochs": 1,            # HtFLlib's total.sh (-se 1); main.py: 100
            "server_learning_rate": 0.01}  # HtFLlib's -slr

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedgh.server_epochs", 1, integer=True)
    settings.number(config, "fedgh.server_learning_rate", 0, low_open=True)
    require_split_models(config, cls.name, "class prototypes and a head")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "feature_dim": 8, "fedgh.server_epochs": 2}

  def init(self, key, group_sizes):
    population = self.init_clients(key)
    # HtFLlib starts the server's head as client 0's.
    head = client_zero_head(population, self.group_of)
    return {"head": head}, population

  def client_update(self, server_state, client_state, client, data, group):
    model = self.groups[group].model
    state = client_state.replace(params=with_head(client_state.params, server_state["head"]))
    step = supervised_step(model, self.optimizer, lr_scale=self.lr_scale(client))
    state, metrics = self.train(step, state, client, data)
    prototypes, has = class_prototypes(model, state, data, client, self.num_classes,
                                       self.config.feature_dim)
    return ClientResult(client_state=state, upload={"prototypes": prototypes, "has": has},
                        metrics=metrics)

  def server_update(self, server_state, uploads, context):
    s = self.settings
    has = uploads["has"] & per_class.reported(uploads["has"], context)[:, None]
    head = train_head(server_state["head"], uploads["prototypes"], has, context.key,
                      s.server_epochs, self.config.batch_size, s.server_learning_rate)
    return {"head": head}, {"server_pairs": has.sum().astype(jnp.float32)}

  def broadcast(self, server_state):
    return server_state["head"]

  def personalized_models(self, server_state, population):
    return under_global_head(self.groups, self.group_of, population, server_state["head"])

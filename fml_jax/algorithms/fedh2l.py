"""FedH2L: decentralized mutual distillation on a shared seed set (Li et al. 2021).

Participants have their own architectures (`local_models`, grouped) and private
non-IID data, and never share parameters or gradients. What they share is their
posteriors on a small **seed set** held out from the training data
(`public_size` examples, `public_balanced` for equal counts per class).

The paper's exact objective could not be read (ALGORITHMS.md), so this is our
design, every choice a setting:

  each round, every participant
    1. computes its posteriors softmax(logits / T) on the whole seed set (inference
       mode) and sends them to its peers: `fedh2l.topology` = full (everyone), ring
       (the previous and next participant in cohort order) or random_k (`fedh2l.peers`
       peers drawn anew each round);
    2. trains `local_epochs` on its private data; every step adds, on a random batch
       of the seed set, `fedh2l.distill_weight` * KL(mean of its peers' posteriors ||
       its own posteriors at temperature T) and, with `fedh2l.seed_ce`, cross-entropy on
       the seed labels.

There is no server: `exchange` only routes each participant the mean of what its
peers sent (one matrix product over the cohort), and nothing is averaged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax import losses, settings
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import loss_step
from fml_jax.errors import ConfigError
from fml_jax.models import apply_model, forward
from fml_jax.rounds.types import ClientResult

TOPOLOGIES = ("full", "ring", "random_k")


def peer_matrix(topology: str, num: int, key: jax.Array, peers: int = 2) -> jax.Array:
  """(num, num) float32: row i is 1/deg on participant i's peers, 0 elsewhere (and on
  the diagonal)."""
  eye = jnp.eye(num, dtype=bool)
  if topology == "full":
    adjacency = ~eye
  elif topology == "ring":
    i = jnp.arange(num)
    adjacency = jnp.zeros((num, num), bool).at[i, (i + 1) % num].set(True).at[
        i, (i - 1) % num].set(True) & ~eye
  else:   # random_k: each row draws `peers` others
    scores = jnp.where(eye, 2.0, jax.random.uniform(key, (num, num)))
    adjacency = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) < peers
  adjacency = adjacency.astype(jnp.float32)
  return adjacency / jnp.maximum(adjacency.sum(axis=1, keepdims=True), 1.0)


def out_degree(topology: str, num: int, peers: int) -> int:
  """How many peers each participant sends its posteriors to (the same for all)."""
  if num == 1:
    return 0
  return {"full": num - 1, "ring": min(2, num - 1), "random_k": peers}[topology]


class FedH2L(ClientModelsAlgorithm):
  name = "fedh2l"
  config_section = "fedh2l"
  exchanges_messages = True
  needs_public_data = True
  evaluates_clients_on_global_test = True

  @classmethod
  def defaults(cls):
    return {
        "topology": "full",      # full | ring | random_k (peers redrawn each round)
        "peers": 2,              # random_k: peers per participant
        "distill_weight": 1.0,   # weight of the KL toward the peers' posteriors
        "temperature": 1.0,
        "seed_ce": False,        # also cross-entropy on the seed set's labels
    }

  @classmethod
  def check_config(cls, config):
    settings.choice(config, "fedh2l.topology", TOPOLOGIES)
    settings.number(config, "fedh2l.peers", 1, integer=True)
    settings.number(config, "fedh2l.temperature", 0, low_open=True)
    settings.number(config, "fedh2l.distill_weight", 0)
    settings.boolean(config, "fedh2l.seed_ce")
    c = config.fedh2l
    if (config.algorithm == cls.name and c.topology == "random_k"
        and c.peers >= config.clients_per_round):
      raise ConfigError("fedh2l.peers", f"{c.peers} peers need more than "
                        f"clients_per_round={config.clients_per_round} participants")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp,mlp_small", "public_size": 40, "fedh2l.topology": "random_k",
            "fedh2l.peers": 2, "fedh2l.seed_ce": True}

  def prepare_round(self, server_state, context, data):
    c = self.settings
    return {"peers": peer_matrix(c.topology, context.clients.id.shape[0], context.key, c.peers)}

  def client_message(self, server_state, client_state, client, data, group):
    """Posteriors on the whole seed set (inference mode)."""
    logits = apply_model(self.groups[group].model, client_state.params,
                         data.normalize(data.x_public), client_state.model_state)
    return jax.nn.softmax(logits / self.settings.temperature)

  def exchange(self, server_state, messages, context):
    # Row i: the mean of the posteriors participant i received from its peers.
    targets = jnp.einsum("ij,jsc->isc", server_state["peers"], messages)
    return {**server_state, "targets": targets}

  def client_update(self, server_state, client_state, client, data, group):
    c = self.settings
    model = self.groups[group].model
    target = server_state["targets"][client.position]   # (seed, classes)
    seed_size = data.x_public.shape[0]
    seed_batch = min(self.config.batch_size, seed_size)
    lr_scale = self.lr_scale(client)

    def step(state, x, y, mask, key):
      seed_key, private_key, key = jax.random.split(key, 3)
      rows = jax.random.choice(seed_key, seed_size, (seed_batch,), replace=False)
      seed_x = data.normalize(data.x_public[rows])

      def loss_fn(params, model_state):
        # Private and seed examples in one forward pass (one batch norm batch).
        logits, model_state = forward(model, params, model_state,
                                      jnp.concatenate([x, seed_x]), True, private_key)
        private, seed = logits[:x.shape[0]], logits[x.shape[0]:]
        ce = losses.cross_entropy(private, y, mask)
        full = jnp.ones(seed_batch, bool)
        distill = losses.kl_from_log_probs(jnp.log(jnp.maximum(target[rows], 1e-12)),
                                           jax.nn.log_softmax(seed / c.temperature), full)
        loss = ce + c.distill_weight * distill
        if c.seed_ce:
          loss = loss + losses.cross_entropy(seed, data.y_public[rows], full)
        return loss, (model_state, (ce, distill))

      state, loss, (ce, distill) = loss_step(state, loss_fn, self.optimizer, lr_scale)
      return state, {"train_loss": loss, "train_ce": ce, "distill_loss": distill}

    state, metrics = self.train(step, client_state, client, data)
    return ClientResult(client_state=state, upload=(), metrics=metrics)

  def server_update(self, server_state, uploads, context):
    return {}, {}   # nothing persists between rounds: there is no server

  def communication(self, server_shapes, upload_bytes, message_bytes, cohort_size):
    # Peer to peer: every participant sends its posteriors to each of its peers, and
    # receives as many; counted once as sent (up) and once as received (down).
    degree = out_degree(self.settings.topology, cohort_size, self.settings.peers)
    return {"bytes_up": message_bytes * degree, "bytes_down": message_bytes * degree}

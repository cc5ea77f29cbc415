"""FedMD: heterogeneous federated learning via model distillation (Li & Wang 2019).

Every party (client) has its own architecture (`local_models`, e.g. the ten
`fedmd_p0..p9` CNNs of the official code; each architecture is a group) and
never shares parameters. The protocol, as in the official code:

  transfer learning (`warm_start`, once): train on the public set for
      `fedmd.public_epochs` (keeping the epoch with the best accuracy on a held-out
      10% of the public set if `fedmd.early_stopping`), then on the party's private
      data for `fedmd.private_epochs`;
  every round:
    1. `prepare_round`: the server draws an alignment subset of `fedmd.alignment_size`
       public examples, stratified (class proportions of the public set), new each round;
    2. `client_message`: every party's logits on it (inference mode);
    3. `exchange`: the consensus is the plain mean of the parties' logits;
    4. digest: each party trains toward the consensus for `fedmd.digest_epochs`
       (batch `fedmd.digest_batch_size`): L1 on logits (the official mean absolute
       error) or, with `fedmd.digest_loss=kl`, KL(softmax(consensus/T) || softmax(own/T));
    5. revisit: `local_epochs` on the private data (batch `batch_size`).

Nothing is averaged on the server; the bytes sent are logits (up) and the
consensus plus the alignment indices (down).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import time

from absl import logging

from fml_jax import losses, outputs, settings
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import loss_step, supervised_step
from fml_jax.evaluation import evaluate_rows
from fml_jax.local_training import run_local_steps
from fml_jax.models import apply_model, forward
from fml_jax.rounds.types import ClientResult

DIGEST_LOSSES = ("l1", "kl")
# Share of the public set held out to pick the best public epoch (early stopping).
VALIDATION_FRACTION = 0.1


def stratified_subset(key: jax.Array, labels: jax.Array, size: int, num_classes: int) -> jax.Array:
  """`size` distinct indices of `labels`, uniformly at random within each class, with
  per-class counts proportional to the class frequencies (largest remainder), like
  scikit-learn's StratifiedShuffleSplit which the official code uses. Traceable."""
  n = labels.shape[0]
  counts = jnp.bincount(labels, length=num_classes)
  exact = size * counts / n
  quota = jnp.floor(exact).astype(jnp.int32)
  remainder = size - jnp.sum(quota)
  frac_rank = jnp.argsort(jnp.argsort(-(exact - quota)))
  quota = quota + (frac_rank < remainder).astype(jnp.int32)
  # Rank of each example within its class, in a random order.
  order = jnp.lexsort((jax.random.uniform(key, (n,)), labels))
  starts = jnp.cumsum(counts) - counts
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n) - starts[labels[order]])
  chosen = rank < quota[labels]
  return jnp.sort(jnp.argsort(~chosen, stable=True)[:size])


def digest_loss(kind: str, temperature: float):
  def l1(logits, target, mask):
    return losses.masked_mean(jnp.mean(jnp.abs(logits - target), axis=-1), mask)

  def kl(logits, target, mask):
    return losses.kl_divergence(target, logits, mask, temperature)
  return l1 if kind == "l1" else kl


class FedMD(ClientModelsAlgorithm):
  name = "fedmd"
  config_section = "fedmd"
  exchanges_messages = True
  has_warm_start = True
  needs_public_data = True
  evaluates_clients_on_global_test = True
  supports_lr_schedule = False   # its phases keep their own optimizers (issue 17 reworks them)

  @classmethod
  def defaults(cls):
    return {
        "public_epochs": 5,        # transfer learning on the public set ...
        "private_epochs": 5,       # ... then on each party's private data
        "early_stopping": True,    # keep each party's best public epoch (10% of public held out)
        "alignment_size": 5000,    # public examples drawn (stratified) each round
        "digest_loss": "l1",       # l1 (official: mean absolute error on logits) | kl
        "digest_temperature": 1.0,  # kl only
        "digest_epochs": 1,
        "digest_batch_size": 256,
        "report_bounds": True,     # also train the pooled-private-data bound (bounds.json)
    }

  @classmethod
  def check_config(cls, config):
    settings.choice(config, "fedmd.digest_loss", DIGEST_LOSSES)
    for field in ("public_epochs", "private_epochs", "digest_epochs"):
      settings.number(config, f"fedmd.{field}", 0, integer=True)
    for field in ("alignment_size", "digest_batch_size"):
      settings.number(config, f"fedmd.{field}", 1, integer=True)
    settings.number(config, "fedmd.digest_temperature", 0, low_open=True)
    for field in ("early_stopping", "report_bounds"):
      settings.boolean(config, f"fedmd.{field}")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp,mlp_small", "public_size": 60, "fedmd.alignment_size": 30,
            "fedmd.public_epochs": 2, "fedmd.private_epochs": 1, "fedmd.digest_batch_size": 16,
            "local_epochs": 1, "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0,
            "momentum": 0.0, "fedmd.report_bounds": False}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.digest = digest_loss(self.settings.digest_loss, self.settings.digest_temperature)

  # --- transfer learning -----------------------------------------------------------------

  def public_split(self, data) -> tuple[int, int]:
    """(training, validation) sizes of the public set (validation: its last 10%)."""
    total = data.x_public.shape[0]
    val = int(total * VALIDATION_FRACTION) if self.settings.early_stopping else 0
    return total - val, val

  def warm_start(self, client_state, client, data, group):
    c, batch_size = self.settings, self.config.batch_size
    model = self.groups[group].model
    step = supervised_step(model, self.optimizer)
    public = data.replace(x_train=data.x_public, y_train=data.y_public)
    n_train, n_val = self.public_split(data)
    public_key, private_key = jax.random.split(client.key)

    def epoch(carry, e):
      state, best, best_acc = carry
      state, _ = run_local_steps(step, state, public, jnp.arange(n_train), jnp.asarray(n_train),
                                 jax.random.fold_in(public_key, e), 1, batch_size)
      if not n_val:
        return (state, state, best_acc), None
      acc, _ = evaluate_rows(model, (state.params, state.model_state), data.x_public,
                             data.y_public, jnp.arange(n_train, n_train + n_val),
                             jnp.asarray(n_val), data.normalize, min(n_val, 500))
      better = acc > best_acc
      best = jax.tree.map(lambda new, old: jnp.where(better, new, old), state, best)
      return (state, best, jnp.maximum(acc, best_acc)), None

    if c.public_epochs:
      (_, client_state, _), _ = jax.lax.scan(
          epoch, (client_state, client_state, jnp.float32(-1.0)), jnp.arange(c.public_epochs))
    if c.private_epochs:
      client_state, _ = run_local_steps(step, client_state, data, client.train_idx, client.train_n,
                                        private_key, c.private_epochs, batch_size)
    return client_state

  # --- rounds ----------------------------------------------------------------------------

  def prepare_round(self, server_state, context, data):
    size = min(self.settings.alignment_size, data.x_public.shape[0])
    return {"alignment_idx": stratified_subset(context.key, data.y_public, size,
                                               self.num_classes).astype(jnp.int32)}

  def client_message(self, server_state, client_state, client, data, group):
    """The party's logits on the alignment subset (inference mode), in batches."""
    model = self.groups[group].model
    idx = server_state["alignment_idx"]
    batch = min(self.settings.digest_batch_size, idx.shape[0])
    num_batches = -(-idx.shape[0] // batch)
    padded = jnp.pad(idx, (0, num_batches * batch - idx.shape[0])).reshape(num_batches, batch)
    logits = jax.lax.map(lambda rows: apply_model(
        model, client_state.params, data.normalize(data.x_public[rows]),
        client_state.model_state), padded)
    return logits.reshape(-1, logits.shape[-1])[:idx.shape[0]]

  def exchange(self, server_state, messages, context):
    # The consensus: the plain mean of every party's logits (all groups).
    return {**server_state, "consensus": jnp.mean(messages, axis=0)}

  def client_update(self, server_state, client_state, client, data, group):
    c = self.settings
    model = self.groups[group].model
    idx, consensus = server_state["alignment_idx"], server_state["consensus"]
    digest_key, revisit_key = jax.random.split(client.key)

    def digest_step(state, x, rows, mask, key):
      def loss_fn(params, model_state):
        logits, model_state = forward(model, params, model_state, x, True, key)
        return self.digest(logits, consensus[rows], mask), (model_state, None)
      state, loss, _ = loss_step(state, loss_fn, self.optimizer)
      return state, {"digest_loss": loss}

    # The alignment subset as a dataset whose "labels" are rows of the consensus.
    alignment = data.replace(x_train=data.x_public[idx],
                             y_train=jnp.arange(idx.shape[0], dtype=jnp.int32))
    state, digest_metrics = run_local_steps(
        digest_step, client_state, alignment, jnp.arange(idx.shape[0]),
        jnp.asarray(idx.shape[0]), digest_key, c.digest_epochs, c.digest_batch_size)
    state, metrics = run_local_steps(supervised_step(model, self.optimizer), state, data,
                                     client.train_idx, client.train_n, revisit_key,
                                     self.config.local_epochs, self.config.batch_size)
    return ClientResult(client_state=state, upload=(), metrics={**metrics, **digest_metrics})

  def server_update(self, server_state, uploads, context):
    return {}, {}   # nothing persists on the server between rounds

  def communication(self, server_shapes, upload_bytes, message_bytes, cohort_size):
    # Up: every party's logits; down: the consensus and the alignment indices, to each.
    size = server_shapes["alignment_idx"].shape[0]
    return {"bytes_up": upload_bytes + message_bytes,
            "bytes_down": cohort_size * size * (4 * self.num_classes + 4)}


  def after_warm_start(self, runner, evaluate, warm_record, workdir, seed):
    """FedMD's two reference points, in the metrics' format (bounds.json): each party
    after transfer learning alone (no collaboration), and each party's architecture
    trained the same way on every party's private data pooled."""
    if not self.settings.report_bounds:
      return
    t0 = time.perf_counter()
    pooled = runner.warm_start(runner.init(seed), rows=pooled_rows(runner.data))
    bounds = {"no_collaboration": warm_record,
              "pooled": {"round": 0, **evaluate(pooled),
                         "warm_start_seconds": time.perf_counter() - t0}}
    outputs.atomic_write_json(workdir / "bounds.json", bounds)
    logging.info("pooled-data bound: personalized acc %.4f, on the global test set %.4f",
                 bounds["pooled"]["local_test_acc_mean"],
                 bounds["pooled"]["client_global_test_acc_mean"])


def pooled_rows(data) -> tuple[jax.Array, jax.Array]:
  """Every client's private training rows pooled into one (train_idx, train_n) row:
  the flat index array is exactly that, client after client."""
  return data.train_flat, jnp.asarray(data.train_flat.shape[0], jnp.int32)


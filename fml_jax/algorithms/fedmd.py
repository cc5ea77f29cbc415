"""FedMD: heterogeneous federated learning via model distillation (Li & Wang 2019).

Every party (client) has its own architecture (`local_models`, e.g. the ten
`fedmd_p0..p9` CNNs of the official code; each architecture is a group) and
never shares parameters. The protocol, as in the official code:

  transfer learning (`warm_start`, once): train on the public set for at most
      `fedmd.public_epochs` (batch `fedmd.public_batch_size`), then on the party's
      private data for at most `fedmd.private_epochs` (batch `batch_size`), each
      with early stopping on a validation accuracy (`fedmd.early_stopping`, below);
  every round:
    1. `prepare_round`: the server draws an alignment subset of `fedmd.alignment_size`
       public examples, stratified (class proportions of the public set), new each round;
    2. `client_message`: every party's logits on it (inference mode);
    3. `exchange`: the consensus is the plain mean of the parties' logits;
    4. digest: each party trains toward the consensus for `fedmd.digest_epochs`
       (batch `fedmd.digest_batch_size`): L1 on logits (the official mean absolute
       error) or, with `fedmd.digest_loss=kl`, KL(softmax(consensus/T) || softmax(own/T));
    5. revisit: `local_epochs` on the private data (batch `fedmd.revisit_batch_size`).

Four settings follow the official code (diogenes0319/FedMD_clean) by default; each
has the earlier fml_jax behaviour as its other value:

  fedmd.optimizers = "per_phase" (official): Keras compiles a fresh Adam for each
      model it fits, so public pre-training has its own optimizer state; the private
      transfer starts a fresh one, which carries on through every revisit (the same
      Keras model, `model_classifier`, is fitted again each round); the digest
      (`model_logits`, compiled once after the transfer) has its own, kept across
      rounds. A party's persistent state is therefore a `PartyState`: its TrainState
      (whose `opt_state` is the private/revisit optimizer's) plus `digest_opt_state`.
      "shared": one optimizer state through public, private, digest and revisit
      (fml_jax before; `digest_opt_state` is then empty).
  fedmd.final_layer_l2 = 1e-3 (official): Keras' `kernel_regularizer=l2(1e-3)` on the
      last Dense layer adds 1e-3 * sum(kernel**2) to the loss of every phase (public,
      private, digest, revisit). The last Dense layer is the highest-numbered
      top-level `Dense_<k>` module of each party's parameters (`head` with
      feature_dim; models.output_layer). 0 turns it off.
  batch sizes (official): public pre-training `fedmd.public_batch_size` = 128;
      private transfer the top-level `batch_size` (official 32; configs/fedmd.py sets
      it, and the pooled bound trains with it too, official 32); revisit
      `fedmd.revisit_batch_size` = 5 (official 5 on EMNIST, the paper says 5-10);
      digest `fedmd.digest_batch_size` = 256.
  fedmd.early_stopping = "patience" (official): Keras `EarlyStopping(monitor=
      "val_accuracy", min_delta=fedmd.min_delta, patience=...)` without
      restore_best_weights: after each epoch the validation accuracy counts as an
      improvement if it beats the best so far by more than min_delta (0.001); after
      `patience` epochs in a row without one, training stops and the LAST weights are
      kept. Public: patience `fedmd.public_patience` (3), at most `public_epochs` (20);
      private transfer: `fedmd.private_patience` (10), at most `private_epochs` (25).
      "best": fml_jax before: every public epoch runs and the one with the best
      validation accuracy is kept; the private transfer runs all its epochs.
      "off": every epoch of both phases, the last weights. Older configs' booleans
      still work: True means "best", False "off" (what they did).

  Validation data. The official code validates public pre-training on the public
  dataset's test split (MNIST test) and the private transfer on the private test set
  (`private_test_data`: the test images of every private class). Here the public set is
  a slice of a train split with no test split of its own, so the public phase holds out
  the last 10% of the public set (as before; nothing is held out with "off"); the
  private transfer validates on the global test set (`data.x_test`), which is
  restricted to the private classes like the official one, and shared by all parties.
  As in the official code the private transfer therefore stops on the data the parties
  are then tested on.

Nothing is averaged on the server; the bytes sent are logits (up) and the
consensus plus the alignment indices (down).
"""

from __future__ import annotations

import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import FieldReference

from fml_jax import distributed, losses, outputs, settings
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.steps import loss_step, supervised_step
from fml_jax.errors import ConfigError
from fml_jax.evaluation import evaluate_rows
from fml_jax.local_training import run_local_steps
from fml_jax.models import apply_model, forward, init_variables, output_layer
from fml_jax.optimizers import TrainState
from fml_jax.rounds.types import ClientResult

DIGEST_LOSSES = ("l1", "kl")
OPTIMIZER_MODES = ("per_phase", "shared")
EARLY_STOPPING = ("patience", "best", "off")
# The booleans of older configs (`fedmd.early_stopping` was True/False): what they did.
EARLY_STOPPING_BOOLEANS = {True: "best", False: "off"}
# Share of the public set held out to validate public epochs (early stopping).
VALIDATION_FRACTION = 0.1
EVAL_BATCH = 500


@flax.struct.dataclass
class PartyState(TrainState):
  """A party's persistent state: its model and the private (transfer and revisit)
  optimizer's state (`opt_state`), plus the digest optimizer's state, kept across
  rounds (`fedmd.optimizers=per_phase`; () with `shared`)."""
  digest_opt_state: object = ()


def early_stopping_mode(value) -> str:
  """`fedmd.early_stopping` as one of EARLY_STOPPING (older booleans mapped)."""
  if isinstance(value, bool):
    return EARLY_STOPPING_BOOLEANS[value]
  return value


def kernel_l2(name: str | None, weight: float) -> Callable | None:
  """Keras' l2(weight) kernel regularizer on module `name`: weight * sum(kernel**2)."""
  if name is None or settings.is_static_zero(weight):
    return None
  return lambda params: weight * jnp.sum(jnp.square(params[name]["kernel"]))


def patience_step(best, wait, acc, patience, min_delta):
  """Keras EarlyStopping (mode max) after one epoch whose validation accuracy is `acc`:
  an improvement beats `best` by more than `min_delta`; returns (best, epochs since
  the last improvement, whether to stop now)."""
  improved = acc - min_delta > best
  best = jnp.where(improved, acc, best)
  wait = jnp.where(improved, 0, wait + 1)
  return best, wait, wait >= patience


def fit_epochs(run_epoch, validate, state, num_epochs: int, mode: str, patience: int = 1,
               min_delta: float = 0.0):
  """Keras-like `fit` inside jit: up to `num_epochs` of `run_epoch(state, e) -> state`,
  each followed (unless `mode` is "off") by `validate(state) -> accuracy`.

    off       every epoch; the last state.
    best      every epoch; the state after the epoch with the best accuracy (the first
              one of equal best), fml_jax's earlier early stopping.
    patience  Keras EarlyStopping without restore_best_weights (`patience_step`):
              epochs after the stop are skipped (a carried flag; under vmap they are
              computed and discarded), and the last state trained is kept.

  Returns (state, number of epochs run)."""
  if num_epochs == 0:
    return state, jnp.int32(0)
  epochs = jnp.arange(num_epochs)
  if mode == "off":
    state, _ = jax.lax.scan(lambda s, e: (run_epoch(s, e), None), state, epochs)
    return state, jnp.int32(num_epochs)
  if mode == "best":
    def best_body(carry, e):
      state, best, best_acc = carry
      state = run_epoch(state, e)
      acc = validate(state)
      better = acc > best_acc
      best = jax.tree.map(lambda new, old: jnp.where(better, new, old), state, best)
      return (state, best, jnp.maximum(acc, best_acc)), None
    (_, best, _), _ = jax.lax.scan(best_body, (state, state, jnp.float32(-1.0)), epochs)
    return best, jnp.int32(num_epochs)

  def train(s, e):
    s = run_epoch(s, e)
    return s, jnp.asarray(validate(s), jnp.float32)

  def body(carry, e):
    state, best, wait, stopped = carry
    state, acc = jax.lax.cond(stopped, lambda s, e: (s, jnp.float32(0.0)), train, state, e)
    new_best, new_wait, stop = patience_step(best, wait, acc, patience, min_delta)
    best, wait = jnp.where(stopped, best, new_best), jnp.where(stopped, wait, new_wait)
    return (state, best, wait, stopped | stop), ~stopped

  start = (state, jnp.float32(-jnp.inf), jnp.int32(0), jnp.asarray(False))
  (state, _, _, _), ran = jax.lax.scan(body, start, epochs)
  return state, jnp.sum(ran.astype(jnp.int32))


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
  supports_lr_schedule = False   # its phases keep their own optimizers

  @classmethod
  def defaults(cls):
    return {
        "public_epochs": 5,        # transfer learning on the public set (at most) ...
        "private_epochs": 5,       # ... then on each party's private data (at most)
        # patience (official: Keras EarlyStopping, last weights kept) | best (keep the
        # best public epoch, fml_jax before) | off. Typed `object` so that older configs'
        # True / False still load (True = best, False = off).
        "early_stopping": FieldReference("patience", field_type=object),
        "public_patience": 3,      # official 3 (public pre-training)
        "private_patience": 10,    # official 10 (private transfer)
        "min_delta": 0.001,        # official 0.001: an improvement of val accuracy beats this
        "optimizers": "per_phase",  # per_phase (official) | shared (one state, fml_jax before)
        "final_layer_l2": 1e-3,    # official l2(1e-3) on the last Dense kernel; 0: off
        "public_batch_size": 128,  # official 128 (the private transfer uses batch_size)
        "revisit_batch_size": 5,   # official 5
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
    settings.choice(config, "fedmd.optimizers", OPTIMIZER_MODES)
    stopping = settings.get(config, "fedmd.early_stopping")
    if not isinstance(stopping, bool) and stopping not in EARLY_STOPPING:
      raise ConfigError("fedmd.early_stopping", f"{stopping!r} is not one of "
                        f"{', '.join(EARLY_STOPPING)} (or True = best, False = off)")
    for field in ("public_epochs", "private_epochs", "digest_epochs"):
      settings.number(config, f"fedmd.{field}", 0, integer=True)
    for field in ("alignment_size", "digest_batch_size", "public_batch_size",
                  "revisit_batch_size", "public_patience", "private_patience"):
      settings.number(config, f"fedmd.{field}", 1, integer=True)
    settings.number(config, "fedmd.min_delta", 0, 1)
    settings.number(config, "fedmd.final_layer_l2", 0)
    settings.number(config, "fedmd.digest_temperature", 0, low_open=True)
    settings.boolean(config, "fedmd.report_bounds")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp,mlp_small", "public_size": 60, "fedmd.alignment_size": 30,
            "fedmd.public_epochs": 2, "fedmd.private_epochs": 1, "fedmd.digest_batch_size": 16,
            "fedmd.revisit_batch_size": 16, "local_epochs": 1, "optimizer": "adam",
            "learning_rate": 1e-3, "weight_decay": 0.0, "momentum": 0.0,
            "fedmd.report_bounds": False,
            # Validation after every epoch costs a fifth of FedMD's compile time in the
            # many tests built on this config; patience itself, under vmap too, is tested
            # in tests/test_fedmd_official.py.
            "fedmd.early_stopping": "off"}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    c = self.settings
    self.digest = digest_loss(c.digest_loss, c.digest_temperature)
    self.per_phase = c.optimizers == "per_phase"
    self.stopping = early_stopping_mode(c.early_stopping)
    # Each group's penalty on its last Dense kernel (None: off).
    self.regularizers = []
    for group in self.groups:
      shapes = jax.eval_shape(lambda m=group.model: init_variables(
          m, jax.random.PRNGKey(0), input_shape))["params"]
      name = output_layer(shapes)
      if name is None and not settings.is_static_zero(c.final_layer_l2):
        raise ConfigError("fedmd.final_layer_l2", f"model '{group.model_name}' has no "
                          "top-level Dense layer to penalize; set it to 0")
      self.regularizers.append(kernel_l2(name, c.final_layer_l2))

  def init_clients(self, init_key) -> tuple:
    """Every party's fresh model and optimizer state, and (per_phase) the digest's."""
    def party(s):
      digest = jax.vmap(self.optimizer.init)(s.params) if self.per_phase else ()
      return PartyState(params=s.params, opt_state=s.opt_state, model_state=s.model_state,
                        digest_opt_state=digest)
    return tuple(party(s) for s in super().init_clients(init_key))

  # --- transfer learning -----------------------------------------------------------------

  def public_split(self, data) -> tuple[int, int]:
    """(training, validation) sizes of the public set (validation: its last 10%, held
    out unless early stopping is off)."""
    total = data.x_public.shape[0]
    val = int(total * VALIDATION_FRACTION) if self.stopping != "off" else 0
    return total - val, val

  def fresh_optimizer(self, state):
    return state.replace(opt_state=self.optimizer.init(state.params))

  def warm_start(self, client_state, client, data, group):
    c = self.settings
    model = self.groups[group].model
    step = supervised_step(model, self.optimizer, regularizer=self.regularizers[group])
    public = data.replace(x_train=data.x_public, y_train=data.y_public)
    n_train, n_val = self.public_split(data)
    public_key, private_key = jax.random.split(client.key)
    state = client_state

    def accuracy(x, y, start, n):
      """Validation accuracy on rows start .. start + n of (x, y)."""
      return lambda s: evaluate_rows(model, (s.params, s.model_state), x, y,
                                     jnp.arange(start, start + n), jnp.asarray(n),
                                     data.normalize, max(1, min(n, EVAL_BATCH)))[0]

    # Public pre-training, validated on the held-out end of the public set.
    def public_epoch(s, e):
      return run_local_steps(step, s, public, jnp.arange(n_train), jnp.asarray(n_train),
                             jax.random.fold_in(public_key, e), 1, c.public_batch_size)[0]

    if self.per_phase:   # its own fresh optimizer (Keras compiles the party's model)
      state = self.fresh_optimizer(state)
    state, _ = fit_epochs(public_epoch, accuracy(data.x_public, data.y_public, n_train, n_val),
                          state, c.public_epochs,
                          self.stopping if n_val else "off", c.public_patience, c.min_delta)

    # Private transfer: a fresh optimizer (per_phase), which the revisits carry on.
    if self.per_phase:
      state = self.fresh_optimizer(state)
    if self.stopping == "patience" and c.private_epochs:
      def private_epoch(s, e):
        return run_local_steps(step, s, data, client.train_idx, client.train_n,
                               jax.random.fold_in(private_key, e), 1, self.config.batch_size)[0]
      # Validated on the global test set (the official code: the private test set).
      state, _ = fit_epochs(private_epoch, accuracy(data.x_test, data.y_test, 0,
                                                    data.x_test.shape[0]),
                            state, c.private_epochs, "patience", c.private_patience,
                            c.min_delta)
    elif c.private_epochs:   # every epoch (best / off: fml_jax's earlier private phase)
      state, _ = run_local_steps(step, state, data, client.train_idx, client.train_n,
                                 private_key, c.private_epochs, self.config.batch_size)
    if self.per_phase:   # the digest's optimizer starts after the transfer
      state = state.replace(digest_opt_state=self.optimizer.init(state.params))
    return state

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

  def digest_step(self, model, consensus, group):
    """One digest step on a batch of alignment rows ("labels": rows of `consensus`):
    the distance to the consensus plus the last Dense kernel's L2 term."""
    reg = self.regularizers[group]

    def step(state, x, rows, mask, key):
      def loss_fn(params, model_state):
        logits, model_state = forward(model, params, model_state, x, True, key)
        distance = self.digest(logits, consensus[rows], mask)
        return (distance if reg is None else distance + reg(params)), (model_state, distance)
      state, _, distance = loss_step(state, loss_fn, self.optimizer)
      return state, {"digest_loss": distance}   # the distance alone, without the L2 term
    return step

  def client_update(self, server_state, client_state, client, data, group):
    c = self.settings
    model = self.groups[group].model
    idx, consensus = server_state["alignment_idx"], server_state["consensus"]
    digest_key, revisit_key = jax.random.split(client.key)

    digest_step = self.digest_step(model, consensus, group)
    # The alignment subset as a dataset whose "labels" are rows of the consensus.
    alignment = data.replace(x_train=data.x_public[idx],
                             y_train=jnp.arange(idx.shape[0], dtype=jnp.int32))
    # per_phase: the digest trains with its own optimizer state, kept across rounds.
    start = client_state.replace(opt_state=client_state.digest_opt_state) if self.per_phase \
        else client_state
    state, digest_metrics = run_local_steps(
        digest_step, start, alignment, jnp.arange(idx.shape[0]),
        jnp.asarray(idx.shape[0]), digest_key, c.digest_epochs, c.digest_batch_size)
    if self.per_phase:
      state = state.replace(opt_state=client_state.opt_state, digest_opt_state=state.opt_state)
    step = supervised_step(model, self.optimizer, regularizer=self.regularizers[group])
    state, metrics = run_local_steps(step, state, data, client.train_idx, client.train_n,
                                     revisit_key, self.config.local_epochs,
                                     c.revisit_batch_size)
    return ClientResult(client_state=state, upload=(), metrics={**metrics, **digest_metrics})

  def local_batch_size(self):
    return self.settings.revisit_batch_size   # the revisit is a round's private training

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
    if distributed.is_writer():   # across processes, process 0 writes the run's files
      outputs.atomic_write_json(workdir / "bounds.json", bounds)
    logging.info("pooled-data bound: personalized acc %.4f, on the global test set %.4f",
                 bounds["pooled"]["local_test_acc_mean"],
                 bounds["pooled"]["client_global_test_acc_mean"])


def pooled_rows(data) -> tuple[jax.Array, jax.Array]:
  """Every client's private training rows pooled into one (train_idx, train_n) row:
  the flat index array is exactly that, client after client."""
  return data.train_flat, jnp.asarray(data.train_flat.shape[0], jnp.int32)

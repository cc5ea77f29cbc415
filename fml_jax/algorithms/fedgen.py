"""FedGen (Zhu et al., ICML 2021), as HtFLlib runs it: a global head, and a feature
generator the server trains on the uploaded heads.

Every client keeps its own split model (`feature_dim` > 0; architectures may differ,
grouped). The server keeps the global head (starting as client 0's initial head, as
HtFLlib's servergen), a generator G and the population's label histogram. G maps
[u ; onehot(y)], u ~ U[0, 1)^noise_dim, through Dense(hidden_dim) + BatchNorm + ReLU +
Dense(feature_dim) to a feature the heads take. Each round

  1. every client's head is the global head (HtFLlib's `send_parameters` writes it into
     all clients at the start of every round, the first included);
  2. a cohort member trains body and head together with
         CE(model(x), y) + CE(head(G(u, y_gen)), y_gen),
     every step drawing `generator_batch_size` labels y_gen from the label histogram
     (with replacement) and fresh noise u. G runs in train mode (its batch norm uses the
     statistics of those rows), as HtFLlib's clients run the generator they load, and
     only body and head learn. The term is on from the first round (HtFLlib saves G at
     start, so its `generative_model is not None` always). It uploads its head;
  3. the server averages the heads, weighted by training examples (HtFLlib's
     `uploaded_weights`), and trains G for `server_epochs` Adam steps (lr
     `generator_learning_rate`, betas (0.9, 0.999), eps 1e-8, a fresh optimizer every
     round as HtFLlib's `train_generator` builds one) on
         CE(sum_k w_k * head_k(G(u, y)), y),
     each step on `generator_batch_size` fresh labels from the histogram and fresh
     noise, G in train mode, w_k the sample fractions of the clients that reported (a
     dropped client weighs 0; `supports_availability`). The first Dense's bias stays as
     it is: batch norm cancels it, so its gradient is 0 but for rounding, which Adam
     would scale into steps of up to the learning rate (PyTorch's runs do, to no effect
     on any output; here they would differ between executors and devices).

HtFLlib never saves the generator it trains: `train_generator` loads G from disk,
trains that copy and drops it, so its clients always use the initial G (every version
since 50ae2f4, up to the newest). `fedgen.keep_generator=False`, the default, does the
same: the server trains and reports `generator_loss`, and the generator sent next round
is still the initial one. `True` keeps the trained G (parameters and batch statistics):
the evident intent, HtFLlib's first version (which kept G and one Adam, its lr decayed
0.99 per round, in memory) and the official code.

The label histogram: HtFLlib's server pools every client's per-class training counts
at start (all clients, not only a cohort), and clients and server draw from the pooled
list. `init` sees no data here, so `prepare_round` counts every client's training
labels (the same every round). HtFLlib's loaders drop each client's last partial batch
(`drop_last=True`) from its counts; here every example counts.

Clients predict with their own body and the global head (on their own test split, and
on the whole test set). Communication: the head up; the head and G's parameters down
(285,696 parameters for noise_dim 32, C = 10, hidden_dim = feature_dim = 512). G's
running statistics are not counted: nothing runs G in inference mode (flax folds the
biased batch variance into them, PyTorch the unbiased). G starts from flax's default
initialization, as every model here (PyTorch's Linear draws uniform weights).

Defaults: noise_dim 32 and generator_learning_rate 0.1 are HtFLlib's benchmark script
(total.sh: `-nd 32 -glr 0.1`); its main.py defaults are 512 and 0.005. hidden_dim 512
and server_epochs 100 are both. `generator_batch_size` 0 is the run's batch_size, as
HtFLlib draws its generated batches (client and server) at its `-lbs` (10).

The official FedGen (zhuangdizhu/FedGen) differs, and is not what this runs: it
averages whole (homogeneous) models; its server trains one persistent G (one Adam, lr
decayed 0.98 per round) on each selected client's cross-entropy weighted per sample by
that client's share of the label, plus a diversity loss; it draws labels uniformly from
the labels some selected client holds more than once, not from the histogram; its
clients run G in eval mode and add alpha * CE on its own generated batch (scaled by
gen_batch_size / batch_size) and beta * KL between the model's output and the head on
G(y) of the real labels, alpha and beta decayed by 0.98 per round, and only from the
second round on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fml_jax import losses, settings
from fml_jax.algorithms.aggregation import weighted_mean
from fml_jax.algorithms.client_models import ClientModelsAlgorithm
from fml_jax.algorithms.fedgh import head_logits
from fml_jax.algorithms.lgfedavg import (client_zero_head, require_split_models,
                                         under_global_head, with_head)
from fml_jax.algorithms.steps import loss_step
from fml_jax.errors import ConfigError
from fml_jax.models import batch_norm, forward
from fml_jax.rounds.algorithm import global_model_key
from fml_jax.rounds.types import ClientResult

GENERATOR_FOLD = 11   # a client step's generated batch draws from fold_in(step key, this)
ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)   # HtFLlib's torch.optim.Adam for the generator


class Generator(nn.Module):
  """HtFLlib's `Generator`: [noise ; onehot(label)] -> Dense(hidden_dim) -> BatchNorm
  (PyTorch's defaults) -> ReLU -> Dense(feature_dim)."""
  num_classes: int
  hidden_dim: int
  feature_dim: int

  @nn.compact
  def __call__(self, noise, labels, train: bool = True):
    x = jnp.concatenate([noise, jax.nn.one_hot(labels, self.num_classes, dtype=noise.dtype)],
                        axis=-1)
    x = nn.relu(batch_norm(train)(nn.Dense(self.hidden_dim)(x)))
    return nn.Dense(self.feature_dim)(x)


def generator_inputs(key, label_counts, batch: int, noise_dim: int):
  """HtFLlib's draw: ((batch, noise_dim) noise, uniform in [0, 1); (batch,) labels drawn
  with replacement in proportion to `label_counts` (C,), its `np.random.choice` over the
  pooled label list). Uniform labels while no count is known."""
  label_key, noise_key = jax.random.split(key)
  logits = jnp.where(jnp.sum(label_counts) > 0, jnp.log(label_counts), 0.0)
  labels = jax.random.categorical(label_key, logits, shape=(batch,))
  return jax.random.uniform(noise_key, (batch, noise_dim)), labels


def generate(generator: Generator, variables, noise, labels):
  """G in train mode, as HtFLlib always runs it: (features, new batch statistics)."""
  out, updates = generator.apply(variables, noise, labels, train=True, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def without_cancelled_bias(grads):
  """`grads` with the first Dense's bias gradient set to its exact value, 0: batch norm in
  train mode subtracts the batch mean, which cancels that bias. Its computed gradient is
  rounding noise (about 1e-9), which Adam, dividing by its own scale, would turn into
  steps of up to the learning rate, different on every executor and device (PyTorch's
  runs move it so, to no effect on any output)."""
  dense = grads["Dense_0"]
  return {**grads, "Dense_0": {**dense, "bias": jnp.zeros_like(dense["bias"])}}


def train_generator(generator: Generator, variables, heads, weights, label_counts, key,
                    steps: int, batch: int, learning_rate, noise_dim: int):
  """HtFLlib's `train_generator`: `steps` Adam steps from a fresh optimizer on
  CE(sum_k weights_k * head_k(G(u, y)), y); step i draws its batch from
  `jax.random.split(key, steps)[i]`. `heads` stack the uploaded heads (leading axis k).
  Returns (the trained variables, (steps,) the loss of each step)."""
  optimizer = optax.adam(learning_rate, **ADAM)

  def step(carry, step_key):
    params, stats, opt_state = carry
    noise, labels = generator_inputs(step_key, label_counts, batch, noise_dim)

    def loss_fn(params):
      z, new_stats = generate(generator, {"params": params, "batch_stats": stats}, noise, labels)
      per_head = jax.vmap(lambda h: head_logits(h, z))(heads)   # (k, B, C)
      logits = jnp.tensordot(weights.astype(z.dtype), per_head, axes=1)
      return losses.cross_entropy(logits, labels, jnp.ones(labels.shape, z.dtype)), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = without_cancelled_bias(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  start = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
  (params, stats, _), step_losses = jax.lax.scan(step, start, jax.random.split(key, steps))
  return {"params": params, "batch_stats": stats}, step_losses


class FedGen(ClientModelsAlgorithm):
  name = "fedgen"
  config_section = "fedgen"
  default_aggregation = "weighted"   # HtFLlib weighs heads and teachers by training examples
  supports_availability = True       # a dropped client's head is neither averaged nor a teacher
  evaluates_clients_on_global_test = True

  @classmethod
  def defaults(cls):
    return {"noise_dim": 32,                  # -nd: HtFLlib's total.sh; main.py: 512
            "hidden_dim": 512,                # -hd: total.sh and main.py
            "generator_learning_rate": 0.1,   # -glr: total.sh; main.py: 0.005
            "server_epochs": 100,             # -se: Adam steps per round, total.sh and main.py
            "generator_batch_size": 0,        # 0: batch_size (HtFLlib draws -lbs rows)
            "keep_generator": True}           # the authors' code; HtFLlib drops it (False)

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedgen.noise_dim", 1, integer=True)
    settings.number(config, "fedgen.hidden_dim", 1, integer=True)
    settings.number(config, "fedgen.generator_learning_rate", 0, low_open=True)
    settings.number(config, "fedgen.server_epochs", 1, integer=True)
    settings.number(config, "fedgen.generator_batch_size", 0, integer=True)
    settings.boolean(config, "fedgen.keep_generator")
    require_split_models(config, cls.name, "heads and a feature generator")
    if config.algorithm == cls.name and cls.generator_batch(config) < 2:
      raise ConfigError("fedgen.generator_batch_size", "the generator's batch norm needs at "
                        "least 2 generated rows per step (0 takes batch_size)")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "feature_dim": 8, "fedgen.noise_dim": 4,
            "fedgen.hidden_dim": 8, "fedgen.server_epochs": 2, "fedgen.keep_generator": True}

  @staticmethod
  def generator_batch(config) -> int:
    """Generated rows per client step and per server step."""
    return config.fedgen.generator_batch_size or config.batch_size

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.generator = Generator(num_classes, self.settings.hidden_dim, config.feature_dim)

  def init(self, key, group_sizes):
    population = self.init_clients(key)
    # HtFLlib starts the server's head as client 0's.
    head = client_zero_head(population, self.group_of)
    nd = self.settings.noise_dim
    generator = dict(self.generator.init(global_model_key(key), jnp.zeros((1, nd)),
                                         jnp.zeros((1,), jnp.int32), train=False))
    return {"head": head, "generator": generator,
            "label_counts": jnp.zeros((self.num_classes,), jnp.float32)}, population

  def prepare_round(self, server_state, context, data):
    # The population's label histogram, from every client's training labels.
    labels = data.y_train[data.train_flat]
    counts = jnp.zeros((self.num_classes,), jnp.float32).at[labels].add(1.0)
    return {**server_state, "label_counts": counts}

  def client_update(self, server_state, client_state, client, data, group):
    model = self.groups[group].model
    batch, nd = self.generator_batch(self.config), self.settings.noise_dim
    state = client_state.replace(params=with_head(client_state.params, server_state["head"]))

    def step(state, x, y, mask, key):
      noise, fake_y = generator_inputs(jax.random.fold_in(key, GENERATOR_FOLD),
                                       server_state["label_counts"], batch, nd)
      fake_z = jax.lax.stop_gradient(generate(self.generator, server_state["generator"],
                                              noise, fake_y)[0])

      def loss_fn(params, model_state):
        logits, model_state = forward(model, params, model_state, x, True, key)
        ce = losses.cross_entropy(logits, y, mask)
        gen = losses.cross_entropy(head_logits(params["head"], fake_z), fake_y,
                                   jnp.ones((batch,), fake_z.dtype))
        return ce + gen, (model_state, (ce, gen))

      state, loss, (ce, gen) = loss_step(state, loss_fn, self.optimizer, self.lr_scale(client))
      return state, {"train_loss": loss, "train_ce": ce, "generated_ce": gen}

    state, metrics = self.train(step, state, client, data)
    return ClientResult(client_state=state, upload=state.params["head"], metrics=metrics)

  def server_update(self, server_state, uploads, context):
    s = self.settings
    # Rounds where nobody reports keep the server state (fml_jax/rounds/protocol.py).
    trained, step_losses = train_generator(
        self.generator, server_state["generator"], uploads, context.weights,
        server_state["label_counts"], context.key, s.server_epochs,
        self.generator_batch(self.config), s.generator_learning_rate, s.noise_dim)
    generator = trained if s.keep_generator else server_state["generator"]
    return {**server_state, "head": weighted_mean(uploads, context.weights),
            "generator": generator}, {"generator_loss": jnp.mean(step_losses)}

  def broadcast(self, server_state):
    return {"head": server_state["head"], "generator": server_state["generator"]["params"]}

  def personalized_models(self, server_state, population):
    return under_global_head(self.groups, self.group_of, population, server_state["head"])

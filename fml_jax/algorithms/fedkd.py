"""FedKD (Wu et al., Nat. Commun. 2022), as HtFLlib and the official code run it: a
private mentor and a shared mentee per client, adaptive mutual distillation, and
SVD-truncated exchanges.

Every client keeps its own split model, the *mentor* (`feature_dim` > 0; architectures
may differ, grouped), and a private `W_h` (feature_dim x feature_dim, no bias). The
*mentee* is one shared model (`fedkd.mentee_model`; by default client 0's architecture,
HtFLlib's models[0]) held by the server. Each round a cohort member copies the mentee
and trains mentor, mentee and W_h together on every batch with

    S       = CE + CE_g
    mentor: CE   + KL(p_g || p) / S + MSE(rep, W_h rep_g) / S
    mentee: CE_g + KL(p || p_g) / S + MSE(rep, W_h rep_g) / S

(p, rep the mentor's softmax output and representation; _g the mentee's). As in both
codes nothing is detached: every parameter follows the gradient of the sum of the two
losses, S included. KL is PyTorch's `KLDivLoss()` default, the mean over batch x
classes; MSE the mean over batch x feature_dim. Each model's gradient (mentor, mentee,
W_h) is clipped to norm 10 before its step.

Exchanges are truncated SVDs. A kernel with more than one output unit is factored
(Dense: the matrix; convolutions: every (input, output) slice's kh x kw matrix, one
rank for all slices), keeping the smallest rank k whose first k singular values hold
more than `energy` of the squared total; biases travel whole. `energy` rises linearly
over the run from `fedkd.energy_start` 0.95 to `fedkd.energy_end` 0.98. The server
averages the reconstructed uploads uniformly, truncates the average again, and every
client's mentee becomes it. Bytes are counted after truncation (k x (rows + columns + 1)
floats per factored matrix) in the round's `bytes_up` / `bytes_down` metrics; the
static count printed before the run is the untruncated bound.

Prediction: the mentor alone (on each client's test split and on the whole test set);
the mentee is the global model of global evaluation.

Readings, each a setting:
- `fedkd.compress`: "update" (default; the paper and the official code) truncates the
  change of the mentee over the round, and the server adds the truncated mean change to
  the mentee, with energy tmin + (t+1)/R (tmax - tmin) in round t; "parameters"
  (HtFLlib) truncates the mentee itself and replaces it, with energy
  T_start + t/R (T_end - T_start).
- `fedkd.unmet_energy`: when no rank below full reaches the energy, both codes leave
  k = 0 and send the tensor as zeros ("zeros", default); "full" sends it whole. With 10
  classes and near-equal singular values a head kernel is sent as zeros.
- The official server keeps a rank when it reaches the energy exactly (>=), its
  clients and HtFLlib only above it (>); here > everywhere.
- HtFLlib creates a mentee optimizer at the clients' learning rate (its
  `mentee_learning_rate` is unused); here the mentee uses the clients' optimizer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from fml_jax import losses, settings
from fml_jax.algorithms.client_models import ClientModelsAlgorithm, local_model_names, personalized
from fml_jax.algorithms.lgfedavg import require_split_models
from fml_jax.errors import ConfigError
from fml_jax.models import STATEFUL_MODELS, build_model, features, init_variables
from fml_jax.optimizers import TrainState
from fml_jax.rounds.algorithm import global_model_key
from fml_jax.rounds.types import ClientResult, GlobalModel
from fml_jax.trees import tree_bytes

COMPRESSIONS = ("update", "parameters")
UNMET = ("zeros", "full")
CLIP_NORM = 10.0   # both codes clip each model's gradient to this norm


def energy_at(round_index, num_rounds: int, start: float, end: float, compress: str):
  """The energy kept in round `round_index` (0-based) of `num_rounds`."""
  ahead = 1 if compress == "update" else 0
  return start + (round_index + ahead) / num_rounds * (end - start)


def truncate(x, energy, zeros_when_unmet: bool = True):
  """(x's truncated-SVD reconstruction, floats sent for it). Kernels with more than one
  output unit are factored: a Dense kernel (in, out) as one matrix, a convolution's
  (kh, kw, in, out) as its in x out kh x kw matrices with one rank; other leaves (and
  an all-zero tensor) travel whole."""
  if x.ndim < 2 or x.shape[-1] <= 1:
    return x, x.size
  if x.ndim == 2:
    mats = x[None]
  else:
    kh, kw = x.shape[0], x.shape[1]
    mats = jnp.moveaxis(x.reshape(kh, kw, -1), -1, 0)   # (in*out, kh, kw)
  slices, rows, cols = mats.shape
  u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
  per_rank = jnp.sum(jnp.square(s), axis=0)          # (r,) summed over the slices
  total = jnp.sum(per_rank)
  before = jnp.cumsum(per_rank) - per_rank           # the energy of the first n values
  met = before > energy * total
  rank = per_rank.shape[0]
  k = jnp.where(met.any(), jnp.argmax(met), 0 if zeros_when_unmet else rank)
  kept = s * (jnp.arange(rank) < k)
  approx = jnp.einsum("sik,sk,skj->sij", u, kept, vt)
  approx = jnp.where(total == 0, mats, approx)
  floats = jnp.where(total == 0, x.size, k * slices * (rows + cols + 1))
  if x.ndim > 2:
    approx = jnp.moveaxis(approx, 0, -1).reshape(x.shape)
  else:
    approx = approx[0]
  return approx, floats


def truncate_tree(tree, energy, zeros_when_unmet: bool = True):
  """(every leaf truncated, total floats sent)."""
  pairs = jax.tree.map(lambda x: truncate(x, energy, zeros_when_unmet), tree)
  is_pair = lambda p: isinstance(p, tuple)
  approx = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
  floats = sum(jnp.asarray(p[1], jnp.float32)
               for p in jax.tree.leaves(pairs, is_leaf=is_pair))
  return approx, floats


def element_mean_kl(target_logits, logits, mask):
  """PyTorch's KLDivLoss() default on (log_softmax(logits), softmax(target_logits)): the
  mean over valid rows x classes of p_t (log p_t - log p). Nothing is detached."""
  target_logp = jax.nn.log_softmax(target_logits)
  per_row = jnp.sum(jnp.exp(target_logp) * (target_logp - jax.nn.log_softmax(logits)), -1)
  return losses.masked_mean(per_row, mask) / logits.shape[-1]


def fedkd_losses(logits, rep, logits_g, rep_g, w_h, labels, mask):
  """(mentor's loss, mentee's loss) of one batch, both differentiable in everything."""
  ce = losses.cross_entropy(logits, labels, mask)
  ce_g = losses.cross_entropy(logits_g, labels, mask)
  s = ce + ce_g
  valid = mask.astype(rep.dtype)
  mse = (jnp.sum(jnp.square(rep - rep_g @ w_h) * valid[:, None])
         / (jnp.maximum(valid.sum(), 1.0) * rep.shape[-1]))
  mentor = ce + element_mean_kl(logits_g, logits, mask) / s + mse / s
  mentee = ce_g + element_mean_kl(logits, logits_g, mask) / s + mse / s
  return mentor, mentee


def clip(grads):
  """The gradient scaled to global norm at most CLIP_NORM (torch's clip_grad_norm_)."""
  transform = optax.clip_by_global_norm(CLIP_NORM)
  return transform.update(grads, transform.init(grads))[0]


class FedKD(ClientModelsAlgorithm):
  name = "fedkd"
  config_section = "fedkd"
  default_aggregation = "uniform"   # both codes average the mentees unweighted
  supports_availability = True      # a dropped client's mentee is not averaged
  evaluates_clients_on_global_test = True

  @classmethod
  def defaults(cls):
    return {"mentee_model": "",        # "": client 0's architecture (HtFLlib's models[0])
            "energy_start": 0.95,      # HtFLlib -Ts, official --tmin
            "energy_end": 0.98,        # HtFLlib -Te, official --tmax
            "compress": "update",      # the paper and official code; "parameters": HtFLlib
            "unmet_energy": "zeros"}   # both codes' k = 0; "full": send the tensor whole

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedkd.energy_start", 0, 1)
    settings.number(config, "fedkd.energy_end", 0, 1)
    settings.choice(config, "fedkd.compress", COMPRESSIONS)
    settings.choice(config, "fedkd.unmet_energy", UNMET)
    require_split_models(config, cls.name, "a shared mentee beside split mentors")
    if config.algorithm == cls.name:
      mentee = mentee_name(config)
      if mentee in STATEFUL_MODELS:
        raise ConfigError("fedkd.mentee_model", f"'{mentee}' has batch-norm statistics, which "
                          "FedKD does not average; pick a mentee without batch norm")

  @classmethod
  def small_overrides(cls):
    return {"local_models": "mlp_small,logreg", "feature_dim": 8}

  def __init__(self, config, num_classes, input_shape):
    super().__init__(config, num_classes, input_shape)
    self.mentee_model = build_model(mentee_name(config), num_classes, input_shape,
                                    "fedkd.mentee_model", config.feature_dim)

  def init(self, key, group_sizes):
    population = self.init_clients(key)
    fd = self.config.feature_dim
    bound = 1.0 / math.sqrt(fd)   # PyTorch's Linear(fd, fd, bias=False) initialization
    w_h_key = jax.random.fold_in(key, 0x6b64)
    with_w_h = []
    for g, state in enumerate(population):
      n = jax.tree.leaves(state.params)[0].shape[0]
      keys = jax.random.split(jax.random.fold_in(w_h_key, g), n)
      w_h = jax.vmap(lambda k: jax.random.uniform(k, (fd, fd), jnp.float32, -bound, bound))(keys)
      params = {"model": state.params, "w_h": w_h}
      with_w_h.append(TrainState(params=params, opt_state=jax.vmap(self.optimizer.init)(params),
                                 model_state=state.model_state))
    mentee = init_variables(self.mentee_model, global_model_key(key), self.input_shape)["params"]
    # Bytes sent so far, up and down, after truncation (they depend on the ranks kept).
    return {"mentee": mentee, "traffic": jnp.zeros((2,), jnp.float32)}, tuple(with_w_h)

  def energy(self, round_index):
    s = self.settings
    return energy_at(round_index, self.config.num_rounds, s.energy_start, s.energy_end,
                     s.compress)

  def client_update(self, server_state, client_state, client, data, group):
    model, mentee_model = self.groups[group].model, self.mentee_model
    lr_scale = self.lr_scale(client)

    def step(carry, x, y, mask, key):
      mentor, mentee = carry
      key, key_g = jax.random.split(key)

      def total_loss(params, mentee_params):
        rep, logits, model_state = features(model, params["model"], mentor.model_state, x,
                                            True, key)
        rep_g, logits_g, _ = features(mentee_model, mentee_params, {}, x, True, key_g)
        loss, loss_g = fedkd_losses(logits, rep, logits_g, rep_g, params["w_h"], y, mask)
        return loss + loss_g, (model_state, loss, loss_g)

      (_, (model_state, loss, loss_g)), (grads, grads_g) = jax.value_and_grad(
          total_loss, argnums=(0, 1), has_aux=True)(mentor.params, mentee.params)
      grads = {"model": clip(grads["model"]), "w_h": clip(grads["w_h"])}
      mentor = mentor.apply_gradients(grads, self.optimizer, lr_scale).replace(
          model_state=model_state)
      mentee = mentee.apply_gradients(clip(grads_g), self.optimizer, lr_scale)
      return (mentor, mentee), {"train_loss": loss, "train_loss_mentee": loss_g}

    start = server_state["mentee"]
    mentee = TrainState.create(start, self.optimizer)   # a fresh copy of the shared mentee
    (mentor, mentee), metrics = self.train(step, (client_state, mentee), client, data)
    sent = mentee.params
    if self.settings.compress == "update":
      sent = jax.tree.map(jnp.subtract, mentee.params, start)
    sent, floats = truncate_tree(sent, self.energy(client.round),
                                 self.settings.unmet_energy == "zeros")
    return ClientResult(client_state=mentor, upload={"mentee": sent, "floats": floats},
                        metrics=metrics)

  def server_update(self, server_state, uploads, context):
    # Uniform weights over the clients that reported (`default_aggregation`).
    mean = jax.tree.map(lambda u: jnp.tensordot(context.weights, u, axes=1), uploads["mentee"])
    energy = self.energy(context.round)
    sent, floats = truncate_tree(mean, energy, self.settings.unmet_energy == "zeros")
    if self.settings.compress == "update":
      sent = jax.tree.map(jnp.add, server_state["mentee"], sent)
    reported = (context.weights > 0).astype(jnp.float32)
    up = 4 * jnp.sum(uploads["floats"] * reported)
    down = 4 * context.weights.shape[0] * floats   # to every cohort member
    traffic = server_state["traffic"] + jnp.stack([up, down])
    return {"mentee": sent, "traffic": traffic}, {
        "energy": jnp.float32(energy), "bytes_up": up, "bytes_down": down,
        "bytes_up_total": traffic[0], "bytes_down_total": traffic[1]}

  def broadcast(self, server_state):
    return server_state["mentee"]

  def communication(self, server_shapes, upload_bytes, message_bytes, cohort_size):
    """The untruncated bound (the mentee each way); the truncated bytes are the round's
    `bytes_up` / `bytes_down` metrics."""
    mentee = tree_bytes(server_shapes["mentee"])
    return {"bytes_up": cohort_size * mentee, "bytes_down": cohort_size * mentee}

  def global_model(self, server_state):
    return GlobalModel(self.mentee_model, server_state["mentee"])

  def personalized_models(self, server_state, population):
    mentors = [state.replace(params=state.params["model"]) for state in population]
    return personalized(self.groups, self.group_of, mentors)


def mentee_name(config) -> str:
  """`fedkd.mentee_model`, or client 0's architecture when empty."""
  return config.fedkd.mentee_model or local_model_names(config, config.num_clients)[0]

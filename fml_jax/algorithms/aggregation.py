"""Aggregation, written once: the weighted mean of uploads, and a server optimizer.

FedOpt (Reddi et al. 2021) treats the server step as an optimizer step on the
pseudo-gradient  g = global - mean(uploads):

  server.optimizer = sgd       x <- x - lr * g          (lr 1: FedAvg's plain average)
                     momentum  FedAvgM: v <- momentum * v + g,  x <- x - lr * v
                     adam      optax.adam(lr, b1, b2, eps)      (FedAdam; tau = eps)
                     yogi      optax.yogi(lr, b1, b2, eps)      (FedYogi)
                     adagrad   optax.adagrad(lr, eps=eps), accumulator from 0 (FedAdagrad)

The optax transformations are used as they are: optax's adam and yogi correct their
moments' bias (Flower's FedAdam does too; the paper does not) and yogi starts its
moments at 1e-6, and its adagrad adds eps inside the square root (the paper adds tau
outside). tests/test_aggregation.py restates each in NumPy. With lr 1 and no momentum the step is
exactly the average (x - (x - mean) is not, in floating point), so FedAvg and
FedAvgM with momentum 0 keep no server-optimizer state and return the mean itself.

Algorithms that average models (FedAvg, FedProx, FML's memes, FedMR's first stage)
call `ServerOptimizer.step`; what clients download is the parameters only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fml_jax import settings

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")

# The `server` config section.
SERVER_DEFAULTS = {
    "optimizer": "sgd",     # sgd | momentum (FedAvgM) | adam | yogi | adagrad (FedOpt)
    "learning_rate": 1.0,   # server learning rate (sgd with 1.0: the plain average)
    "momentum": 0.9,        # momentum: FedAvgM's beta (0 with learning_rate 1: the plain average)
    "b1": 0.9,              # adam, yogi: first-moment decay
    "b2": 0.99,             # adam, yogi: second-moment decay
    "eps": 1e-3,            # adam, yogi, adagrad: tau, the adaptivity
}


def weighted_mean(tree, weights: jax.Array):
  """Weighted mean over the leading (client) axis of every leaf; weights sum to 1."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def check_server_settings(config) -> None:
  settings.choice(config, "server.optimizer", SERVER_OPTIMIZERS)
  settings.number(config, "server.learning_rate", 0, low_open=True)
  settings.number(config, "server.momentum", 0, 1, high_open=True)
  settings.number(config, "server.b1", 0, 1, high_open=True)
  settings.number(config, "server.b2", 0, 1, high_open=True)
  settings.number(config, "server.eps", 0, low_open=True)


def is_plain_average(server) -> bool:
  """Whether the server step is the weighted average itself (no optimizer state). A
  traced learning rate (a vmapped sweep over it, fml_jax/replicas.py) is not."""
  if not isinstance(server.learning_rate, (int, float)):
    return False
  return (server.optimizer in ("sgd", "momentum") and server.learning_rate == 1.0
          and (server.optimizer == "sgd" or server.momentum == 0.0))


def make_server_optimizer(server) -> optax.GradientTransformation:
  lr = server.learning_rate
  if server.optimizer == "sgd":
    return optax.sgd(lr)
  if server.optimizer == "momentum":
    return optax.sgd(lr, momentum=server.momentum)
  if server.optimizer == "adam":
    return optax.adam(lr, b1=server.b1, b2=server.b2, eps=server.eps)
  if server.optimizer == "yogi":
    return optax.yogi(lr, b1=server.b1, b2=server.b2, eps=server.eps)
  return optax.adagrad(lr, initial_accumulator_value=0.0, eps=server.eps)


def private_mean(params, uploads, clip: float, noise_multiplier: float, key: jax.Array):
  """DP-FedAvg's average (McMahan et al. 2018; fml_jax/privacy.py accounts for it):
  each client's update (upload - params) clipped to L2 norm `clip` over all its
  leaves, summed, Gaussian noise of std noise_multiplier * clip added to the sum, the
  sum divided by the cohort size and added to `params`. Returns (that mean, the share
  of updates that were clipped)."""
  deltas = jax.tree.map(lambda u, p: u - p, uploads, params)
  leaves, treedef = jax.tree.flatten(deltas)
  norms = jnp.sqrt(sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in leaves))
  scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))
  k = norms.shape[0]
  keys = jax.random.split(key, len(leaves))
  noisy = [(jnp.tensordot(scale.astype(d.dtype), d, axes=1)
            + noise_multiplier * clip * jax.random.normal(leaf_key, d.shape[1:], d.dtype)) / k
           for d, leaf_key in zip(leaves, keys)]
  mean = jax.tree.map(jnp.add, params, jax.tree.unflatten(treedef, noisy))
  return mean, jnp.mean((norms > clip).astype(jnp.float32))


class ServerOptimizer:
  """Applies the `server` section's optimizer to the averaged uploads; with `dp_clip`
  the average is DP-FedAvg's clipped and noised one (`private_mean`)."""

  def __init__(self, server_settings, dp_clip: float = 0.0, dp_noise_multiplier: float = 0.0):
    self.plain = is_plain_average(server_settings)
    self.transform = None if self.plain else make_server_optimizer(server_settings)
    self.dp_clip, self.dp_noise_multiplier = dp_clip, dp_noise_multiplier

  @classmethod
  def from_config(cls, config) -> "ServerOptimizer":
    return cls(config.server, config.get("dp_clip", 0.0), config.get("dp_noise_multiplier", 0.0))

  def init(self, params) -> dict:
    """The server-state entries the optimizer adds (none for the plain average)."""
    return {} if self.plain else {"server_opt_state": self.transform.init(params)}

  def update(self, server_state: dict, uploads, context) -> tuple[dict, dict]:
    """An algorithm's whole server step when its server state is {"params", plus the
    optimizer's entries, plus "model_state" for a batch-norm model} and the uploads are
    `batch_norm.model_upload`s: (new server state, metrics). Running statistics are
    averaged with the same weights; the optimizer moves only the parameters."""
    new = {}
    if "model_state" in server_state:
      uploads, statistics = uploads["params"], uploads["model_state"]
      new["model_state"] = weighted_mean(statistics, context.weights)
    params, opt_state, metrics = self.step(server_state["params"], server_state, uploads,
                                           context.weights, context.key)
    return {"params": params, **opt_state, **new}, metrics

  def step(self, params, server_state: dict, uploads, weights, key=None) -> tuple:
    """(new params, the optimizer's new server-state entries, metrics) from the cohort's
    stacked `uploads` (parameter-shaped) and their weights; `key` draws DP's noise."""
    metrics = {}
    if self.dp_clip:   # uniform weights (checked in fml_jax/privacy.py)
      mean, metrics["dp_clipped_share"] = private_mean(params, uploads, self.dp_clip,
                                                       self.dp_noise_multiplier, key)
    else:
      mean = weighted_mean(uploads, weights)
    pseudo_gradient = jax.tree.map(jnp.subtract, params, mean)
    metrics["server_update_norm"] = optax.tree.norm(pseudo_gradient)
    if self.plain:
      return mean, {}, metrics
    updates, opt_state = self.transform.update(pseudo_gradient, server_state["server_opt_state"],
                                               params)
    return optax.apply_updates(params, updates), {"server_opt_state": opt_state}, metrics

"""Client optimizers with PyTorch's semantics, built from optax pieces.

PyTorch's `weight_decay` adds `wd * w` to the gradient before the optimizer
(L2 regularization, not AdamW's decoupled decay); the official FML code relies on
it, so we chain `add_decayed_weights` in front of `sgd`/`adam` the same way.
"""

from __future__ import annotations

import flax.struct
import optax

from fml_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(config) -> optax.GradientTransformation:
  if config.optimizer == "sgd":
    base = optax.sgd(config.learning_rate, momentum=config.momentum or None)
  elif config.optimizer == "adam":
    base = optax.adam(config.learning_rate)
  else:
    raise ConfigError("optimizer", f"unknown optimizer '{config.optimizer}'; "
                      f"choose one of {', '.join(OPTIMIZERS)}")
  if config.weight_decay:
    return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
  return base


@flax.struct.dataclass
class TrainState:
  """One model's parameters and its optimizer state."""
  params: object
  opt_state: object

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
    return cls(params=params, opt_state=optimizer.init(params))

  def apply_gradients(self, grads, optimizer: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
    return TrainState(params=optax.apply_updates(self.params, updates), opt_state=opt_state)

"""Client optimizers with PyTorch's semantics, built from optax pieces.

PyTorch's `weight_decay` adds `wd * w` to the gradient before the optimizer
(L2 regularization, not AdamW's decoupled decay); the official FML code relies on
it, so we chain `add_decayed_weights` in front of `sgd`/`adam` the same way.
"""

from __future__ import annotations

import flax.struct
import jax
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
  """One model's parameters, its optimizer state, and its non-trainable variables
  (`model_state`: batch norm statistics; an empty dict for most models)."""
  params: object
  opt_state: object
  model_state: dict = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation,
             model_state: dict | None = None) -> "TrainState":
    return cls(params=params, opt_state=optimizer.init(params), model_state=model_state or {})

  @classmethod
  def from_variables(cls, variables: dict, optimizer: optax.GradientTransformation) -> "TrainState":
    """From `models.init_variables`: params plus the other collections."""
    return cls.create(variables["params"], optimizer,
                      {k: v for k, v in variables.items() if k != "params"})

  def apply_gradients(self, grads, optimizer: optax.GradientTransformation,
                      lr_scale=1.0) -> "TrainState":
    """One optimizer step. `lr_scale` multiplies the learning rate (for SGD and Adam
    the update is linear in it, so scaling the update is the same thing)."""
    updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
    if not (isinstance(lr_scale, float) and lr_scale == 1.0):
      updates = jax.tree.map(lambda u: u * lr_scale, updates)
    return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state)

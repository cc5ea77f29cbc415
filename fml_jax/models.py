"""Model zoo: the architectures of the FedAvg and FML papers, as Flax modules.

Every model maps normalized float inputs (batch, *input_shape) to logits
(batch, num_classes). `build_model(name, num_classes)` is the only entry point
the rest of the code uses; add a model by adding it to `MODELS`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fml_jax.errors import ConfigError


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 as reshape + max (floor mode, like PyTorch).

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`, but its backward pass is a
  cheap select instead of XLA:CPU's slow select-and-scatter (measured: about half
  the CNN step time on CPU).
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LogReg(nn.Module):
  """Multinomial logistic regression, FedProx's model for Synthetic(a, b)."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """FedAvg's "2NN": two hidden layers of 200 units with ReLU."""
  num_classes: int
  hidden: tuple = (200, 200)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """FedAvg's CNN: 5x5 conv 32, pool, 5x5 conv 64, pool, dense 512, dense out."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = max_pool_2x2(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)))
    x = max_pool_2x2(nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and max pooling (6 and 16 filters, dense 120, 84)."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = max_pool_2x2(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)))
    x = max_pool_2x2(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


# name -> (constructor, whether it needs (H, W, C) image inputs)
MODELS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "logreg": (lambda n: LogReg(num_classes=n), False),
    "mlp": (lambda n: MLP(num_classes=n), False),
    "cnn": (lambda n: CNN(num_classes=n), True),
    "lenet5": (lambda n: LeNet5(num_classes=n), True),
}


def build_model(name: str, num_classes: int, input_shape: tuple, field: str = "model") -> nn.Module:
  """The model called `name`, checked against the data's input shape."""
  if name not in MODELS:
    raise ConfigError(field, f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
  make, needs_image = MODELS[name]
  if needs_image and len(input_shape) != 3:
    raise ConfigError(field, f"model '{name}' needs image inputs (height, width, channels), "
                      f"but the dataset's inputs have shape {input_shape}; use mlp or logreg")
  if needs_image and min(input_shape[:2]) < 12:
    raise ConfigError(field, f"model '{name}' needs images of at least 12x12 pixels, "
                      f"the dataset's are {input_shape[0]}x{input_shape[1]}")
  return make(num_classes)


def init_params(model: nn.Module, key: jax.Array, input_shape: tuple):
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]


def apply_model(model: nn.Module, params, x: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x)

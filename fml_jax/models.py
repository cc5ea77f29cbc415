"""Model zoo: the architectures of the FedAvg and FML papers, as Flax modules.

Every model maps normalized float inputs (batch, *input_shape) to logits
(batch, num_classes) and takes `train` (dropout on, batch statistics updated).
`build_model(name, num_classes, input_shape)` is the only constructor the rest of
the code uses; add a model by adding it to `MODELS`.

A model's variables are `{"params": ...}` plus, for models with batch norm,
`{"batch_stats": ...}`. `init_variables` / `forward` handle both the same way, so
algorithms never special-case a model: `TrainState.model_state` carries the
non-trainable collections (empty for most models).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fml_jax import conv
from fml_jax.errors import ConfigError

# Every convolution goes through fml_jax.conv: same values and gradients, but the
# gradients stay on XLA:CPU's fast kernels inside the local-training scan (20x).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated)


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
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """FedAvg's "2NN": two hidden layers of 200 units with ReLU."""
  num_classes: int
  hidden: tuple = (200, 200)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """FedAvg's CNN: 5x5 conv 32, pool, 5x5 conv 64, pool, dense 512, dense out."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(32, (5, 5), padding="SAME")(x)))
    x = max_pool_2x2(nn.relu(Conv(64, (5, 5), padding="SAME")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and max pooling (6 and 16 filters, dense 120, 84)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(6, (5, 5), padding="SAME")(x)))
    x = max_pool_2x2(nn.relu(Conv(16, (5, 5), padding="VALID")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


def avg_pool_2_same(x: jax.Array, strides: int) -> jax.Array:
  """Keras `AveragePooling2D(2, strides, padding="same")`: the window is cut at the
  border and the mean is over the pixels inside it (count_include_pad=False)."""
  return nn.avg_pool(x, (2, 2), (strides, strides), padding="SAME", count_include_pad=False)


class FedMDCNN(nn.Module):
  """The parties' CNNs of FedMD's official code (ALGORITHMS.md), 2 or 3 conv blocks.

  2 blocks: conv 3x3 f1 (stride 1, same) + BN + ReLU + dropout + avg-pool 2 (stride 1,
  same); conv 3x3 f2 (stride 2, valid) + BN + ReLU + dropout; flatten; dense (no bias).
  3 blocks: the first block as above; conv 2x2 f2 (stride 2, valid) + BN + ReLU +
  dropout + avg-pool 2 (stride 2, same); conv 3x3 f3 (stride 2, valid) + BN + ReLU +
  dropout; flatten; dense (no bias).
  """
  num_classes: int
  filters: tuple
  dropout: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    def block(x, features, kernel, strides, padding):
      x = Conv(features, (kernel, kernel), (strides, strides), padding=padding,
                  use_bias=False)(x)
      # Keras' defaults: momentum 0.99, epsilon 1e-3.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
      return nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))

    x = avg_pool_2_same(block(x, self.filters[0], 3, 1, "SAME"), 1)
    if len(self.filters) == 2:
      x = block(x, self.filters[1], 3, 2, "VALID")
    else:
      x = avg_pool_2_same(block(x, self.filters[1], 2, 2, "VALID"), 2)
      x = block(x, self.filters[2], 3, 2, "VALID")
    return nn.Dense(self.num_classes, use_bias=False)(x.reshape(x.shape[0], -1))


# FedMD's ten parties (official code): (filters, dropout); 2 filters = 2 conv blocks.
FEDMD_PARTIES = (
    ((128, 256), 0.2), ((128, 384), 0.2), ((128, 512), 0.2), ((256, 256), 0.3),
    ((256, 512), 0.4), ((64, 128, 256), 0.2), ((64, 128, 192), 0.2), ((128, 192, 256), 0.2),
    ((128, 128, 128), 0.3), ((128, 128, 192), 0.3))
# The same family at 1/8 of the filters: what a CPU trains in minutes.
FEDMD_SMALL_SCALE = 8


def _fedmd(filters, dropout, scale=1):
  return lambda n: FedMDCNN(num_classes=n, filters=tuple(max(1, f // scale) for f in filters),
                            dropout=dropout)


# name -> (constructor, whether it needs (H, W, C) image inputs)
MODELS: dict[str, tuple[Callable[[int], nn.Module], bool]] = {
    "logreg": (lambda n: LogReg(num_classes=n), False),
    "mlp": (lambda n: MLP(num_classes=n), False),
    "mlp_small": (lambda n: MLP(num_classes=n, hidden=(100,)), False),
    "mlp_wide": (lambda n: MLP(num_classes=n, hidden=(400, 400)), False),
    "cnn": (lambda n: CNN(num_classes=n), True),
    "lenet5": (lambda n: LeNet5(num_classes=n), True),
    # fedmd_cnn2 / fedmd_cnn3: the two types; fedmd_p0 .. fedmd_p9: the ten parties;
    # fedmd_small_p0 .. p9: the parties with 1/8 of the filters.
    "fedmd_cnn2": (_fedmd((128, 256), 0.2), True),
    "fedmd_cnn3": (_fedmd((64, 128, 256), 0.2), True),
    **{f"fedmd_p{i}": (_fedmd(f, d), True) for i, (f, d) in enumerate(FEDMD_PARTIES)},
    **{f"fedmd_small_p{i}": (_fedmd(f, d, FEDMD_SMALL_SCALE), True)
       for i, (f, d) in enumerate(FEDMD_PARTIES)},
}


# Models with non-trainable state (batch norm statistics).
STATEFUL_MODELS = frozenset(name for name in MODELS if name.startswith("fedmd_"))


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


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple) -> dict:
  """{"params": ...} plus any non-trainable collection (batch norm's "batch_stats")."""
  return dict(model.init(key, jnp.zeros((1, *input_shape), jnp.float32)))


def init_params(model: nn.Module, key: jax.Array, input_shape: tuple):
  return init_variables(model, key, input_shape)["params"]


def apply_model(model: nn.Module, params, x: jax.Array, model_state=None) -> jax.Array:
  """Inference logits (dropout off, batch norm with its running statistics)."""
  return model.apply({"params": params, **(model_state or {})}, x, train=False)


def forward(model: nn.Module, params, model_state: dict, x: jax.Array, train: bool,
            key: jax.Array) -> tuple[jax.Array, dict]:
  """Logits and the new model state. In training, dropout draws from `key` and batch
  norm uses (and folds into its running averages) the batch's statistics."""
  if not train or not model_state:
    rngs = {"dropout": key} if train else {}
    return model.apply({"params": params, **model_state}, x, train=train, rngs=rngs), model_state
  logits, updates = model.apply({"params": params, **model_state}, x, train=True,
                                rngs={"dropout": key}, mutable=list(model_state))
  return logits, dict(updates)

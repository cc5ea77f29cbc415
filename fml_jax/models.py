"""Model zoo: the architectures of the FedAvg, FML, FedMD and FedMR papers, as Flax modules.

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
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x) if self.head else x


class MLP(nn.Module):
  """FedAvg's "2NN": two hidden layers of 200 units with ReLU. With `batch_norm`, a
  batch norm between each hidden dense layer and its ReLU (`mlp_bn`: the smallest
  batch-norm model, for tests and for FedBN on vector data), with PyTorch's defaults
  (momentum 0.1, i.e. flax's 0.9; epsilon 1e-5)."""
  num_classes: int
  hidden: tuple = (200, 200)
  batch_norm: bool = False
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.Dense(width)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x) if self.head else x


class CNN(nn.Module):
  """FedAvg's CNN: 5x5 conv 32, pool, 5x5 conv 64, pool, dense 512, dense out.

  `padding="SAME"` is the FedAvg paper's; `"VALID"` is PFLlib's and HtFLlib's
  `FedAvgCNN` (`cnn_htfl`: 1024 features into the dense 512 on 28x28, 1600 on 32x32)."""
  num_classes: int
  padding: str = "SAME"
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(32, (5, 5), padding=self.padding)(x)))
    x = max_pool_2x2(nn.relu(Conv(64, (5, 5), padding=self.padding)(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x) if self.head else x


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and max pooling (6 and 16 filters, dense 120, 84)."""
  num_classes: int
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(6, (5, 5), padding="SAME")(x)))
    x = max_pool_2x2(nn.relu(Conv(16, (5, 5), padding="VALID")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x) if self.head else x


class FMLCNN(nn.Module):
  """The official FML code's "CNN" (ZJU-DAI/Federated-Mutual-Learning, Model.py, class
  CNN), which is the TensorFlow CNN tutorial's network: valid (unpadded) 3x3
  convolutions, conv32-relu-maxpool2, conv64-relu-maxpool2, conv64-relu, flatten,
  dense64-relu, dense. On 32x32 inputs 30, 15, 13, 6, 4: 64*4*4 = 1024 features (on
  28x28: 3*3*64 = 576; the official code hard-codes 3 input channels, 1024 features
  and 10 classes). Needs images of at least 18x18."""
  num_classes: int
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(32, (3, 3), padding="VALID")(x)))
    x = max_pool_2x2(nn.relu(Conv(64, (3, 3), padding="VALID")(x)))
    x = nn.relu(Conv(64, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x) if self.head else x


class CNNCifar(nn.Module):
  """FedMR's `CNNCifar` (HMHelloWorld/FedMR, models/Nets.py): LeNet with valid 5x5
  convolutions, conv6-relu-maxpool2, conv16-relu-maxpool2, flatten (16*5*5 = 400 on
  32x32), dense120-relu, dense84-relu, dense. Unlike `lenet5` the first convolution
  is unpadded. Needs images of at least 16x16."""
  num_classes: int
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = max_pool_2x2(nn.relu(Conv(6, (5, 5), padding="VALID")(x)))
    x = max_pool_2x2(nn.relu(Conv(16, (5, 5), padding="VALID")(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x) if self.head else x


class CNNMnist(nn.Module):
  """FedMR's `CNNMnist` (HMHelloWorld/FedMR, models/Nets.py; no dropout there): valid
  5x5 convolutions, conv20-maxpool2-relu, conv50-maxpool2-relu, flatten (50*4*4 = 800
  on 28x28), dense50-relu, dense. Needs images of at least 16x16."""
  num_classes: int
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(max_pool_2x2(Conv(20, (5, 5), padding="VALID")(x)))
    x = nn.relu(max_pool_2x2(Conv(50, (5, 5), padding="VALID")(x)))
    x = nn.relu(nn.Dense(50)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x) if self.head else x


def batch_norm(train: bool, **kwargs) -> nn.BatchNorm:
  """PyTorch's BatchNorm2d defaults: momentum 0.1 (flax's 0.9), epsilon 1e-5. Flax
  folds the biased batch variance into the running variance (PyTorch the unbiased)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **kwargs)


def _pad(kernel: int) -> tuple:
  """PyTorch's `padding=kernel // 2` on both sides (flax's "SAME" pads strided
  convolutions of even inputs on one side only)."""
  return ((kernel // 2, kernel // 2),) * 2


# FedMR's ResNet initialization: conv weights ~ N(0, 2 / (kh * kw * out_channels)),
# batch norm scale 0.5 and bias 0 (the classifier keeps its default).
_FEDMR_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_FEDMR_BN_SCALE_INIT = nn.initializers.constant(0.5)


class PreActBottleneck(nn.Module):
  """FedMR's `Bottleneck` (expansion 4, pre-activation): three units BN-relu-conv
  (1x1 `planes`, 3x3 `planes` with `strides`, 1x1 4*`planes`) added to the input, or
  to a 1x1 convolution of the input (no BN) when `shortcut`; no relu after the sum."""
  planes: int
  strides: int = 1
  shortcut: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    residual = x
    if self.shortcut:
      residual = Conv(4 * self.planes, (1, 1), (self.strides, self.strides), padding=_pad(1),
                      use_bias=False, kernel_init=_FEDMR_CONV_INIT, name="shortcut")(x)
    units = ((self.planes, 1, 1), (self.planes, 3, self.strides), (4 * self.planes, 1, 1))
    for i, (features, kernel, strides) in enumerate(units, 1):
      x = nn.relu(batch_norm(train, scale_init=_FEDMR_BN_SCALE_INIT, name=f"unit{i}_bn")(x))
      x = Conv(features, (kernel, kernel), (strides, strides), padding=_pad(kernel),
               use_bias=False, kernel_init=_FEDMR_CONV_INIT, name=f"unit{i}_conv")(x)
    return x + residual


class ResNet20(nn.Module):
  """FedMR's `resnet20` (HMHelloWorld/FedMR, models/Nets.py, `ResNet20_cifar` =
  `ResNet_cifar(Bottleneck, [2, 2, 2])`), which is not He et al.'s basic-block
  ResNet-20: a 3x3 conv of `width` channels (no bias, no BN after it), then three
  stages of two pre-activation bottleneck blocks with `width`, 2x and 4x planes
  (outputs 4x that: 64/128/256 at width 16), stride 2 in the second and third
  stage's first block, each stage's first block with a 1x1-conv shortcut without BN
  (option B without BN); average pool, dense. 20 layers: 1 + 6 * 3 + 1.

  As the official code: its initialization (`_FEDMR_CONV_INIT`, BN scale 0.5) and
  no final BN-relu before the pool (the official code declares one, `self.bn`, but its
  forward never calls it; those 512 unused parameters are left out here). The pool
  is global, which is the official `AvgPool2d(8)` on 32x32 inputs; FedMR's MNIST
  variant (`ResNet_mnist`: a 3x3 stride-1 max pool after the first conv, `avg_pool2d(7)`)
  is not reproduced: here 28x28 inputs go through the same network.
  """
  num_classes: int
  width: int = 16
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Children are named so that the flattened (key-sorted) parameter tree runs from
    # input to output, which FedMR's block recombination relies on.
    x = Conv(self.width, (3, 3), padding=_pad(3), use_bias=False, kernel_init=_FEDMR_CONV_INIT,
             name="conv1")(x)
    features = self.width
    for stage, (planes, strides) in enumerate(
        ((self.width, 1), (2 * self.width, 2), (4 * self.width, 2)), 1):
      for block in range(2):
        s = strides if block == 0 else 1
        x = PreActBottleneck(planes, s, shortcut=s != 1 or features != 4 * planes,
                             name=f"layer{stage}_{block}")(x, train)
        features = 4 * planes
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="linear")(x) if self.head else x


# VGG-16's convolution widths; "M": 2x2 max pooling.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG16BN(nn.Module):
  """FedMR's `VGG16` for CIFAR (HMHelloWorld/FedMR, models/Nets.py): 13 3x3 convs
  (padding 1, with bias) each followed by BN and relu, max pooling after the 2nd, 4th,
  7th, 10th and 13th (`VGG16_LAYERS`; 32x32 -> 1x1x512), flatten, then FedMR's
  classifier: dense4096-relu-dropout, dense4096-relu-dropout, dense (dropout 0.5,
  PyTorch's default). The official `AvgPool2d(kernel_size=1)` is the identity. Every
  width (convolutions and the two hidden dense layers) is divided by `scale`. Needs
  images of at least 32x32 (five pools); FedMR's MNIST `VGG16_mnist` is another
  network, not reproduced."""
  num_classes: int
  scale: int = 1
  hidden: int = 4096
  dropout: float = 0.5
  head: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    # conv01 .. conv13, conv01_bn .., fc14 .. fc16: the sorted parameter tree runs
    # from input to output.
    layer = 0
    for width in VGG16_LAYERS:
      if width == "M":
        x = max_pool_2x2(x)
        continue
      layer += 1
      x = Conv(max(1, width // self.scale), (3, 3), padding=_pad(3), name=f"conv{layer:02d}")(x)
      x = nn.relu(batch_norm(train, name=f"conv{layer:02d}_bn")(x))
    x = x.reshape(x.shape[0], -1)
    for layer in (14, 15):
      x = nn.relu(nn.Dense(max(1, self.hidden // self.scale), name=f"fc{layer}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc16")(x) if self.head else x


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
  head: bool = True

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
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, use_bias=False)(x) if self.head else x


def adaptive_avg_pool_matrix(width: int, feature_dim: int) -> jax.Array:
  """(width, feature_dim): `features @ M` is PyTorch's `nn.AdaptiveAvgPool1d(feature_dim)`
  over the last axis. Output i averages inputs floor(i * width / fd) .. ceil((i + 1) *
  width / fd) - 1, so wider features are averaged down and narrower ones repeated up
  (neighbours averaged where the ratio is not whole); equal widths: the identity."""
  i = np.arange(feature_dim)
  start = (i * width) // feature_dim
  end = -((-(i + 1) * width) // feature_dim)
  j = np.arange(width)[:, None]
  inside = (j >= start) & (j < end)
  return jnp.asarray(inside / (end - start), jnp.float32)


class HeadSplit(nn.Module):
  """HtFLlib's `BaseHeadSplit`: `base` (a zoo model without its output layer) whose
  features are average-pooled to `feature_dim` (`adaptive_avg_pool_matrix`), then
  `head` = Dense(num_classes). Parameters {"base": ..., "head": ...}; `features` is
  the pooled representation prototypes, heads and feature losses work on."""
  base: nn.Module
  feature_dim: int
  num_classes: int

  def setup(self):
    self.head = nn.Dense(self.num_classes)

  def features(self, x, train: bool = False):
    z = self.base(x, train=train)
    if z.shape[-1] == self.feature_dim:
      return z
    return z @ adaptive_avg_pool_matrix(z.shape[-1], self.feature_dim).astype(z.dtype)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train))


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
    "mlp_bn": (lambda n: MLP(num_classes=n, batch_norm=True), False),
    "cnn": (lambda n: CNN(num_classes=n), True),
    "cnn_htfl": (lambda n: CNN(num_classes=n, padding="VALID"), True),
    "lenet5": (lambda n: LeNet5(num_classes=n), True),
    # fedmd_cnn2 / fedmd_cnn3: the two types; fedmd_p0 .. fedmd_p9: the ten parties;
    # fedmd_small_p0 .. p9: the parties with 1/8 of the filters.
    "fedmd_cnn2": (_fedmd((128, 256), 0.2), True),
    "fedmd_cnn3": (_fedmd((64, 128, 256), 0.2), True),
    **{f"fedmd_p{i}": (_fedmd(f, d), True) for i, (f, d) in enumerate(FEDMD_PARTIES)},
    **{f"fedmd_small_p{i}": (_fedmd(f, d, FEDMD_SMALL_SCALE), True)
       for i, (f, d) in enumerate(FEDMD_PARTIES)},
    # The FML paper's official CNN; FedMR's official CNNs, ResNet-20 and VGG-16 (BN);
    # the _small ones at 1/4 (ResNet) and 1/8 (VGG) of the widths, for CPUs.
    "fml_cnn": (lambda n: FMLCNN(num_classes=n), True),
    "cnn_cifar": (lambda n: CNNCifar(num_classes=n), True),
    "cnn_mnist": (lambda n: CNNMnist(num_classes=n), True),
    "resnet20": (lambda n: ResNet20(num_classes=n), True),
    "resnet20_small": (lambda n: ResNet20(num_classes=n, width=4), True),
    "vgg16_bn": (lambda n: VGG16BN(num_classes=n), True),
    "vgg16_bn_small": (lambda n: VGG16BN(num_classes=n, scale=8), True),
}

# Name prefixes of the models with batch norm, whose variables carry "batch_stats"
# (tests/test_model_zoo.py checks this against every model's variables).
BATCH_NORM_MODELS = ("fedmd_", "resnet20", "vgg16_bn", "mlp_bn")

# Models with non-trainable state (batch norm statistics).
STATEFUL_MODELS = frozenset(name for name in MODELS if name.startswith(BATCH_NORM_MODELS))

# The smallest image side each model takes (valid convolutions and pooling shrink
# the image; VGG pools five times); other image models: 12.
MIN_IMAGE_SIDE = {"fml_cnn": 18, "cnn_htfl": 16, "cnn_cifar": 16, "cnn_mnist": 16, "vgg16_bn": 32,
                  "vgg16_bn_small": 32}


# Model families in the spirit of HtFLlib's `HtFE-img-*` (ALGORITHMS.md, "HtFLlib model
# families"): `local_models=<family>` assigns its members to clients round-robin. These
# train on a 2-core CPU; HtFLlib's own families add GoogLeNet, MobileNetV2 and
# ResNet-18/34/50/101/152 (ImageNet-style stems), which are for accelerators and not in
# this zoo.
MODEL_FAMILIES = {
    # image data: HtFLlib's FedAvgCNN, LeNet-5, two MLP widths, FedMR's small ResNet
    "htfe_cpu_img": ("cnn_htfl", "lenet5", "mlp_small", "mlp", "resnet20_small"),
    # vector (or image) data: MLPs of three widths. Not logreg: its body is the input
    # itself, which prototype and feature methods cannot shape.
    "htfe_cpu_vec": ("mlp_small", "mlp", "mlp_wide"),
}


def expand_family(names: list[str]) -> list[str]:
  """A single family name -> its members; anything else unchanged."""
  if len(names) == 1 and names[0] in MODEL_FAMILIES:
    return list(MODEL_FAMILIES[names[0]])
  return names


def build_model(name: str, num_classes: int, input_shape: tuple, field: str = "model",
                feature_dim: int = 0) -> nn.Module:
  """The model called `name`, checked against the data's input shape. With
  `feature_dim` > 0 HtFLlib's split model: its layers up to the output one as `base`,
  pooled to `feature_dim` features, then a Dense head (`HeadSplit`)."""
  if name not in MODELS:
    families = f" (or, as local_models, one family: {', '.join(MODEL_FAMILIES)})" \
        if field == "local_models" else ""
    raise ConfigError(field, f"unknown model '{name}'; choose one of {', '.join(MODELS)}"
                      f"{families}")
  make, needs_image = MODELS[name]
  if needs_image and len(input_shape) != 3:
    raise ConfigError(field, f"model '{name}' needs image inputs (height, width, channels), "
                      f"but the dataset's inputs have shape {input_shape}; use mlp or logreg")
  side = MIN_IMAGE_SIDE.get(name, 12)
  if needs_image and min(input_shape[:2]) < side:
    raise ConfigError(field, f"model '{name}' needs images of at least {side}x{side} pixels, "
                      f"the dataset's are {input_shape[0]}x{input_shape[1]}")
  if feature_dim:
    return HeadSplit(base=make(num_classes).clone(head=False), feature_dim=feature_dim,
                     num_classes=num_classes)
  return make(num_classes)


def output_layer(params) -> str | None:
  """The name of a model's output layer in its top-level `params`: a split model's
  `head` (feature_dim > 0), else the highest-numbered `Dense_<k>` (flax numbers compact
  submodules in call order; jax sorts dict keys as text, so `Dense_10` < `Dense_2` there
  and the number is what counts); None if there is neither."""
  if "head" in params:
    return "head"
  dense = [k for k in params if re.fullmatch(r"Dense_\d+", k)]
  return max(dense, key=lambda k: int(k.split("_")[1])) if dense else None


def features(model: nn.Module, params, model_state: dict, x: jax.Array, train: bool,
             key: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
  """(features, logits, new model state) of a `HeadSplit` model, as `forward`."""
  def both(module, x):
    z = module.features(x, train=train)
    return z, module.head(z)
  rngs = {"dropout": key} if train else {}
  variables = {"params": params, **model_state}
  if not train or not model_state:
    z, logits = model.apply(variables, x, rngs=rngs, method=both)
    return z, logits, model_state
  (z, logits), updates = model.apply(variables, x, rngs=rngs, method=both,
                                     mutable=list(model_state))
  return z, logits, dict(updates)


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

"""The FML and FedMR models (fml_cnn, cnn_cifar, cnn_mnist, resnet20, vgg16_bn and
their _small versions): each equals a plain reference of its layers written here with
lax/jnp (inference with running statistics, and training with batch statistics and
flax's running-average update); where torch imports, the official PyTorch networks,
written here after the official code (FML: Model.py; FedMR: models/Nets.py), have the
same parameter counts and, given our weights, the same logits; every model takes
MNIST's 28x28x1 and CIFAR's 32x32x3 images or refuses them by the `model` field."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fml_jax import models
from fml_jax.errors import ConfigError

NEW_MODELS = ("fml_cnn", "cnn_cifar", "cnn_mnist", "resnet20", "resnet20_small", "vgg16_bn",
              "vgg16_bn_small")
CIFAR, MNIST = (32, 32, 3), (28, 28, 1)
MOMENTUM, EPS = 0.9, 1e-5     # PyTorch's BatchNorm2d defaults in flax's convention


# ------------------------------------------------------------------ the reference


def conv(x, p, stride=1, pad=0):
  y = lax.conv_general_dilated(x, p["kernel"], (stride, stride), ((pad, pad), (pad, pad)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=lax.Precision.HIGHEST)
  return y + p["bias"] if "bias" in p else y


def pool(x):
  """2x2 max pooling, stride 2, floor mode."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def dense(x, p):
  return jnp.dot(x, p["kernel"], precision=lax.Precision.HIGHEST) + p["bias"]


def flatten(x):
  return x.reshape(x.shape[0], -1)


relu = jax.nn.relu


def batch_norm(x, p, stats, train, new_stats):
  """Inference: the running statistics. Training: the batch's mean and biased
  variance, and into `new_stats` flax's update new = m * old + (1 - m) * batch's
  (flax folds in the biased variance; PyTorch the unbiased one)."""
  if train:
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    new_stats.update(mean=MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
                     var=MOMENTUM * stats["var"] + (1 - MOMENTUM) * var)
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"]


def ref_fml_cnn(v, x, train=False):
  p = v["params"]
  x = pool(relu(conv(x, p["Conv_0"])))
  x = pool(relu(conv(x, p["Conv_1"])))
  x = relu(conv(x, p["Conv_2"]))
  return dense(relu(dense(flatten(x), p["Dense_0"])), p["Dense_1"]), {}


def ref_cnn_cifar(v, x, train=False):
  p = v["params"]
  x = pool(relu(conv(x, p["Conv_0"])))
  x = pool(relu(conv(x, p["Conv_1"])))
  x = relu(dense(flatten(x), p["Dense_0"]))
  x = relu(dense(x, p["Dense_1"]))
  return dense(x, p["Dense_2"]), {}


def ref_cnn_mnist(v, x, train=False):
  p = v["params"]
  x = relu(pool(conv(x, p["Conv_0"])))
  x = relu(pool(conv(x, p["Conv_1"])))
  return dense(relu(dense(flatten(x), p["Dense_0"])), p["Dense_1"]), {}


def ref_resnet20(v, x, train=False):
  """conv1; per stage two pre-activation bottlenecks (BN-relu-conv 1x1, 3x3 with the
  stride, 1x1 to 4x planes) plus the input or its strided 1x1 conv; mean; dense."""
  p, s = v["params"], v["batch_stats"]
  new = {}
  x = conv(x, p["conv1"], pad=1)
  for stage in (1, 2, 3):
    for block in (0, 1):
      name = f"layer{stage}_{block}"
      bp, bs = p[name], s[name]
      new[name] = {}
      stride = 2 if stage > 1 and block == 0 else 1
      residual = conv(x, bp["shortcut"], stride=stride) if "shortcut" in bp else x
      for unit, (unit_stride, pad) in enumerate(((1, 0), (stride, 1), (1, 0)), 1):
        new[name][f"unit{unit}_bn"] = {}
        x = relu(batch_norm(x, bp[f"unit{unit}_bn"], bs[f"unit{unit}_bn"], train,
                            new[name][f"unit{unit}_bn"]))
        x = conv(x, bp[f"unit{unit}_conv"], stride=unit_stride, pad=pad)
      x = x + residual
  return dense(x.mean(axis=(1, 2)), p["linear"]), new


def ref_vgg16_bn(v, x, train=False):
  """13 x (conv3x3 pad 1, BN, relu), pools after conv 2, 4, 7, 10, 13; flatten; dense
  relu, dense relu (dropout: the caller's model has none), dense."""
  p, s = v["params"], v["batch_stats"]
  new = {}
  for layer in range(1, 14):
    name = f"conv{layer:02d}"
    new[f"{name}_bn"] = {}
    x = relu(batch_norm(conv(x, p[name], pad=1), p[f"{name}_bn"], s[f"{name}_bn"], train,
                        new[f"{name}_bn"]))
    if layer in (2, 4, 7, 10, 13):
      x = pool(x)
  x = relu(dense(flatten(x), p["fc14"]))
  x = relu(dense(x, p["fc15"]))
  return dense(x, p["fc16"]), new


REFERENCES = {"fml_cnn": ref_fml_cnn, "cnn_cifar": ref_cnn_cifar, "cnn_mnist": ref_cnn_mnist,
              "resnet20": ref_resnet20, "resnet20_small": ref_resnet20,
              "vgg16_bn": ref_vgg16_bn, "vgg16_bn_small": ref_vgg16_bn}


def variables_for_test(model, shape, seed=0):
  """Variables of the model's shapes drawn here with numpy (cheaper than compiling the
  model's initializers): kernels ~ N(0, 2 / fan_in), biases small, and batch norm's
  scale, bias and running statistics away from their initial values, so that a
  mix-up shows."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2 / math.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    else:   # bias, mean
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(shape, n=2, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, *shape))


def assert_close(actual, expected, tol=2e-4):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


# One compiled program per (model, train), shared by the tests.
_forward = jax.jit(models.forward, static_argnums=(0, 4))
_references = {name: jax.jit(ref, static_argnums=2) for name, ref in REFERENCES.items()}


def reference(name, variables, x, train=False):
  return _references[name](variables, x, train)


def run(model, variables, x, train, dropout_key=None):
  """models.forward: the logits and the new model state."""
  state = {k: v for k, v in variables.items() if k != "params"}
  key = jax.random.PRNGKey(7) if dropout_key is None else dropout_key
  return _forward(model, variables["params"], state, x, train, key)


# ------------------------------------------------------------- forward vs. reference


# (The other dataset's shape: test_every_new_model_takes_mnist_and_cifar...)
@pytest.mark.parametrize("name,shape", [
    ("fml_cnn", CIFAR), ("fml_cnn", MNIST), ("cnn_cifar", CIFAR), ("cnn_mnist", MNIST)])
def test_cnn_equals_reference(name, shape):
  model = models.build_model(name, 10, shape)
  variables = variables_for_test(model, shape)
  x = images(shape)
  logits, state = run(model, variables, x, train=False)
  assert logits.shape == (2, 10) and state == {}
  assert_close(logits, reference(name, variables, x)[0])


def check_batch_norm_model(model, name, shape, dropout_free=True):
  """Inference and training forward passes against the reference, and the new
  running statistics against flax's update formula."""
  variables = variables_for_test(model, shape)
  x = images(shape)
  expected, _ = reference(name, variables, x, False)
  logits, state = run(model, variables, x, train=False)
  assert_close(logits, expected)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, state["batch_stats"],
                                   variables["batch_stats"]))   # inference keeps the stats
  expected, expected_stats = reference(name, variables, x, True)
  logits, state = run(model, variables, x, train=True)
  if dropout_free:
    assert_close(logits, expected)
  else:
    assert not np.allclose(logits, expected, atol=1e-3)
  assert set(state) == {"batch_stats"}
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(expected_stats)
  jax.tree.map(assert_close, state["batch_stats"], expected_stats)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"],
                       variables["batch_stats"])
  assert all(jax.tree.leaves(moved))    # every running statistic was updated
  return logits


# (resnet20_small on CIFAR: test_logits_equal_the_official_pytorch_network)
def test_resnet20_equals_reference():
  check_batch_norm_model(models.build_model("resnet20_small", 10, MNIST), "resnet20_small",
                         MNIST)
  # Full width: inference only (training is the same program at other widths).
  model = models.build_model("resnet20", 10, CIFAR)
  variables = variables_for_test(model, CIFAR)
  x = images(CIFAR)
  assert_close(run(model, variables, x, train=False)[0], reference("resnet20", variables, x)[0])


def test_vgg16_bn_small_equals_reference():
  # Training with the classifier's dropout off equals the reference...
  check_batch_norm_model(models.VGG16BN(num_classes=10, scale=8, dropout=0.0),
                         "vgg16_bn_small", CIFAR)
  # ...the registered model (dropout 0.5) equals it in inference and in its training
  # running statistics (dropout comes after the last BN); its dropout draws from the key.
  model = models.build_model("vgg16_bn_small", 10, CIFAR)
  logits = check_batch_norm_model(model, "vgg16_bn_small", CIFAR, dropout_free=False)
  other, _ = run(model, variables_for_test(model, CIFAR), images(CIFAR), True,
                 jax.random.PRNGKey(8))
  assert not np.allclose(other, logits)


def test_resnet_blocks_have_fedmr_initialization():
  """FedMR's ResNet init: conv weights ~ N(0, 2 / (kh * kw * out)), BN scale 0.5, bias 0."""
  block = models.PreActBottleneck(planes=16, strides=2, shortcut=True)
  variables = jax.jit(block.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 16)))
  p = variables["params"]
  for unit in ("unit1_bn", "unit2_bn", "unit3_bn"):
    np.testing.assert_array_equal(p[unit]["scale"], 0.5)
    np.testing.assert_array_equal(p[unit]["bias"], 0.0)
  kernel = np.asarray(p["unit2_conv"]["kernel"])       # 3x3, 16 -> 16: 2304 draws
  assert kernel.shape == (3, 3, 16, 16)
  assert abs(kernel.std() / np.sqrt(2 / (9 * 16)) - 1) < 0.08
  assert abs(kernel.mean()) < 0.02
  wide = np.asarray(p["unit3_conv"]["kernel"])         # 1x1, 16 -> 64
  assert abs(wide.std() / np.sqrt(2 / 64) - 1) < 0.08
  assert set(p) == {"shortcut", "unit1_bn", "unit1_conv", "unit2_bn", "unit2_conv", "unit3_bn",
                    "unit3_conv"} and "bias" not in p["unit1_conv"]


# ------------------------------------------------------------------ sizes and shapes


def param_count(name, shape=CIFAR, num_classes=10):
  model = models.build_model(name, num_classes, shape)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), shape))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def resnet20_count(width, channels=3, num_classes=10):
  """FedMR's ResNet-20 by hand: conv1; per block 3 BN (2 per channel) and 3 convs,
  a 1x1 shortcut in each stage's first block; the classifier on 4 * 4 * width."""
  total = 9 * channels * width
  features = width
  for planes in (width, 2 * width, 4 * width):
    for block in range(2):
      total += 2 * (features + 2 * planes) + features * planes + 9 * planes ** 2 \
          + planes * 4 * planes
      if block == 0:
        total += features * 4 * planes
      features = 4 * planes
  return total + features * num_classes + num_classes


def vgg16_bn_count(scale, channels=3, num_classes=10):
  total, features = 0, channels
  for width in models.VGG16_LAYERS:
    if width != "M":
      width //= scale
      total += 9 * features * width + width + 2 * width
      features = width
  hidden = 4096 // scale
  return total + (features + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes


def test_parameter_counts():
  assert param_count("fml_cnn") == 896 + 18496 + 36928 + (1024 * 64 + 64) + 650 == 122570
  assert param_count("cnn_cifar") == 456 + 2416 + 48120 + 10164 + 850 == 62006
  assert param_count("cnn_mnist", MNIST) == 520 + 25050 + 40050 + 510 == 66130
  assert param_count("resnet20") == resnet20_count(16) == 218970
  assert param_count("resnet20", MNIST) == resnet20_count(16, channels=1)
  assert param_count("resnet20_small") == resnet20_count(4) == 14670
  # FedMR's VGG-16 head (4096-4096) makes it 33.6M; 14.7M of them are the features.
  assert param_count("vgg16_bn") == vgg16_bn_count(1) == 33646666
  assert vgg16_bn_count(1) - (512 + 1) * 4096 - 4097 * 4096 - 4097 * 10 == 14723136
  assert param_count("vgg16_bn_small") == vgg16_bn_count(8) == 532690


def test_every_new_model_takes_mnist_and_cifar_or_refuses_by_the_model_field():
  for name in NEW_MODELS:
    for shape in (CIFAR, MNIST):
      if name.startswith("vgg16_bn") and shape == MNIST:
        for field in ("model", "local_models"):
          with pytest.raises(ConfigError, match="at least 32x32 pixels") as e:
            models.build_model(name, 10, shape, field)
          assert e.value.field == field
        continue
      model = models.build_model(name, 10, shape)
      out = jax.eval_shape(lambda m=model, s=shape: m.apply(
          models.init_variables(m, jax.random.PRNGKey(0), s), jnp.zeros((2, *s))))
      assert out.shape == (2, 10)


@pytest.mark.parametrize("name", sorted(models.MIN_IMAGE_SIDE))
def test_minimum_image_side_is_tight(name):
  """At the minimum side the classifier gets features; one pixel less it would get none
  (or fail), and build_model refuses it."""
  side = models.MIN_IMAGE_SIDE[name]
  make, _ = models.MODELS[name]

  def classifier_fan_in(s):
    params = jax.eval_shape(lambda: models.init_params(make(10), jax.random.PRNGKey(0),
                                                       (s, s, 3)))
    first_dense = "fc14" if "fc14" in params else "Dense_0"
    return params[first_dense]["kernel"].shape[0]

  models.build_model(name, 10, (side, side, 3))
  assert classifier_fan_in(side) > 0
  try:
    assert classifier_fan_in(side - 1) == 0
  except (ValueError, TypeError, ZeroDivisionError):
    pass
  with pytest.raises(ConfigError, match=f"at least {side}x{side}") as e:
    models.build_model(name, 10, (side - 1, side - 1, 3))
  assert e.value.field == "model"


def test_stateful_models_are_those_with_batch_stats():
  stateful = set()
  for name, (make, _) in models.MODELS.items():
    variables = jax.eval_shape(lambda m=make(10): models.init_variables(
        m, jax.random.PRNGKey(0), CIFAR))
    if "batch_stats" in variables:
      stateful.add(name)
  assert stateful == set(models.STATEFUL_MODELS)
  assert {"resnet20", "resnet20_small", "vgg16_bn", "vgg16_bn_small"} <= stateful


@pytest.mark.parametrize("name", ["resnet20_small", "vgg16_bn_small"])
def test_parameter_tree_runs_from_input_to_output(name):
  """The key-sorted parameter tree lists the layers in the order the forward pass
  calls them (FedMR's block recombination groups consecutive layers of that tree)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
        context.module, (nn.Conv, nn.Dense, nn.BatchNorm)):
      calls.append(tuple(context.module.scope.path))
    return next_fun(*args, **kwargs)

  model = models.build_model(name, 10, CIFAR)
  with nn.intercept_methods(record):
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0), CIFAR))
  paths = [tuple(k.key for k in path[:-1])
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert list(dict.fromkeys(paths)) == calls


# ------------------------------------------------- the official PyTorch networks


def torch_models(torch):
  """The official networks, as in their code (FML: Model.py; FedMR: models/Nets.py),
  with the input channels, classes and widths as parameters and `flatten(1)` for the
  hard-coded views (so that 28x28 inputs run)."""
  tnn, F = torch.nn, torch.nn.functional

  class FMLCNN(tnn.Module):
    def __init__(self, c, n, flat):
      super().__init__()
      self.conv1, self.pool = tnn.Conv2d(c, 32, 3), tnn.MaxPool2d(2, 2)
      self.conv2, self.conv3 = tnn.Conv2d(32, 64, 3), tnn.Conv2d(64, 64, 3)
      self.fc1, self.fc2 = tnn.Linear(flat, 64), tnn.Linear(64, n)

    def forward(self, x):
      x = self.pool(F.relu(self.conv1(x)))
      x = self.pool(F.relu(self.conv2(x)))
      x = F.relu(self.conv3(x)).flatten(1)
      return self.fc2(F.relu(self.fc1(x)))

  class CNNCifar(tnn.Module):
    def __init__(self, c, n, flat):
      super().__init__()
      self.conv1, self.pool, self.conv2 = tnn.Conv2d(c, 6, 5), tnn.MaxPool2d(2, 2), \
          tnn.Conv2d(6, 16, 5)
      self.fc1, self.fc2, self.fc3 = tnn.Linear(flat, 120), tnn.Linear(120, 84), \
          tnn.Linear(84, n)

    def forward(self, x):
      x = self.pool(F.relu(self.conv1(x)))
      x = self.pool(F.relu(self.conv2(x))).flatten(1)
      return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

  class CNNMnist(tnn.Module):
    def __init__(self, c, n, flat):
      super().__init__()
      self.conv1, self.conv2 = tnn.Conv2d(c, 20, kernel_size=5), tnn.Conv2d(20, 50, kernel_size=5)
      self.fc1, self.fc2 = tnn.Linear(flat, 50), tnn.Linear(50, n)

    def forward(self, x):
      x = F.relu(F.max_pool2d(self.conv1(x), 2))
      x = F.relu(F.max_pool2d(self.conv2(x), 2)).flatten(1)
      return self.fc2(F.relu(self.fc1(x)))

  class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.bn1 = tnn.BatchNorm2d(inplanes)
      self.conv1 = tnn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
      self.bn2 = tnn.BatchNorm2d(planes)
      self.conv2 = tnn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
      self.bn3 = tnn.BatchNorm2d(planes)
      self.conv3 = tnn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
      self.relu, self.downsample = tnn.ReLU(), downsample

    def forward(self, x):
      residual = x if self.downsample is None else self.downsample(x)
      out = self.conv1(self.relu(self.bn1(x)))
      out = self.conv2(self.relu(self.bn2(out)))
      out = self.conv3(self.relu(self.bn3(out)))
      return out + residual

  class ResNetCifar(tnn.Module):     # ResNet20_cifar: ResNet_cifar(Bottleneck, [2, 2, 2])
    def __init__(self, c, n, width=16):
      super().__init__()
      self.inplanes = width
      self.conv1 = tnn.Conv2d(c, width, kernel_size=3, padding=1, bias=False)
      self.layer1 = self._make_layer(width, 2, 1)
      self.layer2 = self._make_layer(2 * width, 2, 2)
      self.layer3 = self._make_layer(4 * width, 2, 2)
      self.bn = tnn.BatchNorm2d(16 * width)      # declared, never called
      self.avgpool = tnn.AvgPool2d(8)
      self.fc = tnn.Linear(16 * width, n)

    def _make_layer(self, planes, num_blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * 4:
        downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * 4, kernel_size=1,
                                               stride=stride, bias=False))
      layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * 4
      layers += [Bottleneck(self.inplanes, planes) for _ in range(1, num_blocks)]
      return tnn.Sequential(*layers)

    def forward(self, x):
      x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
      return self.fc(self.avgpool(x).flatten(1))

  class VGG16(tnn.Module):
    def __init__(self, c, n, scale=1, dropout=0.5):
      super().__init__()
      layers = []
      for width in models.VGG16_LAYERS:
        if width == "M":
          layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
        else:
          layers += [tnn.Conv2d(c, width // scale, kernel_size=3, padding=1),
                     tnn.BatchNorm2d(width // scale), tnn.ReLU(True)]
          c = width // scale
      layers.append(tnn.AvgPool2d(kernel_size=1, stride=1))
      self.features = tnn.Sequential(*layers)
      h = 4096 // scale
      self.classifier = tnn.Sequential(tnn.Linear(c, h), tnn.ReLU(True), tnn.Dropout(dropout),
                                       tnn.Linear(h, h), tnn.ReLU(True), tnn.Dropout(dropout))
      self.fc = tnn.Linear(h, n)

    def forward(self, x):
      return self.fc(self.classifier(self.features(x).flatten(1)))

  return FMLCNN, CNNCifar, CNNMnist, ResNetCifar, VGG16


def torch_count(module):
  return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_the_official_pytorch_networks():
  torch = pytest.importorskip("torch")
  FMLCNN, CNNCifar, CNNMnist, ResNetCifar, VGG16 = torch_models(torch)
  for name, net in [("fml_cnn", FMLCNN(3, 10, 64 * 4 * 4)),
                    ("cnn_cifar", CNNCifar(3, 10, 16 * 5 * 5)),
                    ("cnn_mnist", CNNMnist(3, 10, 50 * 5 * 5)),
                    ("vgg16_bn", VGG16(3, 10)), ("vgg16_bn_small", VGG16(3, 10, scale=8))]:
    assert param_count(name) == torch_count(net), name
  assert param_count("fml_cnn", MNIST) == torch_count(FMLCNN(1, 10, 64 * 3 * 3))
  assert param_count("cnn_cifar", MNIST) == torch_count(CNNCifar(1, 10, 16 * 4 * 4))
  assert param_count("cnn_mnist", MNIST) == torch_count(CNNMnist(1, 10, 50 * 4 * 4))
  # The official ResNet counts its never-called final BN (2 * 256 parameters).
  assert param_count("resnet20") == torch_count(ResNetCifar(3, 10)) - 2 * 256 == 218970
  assert param_count("resnet20_small") == torch_count(ResNetCifar(3, 10, 4)) - 2 * 64


def load_into_torch(torch, net, variables, flat_hwc=None):
  """Copies the flax variables into `net`: leaves in flattened-tree order onto the
  torch layers in call order (the trees run from input to output); HWIO -> OIHW
  kernels, and the first dense layer's rows from NHWC to NCHW flattening."""
  tnn = torch.nn
  layers = [m for m in net.modules() if isinstance(m, (tnn.Conv2d, tnn.Linear, tnn.BatchNorm2d))]
  if hasattr(net, "bn"):
    layers.remove(net.bn)
  if hasattr(net, "layer1"):    # the bottleneck: shortcut (downsample) first, then bn1, conv1..
    ordered = []
    for block in [b for layer in (net.layer1, net.layer2, net.layer3) for b in layer]:
      ordered += ([block.downsample[0]] if block.downsample is not None else []) + [
          block.bn1, block.conv1, block.bn2, block.conv2, block.bn3, block.conv3]
    layers = [net.conv1] + ordered + [net.fc]
  params, stats = variables["params"], variables.get("batch_stats", {})
  modules = list(dict.fromkeys(path[:-1] for path, _ in
                               jax.tree_util.tree_flatten_with_path(params)[0]))
  assert len(modules) == len(layers)
  first_dense = True

  def sub(tree, path):
    for k in path:
      tree = tree[k.key]
    return tree

  t = lambda a: torch.from_numpy(np.array(a))
  with torch.no_grad():
    for path, layer in zip(modules, layers):
      p = sub(params, path)
      if isinstance(layer, tnn.Conv2d):
        layer.weight.copy_(t(np.transpose(p["kernel"], (3, 2, 0, 1))))
      elif isinstance(layer, tnn.Linear):
        kernel = np.asarray(p["kernel"])
        if first_dense and flat_hwc is not None:
          h, w, c = flat_hwc
          kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        first_dense = False
        layer.weight.copy_(t(kernel.T))
      else:
        s = sub(stats, path)
        layer.weight.copy_(t(p["scale"]))
        layer.running_mean.copy_(t(s["mean"]))
        layer.running_var.copy_(t(s["var"]))
      if "bias" in p:
        layer.bias.copy_(t(p["bias"]))


@pytest.mark.parametrize("name,shape", [
    ("fml_cnn", CIFAR), ("fml_cnn", MNIST), ("cnn_cifar", CIFAR), ("cnn_mnist", MNIST),
    ("resnet20_small", CIFAR), ("vgg16_bn_small", CIFAR)])
def test_logits_equal_the_official_pytorch_network(name, shape):
  """Our weights in the official network give our logits: inference and, for the BN
  models, training (batch statistics; running mean as flax's; PyTorch's running
  variance folds in the unbiased batch variance where flax folds the biased)."""
  torch = pytest.importorskip("torch")
  FMLCNN, CNNCifar, CNNMnist, ResNetCifar, VGG16 = torch_models(torch)
  c = shape[2]
  net, flat_hwc = {
      ("fml_cnn", CIFAR): (FMLCNN(c, 10, 1024), (4, 4, 64)),
      ("fml_cnn", MNIST): (FMLCNN(c, 10, 576), (3, 3, 64)),
      ("cnn_cifar", CIFAR): (CNNCifar(c, 10, 400), (5, 5, 16)),
      ("cnn_mnist", MNIST): (CNNMnist(c, 10, 800), (4, 4, 50)),
      ("resnet20_small", CIFAR): (ResNetCifar(c, 10, width=4), None),
      ("vgg16_bn_small", CIFAR): (VGG16(c, 10, scale=8, dropout=0.0), None),
  }[(name, shape)]
  model = models.build_model(name, 10, shape)
  variables = variables_for_test(model, shape)
  load_into_torch(torch, net, variables, flat_hwc)
  x = images(shape)
  tx = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))
  net.eval()
  with torch.no_grad():
    assert_close(net(tx).numpy(), run(model, variables, x, train=False)[0])
  if name not in models.STATEFUL_MODELS:
    return
  if name == "vgg16_bn_small":
    model = models.VGG16BN(num_classes=10, scale=8, dropout=0.0)
  elements = {}     # per BN layer: the values per channel of its batch (N * H * W)
  bns = [m for m in net.modules()
         if isinstance(m, torch.nn.BatchNorm2d) and m is not getattr(net, "bn", None)]
  for bn in bns:
    bn.register_forward_pre_hook(
        lambda m, args: elements.__setitem__(m, args[0].shape[0] * args[0][0, 0].numel()))
  net.train()
  with torch.no_grad():
    torch_logits = net(tx).numpy()
  logits, state = run(model, variables, x, train=True)
  assert_close(torch_logits, logits)
  # Both trees list the BN layers in call order; per layer (mean, var).
  new, old = jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(variables["batch_stats"])
  assert len(new) == 2 * len(bns)
  for bn, mean, var, old_var in zip(bns, new[::2], new[1::2], old[1::2]):
    n = elements[bn]
    assert_close(mean, bn.running_mean.numpy())
    batch_unbiased = (bn.running_var.numpy() - MOMENTUM * np.asarray(old_var)) / (1 - MOMENTUM)
    assert_close(var, MOMENTUM * np.asarray(old_var)
                 + (1 - MOMENTUM) * batch_unbiased * (n - 1) / n)

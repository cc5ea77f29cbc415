"""Augmentation inside the local step: crops of the zero-padded image and flips, per
example and per client, and nothing at all when off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import config_checks, local_training
from fml_jax.data import augment
from fml_jax.errors import ConfigError

from conftest import make_runner, requires_mnist, small_config


def candidates(image: np.ndarray, padding: int) -> list[np.ndarray]:
  """Every crop of the zero-padded image, flipped and not: what crop_flip may return."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [padded[i:i + h, j:j + w] for i in range(2 * padding + 1)
           for j in range(2 * padding + 1)]
  return crops + [c[:, ::-1] for c in crops]


def test_crop_flip_returns_a_crop_of_the_padded_image_flipped_or_not():
  images = np.random.default_rng(0).integers(1, 255, (64, 6, 5, 3)).astype(np.uint8)
  out = np.asarray(augment.crop_flip(jax.random.PRNGKey(0), jnp.asarray(images), 2))
  assert out.shape == images.shape and out.dtype == images.dtype
  flipped = moved = 0
  for image, result in zip(images, out):
    options = candidates(image, 2)
    index = next(i for i, c in enumerate(options) if np.array_equal(c, result))
    flipped += index >= len(options) // 2
    moved += index % (len(options) // 2) != 2 * 5 + 2   # not the centred crop
  assert 16 < flipped < 48 and moved > 48   # about half flipped, most shifted
  # Padding 0: only the flip is left.
  out = np.asarray(augment.crop_flip(jax.random.PRNGKey(1), jnp.asarray(images), 0))
  for image, result in zip(images, out):
    assert np.array_equal(result, image) or np.array_equal(result, image[:, ::-1])


def test_each_example_and_key_draws_its_own():
  images = jnp.tile(jnp.arange(36, dtype=jnp.float32).reshape(1, 6, 6, 1), (8, 1, 1, 1))
  a = augment.crop_flip(jax.random.PRNGKey(0), images, 2)
  b = augment.crop_flip(jax.random.PRNGKey(1), images, 2)
  assert len({np.asarray(x).tobytes() for x in a}) > 1     # examples differ
  assert not np.array_equal(np.asarray(a), np.asarray(b))  # keys differ


def test_auto_follows_the_dataset_and_bad_settings_are_refused():
  assert augment.resolve(small_config(), (60,)) == "none"
  assert augment.resolve(small_config(dataset="cifar10"), (32, 32, 3)) == "crop_flip"
  assert augment.resolve(small_config(dataset="mnist"), (28, 28, 1)) == "none"
  with pytest.raises(ConfigError, match="needs images"):
    augment.resolve(small_config(augment="crop_flip"), (60,))
  with pytest.raises(ConfigError, match="auto, none, crop_flip"):
    config_checks.validate(small_config(augment="mixup"))


def test_local_training_augments_each_client_differently_and_not_when_off():
  """A counting step records the batches it sees: with crop_flip two clients (keys)
  see different pixels for the same examples; off, the raw examples exactly."""
  images = jnp.asarray(np.random.default_rng(0).integers(1, 255, (32, 6, 6, 1)), jnp.uint8)

  def data_with(mode):
    class Data:
      x_train, y_train = images, jnp.zeros(32, jnp.int32)
      normalize = staticmethod(lambda v: v.astype(jnp.float32))
      augment, augment_padding = mode, 2

      @classmethod
      def augment_batch(cls, x, key):
        return augment.crop_flip(key, x, 2) if mode == "crop_flip" else x
    return Data

  def seen(mode, key):
    def step(carry, x, y, mask, step_key):
      return carry + jnp.sum(x), {}
    total, _ = local_training.run_local_steps(step, jnp.float32(0), data_with(mode),
                                              jnp.arange(32), jnp.asarray(32), key, 1, 8)
    return float(total)

  raw = float(jnp.sum(images.astype(jnp.float32)))
  assert seen("none", jax.random.PRNGKey(0)) == raw == seen("none", jax.random.PRNGKey(1))
  a, b = seen("crop_flip", jax.random.PRNGKey(0)), seen("crop_flip", jax.random.PRNGKey(1))
  assert a != b and a < raw and b < raw   # zero padding shifted in: fewer bright pixels


@requires_mnist
def test_a_run_with_crop_flip_trains_and_differs_from_one_without():
  base = dict(dataset="mnist", partition="iid", model="mlp", num_clients=4, clients_per_round=2,
              client_max_examples=32, local_epochs=1)
  plain = make_runner(small_config(**base), "vmap")
  augmented = make_runner(small_config(**base, augment="crop_flip"), "vmap")
  assert plain.data.augment == "none" and augmented.data.augment == "crop_flip"
  a, _ = plain.run_round(plain.init(0))
  b, report = augmented.run_round(augmented.init(0))
  assert bool(report.all_finite)
  diff = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a.server["params"],
                      b.server["params"])
  assert max(jax.tree.leaves(diff)) > 1e-4

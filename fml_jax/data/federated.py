"""The federated dataset as it lives on the device.

All examples sit in four arrays (train/test images and labels, uint8 images kept
as uint8); each client is a row of an index table into them, padded to the
largest client and paired with a count. The jitted round gathers a client's
batches by index, so no data flows from Python per client or per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fml_jax.data import partition, synthetic, tfds_source
from fml_jax.errors import ConfigError


@struct.dataclass
class FederatedData:
  x_train: jax.Array      # (N, *input_shape) uint8 images, or float32 features
  y_train: jax.Array      # (N,) int32
  x_test: jax.Array       # the global test set
  y_test: jax.Array
  train_idx: jax.Array    # (num_clients, max_train) int32 rows into x_train, padded with 0
  train_n: jax.Array      # (num_clients,) int32 valid entries per row
  test_idx: jax.Array     # (num_clients, max_test) int32 rows into x_test: client test splits
  test_n: jax.Array
  num_classes: int = struct.field(pytree_node=False)
  # Per-channel mean/std applied to uint8 inputs after scaling to [0, 1].
  input_mean: tuple = struct.field(pytree_node=False, default=())
  input_std: tuple = struct.field(pytree_node=False, default=())

  @property
  def num_clients(self) -> int:
    return self.train_idx.shape[0]

  @property
  def input_shape(self) -> tuple:
    return tuple(self.x_train.shape[1:])

  def normalize(self, x: jax.Array) -> jax.Array:
    """Raw stored inputs -> float32 model inputs (the only place this happens)."""
    if x.dtype != jnp.uint8:
      return x.astype(jnp.float32)
    x = x.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.input_mean, jnp.float32)) / jnp.asarray(self.input_std, jnp.float32)


def index_table(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Ragged per-client index lists -> a zero-padded (clients, max_len) table and counts."""
  counts = np.array([len(p) for p in parts], np.int32)
  table = np.zeros((len(parts), max(int(counts.max()), 1)), np.int32)
  for row, p in zip(table, parts):
    row[:len(p)] = p
  return table, counts


def channel_statistics(images: np.ndarray) -> tuple[tuple, tuple]:
  """Per-channel mean and std of uint8 images scaled to [0, 1], exactly, from 256-bin
  histograms (no float copy of the dataset)."""
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(images.shape[-1]):
    hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    mean = hist @ values / hist.sum()
    means.append(float(mean))
    stds.append(float(np.sqrt(hist @ (values - mean) ** 2 / hist.sum())))
  return tuple(means), tuple(stds)


def from_client_lists(x_train, y_train, x_test, y_test, train_parts, test_parts,
                      num_classes: int) -> FederatedData:
  """Builds the device-resident dataset from numpy arrays and per-client index lists."""
  train_idx, train_n = index_table(train_parts)
  test_idx, test_n = index_table(test_parts)
  mean, std = channel_statistics(x_train) if x_train.dtype == np.uint8 else ((), ())
  return FederatedData(
      x_train=jnp.asarray(x_train), y_train=jnp.asarray(y_train, jnp.int32),
      x_test=jnp.asarray(x_test), y_test=jnp.asarray(y_test, jnp.int32),
      train_idx=jnp.asarray(train_idx), train_n=jnp.asarray(train_n),
      test_idx=jnp.asarray(test_idx), test_n=jnp.asarray(test_n),
      num_classes=num_classes, input_mean=mean, input_std=std)


def _synthetic(config) -> FederatedData:
  clients = synthetic.generate(config.num_clients, config.synthetic_alpha, config.synthetic_beta,
                               seed=config.seed,
                               max_examples=config.synthetic_max_client_examples)
  rng = np.random.default_rng([config.seed, 1])
  train_x, train_y, test_x, test_y, train_parts, test_parts = [], [], [], [], [], []
  n_train = n_test = 0
  for x, y in zip(clients.x, clients.y):
    order = rng.permutation(len(y))
    n_held = min(max(1, int(round(config.synthetic_test_fraction * len(y)))), len(y) - 1)
    held, kept = order[:n_held], order[n_held:]
    train_x.append(x[kept]); train_y.append(y[kept])
    test_x.append(x[held]); test_y.append(y[held])
    train_parts.append(np.arange(n_train, n_train + len(kept)))
    test_parts.append(np.arange(n_test, n_test + len(held)))
    n_train += len(kept); n_test += len(held)
  return from_client_lists(np.concatenate(train_x), np.concatenate(train_y),
                           np.concatenate(test_x), np.concatenate(test_y),
                           train_parts, test_parts, synthetic.NUM_CLASSES)


def partition_train_set(config, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  if config.partition == "iid":
    return partition.iid(len(labels), config.num_clients, rng)
  if config.partition == "dirichlet":
    return partition.dirichlet(labels, config.num_clients, config.dirichlet_alpha,
                               config.dirichlet_min_examples, rng)
  if config.partition == "shards":
    return partition.shards(labels, config.num_clients, config.shards_per_client, rng)
  raise ConfigError("partition", f"'{config.partition}' is not available for dataset "
                    f"'{config.dataset}'; choose one of {', '.join(partition.PARTITIONS)}")


def load_federated_data(config) -> FederatedData:
  """The dataset named by `config.dataset`, partitioned among `config.num_clients`."""
  partition.check_partition_fits_dataset(config.dataset, config.partition)
  if config.dataset == "synthetic":
    return _synthetic(config)
  ds = tfds_source.load_image_dataset(config.dataset, config.data_dir)
  rng = np.random.default_rng(config.seed)
  train_parts = partition_train_set(config, ds.y_train, rng)
  test_parts = partition.matching_test_split([ds.y_train[p] for p in train_parts], ds.y_test,
                                             ds.num_classes, rng)
  return from_client_lists(ds.x_train, ds.y_train, ds.x_test, ds.y_test, train_parts, test_parts,
                           ds.num_classes)

"""The federated dataset as it lives on the device.

All examples sit in four arrays (train/test images and labels, uint8 images kept
as uint8). Each client's examples are a run of one flat index array (its start and
count beside it), so the index tables cost one int32 per example however skewed the
client sizes are: a table padded to the largest client would be num_clients x
max_n (100,000 Dirichlet clients with one of 5,000 examples: 2 GB instead of 240 kB).
The jitted round cuts the cohort's rows out of it (`train_rows`), padded to the
largest client with 0, and gathers their batches by index, so no data flows from
Python per client or per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fml_jax import tasks
from fml_jax.data import augment, partition, synthetic, tfds_source
from fml_jax.errors import ConfigError


@struct.dataclass
class FederatedData:
  x_train: jax.Array      # (N, *input_shape) uint8 images, or float32 features
  y_train: jax.Array      # (N,) int32
  x_test: jax.Array       # the global test set
  y_test: jax.Array
  train_flat: jax.Array   # (sum of train_n,) int32 indices into x_train, client after client
  train_start: jax.Array  # (num_clients,) int32 where each client's run starts in train_flat
  train_n: jax.Array      # (num_clients,) int32 each client's number of training examples
  test_flat: jax.Array    # the same for the clients' test splits, indices into x_test
  test_start: jax.Array
  test_n: jax.Array
  # The public set (FedMD) or seed set (FedH2L): (P, *input_shape), (P,); P may be 0.
  x_public: jax.Array
  y_public: jax.Array
  num_classes: int = struct.field(pytree_node=False)
  # Per-channel mean/std applied to uint8 inputs after scaling to [0, 1].
  input_mean: tuple = struct.field(pytree_node=False, default=())
  input_std: tuple = struct.field(pytree_node=False, default=())
  # The smallest client's training examples: a static lower bound on every `train_n`, so
  # local training knows when no client of a round can run out of batches early (then
  # no step needs masking; see local_training.run_local_steps).
  min_train: int = struct.field(pytree_node=False, default=0)
  # The largest client's examples (at least 1): the width of the rows `train_rows` and
  # `test_rows` cut, so every client's local training has the same, static shape.
  max_train: int = struct.field(pytree_node=False, default=1)
  max_test: int = struct.field(pytree_node=False, default=1)
  # Training-time augmentation (data/augment.py): "none" or "crop_flip", and its padding.
  augment: str = struct.field(pytree_node=False, default="none")
  augment_padding: int = struct.field(pytree_node=False, default=4)

  @property
  def num_clients(self) -> int:
    return self.train_n.shape[0]

  def train_rows(self, ids=None) -> jax.Array:
    """(k, max_train) int32: clients `ids`' training indices (all clients if None),
    each row padded with 0 after its train_n entries."""
    return client_rows(self.train_flat, self.train_start, self.train_n, ids, self.max_train)

  def test_rows(self, ids=None) -> jax.Array:
    """(k, max_test) int32: clients `ids`' test indices, padded with 0."""
    return client_rows(self.test_flat, self.test_start, self.test_n, ids, self.max_test)

  @property
  def input_shape(self) -> tuple:
    return tuple(self.x_train.shape[1:])

  def augment_batch(self, x: jax.Array, key: jax.Array) -> jax.Array:
    """A training batch of raw inputs, augmented as the run asks (before `normalize`)."""
    if self.augment == "crop_flip":
      return augment.crop_flip(key, x, self.augment_padding)
    return x

  def normalize(self, x: jax.Array) -> jax.Array:
    """Raw stored inputs -> float32 model inputs (the only place this happens)."""
    if x.dtype != jnp.uint8:
      return x.astype(jnp.float32)
    x = x.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.input_mean, jnp.float32)) / jnp.asarray(self.input_std, jnp.float32)


def flat_index(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ragged per-client index lists -> (flat int32 indices, each client's start, counts)."""
  counts = np.array([len(p) for p in parts], np.int32)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  flat = np.concatenate([np.asarray(p, np.int64) for p in parts] or [np.zeros(0, np.int64)])
  flat = flat.astype(np.int32)
  return flat, starts, counts


def client_rows(flat: jax.Array, starts: jax.Array, counts: jax.Array, ids, width: int):
  """(k, width) rows cut out of a flat index array: row i holds client ids[i]'s
  counts[ids[i]] indices, then 0s (the padding local training masks)."""
  if ids is not None:
    starts, counts = starts[ids], counts[ids]
  cols = jnp.arange(width, dtype=jnp.int32)
  at = jnp.minimum(starts[..., None] + cols, max(flat.shape[0] - 1, 0))
  values = flat[at] if flat.shape[0] else jnp.zeros(at.shape, jnp.int32)
  return jnp.where(cols < counts[..., None], values, 0)


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
                      num_classes: int, x_public=None, y_public=None) -> FederatedData:
  """Builds the device-resident dataset from numpy arrays and per-client index lists."""
  train_flat, train_start, train_n = flat_index(train_parts)
  test_flat, test_start, test_n = flat_index(test_parts)
  mean, std = channel_statistics(x_train) if x_train.dtype == np.uint8 else ((), ())
  if x_public is None:
    x_public, y_public = x_train[:0], y_train[:0]
  return FederatedData(
      x_train=jnp.asarray(x_train), y_train=jnp.asarray(y_train, jnp.int32),
      x_test=jnp.asarray(x_test), y_test=jnp.asarray(y_test, jnp.int32),
      train_flat=jnp.asarray(train_flat), train_start=jnp.asarray(train_start),
      train_n=jnp.asarray(train_n), test_flat=jnp.asarray(test_flat),
      test_start=jnp.asarray(test_start), test_n=jnp.asarray(test_n),
      x_public=jnp.asarray(x_public), y_public=jnp.asarray(y_public, jnp.int32),
      num_classes=num_classes, input_mean=mean, input_std=std, min_train=int(train_n.min()),
      max_train=max(int(train_n.max()), 1), max_test=max(int(test_n.max()), 1))


def data_seed(config) -> int:
  """The seed of the data (partition, synthetic dataset, public set): `data_seed`, or
  `seed` when it is -1. Replicas of one run (fml_jax/replicas.py) share it."""
  value = config.get("data_seed", -1)
  return config.seed if value == -1 else value


def _synthetic(config) -> FederatedData:
  clients = synthetic.generate(config.num_clients, config.synthetic_alpha, config.synthetic_beta,
                               seed=data_seed(config),
                               max_examples=config.synthetic_max_client_examples)
  rng = np.random.default_rng([data_seed(config), 1])
  # Each client's held-out share as rows of the generator's one array; the examples are
  # gathered once at the end (no per-client copies: see synthetic.generate).
  train_rows, test_rows, train_parts, test_parts = [], [], [], []
  n_train = n_test = 0
  for start, y in zip(clients.starts, clients.y):
    order = rng.permutation(len(y))
    n_held = min(max(1, int(round(config.synthetic_test_fraction * len(y)))), len(y) - 1)
    test_rows.append(start + order[:n_held])
    train_rows.append(start + order[n_held:])
    train_parts.append(np.arange(n_train, n_train + len(y) - n_held))
    test_parts.append(np.arange(n_test, n_test + n_held))
    n_train += len(y) - n_held; n_test += n_held
  train_rows, test_rows = np.concatenate(train_rows), np.concatenate(test_rows)
  x_train, y_train = clients.all_x[train_rows], clients.all_y[train_rows]
  x_test, y_test = clients.all_x[test_rows], clients.all_y[test_rows]
  del clients, train_rows, test_rows
  return _finish(config, x_train, y_train, x_test, y_test, train_parts, test_parts,
                 synthetic.NUM_CLASSES, rng)


def partition_train_set(config, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  if config.partition == "iid":
    return partition.iid(len(labels), config.num_clients, rng)
  if config.partition == "dirichlet":
    return partition.dirichlet(labels, config.num_clients, config.dirichlet_alpha,
                               config.dirichlet_min_examples, rng,
                               cap=bool(config.get("dirichlet_cap", False)))
  if config.partition == "shards":
    return partition.shards(labels, config.num_clients, config.shards_per_client, rng)
  raise ConfigError("partition", f"'{config.partition}' is not available for dataset "
                    f"'{config.dataset}'; choose one of {', '.join(partition.PARTITIONS)}")


def load_federated_data(config) -> FederatedData:
  """The dataset named by `config.dataset`, partitioned among `config.num_clients`.

  With a public set (FedMD) or seed set (FedH2L) it is `public_size` examples held
  out of the train split before partitioning (from `public_classes` only, if set),
  or another tfds dataset (`public_dataset`). `private_classes` restricts the
  clients' data (and the global test set) to those classes; after another public
  dataset's classes they are relabelled num_public + rank, FedMD's label space.
  """
  data = _load(config)
  return data.replace(augment=augment.resolve(config, data.input_shape),
                      augment_padding=config.get("augment_padding", 4))


def _load(config) -> FederatedData:
  partition.check_partition_fits_dataset(config.dataset, config.partition)
  if config.dataset == "synthetic":
    return _synthetic(config)
  ds = tfds_source.load_image_dataset(config.dataset, config.data_dir)
  x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  num_classes = ds.num_classes
  public_rng = np.random.default_rng([data_seed(config), 2])   # the partition's rng stays as it was
  x_public = y_public = None
  offset = 0   # where the private labels start
  if config.get("public_dataset", ""):
    public = tfds_source.load_image_dataset(config.public_dataset, config.data_dir)
    if public.x_train.shape[1:] != x_train.shape[1:]:
      raise ConfigError("public_dataset", f"'{config.public_dataset}' has inputs of shape "
                        f"{public.x_train.shape[1:]}, '{config.dataset}' {x_train.shape[1:]}; "
                        "they must match")
    pool = _rows_of_classes(public.y_train, _classes(config, "public_classes", public.num_classes))
    if config.public_size:
      pool = pool[partition.draw_examples(public.y_train[pool], config.public_size,
                                          config.public_balanced, public.num_classes, public_rng)]
    x_public, y_public = public.x_train[pool], public.y_train[pool]
    offset = public.num_classes
  elif config.get("public_size", 0):
    pool = _rows_of_classes(y_train, _classes(config, "public_classes", num_classes))
    held = pool[partition.draw_examples(y_train[pool], config.public_size,
                                        config.public_balanced, num_classes, public_rng)]
    x_public, y_public = x_train[held], y_train[held]
    rest = np.setdiff1d(np.arange(len(y_train)), held)
    x_train, y_train = x_train[rest], y_train[rest]
  private = _classes(config, "private_classes", num_classes)
  if private is not None or offset:
    keep = np.arange(num_classes) if private is None else private
    relabel = np.full(num_classes, -1)
    relabel[keep] = offset + np.arange(len(keep)) if offset else keep
    train_rows, test_rows = np.isin(y_train, keep), np.isin(y_test, keep)
    x_train, y_train = x_train[train_rows], relabel[y_train[train_rows]]
    x_test, y_test = x_test[test_rows], relabel[y_test[test_rows]]
    num_classes = offset + len(keep) if offset else num_classes
  rng = np.random.default_rng(data_seed(config))
  train_parts = partition_train_set(config, y_train, rng)
  test_parts = partition.matching_test_split([y_train[p] for p in train_parts], y_test,
                                             num_classes, rng)
  return _finish(config, x_train, y_train, x_test, y_test, train_parts, test_parts, num_classes,
                 rng, x_public, y_public)


def _classes(config, field: str, num_classes: int):
  """The classes listed in `config[field]` ("0-4", "1.3.5"), or None for all."""
  text = str(config.get(field, "")).strip()
  if not text:
    return None
  return tasks.parse_task(f"subset_{text}", num_classes, field).classes


def _rows_of_classes(labels: np.ndarray, classes) -> np.ndarray:
  return np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, classes))


def _finish(config, x_train, y_train, x_test, y_test, train_parts, test_parts, num_classes,
            rng, x_public=None, y_public=None) -> FederatedData:
  """Caps clients' data, filters it to their tasks, and builds the dataset. For the
  synthetic dataset the public/seed slice is held out here, from the clients' data."""
  if config.dataset == "synthetic" and config.get("public_size", 0):
    rows = partition.draw_examples(y_train, config.public_size, config.public_balanced,
                                   num_classes, np.random.default_rng([data_seed(config), 2]))
    train_parts = partition.remove_examples(train_parts, rows, "public_size")
    x_public, y_public = x_train[rows], y_train[rows]
  if config.get("client_max_examples", 0):
    cap = config.client_max_examples
    train_parts = [np.sort(rng.choice(p, cap, replace=False)) if len(p) > cap else p
                   for p in train_parts]
  client_tasks = tasks.client_tasks(config, num_classes, len(train_parts))
  if any(not np.all(np.asarray(t.label_map) >= 0) for t in client_tasks):
    # A client whose task is a subset of the classes holds only those classes' examples.
    in_task = lambda idx, labels, t: idx[np.asarray(t.label_map)[labels[idx]] >= 0]
    train_parts = [in_task(p, y_train, t) for p, t in zip(train_parts, client_tasks)]
    test_parts = [in_task(p, y_test, t) for p, t in zip(test_parts, client_tasks)]
    empty = [i for i, p in enumerate(train_parts) if len(p) == 0]
    if empty:
      raise ConfigError("client_tasks", f"clients {empty[:5]} have no training examples of "
                        "their task's classes; use a less skewed partition or other tasks")
  return from_client_lists(x_train, y_train, x_test, y_test, train_parts, test_parts,
                           num_classes, x_public, y_public)

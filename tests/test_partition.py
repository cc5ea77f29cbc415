"""Tests of fml_jax/data/partition.py: coverage, determinism, skew and errors."""

import numpy as np
import pytest

from fml_jax.data import partition
from fml_jax.errors import ConfigError


def balanced_labels(num_classes=10, per_class=100, seed=None):
  """`per_class` examples of each class, shuffled when `seed` is given."""
  labels = np.repeat(np.arange(num_classes), per_class)
  if seed is not None:
    labels = np.random.default_rng(seed).permutation(labels)
  return labels


def assert_exact_cover(parts, num_examples):
  """Every example in exactly one part; parts are sorted int arrays."""
  for p in parts:
    assert p.dtype.kind == "i"
    assert np.all(np.diff(p) > 0), "a part is not sorted or has duplicates"
  everything = np.sort(np.concatenate(parts))
  np.testing.assert_array_equal(everything, np.arange(num_examples))


def total_variation(p, q):
  return 0.5 * np.abs(p - q).sum()


def histogram(labels, num_classes):
  h = np.bincount(labels, minlength=num_classes).astype(np.float64)
  return h / h.sum()


def make_partition(kind, labels, num_clients, seed):
  rng = np.random.default_rng(seed)
  if kind == "iid":
    return partition.iid(len(labels), num_clients, rng)
  if kind == "dirichlet":
    return partition.dirichlet(labels, num_clients, 0.5, 5, rng)
  if kind == "shards":
    return partition.shards(labels, num_clients, 2, rng)
  raise AssertionError(kind)


# ---------------------------------------------------------------- all partitions


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("num_clients", [1, 5, 7])
def test_every_example_assigned_exactly_once(kind, num_clients):
  labels = balanced_labels(10, 97, seed=3)   # 970 examples: not divisible by 7 or 5*2
  parts = make_partition(kind, labels, num_clients, seed=0)
  assert len(parts) == num_clients
  assert_exact_cover(parts, len(labels))
  assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_same_seed_same_partition_other_seed_differs(kind):
  labels = balanced_labels(10, 100, seed=1)
  a = make_partition(kind, labels, 5, seed=42)
  b = make_partition(kind, labels, 5, seed=42)
  c = make_partition(kind, labels, 5, seed=43)
  assert len(a) == len(b) == len(c) == 5
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(pa, pb)
  assert any(len(pa) != len(pc) or not np.array_equal(pa, pc) for pa, pc in zip(a, c))


# ---------------------------------------------------------------------------- iid


@pytest.mark.parametrize("num_examples,num_clients", [(100, 10), (101, 10), (1000, 7), (5, 5)])
def test_iid_sizes_differ_by_at_most_one(num_examples, num_clients):
  parts = partition.iid(num_examples, num_clients, np.random.default_rng(0))
  sizes = np.array([len(p) for p in parts])
  assert sizes.sum() == num_examples
  assert sizes.max() - sizes.min() <= 1
  assert sizes.min() == num_examples // num_clients
  assert_exact_cover(parts, num_examples)


def test_iid_is_shuffled_not_contiguous():
  parts = partition.iid(1000, 4, np.random.default_rng(0))
  # A contiguous split would give client 0 exactly 0..249.
  assert not np.array_equal(parts[0], np.arange(250))
  # Every client spans most of the index range.
  for p in parts:
    assert p.min() < 50 and p.max() > 950


def test_iid_label_histograms_close_to_global():
  labels = balanced_labels(10, 1000, seed=0)
  parts = partition.iid(len(labels), 5, np.random.default_rng(0))
  glob = histogram(labels, 10)
  for p in parts:
    assert total_variation(histogram(labels[p], 10), glob) < 0.05


def test_iid_more_clients_than_examples_raises():
  with pytest.raises(ConfigError) as e:
    partition.iid(5, 6, np.random.default_rng(0))
  assert e.value.field == "num_clients"
  assert str(e.value).startswith("config.num_clients")
  assert "6 clients" in str(e.value) and "5 training" in str(e.value)


# ------------------------------------------------------------------------- shards


@pytest.mark.parametrize("num_clients", [5, 10])
def test_shards_each_client_has_at_most_shards_per_client_classes(num_clients):
  labels = balanced_labels(10, 100, seed=7)   # 10 classes x 100
  shards_per_client = 2
  # 5 clients -> 10 shards of 100 (one class each); 10 clients -> 20 shards of 50.
  parts = partition.shards(labels, num_clients, shards_per_client, np.random.default_rng(0))
  assert_exact_cover(parts, len(labels))
  sizes = {len(p) for p in parts}
  assert sizes == {len(labels) // num_clients}, "clients should be equally sized"
  classes_per_client = np.array([len(np.unique(labels[p])) for p in parts])
  assert classes_per_client.max() <= shards_per_client
  assert classes_per_client.min() >= 1
  # Each shard is a single class, so each client's class counts are multiples of a shard.
  shard_size = len(labels) // (num_clients * shards_per_client)
  for p in parts:
    counts = np.bincount(labels[p], minlength=10)
    assert np.all(counts % shard_size == 0)


def test_shards_mean_classes_close_to_shards_per_client():
  labels = balanced_labels(10, 100, seed=2)
  means = []
  for seed in range(20):
    parts = partition.shards(labels, 10, 2, np.random.default_rng(seed))
    means.append(np.mean([len(np.unique(labels[p])) for p in parts]))
  # Two random shards of 20 (2 per class) share a class with prob 1/19, so E ~ 1.95.
  assert 1.8 <= np.mean(means) <= 2.0
  assert all(m >= 1.5 for m in means)


def test_shards_three_per_client():
  labels = balanced_labels(10, 120, seed=4)   # 1200 = 10 clients x 3 shards x 40
  classes = []
  for seed in range(10):
    parts = partition.shards(labels, 10, 3, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels))
    assert all(len(p) == 120 for p in parts)
    classes += [len(np.unique(labels[p])) for p in parts]
  # 3 of 30 shards (3 per class): E[distinct classes] = 10 * (1 - C(27,3) / C(30,3)) ~ 2.80.
  assert max(classes) <= 3 and 2.6 < np.mean(classes) < 3.0


def test_shards_unequal_sizes_still_cover():
  labels = np.random.default_rng(0).integers(0, 10, 1003)
  parts = partition.shards(labels, 7, 3, np.random.default_rng(0))
  assert_exact_cover(parts, len(labels))
  sizes = np.array([len(p) for p in parts])
  # 21 shards of 47 or 48 examples, 3 per client.
  assert sizes.min() >= 3 * (1003 // 21) and sizes.max() <= 3 * (1003 // 21 + 1)


def test_shards_too_many_shards_raises():
  labels = balanced_labels(2, 5)
  with pytest.raises(ConfigError) as e:
    partition.shards(labels, 6, 2, np.random.default_rng(0))
  assert e.value.field == "shards_per_client"
  assert str(e.value).startswith("config.shards_per_client")
  assert "12 shards" in str(e.value)


# ---------------------------------------------------------------------- dirichlet


def test_dirichlet_huge_alpha_is_close_to_iid():
  labels = balanced_labels(10, 1000, seed=0)
  glob = histogram(labels, 10)
  parts = partition.dirichlet(labels, 5, 1e4, 10, np.random.default_rng(0))
  assert_exact_cover(parts, len(labels))
  for p in parts:
    assert total_variation(histogram(labels[p], 10), glob) < 0.05
  sizes = np.array([len(p) for p in parts])
  assert np.all(np.abs(sizes - 2000) < 200)


def test_dirichlet_small_alpha_is_skewed():
  labels = balanced_labels(10, 1000, seed=0)
  glob = histogram(labels, 10)
  parts = partition.dirichlet(labels, 5, 0.1, 10, np.random.default_rng(0))
  assert_exact_cover(parts, len(labels))
  tvs = [total_variation(histogram(labels[p], 10), glob) for p in parts]
  assert np.mean(tvs) > 0.4
  # Most clients miss some classes almost entirely.
  few = [np.sum(np.bincount(labels[p], minlength=10) < 20) for p in parts]
  assert np.mean(few) >= 3


def test_dirichlet_skew_decreases_with_alpha():
  labels = balanced_labels(10, 500, seed=0)
  glob = histogram(labels, 10)

  def mean_tv(alpha):
    tvs = []
    for seed in range(5):
      parts = partition.dirichlet(labels, 5, alpha, 1, np.random.default_rng(seed))
      tvs += [total_variation(histogram(labels[p], 10), glob) for p in parts]
    return np.mean(tvs)

  tv = [mean_tv(a) for a in (0.1, 1.0, 100.0)]
  assert tv[0] > tv[1] > tv[2]
  assert tv[2] < 0.1


@pytest.mark.parametrize("min_examples", [0, 1, 50, 150])
def test_dirichlet_min_examples_respected(min_examples):
  labels = balanced_labels(10, 100, seed=0)
  for seed in range(3):
    parts = partition.dirichlet(labels, 5, 0.5, min_examples, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= max(min_examples, 1)


def test_dirichlet_more_min_examples_than_data_raises():
  labels = balanced_labels(10, 10)   # 100 examples
  with pytest.raises(ConfigError) as e:
    partition.dirichlet(labels, 5, 0.5, 21, np.random.default_rng(0))
  assert e.value.field == "dirichlet_min_examples"
  assert str(e.value).startswith("config.dirichlet_min_examples")
  assert "100 training examples" in str(e.value)


def test_dirichlet_more_clients_than_examples_raises():
  labels = balanced_labels(2, 2)
  with pytest.raises(ConfigError) as e:
    partition.dirichlet(labels, 5, 0.5, 0, np.random.default_rng(0))
  assert str(e.value).startswith("config.dirichlet_min_examples")


def test_dirichlet_unreachable_min_examples_raises_naming_alpha():
  # 100 examples, 5 clients each needing 20: only an exactly equal split works,
  # which a skewed Dirichlet(0.01) never draws.
  labels = balanced_labels(10, 10)
  with pytest.raises(ConfigError) as e:
    partition.dirichlet(labels, 5, 0.01, 20, np.random.default_rng(0), max_attempts=50)
  assert e.value.field == "dirichlet_alpha"
  assert str(e.value).startswith("config.dirichlet_alpha")
  assert "50 draws" in str(e.value)


def test_dirichlet_noncontiguous_labels():
  # Classes need not be 0..K-1: labels 3, 7, 9 only.
  labels = np.random.default_rng(0).choice([3, 7, 9], 300)
  parts = partition.dirichlet(labels, 4, 1.0, 5, np.random.default_rng(0))
  assert_exact_cover(parts, 300)


# ------------------------------------------------------------ matching test split


def test_matching_test_split_follows_train_histograms():
  num_classes = 10
  train_labels = balanced_labels(num_classes, 1000, seed=0)
  parts = partition.dirichlet(train_labels, 5, 0.5, 10, np.random.default_rng(0))
  client_train = [train_labels[p] for p in parts]
  test_labels = balanced_labels(num_classes, 1000, seed=1)   # pools of 1000 per class
  splits = partition.matching_test_split(client_train, test_labels, num_classes,
                                         np.random.default_rng(0))
  assert len(splits) == 5
  total_train = len(train_labels)
  sizes = np.array([len(s) for s in splits])
  assert abs(sizes.sum() - len(test_labels)) <= len(splits)
  for y, s, size in zip(client_train, splits, sizes):
    # Split size proportional to the client's share of the training data.
    assert abs(size - len(test_labels) * len(y) / total_train) <= 1
    assert len(np.unique(s)) == len(s), "duplicates within a client"
    assert s.min() >= 0 and s.max() < len(test_labels)
    exact = size * np.bincount(y, minlength=num_classes) / len(y)
    counts = np.bincount(test_labels[s], minlength=num_classes)
    assert np.all(np.abs(counts - exact) < 1), (counts, exact)
    assert counts.sum() == size
    # Classes absent from the client's training data are absent from its test data.
    assert np.all(counts[np.bincount(y, minlength=num_classes) == 0] == 0)


def test_matching_test_split_deterministic_and_seeded():
  train_labels = balanced_labels(10, 100, seed=0)
  parts = partition.iid(len(train_labels), 4, np.random.default_rng(0))
  client_train = [train_labels[p] for p in parts]
  test_labels = balanced_labels(10, 100, seed=1)
  a = partition.matching_test_split(client_train, test_labels, 10, np.random.default_rng(5))
  b = partition.matching_test_split(client_train, test_labels, 10, np.random.default_rng(5))
  c = partition.matching_test_split(client_train, test_labels, 10, np.random.default_rng(6))
  for sa, sb in zip(a, b):
    np.testing.assert_array_equal(sa, sb)
  assert any(not np.array_equal(sa, sc) for sa, sc in zip(a, c))


def test_matching_test_split_small_pool_caps_without_duplicates():
  # One client all of class 0; the test set has only 3 examples of class 0.
  client_train = [np.zeros(50, np.int64), np.ones(50, np.int64)]
  test_labels = np.array([0, 0, 0] + [1] * 97)
  splits = partition.matching_test_split(client_train, test_labels, 2, np.random.default_rng(0))
  np.testing.assert_array_equal(splits[0], [0, 1, 2])
  assert len(splits[1]) == 50
  assert np.all(test_labels[splits[1]] == 1)
  assert len(np.unique(splits[1])) == 50


def test_matching_test_split_class_missing_from_test_set():
  client_train = [np.array([0, 0, 1, 1, 2, 2])]
  test_labels = np.array([0, 0, 0, 1, 1, 1])   # no class 2
  splits = partition.matching_test_split(client_train, test_labels, 3, np.random.default_rng(0))
  assert len(splits[0]) == 4   # 2 of class 0, 2 of class 1; class 2's 2 are unavailable
  np.testing.assert_array_equal(np.bincount(test_labels[splits[0]], minlength=3), [2, 2, 0])


def test_matching_test_split_tiny_client_gets_at_least_one():
  client_train = [np.zeros(1, np.int64), np.repeat(np.arange(10), 1000)]
  test_labels = balanced_labels(10, 10)
  splits = partition.matching_test_split(client_train, test_labels, 10, np.random.default_rng(0))
  assert len(splits[0]) == 1 and test_labels[splits[0][0]] == 0
  assert len(splits[1]) == 100


# ---------------------------------------------------------- partition vs dataset


@pytest.mark.parametrize("dataset,partition_name", [
    ("synthetic", "natural"), ("mnist", "iid"), ("mnist", "dirichlet"),
    ("cifar10", "shards")])
def test_check_partition_fits_dataset_accepts(dataset, partition_name):
  partition.check_partition_fits_dataset(dataset, partition_name)


@pytest.mark.parametrize("dataset,partition_name,needle", [
    ("synthetic", "iid", "use 'natural', not 'iid'"),
    ("synthetic", "dirichlet", "use 'natural', not 'dirichlet'"),
    ("synthetic", "shards", "use 'natural', not 'shards'"),
    ("mnist", "natural", "'natural' is only for dataset 'synthetic'"),
    ("cifar10", "natural", "for 'cifar10' choose one of iid, dirichlet, shards"),
])
def test_check_partition_fits_dataset_rejects(dataset, partition_name, needle):
  with pytest.raises(ConfigError) as e:
    partition.check_partition_fits_dataset(dataset, partition_name)
  assert e.value.field == "partition"
  assert str(e.value).startswith("config.partition: ")
  assert needle in str(e.value)


def niid_bench_reference(labels, num_clients, alpha, min_examples, rng):
  """NIID-Bench's capped Dirichlet split (FedMR's official code), restated plainly with
  the same random draws: per class, proportions ~ Dir(alpha), zeroed for clients that
  already hold N / num_clients examples, renormalized, cut by cumulative share."""
  n = len(labels)
  while True:
    parts = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.repeat(alpha, num_clients))
      p = np.array([q * (len(part) < n / num_clients) for q, part in zip(p, parts)])
      p = p / p.sum()
      cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
      parts = [part + piece.tolist() for part, piece in zip(parts, np.split(idx, cuts))]
    if min(len(part) for part in parts) >= min_examples:
      return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


def test_dirichlet_cap_is_niid_benchs_split():
  labels = balanced_labels(10, 200, seed=1)
  for seed in range(3):
    parts = partition.dirichlet(labels, 8, 0.3, 10, np.random.default_rng(seed), cap=True)
    assert_exact_cover(parts, len(labels))
    expected = niid_bench_reference(labels, 8, 0.3, 10, np.random.default_rng(seed))
    for got, want in zip(parts, expected):
      np.testing.assert_array_equal(got, want)
  # The cap bounds the largest client: over 20 draws, capped clients are smaller.
  largest = lambda cap: np.mean([max(len(p) for p in partition.dirichlet(
      labels, 8, 0.3, 1, np.random.default_rng(s), cap=cap)) for s in range(20)])
  assert largest(True) < largest(False)

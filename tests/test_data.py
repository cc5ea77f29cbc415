"""Tests of the data pipeline: synthetic generation, the federated tables, tfds loading."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_TFDS, requires_mnist, small_config
from fml_jax.data import federated, synthetic, tfds_source
from fml_jax.errors import ConfigError, DataError


def np_(x):
  return np.asarray(x)


# ---------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_dtypes():
  clients = synthetic.generate(8, 1.0, 1.0, seed=0, max_examples=300)
  assert len(clients.x) == len(clients.y) == 8
  for x, y in zip(clients.x, clients.y):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.ndim == 2 and x.shape[1] == synthetic.NUM_FEATURES == 60
    assert y.shape == (x.shape[0],)
    assert 50 <= len(y) <= 300   # lognormal + 50, capped
    assert y.min() >= 0 and y.max() < synthetic.NUM_CLASSES == 10
    assert np.all(np.isfinite(x))


def test_synthetic_deterministic_per_seed():
  a = synthetic.generate(5, 1.0, 1.0, seed=3, max_examples=200)
  b = synthetic.generate(5, 1.0, 1.0, seed=3, max_examples=200)
  c = synthetic.generate(5, 1.0, 1.0, seed=4, max_examples=200)
  for xa, xb, ya, yb in zip(a.x, b.x, a.y, b.y):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert any(xa.shape != xc.shape or not np.array_equal(xa, xc) for xa, xc in zip(a.x, c.x))


def test_synthetic_client_sizes_capped_and_heavy_tailed():
  uncapped = synthetic.client_sizes(1000, np.random.default_rng(0), 0)
  assert uncapped.dtype == np.int64
  assert uncapped.min() >= 50
  assert uncapped.max() > 5000          # lognormal(4, 2): a heavy tail
  assert 80 < np.median(uncapped) < 120  # exp(4) + 50 ~ 105
  capped = synthetic.client_sizes(1000, np.random.default_rng(0), 200)
  np.testing.assert_array_equal(capped, np.minimum(uncapped, 200))
  assert capped.max() == 200
  clients = synthetic.generate(30, 1.0, 1.0, seed=0, max_examples=120)
  sizes = np.array([len(y) for y in clients.y])
  np.testing.assert_array_equal(sizes, synthetic.client_sizes(30, np.random.default_rng(0), 120))
  assert sizes.max() == 120 and sizes.min() >= 50


def test_synthetic_feature_scales_follow_covariance():
  # x = v_k + diag(j^-0.6) * N(0, 1): within a client, feature j has variance j^-1.2.
  clients = synthetic.generate(3, 1.0, 1.0, seed=11, max_examples=0)
  x = max(clients.x, key=len)
  assert len(x) >= 200
  var = x.var(axis=0)
  expected = np.arange(1, 61, dtype=np.float64) ** -1.2
  np.testing.assert_allclose(var, expected, rtol=0.35)
  assert var[0] > 20 * var[-1]


def test_synthetic_is_non_iid():
  clients = synthetic.generate(30, 1.0, 1.0, seed=0, max_examples=500)
  hists = np.array([np.bincount(y, minlength=10) / len(y) for y in clients.y])
  majority_share = hists.max(axis=1)
  majority_class = hists.argmax(axis=1)
  assert majority_share.std() > 0.1
  assert majority_share.min() < 0.7 and majority_share.max() > 0.95
  assert len(np.unique(majority_class)) >= 5
  # Pairwise total variation between clients' label histograms is large on average.
  tv = 0.5 * np.abs(hists[:, None] - hists[None]).sum(-1)
  assert tv[np.triu_indices(30, 1)].mean() > 0.6


def test_synthetic_inputs_differ_more_with_beta():
  def spread(beta):
    c = synthetic.generate(20, 0.0, beta, seed=1, max_examples=100)
    return np.std([x.mean() for x in c.x])
  assert spread(0.0) < 0.5
  assert spread(5.0) > 2.0


# -------------------------------------------------------------- federated tables


@pytest.fixture(scope="module")
def synthetic_data():
  return federated.load_federated_data(small_config())


def test_synthetic_federated_tables_consistent(synthetic_data):
  d = synthetic_data
  config = small_config()
  assert d.num_clients == config.num_clients == 6
  assert d.num_classes == 10
  assert d.input_shape == (60,)
  assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
  assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
  assert d.input_mean == () and d.input_std == ()
  train_idx, train_n = np_(d.train_rows()), np_(d.train_n)
  test_idx, test_n = np_(d.test_rows()), np_(d.test_n)
  assert train_idx.dtype == np.int32 and train_n.dtype == np.int32
  assert train_idx.shape == (6, train_n.max()) and test_idx.shape == (6, test_n.max())
  n_train, n_test = d.x_train.shape[0], d.x_test.shape[0]
  assert train_n.sum() == n_train == d.y_train.shape[0]
  assert test_n.sum() == n_test == d.y_test.shape[0]
  seen = np.concatenate([row[:n] for row, n in zip(train_idx, train_n)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(n_train))
  seen_test = np.concatenate([row[:n] for row, n in zip(test_idx, test_n)])
  np.testing.assert_array_equal(np.sort(seen_test), np.arange(n_test))
  for row, n in zip(train_idx, train_n):
    assert np.all(row[n:] == 0), "padding is 0"
  for row, n in zip(test_idx, test_n):
    assert n >= 1 and np.all(row[:n] < n_test) and np.all(row[n:] == 0)


def test_synthetic_federated_matches_generator(synthetic_data):
  d = synthetic_data
  config = small_config()
  clients = synthetic.generate(config.num_clients, config.synthetic_alpha, config.synthetic_beta,
                               seed=config.seed, max_examples=config.synthetic_max_client_examples)
  x_train, x_test = np_(d.x_train), np_(d.x_test)
  y_train, y_test = np_(d.y_train), np_(d.y_test)
  for k, (x, y) in enumerate(zip(clients.x, clients.y)):
    n_tr, n_te = int(d.train_n[k]), int(d.test_n[k])
    assert n_tr + n_te == len(y)
    assert n_te == max(1, round(config.synthetic_test_fraction * len(y)))
    rows_tr = np_(d.train_rows()[k, :n_tr])
    rows_te = np_(d.test_rows()[k, :n_te])
    # The client's train and test examples together are exactly what it generated.
    got_x = np.concatenate([x_train[rows_tr], x_test[rows_te]])
    got_y = np.concatenate([y_train[rows_tr], y_test[rows_te]])
    order_got, order_want = np.lexsort(got_x.T), np.lexsort(x.T)
    np.testing.assert_array_equal(got_x[order_got], x[order_want])
    np.testing.assert_array_equal(got_y[order_got], y[order_want])


def test_synthetic_federated_deterministic():
  a = federated.load_federated_data(small_config(num_clients=3, clients_per_round=2))
  b = federated.load_federated_data(small_config(num_clients=3, clients_per_round=2))
  c = federated.load_federated_data(small_config(num_clients=3, clients_per_round=2, seed=1))
  np.testing.assert_array_equal(np_(a.x_train), np_(b.x_train))
  np.testing.assert_array_equal(np_(a.train_rows()), np_(b.train_rows()))
  np.testing.assert_array_equal(np_(a.y_test), np_(b.y_test))
  assert a.x_train.shape != c.x_train.shape or not np.array_equal(np_(a.x_train), np_(c.x_train))


def test_normalize_is_identity_for_float(synthetic_data):
  d = synthetic_data
  out = d.normalize(d.x_train)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(np_(out), np_(d.x_train))


def test_normalize_uint8_uses_channel_stats():
  x = np.array([[[[0, 255]], [[255, 0]]]], np.uint8)   # (1, 2, 1, 2): two channels
  d = federated.from_client_lists(x, np.zeros(1), x, np.zeros(1), [np.array([0])],
                                  [np.array([0])], 2)
  np.testing.assert_allclose(d.input_mean, (0.5, 0.5))
  np.testing.assert_allclose(d.input_std, (0.5, 0.5))
  out = np_(d.normalize(d.x_train))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[[-1, 1]], [[1, -1]]]], atol=1e-6)


def test_flat_index_rows_are_the_padded_table():
  parts = [np.array([3, 1, 4]), np.array([7]), np.array([], np.int64), np.array([9, 2])]
  flat, starts, counts = federated.flat_index(parts)
  assert flat.dtype == np.int32 and starts.dtype == np.int32 and counts.dtype == np.int32
  np.testing.assert_array_equal(flat, [3, 1, 4, 7, 9, 2])
  np.testing.assert_array_equal(starts, [0, 3, 4, 4])
  np.testing.assert_array_equal(counts, [3, 1, 0, 2])
  rows = federated.client_rows(jnp.asarray(flat), jnp.asarray(starts), jnp.asarray(counts),
                               None, 3)
  np.testing.assert_array_equal(rows, [[3, 1, 4], [7, 0, 0], [0, 0, 0], [9, 2, 0]])
  some = federated.client_rows(jnp.asarray(flat), jnp.asarray(starts), jnp.asarray(counts),
                               jnp.asarray([3, 0]), 3)
  np.testing.assert_array_equal(some, [[9, 2, 0], [3, 1, 4]])


def test_flat_index_all_empty_cuts_one_zero_column():
  flat, starts, counts = federated.flat_index([np.zeros(0, np.int64)] * 3)
  features = np.zeros((2, 4), np.float32)
  d = federated.from_client_lists(features, np.zeros(2), features, np.zeros(2),
                                  [np.zeros(0, np.int64)] * 3, [np.array([0, 1])] * 3, 2)
  assert flat.shape == (0,) and d.max_train == 1
  np.testing.assert_array_equal(d.train_rows(), np.zeros((3, 1)))
  np.testing.assert_array_equal(d.test_rows(jnp.asarray([1])), [[0, 1]])


def test_index_tables_cost_one_entry_per_example_when_sizes_are_skewed():
  """One client with 5,000 examples among 2,000 with 3: the tables hold the 11,000
  indices, not 2,001 rows padded to 5,000 (10 million entries)."""
  parts = [np.arange(5000)] + [np.arange(5000 + 3 * i, 5003 + 3 * i) for i in range(2000)]
  n = 5000 + 3 * 2000
  d = federated.from_client_lists(np.zeros((n, 2), np.float32), np.zeros(n),
                                  np.zeros((1, 2), np.float32), np.zeros(1), parts,
                                  [np.array([0])] * len(parts), 2)
  index_bytes = sum(x.nbytes for x in (d.train_flat, d.train_start, d.train_n))
  assert index_bytes == 4 * (n + 2 * len(parts))
  assert d.max_train == 5000 and d.min_train == 3
  rows = np.asarray(d.train_rows(jnp.asarray([0, 7])))
  assert rows.shape == (2, 5000)
  np.testing.assert_array_equal(rows[0], np.arange(5000))
  np.testing.assert_array_equal(rows[1, :3], [5018, 5019, 5020])
  assert not rows[1, 3:].any()


def test_partition_train_set_rejects_natural_for_images():
  config = small_config(dataset="mnist", partition="natural")
  with pytest.raises(ConfigError) as e:
    federated.partition_train_set(config, np.zeros(10, np.int64), np.random.default_rng(0))
  assert str(e.value).startswith("config.partition")
  with pytest.raises(ConfigError) as e:
    federated.load_federated_data(small_config(partition="iid"))   # synthetic + iid
  assert e.value.field == "partition"


# --------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_iid():
  return federated.load_federated_data(
      small_config(dataset="mnist", partition="iid", num_clients=10))


@requires_mnist
def test_mnist_arrays(mnist_iid):
  d = mnist_iid
  assert d.x_train.dtype == np.uint8 and d.x_test.dtype == np.uint8
  assert d.x_train.shape == (60000, 28, 28, 1)
  assert d.x_test.shape == (10000, 28, 28, 1)
  assert d.input_shape == (28, 28, 1)
  assert d.num_classes == 10
  y_train, y_test = np_(d.y_train), np_(d.y_test)
  np.testing.assert_array_equal(np.unique(y_train), np.arange(10))
  np.testing.assert_array_equal(np.unique(y_test), np.arange(10))
  assert np.bincount(y_train).min() > 5000   # every digit is well represented
  # The well-known MNIST pixel statistics.
  assert len(d.input_mean) == len(d.input_std) == 1
  assert d.input_mean[0] == pytest.approx(0.1307, abs=1e-3)
  assert d.input_std[0] == pytest.approx(0.3081, abs=1e-3)


@requires_mnist
def test_mnist_iid_tables(mnist_iid):
  d = mnist_iid
  train_n, test_n = np_(d.train_n), np_(d.test_n)
  np.testing.assert_array_equal(train_n, np.full(10, 6000))
  np.testing.assert_array_equal(test_n, np.full(10, 1000))
  train_idx = np_(d.train_rows())
  np.testing.assert_array_equal(np.sort(train_idx.ravel()), np.arange(60000))
  test_idx = np_(d.test_rows())
  for row in test_idx:
    assert len(np.unique(row)) == len(row)
    assert row.min() >= 0 and row.max() < 10000


@requires_mnist
def test_mnist_normalize_has_zero_mean_unit_std(mnist_iid):
  x = mnist_iid.normalize(mnist_iid.x_train)
  assert x.dtype == np.float32 and x.shape == (60000, 28, 28, 1)
  assert float(x.mean()) == pytest.approx(0.0, abs=1e-3)
  assert float(x.std()) == pytest.approx(1.0, abs=1e-3)


@requires_mnist
def test_mnist_dirichlet_test_splits_match_train_labels():
  config = small_config(dataset="mnist", partition="dirichlet", num_clients=10,
                        dirichlet_alpha=0.5)
  d = federated.load_federated_data(config)   # decoding is cached from mnist_iid
  y_train, y_test = np_(d.y_train), np_(d.y_test)
  train_n, test_n = np_(d.train_n), np_(d.test_n)
  assert train_n.sum() == 60000 and train_n.min() >= config.dirichlet_min_examples
  assert abs(test_n.sum() - 10000) <= 10
  pools = np.bincount(y_test, minlength=10)
  for k in range(10):
    y = y_train[np_(d.train_rows()[k, :train_n[k]])]
    t = y_test[np_(d.test_rows()[k, :test_n[k]])]
    assert abs(test_n[k] - 10000 * train_n[k] / 60000) <= 1
    exact = test_n[k] * np.bincount(y, minlength=10) / len(y)
    counts = np.bincount(t, minlength=10)
    # Within 1 of the exact proportion unless a class's test pool runs out.
    assert np.all((np.abs(counts - exact) < 1) | (counts == pools))
  # The partition is genuinely skewed: some client's majority class is > 30%.
  shares = [np.bincount(y_train[np_(d.train_rows()[k, :train_n[k]])], minlength=10).max() /
            train_n[k] for k in range(10)]
  assert max(shares) > 0.3


# --------------------------------------------------------------------- tfds errors


def test_missing_dataset_in_empty_data_dir(tmp_path):
  with pytest.raises(DataError) as e:
    tfds_source.load_image_dataset("mnist", str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg
  assert "config.data_dir" in msg and "TFDS_DATA_DIR" in msg
  assert "'mnist' is not prepared" in msg


def test_missing_dataset_through_load_federated_data(tmp_path):
  with pytest.raises(DataError) as e:
    federated.load_federated_data(
        small_config(dataset="cifar10", partition="iid", data_dir=str(tmp_path)))
  assert str(tmp_path) in str(e.value) and "cifar10" in str(e.value)


def test_empty_dataset_folder_is_not_prepared(tmp_path):
  (tmp_path / "mnist").mkdir()
  with pytest.raises(DataError) as e:
    tfds_source.load_image_dataset("mnist", str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg and "not prepared" in msg and "TFDS_DATA_DIR" in msg


def test_missing_dataset_names_env_var_source(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert tfds_source.resolve_data_dir("") == (
      str(tmp_path), "the TFDS_DATA_DIR environment variable")
  with pytest.raises(DataError) as e:
    tfds_source.load_image_dataset("mnist", "")
  assert str(tmp_path) in str(e.value)
  assert "TFDS_DATA_DIR environment variable" in str(e.value)


def test_resolve_data_dir_prefers_config_and_expands_user(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/elsewhere")
  monkeypatch.setenv("HOME", "/home/someone")
  assert tfds_source.resolve_data_dir("~/tfds") == ("/home/someone/tfds", "config.data_dir")


def test_unknown_dataset_name():
  with pytest.raises(DataError) as e:
    tfds_source.load_image_dataset("no_such_dataset_xyz", SHARED_TFDS)
  assert "unknown dataset" in str(e.value)
  assert "no_such_dataset_xyz" in str(e.value)
  with pytest.raises(DataError) as e:
    federated.load_federated_data(small_config(dataset="no_such_dataset_xyz", partition="iid"))
  assert "unknown dataset" in str(e.value)


def test_errors_are_not_cached(tmp_path):
  # load_image_dataset is lru_cached, but a failed call must not poison later ones.
  before = tfds_source.load_image_dataset.cache_info()
  for _ in range(2):
    with pytest.raises(DataError):
      tfds_source.load_image_dataset("mnist", str(tmp_path))
  after = tfds_source.load_image_dataset.cache_info()
  assert after.currsize == before.currsize
  assert after.misses == before.misses + 2 and after.hits == before.hits


# ------------------------------------------------------------ decoded-dataset cache


@requires_mnist
def test_decoded_dataset_is_kept_on_disk_and_read_back(tmp_path, monkeypatch):
  # Decoding is replaced by a small fake that counts its calls (the real one takes
  # 14 s for MNIST); what the cache stores and returns is the decoder's output.
  calls = []

  def fake_decode(source, label_key="label"):
    calls.append(len(source))
    rng = np.random.default_rng(len(calls))
    return rng.integers(0, 255, (5, 28, 28, 1), np.uint8), rng.integers(0, 10, 5).astype(np.int32)

  monkeypatch.setattr(tfds_source, "_decode_split", fake_decode)
  monkeypatch.setenv("FML_JAX_DATA_CACHE", str(tmp_path / "cache"))
  load = tfds_source.load_image_dataset.__wrapped__   # past the per-process lru_cache
  first = load("mnist", SHARED_TFDS)
  assert len(calls) == 2 and len(list((tmp_path / "cache").glob("mnist-*.npz"))) == 1
  second = load("mnist", SHARED_TFDS)
  assert len(calls) == 2   # read back, not decoded
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(second, field), getattr(first, field))
    assert getattr(second, field).dtype == getattr(first, field).dtype
  assert second.num_classes == first.num_classes == 10
  # A damaged entry is decoded again and replaced; nothing half-written is left.
  [entry] = (tmp_path / "cache").glob("mnist-*.npz")
  entry.write_bytes(b"not an npz")
  load("mnist", SHARED_TFDS)
  assert len(calls) == 4 and load("mnist", SHARED_TFDS) is not None and len(calls) == 4
  assert not list((tmp_path / "cache").glob("*.tmp"))
  # FML_JAX_DATA_CACHE=off: decoded every time, nothing written.
  monkeypatch.setenv("FML_JAX_DATA_CACHE", "off")
  load("mnist", SHARED_TFDS)
  load("mnist", SHARED_TFDS)
  assert len(calls) == 8


def test_decoded_cache_key_follows_the_prepared_files(tmp_path, monkeypatch):
  monkeypatch.setenv("FML_JAX_DATA_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "mnist" / "3.0.1"
  folder.mkdir(parents=True)
  (folder / "mnist-train.array_record-00000-of-00001").write_bytes(b"x" * 10)
  key = tfds_source._cache_file("mnist", tmp_path / "mnist")
  assert key.parent == tmp_path / "cache" and key.name.startswith("mnist-")
  assert tfds_source._cache_file("mnist", tmp_path / "mnist") == key
  (folder / "mnist-train.array_record-00000-of-00001").write_bytes(b"x" * 11)   # re-prepared
  assert tfds_source._cache_file("mnist", tmp_path / "mnist") != key

"""Shared test settings: small configs, and where the prepared tfds datasets are."""

import gc
import os
from pathlib import Path

# The tests compile thousands of small programs and run each briefly, so LLVM's
# optimizations cost far more than they save: without them XLA:CPU compiles about twice
# as fast, and XLA:CPU's older (non-MLIR) fusion emitters compile a FedMD round in 40%
# less time again (benchmarks/RESULTS.md, "The test suite's time"). Set before JAX
# starts its backend; subprocesses inherit it.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax
import jax.numpy as jnp
import pytest

from fml_jax import settings
from fml_jax.configs import default

REPO = Path(__file__).resolve().parents[1]
# CI sets TFDS_DATA_DIR=../shared/tfds; fall back to that location for local runs.
SHARED_TFDS = os.environ.get("TFDS_DATA_DIR") or str(REPO.parent / "shared" / "tfds")


# Many tests build runners for the same shapes; XLA's persistent cache keys compiled
# programs by their HLO, so each distinct program compiles once per test session
# (compiling dominates these tests on a small CPU). Subprocesses share the folder.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "fml_jax" / "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:   # not Linux: nothing to watch
    return 0


def _map_limit() -> int:
  try:
    return int(open("/proc/sys/vm/max_map_count").read())
  except (OSError, ValueError):
    return 65530


_RUNNERS = {}


def make_runner(config, strategy, placement="device"):
  """Runners are cached per (config, strategy, placement): each one compiles its own
  functions, and compiling dominates these tests' time on a small CPU."""
  from fml_jax.algorithms import build_algorithm   # pylint: disable=g-import-not-at-top
  from fml_jax.data import load_federated_data   # pylint: disable=g-import-not-at-top
  from fml_jax.rounds import Runner   # pylint: disable=g-import-not-at-top
  # A runner does not depend on the seed (runner.init(seed) takes it) unless the data
  # does (data_seed -1 follows the seed): runs that differ only in seed share one.
  keyed = config
  if config.get("data_seed", -1) != -1:
    keyed = config.copy_and_resolve_references()
    keyed.seed = 0
  key = (str(keyed), strategy, placement)
  if key not in _RUNNERS:
    data = load_federated_data(config)
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    _RUNNERS[key] = Runner(algorithm, data, config.clients_per_round, config.aggregation,
                           strategy, chunk_size=config.chunk_size, placement=placement)
  return _RUNNERS[key]


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Every program XLA:CPU compiles keeps a few memory mappings while it is alive, and
  the whole suite compiles thousands: past the kernel's vm.max_map_count (65530 here)
  the next mmap fails and the process dies with a segmentation fault inside XLA. When
  the mappings pass half the limit, drop the cached runners and JAX's compiled
  programs (a later test that needs one reloads it from the persistent cache)."""
  yield
  if _mapped_regions() > _map_limit() // 2:
    _RUNNERS.clear()
    jax.clear_caches()
    gc.collect()


def has_tfds_dataset(name: str) -> bool:
  return (Path(SHARED_TFDS) / name).is_dir()


requires_mnist = pytest.mark.skipif(
    not has_tfds_dataset("mnist"), reason=f"mnist is not prepared in {SHARED_TFDS}")
requires_cifar10 = pytest.mark.skipif(
    not has_tfds_dataset("cifar10"), reason=f"cifar10 is not prepared in {SHARED_TFDS}")


def sgd_with_class_sums(loss_and_rows, params, client, data, config, num_classes, width):
  """A client's local epochs of plain SGD (at config.learning_rate) restated: each step
  takes the gradient of `loss_and_rows(params, x, y, mask, key) -> (loss, (B, width)
  rows)` and sums the valid rows per class. Returns (params, (C, width) sums, (C,) counts)."""
  from fml_jax import local_training   # pylint: disable=g-import-not-at-top

  def step(carry, xb, yb, mask, key):
    p, sums, counts = carry
    grads, rows = jax.grad(lambda q: loss_and_rows(q, xb, yb, mask, key), has_aux=True)(p)
    onehot = jax.nn.one_hot(yb, num_classes) * mask[:, None]
    return (jax.tree.map(lambda w, g: w - config.learning_rate * g, p, grads),
            sums + onehot.T @ rows, counts + onehot.sum(0)), {}

  start = (params, jnp.zeros((num_classes, width)), jnp.zeros(num_classes))
  return local_training.run_local_steps(step, start, data, client.train_idx, client.train_n,
                                        client.key, config.local_epochs, config.batch_size,
                                        min_examples=data.min_train)[0]


def client_row(tree, i):
  """Client i's entry of a stacked (cohort or population) tree, as a single client's."""
  return jax.tree.map(lambda x: jnp.asarray(x)[i], tree)


def small_config(**overrides):
  """The default config shrunk for tests (synthetic data, few clients, few rounds).
  Section fields as `fml__alpha=0.3` (fml_jax.settings.apply_overrides)."""
  c = default.get_config()
  c.num_clients = 6
  c.clients_per_round = 4
  c.num_rounds = 2
  c.local_epochs = 2
  c.batch_size = 16
  c.synthetic_max_client_examples = 120
  c.data_dir = SHARED_TFDS
  return settings.apply_overrides(c, overrides)


MAX_WORKERS = 4   # each worker holds a few GiB of compiled programs and data


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker more than cores, at most MAX_WORKERS. Workers
  also wait (on subprocesses, files, the end of another's long file), so a third
  worker on the 2-core machine fills some of those gaps; four were slower. The runs
  and why the gain is not established: benchmarks/RESULTS.md, "The test suite's time"."""
  del config
  return max(1, min(MAX_WORKERS, (os.cpu_count() or 1) + 1))


# The longest files first, so that with several workers (pytest.ini) none of them is
# left alone at the end with a long one.
LONGEST_FIRST = ("test_multiprocess.py", "test_accelerator_suite.py", "test_sharding.py",
                 "test_bad_input.py",
                 "test_rounds.py", "test_end_to_end.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

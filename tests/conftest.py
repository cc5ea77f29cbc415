"""Shared test settings: small configs, and where the prepared tfds datasets are."""

import os
from pathlib import Path

import jax
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


def has_tfds_dataset(name: str) -> bool:
  return (Path(SHARED_TFDS) / name).is_dir()


requires_mnist = pytest.mark.skipif(
    not has_tfds_dataset("mnist"), reason=f"mnist is not prepared in {SHARED_TFDS}")


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

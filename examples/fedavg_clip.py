r"""A method defined outside fml_jax: FedAvg whose clients clip their update's norm.

Run it without touching the package (this file is both the algorithm and a config):

  python -m fml_jax.main --config=examples/fedavg_clip.py --workdir=/tmp/fedavg_clip \
      --config.fedavg_clip.max_norm=0.5

or name the class on any config: `--config.algorithm=examples.fedavg_clip:FedAvgClip`
(its module must be importable: run from the repository root, install it, or put it on
PYTHONPATH). What a class must provide is in fml_jax/rounds/algorithm.py; the
registry-driven tests run it like the built-in ones (tests/test_extending.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fml_jax import settings
from fml_jax.algorithms.fedavg import FedAvg
from fml_jax.configs import default


class FedAvgClip(FedAvg):
  """FedAvg; each client's update (its model minus the global one) is scaled down to
  at most `fedavg_clip.max_norm` in L2 norm before it is uploaded."""
  name = "fedavg_clip"
  config_section = "fedavg_clip"

  @classmethod
  def defaults(cls):
    return {"max_norm": 1.0}

  @classmethod
  def check_config(cls, config):
    settings.number(config, "fedavg_clip.max_norm", 0, low_open=True)

  @classmethod
  def small_overrides(cls):
    return {"fedavg_clip.max_norm": 0.05}   # small enough that clipping happens

  def client_update(self, server_state, client_state, client, data, group):
    result = super().client_update(server_state, client_state, client, data, group)
    delta = jax.tree.map(jnp.subtract, result.upload, server_state["params"])
    norm = optax.tree.norm(delta)
    scale = jnp.minimum(1.0, self.settings.max_norm / jnp.maximum(norm, 1e-12))
    upload = jax.tree.map(lambda g, d: g + scale * d, server_state["params"], delta)
    return result.replace(upload=upload,
                          metrics={**result.metrics, "update_norm": norm,
                                   "clipped": (norm > self.settings.max_norm).astype(jnp.float32)})


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.algorithm = "examples.fedavg_clip:FedAvgClip"   # importable from the repository root
  c[FedAvgClip.config_section] = ml_collections.ConfigDict(FedAvgClip.defaults())
  return c

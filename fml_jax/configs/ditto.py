r"""Ditto on the same MNIST split as fml.py: a personal model per client beside FedAvg's.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/ditto.py --workdir=/tmp/ditto_mnist

`ditto.lam` is the proximal weight (PFLlib's -mu; default 0.1), `ditto.personal_epochs`
the personal model's epochs per round (PFLlib's -pls, 1).
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "ditto"
  return c

r"""Local-only training (no communication: the lower bound), on the same MNIST split as fml.py.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/local.py --workdir=/tmp/local_mnist
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "local"
  return c

r"""FedProx: FedAvg plus (mu / 2) * ||w - w_global||^2, on the same MNIST split as fml.py.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedprox.py --workdir=/tmp/fedprox_mnist
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "fedprox"
  c.fedprox.mu = 0.01
  return c

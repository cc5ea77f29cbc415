r"""FedAvg (example-weighted averaging), on the same MNIST split as fml.py.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedavg.py --workdir=/tmp/fedavg_mnist
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "fedavg"
  return c

r"""SCAFFOLD (option II) on the same MNIST split as fml.py, with PFLlib's local optimizer:
plain SGD (no momentum, no weight decay), which option II's control variates assume.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/scaffold.py --workdir=/tmp/scaffold_mnist

The server learning rate is `server.learning_rate` (PFLlib's -slr, default 1.0).
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "scaffold"
  c.momentum = 0.0
  c.weight_decay = 0.0
  return c

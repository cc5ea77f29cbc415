r"""FedRep on the same MNIST split as fml.py: a shared body, a personal head per client.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedrep.py --workdir=/tmp/fedrep_mnist

`fedrep.head_epochs` (PFLlib's -pls, 1) trains the head, then `local_epochs` the body.
The original code's split is --config.local_epochs=1 --config.fedrep.head_epochs=9.
"""

from fml_jax.configs import fml


def get_config():
  c = fml.get_config()
  c.algorithm = "fedrep"
  return c

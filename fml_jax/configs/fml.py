r"""FML on MNIST, 10 clients with Dirichlet(0.5) label skew, every client every round.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fml.py --workdir=/tmp/fml_mnist

The official FML setup uses the CNN, 5 local epochs and batch 128; we default to
the MLP so the run takes minutes on a CPU (add --config.model=cnn for the CNN).
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fml"
  c.dataset = "mnist"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.num_clients = 10
  c.clients_per_round = 10
  c.num_rounds = 20
  c.local_epochs = 1
  c.batch_size = 64
  return c

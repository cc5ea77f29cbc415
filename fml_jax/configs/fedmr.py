r"""FedMR with the official defaults, on CIFAR-10 from a prepared tfds data_dir.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedmr.py --workdir=/tmp/fedmr_cifar10

Official defaults (ALGORITHMS.md): 100 clients, 10 per round, 500 rounds,
Dirichlet(0.5) label skew, 5 local epochs, batch 50, SGD lr 0.01 momentum 0.5,
recombination per tensor from the first round (first-stage bound 0), a
LeNet-style CNN. On MNIST instead: add --config.dataset=mnist. The comparison
runs with FedAvg/FedProx use the same file with --config.algorithm=fedavg|fedprox.
CIFAR-10 here is a seeded re-split of 59,839 images (see ../shared/README.md), so
accuracies compare in trend, not to the decimal, with the paper's.
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fedmr"
  c.dataset = "cifar10"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.model = "lenet5"
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 500
  c.local_epochs = 5
  c.batch_size = 50
  c.optimizer = "sgd"
  c.learning_rate = 0.01
  c.momentum = 0.5
  c.weight_decay = 0.0
  c.fedmr.first_stage_rounds = 0
  c.fedmr.granularity = "tensor"
  c.fedmr.optimizer_state = "reset"
  c.eval_every = 10
  return c

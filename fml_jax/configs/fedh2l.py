r"""FedH2L: decentralized mutual distillation on a shared seed set, on MNIST.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedh2l.py --workdir=/tmp/fedh2l

10 participants with three architectures (round-robin), Dirichlet(0.1) label
skew, a class-balanced seed set of 500 training images held out of every
participant's data; each round every participant sends its posteriors on the
seed set to all others (`fedh2l.topology=full`; also ring, random_k) and trains on
its data plus a KL toward its peers' mean posterior. The paper's exact objective
could not be read: WORKSPACE.md lists what we assumed. Reported:
`client_global_test_acc_mean`, each participant's model on the whole test set
(what FedH2L aims at), and bytes sent per round.
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fedh2l"
  c.dataset = "mnist"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.1
  c.num_clients = 10
  c.clients_per_round = 10
  c.client_max_examples = 300
  c.local_models = "mlp_small,mlp,lenet5"
  c.public_size = 500
  c.public_balanced = True
  c.fedh2l.topology = "full"
  c.fedh2l.distill_weight = 1.0
  c.fedh2l.temperature = 1.0
  c.fedh2l.seed_ce = False
  c.num_rounds = 20
  c.local_epochs = 2
  c.batch_size = 32
  return c

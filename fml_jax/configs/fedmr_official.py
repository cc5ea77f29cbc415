r"""FedMR in its official regime (Hu et al., ALGORITHMS.md), at a size a CPU trains.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedmr_official.py --workdir=/tmp/fedmr_official

The official code's defaults: 100 clients, 10% sampled per round, Dirichlet(0.5) label
skew drawn with NIID-Bench's cap (a client holding N / 100 examples takes no more
classes: `dirichlet_cap`) and at least 10 examples per client, 5 local epochs,
batch 50, SGD lr 0.01 momentum 0.5, per-tensor recombination from the first round,
models averaged uniformly. The model here is the official `CNNCifar` (`cnn_cifar`).
The paper's larger models carry batch norm, whose running statistics are recombined
with the parameters (fml_jax/algorithms/batch_norm.py): on an accelerator use
--config.model=resnet20 (the official default model) or --config.model=vgg16_bn,
with --config.fedmr.first_stage_rounds=50 for VGG (the official README's advice).

The paper runs 500 rounds; this file runs 100 (--config.num_rounds=500 for the
paper's). The paired comparison with FedAvg (same file, --config.algorithm=fedavg),
what it reaches and its seconds per round on a 2-core CPU: experiments/RESULTS.md,
"The authors' regimes" (`python experiments/run.py official`).
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fedmr"
  c.dataset = "cifar10"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.dirichlet_cap = True
  c.dirichlet_min_examples = 10
  c.model = "cnn_cifar"
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 100
  c.local_epochs = 5
  c.batch_size = 50
  c.optimizer = "sgd"
  c.learning_rate = 0.01
  c.momentum = 0.5
  c.weight_decay = 0.0
  c.aggregation = "uniform"
  c.augment = "none"               # the official code does not (utils/get_dataset.py)
  c.fedmr.first_stage_rounds = 0
  c.fedmr.granularity = "tensor"
  c.fedmr.optimizer_state = "reset"
  c.eval_every = 10
  return c

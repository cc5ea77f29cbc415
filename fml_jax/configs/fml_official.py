r"""FML in the official code's regime (ZJU-DAI/Federated-Mutual-Learning, ALGORITHMS.md).

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fml_official.py --workdir=/tmp/fml_official_cifar10

The official code's HEAD: 5 clients, every client every round, 50 rounds, 5 local
epochs, batch 128, SGD lr 0.01 momentum 0.9 weight decay 5e-4 for both models,
learning rate x0.1 at rounds int(50 / 3) = 16, 32 and 48 (`lr_schedule=fml_official`),
alpha = beta = 0.5, its small CNN (`fml_cnn`) as meme and local model, an IID split
into equal chunks, random crop (padding 4) and flip on CIFAR (`augment=auto`), memes
averaged uniformly. It reports each client's local model on the WHOLE test set
(`client_global_test_acc_*`, on here through eval_clients_on_global_test) and the
merged model on the test set after every round; the per-client-split metric
(`local_test_acc_*`, PFLlib's) is reported beside it. The FedAvg baseline of the
official code is the same file with --config.algorithm=fedavg (it also merges
uniformly: aggregation=uniform here).

On MNIST add --config.dataset=mnist (no augmentation there). What it reaches, and
the paired multi-seed comparison with FedAvg: experiments/RESULTS.md, "The authors'
regimes" (`python experiments/run.py official`), with the wall time of each run on a
2-core CPU, which runs the regime cut (1,000 examples per client, 10-20 rounds); an
accelerator runs this file as it is.
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fml"
  c.dataset = "cifar10"
  c.partition = "iid"
  c.num_clients = 5
  c.clients_per_round = 5
  c.num_rounds = 50
  c.local_epochs = 5
  c.batch_size = 128
  c.model = "fml_cnn"
  c.local_models = ""              # the local model is the same CNN
  c.optimizer = "sgd"
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "fml_official"   # x0.1 at rounds 16, 32, 48
  c.augment = "auto"               # crop_flip on CIFAR-10, none on MNIST
  c.aggregation = "uniform"        # the official merge, for FML and FedAvg alike
  c.fml.alpha = 0.5
  c.fml.beta = 0.5
  c.eval_clients_on_global_test = True   # the official "local" metric
  c.eval_every = 1
  return c

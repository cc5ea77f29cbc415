r"""FedMD, the official protocol with the data available offline.

  TFDS_DATA_DIR=../shared/tfds python -m fml_jax.main \
      --config=fml_jax/configs/fedmd.py --workdir=/tmp/fedmd

The official setup: 10 parties with the 10 CNNs of its table (`fedmd_p0..p9`), a
public set (MNIST) whose classes come first, private data of other classes
(FEMNIST letters, relabelled 10-15), transfer learning, then rounds of alignment
(5,000 public examples) -> consensus of logits -> digest (L1, 1 epoch, batch 256)
-> revisit, all with Adam 1e-3.

FEMNIST is not available here, so the same structure is built from MNIST: the
public set is 10,000 training images of digits 0-4 held out of the train split,
each party's private data are a few images of digits 5-9 (Dirichlet(0.5) label
skew, at most 100 per party); the models output 10 classes, public classes first
as in the official code. `bounds.json` holds the two reference points: each party
after transfer learning alone, and with every party's private data pooled.

The full-size CNNs cost hours on a 2-core CPU; there, run the same family with
1/8 of the filters (minutes):

  ... --config.local_models=fedmd_small_p0,fedmd_small_p1,fedmd_small_p2,\
fedmd_small_p3,fedmd_small_p4,fedmd_small_p5,fedmd_small_p6,fedmd_small_p7,\
fedmd_small_p8,fedmd_small_p9
"""

from fml_jax.configs import default


def get_config():
  c = default.get_config()
  c.algorithm = "fedmd"
  c.dataset = "mnist"
  c.public_size = 10000
  c.public_classes = "0-4"
  c.private_classes = "5-9"
  c.partition = "dirichlet"
  c.dirichlet_alpha = 0.5
  c.dirichlet_min_examples = 10
  c.client_max_examples = 100
  c.num_clients = 10
  c.clients_per_round = 10
  c.local_models = ",".join(f"fedmd_p{i}" for i in range(10))
  c.model = "mlp"                 # unused: FedMD has no global model
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.momentum = 0.0
  c.weight_decay = 0.0
  c.fedmd.public_epochs = 20      # official: up to 20, early stopping
  c.fedmd.private_epochs = 25     # official: up to 25
  c.fedmd.early_stopping = True
  c.batch_size = 32               # private training (official: 32; revisit 5-10)
  c.local_epochs = 4              # revisit epochs per round (official: 2-10)
  c.fedmd.alignment_size = 5000
  c.fedmd.digest_loss = "l1"
  c.fedmd.digest_epochs = 1
  c.fedmd.digest_batch_size = 256
  c.num_rounds = 15               # official: 13-20
  c.eval_every = 1
  return c

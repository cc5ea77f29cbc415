r"""FML on FedProx's Synthetic(1, 1): runs anywhere, no download.

  python -m fml_jax.main --config=fml_jax/configs/default.py --workdir=/tmp/fml_default

Every other config starts from this one; override any field on the command line,
e.g. `--config.num_rounds=50 --config.strategy=vmap`. On this repository's 2-core
CPU it takes about a minute and reaches roughly 0.7 global and 0.9 personalized
test accuracy (see README.md for measured numbers).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to run.
  c.algorithm = "fml"             # fml | fedavg | fedprox | local | fedmr | fedmd | fedh2l
  c.seed = 0
  # Data.
  c.dataset = "synthetic"         # synthetic, or a tfds name (mnist, cifar10, ...)
  c.data_dir = ""                 # tfds data_dir; "" = $TFDS_DATA_DIR, then tfds's default
  c.partition = "natural"         # natural (synthetic only) | iid | dirichlet | shards
  c.dirichlet_alpha = 0.5
  c.dirichlet_min_examples = 10   # redraw a Dirichlet split until every client has this many
  c.shards_per_client = 2
  c.client_max_examples = 0       # keep at most this many training examples per client (0: all)
  c.synthetic_alpha = 1.0         # Synthetic(a, b): spread of the clients' models
  c.synthetic_beta = 1.0          # ... and of their inputs
  c.synthetic_test_fraction = 0.2 # each synthetic client's held-out share
  c.synthetic_max_client_examples = 2000  # cap on the heavy-tailed client sizes (0: none)
  # Models.
  c.model = "mlp"                 # global / meme model: logreg | mlp | cnn | lenet5 | ...
  # Clients' private models (FML's local, local-only, FedMD's and FedH2L's parties):
  # comma-separated, assigned round-robin (num_clients entries: one per client);
  # "" = same as model. Each distinct (model, task) is an architecture group.
  c.local_models = ""
  c.catfish_clients = ""          # FML: e.g. "0": these clients' local model is catfish_model
  c.catfish_model = "cnn"
  c.client_tasks = ""             # FML/local: tasks, assigned like local_models; "" = all full.
                                  # full | parity | subset_0-4 | subset_1.3 | coarse_0.0.1.1...
  # Federation.
  c.num_clients = 30
  c.clients_per_round = 10
  c.num_rounds = 30
  c.aggregation = "auto"          # auto (fml: uniform, fedavg/fedprox: weighted) | uniform | weighted
  # Local training.
  c.local_epochs = 2
  c.batch_size = 32
  c.optimizer = "sgd"             # sgd | adam (PyTorch semantics: weight decay is L2 on the gradient)
  c.learning_rate = 0.01
  c.momentum = 0.9                # sgd only
  c.weight_decay = 5e-4
  # Algorithm settings.
  c.alpha = 0.5                   # FML: weight of CE in the local model's loss
  c.beta = 0.5                    # FML: weight of CE in the meme's loss
  c.temperature = 1.0             # FML: softmax temperature of the KL terms
  # FML dynamic balance: "" constant | official (step schedule) | "0:0.1,10:0.5" piecewise
  c.alpha_schedule = ""
  c.beta_schedule = ""
  c.lr_schedule = ""              # a learning-rate factor, same forms
  c.schedule_step_rounds = 10     # official schedule: a step every N rounds ...
  c.schedule_stop_round = 30      # ... while the round is below this
  c.prox_mu = 0.01                # FedProx: proximal weight
  c.fedmr_first_stage_rounds = 0  # FedMR: rounds of plain averaging before recombination
  c.fedmr_granularity = "tensor"  # FedMR: tensor | layer (kernel with bias) | block
  c.fedmr_block_fraction = 0.25   # FedMR, block granularity: share of the layers per block
  c.fedmr_optimizer_state = "reset"  # FedMR: reset | keep | recombine (moves with its layers)
  # Public data (FedMD's public set, FedH2L's seed set).
  c.public_dataset = ""           # "" = a held-out slice of the train split; or a tfds name
  c.public_size = 0               # held-out examples (0: none); with public_dataset: 0 = all
  c.public_balanced = True        # draw the held-out slice with equal counts per class
  c.public_classes = ""           # the held-out slice from these classes only ("" all), e.g. "0-4"
  c.private_classes = ""          # FedMD: private data restricted to these classes ("" all),
                                  # e.g. "0-4" or "1.3.5"; relabelled after the public classes
                                  # when public_dataset is another dataset
  # FedMD.
  c.fedmd_public_epochs = 5       # transfer learning on the public set ...
  c.fedmd_private_epochs = 5      # ... then on each party's private data
  c.fedmd_early_stopping = True   # keep each party's best public epoch (10% of public held out)
  c.fedmd_alignment_size = 5000   # public examples drawn (stratified) each round
  c.fedmd_digest_loss = "l1"      # l1 (official: mean absolute error on logits) | kl
  c.fedmd_digest_temperature = 1.0  # kl only
  c.fedmd_digest_epochs = 1
  c.fedmd_digest_batch_size = 256
  c.fedmd_report_bounds = True    # also train the pooled-private-data bound (bounds.json)
  # FedH2L (decentralized mutual distillation on the seed set).
  c.h2l_topology = "full"         # full | ring | random_k (peers redrawn each round)
  c.h2l_peers = 2                 # random_k: peers per participant
  c.h2l_distill_weight = 1.0      # weight of the KL toward the peers' posteriors
  c.h2l_temperature = 1.0
  c.h2l_seed_ce = False           # also cross-entropy on the seed set's labels
  # Execution and reporting.
  c.strategy = "auto"             # auto | vmap | chunked | sequential
  c.chunk_size = 16               # chunked: clients vmapped at once (lax.map over the chunks)
  c.mesh_shape = 1                # devices the client axis is sharded over (0: all devices)
  c.placement = "device"          # where every client's state lives: device | host (moved per
                                  # round: for populations bigger than the accelerator's memory)
  c.eval_every = 1                # evaluate (and write a metrics line) every N rounds
  c.eval_clients_on_global_test = False  # also each client's own model on the whole test set
                                         # (always on for fedmd and fedh2l)
  c.checkpoint_every = 10         # save the round state every N rounds (and at the end); 0: never
  c.checkpoints_to_keep = 2
  return c

r"""FML on FedProx's Synthetic(1, 1): runs anywhere, no download.

  python -m fml_jax.main --config=fml_jax/configs/default.py --workdir=/tmp/fml_default

Every other config starts from this one; override any field on the command line,
e.g. `--config.num_rounds=50 --config.strategy=vmap`. On this repository's 2-core
CPU it takes about a minute and reaches roughly 0.7 global and 0.9 personalized
test accuracy (see README.md for measured numbers).
"""

import ml_collections

from fml_jax import algorithms
from fml_jax.algorithms import aggregation


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to run.
  c.algorithm = "fml"             # fml | fedavg | fedprox | local | fedmr | fedmd | fedh2l |
                                  # scaffold | ditto | fedrep,
                                  # or your own class as my_module:MyAlgorithm
  c.seed = 0
  # Replicas in one program (fml_jax/replicas.py): `seeds` federations with seeds seed ..
  # seed+seeds-1, crossed with a `sweep` grid such as 'learning_rate=0.01,0.05;fml.alpha=0.3,0.5'.
  c.seeds = 1
  c.sweep = ""
  c.replica_strategy = "auto"     # auto | vmap (one program, replica axis) | loop
  c.data_seed = -1                # seed of the partition / synthetic data; -1: same as seed
  # Data.
  c.dataset = "synthetic"         # synthetic, or a tfds name (mnist, cifar10, ...)
  c.data_dir = ""                 # tfds data_dir; "" = $TFDS_DATA_DIR, then tfds's default
  c.partition = "natural"         # natural (synthetic only) | iid | dirichlet | shards
  c.dirichlet_alpha = 0.5
  c.dirichlet_min_examples = 10   # redraw a Dirichlet split until every client has this many
  c.dirichlet_cap = False         # a client holding N / num_clients examples takes no more
                                  # (NIID-Bench's split, FedMR's official code)
  c.shards_per_client = 2
  c.client_max_examples = 0       # keep at most this many training examples per client (0: all)
  c.synthetic_alpha = 1.0         # Synthetic(a, b): spread of the clients' models
  c.synthetic_beta = 1.0          # ... and of their inputs
  c.synthetic_test_fraction = 0.2 # each synthetic client's held-out share
  c.synthetic_max_client_examples = 2000  # cap on the heavy-tailed client sizes (0: none)
  c.augment = "auto"              # training augmentation: auto (crop_flip for CIFAR, as the
                                  # official FML code; none otherwise) | none | crop_flip
  c.augment_padding = 4           # crop_flip: zero pixels around each image before the crop
  # Models.
  c.model = "mlp"                 # global / meme model: logreg | mlp | cnn | lenet5 | ...
  # Batch-norm models in algorithms that average models (fml_jax/algorithms/batch_norm.py):
  # average (running statistics averaged with the parameters, as PyTorch state-dict
  # averaging does) | local (FedBN: each client keeps its batch-norm layers; fedavg, fedprox).
  c.batch_norm = "average"
  # Clients' private models (FML's local, local-only, FedMD's and FedH2L's parties):
  # comma-separated, assigned round-robin (num_clients entries: one per client);
  # "" = same as model. Each distinct (model, task) is an architecture group.
  # A family name (models.MODEL_FAMILIES, e.g. htfe_cpu_img) assigns its members.
  c.local_models = ""
  # HtFLlib's split models (models.HeadSplit): > 0 = every model's layers up to its
  # output layer, pooled to this many features, then a Dense head; 0 = the models as
  # their papers define them. Prototype and head algorithms need it (HtFLlib: 512).
  c.feature_dim = 0
  c.catfish_clients = ""          # FML: e.g. "0": these clients' local model is catfish_model
  c.catfish_model = "cnn"
  c.client_tasks = ""             # FML/local: tasks, assigned like local_models; "" = all full.
                                  # full | parity | subset_0-4 | subset_1.3 | coarse_0.0.1.1...
  # Federation.
  c.num_clients = 30
  c.clients_per_round = 10
  c.num_rounds = 30
  c.aggregation = "auto"          # auto (fml: uniform, fedavg/fedprox: weighted) | uniform | weighted
  # Unreliable clients (fml_jax/rounds/availability.py), drawn per sampled client per round:
  c.dropout_rate = 0.0            # fails to report: weight 0, its state unchanged
  c.straggler_rate = 0.0          # completes only a share of its local steps ...
  c.straggler_min_work = 0.1      # ... uniform in [this, 1)
  c.straggler_policy = "keep"     # keep (partial work aggregated, FedProx) | drop (as a dropout)
  # DP-FedAvg (McMahan et al. 2018; fml_jax/privacy.py): clip each client's update to this
  # L2 norm (0: off), add Gaussian noise of std dp_noise_multiplier * dp_clip to the sum;
  # the metrics report epsilon at dp_delta (dp-accounting's RDP accountant).
  c.dp_clip = 0.0
  c.dp_noise_multiplier = 1.0
  c.dp_delta = 1e-5
  # Local training.
  c.local_epochs = 2
  c.batch_size = 32
  c.optimizer = "sgd"             # sgd | adam (PyTorch semantics: weight decay is L2 on the gradient)
  c.learning_rate = 0.01
  c.lr_schedule = ""              # a factor on learning_rate per round, every algorithm but fedmd:
                                  # "" | "0:1,16:0.1" | fml_official (x0.1 every num_rounds // 3)
  c.momentum = 0.9                # sgd only
  c.weight_decay = 5e-4
  # The server step of algorithms that average models (fedavg, fedprox, fml's memes,
  # fedmr's first stage): an optimizer on the averaged update (FedOpt). The default is
  # the plain average. See fml_jax/algorithms/aggregation.py.
  c.server = ml_collections.ConfigDict(aggregation.SERVER_DEFAULTS)
  # Each algorithm's own section (--config.fml.alpha=0.3, --config.fedprox.mu=0.1, ...):
  # fml, fedprox, fedmr, fedmd, fedh2l. Their fields, defaults and meaning are in each
  # algorithm's module (fml_jax/algorithms/<name>.py, `defaults`).
  for section, defaults in algorithms.section_defaults().items():
    c[section] = ml_collections.ConfigDict(defaults)
  # Public data (FedMD's public set, FedH2L's seed set).
  c.public_dataset = ""           # "" = a held-out slice of the train split; or a tfds name
  c.public_size = 0               # held-out examples (0: none); with public_dataset: 0 = all
  c.public_balanced = True        # draw the held-out slice with equal counts per class
  c.public_classes = ""           # the held-out slice from these classes only ("" all), e.g. "0-4"
  c.private_classes = ""          # FedMD: private data restricted to these classes ("" all),
                                  # e.g. "0-4" or "1.3.5"; relabelled after the public classes
                                  # when public_dataset is another dataset
  # Execution and reporting.
  c.strategy = "auto"             # auto | vmap | chunked | sequential | debug (no jit)
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

"""Checks every setting before any data is loaded or any step is compiled.

Each failure is a `ConfigError` naming the field and what is allowed. Checks that
need the data (a partition that leaves a client empty, a model that does not fit
the input shape) happen where the data is known and raise the same error type.
"""

from __future__ import annotations

import math

from fml_jax import schedules
from fml_jax.algorithms import ALGORITHMS, fedh2l, fedmd, fedmr
from fml_jax.algorithms.base import split_list
from fml_jax.data.partition import PARTITIONS, check_partition_fits_dataset
from fml_jax.engine import AGGREGATIONS, PLACEMENTS, STRATEGIES
from fml_jax.errors import ConfigError
from fml_jax.models import MODELS, STATEFUL_MODELS
from fml_jax.optimizers import OPTIMIZERS

REQUIRED_FIELDS = (
    "algorithm", "dataset", "data_dir", "model", "local_models", "num_clients",
    "clients_per_round", "num_rounds", "local_epochs", "batch_size", "optimizer",
    "learning_rate", "momentum", "weight_decay", "alpha", "beta", "temperature", "prox_mu",
    "aggregation", "partition", "dirichlet_alpha", "dirichlet_min_examples",
    "shards_per_client", "seed", "strategy", "eval_every", "synthetic_alpha",
    "synthetic_beta", "synthetic_test_fraction", "synthetic_max_client_examples",
    "fedmr_first_stage_rounds", "fedmr_granularity", "fedmr_block_fraction",
    "fedmr_optimizer_state", "checkpoint_every", "checkpoints_to_keep", "chunk_size",
    "mesh_shape", "placement", "catfish_clients", "catfish_model", "client_tasks", "alpha_schedule",
    "beta_schedule", "lr_schedule", "schedule_step_rounds", "schedule_stop_round",
    "public_dataset", "public_size", "public_balanced", "public_classes", "private_classes",
    "client_max_examples", "eval_clients_on_global_test",
    "fedmd_public_epochs", "fedmd_private_epochs", "fedmd_early_stopping",
    "fedmd_alignment_size", "fedmd_digest_loss", "fedmd_digest_temperature",
    "fedmd_digest_epochs", "fedmd_digest_batch_size", "fedmd_report_bounds", "h2l_topology",
    "h2l_peers", "h2l_distill_weight", "h2l_temperature", "h2l_seed_ce")

# Models with batch norm keep running statistics that parameter averaging would have
# to average too; we only allow them where a model is never averaged.
AVERAGED_MODEL_ALGORITHMS = ("fml", "fedavg", "fedprox", "fedmr")


def _choice(config, field: str, allowed) -> None:
  value = config[field]
  if value not in allowed:
    raise ConfigError(field, f"'{value}' is not one of {', '.join(allowed)}")


def _number(config, field: str, low=None, high=None, *, integer=False,
            low_open=False, high_open=False) -> None:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      integer and not isinstance(value, int)):
    raise ConfigError(field, f"{value!r} is not {'an integer' if integer else 'a number'}")
  if not math.isfinite(value):
    raise ConfigError(field, f"{value} is not finite")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    raise ConfigError(field, f"{value} is outside {interval}")


def validate(config) -> None:
  """Raises ConfigError for the first setting that is not allowed."""
  missing = [f for f in REQUIRED_FIELDS if f not in config]
  if missing:
    raise ConfigError(missing[0], "is missing from the config; start from "
                      "fml_jax/configs/default.py, which defines every field")
  _choice(config, "algorithm", tuple(ALGORITHMS))
  _choice(config, "model", tuple(MODELS))
  for name in split_list(config.local_models):
    if name not in MODELS:
      raise ConfigError("local_models", f"'{name}' is not one of {', '.join(MODELS)}")
  _choice(config, "catfish_model", tuple(MODELS))
  if config.algorithm in AVERAGED_MODEL_ALGORITHMS and config.model in STATEFUL_MODELS:
    raise ConfigError("model", f"'{config.model}' has batch norm statistics, which "
                      f"{config.algorithm} would have to average; use it as a local model "
                      "(local_models) or pick mlp, cnn, lenet5 or logreg")
  if split_list(config.client_tasks) and config.algorithm not in ("fml", "local"):
    raise ConfigError("client_tasks", f"tasks other than the dataset's own are supported by "
                      f"fml and local, not {config.algorithm}")
  if split_list(config.catfish_clients) and config.algorithm not in ("fml", "local"):
    raise ConfigError("catfish_clients", f"the catfish is an FML setting (and local-only's, "
                      f"to compare); {config.algorithm} does not use it")
  base = {"alpha": config.alpha, "beta": config.beta, "lr": 1.0}
  _number(config, "schedule_step_rounds", 1, integer=True)
  _number(config, "schedule_stop_round", 0, integer=True)
  for kind in schedules.KINDS:
    schedules.to_table(config[f"{kind}_schedule"], kind, base[kind])
  _choice(config, "fedmd_digest_loss", fedmd.DIGEST_LOSSES)
  _choice(config, "h2l_topology", fedh2l.TOPOLOGIES)
  for field in ("public_size", "client_max_examples", "fedmd_public_epochs", "fedmd_private_epochs",
                "fedmd_digest_epochs"):
    _number(config, field, 0, integer=True)
  for field in ("fedmd_alignment_size", "fedmd_digest_batch_size", "h2l_peers"):
    _number(config, field, 1, integer=True)
  for field in ("fedmd_digest_temperature", "h2l_temperature"):
    _number(config, field, 0, low_open=True)
  _number(config, "h2l_distill_weight", 0)
  for field in ("public_balanced", "fedmd_early_stopping", "fedmd_report_bounds", "h2l_seed_ce",
                "eval_clients_on_global_test"):
    if not isinstance(config[field], bool):
      raise ConfigError(field, f"{config[field]!r} is not True or False")
  if config.algorithm in ("fedmd", "fedh2l") and not config.public_dataset and (
      config.public_size < 1):
    what = "public set" if config.algorithm == "fedmd" else "seed set"
    raise ConfigError("public_size", f"{config.algorithm} needs a {what}: set public_size to "
                      "the number of training examples to hold out for it (or public_dataset)")
  if config.algorithm == "fedh2l" and config.h2l_topology == "random_k" and (
      config.h2l_peers >= config.clients_per_round):
    raise ConfigError("h2l_peers", f"{config.h2l_peers} peers need more than "
                      f"clients_per_round={config.clients_per_round} participants")
  _choice(config, "partition", PARTITIONS + ("natural",))
  _choice(config, "optimizer", OPTIMIZERS)
  _choice(config, "aggregation", AGGREGATIONS)
  _choice(config, "strategy", STRATEGIES)
  _choice(config, "placement", PLACEMENTS)
  _choice(config, "fedmr_granularity", fedmr.GRANULARITIES)
  _choice(config, "fedmr_optimizer_state", fedmr.OPTIMIZER_STATE_MODES)
  _number(config, "fedmr_first_stage_rounds", 0, integer=True)
  _number(config, "fedmr_block_fraction", 0, 1, low_open=True)
  if not isinstance(config.dataset, str) or not config.dataset:
    raise ConfigError("dataset", "must be 'synthetic' or a tfds dataset name such as mnist")
  for field in ("num_clients", "num_rounds", "local_epochs", "batch_size", "eval_every",
                "shards_per_client"):
    _number(config, field, 1, integer=True)
  _number(config, "clients_per_round", 1, config.num_clients, integer=True)
  _number(config, "seed", 0, 2**31 - 1, integer=True)
  _number(config, "checkpoint_every", 0, integer=True)
  _number(config, "checkpoints_to_keep", 1, integer=True)
  _number(config, "chunk_size", 1, integer=True)
  _number(config, "mesh_shape", 0, integer=True)
  _number(config, "dirichlet_min_examples", 0, integer=True)
  _number(config, "synthetic_max_client_examples", 0, integer=True)
  if 0 < config.synthetic_max_client_examples < 2:
    raise ConfigError("synthetic_max_client_examples",
                      "must be 0 (no cap) or at least 2 (one train and one test example)")
  _number(config, "learning_rate", 0, low_open=True)
  _number(config, "momentum", 0, 1, high_open=True)
  _number(config, "weight_decay", 0)
  _number(config, "alpha", 0, 1)
  _number(config, "beta", 0, 1)
  _number(config, "temperature", 0, low_open=True)
  _number(config, "prox_mu", 0)
  _number(config, "dirichlet_alpha", 0, low_open=True)
  _number(config, "synthetic_alpha", 0)
  _number(config, "synthetic_beta", 0)
  _number(config, "synthetic_test_fraction", 0, 1, low_open=True, high_open=True)
  check_partition_fits_dataset(config.dataset, config.partition)

"""Checks every setting before any data is loaded or any step is compiled.

Each failure is a `ConfigError` naming the field (`config.fml.alpha`) and what is
allowed. The generic fields are checked here; each algorithm checks its own section
(`Algorithm.check_config`) and says through capability attributes what it accepts.
Checks that need the data (a partition that leaves a client empty, a model that does
not fit the input shape) happen where the data is known and raise the same error.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from fml_jax import algorithms, privacy, replicas, schedules, settings
from fml_jax.algorithms import aggregation, batch_norm
from fml_jax.algorithms.client_models import split_list
from fml_jax.configs import default
from fml_jax.data.augment import AUGMENTATIONS
from fml_jax.data.partition import PARTITIONS, check_partition_fits_dataset
from fml_jax.errors import ConfigError
from fml_jax.models import MODEL_FAMILIES, MODELS, STATEFUL_MODELS, expand_family
from fml_jax.optimizers import OPTIMIZERS
from fml_jax.rounds import AGGREGATIONS, PLACEMENTS, STRATEGIES
from fml_jax.rounds.availability import STRAGGLER_POLICIES


def field_paths(config, prefix: str = "") -> list[str]:
  """Every field of a config by its dotted path (sections expanded)."""
  paths = []
  for name, value in config.items():
    path = f"{prefix}{name}"
    paths.extend(field_paths(value, path + ".") if isinstance(value, ConfigDict) else [path])
  return paths


def required_fields() -> list[str]:
  """The fields every config must define: those of fml_jax/configs/default.py."""
  return field_paths(default.get_config())


def _add_missing_section(config, cls) -> None:
  """An algorithm from outside the package brings its own section's defaults."""
  if cls.config_section and cls.config_section not in config:
    with config.unlocked():
      config[cls.config_section] = ConfigDict(cls.defaults())


def validate(config) -> None:
  """Raises ConfigError for the first setting that is not allowed."""
  if "algorithm" not in config:
    raise ConfigError("algorithm", "is missing from the config; start from "
                      "fml_jax/configs/default.py, which defines every field")
  cls = algorithms.resolve(config.algorithm)
  _add_missing_section(config, cls)
  required = required_fields()
  missing = [f for f in required if not settings.has(config, f)]
  if missing:
    raise ConfigError(missing[0], "is missing from the config; start from "
                      "fml_jax/configs/default.py, which defines every field")
  known = set(required) | {f"{cls.config_section}.{k}" for k in cls.defaults()}
  unknown = [f for f in field_paths(config) if f not in known]
  if unknown:
    name = unknown[0]
    dotted = name.replace("__", ".")
    renamed = dotted if dotted in known else settings.RENAMED.get(name)
    hint = f"; did you mean '{renamed}'?" if renamed else ""
    raise ConfigError(name, f"is not a setting of fml_jax{hint} (the fields are listed in "
                      "fml_jax/configs/default.py and each algorithm's defaults())")
  for name in expand_family(split_list(config.local_models)):
    if name not in MODELS:
      raise ConfigError("local_models", f"'{name}' is not one of {', '.join(MODELS)}, "
                        f"nor a model family ({', '.join(MODEL_FAMILIES)})")
  settings.number(config, "feature_dim", 0, integer=True)
  settings.choice(config, "model", tuple(MODELS))
  settings.choice(config, "catfish_model", tuple(MODELS))
  _check_batch_norm(config, cls)
  if split_list(config.client_tasks) and not cls.supports_client_tasks:
    raise ConfigError("client_tasks", f"tasks other than the dataset's own are supported by "
                      f"{_names_with('supports_client_tasks')}, not {cls.name}")
  if split_list(config.catfish_clients) and not cls.supports_catfish:
    raise ConfigError("catfish_clients", f"the catfish is an FML setting (and "
                      f"{_names_with('supports_catfish')} take it); {cls.name} does not use it")
  if cls.needs_public_data and not config.public_dataset and config.public_size < 1:
    raise ConfigError("public_size", f"{cls.name} needs a public (seed) set: set public_size to "
                      "the number of training examples to hold out for it (or public_dataset)")
  _check_availability(config, cls)
  schedules.clients_lr_table(config.lr_schedule, config.num_rounds)   # readable?
  if str(config.lr_schedule).strip() and not cls.supports_lr_schedule:
    raise ConfigError("lr_schedule", f"{cls.name} keeps its own optimizer per phase; "
                      "lr_schedule applies to the other algorithms")
  privacy.check_dp_settings(config, cls)
  aggregation.check_server_settings(config)
  if not cls.uses_server_optimizer and not aggregation.is_plain_average(config.server):
    raise ConfigError("server.optimizer", f"{cls.name} averages no models, so it has no server "
                      f"optimizer; those that do: {_names_with('uses_server_optimizer')}")
  # Every registered algorithm's section, so a typo in one that is not running is caught
  # too, and the running algorithm's own checks even if it has no section.
  for other in set(algorithms.ALGORITHMS.values()) | {cls}:
    if other is cls or (other.config_section and other.config_section in config):
      other.check_config(config)
  _check_generic(config)
  replicas.check_replica_settings(config)


def _check_availability(config, cls) -> None:
  settings.number(config, "dropout_rate", 0, 1, high_open=True)
  settings.number(config, "straggler_rate", 0, 1)
  settings.number(config, "straggler_min_work", 0, 1, low_open=True)
  settings.choice(config, "straggler_policy", STRAGGLER_POLICIES)
  for field in ("dropout_rate", "straggler_rate"):
    if config[field] and not cls.supports_availability:
      raise ConfigError(field, f"{cls.name} does not model unreliable clients (its server "
                        "does not weigh uploads by the round's weights, or its clients do not "
                        f"train through Algorithm.train); those that do: "
                        f"{_names_with('supports_availability')}")


def _check_batch_norm(config, cls) -> None:
  """Batch-norm models in algorithms that average models, and FedBN (batch_norm=local)."""
  settings.choice(config, "batch_norm", batch_norm.BATCH_NORM_MODES)
  stateful = config.model in STATEFUL_MODELS
  if cls.averages_models and stateful and not cls.supports_batch_norm:
    raise ConfigError("model", f"'{config.model}' has batch norm statistics, which {cls.name} "
                      f"does not average; algorithms that do: "
                      f"{_names_with('supports_batch_norm')} (or pick a model without batch norm)")
  if config.batch_norm == "local":
    if not cls.supports_fedbn:
      raise ConfigError("batch_norm", f"local (FedBN) is supported by "
                        f"{_names_with('supports_fedbn')}, not {cls.name}")
    if not stateful:
      raise ConfigError("batch_norm", f"local keeps the batch-norm layers on the clients, but "
                        f"model '{config.model}' has none")
  if stateful and config.get("dp_clip", 0.0) and cls.supports_batch_norm:
    raise ConfigError("dp_clip", f"'{config.model}' has batch norm statistics, which are "
                      "computed from client data and would be averaged without clipping or "
                      "noise; DP-FedAvg needs a model without batch norm")


def _names_with(capability: str) -> str:
  return ", ".join(sorted({c.name for c in algorithms.ALGORITHMS.values()
                           if getattr(c, capability)}))


def _check_generic(config) -> None:
  for field in ("public_size", "client_max_examples"):
    settings.number(config, field, 0, integer=True)
  for field in ("public_balanced", "eval_clients_on_global_test"):
    settings.boolean(config, field)
  settings.choice(config, "partition", PARTITIONS + ("natural",))
  settings.choice(config, "optimizer", OPTIMIZERS)
  settings.choice(config, "aggregation", AGGREGATIONS)
  settings.choice(config, "strategy", STRATEGIES)
  settings.choice(config, "placement", PLACEMENTS)
  if not isinstance(config.dataset, str) or not config.dataset:
    raise ConfigError("dataset", "must be 'synthetic' or a tfds dataset name such as mnist")
  for field in ("num_clients", "num_rounds", "local_epochs", "batch_size", "eval_every",
                "shards_per_client"):
    settings.number(config, field, 1, integer=True)
  settings.number(config, "clients_per_round", 1, config.num_clients, integer=True)
  settings.number(config, "seed", 0, 2**31 - 1, integer=True)
  settings.number(config, "checkpoint_every", 0, integer=True)
  settings.number(config, "checkpoints_to_keep", 1, integer=True)
  settings.number(config, "chunk_size", 1, integer=True)
  settings.number(config, "mesh_shape", 0, integer=True)
  settings.number(config, "dirichlet_min_examples", 0, integer=True)
  settings.boolean(config, "dirichlet_cap")
  settings.number(config, "synthetic_max_client_examples", 0, integer=True)
  if 0 < config.synthetic_max_client_examples < 2:
    raise ConfigError("synthetic_max_client_examples",
                      "must be 0 (no cap) or at least 2 (one train and one test example)")
  settings.number(config, "learning_rate", 0, low_open=True)
  settings.choice(config, "augment", AUGMENTATIONS)
  settings.number(config, "augment_padding", 0, integer=True)
  settings.number(config, "momentum", 0, 1, high_open=True)
  settings.number(config, "weight_decay", 0)
  settings.number(config, "dirichlet_alpha", 0, low_open=True)
  settings.number(config, "synthetic_alpha", 0)
  settings.number(config, "synthetic_beta", 0)
  settings.number(config, "synthetic_test_fraction", 0, 1, low_open=True, high_open=True)
  check_partition_fits_dataset(config.dataset, config.partition)

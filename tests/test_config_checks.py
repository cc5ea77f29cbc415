"""Tests of fml_jax/config_checks.validate: every bad setting names its field."""

import importlib
import math
from pathlib import Path

import ml_collections
import pytest

from conftest import small_config
from fml_jax import config_checks
from fml_jax.configs import default
from fml_jax.errors import ConfigError, UserError
from fml_jax.models import build_model

CONFIG_DIR = Path(config_checks.__file__).resolve().parent / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def with_values(**overrides):
  """The default config with overrides, bypassing ConfigDict's type locking
  (so that e.g. a float can be put where an int is required, as a hand-built
  config or a config file could)."""
  values = default.get_config().to_dict()
  for k, v in overrides.items():
    *sections, field = k.split("__")
    target = values
    for section in sections:
      target = target[section]
    target[field] = v
  return ml_collections.ConfigDict(values)


BAD = [
    # (overrides, expected field, text expected in the message)
    (dict(fml__alpha=1.5), "fml.alpha", "outside [0, 1]"),
    (dict(fml__alpha=-0.01), "fml.alpha", "outside [0, 1]"),
    (dict(fml__beta=-0.1), "fml.beta", "outside [0, 1]"),
    (dict(num_clients=5, clients_per_round=6), "clients_per_round", "outside [1, 5]"),
    (dict(clients_per_round=0), "clients_per_round", "outside [1, 30]"),
    (dict(algorithm="fedsgd"), "algorithm", "unknown algorithm 'fedsgd'; choose one of fml, fedavg, fedprox, local"),
    (dict(model="resnet"), "model", "'resnet' is not one of"),
    (dict(local_models="mlp,vgg"), "local_models", "'vgg' is not one of"),
    (dict(dataset="mnist", partition="pathological"), "partition", "'pathological' is not one"),
    (dict(chunk_size=0), "chunk_size", "0 is outside [1, inf)"),
    (dict(mesh_shape=-1), "mesh_shape", "-1 is outside [0, inf)"),
    (dict(strategy="pmap"), "strategy", "'pmap' is not one of auto, vmap, chunked, sequential, debug"),
    (dict(server__optimizer="lamb"), "server.optimizer", "'lamb' is not one of sgd, momentum, adam"),
    (dict(server__learning_rate=0.0), "server.learning_rate", "outside (0, inf)"),
    (dict(server__momentum=1.0), "server.momentum", "outside [0, 1)"),
    (dict(server__eps=0.0), "server.eps", "outside (0, inf)"),
    (dict(algorithm="local", server__optimizer="adam"), "server.optimizer",
     "local averages no models"),
    (dict(fedmr__granularity="row"), "fedmr.granularity", "'row' is not one of tensor"),
    (dict(fedmd__digest_loss="mse"), "fedmd.digest_loss", "'mse' is not one of l1, kl"),
    (dict(fedmd__alignment_size=0), "fedmd.alignment_size", "outside [1, inf)"),
    (dict(fedh2l__topology="star"), "fedh2l.topology", "'star' is not one of full"),
    (dict(algorithm="fedh2l", public_size=10, fedh2l__topology="random_k", fedh2l__peers=10),
     "fedh2l.peers", "need more than clients_per_round=10"),
    (dict(fml__alpha_schedule="0:0.5,5"), "fml.alpha_schedule", "cannot read '5'"),
    (dict(algorithm="fedavg", client_tasks="parity"), "client_tasks", "supported by fml, local"),
    (dict(algorithm="fedmd"), "public_size", "fedmd needs a public"),
    (dict(algorithm="no_such_module_xyz:Algo"), "algorithm", "cannot import module"),
    (dict(algorithm="fml_jax.algorithms.fml:NoSuchClass"), "algorithm", "has no 'NoSuchClass'"),
    (dict(algorithm="fml_jax.algorithms.fml:DEFAULTS"), "algorithm", "is not a subclass"),
    (dict(optimizer="rmsprop"), "optimizer", "'rmsprop' is not one of sgd, adam"),
    (dict(aggregation="median"), "aggregation", "'median' is not one of auto, uniform, weighted"),
    (dict(learning_rate=0.0), "learning_rate", "outside (0, inf)"),
    (dict(learning_rate=-0.1), "learning_rate", "outside (0, inf)"),
    (dict(learning_rate=math.nan), "learning_rate", "not finite"),
    (dict(learning_rate=math.inf), "learning_rate", "not finite"),
    (dict(learning_rate="0.1"), "learning_rate", "is not a number"),
    (dict(momentum=1.0), "momentum", "outside [0, 1)"),
    (dict(momentum=-0.5), "momentum", "outside [0, 1)"),
    (dict(weight_decay=-1e-4), "weight_decay", "outside [0, inf)"),
    (dict(fml__temperature=0.0), "fml.temperature", "outside (0, inf)"),
    (dict(fedprox__mu=-0.01), "fedprox.mu", "outside [0, inf)"),
    (dict(batch_size=0), "batch_size", "outside [1, inf)"),
    (dict(batch_size=True), "batch_size", "is not an integer"),
    (dict(num_rounds=0), "num_rounds", "outside [1, inf)"),
    (dict(local_epochs=0), "local_epochs", "outside [1, inf)"),
    (dict(eval_every=0), "eval_every", "outside [1, inf)"),
    (dict(num_clients=0), "num_clients", "outside [1, inf)"),
    (dict(shards_per_client=0), "shards_per_client", "outside [1, inf)"),
    (dict(dirichlet_alpha=0.0), "dirichlet_alpha", "outside (0, inf)"),
    (dict(dirichlet_min_examples=-1), "dirichlet_min_examples", "outside [0, inf)"),
    (dict(seed=-1), "seed", "outside [0, 2147483647]"),
    (dict(seed=2**31), "seed", "outside [0, 2147483647]"),
    (dict(synthetic_alpha=-1.0), "synthetic_alpha", "outside [0, inf)"),
    (dict(synthetic_beta=-1.0), "synthetic_beta", "outside [0, inf)"),
    (dict(synthetic_test_fraction=0.0), "synthetic_test_fraction", "outside (0, 1)"),
    (dict(synthetic_test_fraction=1.0), "synthetic_test_fraction", "outside (0, 1)"),
    (dict(synthetic_max_client_examples=1), "synthetic_max_client_examples", "at least 2"),
    (dict(synthetic_max_client_examples=-5), "synthetic_max_client_examples", "outside [0, inf)"),
    (dict(partition="iid"), "partition", "use 'natural', not 'iid'"),
    (dict(partition="shards"), "partition", "use 'natural', not 'shards'"),
    (dict(dataset="mnist", partition="natural"), "partition", "only for dataset 'synthetic'"),
    (dict(dataset=""), "dataset", "must be 'synthetic' or a tfds dataset name"),
    (dict(dataset=None), "dataset", "must be 'synthetic'"),
    (dict(num_clients=10.0), "num_clients", "10.0 is not an integer"),
    (dict(batch_size=32.5), "batch_size", "32.5 is not an integer"),
    (dict(clients_per_round=4.0), "clients_per_round", "is not an integer"),
    (dict(seed=1.0), "seed", "is not an integer"),
    (dict(shards_per_client="2"), "shards_per_client", "'2' is not an integer"),
]


@pytest.mark.parametrize("overrides,field,needle", BAD,
                         ids=[f"{f}={list(o.values())[-1]!r}-{i}" for i, (o, f, _) in enumerate(BAD)])
def test_bad_setting_names_its_field(overrides, field, needle):
  config = with_values(**overrides)
  with pytest.raises(ConfigError) as e:
    config_checks.validate(config)
  assert e.value.field == field
  assert str(e.value).startswith(f"config.{field}: ")
  assert needle in str(e.value)
  assert isinstance(e.value, UserError)


def test_missing_field_is_named():
  values = default.get_config().to_dict()
  del values["fml"]["temperature"]
  with pytest.raises(ConfigError) as e:
    config_checks.validate(ml_collections.ConfigDict(values))
  assert e.value.field == "fml.temperature"
  assert str(e.value).startswith("config.fml.temperature: is missing")
  assert "default.py" in str(e.value)


def test_required_fields_come_from_default_with_every_algorithms_section():
  fields = config_checks.required_fields()
  assert {"algorithm", "fml.alpha", "fedprox.mu", "fedmr.granularity", "fedmd.digest_loss",
          "fedh2l.topology", "server.optimizer", "server.learning_rate"} <= set(fields)
  assert not {"alpha", "prox_mu", "fedmd_digest_loss"} & set(fields)   # the old flat names


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(fml__alpha=0.0, fml__beta=1.0, momentum=0.0, weight_decay=0.0, fedprox__mu=0.0),
    dict(clients_per_round=30),                     # == num_clients
    dict(learning_rate=1),                          # an int is a number
    dict(dirichlet_min_examples=0, synthetic_max_client_examples=0),
    dict(synthetic_max_client_examples=2, synthetic_test_fraction=0.5),
    dict(local_models="cnn", model="logreg"),        # shapes are checked later, with the data
    dict(dataset="mnist", partition="iid"),
    dict(dataset="cifar10", partition="shards", shards_per_client=5),
    dict(dataset="mnist", partition="dirichlet", dirichlet_alpha=1e-3),
    dict(algorithm="local", strategy="sequential", optimizer="adam", aggregation="weighted"),
    dict(seed=2**31 - 1),
])
def test_good_settings_pass(overrides):
  config_checks.validate(with_values(**overrides))


def test_default_and_small_test_config_pass():
  config_checks.validate(default.get_config())
  config_checks.validate(small_config())
  config_checks.validate(small_config(dataset="mnist", partition="iid", num_clients=10))


def test_config_dir_has_the_expected_files():
  assert {"default", "fml", "fedavg", "fedprox", "local"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_file_passes(name):
  module = importlib.import_module(f"fml_jax.configs.{name}")
  config = module.get_config()
  config_checks.validate(config)
  assert set(config_checks.required_fields()) <= set(config_checks.field_paths(config))


def test_config_files_differ_where_documented():
  from fml_jax.configs import fedavg, fedprox, fml, local   # pylint: disable=g-import-not-at-top
  assert fml.get_config().algorithm == "fml"
  assert fml.get_config().dataset == "mnist"
  assert fedavg.get_config().algorithm == "fedavg"
  assert fedprox.get_config().algorithm == "fedprox"
  assert local.get_config().algorithm == "local"
  assert default.get_config().algorithm == "fml"
  assert default.get_config().dataset == "synthetic"


def test_validate_reports_the_first_bad_field_in_check_order():
  # algorithm is checked before numbers; numbers before the dataset/partition fit.
  with pytest.raises(ConfigError) as e:
    config_checks.validate(with_values(algorithm="nope", batch_size=0, partition="iid"))
  assert e.value.field == "algorithm"
  with pytest.raises(ConfigError) as e:
    config_checks.validate(with_values(batch_size=0, partition="iid"))
  assert e.value.field == "batch_size"


# ----------------------------------------------------------- model vs. input shape


@pytest.mark.parametrize("name,shape,needle", [
    ("cnn", (60,), "needs image inputs"),
    ("lenet5", (60,), "needs image inputs"),
    ("cnn", (8, 8, 1), "at least 12x12"),
    ("transformer", (28, 28, 1), "unknown model 'transformer'"),
])
def test_build_model_rejects_unfit_model(name, shape, needle):
  with pytest.raises(ConfigError) as e:
    build_model(name, 10, shape)
  assert e.value.field == "model"
  assert str(e.value).startswith("config.model: ")
  assert needle in str(e.value)


def test_build_model_names_local_models_field():
  with pytest.raises(ConfigError) as e:
    build_model("cnn", 10, (60,), field="local_models")
  assert e.value.field == "local_models"
  assert str(e.value).startswith("config.local_models: ")


@pytest.mark.parametrize("name,shape", [
    ("mlp", (60,)), ("logreg", (60,)), ("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)),
    ("lenet5", (32, 32, 3))])
def test_build_model_accepts_fitting_models(name, shape):
  assert build_model(name, 10, shape) is not None


@pytest.mark.parametrize("extra,field,needle", [
    (dict(fedmd__alignment_size=5), "fedmd__alignment_size", "did you mean 'fedmd.alignment_size'"),
    (dict(prox_mu=0.1), "prox_mu", "did you mean 'fedprox.mu'"),
    (dict(no_such_field=1), "no_such_field", "is not a setting of fml_jax"),
])
def test_unknown_fields_are_refused_not_ignored(extra, field, needle):
  config = default.get_config()
  config.update(extra)   # ConfigDict.update adds unknown keys silently
  with pytest.raises(ConfigError) as e:
    config_checks.validate(config)
  assert e.value.field == field and needle in str(e.value)

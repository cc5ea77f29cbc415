"""Federated algorithms, by name: the registry.

Each algorithm is one module with a subclass of `fml_jax.rounds.Algorithm`, registered
here. An algorithm from outside the package needs no edit here: name it as
`--config.algorithm=my_module:MyAlgorithm` (its module importable, e.g. installed or on
PYTHONPATH) and it is imported and registered when the config is checked. The
registry-driven tests (tests/test_algorithms.py) list what a class must provide.
"""

from __future__ import annotations

import importlib

from fml_jax.algorithms.ditto import Ditto
from fml_jax.algorithms.fedavg import FedAvg, FedProx
from fml_jax.algorithms.feddistill import FedDistill
from fml_jax.algorithms.fedgen import FedGen
from fml_jax.algorithms.fedgh import FedGH
from fml_jax.algorithms.fedh2l import FedH2L
from fml_jax.algorithms.fedkd import FedKD
from fml_jax.algorithms.fedmd import FedMD
from fml_jax.algorithms.fedmr import FedMR
from fml_jax.algorithms.fedproto import FedProto
from fml_jax.algorithms.fedrep import FedRep
from fml_jax.algorithms.fedtgp import FedTGP
from fml_jax.algorithms.fml import FML
from fml_jax.algorithms.lgfedavg import LGFedAvg
from fml_jax.algorithms.local import LocalOnly
from fml_jax.algorithms.scaffold import Scaffold
from fml_jax.errors import ConfigError
from fml_jax.rounds.algorithm import Algorithm

ALGORITHMS: dict[str, type] = {}


def register(cls: type) -> type:
  """Adds an Algorithm subclass to the registry under `cls.name` (usable as a decorator)."""
  if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
    raise ConfigError("algorithm", f"{cls!r} is not a subclass of fml_jax.rounds.Algorithm")
  if not cls.name:
    raise ConfigError("algorithm", f"{cls.__qualname__} has no `name`")
  ALGORITHMS[cls.name] = cls
  return cls


# The package's own algorithms: their sections make up fml_jax/configs/default.py. One
# registered later (module:Class) brings its section into the configs that run it only.
BUILTIN = (FML, FedAvg, FedProx, LocalOnly, FedMR, FedMD, FedH2L, Scaffold, Ditto, FedRep,
           FedDistill, LGFedAvg, FedProto, FedGH, FedTGP, FedKD, FedGen)
for _cls in BUILTIN:
  register(_cls)


def resolve(name: str) -> type:
  """The class registered as `name`, or (for 'module:Class') imported and registered
  under the name given on the command line."""
  if name in ALGORITHMS:
    return ALGORITHMS[name]
  if isinstance(name, str) and ":" in name:
    module_name, _, class_name = name.partition(":")
    try:
      cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
      raise ConfigError("algorithm", f"cannot import module '{module_name}' ({e}); is it "
                        "installed or on PYTHONPATH?") from None
    except AttributeError:
      raise ConfigError("algorithm", f"module '{module_name}' has no '{class_name}'") from None
    register(cls)
    ALGORITHMS[name] = cls
    return cls
  raise ConfigError("algorithm", f"unknown algorithm '{name}'; choose one of "
                    f"{', '.join(n for n in ALGORITHMS if ':' not in n)}, or name your own "
                    "class as module:Class")


def section_defaults() -> dict:
  """Every built-in algorithm's config section with its defaults."""
  return {cls.config_section: cls.defaults() for cls in BUILTIN if cls.config_section}


def build_algorithm(config, num_classes: int, input_shape: tuple) -> Algorithm:
  return resolve(config.algorithm)(config, num_classes, input_shape)


__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register", "resolve",
           "section_defaults"]

"""Federated algorithms. Each is a subclass of `Algorithm`; add new ones to ALGORITHMS."""

from fml_jax.algorithms.base import Algorithm, ClientInfo, ClientResult, PersonalizedModels, RoundContext
from fml_jax.algorithms.fedavg import FedAvg, FedProx
from fml_jax.algorithms.fedh2l import FedH2L
from fml_jax.algorithms.fedmd import FedMD
from fml_jax.algorithms.fedmr import FedMR
from fml_jax.algorithms.fml import FML
from fml_jax.algorithms.local import LocalOnly
from fml_jax.errors import ConfigError

ALGORITHMS = {cls.name: cls for cls in (FML, FedAvg, FedProx, LocalOnly, FedMR, FedMD, FedH2L)}


def build_algorithm(config, num_classes: int, input_shape: tuple) -> Algorithm:
  if config.algorithm not in ALGORITHMS:
    raise ConfigError("algorithm", f"unknown algorithm '{config.algorithm}'; choose one of "
                      f"{', '.join(ALGORITHMS)}")
  return ALGORITHMS[config.algorithm](config, num_classes, input_shape)


__all__ = ["ALGORITHMS", "Algorithm", "ClientInfo", "ClientResult", "PersonalizedModels",
           "RoundContext", "build_algorithm"]

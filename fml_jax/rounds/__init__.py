"""One federated round as a small package.

  types.py      the plain data: RoundState, RoundReport, ClientInfo, RoundContext, ...
  algorithm.py  the Algorithm interface
  sampling.py   architecture groups, the cohort's places per group, sampling
  protocol.py   the round, written once: begin / client phase / finish
  executors.py  how clients execute: Vmap, Chunked, Sequential, Debug; `auto`
  stores.py     where client state lives: DeviceStore, HostStore; meshes
  plan.py       the abstract shapes of one round, computed once
  runner.py     Runner: init, warm start, run_round, compile
"""

from fml_jax.rounds.algorithm import Algorithm
from fml_jax.rounds.executors import STRATEGIES
from fml_jax.rounds.protocol import AGGREGATIONS
from fml_jax.rounds.runner import Runner
from fml_jax.rounds.sampling import apportion
from fml_jax.rounds.stores import PLACEMENTS, client_mesh
from fml_jax.rounds.types import (ClientInfo, ClientResult, Cohort, GlobalModel,
                                  PersonalizedModels, RoundContext, RoundReport, RoundState)

__all__ = ["AGGREGATIONS", "Algorithm", "ClientInfo", "ClientResult", "Cohort", "GlobalModel", "PLACEMENTS",
           "PersonalizedModels", "RoundContext", "RoundReport", "RoundState", "Runner",
           "STRATEGIES", "apportion", "client_mesh"]

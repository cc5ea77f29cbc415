r"""Replicas: several independent federations in one program (seeds, and a sweep).

  --config.seeds=5      five replicas, seeds seed .. seed+4: each its own initial models,
                        cohorts and batch orders. The data (partition, synthetic
                        dataset, public set) is that of `data_seed` (default: `seed`)
                        and shared by all, so replica i is exactly the single run with
                        --config.seed=seed+i --config.data_seed=seed.
  --config.sweep='learning_rate=0.01,0.05;fml.alpha=0.3,0.5'
                        a grid over numeric settings (SWEEPABLE), crossed with the
                        seeds: replica r runs grid point r // seeds (the last field
                        varies fastest) with seed seed + r % seeds.

How the replicas run (`replica_strategy`):

  loop  one Runner per grid point, each replica's state kept on its own, a round of
        every replica after the other; replicas of one point share the compiled round.
        Replica r is the single run, same program, same numbers.
  vmap  one jitted program: the round state gets a leading replica axis and the round
        is vmapped over it; swept values enter as traced numbers (the algorithm is
        built inside the trace with them). Needs the round to be one jitted function
        (strategy vmap or chunked), the device store and no mesh.
  auto  vmap on GPU/TPU where it can, loop on a CPU (benchmarks/RESULTS.md, "Replicas").

Paired comparisons need nothing from here: runs with the same seed share their data,
initial weights (fml_jax/rounds/algorithm.py, `global_model_key`), cohorts and batch
orders whatever the algorithm (tests/test_replicas.py checks it).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from fml_jax import settings
from fml_jax.algorithms import build_algorithm, resolve
from fml_jax.errors import ConfigError
from fml_jax.rounds import RoundState, Runner
from fml_jax.rounds.runner import seed_keys
from fml_jax.trees import stack_trees, take_rows

REPLICA_STRATEGIES = ("auto", "vmap", "loop")

# Settings a sweep may vary: numbers that every round reads as values (so they can be
# traced), never shapes. field -> what it applies to ("" every algorithm, "server" the
# algorithms with a server optimizer, else the algorithm's config section).
SWEEPABLE = {
    "learning_rate": "",
    "server.learning_rate": "server",
    "fml.alpha": "fml",
    "fml.beta": "fml",
    "fedprox.mu": "fedprox",
}


@dataclasses.dataclass(frozen=True)
class Replica:
  index: int
  seed: int
  point: int       # index into the sweep's grid points
  values: dict     # swept field -> value ({} without a sweep)

  def fields(self) -> dict:
    """What metrics lines and summaries say about the replica."""
    return {"replica": self.index, "seed": self.seed, "sweep": dict(self.values)}


def parse_sweep(text: str) -> list[tuple[str, list[float]]]:
  """'learning_rate=0.01,0.05;fml.alpha=0.3' -> [(field, values), ...]."""
  grid = []
  for part in (p.strip() for p in str(text).split(";")):
    if not part:
      continue
    field, sep, values = part.partition("=")
    field = field.strip()
    if not sep or not values.strip():
      raise ConfigError("sweep", f"cannot read '{part}'; write field=v1,v2 with fields "
                        "separated by ';', e.g. 'learning_rate=0.01,0.05;fml.alpha=0.3,0.5'")
    if field not in SWEEPABLE:
      raise ConfigError("sweep", f"'{field}' cannot be swept; sweepable settings: "
                        f"{', '.join(SWEEPABLE)}")
    if field in [f for f, _ in grid]:
      raise ConfigError("sweep", f"'{field}' is listed twice")
    try:
      numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ConfigError("sweep", f"'{values}' for {field} are not numbers") from None
    if len(set(numbers)) != len(numbers):
      raise ConfigError("sweep", f"{field} lists a value twice: {values}")
    grid.append((field, numbers))
  return grid


def grid_points(config) -> list[dict]:
  """The sweep's grid points in order (one empty point without a sweep)."""
  grid = parse_sweep(config.sweep)
  return [dict(zip([f for f, _ in grid], values))
          for values in itertools.product(*(v for _, v in grid))]


def replicas_of(config) -> list[Replica]:
  return [Replica(p * config.seeds + s, config.seed + s, p, values)
          for p, values in enumerate(grid_points(config)) for s in range(config.seeds)]


def config_for(config, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with a grid point's values set (concrete numbers)."""
  point = ml_collections.ConfigDict(config.to_dict())
  point.sweep = ""   # the point itself sweeps nothing
  return settings.apply_overrides(point, dict(values))


def traced_config(config, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` holding traced values at the swept fields (inside a vmapped
  round): not type-checked, since a tracer is not a float."""
  point = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  return settings.apply_overrides(point, dict(values))


def check_replica_settings(config) -> None:
  """The `seeds`, `sweep` and `replica_strategy` settings, and every grid point's
  values against the algorithm's own checks."""
  settings.number(config, "seeds", 1, integer=True)
  settings.choice(config, "replica_strategy", REPLICA_STRATEGIES)
  if config.data_seed != -1:
    settings.number(config, "data_seed", 0, integer=True)
  cls = resolve(config.algorithm)
  for field, _ in parse_sweep(config.sweep):
    applies_to = SWEEPABLE[field]
    if applies_to == "server" and not cls.uses_server_optimizer:
      raise ConfigError("sweep", f"{config.algorithm} has no server optimizer, so "
                        f"'{field}' changes nothing")
    if applies_to not in ("", "server") and cls.config_section != applies_to:
      raise ConfigError("sweep", f"'{field}' is a setting of {applies_to}, not of "
                        f"{config.algorithm}")
  if config.sweep.strip():
    # Imported here: config_checks sits beside this module and validates whole configs.
    from fml_jax import config_checks   # pylint: disable=g-import-not-at-top
    for values in grid_points(config):
      try:
        config_checks.validate(config_for(config, values))
      except ConfigError as e:
        raise ConfigError("sweep", f"the grid point {values} is not a valid config: "
                          f"{e}") from None


def make_runner(config, data, mesh) -> Runner:
  algorithm = build_algorithm(config, data.num_classes, data.input_shape)
  return Runner(algorithm, data, config.clients_per_round, config.aggregation, config.strategy,
                chunk_size=config.chunk_size, mesh=mesh, placement=config.placement)


class ReplicaSet:
  """Every replica of a run: init, rounds, their states for evaluation and checkpoints.

  States are a list of RoundStates (loop) or one RoundState with a leading replica
  axis (vmap); only this class looks inside."""

  def __init__(self, config, data, mesh=None):
    self.config = config
    self.replicas = replicas_of(config)
    self.points = grid_points(config)
    first = make_runner(config_for(config, self.points[0]), data, mesh)
    # Every point's runner shares the first one's (placed) data.
    self.runners = [first] + [make_runner(config_for(config, v), first.data, mesh)
                              for v in self.points[1:]]
    self.strategy = self._resolve(config.replica_strategy)
    self._values = {field: jnp.asarray([r.values[field] for r in self.replicas], jnp.float32)
                    for field in self.points[0]}
    self._seeds = jnp.asarray([r.seed for r in self.replicas], jnp.uint32)
    if self.strategy == "vmap":
      self._vmap_round = jax.jit(jax.vmap(self._round_one, in_axes=(0, 0, None)),
                                 donate_argnums=1)
      self._vmap_init = jax.jit(jax.vmap(self._init_one))

  runner = property(lambda self: self.runners[0])
  data = property(lambda self: self.runners[0].data)
  num_replicas = property(lambda self: len(self.replicas))

  def runner_of(self, i: int) -> Runner:
    return self.runners[self.replicas[i].point]

  def _vmap_refusal(self) -> Optional[str]:
    """Why the replicas cannot be vmapped (None if they can)."""
    runner = self.runner
    if runner.strategy not in ("vmap", "chunked"):
      return (f"the round runs with strategy={runner.strategy}, a Python loop over clients; "
              "vmapped replicas need strategy vmap or chunked")
    if runner.placement != "device":
      return "placement=host moves cohorts between rounds outside the jitted round"
    if runner.mesh is not None:
      return "the client axis is sharded over a mesh (mesh_shape)"
    schedules = [f"fml.{kind}_schedule" for kind in ("alpha", "beta")
                 if f"fml.{kind}" in self.points[0] and self.config.fml[f"{kind}_schedule"]]
    if schedules:
      return f"{', '.join(schedules)} is set, and schedules need concrete values"
    return None

  def _resolve(self, strategy: str) -> str:
    refusal = self._vmap_refusal()
    if strategy == "vmap" and refusal:
      raise ConfigError("replica_strategy", f"vmap is not possible here: {refusal}; use loop "
                        "(or auto)")
    if strategy != "auto":
      return strategy
    return ("vmap" if self.num_replicas > 1 and refusal is None
            and jax.default_backend() != "cpu" else "loop")

  # --- vmap: one replica's init and round, traced ------------------------------------------

  def _algorithm_with(self, values: dict):
    if not values:
      return self.runner.algorithm
    algorithm = self.runner.algorithm
    return build_algorithm(traced_config(self.config, values), algorithm.num_classes,
                           algorithm.input_shape)

  def _init_one(self, values: dict, seed):
    init_key, rounds_key = seed_keys(seed)
    server, population = self._algorithm_with(values).init(init_key,
                                                           tuple(self.runner.group_sizes))
    return RoundState(round=jnp.zeros((), jnp.int32), key=rounds_key, server=server,
                      population=tuple(population))

  def _round_one(self, values: dict, state: RoundState, data):
    protocol = dataclasses.replace(self.runner.protocol, algorithm=self._algorithm_with(values))
    return protocol.run(state, data, None)

  # --- states -----------------------------------------------------------------------------

  def init(self):
    if self.strategy == "vmap":
      return self._vmap_init(self._values, self._seeds)
    return [self.runner_of(r.index).init(r.seed) for r in self.replicas]

  def abstract_state(self):
    """The shapes of what `checkpoint_state` returns (for restoring a checkpoint)."""
    if self.strategy == "vmap":
      return jax.eval_shape(self._vmap_init, self._values, self._seeds)
    shapes = tuple(self.runner_of(r.index).abstract_state(r.seed) for r in self.replicas)
    return shapes[0] if self.num_replicas == 1 else shapes

  def checkpoint_state(self, states):
    """One pytree of every replica: a single replica's state as a single run saves it."""
    if self.strategy == "vmap":
      return states
    return states[0] if self.num_replicas == 1 else tuple(states)

  def from_checkpoint(self, restored):
    if self.strategy == "vmap":
      return restored
    restored = [restored] if self.num_replicas == 1 else list(restored)
    return [self.runner_of(i).place(s) for i, s in enumerate(restored)]

  def state_of(self, states, i: int) -> RoundState:
    """Replica i's state (a copy under vmap), for evaluation."""
    return take_rows(states, i) if self.strategy == "vmap" else states[i]

  # --- running ----------------------------------------------------------------------------

  def run_round(self, states) -> tuple[Any, list]:
    """One round of every replica: (new states, each replica's RoundReport). Under vmap
    the reports are fetched to the host at once (one transfer, not one per replica)."""
    if self.strategy == "vmap":
      states, report = self._vmap_round(self._values, states, self.data)
      report = jax.device_get(report)
      return states, [take_rows(report, i) for i in range(self.num_replicas)]
    new, reports = [], []
    for i, state in enumerate(states):
      state, report = self.runner_of(i).run_round(state)
      new.append(state)
      reports.append(report)
    return new, reports

  def warm_start(self, states):
    """Each replica's warm start (FedMD's transfer learning), by its point's runner."""
    if not self.runner.algorithm.has_warm_start:
      return states
    warmed = [self.runner_of(i).warm_start(self.state_of(states, i))
              for i in range(self.num_replicas)]
    return stack_trees(warmed) if self.strategy == "vmap" else warmed

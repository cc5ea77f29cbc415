"""Runs rounds of an algorithm on a dataset: init, warm start, run_round, compile.

The runner only wires the pieces together: the algorithm's architecture groups
(`Groups`), where client state lives (a store), how clients execute (an executor),
and the round written once (`RoundProtocol`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fml_jax.errors import ConfigError
from fml_jax.rounds import plan as plans
from fml_jax.rounds.algorithm import Algorithm
from fml_jax.rounds.availability import Availability
from fml_jax.rounds.executors import CPU_VMAP_MAX_STEPS, Vmap, choose_executor
from fml_jax.rounds.protocol import AGGREGATIONS, RoundProtocol
from fml_jax.rounds.sampling import Groups
from fml_jax.rounds.stores import make_store
from fml_jax.rounds.types import RoundReport, RoundState
from fml_jax.trees import take_rows

# A warm start draws from a key no round uses (round r folds in r).
WARM_START_FOLD = 2**31 - 1


def seed_keys(seed) -> tuple[jax.Array, jax.Array]:
  """(the key the models are initialized from, the run's base key for rounds) of a
  seed. Raw uint32 keys (not typed keys) so the state stays plain arrays for
  checkpoints."""
  init_key, rounds_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, rounds_key


class Runner:
  """Rounds of `algorithm` on `data`: `strategy` picks the executor, `placement` the
  store, `mesh` the devices the client axis is split over."""

  def __init__(self, algorithm: Algorithm, data, clients_per_round: int,
               aggregation: str = "auto", strategy: str = "auto", chunk_size: int = 0,
               mesh: Optional[Mesh] = None, placement: str = "device"):
    if aggregation not in AGGREGATIONS:
      raise ConfigError("aggregation", f"unknown aggregation '{aggregation}'; choose one of "
                        f"{', '.join(AGGREGATIONS)}")
    if not 1 <= clients_per_round <= data.num_clients:
      raise ConfigError("clients_per_round", f"{clients_per_round} is not between 1 and "
                        f"num_clients={data.num_clients}")
    self.algorithm = algorithm
    self.clients_per_round = clients_per_round
    self.aggregation = algorithm.default_aggregation if aggregation == "auto" else aggregation
    self.groups = Groups.of(algorithm.client_groups(data.num_clients), clients_per_round)
    self.store = make_store(placement, self.groups, mesh)
    self.data = self.store.place_data(data)
    self._init = jax.jit(algorithm.init, static_argnums=1)   # thousands of models: not eagerly
    self._plans = {}   # shapes of the state -> RoundPlan (see plan()); the auto rule reads one
    protocol = RoundProtocol(algorithm, self.groups, self.aggregation, Vmap(), self.store,
                             Availability.from_config(algorithm.config))
    if jax.process_count() > 1 and strategy in ("sequential", "debug"):
      raise ConfigError("strategy", f"a run across processes trains the cohort as one program "
                        f"sharded over every process's devices; use vmap, chunked or auto, not "
                        f"{strategy}")
    executor = choose_executor(strategy, chunk_size, lambda: self._cpu_prefers_vmap(protocol))
    self.protocol = dataclasses.replace(protocol, executor=executor)
    self._round = self.store.wrap(executor.build_round(self.protocol), self.data)
    # One function object, so its jitted form is reused (FedMD's bound warm-starts twice).
    self._warm_start_one = lambda server, s, c, d, g: algorithm.warm_start(s, c, d, g)
    self.compiled_flops = 0.0   # of one compiled call, once compile() has run

  # --- what it is made of ---------------------------------------------------------------

  executor = property(lambda self: self.protocol.executor)
  strategy = property(lambda self: self.protocol.executor.name)
  placement = property(lambda self: self.store.placement)
  mesh = property(lambda self: self.store.mesh)
  members = property(lambda self: self.groups.members)
  group_sizes = property(lambda self: self.groups.sizes)
  cohort_sizes = property(lambda self: list(self.groups.cohort_sizes))
  num_groups = property(lambda self: self.groups.num_groups)

  def local_steps_per_round(self) -> int:
    """Local steps every client scans in a round (local_epochs x batches of the longest
    row of the index table)."""
    config = self.algorithm.config
    return config.local_epochs * -(-self.data.max_train // self.algorithm.local_batch_size())

  def _cpu_prefers_vmap(self, protocol) -> bool:
    if jax.process_count() > 1:   # the one strategy that runs across processes
      return True
    if self.local_steps_per_round() > CPU_VMAP_MAX_STEPS:
      return False
    return not plans.uses_convolution(self._plan(protocol, self.abstract_state(0)),
                                      self.algorithm)

  # --- states ---------------------------------------------------------------------------

  def _unplaced_init(self, seed: int) -> RoundState:
    init_key, rounds_key = seed_keys(seed)
    if self.store.init_device() is not None:   # initialize where the population will live
      init_key = jax.device_put(init_key, self.store.init_device())
    server, population = self._init(init_key, tuple(self.groups.sizes))
    return RoundState(round=jnp.zeros((), jnp.int32), key=rounds_key, server=server,
                      population=tuple(population))

  def init(self, seed: int) -> RoundState:
    if jax.process_count() > 1:   # each process computes only its own shards
      shardings = jax.tree.map(lambda x: x.sharding, self.abstract_state(seed))
      return jax.jit(lambda: self._unplaced_init(seed), out_shardings=shardings)()
    return self.store.place(self._unplaced_init(seed))

  def abstract_state(self, seed: int = 0) -> RoundState:
    """The shapes, dtypes (and shardings) of `init(seed)`, without allocating anything."""
    shapes = jax.eval_shape(lambda: self._unplaced_init(seed))
    shardings = self.store.state_shardings(shapes)
    if shardings is None:
      return shapes
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)

  def place(self, state: RoundState) -> RoundState:
    """Puts a state (fresh, or restored from a checkpoint) where the store keeps it."""
    return self.store.place(state)

  # --- running --------------------------------------------------------------------------

  def run_round(self, state: RoundState) -> tuple[RoundState, RoundReport]:
    """One round; the input state's buffers are donated (do not reuse `state`)."""
    return self._round(state)

  def begin_round(self, state: RoundState):
    """The cohort the next round would train (with a copy of each member's state) and
    its context, without running it (for inspection and tests)."""
    cohorts, context = self.protocol.begin(state, self.data)
    return tuple(c.replace(client_state=take_rows(population, c.slots))
                 for c, population in zip(cohorts, state.population)), context

  def warm_start(self, state: RoundState, rows=None) -> RoundState:
    """Runs the algorithm's warm start (FedMD's transfer learning) on every client, before
    the first round; a no-op for algorithms without one. `rows` = (train_idx, train_n)
    replaces every client's data row (the pooled-data bound)."""
    if not self.algorithm.has_warm_start:
      return state
    key = jax.random.fold_in(state.key, WARM_START_FOLD)
    population = []
    for g, members in enumerate(self.groups.members):
      # With the host store this trains on the accelerator, one group at a time.
      group_state = jax.device_put(state.population[g], self.store.cohort_sharding())
      clients = self.groups.client_infos(g, jnp.arange(len(members)), self.data, key, 0,
                                         train_rows=rows)
      population.append(self.executor.run_group(self._warm_start_one, None, group_state,
                                                clients, self.data, g))
    return self.store.place(state.replace(population=tuple(population)))

  # --- ahead of time --------------------------------------------------------------------

  def plan(self, state_like: RoundState) -> plans.RoundPlan:
    return self._plan(self.protocol, state_like)

  def _plan(self, protocol, state_like: RoundState) -> plans.RoundPlan:
    """The round's plan, traced once per shape of state: the CPU `auto` rule, the bytes
    count and the compile each read it, and tracing every group's client update is a
    large part of a small run's start-up. The plan ignores the executor (it traces under
    vmap), the one part of the protocol the runner replaces."""
    leaves, treedef = jax.tree.flatten(state_like)
    key = (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    if key not in self._plans:
      self._plans[key] = plans.make_plan(protocol, self.data, state_like)
    return self._plans[key]

  def compile(self, state_like: RoundState) -> dict:
    """Compiles the round for states shaped like `state_like`; later rounds run the
    compiled program. Returns XLA's memory analysis, in bytes: {"temp": scratch memory
    (for sequential: plus what the loop holds across clients), "output": new buffers,
    "alias": outputs written in place}."""
    compiled = self.executor.compile(self.protocol, self.plan(state_like))
    self.protocol = compiled.protocol
    self._round = self.store.wrap(compiled.round_fn, self.data)
    self.compiled_flops = compiled.flops
    return {"temp": compiled.temp, "output": compiled.output, "alias": compiled.alias}

  def communication(self, state_like: RoundState) -> dict:
    """Bytes sent up (clients to server or peers) and down per round, from shapes."""
    return plans.bytes_per_round(self.plan(state_like), self.algorithm, self.clients_per_round)

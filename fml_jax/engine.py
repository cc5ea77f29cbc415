"""The client-execution engine: one federated round over a sampled cohort.

A round is three pure pieces:

  begin_round   sample the cohort (seeded, without replacement), gather its
                persistent state and data rows from the population store;
  client update the algorithm's `client_update`, once per cohort member;
  finish_round  scatter the new client states back, average the uploads over
                the client axis, update the server state.

How the client updates execute is the *strategy* (FedJAX's `for_each_client`):

  vmap        the whole round is one jitted function: the client update is
              vmapped over the cohort (it scans over local steps inside), the
              round state's buffers are donated. The fast path on GPU/TPU.
  chunked     the same jitted round, but `lax.map` over chunks of `chunk_size`
              clients, each chunk vmapped: bounds activation memory for big cohorts.
  sequential  a Python loop over clients of the jitted single-client update,
              with jitted begin/finish. The plain reference the vmap path is
              tested against, and the faster choice on a small CPU.
  auto        vmap on GPU/TPU, sequential on CPU (see WORKSPACE.md for the
              measurements behind this rule).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fml_jax.algorithms.base import Algorithm, ClientInfo, ClientResult, RoundContext
from fml_jax.data import FederatedData
from fml_jax.errors import ConfigError

STRATEGIES = ("auto", "vmap", "chunked", "sequential")
AGGREGATIONS = ("auto", "uniform", "weighted")


@struct.dataclass
class RoundState:
  """Everything a run needs to continue: one pytree, so it can be checkpointed."""
  round: jax.Array      # () int32, rounds completed so far
  key: jax.Array        # the run's base PRNG key; round r uses fold_in(key, r)
  server: Any           # the algorithm's server state (e.g. global params)
  population: Any       # every client's persistent state, leading axis num_clients


@struct.dataclass
class RoundReport:
  """What a round reports besides the new state (all on device; fetch what you need)."""
  metrics: dict              # training metrics, each the mean over the cohort
  cohort: jax.Array          # (k,) the ids of the clients that trained
  client_finite: jax.Array   # (k,) bool: the client's loss, upload and new state are finite
  all_finite: jax.Array      # () bool: every client and the new server state are finite


def tree_is_finite(tree) -> jax.Array:
  """() bool: no NaN or inf in any floating-point leaf."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@struct.dataclass
class Cohort:
  clients: ClientInfo     # the sampled clients (leading axis k = clients_per_round)
  client_state: Any       # their population slices


def tree_bytes(tree) -> int:
  """Bytes of every leaf of a tree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def client_mesh(num_devices: int) -> Optional[Mesh]:
  """A 1-D mesh named 'clients' over the first `num_devices` devices (0: all of them);
  None for a single device (nothing to shard)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError("mesh_shape", f"{num_devices} devices asked for, {len(devices)} available "
                      f"({devices[0].platform}); use 0 for all of them")
  n = num_devices or len(devices)
  return Mesh(np.array(devices[:n]), ("clients",)) if n > 1 else None


def map_over_clients(fn, shared: tuple, per_client: tuple, chunk_size: int = 0):
  """fn(*shared, *one_client) for every client along the leading axis of `per_client`:
  one vmap, or (chunk_size > 0) a `lax.map` over vmapped chunks of that many clients.
  A last partial chunk is padded with copies of the first client and the copies dropped."""
  def one(*clients):
    return fn(*shared, *clients)
  k = jax.tree.leaves(per_client)[0].shape[0]
  if not chunk_size or chunk_size >= k:
    return jax.vmap(one)(*per_client)
  num_chunks = -(-k // chunk_size)
  pad = num_chunks * chunk_size - k
  chunks = jax.tree.map(
      lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]).reshape(
          num_chunks, chunk_size, *x.shape[1:]), per_client)
  out = jax.lax.map(lambda c: jax.vmap(one)(*c), chunks)
  return jax.tree.map(lambda x: x.reshape(num_chunks * chunk_size, *x.shape[2:])[:k], out)


def resolve_strategy(strategy: str) -> str:
  if strategy not in STRATEGIES:
    raise ConfigError("strategy", f"unknown strategy '{strategy}'; choose one of "
                      f"{', '.join(STRATEGIES)}")
  if strategy != "auto":
    return strategy
  return "sequential" if jax.default_backend() == "cpu" else "vmap"


class Engine:
  """Runs rounds of `algorithm` on `data` with the chosen execution strategy."""

  def __init__(self, algorithm: Algorithm, data: FederatedData, clients_per_round: int,
               aggregation: str = "auto", strategy: str = "auto", chunk_size: int = 0,
               mesh: Optional[Mesh] = None):
    if aggregation not in AGGREGATIONS:
      raise ConfigError("aggregation", f"unknown aggregation '{aggregation}'; choose one of "
                        f"{', '.join(AGGREGATIONS)}")
    if not 1 <= clients_per_round <= data.num_clients:
      raise ConfigError("clients_per_round", f"{clients_per_round} is not between 1 and "
                        f"num_clients={data.num_clients}")
    self.algorithm = algorithm
    self.data = data
    self.clients_per_round = clients_per_round
    self.aggregation = algorithm.default_aggregation if aggregation == "auto" else aggregation
    self.strategy = resolve_strategy(strategy)
    self.chunk_size = chunk_size if self.strategy == "chunked" else 0
    if self.strategy == "chunked" and chunk_size < 1:
      raise ConfigError("chunk_size", f"strategy 'chunked' needs chunk_size >= 1, got {chunk_size}")
    self.mesh = mesh
    self.compiled_flops = 0.0   # set by compile()
    if mesh is not None:
      n = mesh.size
      for field, value in (("num_clients", data.num_clients),
                           ("clients_per_round", clients_per_round)):
        if value % n:
          raise ConfigError("mesh_shape", f"the client axis is sharded over {n} devices, so "
                            f"{field} must be a multiple of {n}; it is {value}")
      self.data = jax.device_put(data, NamedSharding(mesh, P()))
    # Jitted: initializing thousands of stacked client models eagerly is slow.
    self._init = jax.jit(algorithm.init, static_argnums=1)
    self._begin = jax.jit(self.begin_round)
    self._client_update = jax.jit(algorithm.client_update)
    self._finish = jax.jit(self.finish_round, donate_argnums=0)
    self._vmap_round = jax.jit(self.vmap_round, donate_argnums=0)

  def compile(self, state_like: RoundState) -> dict:
    """Compiles the round ahead of time for states shaped like `state_like` (arrays or
    `jax.ShapeDtypeStruct`s) and returns XLA's memory analysis of it, in bytes:
    {"temp": scratch memory, "output": new buffers, "alias": outputs written in place}.
    Later rounds run the compiled executable, so nothing is compiled twice.

    For `sequential` the compiled program is one client's update, so the memory the
    loop holds across clients is added to "temp": the gathered cohort, the per-client
    outputs and their stacked copy."""
    held_by_loop = 0
    if self.strategy != "sequential":
      compiled = self._vmap_round.lower(state_like, self.data).compile()
      self._vmap_round = compiled
    else:
      cohort = jax.eval_shape(self.begin_round, state_like, self.data)
      one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
      compiled = self._client_update.lower(state_like.server, one.client_state, one.clients,
                                           self.data).compile()
      self._client_update = compiled
      results = jax.eval_shape(
          jax.vmap(self.algorithm.client_update, in_axes=(None, 0, 0, None)),
          state_like.server, cohort.client_state, cohort.clients, self.data)
      held_by_loop = tree_bytes(cohort) + 2 * tree_bytes(results)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # FLOPs of one compiled call: the whole round (vmap/chunked) or one client (sequential).
    self.compiled_flops = float((cost or {}).get("flops", 0.0))
    stats = compiled.memory_analysis()
    if stats is None:   # some backends do not report it
      return {"temp": held_by_loop, "output": 0, "alias": 0}
    return {"temp": int(stats.temp_size_in_bytes) + held_by_loop,
            "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes)}

  def abstract_state(self, seed: int = 0) -> RoundState:
    """The shapes, dtypes (and shardings) of `init(seed)`, without allocating anything."""
    shapes = jax.eval_shape(lambda: self._unplaced_init(seed))
    if self.mesh is None:
      return shapes
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        self.state_shardings(shapes))

  def state_shardings(self, state):
    """Where each leaf of a round state lives: the population split along its client
    axis over the mesh, everything else replicated; None without a mesh."""
    if self.mesh is None:
      return None
    clients, replicated = NamedSharding(self.mesh, P("clients")), NamedSharding(self.mesh, P())
    return state.replace(round=replicated, key=replicated,
                         server=jax.tree.map(lambda _: replicated, state.server),
                         population=jax.tree.map(lambda _: clients, state.population))

  def place(self, state: RoundState) -> RoundState:
    """Puts a state (fresh, or restored from a checkpoint) where the engine expects it."""
    if self.mesh is None:
      return state
    return jax.device_put(state, self.state_shardings(state))

  def init(self, seed: int) -> RoundState:
    return self.place(self._unplaced_init(seed))

  def _unplaced_init(self, seed: int) -> RoundState:
    # Raw uint32 keys (not typed keys) so the state stays plain arrays for checkpoints.
    init_key, rounds_key = jax.random.split(jax.random.PRNGKey(seed))
    server, population = self._init(init_key, self.data.num_clients)
    return RoundState(round=jnp.zeros((), jnp.int32), key=rounds_key, server=server,
                      population=population)

  # --- the three pieces ------------------------------------------------------------------

  def begin_round(self, state: RoundState, data: FederatedData) -> Cohort:
    round_key = jax.random.fold_in(state.key, state.round)
    ids = jax.random.choice(jax.random.fold_in(round_key, 0), data.num_clients,
                            (self.clients_per_round,), replace=False)
    # A client's key depends on its id, not its position in the cohort.
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(round_key, 1), ids)
    clients = ClientInfo(id=ids, position=jnp.arange(self.clients_per_round, dtype=jnp.int32),
                         train_idx=data.train_idx[ids], train_n=data.train_n[ids], key=keys)
    return Cohort(clients=clients,
                  client_state=jax.tree.map(lambda p: p[ids], state.population))

  def finish_round(self, state: RoundState, cohort: Cohort,
                   results: ClientResult) -> tuple[RoundState, RoundReport]:
    ids = cohort.clients.id
    population = jax.tree.map(lambda p, new: p.at[ids].set(new), state.population,
                              results.client_state)
    if self.aggregation == "weighted":
      weights = cohort.clients.train_n.astype(jnp.float32)
    else:
      weights = jnp.ones(ids.shape, jnp.float32)
    context = RoundContext(round=state.round, clients=cohort.clients,
                           weights=weights / jnp.sum(weights),
                           key=jax.random.fold_in(jax.random.fold_in(state.key, state.round), 2))
    server = self.algorithm.server_update(state.server, results.upload, context)
    # The divergence guard: one flag per client and one for the round, reduced on device.
    client_finite = jax.vmap(tree_is_finite)(
        (results.metrics, results.upload, results.client_state))
    report = RoundReport(metrics=jax.tree.map(jnp.mean, results.metrics), cohort=ids,
                         client_finite=client_finite,
                         all_finite=jnp.all(client_finite) & tree_is_finite(server))
    return state.replace(round=state.round + 1, server=server, population=population), report

  def vmap_round(self, state: RoundState, data: FederatedData) -> tuple[RoundState, RoundReport]:
    cohort = self.shard_clients(self.begin_round(state, data))
    results = map_over_clients(
        lambda server, client_state, client: self.algorithm.client_update(
            server, client_state, client, data),
        (state.server,), (cohort.client_state, cohort.clients), self.chunk_size)
    return self.finish_round(state, cohort, self.shard_clients(results))

  def shard_clients(self, tree):
    """Inside the jitted round: lay a cohort-shaped tree out along the mesh's client axis."""
    if self.mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(self.mesh, P("clients")))

  # --- strategies ----------------------------------------------------------------------

  def sequential_round(self, state: RoundState) -> tuple[RoundState, RoundReport]:
    cohort = self._begin(state, self.data)
    outputs = []
    for i in range(self.clients_per_round):
      client = jax.tree.map(lambda a: a[i], cohort)
      outputs.append(self._client_update(state.server, client.client_state, client.clients,
                                         self.data))
    results = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    return self._finish(state, cohort, results)

  def run_round(self, state: RoundState) -> tuple[RoundState, RoundReport]:
    """One round; the input state's buffers are donated (do not reuse `state`)."""
    if self.strategy == "sequential":
      return self.sequential_round(state)
    return self._vmap_round(state, self.data)

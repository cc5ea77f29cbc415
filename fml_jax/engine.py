"""The client-execution engine: one federated round over a sampled cohort.

A round is a few pure pieces:

  begin_round   sample the cohort (seeded, without replacement, a fixed share from
                each architecture group; a group that takes part whole does so in
                member order, with nothing gathered), gather its persistent state and
                data rows from the population store;
  prepare_round the algorithm's server-side preparation (FedMD: the alignment subset);
  messages      only for algorithms that exchange them (FedMD, FedH2L): every
                cohort member's `client_message`, then the algorithm's `exchange`;
  client update the algorithm's `client_update`, once per cohort member;
  finish_round  scatter the new client states back, hand the uploads (stacked over
                the whole cohort) to the server update.

How the client updates execute is the *strategy* (FedJAX's `for_each_client`):

  vmap        the whole round is one jitted function: the client update is
              vmapped over the cohort (it scans over local steps inside), the
              round state's buffers are donated. The fast path on GPU/TPU.
  chunked     the same jitted round, but `lax.map` over chunks of `chunk_size`
              clients, each chunk vmapped: bounds activation memory for big cohorts.
  sequential  a Python loop over clients of the jitted single-client update,
              with jitted begin/finish. The plain reference the vmap path is
              tested against, and the faster choice on a small CPU.
  auto        vmap on GPU/TPU; on CPU, vmap only for rounds of a few local steps
              without convolutions, else sequential (`resolve_strategy`;
              benchmarks/RESULTS.md has the measurements behind this rule).

Where the population lives is the *placement*:

  device      on the accelerator (sharded over the mesh, if any); the round gathers
              and scatters the cohort inside its jitted function.
  host        in host memory, as arrays on JAX's CPU device: each round the cohort's
              rows are gathered there, moved to the accelerator, trained, moved back
              and written in place (`host_round`). The accelerator then holds only the
              cohort, so the population can outgrow its memory (100,000 FML MLP
              clients are 148 GiB with momentum). Same results as `device`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fml_jax.algorithms.base import Algorithm, ClientInfo, RoundContext, tree_bytes
from fml_jax.data import FederatedData
from fml_jax.errors import ConfigError

STRATEGIES = ("auto", "vmap", "chunked", "sequential")
PLACEMENTS = ("device", "host")
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
  """() bool: no NaN or inf in any floating-point leaf.

  Written as isfinite(sum(x * 0)): every finite entry contributes 0 and a NaN or inf
  makes the sum NaN, so it is exact (no overflow), and a sum is a fast reduction
  where all(isfinite(x)) under vmap is not (6x slower on XLA:CPU, measured on a
  stack of 64 MLP kernels; it was a sixth of a round's time)."""
  flags = [jnp.isfinite(jnp.sum(x - x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@struct.dataclass
class Cohort:
  """One architecture group's part of the round's cohort."""
  clients: ClientInfo     # the sampled clients of the group (leading axis k_g)
  client_state: Any       # their slices of the group's population
  slots: jax.Array        # (k_g,) int32 their rows in the group's population


def take_rows(tree, rows):
  """The rows `rows` of every leaf's leading (client) axis."""
  return jax.tree.map(lambda a: a[rows], tree)


def put_rows(tree, rows, new):
  """`tree` with the rows `rows` of every leaf replaced by `new`'s."""
  return jax.tree.map(lambda a, n: a.at[rows].set(n), tree, new)


def apportion(total: int, sizes: list[int]) -> list[int]:
  """Splits `total` cohort places among groups in proportion to their sizes (largest
  remainder), at least one place per group and at most its size."""
  n = sum(sizes)
  if total < len(sizes):
    raise ConfigError("clients_per_round", f"{total} is fewer than the {len(sizes)} architecture "
                      "groups; every group needs at least one client per round")
  quotas = [total * s / n for s in sizes]
  counts = [max(1, min(s, int(q))) for q, s in zip(quotas, sizes)]
  order = sorted(range(len(sizes)), key=lambda g: quotas[g] - int(quotas[g]), reverse=True)
  while sum(counts) != total:
    step = 1 if sum(counts) < total else -1
    for g in order if step > 0 else order[::-1]:
      if sum(counts) != total and 1 <= counts[g] + step <= sizes[g]:
        counts[g] += step
  return counts


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


# On XLA:CPU a vmapped round beats a loop of single-client updates only while the
# per-client overhead of the loop dominates: up to about 8 local steps per round
# (FML MLP, batch 32, cohorts 10 and 64: 2.8-3.3x at 1 step, 1.1x at 8, 0.8-0.96x at
# 32; benchmarks/RESULTS.md). Beyond that the loop keeps one client's models in cache.
CPU_VMAP_MAX_STEPS = 8


def resolve_strategy(strategy: str, cpu_prefers_vmap=lambda: False) -> str:
  """The strategy to run. `auto`: vmap on GPU/TPU; on CPU, vmap only when
  `cpu_prefers_vmap()` (asked only then; the engine's rule: no convolution in a client
  update, and at most CPU_VMAP_MAX_STEPS local steps per round), else sequential.
  XLA:CPU lowers vmapped convolutions to grouped ones, several times slower than a
  loop over clients."""
  if strategy not in STRATEGIES:
    raise ConfigError("strategy", f"unknown strategy '{strategy}'; choose one of "
                      f"{', '.join(STRATEGIES)}")
  if strategy != "auto":
    return strategy
  if jax.default_backend() != "cpu":
    return "vmap"
  return "vmap" if cpu_prefers_vmap() else "sequential"


SPLIT_CHUNK = 64   # clients cut out of a stacked tree per call (bounds the copies held)


@functools.partial(jax.jit, static_argnums=(2,))
def _clients_at(tree, start, count: int) -> list:
  return [jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start + i, keepdims=False),
                       tree) for i in range(count)]


def split_clients(tree):
  """Yields each client's tree (leading axis removed) of a stacked tree, cut SPLIT_CHUNK
  at a time by one jitted call: eager slicing dispatches once per leaf and client (on
  XLA:CPU 9 ms per FML CNN client, a quarter of its update)."""
  k = jax.tree.leaves(tree)[0].shape[0]
  for start in range(0, k, SPLIT_CHUNK):
    yield from _clients_at(tree, jnp.int32(start), min(SPLIT_CHUNK, k - start))


def concat_clients(trees: list):
  """Concatenates per-group trees along their client axis (the cohort order)."""
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


class Engine:
  """Runs rounds of `algorithm` on `data` with the chosen execution strategy.

  Clients are split into the algorithm's *architecture groups* (clients whose
  persistent state has the same shapes); each group's population is one stacked
  pytree. Every round samples a fixed number of clients from each group (in
  proportion to its size, `apportion`), runs each group's clients together and
  concatenates their uploads into one cohort for the server.
  """

  def __init__(self, algorithm: Algorithm, data: FederatedData, clients_per_round: int,
               aggregation: str = "auto", strategy: str = "auto", chunk_size: int = 0,
               mesh: Optional[Mesh] = None, placement: str = "device"):
    if aggregation not in AGGREGATIONS:
      raise ConfigError("aggregation", f"unknown aggregation '{aggregation}'; choose one of "
                        f"{', '.join(AGGREGATIONS)}")
    if placement not in PLACEMENTS:
      raise ConfigError("placement", f"unknown placement '{placement}'; choose one of "
                        f"{', '.join(PLACEMENTS)}")
    if not 1 <= clients_per_round <= data.num_clients:
      raise ConfigError("clients_per_round", f"{clients_per_round} is not between 1 and "
                        f"num_clients={data.num_clients}")
    self.algorithm = algorithm
    self.data = data
    self.clients_per_round = clients_per_round
    self.aggregation = algorithm.default_aggregation if aggregation == "auto" else aggregation
    self.placement = placement
    # The host store: arrays committed to JAX's CPU device (the accelerator itself on a
    # CPU-only machine, where `host` runs the same code path over the same memory).
    self.host_device = jax.devices("cpu")[0] if placement == "host" else None
    if strategy == "chunked" and chunk_size < 1:
      raise ConfigError("chunk_size", f"strategy 'chunked' needs chunk_size >= 1, got {chunk_size}")
    groups = np.asarray(algorithm.client_groups(data.num_clients))
    self.members = [np.flatnonzero(groups == g) for g in range(int(groups.max()) + 1)]
    if any(len(m) == 0 for m in self.members):
      raise ConfigError("local_models", "an architecture group has no clients")
    self.group_sizes = [len(m) for m in self.members]
    self.cohort_sizes = apportion(clients_per_round, self.group_sizes)
    # Groups that take part whole every round: in member order, with nothing gathered
    # or scattered (on XLA:CPU those were a fifth of an MLP round, and held two extra
    # copies of the population).
    self.whole_group = [k == n for k, n in zip(self.cohort_sizes, self.group_sizes)]
    self.mesh = mesh
    self.compiled_flops = 0.0   # set by compile()
    if mesh is not None:
      n = mesh.size
      # The host store is not sharded, so only the cohort needs to divide evenly.
      for field, values in ((("num_clients", self.group_sizes),) * (placement == "device")
                            + (("clients_per_round", self.cohort_sizes),)):
        if any(v % n for v in values):
          what = "" if len(values) == 1 else " (per architecture group)"
          raise ConfigError("mesh_shape", f"the client axis is sharded over {n} devices, so "
                            f"{field}{what} must be a multiple of {n}; it is "
                            f"{values[0] if len(values) == 1 else values}")
      self.data = jax.device_put(data, NamedSharding(mesh, P()))
    # Jitted: initializing thousands of stacked client models eagerly is slow.
    self._init = jax.jit(algorithm.init, static_argnums=1)
    # The sequential strategy's begin: a group's population used as it is stays outside
    # (a jitted function returning an input unchanged must copy it: 32 ms of a 450 ms
    # CNN round of 8 clients on XLA:CPU).
    self._begin = jax.jit(lambda state, data, slots: self.begin_round(state, data, slots,
                                                                      return_whole=False))
    self._sample = jax.jit(self.sample_slots)
    self._prepare = jax.jit(algorithm.prepare_round)
    self._exchange = jax.jit(algorithm.exchange)
    self._client_message = jax.jit(algorithm.client_message, static_argnums=4)
    self._client_update = jax.jit(algorithm.client_update, static_argnums=4)
    # Jitted once (FedMD's pooled-data bound runs the warm start a second time).
    self._warm_start_one = jax.jit(algorithm.warm_start, static_argnums=3)
    self._warm_start_group = jax.jit(lambda states, clients, data, g: map_over_clients(
        lambda cs, ci: algorithm.warm_start(cs, ci, data, g), (), (states, clients),
        self.chunk_size), static_argnums=3)
    self.chunk_size = 0   # (tracing for `auto` maps plainly)
    self.strategy = resolve_strategy(strategy, self._cpu_prefers_vmap)
    self.chunk_size = chunk_size if self.strategy == "chunked" else 0
    self._compiled_updates: dict = {}
    self._finish_sequential = jax.jit(self.finish_round, donate_argnums=(0, 4))
    self._vmap_round = jax.jit(self.vmap_round, donate_argnums=0)
    # The host store's gather and in-place scatter; they run where the population is.
    self._gather = jax.jit(lambda population, slots: tuple(map(take_rows, population, slots)))
    self._scatter = jax.jit(lambda population, slots, new: tuple(
        map(put_rows, population, slots, new)), donate_argnums=0)

  @property
  def num_groups(self) -> int:
    return len(self.members)

  def compile(self, state_like: RoundState) -> dict:
    """Compiles the round ahead of time for states shaped like `state_like` (arrays or
    `jax.ShapeDtypeStruct`s) and returns XLA's memory analysis of it, in bytes:
    {"temp": scratch memory, "output": new buffers, "alias": outputs written in place}.
    Later rounds run the compiled executable, so nothing is compiled twice.

    For `sequential` the compiled programs are one client's update per group, so the
    memory the loop holds across clients is added to "temp": the gathered cohort (none
    when the whole group takes part, or with the host store, whose cohort is the
    round's input), the per-client outputs and their stacked copy."""
    held_by_loop = 0
    if self.strategy != "sequential":
      compiled = [self._vmap_round.lower(self.round_input(state_like), self.data,
                                         self.slots_like()).compile()]
      self._vmap_round = compiled[0]
    else:
      cohorts, _, server, _ = self.round_shapes(state_like)
      compiled = []
      for g, cohort in enumerate(cohorts):
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
        self._compiled_updates[g] = self._client_update.lower(
            server, one.client_state, one.clients, self.data, g).compile()
        compiled.append(self._compiled_updates[g])
        results = jax.eval_shape(
            jax.vmap(lambda s, c, i: self.algorithm.client_update(s, c, i, self.data, g),
                     in_axes=(None, 0, 0)), server, cohort.client_state, cohort.clients)
        gathered = self.placement == "device" and not self.whole_group[g]
        # The gathered cohort, the clients split_clients has cut out at once, and the
        # per-client outputs with their stacked copy.
        split = min(SPLIT_CHUNK, self.cohort_sizes[g]) / self.cohort_sizes[g]
        held_by_loop += int(tree_bytes(cohort) * (gathered + split)) + 2 * tree_bytes(results)
    flops, temp, output, alias, reported = 0.0, 0, 0, 0, False
    for c in compiled:
      cost = c.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops += float((cost or {}).get("flops", 0.0))
      stats = c.memory_analysis()
      if stats is not None:   # some backends do not report it
        reported = True
        temp = max(temp, int(stats.temp_size_in_bytes))
        output = max(output, int(stats.output_size_in_bytes))
        alias = max(alias, int(stats.alias_size_in_bytes))
    # FLOPs of one compiled call: the whole round (vmap/chunked) or one client per group
    # (sequential).
    self.compiled_flops = flops
    if not reported:
      return {"temp": held_by_loop, "output": 0, "alias": 0}
    return {"temp": temp + held_by_loop, "output": output, "alias": alias}

  def abstract_state(self, seed: int = 0) -> RoundState:
    """The shapes, dtypes (and shardings) of `init(seed)`, without allocating anything."""
    shapes = jax.eval_shape(lambda: self._unplaced_init(seed))
    if self.mesh is None:
      return shapes
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        self.state_shardings(shapes))

  def state_shardings(self, state):
    """Where each leaf of a round state lives: the population split along its client
    axis over the mesh (or on the host, with the host store), everything else
    replicated; None for a device store without a mesh (JAX's default placement)."""
    if self.mesh is None and self.placement == "device":
      return None
    replicated = self.replicated_sharding() or SingleDeviceSharding(jax.devices()[0])
    clients = (SingleDeviceSharding(self.host_device) if self.placement == "host"
               else self.cohort_sharding())
    return state.replace(round=replicated, key=replicated,
                         server=jax.tree.map(lambda _: replicated, state.server),
                         population=jax.tree.map(lambda _: clients, state.population))

  def place(self, state: RoundState) -> RoundState:
    """Puts a state (fresh, or restored from a checkpoint) where the engine expects it."""
    shardings = self.state_shardings(state)
    return state if shardings is None else jax.device_put(state, shardings)

  def cohort_sharding(self):
    """Where a cohort trains: split over the mesh, or on the (first) accelerator."""
    if self.mesh is not None:
      return NamedSharding(self.mesh, P("clients"))
    return SingleDeviceSharding(jax.devices()[0])

  def replicated_sharding(self):
    """Every device of the mesh holds it all; None without a mesh."""
    return NamedSharding(self.mesh, P()) if self.mesh is not None else None

  def round_input(self, state_like: RoundState) -> RoundState:
    """The state the jitted round takes: the state itself for a device store; with
    the host store, its population replaced by the cohort's rows (shapes only)."""
    if self.placement == "device":
      return state_like
    sharding = self.cohort_sharding()
    cohort = tuple(jax.tree.map(
        lambda x, k=k: jax.ShapeDtypeStruct((k, *x.shape[1:]), x.dtype, sharding=sharding),
        group) for group, k in zip(state_like.population, self.cohort_sizes))
    return state_like.replace(population=cohort)

  def slots_like(self):
    """The shapes of `sample_slots`'s output with the host store (None otherwise)."""
    if self.placement == "device":
      return None
    return tuple(jax.ShapeDtypeStruct((k,), jnp.int32, sharding=self.replicated_sharding())
                 for k in self.cohort_sizes)

  def init(self, seed: int) -> RoundState:
    return self.place(self._unplaced_init(seed))

  def _unplaced_init(self, seed: int) -> RoundState:
    # Raw uint32 keys (not typed keys) so the state stays plain arrays for checkpoints.
    init_key, rounds_key = jax.random.split(jax.random.PRNGKey(seed))
    if self.placement == "host":   # initialize where the population will live
      init_key = jax.device_put(init_key, self.host_device)
    server, population = self._init(init_key, tuple(self.group_sizes))
    return RoundState(round=jnp.zeros((), jnp.int32), key=rounds_key, server=server,
                      population=tuple(population))

  # --- the pieces of a round -------------------------------------------------------------

  def sample_slots(self, key: jax.Array, round_number: jax.Array) -> tuple:
    """Each group's cohort: (k_g,) int32 rows of its population, drawn without
    replacement from (key, round) alone; the whole group in member order when it all
    takes part."""
    sample_key = jax.random.fold_in(jax.random.fold_in(key, round_number), 0)
    slots = []
    for g, (members, k) in enumerate(zip(self.members, self.cohort_sizes)):
      if self.whole_group[g]:
        slots.append(jnp.arange(k, dtype=jnp.int32))
      else:
        group_key = sample_key if self.num_groups == 1 else jax.random.fold_in(sample_key, g)
        slots.append(jax.random.choice(group_key, len(members), (k,),
                                       replace=False).astype(jnp.int32))
    return tuple(slots)

  def begin_round(self, state: RoundState, data: FederatedData, slots: Optional[tuple] = None,
                  return_whole: bool = True) -> tuple[tuple, RoundContext]:
    """Samples each group's share of the cohort (without replacement, within the group),
    gathers its state and data rows; returns the per-group cohorts and the round's context.
    With the host store, `slots` is the sample already drawn and `state.population`
    already holds just the cohort's rows. `return_whole=False`: a cohort that is a
    group's population as it is gets `client_state=None` (the caller has it)."""
    round_key = jax.random.fold_in(state.key, state.round)
    client_key = jax.random.fold_in(round_key, 1)
    gathered = slots is not None
    if slots is None:
      slots = self.sample_slots(state.key, state.round)
    cohorts, offset = [], 0
    for g, (members, k) in enumerate(zip(self.members, self.cohort_sizes)):
      ids = jnp.asarray(members, jnp.int32)[slots[g]]
      # A client's key depends on its id, not its position in the cohort.
      keys = jax.vmap(jax.random.fold_in, (None, 0))(client_key, ids)
      clients = ClientInfo(id=ids, position=offset + jnp.arange(k, dtype=jnp.int32),
                           train_idx=data.train_rows(ids), train_n=data.train_n[ids], key=keys,
                           round=jnp.full((k,), state.round, jnp.int32))
      if self.whole_group[g] or gathered:   # the population (or the host's cohort) as it is
        client_state = state.population[g] if return_whole else None
      else:
        client_state = take_rows(state.population[g], slots[g])
      cohorts.append(Cohort(clients=clients, client_state=client_state, slots=slots[g]))
      offset += k
    everyone = concat_clients([c.clients for c in cohorts])
    if self.aggregation == "weighted":
      weights = everyone.train_n.astype(jnp.float32)
    else:
      weights = jnp.ones(everyone.id.shape, jnp.float32)
    context = RoundContext(round=state.round, clients=everyone, weights=weights / jnp.sum(weights),
                           key=jax.random.fold_in(round_key, 2))
    return tuple(cohorts), context

  def finish_round(self, state: RoundState, server: Any, cohorts: tuple, context: RoundContext,
                   results: tuple) -> tuple[RoundState, RoundReport]:
    """Scatters each group's new client states back and updates the server with the
    uploads of the whole cohort (concatenated across groups, in cohort order)."""
    population = []
    for g, (cohort, result) in enumerate(zip(cohorts, results)):
      # The whole group in member order, or the host store's cohort (scattered on the host).
      if self.whole_group[g] or self.placement == "host":
        population.append(result.client_state)
      else:
        population.append(put_rows(state.population[g], cohort.slots, result.client_state))
    uploads = concat_clients([r.upload for r in results])
    metrics = concat_clients([r.metrics for r in results])
    server = self.algorithm.server_update(server, uploads, context)
    # The divergence guard: one flag per client and one for the round, reduced on device.
    client_finite = jnp.concatenate([jax.vmap(tree_is_finite)(
        (r.metrics, r.upload, r.client_state)) for r in results])
    report = RoundReport(metrics=jax.tree.map(jnp.mean, metrics), cohort=context.clients.id,
                         client_finite=client_finite,
                         all_finite=jnp.all(client_finite) & tree_is_finite(server))
    return state.replace(round=state.round + 1, server=server,
                         population=tuple(population)), report

  def _map_group(self, fn, server, cohort: Cohort, data, group: int):
    return map_over_clients(
        lambda s, client_state, client: fn(s, client_state, client, data, group),
        (server,), (cohort.client_state, cohort.clients), self.chunk_size)

  def vmap_round(self, state: RoundState, data: FederatedData,
                 slots: Optional[tuple] = None) -> tuple[RoundState, RoundReport]:
    cohorts, context = self.begin_round(state, data, slots)
    cohorts = tuple(self.shard_clients(c) for c in cohorts)
    server = self.algorithm.prepare_round(state.server, context, data)
    if self.algorithm.exchanges_messages:
      messages = concat_clients([self._map_group(self.algorithm.client_message, server, c, data, g)
                                 for g, c in enumerate(cohorts)])
      server = self.algorithm.exchange(server, self.shard_clients(messages), context)
    results = tuple(self.shard_clients(self._map_group(self.algorithm.client_update, server, c,
                                                       data, g))
                    for g, c in enumerate(cohorts))
    return self.finish_round(state, server, cohorts, context, results)

  def shard_clients(self, tree):
    """Inside the jitted round: lay a cohort-shaped tree out along the mesh's client axis."""
    if self.mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, self.cohort_sharding())

  # --- strategies ----------------------------------------------------------------------

  def sequential_round(self, state: RoundState,
                       slots: Optional[tuple] = None) -> tuple[RoundState, RoundReport]:
    cohorts, context = self._begin(state, self.data, slots)
    cohorts = tuple(c if c.client_state is not None else c.replace(client_state=population)
                    for c, population in zip(cohorts, state.population))
    server = self._prepare(state.server, context, self.data)

    def each_client(fn):
      per_group = []
      for g, cohort in enumerate(cohorts):
        outputs = [fn(g)(server, client.client_state, client.clients, self.data)
                   for client in split_clients(cohort)]
        per_group.append(jax.tree.map(lambda *xs: jnp.stack(xs), *outputs))
      return per_group

    if self.algorithm.exchanges_messages:
      messages = concat_clients(each_client(
          lambda g: lambda *args: self._client_message(*args, g)))
      server = self._exchange(server, messages, context)
    results = each_client(lambda g: self._compiled_updates.get(g) or (
        lambda *args: self._client_update(*args, g)))
    # Only the ids travel (a cohort's state may be the population, donated as `state`);
    # the stacked results are donated too, so the new population is written in place.
    cohorts = tuple(c.replace(client_state=None) for c in cohorts)
    with warnings.catch_warnings():
      # Of the old population and the new states, one has no output to be written into;
      # donated anyway, it is freed at once instead of after the round.
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      return self._finish_sequential(state, server, cohorts, context, tuple(results))

  def warm_start(self, state: RoundState, rows=None) -> RoundState:
    """Runs the algorithm's warm start (FedMD's transfer learning) on every client, before
    the first round; a no-op for algorithms without one. `rows` = (train_idx, train_n)
    replaces every client's data row (the pooled-data bound)."""
    if not self.algorithm.has_warm_start:
      return state
    # A key no round uses (round r folds in r), so warm start and rounds draw independently.
    key = jax.random.fold_in(state.key, 2**31 - 1)
    population = []
    for g, members in enumerate(self.members):
      ids = jnp.asarray(members, jnp.int32)
      group_state = state.population[g]
      if self.placement == "host":   # trains on the accelerator, one group at a time
        group_state = jax.device_put(group_state, self.cohort_sharding())
      idx, n = (self.data.train_rows(ids), self.data.train_n[ids]) if rows is None else (
          jnp.broadcast_to(rows[0], (len(members), rows[0].shape[0])),
          jnp.broadcast_to(rows[1], (len(members),)))
      clients = ClientInfo(id=ids, position=jnp.arange(len(members), dtype=jnp.int32),
                           train_idx=idx, train_n=n,
                           key=jax.vmap(jax.random.fold_in, (None, 0))(key, ids),
                           round=jnp.zeros(len(members), jnp.int32))
      if self.strategy == "sequential":
        outputs = [self._warm_start_one(client_state, client, self.data, g)
                   for client_state, client in split_clients((group_state, clients))]
        population.append(jax.tree.map(lambda *xs: jnp.stack(xs), *outputs))
      else:
        population.append(self._warm_start_group(group_state, clients, self.data, g))
    return self.place(state.replace(population=tuple(population)))

  def run_round(self, state: RoundState) -> tuple[RoundState, RoundReport]:
    """One round; the input state's buffers are donated (do not reuse `state`)."""
    if self.placement == "host":
      return self.host_round(state)
    if self.strategy == "sequential":
      return self.sequential_round(state)
    return self._vmap_round(state, self.data, None)

  def host_round(self, state: RoundState) -> tuple[RoundState, RoundReport]:
    """A round with the host store: draw the cohort, gather its rows on the host, move
    them to the accelerator, run the round on them (any strategy), move the new rows
    back and write them into the population in place."""
    slots = self._sample(state.key, state.round)
    host_slots = jax.device_put(slots, self.host_device)
    cohort = jax.device_put(self._gather(state.population, host_slots), self.cohort_sharding())
    round_state = state.replace(population=cohort)
    if self.strategy == "sequential":
      new, report = self.sequential_round(round_state, slots)
    else:
      new, report = self._vmap_round(round_state, self.data, slots)
    population = self._scatter(state.population, host_slots,
                               jax.device_put(new.population, self.host_device))
    return new.replace(population=population), report

  def local_steps_per_round(self) -> int:
    """Local steps every client scans in a round (local_epochs x batches of the longest
    row of the index table)."""
    config = self.algorithm.config
    return config.local_epochs * -(-self.data.max_train // config.batch_size)

  def _cpu_prefers_vmap(self) -> bool:
    return (self.local_steps_per_round() <= CPU_VMAP_MAX_STEPS
            and not self._uses_convolution())

  def _uses_convolution(self) -> bool:
    """Whether any group's client update contains a convolution (traced, not run)."""
    cohorts, _, server, _ = self.round_shapes(self.abstract_state(0))
    for g, cohort in enumerate(cohorts):
      one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
      jaxpr = jax.make_jaxpr(lambda s, c, i, g=g: self.algorithm.client_update(
          s, c, i, self.data, g))(server, one.client_state, one.clients)
      if "conv_general_dilated" in str(jaxpr):
        return True
    return False

  def round_shapes(self, state_like: RoundState):
    """Shapes inside a round: (cohorts, context, the server state the client updates
    see, the messages per group), without computing anything."""
    cohorts, context = jax.eval_shape(self.begin_round, self.round_input(state_like), self.data,
                                      self.slots_like())
    server = jax.eval_shape(self.algorithm.prepare_round, state_like.server, context, self.data)
    messages = []
    if self.algorithm.exchanges_messages:
      messages = [jax.eval_shape(
          lambda s, c, g=g: self._map_group(self.algorithm.client_message, s, c, self.data, g),
          server, cohort) for g, cohort in enumerate(cohorts)]
      server = jax.eval_shape(lambda s, m, c: self.algorithm.exchange(s, concat_clients(m), c),
                              server, messages, context)
    return cohorts, context, server, messages

  def communication(self, state_like: RoundState) -> dict:
    """Bytes sent up (clients to server or peers) and down per round, from shapes."""
    cohorts, _, server, messages = self.round_shapes(state_like)
    uploads = [jax.eval_shape(
        lambda s, c, g=g: self._map_group(self.algorithm.client_update, s, c, self.data, g),
        server, cohort).upload for g, cohort in enumerate(cohorts)]
    return self.algorithm.communication(server, tree_bytes(uploads), tree_bytes(messages),
                                        self.clients_per_round)

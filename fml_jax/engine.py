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
  sequential  a Python loop over clients of the jitted single-client update,
              with jitted begin/finish. The plain reference the vmap path is
              tested against, and the faster choice on a small CPU.
  auto        vmap on GPU/TPU, sequential on CPU (see WORKSPACE.md for the
              measurements behind this rule).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fml_jax.algorithms.base import Algorithm, ClientInfo, ClientResult, RoundContext
from fml_jax.data import FederatedData
from fml_jax.errors import ConfigError

STRATEGIES = ("auto", "vmap", "sequential")
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
               aggregation: str = "auto", strategy: str = "auto"):
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
    Later rounds run the compiled executable, so nothing is compiled twice."""
    if self.strategy == "vmap":
      compiled = self._vmap_round.lower(state_like, self.data).compile()
      self._vmap_round = compiled
    else:
      cohort = jax.eval_shape(self.begin_round, state_like, self.data)
      one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), cohort)
      compiled = self._client_update.lower(state_like.server, one.client_state, one.clients,
                                           self.data).compile()
      self._client_update = compiled
    stats = compiled.memory_analysis()
    if stats is None:   # some backends do not report it
      return {"temp": 0, "output": 0, "alias": 0}
    return {"temp": int(stats.temp_size_in_bytes), "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes)}

  def abstract_state(self, seed: int = 0) -> RoundState:
    """The shapes and dtypes of `init(seed)`, without allocating anything."""
    return jax.eval_shape(lambda: self.init(seed))

  def init(self, seed: int) -> RoundState:
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
    cohort = self.begin_round(state, data)
    results = jax.vmap(self.algorithm.client_update, in_axes=(None, 0, 0, None))(
        state.server, cohort.client_state, cohort.clients, data)
    return self.finish_round(state, cohort, results)

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
    if self.strategy == "vmap":
      return self._vmap_round(state, self.data)
    return self.sequential_round(state)

"""One federated round, written once: begin, the client phase, finish.

  begin        sample the cohort (unless the store drew it already), build each
               member's ClientInfo and the aggregation weights;
  client phase take the cohort's persistent state from the store, the algorithm's
               `prepare_round`, then (algorithms that exchange messages) every member's
               `client_message` and the server's `exchange`, then every member's
               `client_update`;
  finish       put the new client states back, `server_update` on the uploads of the
               whole cohort (groups concatenated in cohort order), the divergence flags.

The protocol is pure and knows nothing of how clients execute or where state lives:
it asks its *executor* (fml_jax/rounds/executors.py) to map a per-client function over
a group and to prepare each server-side stage (jitted or not), and its *store*
(fml_jax/rounds/stores.py) to take and put a group's rows and to lay a cohort out
over devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from fml_jax.rounds.algorithm import Algorithm
from fml_jax.rounds.availability import Availability
from fml_jax.rounds.sampling import Groups
from fml_jax.rounds.types import ClientResult, Cohort, RoundContext, RoundReport, RoundState
from fml_jax.trees import concat_clients, tree_is_finite

AGGREGATIONS = ("auto", "uniform", "weighted")


def keep_where(mask: jax.Array, new, old):
  """Per client (leading axis): `new` where `mask`, else `old`."""
  return jax.tree.map(lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                      new, old)


@dataclasses.dataclass(frozen=True, eq=False)
class RoundProtocol:
  algorithm: Algorithm
  groups: Groups
  aggregation: str       # "uniform" | "weighted" (resolved from "auto")
  executor: Any          # executors.Executor
  store: Any             # stores.Store
  availability: Optional[Availability] = None   # dropouts and stragglers (None: none)

  def begin(self, state: RoundState, data, slots: Optional[tuple] = None):
    """(per-group cohorts without their state, the round's context). `slots`: the
    sample, when the store has drawn it already."""
    round_key = jax.random.fold_in(state.key, state.round)
    client_key = jax.random.fold_in(round_key, 1)
    if slots is None:
      slots = self.groups.sample(state.key, state.round)
    cohorts, reports, offset = [], [], 0
    for g, k in enumerate(self.groups.cohort_sizes):
      clients = self.groups.client_infos(g, slots[g], data, client_key, state.round, offset)
      if self.availability is not None:
        group_reports, work = self.availability.draw(round_key, clients.id)
        reports.append(group_reports)
        if self.availability.has_stragglers:
          clients = clients.replace(work=work)
      cohorts.append(Cohort(clients=clients, slots=slots[g]))
      offset += k
    everyone = concat_clients([c.clients for c in cohorts])
    if self.aggregation == "weighted":
      weights = everyone.train_n.astype(jnp.float32)
    else:
      weights = jnp.ones(everyone.id.shape, jnp.float32)
    reports = jnp.concatenate(reports) if reports else None
    if reports is not None:   # clients that did not report weigh nothing
      weights = jnp.where(reports, weights, 0.0)
    total = jnp.sum(weights)
    context = RoundContext(round=state.round, clients=everyone,
                           weights=weights / jnp.where(total > 0, total, 1.0),
                           key=jax.random.fold_in(round_key, 2), reports=reports)
    return tuple(cohorts), context

  def client_states(self, state: RoundState, cohorts: tuple) -> tuple:
    """Each group's cohort's persistent state, from the store."""
    return tuple(self.store.take(g, state.population[g], c.slots) for g, c in enumerate(cohorts))

  def client_phase(self, server, client_states: tuple, cohorts: tuple, context: RoundContext,
                   data) -> tuple[Any, tuple]:
    """(the server state the clients saw, each group's stacked ClientResults)."""
    ex, alg = self.executor, self.algorithm
    server = ex.stage("prepare_round", alg.prepare_round)(server, context, data)
    if alg.exchanges_messages:
      messages = concat_clients([ex.map_group(alg.client_message, server, s, c.clients, data, g)
                                 for g, (s, c) in enumerate(zip(client_states, cohorts))])
      server = ex.stage("exchange", alg.exchange)(server, ex.shard(self.store, messages), context)
    results = tuple(ex.shard(self.store, ex.map_group(alg.client_update, server, s, c.clients,
                                                      data, g))
                    for g, (s, c) in enumerate(zip(client_states, cohorts)))
    return server, results

  def finish(self, state: RoundState, server, cohorts: tuple, context: RoundContext,
             results: tuple[ClientResult, ...]) -> tuple[RoundState, RoundReport]:
    population, offset = [], 0
    for g, (c, r) in enumerate(zip(cohorts, results)):
      new, k = r.client_state, self.groups.cohort_sizes[g]
      if context.reports is not None:   # a client that did not report keeps its old state
        old = self.store.take(g, state.population[g], c.slots)
        new = keep_where(context.reports[offset:offset + k], new, old)
      population.append(self.store.put(g, state.population[g], c.slots, new))
      offset += k
    population = tuple(population)
    uploads = concat_clients([r.upload for r in results])
    client_metrics = concat_clients([r.metrics for r in results])
    if context.reports is None:
      metrics = jax.tree.map(jnp.mean, client_metrics)
    else:   # the means of the clients that reported
      count = jnp.maximum(jnp.sum(context.reports), 1)
      metrics = jax.tree.map(lambda m: jnp.sum(jnp.where(context.reports, m, 0.0)) / count,
                             client_metrics)
    new_server, server_metrics = self.algorithm.server_update(server, uploads, context)
    if context.reports is not None:   # nobody reported: the server state stays as it was
      anyone = jnp.any(context.reports)
      new_server = jax.tree.map(lambda n, o: jnp.where(anyone, n, o), new_server, server)
      straggling = (jnp.sum(context.clients.work < 1.0) if context.clients.work is not None
                    else jnp.int32(0))
      server_metrics = {**server_metrics,
                        "clients_dropped": jnp.sum(~context.reports).astype(jnp.float32),
                        "clients_straggling": straggling.astype(jnp.float32),
                        "round_skipped": (~anyone).astype(jnp.float32)}
    server = new_server
    # The divergence guard: one flag per client and one for the round, reduced on device.
    client_finite = jnp.concatenate([jax.vmap(tree_is_finite)(
        (r.metrics, r.upload, r.client_state)) for r in results])
    report = RoundReport(metrics={**metrics, **server_metrics}, cohort=context.clients.id,
                         client_finite=client_finite,
                         all_finite=jnp.all(client_finite) & tree_is_finite(server))
    report = self.store.replicate(report)   # the host reads it (on every process)
    return state.replace(round=state.round + 1, server=server, population=population), report

  def run(self, state: RoundState, data, slots: Optional[tuple] = None):
    """The whole round: inside one jitted function, or stage by stage, as the executor
    prepares each stage."""
    ex = self.executor
    cohorts, context = ex.stage("begin", self.begin)(state, data, slots)
    client_states = ex.take(self, state, cohorts)
    server, results = self.client_phase(state.server, client_states, cohorts, context, data)
    return ex.stage("finish", self.finish, donate_argnums=(0, 4))(
        state, server, cohorts, context, results)

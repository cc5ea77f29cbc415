"""The abstract shapes of one round, computed once (nothing is allocated or run).

Read by the bytes-per-round count, the memory estimate, the CPU `auto` rule's
convolution check and the ahead-of-time compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from fml_jax.rounds.executors import Vmap
from fml_jax.trees import concat_clients, one_client_shapes, tree_bytes


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  data: Any            # the (concrete) dataset the round reads
  state: Any           # the round state as stored
  round_input: Any     # the round state the round function takes (the host store: cohort rows)
  slots: Any           # the sample the store passes in (None: the round draws it)
  cohorts: tuple       # per group: Cohort (ClientInfo and slots)
  client_states: tuple  # per group: the cohort's persistent state
  context: Any
  server: Any          # the server state the client updates see (after prepare and exchange)
  messages: tuple      # per group: the messages sent (empty without an exchange)
  results: tuple       # per group: the stacked ClientResults


def make_plan(protocol, data, state_like) -> RoundPlan:
  """The shapes inside a round of `protocol` for states shaped like `state_like`."""
  p = dataclasses.replace(protocol, executor=Vmap())   # shapes do not depend on the executor
  alg, store = p.algorithm, p.store
  round_input, slots = store.round_input(state_like), store.slots_like()
  cohorts, context = jax.eval_shape(p.begin, round_input, data, slots)
  client_states = jax.eval_shape(p.client_states, round_input, cohorts)
  server = jax.eval_shape(alg.prepare_round, state_like.server, context, data)

  def each_group(fn, server):
    return tuple(jax.eval_shape(
        lambda s, cs, c, g=g: p.executor.map_group(fn, s, cs, c.clients, data, g),
        server, states, cohort) for g, (states, cohort) in enumerate(zip(client_states, cohorts)))

  messages = ()
  if alg.exchanges_messages:
    messages = each_group(alg.client_message, server)
    server = jax.eval_shape(lambda s, m, c: alg.exchange(s, concat_clients(m), c),
                            server, messages, context)
  results = each_group(alg.client_update, server)
  return RoundPlan(data, state_like, round_input, slots, cohorts, client_states, context,
                   server, messages, results)


def bytes_per_round(plan: RoundPlan, algorithm, cohort_size: int) -> dict:
  """Bytes sent up (clients to server or peers) and down per round."""
  return algorithm.communication(plan.server, tree_bytes([r.upload for r in plan.results]),
                                 tree_bytes(plan.messages), cohort_size)


def uses_convolution(plan: RoundPlan, algorithm) -> bool:
  """Whether any group's client update contains a convolution (traced, not run)."""
  for g, (states, cohort) in enumerate(zip(plan.client_states, plan.cohorts)):
    jaxpr = jax.make_jaxpr(lambda s, c, i, g=g: algorithm.client_update(s, c, i, plan.data, g))(
        plan.server, one_client_shapes(states), one_client_shapes(cohort.clients))
    if "conv_general_dilated" in str(jaxpr):
      return True
  return False

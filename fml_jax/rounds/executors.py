"""How the clients of a round execute (FedJAX's `for_each_client` backends).

An executor has one way to map a per-client function over a group's cohort
(`map_group`) and one way to prepare each server-side stage of the round (`stage`);
`build_round` turns the protocol into the function a run calls, and `compile` returns
that function compiled ahead of time with XLA's analysis of it.

  Vmap        the whole round is one jitted function: the client update is vmapped
              over the cohort (it scans over local steps inside), the round state's
              buffers are donated. The fast path on GPU/TPU.
  Chunked(n)  the same jitted round, `lax.map` over chunks of n clients, each chunk
              vmapped: bounds activation memory for big cohorts.
  Sequential  a Python loop over clients of the jitted single-client update, each
              server-side stage jitted on its own. The plain reference the others are
              tested against, and the faster choice on a small CPU.
  Debug       no jit at all (`jax.disable_jit`): the loop of Sequential, eagerly; an
              error names the stage and the client (`strategy=debug`).

`choose_executor` resolves a `strategy` setting, including `auto`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fml_jax.errors import ConfigError
from fml_jax.trees import (SPLIT_CHUNK, one_client_shapes, split_clients,
                           stack_trees, take_rows, tree_bytes)

STRATEGIES = ("auto", "vmap", "chunked", "sequential", "debug")


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


@dataclasses.dataclass(frozen=True)
class CompiledRound:
  """A round compiled ahead of time: the protocol to run (its executor holding the
  compiled programs) and XLA's analysis, in bytes and FLOPs of one compiled call."""
  protocol: Any
  round_fn: Callable
  temp: int
  output: int
  alias: int
  flops: float


def _analysis(compiled: list, held_by_loop: int, at_once: int = 1) -> dict:
  """XLA's figures of the compiled programs; `at_once` of them may run concurrently
  (the sequential strategy's clients), each with its own temporaries."""
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
  if not reported:
    return dict(temp=held_by_loop, output=0, alias=0, flops=flops)
  return dict(temp=temp * at_once + held_by_loop, output=output, alias=alias, flops=flops)


class Vmap:
  """The whole round in one jitted function, clients vmapped."""
  name = "vmap"
  chunk_size = 0

  def __init__(self):
    self._jitted: dict = {}

  def stage(self, name: str, fn, donate_argnums=()):
    return fn   # traced into the one jitted round

  def take(self, protocol, state, cohorts):
    return protocol.client_states(state, cohorts)

  def shard(self, store, tree):
    return store.shard(tree)

  def map_group(self, fn, server, states, clients, data, group: int):
    return map_over_clients(lambda s, cs, ci: fn(s, cs, ci, data, group), (server,),
                            (states, clients), self.chunk_size)

  def run_group(self, fn, server, states, clients, data, group: int):
    """map_group called from Python (the warm start): jitted once per function."""
    if fn not in self._jitted:
      self._jitted[fn] = jax.jit(lambda s, cs, ci, d, g: self.map_group(fn, s, cs, ci, d, g),
                                 static_argnums=4)
    return self._jitted[fn](server, states, clients, data, group)

  def build_round(self, protocol) -> Callable:
    return jax.jit(protocol.run, donate_argnums=0)

  def compile(self, protocol, plan) -> CompiledRound:
    compiled = self.build_round(protocol).lower(plan.round_input, plan.data, plan.slots).compile()
    return CompiledRound(protocol, compiled, **_analysis([compiled], 0))


class Chunked(Vmap):
  """Vmap over chunks of `chunk_size` clients, `lax.map` over the chunks."""
  name = "chunked"

  def __init__(self, chunk_size: int):
    super().__init__()
    if chunk_size < 1:
      raise ConfigError("chunk_size", f"strategy 'chunked' needs chunk_size >= 1, got {chunk_size}")
    self.chunk_size = chunk_size


# On a CPU the sequential strategy keeps this many clients' updates running at once,
# each from its own host thread. XLA:CPU's kernels split one operation over the cores
# poorly, while two clients' steps side by side fill both: measured faster per
# client-step for the CNN and LeNet-5 on 2-core machines (benchmarks/RESULTS.md,
# "Convnets on the CPU": "Two clients at once", and the CNN step against the core's
# best). Each client's program and inputs are the same either way, so are its results.
CPU_CONCURRENT_CLIENTS = 2


def concurrent_clients() -> int:
  """How many clients' updates the sequential strategy runs at once on this backend."""
  return CPU_CONCURRENT_CLIENTS if jax.default_backend() == "cpu" else 1


def map_in_order(fn, items, workers: int) -> list:
  """[fn(item) for item in items], with up to `workers` calls running at once on host
  threads (fn should block until its result is ready, so that bounds the work in
  flight); items are drawn lazily, at most 2 * workers ahead of the results."""
  if workers <= 1:
    return [fn(item) for item in items]
  results, pending = [], collections.deque()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for item in items:
      if len(pending) >= 2 * workers:
        results.append(pending.popleft().result())
      pending.append(pool.submit(fn, item))
    results.extend(f.result() for f in pending)
  return results


class Sequential:
  """A loop of jitted single-client calls (concurrent_clients() at a time, in order);
  each stage jitted on its own."""
  name = "sequential"
  chunk_size = 0

  def __init__(self, compiled: dict | None = None, workers: int | None = None):
    self._compiled = dict(compiled or {})   # (fn, group) -> compiled one-client program
    self._jitted: dict = {}
    self.workers = concurrent_clients() if workers is None else workers

  def _jit(self, fn, **kwargs):
    key = (fn, tuple(sorted(kwargs.items())))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(fn, **kwargs)
    return self._jitted[key]

  def stage(self, name: str, fn, donate_argnums=()):
    jitted = self._jit(fn, donate_argnums=donate_argnums)
    if not donate_argnums:
      return jitted

    def donating(*args):
      with warnings.catch_warnings():
        # Invariant (measured): the finish takes the state and the stacked results
        # donated, so the new population is written in place. Of the old population and
        # the new states one has no output to be written into; donated anyway, it is
        # freed at once instead of after the round.
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        return jitted(*args)
    return donating

  def take(self, protocol, state, cohorts):
    # Outside any jit: a whole group's population is used as it is (a jitted function
    # returning an input unchanged must copy it; benchmarks/RESULTS.md, "After the
    # sequential strategy stopped copying").
    return protocol.client_states(state, cohorts)

  def shard(self, store, tree):
    return tree

  def _one_client(self, fn, group: int):
    return self._compiled.get((fn, group)) or (
        lambda *args: self._jit(fn, static_argnums=4)(*args, group))

  def map_group(self, fn, server, states, clients, data, group: int):
    one = self._one_client(fn, group)
    if self.workers <= 1:   # dispatched asynchronously, one after another
      return stack_trees([one(server, s, c, data) for s, c in split_clients((states, clients))])
    return stack_trees(map_in_order(lambda sc: jax.block_until_ready(one(server, *sc, data)),
                                    split_clients((states, clients)), self.workers))

  run_group = map_group

  def build_round(self, protocol) -> Callable:
    return protocol.run

  def compile(self, protocol, plan) -> CompiledRound:
    """Compiles one client's update per group. The memory the loop holds across clients
    is added to "temp": the gathered cohort (none when the whole group takes part, or
    with the host store, whose cohort is the round's input), the clients split_clients
    has cut out at once, and the per-client outputs with their stacked copy."""
    algorithm = protocol.algorithm
    compiled, held_by_loop = {}, 0
    for g, (states, cohort, results) in enumerate(zip(plan.client_states, plan.cohorts,
                                                      plan.results)):
      compiled[(algorithm.client_update, g)] = jax.jit(
          algorithm.client_update, static_argnums=4).lower(
              plan.server, one_client_shapes(states), one_client_shapes(cohort.clients),
              plan.data, g).compile()
      k = protocol.groups.cohort_sizes[g]
      gathered = protocol.store.gathers(g)
      split = min(SPLIT_CHUNK, k) / k
      held_by_loop += (int(tree_bytes((states, cohort.clients)) * (gathered + split))
                       + 2 * tree_bytes(results))
    executor = type(self)(compiled, self.workers)
    protocol = dataclasses.replace(protocol, executor=executor)
    return CompiledRound(protocol, executor.build_round(protocol),
                         **_analysis(list(compiled.values()), held_by_loop, max(1, self.workers)))


class RoundStageError(RuntimeError):
  """An error inside a round under the debug executor, naming the stage and client."""


class Debug(Sequential):
  """Sequential's loop without any jit: values are concrete, errors say where."""
  name = "debug"

  def stage(self, name: str, fn, donate_argnums=()):
    def run(*args):
      try:
        with jax.disable_jit():
          return fn(*args)
      except RoundStageError:
        raise
      except Exception as e:   # pylint: disable=broad-except  (re-raised with the stage)
        raise RoundStageError(f"round stage '{name}': {type(e).__name__}: {e}") from e
    return run

  def map_group(self, fn, server, states, clients, data, group: int):
    outputs = []
    k = jax.tree.leaves(clients)[0].shape[0]
    for i in range(k):
      state, client = take_rows((states, clients), i)
      try:
        with jax.disable_jit():
          outputs.append(fn(server, state, client, data, group))
      except Exception as e:   # pylint: disable=broad-except  (re-raised with the client)
        raise RoundStageError(
            f"{getattr(fn, '__name__', 'client function')} of client {int(client.id)} "
            f"(architecture group {group}, cohort position {int(client.position)}): "
            f"{type(e).__name__}: {e}") from e
    return stack_trees(outputs)

  run_group = map_group

  def compile(self, protocol, plan) -> CompiledRound:
    return CompiledRound(protocol, self.build_round(protocol), 0, 0, 0, 0.0)


# On XLA:CPU a vmapped round beats a loop of single-client updates only while the
# per-client overhead of the loop dominates: up to about 8 local steps per round
# (benchmarks/RESULTS.md, "Steps per round: where vmap stops paying on a CPU"). Beyond
# that the loop keeps one client's models in cache.
CPU_VMAP_MAX_STEPS = 8


def choose_executor(strategy: str, chunk_size: int = 0,
                    cpu_prefers_vmap: Callable[[], bool] = lambda: False):
  """The executor for a `strategy` setting. `auto`: Vmap on GPU/TPU; on CPU, Vmap only
  when `cpu_prefers_vmap()` (asked only then; the runner's rule: no convolution in a
  client update and at most CPU_VMAP_MAX_STEPS local steps per round), else
  Sequential. XLA:CPU lowers vmapped convolutions to grouped ones, several times
  slower than a loop over clients."""
  if strategy not in STRATEGIES:
    raise ConfigError("strategy", f"unknown strategy '{strategy}'; choose one of "
                      f"{', '.join(STRATEGIES)}")
  if strategy == "auto":
    prefers_vmap = jax.default_backend() != "cpu" or cpu_prefers_vmap()
    strategy = "vmap" if prefers_vmap else "sequential"
  return {"vmap": Vmap, "sequential": Sequential, "debug": Debug,
          "chunked": lambda: Chunked(chunk_size)}[strategy]()

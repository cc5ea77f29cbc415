"""The measured speed-ups kept as named invariants (benchmarks/RESULTS.md has the
measurements); each test fails if the invariant is lost. The others have theirs
beside the code they test: population init in place and evaluation in bounded chunks
(tests/test_heterogeneous.py), the convolution whose gradients take XLA:CPU's fast
form (tests/test_conv.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import small_config
from fml_jax import trees
from fml_jax.trees import tree_is_finite
from test_rounds import make_runner


def test_finiteness_guard_is_a_sum_of_x_minus_x_and_exact():
  tree = {"a": jnp.ones((64, 30)), "b": jnp.zeros((64,), jnp.int32)}
  jaxpr = str(jax.make_jaxpr(jax.vmap(tree_is_finite))(tree))
  # One reduction per leaf, then a flag per leaf: never a boolean per element.
  assert "sub a a" in jaxpr and "reduce_sum" in jaxpr and "bool[64,30]" not in jaxpr
  assert bool(tree_is_finite(tree))
  big = jnp.full((3,), jnp.finfo(jnp.float32).max)   # a sum of x would overflow; x - x cannot
  assert bool(tree_is_finite(big))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    assert not bool(tree_is_finite({"a": jnp.ones(4).at[2].set(bad)}))


def test_a_whole_group_is_used_as_it_is_with_nothing_gathered():
  config = small_config(algorithm="fml", clients_per_round=6, num_clients=6)
  runner = make_runner(config, "vmap")
  assert runner.groups.whole == [True]
  population = runner.init(0).population[0]
  assert runner.store.take(0, population, jnp.arange(6)) is population
  new = jax.tree.map(jnp.zeros_like, population)
  assert runner.store.put(0, population, jnp.arange(6), new) is new
  # In the compiled round: no gather or scatter of population rows.
  jaxpr = str(jax.make_jaxpr(runner.protocol.run)(runner.init(0), runner.data, None))
  assert "= scatter[" not in jaxpr   # (.at[rows].set; gradients bring scatter-add)
  partial = make_runner(small_config(algorithm="fml", clients_per_round=4), "vmap")
  jaxpr = str(jax.make_jaxpr(partial.protocol.run)(partial.init(0), partial.data, None))
  assert "= scatter[" in jaxpr   # (the check sees one where there is one)


def test_sequential_finish_writes_the_new_population_in_place():
  config = small_config(algorithm="fml", clients_per_round=4, num_clients=6)
  runner = make_runner(config, "sequential")
  state = runner.init(0)
  old_leaves = jax.tree.leaves(state.population)
  new, _ = runner.run_round(state)
  # The old population was donated to the finish, which wrote the cohort's new rows
  # into it (its buffers now belong to the new population).
  assert all(x.is_deleted() for x in old_leaves)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new.population))


def test_clients_are_cut_out_in_chunks_by_one_jitted_call():
  k = trees.SPLIT_CHUNK + 6   # two calls, the second one short
  tree = {"w": jnp.arange(k * 3.0).reshape(k, 3), "n": jnp.arange(k)}
  calls = []
  original = trees._clients_at
  trees._clients_at = lambda *args: calls.append(args[2]) or original(*args)
  try:
    clients = list(trees.split_clients(tree))
  finally:
    trees._clients_at = original
  assert calls == [trees.SPLIT_CHUNK, 6]
  assert len(clients) == k
  for i in (0, trees.SPLIT_CHUNK - 1, trees.SPLIT_CHUNK, k - 1):
    np.testing.assert_array_equal(clients[i]["w"], tree["w"][i])
    assert int(clients[i]["n"]) == i

"""Small operations on pytrees of stacked client state (leading client axis)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def tree_bytes(tree) -> int:
  """Bytes of every leaf of a tree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def tree_is_finite(tree) -> jax.Array:
  """() bool: no NaN or inf in any floating-point leaf.

  Invariant (measured): written as isfinite(sum(x - x)). Every finite entry
  contributes 0 and a NaN or inf makes the sum NaN, so it is exact (no overflow), and
  a sum is a fast reduction where all(isfinite(x)) under vmap is not (benchmarks/
  RESULTS.md, "What made the CPU path faster").
  tests/test_invariants.py checks the form and the answer."""
  flags = [jnp.isfinite(jnp.sum(x - x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def take_rows(tree, rows):
  """The rows `rows` of every leaf's leading (client) axis."""
  return jax.tree.map(lambda a: a[rows], tree)


def put_rows(tree, rows, new):
  """`tree` with the rows `rows` of every leaf replaced by `new`'s."""
  return jax.tree.map(lambda a, n: a.at[rows].set(n), tree, new)


def concat_clients(trees: list):
  """Concatenates per-group trees along their client axis (the cohort order)."""
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def stack_trees(trees: list):
  """Stacks per-client trees along a new leading (client) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def one_client_shapes(tree):
  """The shapes of one client's slice of a stacked tree of arrays or shapes."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)


SPLIT_CHUNK = 64   # clients cut out of a stacked tree per call (bounds the copies held)


@functools.partial(jax.jit, static_argnums=(2,))
def _clients_at(tree, start, count: int) -> list:
  return [jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, start + i, keepdims=False),
                       tree) for i in range(count)]


def split_clients(tree):
  """Yields each client's tree (leading axis removed) of a stacked tree.

  Invariant (measured): clients are cut SPLIT_CHUNK at a time by one jitted call;
  eager slicing dispatches once per leaf and client (benchmarks/RESULTS.md, "After
  the sequential strategy stopped copying")."""
  k = jax.tree.leaves(tree)[0].shape[0]
  for start in range(0, k, SPLIT_CHUNK):
    yield from _clients_at(tree, jnp.int32(start), min(SPLIT_CHUNK, k - start))

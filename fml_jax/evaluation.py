"""Evaluation: the global model on the global test set, and every client's
personalized model on its own test split (vmapped over clients, in chunks)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fml_jax.algorithms.base import PersonalizedModels
from fml_jax.data import FederatedData
from fml_jax.models import apply_model

# Examples evaluated at once (summed over the clients of a chunk), bounding activation memory.
EXAMPLES_PER_CALL = 4096


def evaluate_rows(model: nn.Module, params, x_all: jax.Array, y_all: jax.Array, idx: jax.Array,
                  count: jax.Array, normalize, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(accuracy, mean loss) of one model on the first `count` rows `idx` of (x_all, y_all)."""
  num_batches = -(-idx.shape[0] // batch_size)
  slots = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  idx = jnp.pad(idx, (0, num_batches * batch_size - idx.shape[0]))

  def body(totals, batch_slots):
    rows = idx[batch_slots]
    logits = apply_model(model, params, normalize(x_all[rows]))
    valid = batch_slots < count
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_all[rows])
    correct = jnp.argmax(logits, -1) == y_all[rows]
    return (totals[0] + jnp.sum(jnp.where(valid, correct, 0)),
            totals[1] + jnp.sum(jnp.where(valid, loss, 0.0))), None

  (correct, loss), _ = jax.lax.scan(body, (jnp.zeros((), jnp.int32), jnp.zeros(())), slots)
  n = jnp.maximum(count, 1)
  return correct / n, loss / n


@functools.partial(jax.jit, static_argnums=(0, 3))
def evaluate_global(model: nn.Module, params, data: FederatedData, batch_size: int = 1000):
  n = data.x_test.shape[0]
  return evaluate_rows(model, params, data.x_test, data.y_test, jnp.arange(n), jnp.asarray(n),
                       data.normalize, min(batch_size, n))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _evaluate_client_chunk(model, params, data, per_client: bool, batch_size: int, idx, count):
  def one(p, i, n):
    return evaluate_rows(model, p, data.x_test, data.y_test, i, n, data.normalize, batch_size)
  return jax.vmap(one, in_axes=(0 if per_client else None, 0, 0))(params, idx, count)


def evaluate_personalized(models: PersonalizedModels, data: FederatedData) -> tuple[np.ndarray, np.ndarray]:
  """Per-client (accuracy, loss) of each client's model on its own test split.

  Clients go through in fixed-size chunks (the last one padded by repeating its
  first entry, then dropped) so one compiled function serves every chunk.
  """
  client_ids = (np.arange(data.num_clients) if models.client_ids is None
                else np.asarray(models.client_ids))
  num = len(client_ids)
  max_test = data.test_idx.shape[1]
  batch_size = min(max_test, 256)
  chunk = max(1, min(num, EXAMPLES_PER_CALL // batch_size))
  accs, losses = [], []
  for start in range(0, num, chunk):
    pos = np.arange(start, start + chunk)
    pos = np.where(pos < num, pos, start)
    ids = client_ids[pos]
    params = jax.tree.map(lambda p: p[pos], models.params) if models.per_client else models.params
    acc, loss = _evaluate_client_chunk(models.model, params, data, models.per_client, batch_size,
                                       data.test_idx[ids], data.test_n[ids])
    keep = min(chunk, num - start)
    accs.append(np.asarray(acc)[:keep])
    losses.append(np.asarray(loss)[:keep])
  return np.concatenate(accs), np.concatenate(losses)

"""Evaluation: the global model on the global test set, and every client's
personalized model on its own test split (vmapped over clients, in chunks)."""

from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fml_jax.data import FederatedData
from fml_jax.models import apply_model
from fml_jax.rounds.types import PersonalizedModels

# Examples evaluated at once (summed over the clients of a chunk), bounding activation memory.
EXAMPLES_PER_CALL = 4096
# Per-client model bytes copied into one chunk at most: with tiny test splits the
# example bound alone would copy thousands of models at once (10,000 FML MLPs with one
# test example each: 6 GiB, enough to kill a run on a 24 GiB machine).
MODEL_BYTES_PER_CALL = 256 * 2**20


def evaluate_rows(model: nn.Module, variables, x_all: jax.Array, y_all: jax.Array,
                  idx: jax.Array, count: jax.Array, normalize, batch_size: int,
                  label_map=None) -> tuple[jax.Array, jax.Array]:
  """(accuracy, mean loss) of one model on the first `count` rows `idx` of (x_all, y_all).

  `variables` = (params, model_state). With `label_map` the labels are mapped into the
  model's task and examples outside the task (-1) are not counted."""
  params, model_state = variables
  num_batches = -(-idx.shape[0] // batch_size)
  slots = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  idx = jnp.pad(idx, (0, num_batches * batch_size - idx.shape[0]))

  def body(totals, batch_slots):
    rows = idx[batch_slots]
    logits = apply_model(model, params, normalize(x_all[rows]), model_state)
    labels = y_all[rows]
    valid = batch_slots < count
    if label_map is not None:
      labels = jnp.asarray(label_map)[labels]
      valid = valid & (labels >= 0)
      labels = jnp.maximum(labels, 0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return (totals[0] + jnp.sum(jnp.where(valid, correct, 0)),
            totals[1] + jnp.sum(jnp.where(valid, loss, 0.0)),
            totals[2] + jnp.sum(valid)), None

  zero = jnp.zeros((), jnp.int32)
  (correct, loss, counted), _ = jax.lax.scan(body, (zero, jnp.zeros(()), zero), slots)
  n = jnp.maximum(counted, 1)
  return correct / n, loss / n


@functools.partial(jax.jit, static_argnums=(0, 3))
def evaluate_global(model: nn.Module, params, data: FederatedData, batch_size: int = 1000,
                    model_state=None):
  n = data.x_test.shape[0]
  return evaluate_rows(model, (params, model_state), data.x_test, data.y_test, jnp.arange(n),
                       jnp.asarray(n), data.normalize, min(batch_size, n))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 8))
def _evaluate_client_chunk(model, variables, data, per_client: bool, batch_size: int, idx, count,
                           label_map, one_at_a_time: bool = False):
  def one(v, i, n):
    return evaluate_rows(model, v, data.x_test, data.y_test, i, n, data.normalize, batch_size,
                         label_map)
  if per_client and one_at_a_time:   # a loop in the program: each client's model on its own
    return jax.lax.map(lambda args: one(*args), (variables, idx, count))
  return jax.vmap(one, in_axes=(0 if per_client else None, 0, 0))(variables, idx, count)


def _one_model_at_a_time() -> bool:
  """Whether per-client models are evaluated one after another inside the chunk instead
  of vmapped. On XLA:CPU a vmap over models turns every convolution into a grouped
  one, which is slow: five `fml_cnn` models on the 10,000 MNIST test images took
  19.6 s vmapped and 4.4 s one at a time on a 2-core CPU, MLPs alike either way
  (benchmarks/evaluation.py; benchmarks/RESULTS.md, "Evaluation")."""
  return jax.default_backend() == "cpu"


def evaluate_personalized(models: PersonalizedModels, data: FederatedData,
                          on_global_test: bool = False,
                          one_at_a_time: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-client (accuracy, loss) of each client's model on its own test split (or, with
  `on_global_test`, on the whole global test set). `one_at_a_time`: per-client models
  one after another within a chunk instead of vmapped (None: on the CPU only).

  Clients go through in fixed-size chunks (the last one padded by repeating its
  first entry, then dropped) so one compiled function serves every chunk.
  """
  client_ids = (np.arange(data.num_clients) if models.client_ids is None
                else np.asarray(models.client_ids))
  num = len(client_ids)
  if on_global_test:
    n_test = data.x_test.shape[0]
    test_rows = lambda rows: jnp.broadcast_to(jnp.arange(n_test), (len(rows), n_test))
    test_n = jnp.asarray([n_test])
    batch_size = min(n_test, 1000)
  else:
    test_rows, test_n = data.test_rows, data.test_n
    batch_size = min(data.max_test, 256)
  variables = (models.params, models.model_state)
  chunk = max(1, min(num, EXAMPLES_PER_CALL // batch_size))
  if models.per_client:
    per_model = sum(x.nbytes for x in jax.tree.leaves(variables)) // max(num, 1)
    chunk = max(1, min(chunk, MODEL_BYTES_PER_CALL // max(per_model, 1)))
  accs, losses = [], []
  for start in range(0, num, chunk):
    pos = np.arange(start, start + chunk)
    pos = np.where(pos < num, pos, start)
    rows = np.zeros_like(pos) if on_global_test else client_ids[pos]
    chunk_vars = (jax.tree.map(lambda p: p[pos], variables) if models.per_client
                  else variables)
    # Onto the data's devices: with the host store (placement "host") the
    # population lives on JAX's CPU device, the test set on the accelerator.
    chunk_vars = jax.device_put(chunk_vars, data.x_test.sharding)
    acc, loss = _evaluate_client_chunk(models.model, chunk_vars, data, models.per_client,
                                       batch_size, test_rows(rows), test_n[rows],
                                       models.label_map,
                                       _one_model_at_a_time() if one_at_a_time is None
                                       else one_at_a_time)
    keep = min(chunk, num - start)
    accs.append(np.asarray(acc)[:keep])
    losses.append(np.asarray(loss)[:keep])
  return np.concatenate(accs), np.concatenate(losses)


def evaluate_all_personalized(models: list[PersonalizedModels], data: FederatedData,
                              on_global_test: bool = False,
                              one_at_a_time: bool | None = None) -> np.ndarray:
  """Accuracy of every evaluated client's model (all groups, concatenated)."""
  return np.concatenate([evaluate_personalized(m, data, on_global_test, one_at_a_time)[0]
                         for m in models])

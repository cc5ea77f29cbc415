"""A client's local training: `local_epochs` passes over its own data in one `lax.scan`.

This is the shared machinery every algorithm's client update uses. It runs for a
single client; an executor maps it over a cohort (vmap or a loop), so it must be
pure and shape-static:

- a client's data is a row of indices padded to the largest client, plus a count;
- every client scans the same number of steps, `local_epochs * ceil(max_n / B)`;
  a step past the client's own data is *masked*: `lax.cond` returns the state
  unchanged (on a single client the step is skipped; under vmap it becomes a select);
- the last, partial batch of an epoch averages its losses over its valid examples,
  as PyTorch's DataLoader (drop_last=False) does;
- each epoch's order is a shuffle of the client's valid examples drawn per
  position, so padding a client's row with more slots does not change its result.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# step_fn(carry, x, y, mask, key) -> (carry, metrics: dict of scalars)
# The key of a step's augmentation: fold_in(the client's round key, this), then the step.
AUGMENT_FOLD = 7
StepFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, dict]]


def steps_per_epoch(max_examples: int, batch_size: int) -> int:
  return -(-max_examples // batch_size)


def epoch_order(key: jax.Array, num_slots: int, count: jax.Array) -> jax.Array:
  """A random order of the slots `[0, count)` followed by the padding slots."""
  slots = jnp.arange(num_slots)
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(slots)
  return jnp.argsort(jnp.where(slots < count, scores, 2.0))


def run_local_steps(step_fn: StepFn, carry: Any, data, train_idx: jax.Array,
                    train_n: jax.Array, key: jax.Array, local_epochs: int,
                    batch_size: int, min_examples: int = 0,
                    work: jax.Array | None = None) -> tuple[Any, dict]:
  """Trains `carry` for `local_epochs` over one client's examples.

  Args:
    step_fn: one optimizer step of the algorithm on a batch.
    carry: the algorithm's trainable state (e.g. two TrainStates for FML).
    data: the `FederatedData` (examples are gathered from it by index).
    train_idx: (max_n,) this client's row of the index table.
    train_n: () how many entries of the row are real.
    key: this client's PRNG key for the round.
    min_examples: a static lower bound on `train_n` (0: unknown). When it fills as
      many batches per epoch as the row does, no step can be past the client's data,
      so steps run unmasked: under vmap a masked step is a select over the whole
      carry, a full extra pass over every client's state per step.
    work: () the share of its steps a straggler completes (None: all). It takes the
      first max(floor(work * steps), 1) of the steps it would take; later ones are
      masked like steps past its data.

  Returns:
    The trained carry and each metric averaged over the steps actually taken.
  """
  max_n = train_idx.shape[0]
  per_epoch = steps_per_epoch(max_n, batch_size)
  shuffle_key, step_key = jax.random.split(key)
  augment_key = jax.random.fold_in(key, AUGMENT_FOLD)
  orders = jax.vmap(lambda e: epoch_order(jax.random.fold_in(shuffle_key, e), max_n, train_n))(
      jnp.arange(local_epochs))
  # Pad each epoch's order to whole batches with an out-of-range slot (never valid).
  orders = jnp.pad(orders, ((0, 0), (0, per_epoch * batch_size - max_n)), constant_values=max_n)

  def take_step(carry, slots, t):
    valid = slots < train_n
    examples = train_idx[jnp.minimum(slots, max_n - 1)]
    # Augmentation (data/augment.py; identity unless the run asks) from its own key.
    x = data.normalize(data.augment_batch(data.x_train[examples],
                                          jax.random.fold_in(augment_key, t)))
    y = data.y_train[examples]
    return step_fn(carry, x, y, valid, jax.random.fold_in(step_key, t))

  # A straggler's budget counts the steps it would really take (not masked ones).
  if work is not None:
    own_steps = local_epochs * steps_per_epoch(train_n, batch_size)
    limit = jnp.maximum(jnp.floor(work * own_steps), 1).astype(jnp.int32)

  def body(carry, t):
    epoch, batch = t // per_epoch, t % per_epoch
    slots = jax.lax.dynamic_slice(orders[epoch], (batch * batch_size,), (batch_size,))
    if work is None and steps_per_epoch(min_examples, batch_size) >= per_epoch:
      carry, metrics = take_step(carry, slots, t)
      return carry, (metrics, jnp.array(True))
    active = batch * batch_size < train_n
    if work is not None:   # steps taken so far: full epochs, then this epoch's batches
      taken = epoch * steps_per_epoch(train_n, batch_size) + batch
      active = active & (taken < limit)
    metrics_shape = jax.eval_shape(take_step, carry, slots, t)[1]
    skip = lambda c, s, t: (c, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape))
    carry, metrics = jax.lax.cond(active, take_step, skip, carry, slots, t)
    return carry, (metrics, active)

  # The first step runs before the scan. Under vmap a carry that starts shared by the
  # cohort (FML's meme, forked from the global model, and its fresh optimizer state)
  # but comes out per client would be broadcast to every client before the loop: a
  # whole extra write and read of the cohort's copies. Outside the loop the first
  # step reads the shared values and writes per-client ones directly.
  num_steps = local_epochs * per_epoch
  carry, (first_metrics, first_active) = body(carry, jnp.int32(0))
  carry, (metrics, active) = jax.lax.scan(body, carry, jnp.arange(1, num_steps))
  metrics, active = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]),
                                 (first_metrics, first_active), (metrics, active))
  steps_taken = jnp.maximum(jnp.sum(active), 1)
  metrics = jax.tree.map(lambda m: jnp.sum(jnp.where(active, m, 0.0)) / steps_taken, metrics)
  return carry, metrics

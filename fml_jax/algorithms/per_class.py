"""Per-class means, the currency of HtFLlib's data-free heterogeneous algorithms:
FedDistill's class logits and FedProto's (FedGH's, FedTGP's) class prototypes are
both a client's per-class mean of some vector over its training outputs, and the
server's per-class mean over the clients that reported that class."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def class_sums(values, labels, mask, num_classes: int):
  """((C, D) per-class sums of the valid rows of `values` (B, D), (C,) their counts).
  Gradients do not flow into the sums."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=values.dtype) * mask[:, None]
  return onehot.T @ jax.lax.stop_gradient(values), onehot.sum(axis=0)


def means(sums, counts):
  """(C, D) per-class means from `class_sums` (0 where a class has no example) and
  (C,) which classes had one."""
  return sums / jnp.maximum(counts, 1.0)[:, None], counts > 0


def mean_over_reports(values, has, reported):
  """The server's step: per class, the unweighted mean of the (k, C, D) uploaded class
  vectors over the k clients whose upload reached it (`reported`, (k,)) and saw that
  class (`has`, (k, C)). Returns ((C, D) global vectors, (C,) which classes have one)."""
  valid = (has & reported[:, None]).astype(values.dtype)   # (k, C)
  count = valid.sum(axis=0)
  mean = jnp.einsum("kc,kcj->cj", valid, values) / jnp.maximum(count, 1.0)[:, None]
  return mean, count > 0


def reported(uploads_has, context):
  """(k,) whether each cohort member's upload reached the server this round."""
  k = uploads_has.shape[0]
  return jnp.ones((k,), bool) if context.reports is None else context.reports


def sgd_over_pairs(params, loss_fn, prototypes, has, key, epochs: int, batch_size: int,
                   learning_rate: float):
  """The server-side training of FedGH and FedTGP (HtFLlib's DataLoader over the round's
  uploaded (prototype, class) pairs, shuffled, `drop_last=False`, and plain SGD): `epochs`
  passes over the valid pairs of (k, C, fd) `prototypes` (`has` (k, C)), each in a fresh
  random order, in batches of `batch_size`, the last one partial.
  `loss_fn(params, reps (B, fd), labels (B,), mask (B,))` is the batch's mean loss over its
  valid rows. Returns (params, the mean batch loss of the last pass)."""
  k, c, fd = prototypes.shape
  reps = prototypes.reshape(k * c, fd)
  labels = jnp.tile(jnp.arange(c), k)
  valid = has.reshape(k * c)
  count = valid.sum()
  slots = k * c
  num_batches = -(-slots // batch_size)

  def epoch(params, epoch_key):
    # Valid pairs first, in random order; then the invalid ones (never used).
    scores = jax.random.uniform(epoch_key, (slots,))
    order = jnp.argsort(jnp.where(valid, scores, 2.0))
    order = jnp.pad(order, (0, num_batches * batch_size - slots))
    position = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)

    def step(params, positions):
      rows = order[positions]
      mask = positions < count
      loss, grads = jax.value_and_grad(loss_fn)(params, reps[rows], labels[rows],
                                                mask.astype(reps.dtype))
      # A batch with no valid pair (past the round's pairs) changes nothing.
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return params, (loss, mask.any())

    params, (batch_losses, used) = jax.lax.scan(step, params, position)
    return params, jnp.sum(batch_losses * used) / jnp.maximum(used.sum(), 1)

  params, epoch_losses = jax.lax.scan(epoch, params, jax.random.split(key, epochs))
  return params, epoch_losses[-1]

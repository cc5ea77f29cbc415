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

"""Loss functions, written to match the official FML code (PyTorch) exactly.

Every loss takes a `mask` of valid examples: padded slots of a client's last,
partial batch count for nothing, and the mean is over the valid examples only
(what PyTorch computes on the short batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fml_jax.tasks import task_log_probs


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the valid examples (PyTorch `CrossEntropyLoss`)."""
  return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def kl_divergence(target_logits: jax.Array, logits: jax.Array, mask: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """KL(p_target || p) with p = softmax(logits / T), summed over classes, averaged over
  examples: PyTorch `KLDivLoss(reduction='batchmean')(log p, p_target)`.

  The target is a constant: no gradient flows into `target_logits`.
  """
  target_logp = jax.nn.log_softmax(jax.lax.stop_gradient(target_logits) / temperature)
  logp = jax.nn.log_softmax(logits / temperature)
  per_example = jnp.sum(jnp.exp(target_logp) * (target_logp - logp), axis=-1)
  return masked_mean(per_example, mask)


def kl_from_log_probs(target_logp: jax.Array, logp: jax.Array, mask: jax.Array) -> jax.Array:
  """KL(p_target || p) from log-probabilities, summed over classes, averaged over the
  valid examples; the target is a constant."""
  target_logp = jax.lax.stop_gradient(target_logp)
  per_example = jnp.sum(jnp.exp(target_logp) * (target_logp - logp), axis=-1)
  return masked_mean(per_example, mask)


def fml_losses(meme_logits: jax.Array, local_logits: jax.Array, labels: jax.Array,
               mask: jax.Array, alpha: float, beta: float, temperature: float = 1.0,
               task=None, local_labels=None) -> tuple[jax.Array, jax.Array]:
  """Deep mutual learning losses of FML (ALGORITHMS.md):

      L_local = alpha * CE(local, y) + (1 - alpha) * KL(p_meme || p_local)
      L_meme  = beta  * CE(meme, y)  + (1 - beta)  * KL(p_local || p_meme)

  Each KL target is a stop-gradient constant, so the gradient of
  `L_meme + L_local` with respect to (meme, local) is each model's own gradient.

  With a client `task` (fml_jax/tasks.py) the local model's logits are in the task's
  classes and `local_labels` are the labels mapped into it; p_meme is then mapped
  into the task's space before both KL terms (the meme's gradient flows through
  the mapping).
  """
  if task is None or task.is_identity:
    loss_local = (alpha * cross_entropy(local_logits, labels, mask)
                  + (1 - alpha) * kl_divergence(meme_logits, local_logits, mask, temperature))
    loss_meme = (beta * cross_entropy(meme_logits, labels, mask)
                 + (1 - beta) * kl_divergence(local_logits, meme_logits, mask, temperature))
    return loss_meme, loss_local
  meme_logp = task_log_probs(jax.nn.log_softmax(meme_logits / temperature), task)
  local_logp = jax.nn.log_softmax(local_logits / temperature)
  loss_local = (alpha * cross_entropy(local_logits, local_labels, mask)
                + (1 - alpha) * kl_from_log_probs(meme_logp, local_logp, mask))
  loss_meme = (beta * cross_entropy(meme_logits, labels, mask)
               + (1 - beta) * kl_from_log_probs(local_logp, meme_logp, mask))
  return loss_meme, loss_local


def proximal_term(params, anchor_params) -> jax.Array:
  """||w - w_anchor||^2 over all leaves (FedProx's term, without mu / 2)."""
  sq = jax.tree.map(lambda w, a: jnp.sum(jnp.square(w - jax.lax.stop_gradient(a))),
                    params, anchor_params)
  return sum(jax.tree.leaves(sq))

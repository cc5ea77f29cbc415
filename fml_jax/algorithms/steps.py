"""One optimizer step on a loss, for one model or several trained together.

Every algorithm's local step is value_and_grad of its loss, the optimizer update,
and the model's non-trainable state (batch norm statistics) carried along; this is
that, written once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fml_jax import losses
from fml_jax.models import forward
from fml_jax.optimizers import TrainState


def loss_step(states, loss_fn, optimizer, lr_scale=1.0, grad_offset=None):
  """One step of every TrainState in `states` (one TrainState, or a tuple of them
  trained on one joint loss) on `loss_fn(params, model_states) -> (loss, (new
  model_states, aux))`, where params and model_states are shaped like `states`.
  `grad_offset` (params-shaped like `states`) is added to the gradient before the
  optimizer (SCAFFOLD's control-variate correction). Returns (new states, loss, aux)."""
  single = isinstance(states, TrainState)
  group = (states,) if single else tuple(states)
  unpack = (lambda t: t[0]) if single else (lambda t: t)

  def joint(params):
    loss, (model_states, aux) = loss_fn(unpack(params),
                                        unpack(tuple(s.model_state for s in group)))
    return loss, ((model_states,) if single else tuple(model_states), aux)

  (loss, (model_states, aux)), grads = jax.value_and_grad(joint, has_aux=True)(
      tuple(s.params for s in group))
  if grad_offset is not None:
    grads = jax.tree.map(jnp.add, grads, (grad_offset,) if single else tuple(grad_offset))
  new = tuple(s.apply_gradients(g, optimizer, lr_scale).replace(model_state=m)
              for s, g, m in zip(group, grads, model_states))
  return unpack(new), loss, aux


def supervised_step(model, optimizer, regularizer=None, label_map=None, grad_offset=None,
                    lr_scale=1.0):
  """An optimizer step on masked cross-entropy (plus `regularizer(params)` if given):
  the local step of FedAvg, FedProx, FedMR, FedMD, SCAFFOLD and local-only training.
  With `label_map`, labels are first mapped into the model's task; `grad_offset` is
  added to every step's gradient and `lr_scale` multiplies the learning rate
  (`loss_step`)."""
  def step(state, x, y, mask, key):
    if label_map is not None:
      y = jnp.asarray(label_map)[y]

    def loss_fn(params, model_state):
      logits, model_state = forward(model, params, model_state, x, True, key)
      loss = losses.cross_entropy(logits, y, mask)
      return (loss + regularizer(params) if regularizer is not None else loss), (model_state, None)

    state, loss, _ = loss_step(state, loss_fn, optimizer, lr_scale, grad_offset=grad_offset)
    return state, {"train_loss": loss}
  return step


def counted(step_fn):
  """`step_fn` with a step counter beside its carry: carry (inner, n) -> (inner', n + 1).
  A masked step (past the client's data, or a straggler's budget) leaves the whole
  carry as it was, so n ends as the number of steps the client really took."""
  def step(carry, x, y, mask, key):
    inner, n = carry
    inner, metrics = step_fn(inner, x, y, mask, key)
    return (inner, n + 1), metrics
  return step

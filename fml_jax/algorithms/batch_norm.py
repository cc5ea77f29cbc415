"""Batch-norm models in the algorithms that average models.

A model's variables are its parameters plus, for models with batch norm, the running
statistics (`model_state`, flax's "batch_stats"). `--config.batch_norm` says what the
server does with the batch-norm layers:

  average  (default) the running statistics are averaged with the same weights as the
           parameters, as the official FedAvg, FML and FedMR codes do by averaging (or,
           in FedMR, recombining) whole PyTorch state dicts. The server optimizer
           (FedAvgM, FedAdam, ...) moves only the parameters: the statistics are not
           trained, so their new value is their average.
  local    FedBN (Li et al., ICLR 2021): each client keeps its batch-norm layers (scale,
           bias and running statistics) private across rounds; the other layers are
           averaged. Clients train from the global model with their own batch-norm
           layers and are evaluated with them (the personalized metric). The server
           still averages every layer into the reported global model, whose
           batch-norm layers are then the clients' average (a reference point: FedBN
           itself has no global model).

A batch-norm layer's parameters are found generically: the modules that have running
statistics in `model_state` (the same module path in both collections).
"""

from __future__ import annotations

import flax.traverse_util
import jax
import jax.numpy as jnp

BATCH_NORM_MODES = ("average", "local")


def model_upload(state):
  """What a client sends for a TrainState: its parameters, and with batch norm its
  running statistics beside them (`ServerOptimizer.update` averages both)."""
  if not state.model_state:
    return state.params
  return {"params": state.params, "model_state": state.model_state}


def split_upload(uploads, has_model_state: bool):
  """(parameter uploads, statistics uploads or None) of `model_upload`s."""
  if not has_model_state:
    return uploads, None
  return uploads["params"], uploads["model_state"]


def _modules_with_statistics(model_state) -> set:
  """The module paths (tuples of names) that hold running statistics."""
  paths = set()
  for collection in model_state.values():
    paths |= {key[:-1] for key in flax.traverse_util.flatten_dict(collection)}
  return paths


def batch_norm_params(params, model_state) -> dict:
  """The parameters of the batch-norm layers, as a flat dict {"Module/.../name": leaf}
  (the layers whose module also holds running statistics)."""
  modules = _modules_with_statistics(model_state)
  return {"/".join(key): leaf for key, leaf in flax.traverse_util.flatten_dict(params).items()
          if key[:-1] in modules}


def with_batch_norm_params(params, bn_params: dict):
  """`params` with the batch-norm layers' parameters replaced by `bn_params`."""
  flat = flax.traverse_util.flatten_dict(params)
  for name, leaf in bn_params.items():
    flat[tuple(name.split("/"))] = leaf
  return flax.traverse_util.unflatten_dict(flat)


def local_layers(params, model_state) -> dict:
  """A client's private part under FedBN: its batch-norm parameters and statistics."""
  return {"bn_params": batch_norm_params(params, model_state), "model_state": model_state}


def init_local_layers(params, model_state, num_clients: int) -> dict:
  """Every client's FedBN part, all starting from the global model's."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)),
                      local_layers(params, model_state))

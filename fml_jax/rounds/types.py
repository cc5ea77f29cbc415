"""The plain data a round passes around. No behaviour beyond construction."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax


@flax.struct.dataclass
class RoundState:
  """Everything a run needs to continue: one pytree, so it can be checkpointed."""
  round: jax.Array      # () int32, rounds completed so far
  key: jax.Array        # the run's base PRNG key; round r uses fold_in(key, r)
  server: Any           # the algorithm's server state (e.g. global params)
  population: Any       # per architecture group: every member's persistent state, stacked


@flax.struct.dataclass
class RoundReport:
  """What a round reports besides the new state (all on device; fetch what you need)."""
  metrics: dict              # client training metrics (cohort means) and the server's own
  cohort: jax.Array          # (k,) the ids of the clients that trained
  client_finite: jax.Array   # (k,) bool: the client's loss, upload and new state are finite
  all_finite: jax.Array      # () bool: every client and the new server state are finite


@flax.struct.dataclass
class ClientInfo:
  """Who a client is this round (batched over the cohort in `RoundContext.clients`)."""
  id: jax.Array         # () int32, index into the population
  position: jax.Array   # () int32, place in the cohort: 0 .. clients_per_round - 1
  train_idx: jax.Array  # (max_train,) its indices into x_train (data.train_rows), 0-padded
  train_n: jax.Array    # () how many entries of the row are real
  key: jax.Array        # its PRNG key for this round (depends on round and id only)
  round: jax.Array      # () int32, 0-based index of the round being run
  # () float32, the share of its local steps it completes (a straggler: below 1;
  # rounds/availability.py); None when every client completes all of them.
  work: Any = None


@flax.struct.dataclass
class RoundContext:
  """What the server sees when it updates at the end of a round."""
  round: jax.Array      # () int32, 0-based index of the round that just ran
  clients: ClientInfo   # the cohort, leading axis k
  weights: jax.Array    # (k,) aggregation weights, summing to 1 (0 for clients that
                        # did not report; all 0 if none did)
  key: jax.Array        # PRNG key for the server's own randomness this round
  # (k,) bool: the client's upload reached the server (rounds/availability.py); None
  # when every client always reports.
  reports: Any = None


@flax.struct.dataclass
class Cohort:
  """One architecture group's part of the round's cohort."""
  clients: ClientInfo     # the sampled clients of the group (leading axis k_g)
  slots: jax.Array        # (k_g,) int32 their rows in the group's population
  client_state: Any = None   # their persistent state, where a caller asked for it


@flax.struct.dataclass
class ClientResult:
  client_state: Any   # the client's new persistent state (same structure as its population slice)
  upload: Any         # what the server aggregates (may be an empty tuple)
  metrics: dict       # scalar training metrics, e.g. {"train_loss": ...}


class GlobalModel(NamedTuple):
  """The model global evaluation runs: its module, parameters and, for a batch-norm
  model, its running statistics (None otherwise)."""
  model: nn.Module
  params: Any
  model_state: Any = None


@dataclasses.dataclass(frozen=True)
class PersonalizedModels:
  """The models personalized evaluation runs, and on whose test splits.

  per_client=True: `params` (and `model_state`) have a leading axis, one entry per
  evaluated client; False: one set shared by all. `client_ids` (numpy/jax ints)
  names the clients whose test splits are used, in the order of that axis; None
  means all clients 0 .. num_clients - 1. `label_map` (numpy int array over the
  dataset's classes) maps a label into the clients' task (-1: not part of it);
  None for the dataset's own labels.
  """
  model: nn.Module
  params: Any
  per_client: bool
  client_ids: Any = None
  model_state: Any = None
  label_map: Any = None

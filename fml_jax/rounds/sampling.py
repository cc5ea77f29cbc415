"""Architecture groups, the cohort's places per group, and who is sampled each round."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fml_jax.errors import ConfigError
from fml_jax.rounds.types import ClientInfo


def apportion(total: int, sizes: list[int]) -> list[int]:
  """Splits `total` cohort places among groups in proportion to their sizes (largest
  remainder), at least one place per group and at most its size."""
  n = sum(sizes)
  if total < len(sizes):
    raise ConfigError("clients_per_round", f"{total} is fewer than the {len(sizes)} architecture "
                      "groups; every group needs at least one client per round")
  quotas = [total * s / n for s in sizes]
  counts = [max(1, min(s, int(q))) for q, s in zip(quotas, sizes)]
  order = sorted(range(len(sizes)), key=lambda g: quotas[g] - int(quotas[g]), reverse=True)
  while sum(counts) != total:
    step = 1 if sum(counts) < total else -1
    for g in order if step > 0 else order[::-1]:
      if sum(counts) != total and 1 <= counts[g] + step <= sizes[g]:
        counts[g] += step
  return counts


@dataclasses.dataclass(frozen=True, eq=False)
class Groups:
  """Clients split into architecture groups; each round samples `cohort_sizes[g]`
  members of group g (in proportion to its size, `apportion`)."""
  members: tuple          # per group: (n_g,) client ids, ascending
  cohort_sizes: tuple     # per group: clients sampled each round

  @classmethod
  def of(cls, group_of, clients_per_round: int) -> "Groups":
    group_of = np.asarray(group_of)
    members = tuple(np.flatnonzero(group_of == g) for g in range(int(group_of.max()) + 1))
    if any(len(m) == 0 for m in members):
      raise ConfigError("local_models", "an architecture group has no clients")
    return cls(members, tuple(apportion(clients_per_round, [len(m) for m in members])))

  @property
  def sizes(self) -> list[int]:
    return [len(m) for m in self.members]

  @property
  def num_groups(self) -> int:
    return len(self.members)

  @property
  def whole(self) -> list[bool]:
    """Groups that take part whole every round (in member order)."""
    return [k == len(m) for k, m in zip(self.cohort_sizes, self.members)]

  def sample(self, key: jax.Array, round_number: jax.Array) -> tuple:
    """Each group's cohort: (k_g,) int32 rows of its population, drawn without
    replacement from (key, round) alone; the whole group in member order when it all
    takes part."""
    sample_key = jax.random.fold_in(jax.random.fold_in(key, round_number), 0)
    slots = []
    for g, (members, k) in enumerate(zip(self.members, self.cohort_sizes)):
      if k == len(members):
        slots.append(jnp.arange(k, dtype=jnp.int32))
      else:
        group_key = sample_key if self.num_groups == 1 else jax.random.fold_in(sample_key, g)
        slots.append(jax.random.choice(group_key, len(members), (k,),
                                       replace=False).astype(jnp.int32))
    return tuple(slots)

  def client_infos(self, group: int, rows, data, key: jax.Array, round_number,
                   offset: int = 0, train_rows=None) -> ClientInfo:
    """The ClientInfo of group `group`'s members at `rows` (a round's cohort, or the
    whole group for the warm start). A client's key depends on its id and `key` only,
    not on its position. `train_rows` = (train_idx, train_n) replaces every client's
    data row (FedMD's pooled-data bound)."""
    ids = jnp.asarray(self.members[group], jnp.int32)[rows]
    k = ids.shape[0]
    if train_rows is None:
      idx, n = data.train_rows(ids), data.train_n[ids]
    else:
      idx = jnp.broadcast_to(train_rows[0], (k, train_rows[0].shape[0]))
      n = jnp.broadcast_to(train_rows[1], (k,))
    return ClientInfo(id=ids, position=offset + jnp.arange(k, dtype=jnp.int32), train_idx=idx,
                      train_n=n, key=jax.vmap(jax.random.fold_in, (None, 0))(key, ids),
                      round=jnp.full((k,), round_number, jnp.int32))

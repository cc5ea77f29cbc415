"""Where every client's persistent state lives, and how a round reaches it.

  DeviceStore  on the accelerator (split over the mesh's client axis, if any); the
               round takes and puts the cohort's rows inside its own computation.
  HostStore    in host memory, as arrays on JAX's CPU device: each round the cohort's
               rows are gathered there, moved to the accelerator (sharded over the
               mesh), trained, moved back and written in place. The accelerator holds
               only the cohort, so the population can outgrow its memory. Same results.

Invariant (measured): a group that takes part whole is used as it is, in member
order, with nothing gathered or scattered (on XLA:CPU those were a fifth of an MLP
round and held two extra copies of the population). `take` and `put` are the only
places that know it.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fml_jax.errors import ConfigError
from fml_jax.rounds.sampling import Groups
from fml_jax.rounds.types import RoundState
from fml_jax.trees import put_rows, take_rows

PLACEMENTS = ("device", "host")

_take_rows = jax.jit(take_rows)   # one dispatch, also when called outside a jitted round


def client_mesh(num_devices: int) -> Optional[Mesh]:
  """A 1-D mesh named 'clients' over the first `num_devices` devices (0: all of them);
  None for a single device (nothing to shard)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError("mesh_shape", f"{num_devices} devices asked for, {len(devices)} available "
                      f"({devices[0].platform}); use 0 for all of them")
  n = num_devices or len(devices)
  if jax.process_count() > 1 and n != len(devices):
    # Every process runs the round, so every process's devices hold part of the cohort.
    raise ConfigError("mesh_shape", f"a run across {jax.process_count()} processes shards the "
                      f"client axis over all {len(devices)} of their devices; set mesh_shape=0 "
                      f"(or {len(devices)}), not {num_devices}")
  return Mesh(np.array(devices[:n]), ("clients",)) if n > 1 else None


class DeviceStore:
  placement = "device"

  def __init__(self, groups: Groups, mesh: Optional[Mesh] = None):
    self.groups = groups
    self.mesh = mesh
    if mesh is not None:
      self._check_divisible()

  def _sharded_counts(self) -> tuple:
    return (("num_clients", self.groups.sizes), ("clients_per_round", self.groups.cohort_sizes))

  def _check_divisible(self) -> None:
    n = self.mesh.size
    for field, values in self._sharded_counts():
      if any(v % n for v in values):
        what = "" if len(values) == 1 else " (per architecture group)"
        raise ConfigError("mesh_shape", f"the client axis is sharded over {n} devices, so "
                          f"{field}{what} must be a multiple of {n}; it is "
                          f"{values[0] if len(values) == 1 else list(values)}")

  # --- shardings ------------------------------------------------------------------------

  def cohort_sharding(self):
    """Where a cohort trains: split over the mesh, or on the (first) accelerator."""
    if self.mesh is not None:
      return NamedSharding(self.mesh, P("clients"))
    return SingleDeviceSharding(jax.devices()[0])

  def replicated_sharding(self):
    """Every device of the mesh holds it all; None without a mesh."""
    return NamedSharding(self.mesh, P()) if self.mesh is not None else None

  def replicate(self, tree):
    """Inside the jitted round: every device (every process) holds all of `tree`, so the
    host can read it (a run's metrics and divergence flags)."""
    if self.mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, self.replicated_sharding())

  def population_sharding(self):
    return self.cohort_sharding()

  def init_device(self):
    """Where the population is initialized: None for JAX's default."""
    return None

  def state_shardings(self, state):
    """Where each leaf of a round state lives (None: JAX's default placement)."""
    if self.mesh is None and self.init_device() is None:   # one device, JAX's default
      return None
    replicated = self.replicated_sharding() or SingleDeviceSharding(jax.devices()[0])
    clients = self.population_sharding()
    return state.replace(round=replicated, key=replicated,
                         server=jax.tree.map(lambda _: replicated, state.server),
                         population=jax.tree.map(lambda _: clients, state.population))

  def place(self, state):
    """Puts a state (fresh, or restored from a checkpoint) where the store keeps it."""
    shardings = self.state_shardings(state)
    return state if shardings is None else jax.device_put(state, shardings)

  def place_data(self, data):
    return data if self.mesh is None else jax.device_put(data, self.replicated_sharding())

  def shard(self, tree):
    """Inside the jitted round: lay a cohort-shaped tree out along the client axis."""
    if self.mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, self.cohort_sharding())

  # --- rows -----------------------------------------------------------------------------

  def take(self, group: int, population, slots):
    """The cohort's rows of a group's population (the population itself when the whole
    group takes part)."""
    return population if self.groups.whole[group] else _take_rows(population, slots)

  def put(self, group: int, population, slots, new):
    """The group's population with the cohort's new rows."""
    return new if self.groups.whole[group] else put_rows(population, slots, new)

  def gathers(self, group: int) -> bool:
    """Whether `take` copies the cohort's rows out of the population."""
    return not self.groups.whole[group]

  # --- the round ------------------------------------------------------------------------

  def round_input(self, state_like: RoundState) -> RoundState:
    """The state the round function takes (shapes): the state itself."""
    return state_like

  def slots_like(self):
    """The shapes of the sample the store passes the round (None: the round draws it)."""
    return None

  def wrap(self, round_fn: Callable, data) -> Callable:
    """state -> (state, report): the round function as a run calls it."""
    return lambda state: round_fn(state, data, None)


class HostStore(DeviceStore):
  placement = "host"

  def __init__(self, groups: Groups, mesh: Optional[Mesh] = None):
    # The host device: this process's CPU device (the accelerator itself on a CPU-only
    # machine, where `host` runs the same code over the same memory).
    self.host_device = jax.local_devices(backend="cpu")[0]
    # Across processes each one's host memory holds its share of the population: on a
    # CPU-only machine that is the mesh's own sharding (CPU devices are host memory).
    self.across_processes = jax.process_count() > 1
    if self.across_processes and jax.default_backend() != "cpu":
      raise ConfigError("placement", "placement=host across processes is built and tested on "
                        "CPU-only machines; on accelerators across processes use "
                        "placement=device")
    super().__init__(groups, mesh)
    self._sample = jax.jit(groups.sample)
    self._gather = jax.jit(lambda population, slots: tuple(map(take_rows, population, slots)))
    self._scatter = jax.jit(lambda population, slots, new: tuple(
        map(put_rows, population, slots, new)), donate_argnums=0)

  def _sharded_counts(self) -> tuple:
    if self.across_processes:   # the population is split over the processes too
      return super()._sharded_counts()
    # The population is not sharded, so only the cohort needs to divide evenly.
    return (("clients_per_round", self.groups.cohort_sizes),)

  def population_sharding(self):
    if self.across_processes:
      return self.cohort_sharding()
    return SingleDeviceSharding(self.host_device)

  def _host_sharding(self):
    """Where the sample's slots go for the gather and scatter on the host."""
    return self.replicated_sharding() if self.across_processes else self.host_device

  def init_device(self):
    return None if self.across_processes else self.host_device

  # Inside the round the population is already the cohort's rows.
  def take(self, group, population, slots):
    return population

  def put(self, group, population, slots, new):
    return new

  def gathers(self, group):
    return False   # gathered on the host, before the round

  def round_input(self, state_like: RoundState) -> RoundState:
    sharding = self.cohort_sharding()
    cohort = tuple(jax.tree.map(
        lambda x, k=k: jax.ShapeDtypeStruct((k, *x.shape[1:]), x.dtype, sharding=sharding),
        group) for group, k in zip(state_like.population, self.groups.cohort_sizes))
    return state_like.replace(population=cohort)

  def slots_like(self):
    return tuple(jax.ShapeDtypeStruct((k,), jnp.int32, sharding=self.replicated_sharding())
                 for k in self.groups.cohort_sizes)

  def wrap(self, round_fn: Callable, data) -> Callable:
    def host_round(state):
      slots = self._sample(state.key, state.round)
      host_slots = jax.device_put(slots, self._host_sharding())
      cohort = jax.device_put(self._gather(state.population, host_slots), self.cohort_sharding())
      new, report = round_fn(state.replace(population=cohort), data, slots)
      population = self._scatter(state.population, host_slots,
                                 jax.device_put(new.population, self.population_sharding()))
      return new.replace(population=population), report
    return host_round


def make_store(placement: str, groups: Groups, mesh: Optional[Mesh]) -> DeviceStore:
  stores = {"device": DeviceStore, "host": HostStore}
  if placement not in stores:
    raise ConfigError("placement", f"unknown placement '{placement}'; choose one of "
                      f"{', '.join(PLACEMENTS)}")
  return stores[placement](groups, mesh)

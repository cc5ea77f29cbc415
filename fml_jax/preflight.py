"""Before training: will the run fit in memory and on disk? Refuse early, with numbers.

Memory: the population store and server state (from `jax.eval_shape`, nothing is
allocated) plus one round's working memory (XLA's memory analysis of the compiled
round), against what the device has free: `MemAvailable` on the CPU, the
allocator's limit minus what is in use on a GPU/TPU. With the host store
(`placement=host`) the population is checked against the host's free memory and the
accelerator only needs the cohort's rows, the server state and the round. Disk: the checkpoints kept
(plus one being written) against the free space of the workdir's filesystem.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import jax

from fml_jax.trees import tree_bytes
from fml_jax.errors import UserError

HEADROOM = 0.9   # refuse above this share of the free memory


class ResourceError(UserError):
  """The run would not fit in memory or on disk."""


def gib(n: float) -> str:
  """Bytes as a readable size (the name is kept short for the messages below)."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  state_bytes: int          # server state + population store (+ rngs, round number)
  population_bytes: int
  per_client_bytes: int
  round_bytes: int          # one round's working memory beyond the state
  num_clients: int
  on_host: bool = False     # the population lives in host memory (placement=host) ...
  cohort_bytes: int = 0     # ... and each round moves this much of it to the accelerator
  data_bytes: int = 0       # the dataset and its index tables, on the accelerator
  replicas: int = 1         # federations held at once (fml_jax/replicas.py), all counted above
  processes: int = 1        # across processes, each holds 1/processes of the population

  @property
  def own_population_bytes(self) -> int:
    """This process's share of the population (all of it in a single process)."""
    return -(-self.population_bytes // self.processes)

  @property
  def host_bytes(self) -> int:
    """What the host store holds in host memory (0 for a device store)."""
    return self.own_population_bytes if self.on_host else 0

  @property
  def device_bytes(self) -> int:
    """What the accelerator holds during a round (this process's, across processes)."""
    own_state = self.state_bytes - self.population_bytes + self.own_population_bytes
    return (own_state - self.host_bytes + -(-self.cohort_bytes // self.processes)
            + self.round_bytes + self.data_bytes)

  @property
  def total(self) -> int:
    return self.device_bytes + self.host_bytes

  def describe(self) -> str:
    where = (f" in host memory, {gib(self.cohort_bytes)} of it moved to the accelerator "
             "each round" if self.on_host else "")
    copies = f" x {self.replicas} replicas" if self.replicas > 1 else ""
    if self.processes > 1:
      copies += f", {gib(self.own_population_bytes)} of it in this process of {self.processes}"
    return (f"population store {gib(self.population_bytes)} ({self.num_clients} clients x "
            f"{gib(self.per_client_bytes)}{copies}){where}, server state "
            f"{gib(self.state_bytes - self.population_bytes)}, data {gib(self.data_bytes)}, "
            f"one round's working memory {gib(self.round_bytes)}")


def estimate_memory(runner, state_like) -> MemoryEstimate:
  """Compiles the runner's round (kept for the run) and sizes what it needs."""
  compiled = runner.compile(state_like)
  population = tree_bytes(state_like.population)
  n = runner.data.num_clients
  on_host = runner.placement == "host"
  return MemoryEstimate(state_bytes=tree_bytes(state_like), population_bytes=population,
                        per_client_bytes=population // max(n, 1),
                        round_bytes=max(compiled["temp"] + compiled["output"] - compiled["alias"], 0),
                        num_clients=n, on_host=on_host,
                        cohort_bytes=tree_bytes(runner.store.round_input(state_like).population)
                        if on_host else 0, data_bytes=tree_bytes(runner.data),
                        processes=jax.process_count())


def for_replicas(estimate: MemoryEstimate, replicas: int, vmapped: bool) -> MemoryEstimate:
  """The estimate for `replicas` federations: every replica's state, and one round's
  working memory (replicas in a loop) or all of theirs at once (vmapped)."""
  at_once = replicas if vmapped else 1
  return dataclasses.replace(
      estimate, state_bytes=estimate.state_bytes * replicas,
      population_bytes=estimate.population_bytes * replicas,
      round_bytes=estimate.round_bytes * at_once, cohort_bytes=estimate.cohort_bytes * at_once,
      replicas=replicas)


def available_host_memory() -> Optional[int]:
  """Bytes free in host memory (`MemAvailable`), or None where /proc/meminfo is absent."""
  return available_memory(jax.local_devices(backend="cpu")[0])


def available_memory(device: Optional[jax.Device] = None) -> Optional[int]:
  """Bytes free for new arrays on `device`, or None if the backend does not say."""
  device = device or jax.local_devices()[0]   # this process's (across processes)
  if device.platform == "cpu":
    try:
      for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
    except OSError:
      return None
    return None
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return None


def check_memory(estimate: MemoryEstimate, available: Optional[int],
                 host_available: Optional[int] = None) -> None:
  """Refuses a run that would not fit. `available`: free memory of the accelerator;
  `host_available`: of the host, for the host store (on a CPU backend the two are one
  memory, so everything is checked against `available`)."""
  backend = jax.default_backend()
  one_memory = backend == "cpu"
  device_need = estimate.total if one_memory else estimate.device_bytes
  if available is not None and device_need > HEADROOM * available:
    hint = ("" if one_memory or estimate.on_host else
            ", or keep the population in host memory with placement=host")
    raise ResourceError(
        f"not enough memory on {backend}: the run needs about {gib(device_need)} "
        f"({estimate.describe()}) but {gib(available)} is free; lower num_clients, "
        f"clients_per_round or batch_size, or use a smaller model{hint}")
  if (not one_memory and estimate.on_host and host_available is not None
      and estimate.host_bytes > HEADROOM * host_available):
    raise ResourceError(
        f"not enough host memory for the population store (placement=host): it needs "
        f"{gib(estimate.host_bytes)} ({estimate.describe()}) but {gib(host_available)} is "
        "free; lower num_clients or use a smaller model (optimizer=sgd with momentum=0 "
        "keeps no optimizer state per client)")


def check_disk(workdir: Path, checkpoint_bytes: int, keep: int) -> None:
  need = checkpoint_bytes * (keep + 1)   # the kept ones plus one being written
  free = shutil.disk_usage(workdir).free
  if need > HEADROOM * free:
    raise ResourceError(
        f"not enough disk for checkpoints in {workdir}: {keep} kept + 1 being written x "
        f"{gib(checkpoint_bytes)} = {gib(need)}, but {gib(free)} is free; lower "
        "checkpoints_to_keep, set checkpoint_every=0 (no checkpoints), or use another --workdir")

"""Before training: will the run fit in memory and on disk? Refuse early, with numbers.

Memory: the population store and server state (from `jax.eval_shape`, nothing is
allocated) plus one round's working memory (XLA's memory analysis of the compiled
round), against what the device has free: `MemAvailable` on the CPU, the
allocator's limit minus what is in use on a GPU/TPU. Disk: the checkpoints kept
(plus one being written) against the free space of the workdir's filesystem.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import jax

from fml_jax.engine import tree_bytes
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

  @property
  def total(self) -> int:
    return self.state_bytes + self.round_bytes

  def describe(self) -> str:
    return (f"population store {gib(self.population_bytes)} ({self.num_clients} clients x "
            f"{gib(self.per_client_bytes)}), server state "
            f"{gib(self.state_bytes - self.population_bytes)}, one round's working memory "
            f"{gib(self.round_bytes)}")


def estimate_memory(engine, state_like) -> MemoryEstimate:
  """Compiles the engine's round (kept for the run) and sizes what it needs."""
  compiled = engine.compile(state_like)
  population = tree_bytes(state_like.population)
  n = engine.data.num_clients
  return MemoryEstimate(state_bytes=tree_bytes(state_like), population_bytes=population,
                        per_client_bytes=population // max(n, 1),
                        round_bytes=max(compiled["temp"] + compiled["output"] - compiled["alias"], 0),
                        num_clients=n)


def available_memory(device: Optional[jax.Device] = None) -> Optional[int]:
  """Bytes free for new arrays on `device`, or None if the backend does not say."""
  device = device or jax.devices()[0]
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


def check_memory(estimate: MemoryEstimate, available: Optional[int]) -> None:
  if available is not None and estimate.total > HEADROOM * available:
    raise ResourceError(
        f"not enough memory on {jax.default_backend()}: the run needs about "
        f"{gib(estimate.total)} ({estimate.describe()}) but {gib(available)} is free; lower "
        "num_clients, clients_per_round or batch_size, or use a smaller model")


def check_disk(workdir: Path, checkpoint_bytes: int, keep: int) -> None:
  need = checkpoint_bytes * (keep + 1)   # the kept ones plus one being written
  free = shutil.disk_usage(workdir).free
  if need > HEADROOM * free:
    raise ResourceError(
        f"not enough disk for checkpoints in {workdir}: {keep} kept + 1 being written x "
        f"{gib(checkpoint_bytes)} = {gib(need)}, but {gib(free)} is free; lower "
        "checkpoints_to_keep, set checkpoint_every=0 (no checkpoints), or use another --workdir")

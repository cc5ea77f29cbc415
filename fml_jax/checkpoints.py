"""Checkpoints of the whole round state with orbax, and restoring the newest good one.

A checkpoint is the `RoundState` after round r (server state, every client's
persistent state with its optimizer state, the run's PRNG key and the round
number; cohort sampling and client keys are functions of (key, round), so
nothing else is needed to continue exactly). Saves are synchronous: the next
round donates the state's buffers, so the save must have copied them first.
Orbax writes each checkpoint to a temporary folder and renames it when complete,
so a run killed mid-save leaves no checkpoint that looks complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves every `every` rounds into `directory`, keeping the newest `keep`."""

  def __init__(self, directory: Path, every: int, keep: int):
    self.directory = Path(directory)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def should_save(self, round_number: int, last_round: int) -> bool:
    return self.every > 0 and (round_number % self.every == 0 or round_number == last_round)

  def save(self, round_number: int, state: Any) -> None:
    self._manager.save(round_number, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, like: Any) -> tuple[Optional[int], Any]:
    """The newest checkpoint that restores into the structure of `like` (arrays or
    `jax.ShapeDtypeStruct`s).

    A checkpoint that cannot be read (corrupted, truncated, from other code) is
    skipped with a warning in favour of the one before it.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        like)
    for step in reversed(self.steps()):
      try:
        return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except  (any failure: try an older one)
        logging.warning("checkpoint of round %d in %s cannot be restored (%s: %s); "
                        "trying an earlier one", step, self.directory, type(e).__name__,
                        " ".join(str(e).split())[:300])
    return None, None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

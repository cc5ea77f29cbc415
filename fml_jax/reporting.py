"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard event files and the
terminal.

- `TensorBoardWriter`: every numeric metric of a record as a scalar at step = round,
  in `WORKDIR/tensorboard/` (tensorboardX writes the event files; no TensorFlow).
  On a resume it purges the steps after the restored round, so TensorBoard shows
  every round once.
- `Progress`: on a terminal, a tqdm bar with rounds/s, ETA and the latest accuracies;
  elsewhere (CI, a log file) one plain log line per evaluated round, with rounds/s
  and ETA.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from absl import logging

from fml_jax import stats

TENSORBOARD_DIR = "tensorboard"


# Record fields that say which round or replica it is, not what was measured.
NOT_SCALARS = ("round", "replica", "seed")


class TensorBoardWriter:
  def __init__(self, workdir: Path, first_round: int = 0, name: str = ""):
    from tensorboardX import SummaryWriter   # imported here: only runs that write need it
    # purge_step: events at steps >= it from an earlier (interrupted) run are discarded.
    folder = workdir / TENSORBOARD_DIR / name if name else workdir / TENSORBOARD_DIR
    self._writer = SummaryWriter(str(folder), purge_step=first_round + 1, flush_secs=30)

  def write(self, record: dict) -> None:
    step = int(record["round"])
    for key, value in record.items():
      if key not in NOT_SCALARS and isinstance(value, (int, float)) \
          and not isinstance(value, bool) and math.isfinite(value):
        self._writer.add_scalar(key, value, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _sweep_suffix(values: dict) -> str:
  return "".join(f"_{k}={v}" for k, v in values.items())


class TensorBoardBoards:
  """Where a run's TensorBoard scalars go: `tensorboard/` itself for a single run; with
  replicas (fml_jax/replicas.py) one TensorBoard run per replica
  (`tensorboard/replica_003_seed3_learning_rate=0.05`), whose curves overlaid show the
  spread, and one per grid point (`tensorboard/mean_learning_rate=0.05`) with the mean
  across its seeds and each metric's standard deviation as `<metric>_std`."""

  def __init__(self, workdir: Path, first_round: int, replica_set):
    replicas = replica_set.replicas
    self._point_of = [r.point for r in replicas]
    if len(replicas) == 1:
      self._writers, self._means = [TensorBoardWriter(workdir, first_round)], []
      return
    self._writers = [TensorBoardWriter(workdir, first_round,
                                       f"replica_{r.index:03d}_seed{r.seed}"
                                       f"{_sweep_suffix(r.values)}") for r in replicas]
    self._means = [TensorBoardWriter(workdir, first_round, f"mean{_sweep_suffix(values)}")
                   for values in replica_set.points]

  def write(self, records: list[dict]) -> None:
    """One record per replica, in replica order, all of one round."""
    for writer, record in zip(self._writers, records):
      writer.write(record)
    for p, writer in enumerate(self._means):
      members = [r for r, q in zip(records, self._point_of) if q == p]
      spread = {f"{k}_std": v["std"] for k, v in stats.record_intervals(members).items()
                if k not in NOT_SCALARS and v["std"] is not None}
      writer.write({**stats.mean_record(members), **spread, "round": members[0]["round"]})

  def close(self) -> None:
    for writer in self._writers + self._means:
      writer.close()


def _fmt(value, spec=".4f") -> str:
  return "n/a" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Rounds done, rounds/s and ETA, on a terminal as a bar, elsewhere as log lines."""

  def __init__(self, first_round: int, num_rounds: int, stream=None):
    self.num_rounds = num_rounds
    self.first_round = first_round
    self._start = time.perf_counter()
    stream = stream or sys.stderr
    self._bar = None
    if getattr(stream, "isatty", lambda: False)():
      from tqdm import tqdm   # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=num_rounds, initial=first_round, unit="round", file=stream,
                       dynamic_ncols=True)

  def rate(self, done_round: int) -> tuple[float, float]:
    """(rounds per second since this process started, seconds left)."""
    done = done_round - self.first_round
    elapsed = time.perf_counter() - self._start
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    return rate, (self.num_rounds - done_round) / rate if rate == rate and rate > 0 else float("nan")

  def round_done(self, r: int, record: dict | None) -> None:
    """After round r; `record` when the round was evaluated."""
    if self._bar is not None:
      self._bar.update(1)
      if record is not None:
        self._bar.set_postfix_str(
            f"global {_fmt(record['global_test_acc'], '.3f')} "
            f"personalized {_fmt(record['local_test_acc_mean'], '.3f')}")
      return
    if record is None:
      return
    rate, left = self.rate(r)
    clients_global = ""
    if record.get("client_global_test_acc_mean") is not None:
      clients_global = f" | clients' models on global test {record['client_global_test_acc_mean']:.4f}"
    logging.info(
        "round %d/%d  global acc %s loss %s | personalized acc %s [min %s, max %s]%s | "
        "train loss %s | %.3f s/round | %.2f rounds/s, ETA %s", r, self.num_rounds,
        _fmt(record["global_test_acc"]), _fmt(record["global_test_loss"]),
        _fmt(record["local_test_acc_mean"]), _fmt(record["local_test_acc_min"]),
        _fmt(record["local_test_acc_max"]), clients_global, _fmt(record.get("train_loss")),
        record["round_seconds"], rate, _duration(left))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

"""What a run writes to its workdir, written so that nothing half-done looks complete.

  config.json     the full config, written (atomically) before training starts
  metrics.jsonl   one JSON object per evaluated round, appended and flushed as it happens
  summary.json    written (atomically) only when the run finishes: its presence means
                  the run completed
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fml_jax.errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


def _jsonable(value):
  """NaN/inf become null (JSON has neither); numpy scalars become Python numbers."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def atomic_write_json(path: Path, obj) -> None:
  """Write to a temporary file in the same folder, fsync, then rename over `path`."""
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def prepare_workdir(workdir: str, overwrite: bool) -> Path:
  """Creates the workdir; refuses one that holds another run's results unless `overwrite`."""
  path = Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
  existing = [name for name in RUN_FILES if (path / name).exists()]
  if existing and not overwrite:
    raise UserError(f"--workdir {workdir} already holds a run ({', '.join(existing)}); "
                    "choose another workdir, or pass --overwrite to replace it")
  for name in existing:
    (path / name).unlink()
  return path


class MetricsWriter:
  """Appends one JSON line per evaluated round and flushes it to disk."""

  def __init__(self, path: Path):
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

"""What a run writes to its workdir, written so that nothing half-done looks complete.

  config.json     the full config, written (atomically) before training starts
  metrics.jsonl   one JSON object per evaluated round, appended and flushed as it happens
  checkpoints/    orbax checkpoints of the round state (see checkpoints.py)
  summary.json    written (atomically) only when the run finishes: its presence means
                  the run completed
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from fml_jax.errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
CHECKPOINT_DIR = "checkpoints"
# Fields that may change when a run is resumed: they do not change what a round computes.
RESUMABLE_FIELDS = ("num_rounds", "eval_every", "checkpoint_every", "checkpoints_to_keep")


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


def flat_fields(config: dict, prefix: str = "") -> dict:
  """{dotted field path: value}, sections (nested dicts) expanded."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flat_fields(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
  """'field: old -> new' for every field that differs (sections' fields by their dotted
  path, e.g. fml.alpha), except RESUMABLE_FIELDS. A field the old config lacks (it was
  added to fml_jax later, e.g. a new algorithm's section) had its value in `defaults`."""
  old, new = {**flat_fields(defaults or {}), **flat_fields(old)}, flat_fields(new)
  fields = sorted((set(old) | set(new)) - set(RESUMABLE_FIELDS))
  return [f"{f}: {old.get(f, '(absent)')!r} -> {new.get(f, '(absent)')!r}"
          for f in fields if old.get(f) != new.get(f)]


def prepare_workdir(workdir: str, config: dict, overwrite: bool,
                    defaults: dict | None = None) -> tuple[Path, bool]:
  """Creates or checks the workdir; returns (path, whether an earlier run is to be resumed).

  A workdir holding a run of the same config (RESUMABLE_FIELDS aside) is resumed;
  one holding a different run is refused with the differing fields, unless
  `overwrite`, which deletes the earlier run's files and checkpoints. `defaults` (the
  default config) stands in for fields an older run's config.json lacks.
  """
  path = Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or e})") from None
  existing = [name for name in RUN_FILES + (CHECKPOINT_DIR,) if (path / name).exists()]
  if existing and overwrite:
    for name in existing:
      if (path / name).is_dir():
        shutil.rmtree(path / name)
      else:
        (path / name).unlink()
    return path, False
  if not existing:
    return path, False
  if not (path / "config.json").exists():
    raise UserError(f"--workdir {workdir} holds run files ({', '.join(existing)}) but no "
                    "config.json, so it cannot be resumed; choose another workdir, or pass "
                    "--overwrite to replace them")
  try:
    old = json.loads((path / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"--workdir {workdir}: config.json is unreadable ({e}); choose another "
                    "workdir, or pass --overwrite to replace the run") from None
  diff = config_differences(old, config, defaults)
  if diff:
    raise UserError(f"--workdir {workdir} holds a run with a different config ({'; '.join(diff)}); "
                    "choose another workdir, or pass --overwrite to replace it")
  return path, True


def read_metrics(path: Path, up_to_round: int, rewrite: bool = True) -> list[dict]:
  """The metrics lines of rounds <= up_to_round, rewriting the file (atomically) to hold
  just those (unless not `rewrite`: a process that does not write the run's files):
  after a resume every round appears once, in order. A torn last line (a kill
  mid-write) is dropped."""
  file = path / "metrics.jsonl"
  records = []
  if file.exists():
    for line in file.read_text().splitlines():
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("round", 0) <= up_to_round:
        records.append(record)
  if not rewrite:
    return records
  tmp = file.with_name(".metrics.jsonl.tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, file)
  return records


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

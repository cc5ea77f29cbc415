"""Summaries across seeds: mean, standard deviation and a Student-t interval.

Used wherever runs are compared across replicas (fml_jax/train.py's summary of a
multi-seed run, experiments/run.py's paired differences). The t quantile comes
from scipy (a dependency of jax itself).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


def interval(values: Sequence[float], confidence: float = 0.95) -> dict:
  """{"mean", "std" (sample, ddof=1), "low", "high" (the two-sided `confidence`
  Student-t interval of the mean), "n"} of the finite values; with one value the
  interval is that value's own (std 0: no spread can be estimated). None values and
  NaNs are left out; no values at all gives None everywhere but n = 0."""
  xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  n = int(xs.size)
  if n == 0:
    return {"mean": None, "std": None, "low": None, "high": None, "n": 0}
  mean = float(xs.mean())
  if n == 1:
    return {"mean": mean, "std": 0.0, "low": mean, "high": mean, "n": 1}
  std = float(xs.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def describe(summary: dict, spec: str = ".4f") -> str:
  """'0.8123 +- 0.0040 (95% CI 0.8073..0.8173, n=5)' for an `interval` result."""
  if summary["n"] == 0:
    return "n/a"
  if summary["n"] == 1:
    return f"{format(summary['mean'], spec)} (n=1)"
  return (f"{format(summary['mean'], spec)} +- {format(summary['std'], spec)} "
          f"(95% CI {format(summary['low'], spec)}..{format(summary['high'], spec)}, "
          f"n={summary['n']})")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_record(records: list[dict]) -> dict:
  """Per-key means of metrics records (replicas of one round): the keys whose values
  are numbers (or None) in every record; a key that is None everywhere stays None.
  Lists, dicts and strings (per-client lists, swept values) are left out."""
  keys = [k for k in records[0] if all(k in r for r in records)]
  out = {}
  for key in keys:
    values = [r[key] for r in records]
    if all(v is None or _is_number(v) for v in values):
      out[key] = interval(values)["mean"]
  return out


def record_intervals(records: list[dict], confidence: float = 0.95) -> dict:
  """{key: interval} over the numeric keys of `records` (as `mean_record` picks them)."""
  keys = mean_record(records).keys()
  return {k: interval([r[k] for r in records], confidence) for k in keys}

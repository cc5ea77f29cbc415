"""Reading and checking settings, for the generic checks and each algorithm's own.

Fields are named by their dotted path (`fml.alpha`, `server.optimizer`), which is also
how a `ConfigError` names them, so every error says what to pass on the command line.
"""

from __future__ import annotations

import math

from fml_jax.errors import ConfigError

# Flat names of earlier versions -> where the setting lives now (for "did you mean").
RENAMED = {
    "alpha": "fml.alpha", "beta": "fml.beta", "temperature": "fml.temperature",
    "alpha_schedule": "fml.alpha_schedule", "beta_schedule": "fml.beta_schedule",
    "lr_schedule": "fml.lr_schedule", "schedule_step_rounds": "fml.schedule_step_rounds",
    "schedule_stop_round": "fml.schedule_stop_round", "prox_mu": "fedprox.mu",
    **{f"fedmr_{f}": f"fedmr.{f}" for f in ("first_stage_rounds", "granularity",
                                           "block_fraction", "optimizer_state")},
    **{f"fedmd_{f}": f"fedmd.{f}" for f in (
        "public_epochs", "private_epochs", "early_stopping", "alignment_size", "digest_loss",
        "digest_temperature", "digest_epochs", "digest_batch_size", "report_bounds")},
    **{f"h2l_{f}": f"fedh2l.{f}" for f in ("topology", "peers", "distill_weight",
                                          "temperature", "seed_ce")},
}


def is_static_zero(value) -> bool:
  """Whether a setting is the Python number 0 (a term it weights can be left out when
  tracing); False for a traced value (a vmapped sweep over it, fml_jax/replicas.py)."""
  return isinstance(value, (int, float)) and value == 0


def get(config, field: str):
  """The value at a dotted path."""
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def has(config, field: str) -> bool:
  try:
    get(config, field)
    return True
  except (KeyError, AttributeError, TypeError):
    return False


def choice(config, field: str, allowed) -> None:
  value = get(config, field)
  if value not in allowed:
    raise ConfigError(field, f"'{value}' is not one of {', '.join(allowed)}")


def boolean(config, field: str) -> None:
  if not isinstance(get(config, field), bool):
    raise ConfigError(field, f"{get(config, field)!r} is not True or False")


def number(config, field: str, low=None, high=None, *, integer=False,
           low_open=False, high_open=False) -> None:
  value = get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      integer and not isinstance(value, int)):
    raise ConfigError(field, f"{value!r} is not {'an integer' if integer else 'a number'}")
  if not math.isfinite(value):
    raise ConfigError(field, f"{value} is not finite")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = (f"{'(' if low_open or low is None else '['}{lo}, {hi}"
                f"{')' if high_open or high is None else ']'}")
    raise ConfigError(field, f"{value} is outside {interval}")


def apply_overrides(config, overrides: dict):
  """Sets fields of `config` in place and returns it. Keys are field paths, dotted
  (`"fml.alpha"`) or, to be usable as Python keyword arguments, with double
  underscores (`fml__alpha=0.3`); a dict value for a section sets its fields."""
  for key, value in overrides.items():
    path = key.replace("__", ".")
    current = get(config, path) if has(config, path) else None
    if isinstance(value, dict) and hasattr(current, "items"):
      apply_overrides(current, value)
      continue
    *parents, last = path.split(".")
    (get(config, ".".join(parents)) if parents else config)[last] = value
  return config

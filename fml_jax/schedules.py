"""Per-round schedules of FML's alpha and beta and of the learning rate.

A schedule is a string setting:

  ""                 constant: the base value (the config's alpha, beta; lr factor 1)
  "official"         FML's dynamic balance from the earlier official code: every
                     `schedule_step_rounds` (10) rounds while the round is below
                     `schedule_stop_round` (30): alpha = max(alpha - 0.2, 0.5),
                     beta = beta + 0.4 (capped at 1), lr *= 0.1
  "0:0.1,10:0.5"     piecewise constant: the value from each listed round on
                     (0-based round index; the first entry must be round 0)

`to_table` turns any of them into (boundaries, values), which `value_at` looks up
inside jit from the traced round number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fml_jax.errors import ConfigError

KINDS = ("alpha", "beta", "lr")


def official_step(kind: str, base: float, step_rounds: int, stop_round: int):
  """The official dynamic balance: updates at rounds step, 2*step, ... below stop."""
  rounds, values, value = [0], [base], base
  for r in range(step_rounds, stop_round, step_rounds):
    if kind == "alpha":
      value = max(value - 0.2, 0.5)
    elif kind == "beta":
      value = min(value + 0.4, 1.0)
    else:
      value = value * 0.1
    rounds.append(r)
    values.append(value)
  return rounds, values


def to_table(spec: str, kind: str, base: float, step_rounds: int = 10,
             stop_round: int = 30, field: str = "") -> tuple[list[int], list[float]]:
  field = field or f"{kind}_schedule"
  spec = str(spec).strip()
  if not spec:
    return [0], [base]
  if spec == "official":
    return official_step(kind, base, step_rounds, stop_round)
  rounds, values = [], []
  for part in spec.split(","):
    try:
      r, v = part.split(":")
      rounds.append(int(r))
      values.append(float(v))
    except ValueError:
      raise ConfigError(field, f"cannot read '{part}' in '{spec}'; write '' (constant), "
                        "'official', or round:value pairs such as '0:0.1,10:0.5'") from None
  if rounds[0] != 0 or any(b <= a for a, b in zip(rounds, rounds[1:])):
    raise ConfigError(field, f"'{spec}': rounds must start at 0 and increase")
  low, high = (0.0, 1.0) if kind in ("alpha", "beta") else (0.0, np.inf)
  bad = [v for v in values if not low <= v <= high or (kind == "lr" and v == 0)]
  if bad:
    raise ConfigError(field, f"'{spec}': values {bad} are outside "
                      f"{'[0, 1]' if kind != 'lr' else '(0, inf)'}")
  return rounds, values


def clients_lr_table(spec: str, num_rounds: int) -> tuple[list[int], list[float]]:
  """The `lr_schedule` setting (a factor on every algorithm's client learning rate) as a
  table: the forms above, or `fml_official`: x0.1 every int(num_rounds / 3) rounds, as
  the official FML code (HEAD) steps its learning rate (50 rounds: from 0-based rounds
  16, 32 and 48 on)."""
  if str(spec).strip() == "fml_official":
    step = max(num_rounds // 3, 1)
    rounds = list(range(0, num_rounds, step))
    return rounds, [0.1 ** i for i in range(len(rounds))]
  return to_table(spec, "lr", 1.0, field="lr_schedule")


def value_at(table: tuple[list[int], list[float]], round_index: jax.Array):
  """The scheduled value at a (traced) 0-based round index."""
  rounds, values = table
  if len(values) == 1:
    return values[0]   # a Python constant: folds into the compiled step
  position = jnp.sum(round_index >= jnp.asarray(rounds)) - 1
  return jnp.asarray(values, jnp.float32)[position]

"""Objective (task) heterogeneity: a client's task is a label mapping over the same inputs.

A task maps each of the dataset's (fine) classes to one of the task's classes, or
to -1 when the class is not part of the task:

  full              the dataset's own labels (the global task)
  parity            label % 2 (2 classes: even, odd)
  subset_0-4        only classes 0..4 (also `subset_1.3.5`), renumbered 0..n-1 in order
  coarse_0.0.1.1.2  fine class i -> coarse class given at position i

A client's local model outputs its task's classes; the meme keeps the global task.
To compare a meme with a local model, the meme's class probabilities are mapped
into the task's space (`task_log_probs`): a coarse class gets the sum of its fine
classes' probabilities; for a subset the probabilities of the task's classes are
renormalized to sum to 1. Clients with a subset task hold only examples of its
classes (the data loader filters their splits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fml_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  label_map: tuple       # (num_classes,) task class of each fine class, -1: not in the task
  num_outputs: int

  @property
  def is_identity(self) -> bool:
    return self.label_map == tuple(range(len(self.label_map)))

  @property
  def classes(self) -> np.ndarray:
    """The fine classes that belong to the task."""
    return np.flatnonzero(np.asarray(self.label_map) >= 0)


def _class_list(text: str, num_classes: int, spec: str, field: str) -> list[int]:
  try:
    if "-" in text:
      lo, hi = (int(v) for v in text.split("-"))
      values = list(range(lo, hi + 1))
    else:
      values = [int(v) for v in text.split(".")]
  except ValueError:
    raise ConfigError(field, f"cannot read the classes of task '{spec}'; write e.g. subset_0-4, "
                      "subset_1.3.5 or coarse_0.0.1.1") from None
  bad = [v for v in values if not 0 <= v < num_classes]
  if bad:
    raise ConfigError(field, f"task '{spec}' names classes {bad}; the dataset has classes "
                      f"0..{num_classes - 1}")
  return values


def parse_task(spec: str, num_classes: int, field: str = "client_tasks") -> Task:
  if spec == "full":
    return Task(spec, tuple(range(num_classes)), num_classes)
  if spec == "parity":
    return Task(spec, tuple(c % 2 for c in range(num_classes)), 2)
  if spec.startswith("subset_"):
    classes = sorted(set(_class_list(spec[7:], num_classes, spec, field)))
    if len(classes) < 2:
      raise ConfigError(field, f"task '{spec}' needs at least two classes")
    label_map = [-1] * num_classes
    for j, c in enumerate(classes):
      label_map[c] = j
    return Task(spec, tuple(label_map), len(classes))
  if spec.startswith("coarse_"):
    label_map = _class_list(spec[7:], 1 << 30, spec, field)
    if len(label_map) != num_classes:
      raise ConfigError(field, f"task '{spec}' gives {len(label_map)} coarse labels; it needs "
                        f"one per class ({num_classes})")
    if sorted(set(label_map)) != list(range(max(label_map) + 1)) or max(label_map) < 1:
      raise ConfigError(field, f"task '{spec}': coarse labels must be 0..n-1 with n >= 2, "
                        "each used")
    return Task(spec, tuple(label_map), max(label_map) + 1)
  raise ConfigError(field, f"unknown task '{spec}'; use full, parity, subset_A-B, "
                    "subset_A.B.C or coarse_L0.L1...")


def task_log_probs(log_probs: jax.Array, task: Task) -> jax.Array:
  """Fine-class log-probabilities (..., num_classes) -> the task's (..., num_outputs):
  log of the summed probabilities of each task class's fine classes, renormalized
  over the classes that belong to the task. Gradients flow through."""
  if task.is_identity:
    return log_probs
  label_map = np.asarray(task.label_map)
  member = label_map[:, None] == np.arange(task.num_outputs)[None, :]   # (C, T)
  grouped = jax.nn.logsumexp(jnp.where(member, log_probs[..., :, None], -jnp.inf), axis=-2)
  in_task = jax.nn.logsumexp(jnp.where(label_map >= 0, log_probs, -jnp.inf), axis=-1,
                             keepdims=True)
  return grouped - in_task


def client_tasks(config, num_classes: int, num_clients: int) -> list[Task]:
  """Each client's task from `config.client_tasks` (comma-separated, assigned
  round-robin; num_clients entries = one per client; "" = every client the full task)."""
  specs = [v.strip() for v in str(config.get("client_tasks", "")).split(",") if v.strip()]
  parsed = {spec: parse_task(spec, num_classes) for spec in specs or ["full"]}
  specs = specs or ["full"]
  return [parsed[specs[i % len(specs)]] for i in range(num_clients)]

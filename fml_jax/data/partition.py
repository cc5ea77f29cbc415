"""Splitting a centralized training set among clients (numpy, seeded).

Every function returns one int64 index array per client; every training example
is assigned to exactly one client. `matching_test_split` then gives each client a
test split drawn from the test set with the same label mix as its training data,
so personalized accuracy is measured on data like the client's own.
"""

from __future__ import annotations

import numpy as np

from fml_jax.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "shards")   # for centralized datasets; synthetic is "natural"


def check_partition_fits_dataset(dataset: str, partition: str) -> None:
  if dataset == "synthetic" and partition != "natural":
    raise ConfigError("partition", "dataset 'synthetic' is partitioned by construction "
                      f"(each client draws its own data): use 'natural', not '{partition}'")
  if dataset != "synthetic" and partition == "natural":
    raise ConfigError("partition", f"'natural' is only for dataset 'synthetic'; for "
                      f"'{dataset}' choose one of {', '.join(PARTITIONS)}")


def iid(num_examples: int, num_clients: int,
        rng: np.random.Generator) -> list[np.ndarray]:
  """Uniformly shuffled, nearly equal parts."""
  if num_clients > num_examples:
    raise ConfigError(
        "num_clients", f"{num_clients} clients but only {num_examples} training "
        "examples: an iid partition would leave clients with no data")
  return [np.sort(p) for p in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
              min_examples: int, rng: np.random.Generator,
              max_attempts: int = 1000, cap: bool = False) -> list[np.ndarray]:
  """Label skew of Hsu et al. 2019: each class is split by proportions ~ Dir(alpha).

  Redraws the whole partition until every client holds at least `min_examples`
  (the usual practice in the FL literature); small alpha is more skewed. With `cap`
  (NIID-Bench's split, which FedMR's official code uses), a client that already holds
  N / num_clients examples gets no share of the classes that follow (its proportion is
  set to 0 and the others renormalized), which bounds how large a client grows.
  """
  if num_clients * max(min_examples, 1) > len(labels):
    raise ConfigError(
        "dirichlet_min_examples", f"{num_clients} clients x {min_examples} examples "
        f"is more than the {len(labels)} training examples")
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(max_attempts):
    parts = [[] for _ in range(num_clients)]
    for idx in by_class:
      idx = rng.permutation(idx)
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      if cap:   # clients at N / num_clients or more take no more examples
        sizes = np.array([sum(len(piece) for piece in p) for p in parts])
        proportions = proportions * (sizes < len(labels) / num_clients)
        proportions = proportions / proportions.sum()
      cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
      for client, piece in enumerate(np.split(idx, cuts)):
        parts[client].append(piece)
    parts = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(p) for p in parts) >= max(min_examples, 1):
      return parts
  raise ConfigError(
      "dirichlet_alpha", f"Dirichlet({alpha}) left some of the {num_clients} clients "
      f"with fewer than {max(min_examples, 1)} examples in {max_attempts} draws; "
      "raise dirichlet_alpha, or lower num_clients or dirichlet_min_examples")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
  """FedAvg's pathological non-IID split: sort by label, cut into equal shards,
  give each client `shards_per_client` random shards (so about that many classes)."""
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ConfigError(
        "shards_per_client", f"{num_clients} clients x {shards_per_client} shards = "
        f"{num_shards} shards, more than the {len(labels)} training examples")
  # A random order first, then a stable sort: ties within a class are shuffled.
  order = rng.permutation(len(labels))
  order = order[np.argsort(labels[order], kind="stable")]
  pieces = np.array_split(order, num_shards)
  assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def matching_test_split(client_train_labels: list[np.ndarray], test_labels: np.ndarray,
                        num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
  """For each client, test indices with the label mix of its training data.

  A client's test split is proportional to its share of the training data (the
  splits together are about the size of the test set) and its class counts follow
  its training label histogram (largest remainder rounding). Examples are drawn
  without replacement within a client; different clients may share test examples.
  """
  total_train = sum(len(y) for y in client_train_labels)
  pools = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
  splits = []
  for y in client_train_labels:
    size = max(1, int(round(len(test_labels) * len(y) / total_train)))
    hist = np.bincount(y, minlength=num_classes).astype(np.float64)
    exact = size * hist / hist.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = size - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    picked = [rng.choice(pools[c], size=min(n, len(pools[c])), replace=False)
              for c, n in enumerate(counts) if n > 0 and len(pools[c]) > 0]
    splits.append(np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64))
  return splits


def draw_examples(labels: np.ndarray, size: int, balanced: bool, num_classes: int,
                  rng: np.random.Generator) -> np.ndarray:
  """`size` distinct example indices: equal counts per class (`balanced`; the first
  classes take the remainder, a class short of examples gives what it has) or uniform."""
  if size > len(labels):
    raise ConfigError("public_size", f"{size} examples asked for, the split has {len(labels)}")
  if not balanced:
    return np.sort(rng.choice(len(labels), size, replace=False))
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  counts = np.full(num_classes, size // num_classes)
  counts[:size % num_classes] += 1
  picked = [pool[:n] for pool, n in zip(pools, counts)]
  short = size - sum(len(p) for p in picked)
  if short:   # fill from whatever is left, uniformly
    rest = np.concatenate([pool[n:] for pool, n in zip(pools, counts)])
    picked.append(rng.choice(rest, short, replace=False))
  return np.sort(np.concatenate(picked))


def remove_examples(parts: list[np.ndarray], removed: np.ndarray, field: str) -> list[np.ndarray]:
  """Each client's indices without `removed`; refuses to leave a client empty."""
  kept = [np.setdiff1d(p, removed) for p in parts]
  empty = [i for i, p in enumerate(kept) if len(p) == 0]
  if empty:
    raise ConfigError(field, f"holding these examples out leaves clients {empty[:5]} with no "
                      "training data; hold out fewer or use fewer clients")
  return kept

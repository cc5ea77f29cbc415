"""FedProx's Synthetic(a, b) dataset, generated here (no download).

Li et al. 2020 ("Federated Optimization in Heterogeneous Networks"), generator
`generate_niid.py` of the authors' code. Client k draws its own model and inputs:

    u_k ~ N(0, a)            B_k ~ N(0, b)
    W_k (60x10), b_k ~ N(u_k, 1)        v_k (60) ~ N(B_k, 1)
    x ~ N(v_k, S),  S = diag(j^-1.2)    y = argmax(softmax(x W_k + b_k))

`a` controls how much the clients' models differ, `b` how much their inputs
differ; both are standard deviations, as in the authors' numpy code. Client sizes
follow the authors' heavy-tailed lognormal(4, 2) + 50.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_FEATURES = 60
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class SyntheticClients:
  """Per-client arrays: x[k] is (n_k, 60) float32, y[k] is (n_k,) int32; they are views
  of `all_x`/`all_y`, every client's examples one after another (client k's start at
  `starts[k]`)."""
  x: list[np.ndarray]
  y: list[np.ndarray]
  all_x: np.ndarray
  all_y: np.ndarray
  starts: np.ndarray


def client_sizes(num_clients: int, rng: np.random.Generator,
                 max_examples: int) -> np.ndarray:
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  if max_examples > 0:
    sizes = np.minimum(sizes, max_examples)
  return sizes


def generate(num_clients: int, alpha: float, beta: float, seed: int,
             max_examples: int = 0) -> SyntheticClients:
  """Draws every client's examples of Synthetic(alpha, beta)."""
  rng = np.random.default_rng(seed)
  sizes = client_sizes(num_clients, rng, max_examples)
  model_means = rng.normal(0.0, alpha, num_clients)   # u_k
  input_means = rng.normal(0.0, beta, num_clients)    # B_k
  # x ~ N(v_k, diag(j^-1.2)): a diagonal covariance is a per-feature scale.
  feature_std = np.power(np.arange(1, NUM_FEATURES + 1, dtype=np.float64), -0.6)
  # One array for all clients, written in place: 100,000 clients' separate small arrays
  # stayed in the allocator's heap after use (about 8 GiB more resident memory).
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  all_x = np.empty((int(sizes.sum()), NUM_FEATURES), np.float32)
  all_y = np.empty(int(sizes.sum()), np.int32)
  for k in range(num_clients):
    w = rng.normal(model_means[k], 1.0, (NUM_FEATURES, NUM_CLASSES))
    b = rng.normal(model_means[k], 1.0, NUM_CLASSES)
    v = rng.normal(input_means[k], 1.0, NUM_FEATURES)
    x = v + feature_std * rng.standard_normal((sizes[k], NUM_FEATURES))
    # argmax of softmax is argmax of the logits.
    y = np.argmax(x @ w + b, axis=1)
    all_x[starts[k]:starts[k] + sizes[k]] = x
    all_y[starts[k]:starts[k] + sizes[k]] = y
  ends = starts + sizes
  return SyntheticClients(x=[all_x[a:b] for a, b in zip(starts, ends)],
                          y=[all_y[a:b] for a, b in zip(starts, ends)],
                          all_x=all_x, all_y=all_y, starts=starts)

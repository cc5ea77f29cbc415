"""Ditto against a plain re-statement of its two local problems."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fml_jax import local_training, losses
from fml_jax.models import forward

from conftest import client_row, make_runner, small_config

CONFIG = dict(algorithm="ditto", momentum=0.0, weight_decay=0.0, learning_rate=0.05,
              ditto__lam=0.7, ditto__personal_epochs=2)



def test_personal_step_is_sgd_on_ce_plus_the_proximal_pull_and_the_upload_is_fedavgs():
  config = small_config(**CONFIG)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  (cohort,), _ = runner.begin_round(state)
  client, personal = client_row(cohort.clients, 1), client_row(cohort.client_state, 1)
  w = state.server["params"]
  result = algorithm.client_update(state.server, personal, client, data, 0)

  lr, lam = config.learning_rate, config.ditto.lam

  def reference_step(v, xb, yb, mask, key):
    def ce(p):
      logits, _ = forward(algorithm.model, p, {}, xb, True, key)
      return losses.cross_entropy(logits, yb, mask)
    grads = jax.grad(ce)(v)
    return jax.tree.map(lambda p, g, a: p - lr * (g + lam * (p - a)), v, grads, w), {}

  expected, _ = local_training.run_local_steps(
      reference_step, personal.params, data, client.train_idx, client.train_n,
      jax.random.fold_in(client.key, 1), 2, config.batch_size, min_examples=data.min_train)
  chex.assert_trees_all_close(result.client_state.params, expected, rtol=1e-5, atol=1e-6)
  # The global copy trains exactly as FedAvg's client (same batches: paired).
  fedavg = make_runner(small_config(**dict(CONFIG, algorithm="fedavg")), "vmap")
  fedavg_result = fedavg.algorithm.client_update(fedavg.init(0).server, (), client, data, 0)
  chex.assert_trees_all_close(result.upload, fedavg_result.upload, rtol=1e-6, atol=1e-7)


def test_lam_pulls_the_personal_models_toward_the_global_one():
  distances = []
  for lam in (0.0, 5.0):
    runner = make_runner(small_config(**dict(CONFIG, ditto__lam=lam)), "vmap")
    state = runner.init(0)
    for _ in range(2):
      state, _ = runner.run_round(state)
    w, v = state.server["params"], state.population[0].params
    distances.append(sum(float(jnp.sum((a[None] - b) ** 2))
                         for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(v))))
  assert distances[1] < 0.5 * distances[0]
  assert np.isfinite(distances).all()

"""SCAFFOLD against a plain re-statement of its math on a tiny example."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import local_training, losses
from fml_jax.models import forward
from fml_jax.rounds.types import RoundContext

from conftest import client_row, make_runner, small_config

CONFIG = dict(algorithm="scaffold", momentum=0.0, weight_decay=0.0, learning_rate=0.05,
              num_clients=6, clients_per_round=3)



def random_like(tree, key, scale=0.01):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape, l.dtype)
                                      for k, l in zip(keys, leaves)])


def test_client_update_is_corrected_sgd_and_option_two():
  """y: K plain SGD steps on CE with gradient g + c - c_i (the same batches, through
  the same masked scan); c_i+ = c_i - c + (x - y) / (K lr)."""
  config = small_config(**CONFIG)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  server = dict(state.server, control=random_like(state.server["params"], jax.random.PRNGKey(1)))
  (cohort,), _ = runner.begin_round(state.replace(server=server))
  client, c_i = client_row(cohort.clients, 0), {"control": random_like(server["params"],
                                                                jax.random.PRNGKey(2))}
  result = algorithm.client_update(server, c_i, client, data, 0)

  x, c, lr = server["params"], server["control"], config.learning_rate

  def reference_step(carry, xb, yb, mask, key):
    params, k = carry
    def loss(p):
      logits, _ = forward(algorithm.model, p, {}, xb, True, key)
      return losses.cross_entropy(logits, yb, mask)
    grads = jax.grad(loss)(params)
    params = jax.tree.map(lambda p, g, cc, ci: p - lr * (g + cc - ci), params, grads, c,
                          c_i["control"])
    return (params, k + 1), {}

  (y, steps), _ = local_training.run_local_steps(
      reference_step, (x, 0), data, client.train_idx, client.train_n, client.key,
      config.local_epochs, config.batch_size, min_examples=data.min_train)
  own_steps = config.local_epochs * -(-int(client.train_n) // config.batch_size)
  assert int(steps) == own_steps == int(result.metrics["local_steps"])
  chex.assert_trees_all_close(result.upload["params"], y, rtol=1e-5, atol=1e-6)
  expected_c_i = jax.tree.map(lambda ci, cc, xx, yy: ci - cc + (xx - yy) / (own_steps * lr),
                              c_i["control"], c, x, y)
  chex.assert_trees_all_close(result.client_state["control"], expected_c_i, rtol=1e-4,
                              atol=1e-5)
  chex.assert_trees_all_close(result.upload["delta_control"], jax.tree.map(
      jnp.subtract, expected_c_i, c_i["control"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("server_lr, reports", [(1.0, None), (0.5, [True, False, True])])
def test_server_moves_x_by_the_mean_and_c_by_the_sum_over_all_clients(server_lr, reports):
  config = small_config(**CONFIG, server__learning_rate=server_lr)
  runner = make_runner(config, "vmap")
  algorithm = runner.algorithm
  server = jax.device_get(runner.init(0).server)
  params = server["params"]
  uploads = {"params": jax.tree.map(lambda p: np.stack([p + i + 1.0 for i in range(3)]), params),
             "delta_control": jax.tree.map(lambda p: np.stack([np.full_like(p, 0.1 * (i + 1))
                                                               for i in range(3)]), params)}
  mask = np.ones(3, bool) if reports is None else np.asarray(reports)
  weights = mask / mask.sum()
  context = RoundContext(round=jnp.int32(0), clients=None, weights=jnp.asarray(weights, jnp.float32),
                         key=jax.random.PRNGKey(0),
                         reports=None if reports is None else jnp.asarray(mask))
  new, _ = jax.jit(algorithm.server_update)(server, uploads, context)
  mean_step = sum((i + 1.0) * w for i, w in enumerate(weights))        # mean of y_i - x
  control_step = sum(0.1 * (i + 1) for i in range(3) if mask[i]) / config.num_clients
  chex.assert_trees_all_close(new["params"], jax.tree.map(lambda p: p + server_lr * mean_step,
                                                          params), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(new["control"], jax.tree.map(
      lambda p: np.full_like(p, control_step), params), rtol=1e-5, atol=1e-6)


def test_scaffold_with_zero_controls_starts_like_fedavg():
  """Round one: every control variate is 0, so the clients' models are FedAvg's (same
  initial weights, cohort and batches: paired), and so is the uniform average."""
  scaffold = make_runner(small_config(**CONFIG), "vmap")
  fedavg = make_runner(small_config(**dict(CONFIG, algorithm="fedavg", aggregation="uniform")),
                       "vmap")
  a, _ = scaffold.run_round(scaffold.init(0))
  b, _ = fedavg.run_round(fedavg.init(0))
  chex.assert_trees_all_close(a.server["params"], b.server["params"], rtol=1e-5, atol=1e-6)
  # ... and the controls moved: the clients' drift is recorded.
  assert float(jnp.abs(jax.tree.leaves(a.server["control"])[0]).max()) > 0

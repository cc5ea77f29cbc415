"""FedRep against a plain re-statement: the head trains with the body frozen, then the
body with the new head frozen; only the body is averaged."""

import chex
import jax

from fml_jax import local_training, losses
from fml_jax.algorithms.fedrep import head_layer, split
from fml_jax.models import forward

from conftest import client_row, make_runner, small_config

CONFIG = dict(algorithm="fedrep", momentum=0.0, weight_decay=0.0, learning_rate=0.05,
              fedrep__head_epochs=2)



def test_head_is_the_output_layer():
  params = {"Dense_0": 1, "Dense_1": 2, "Dense_2": 3, "Conv_0": 4}
  assert head_layer(params) == "Dense_2"
  assert split(params) == ({"Dense_0": 1, "Dense_1": 2, "Conv_0": 4}, {"Dense_2": 3})
  assert head_layer({f"Dense_{i}": i for i in range(12)}) == "Dense_11"


def test_client_update_trains_head_then_body_each_with_the_other_frozen():
  config = small_config(**CONFIG)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  (cohort,), _ = runner.begin_round(state)
  client, head = client_row(cohort.clients, 2), client_row(cohort.client_state, 2)
  body = state.server["params"]
  result = algorithm.client_update(state.server, head, client, data, 0)
  lr = config.learning_rate

  def sgd_on(frozen):
    def step(part, xb, yb, mask, key):
      def ce(p):
        logits, _ = forward(algorithm.model, {**frozen, **p}, {}, xb, True, key)
        return losses.cross_entropy(logits, yb, mask)
      grads = jax.grad(ce)(part)
      return jax.tree.map(lambda p, g: p - lr * g, part, grads), {}
    return step

  args = (data, client.train_idx, client.train_n)
  new_head, _ = local_training.run_local_steps(
      sgd_on(body), head, *args, jax.random.fold_in(client.key, 1), 2, config.batch_size,
      min_examples=data.min_train)
  new_body, _ = local_training.run_local_steps(
      sgd_on(new_head), body, *args, client.key, config.local_epochs, config.batch_size,
      min_examples=data.min_train)
  chex.assert_trees_all_close(result.client_state, new_head, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(result.upload, new_body, rtol=1e-5, atol=1e-6)
  assert set(result.upload) == set(body) and set(result.client_state) == {"Dense_2"}


def test_each_client_predicts_with_the_shared_body_and_its_own_head():
  runner = make_runner(small_config(**CONFIG), "vmap")
  state, _ = runner.run_round(runner.init(0))
  (models,) = runner.algorithm.personalized_models(state.server, state.population)
  assert models.per_client
  n = jax.tree.leaves(state.population)[0].shape[0]
  for name, leaf in state.server["params"].items():
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[n - 1], models.params[name]), leaf)
  chex.assert_trees_all_equal(models.params["Dense_2"], state.population[0]["Dense_2"])
  assert runner.algorithm.global_model(state.server) is None

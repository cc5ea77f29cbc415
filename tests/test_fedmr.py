"""FedMR: recombination is a per-group permutation of the slots; the two stages switch
at the set round; end to end the mean model learns MNIST."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import train
from fml_jax.algorithms import fedmr

from conftest import requires_mnist, small_config
from test_rounds import make_runner

K = 6


def labelled_slots():
  """Slots whose every entry says where it came from: value = 100 * slot + leaf number."""
  shapes = {"Conv_0": {"kernel": (3, 3, 1, 4), "bias": (4,)},
            "Dense_0": {"kernel": (8, 5), "bias": (5,)},
            "Dense_1": {"kernel": (5, 3), "bias": (3,)}}
  leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  slots = [jnp.stack([jnp.full(shape, 100.0 * s + n) for s in range(K)])
           for n, shape in enumerate(leaves)]
  return jax.tree.unflatten(tree, slots)


def sources(recombined):
  """For each leaf, the (K,) source slot each new slot received (checks leaves are whole)."""
  out = []
  for n, leaf in enumerate(jax.tree.leaves(recombined)):
    leaf = np.asarray(leaf).reshape(K, -1)
    assert np.all(leaf == leaf[:, :1]), "a slot received a mix of sources within one tensor"
    src = (leaf[:, 0] - n) / 100.0
    assert np.all(src == np.round(src))
    out.append(src.astype(int))
  return out


@pytest.mark.parametrize("granularity", fedmr.GRANULARITIES)
def test_recombination_is_a_permutation_per_leaf(granularity):
  slots = labelled_slots()
  perms = fedmr.recombination_permutations(slots, jax.random.PRNGKey(0), K, granularity, 0.5)
  new = fedmr.recombine(slots, perms)
  for src in sources(new):
    assert sorted(src) == list(range(K))   # every slot receives exactly one source per leaf
  for old_leaf, new_leaf in zip(jax.tree.leaves(slots), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.sort(np.asarray(old_leaf), axis=0),
                                  np.sort(np.asarray(new_leaf), axis=0))  # multiset kept


def test_tensor_granularity_can_split_a_kernel_from_its_bias():
  slots = labelled_slots()
  split = 0
  for seed in range(5):
    new = fedmr.recombine(slots, fedmr.recombination_permutations(
        slots, jax.random.PRNGKey(seed), K, "tensor", 0.5))
    src = sources(new)   # leaf order: Conv_0 bias, kernel, Dense_0 bias, kernel, ...
    split += sum(not np.array_equal(src[i], src[i + 1]) for i in (0, 2, 4))
  assert split > 0


def test_layer_granularity_keeps_each_kernel_with_its_bias():
  slots = labelled_slots()
  for seed in range(5):
    src = sources(fedmr.recombine(slots, fedmr.recombination_permutations(
        slots, jax.random.PRNGKey(seed), K, "layer", 0.5)))
    for i in (0, 2, 4):
      np.testing.assert_array_equal(src[i], src[i + 1])
  assert fedmr.recombination_groups(slots, "layer", 0.5) == [0, 0, 1, 1, 2, 2]


def test_block_granularity_groups_consecutive_layers():
  slots = labelled_slots()
  # 3 layers, 2/3 of them per block: (Conv_0, Dense_0) and (Dense_1).
  assert fedmr.recombination_groups(slots, "block", 0.6) == [0, 0, 0, 0, 1, 1]
  assert fedmr.recombination_groups(slots, "block", 1.0) == [0] * 6
  assert fedmr.recombination_groups(slots, "tensor", 1.0) == list(range(6))


def slots_all_equal(state):
  return all(np.allclose(leaf, leaf[:1]) for leaf in jax.tree.leaves(jax.device_get(
      state.server["slots"])))


def test_two_stages_switch_at_the_set_round():
  config = small_config(algorithm="fedmr", clients_per_round=4, fedmr__first_stage_rounds=2)
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  assert slots_all_equal(state)   # one initialization for every slot
  for r in range(1, 4):
    state, _ = runner.run_round(state)
    # Rounds 1 and 2 (0-based 0 and 1) average; round 3 recombines.
    assert slots_all_equal(state) == (r <= 2), r


def test_recombination_preserves_the_mean_model():
  config = small_config(algorithm="fedmr", clients_per_round=4)
  runner = make_runner(config, "sequential")
  state = runner.init(config.seed)
  state, _ = runner.run_round(state)
  (cohort,), _ = runner.begin_round(state)
  uploads = [runner.algorithm.client_update(state.server, (),
                                            jax.tree.map(lambda a: a[i], cohort.clients),
                                            runner.data, 0).upload["params"] for i in range(4)]
  mean_trained = jax.tree.map(lambda *u: np.mean(np.stack(u), 0), *uploads)
  state, _ = runner.run_round(state)
  assert not slots_all_equal(state)
  global_params = runner.algorithm.global_model(state.server).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               global_params, mean_trained)
  np.testing.assert_array_equal(np.asarray(state.server["last_client"]),
                                np.asarray(cohort.clients.id))


@pytest.mark.parametrize("mode", ["keep", "recombine"])
def test_optimizer_state_modes_run_and_differ_from_reset(mode):
  base = small_config(algorithm="fedmr", clients_per_round=4, num_rounds=3)
  results = {}
  for m in ("reset", mode):
    runner = make_runner(small_config(algorithm="fedmr", clients_per_round=4,
                                      fedmr__optimizer_state=m), "vmap")
    state = runner.init(base.seed)
    for _ in range(3):
      state, _ = runner.run_round(state)
    results[m] = jax.device_get(state.server["slots"])
    assert ("opt_state" in state.server) == (m != "reset")
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), results["reset"], results[mode])
  assert max(jax.tree.leaves(diff)) > 1e-6


@requires_mnist
def test_fedmr_mnist_dirichlet_mean_model_learns(tmp_path):
  cfg = small_config(algorithm="fedmr", dataset="mnist", partition="dirichlet",
                     dirichlet_alpha=0.5, num_clients=20, clients_per_round=5, num_rounds=4,
                     local_epochs=1, batch_size=50, momentum=0.5, eval_every=4)
  summary = train.run(cfg, str(tmp_path))
  assert summary["final"]["global_test_acc"] > 0.6   # chance is 0.1

"""The vectorized runner against its sequential reference, and the local-training
machinery against a plain Python loop over real (unpadded) batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import local_training
from fml_jax import config_checks
from fml_jax.algorithms import ALGORITHMS, BUILTIN, build_algorithm
from fml_jax.checkpoints import Checkpointer
from fml_jax.data import from_client_lists, load_federated_data
from fml_jax.rounds import executors
from fml_jax.rounds import Runner
from fml_jax.optimizers import TrainState, make_optimizer

from conftest import make_runner, small_config

GROUPED_HOST = dict(algorithm="fml", local_models="mlp,mlp_small", clients_per_round=4)


def run_rounds(config, strategy, rounds):
  runner = make_runner(config, strategy)
  state = runner.init(config.seed)
  history = []
  for _ in range(rounds):
    state, report = runner.run_round(state)
    assert bool(report.all_finite)
    history.append(jax.device_get(report.metrics))
  return jax.device_get(state), history


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


# --- driven by the registry: every registered algorithm, with its own small config -----

REGISTERED = sorted(cls.name for cls in BUILTIN)   # the package's registry


def registry_config(name: str, **extra):
  """The tiny synthetic config with the algorithm's own `small_overrides`."""
  overrides = ALGORITHMS[name].small_overrides()
  assert overrides is not None, f"{name} must define small_overrides() (rounds/algorithm.py)"
  return small_config(algorithm=name, **{**overrides, **extra})


def test_every_registered_algorithm_is_covered():
  assert {"fml", "fedavg", "fedprox", "local", "fedmr", "fedmd", "fedh2l"} <= set(REGISTERED)
  for name in REGISTERED:
    config_checks.validate(registry_config(name))


# Each executor and store, against the sequential executor on the device store. chunk
# size 1: lax.map over vmapped chunks (padding is covered in tests/test_sharding.py).
VARIANTS = [("vmap", "device"), ("chunked", "device"), ("sequential", "host"), ("vmap", "host")]


@pytest.mark.parametrize("name", REGISTERED)
def test_executors_and_stores_equal_the_sequential_reference_and_resume(name, tmp_path):
  config = registry_config(name, chunk_size=1)
  runner, reference, reference_metrics = run_grouped_rounds(config, "sequential", 2)
  # Synthetic clients have unequal sizes, so smaller clients run masked steps.
  steps = -(-np.asarray(runner.data.train_n) // config.batch_size)
  assert steps.max() > steps.min()
  assert int(reference.round) == 2
  for strategy, placement in VARIANTS:
    other, state, metrics = run_grouped_rounds(config, strategy, 2, placement)
    assert other.strategy == strategy and other.placement == placement
    tolerance = dict(rtol=1e-6, atol=1e-7) if strategy == "sequential" else {}
    assert_trees_close(state.server, reference.server, **tolerance)
    assert_trees_close(state.population, reference.population, **tolerance)
    assert_trees_close(metrics, reference_metrics, **tolerance)
  # Resume: round 1, a checkpoint written and read back, round 2 == two rounds at once.
  state = runner.warm_start(runner.init(config.seed))
  state, _ = runner.run_round(state)
  checkpointer = Checkpointer(tmp_path / "checkpoints", 1, 1)
  checkpointer.save(1, state)
  step, restored = checkpointer.restore_latest(runner.abstract_state(config.seed))
  checkpointer.close()
  assert step == 1
  resumed, _ = runner.run_round(runner.place(restored))
  assert_trees_close(jax.device_get(resumed), reference, rtol=0, atol=0)


# FML in the full DOM setting: tasks, a catfish and three groups, partial participation.
FML_DOM = dict(algorithm="fml", local_models="mlp,mlp_small", client_tasks="full,parity,full",
               catfish_clients="5", catfish_model="logreg", clients_per_round=5,
               fml__alpha_schedule="0:0.7,1:0.4")


def run_grouped_rounds(config, strategy, rounds, placement="device"):
  runner = make_runner(config, strategy, placement)
  state = runner.warm_start(runner.init(config.seed))
  history = []
  for _ in range(rounds):
    state, report = runner.run_round(state)
    assert bool(report.all_finite)
    history.append(jax.device_get(report.metrics))
  return runner, jax.device_get(state), history


def test_vmap_equals_sequential_with_tasks_and_a_catfish():
  config = small_config(**FML_DOM)
  runner, seq_state, seq_metrics = run_grouped_rounds(config, "sequential", 2)
  assert runner.num_groups >= 3
  _, vmap_state, vmap_metrics = run_grouped_rounds(config, "vmap", 2)
  assert_trees_close(seq_state.server, vmap_state.server)
  assert_trees_close(seq_state.population, vmap_state.population)
  assert_trees_close(seq_metrics, vmap_metrics)


def test_host_store_takes_only_the_cohort_into_the_round():
  runner = make_runner(registry_config("fml"), "vmap", "host")
  assert runner.clients_per_round < runner.data.num_clients
  shapes = runner.store.round_input(runner.abstract_state(0)).population
  for group, k in zip(shapes, runner.cohort_sizes):
    assert all(x.shape[0] == k for x in jax.tree.leaves(group))


def test_host_store_lives_on_the_cpu_device_and_is_written_in_place():
  config = small_config(**GROUPED_HOST)
  runner = make_runner(config, "vmap", "host")
  state = runner.init(config.seed)
  cpu = jax.devices("cpu")[0]
  assert all(x.devices() == {cpu} for x in jax.tree.leaves(state.population))
  before = jax.device_get(state.population)
  slots = [np.asarray(s) for s in runner.groups.sample(state.key, state.round)]
  state, _ = runner.run_round(state)
  after = jax.device_get(state.population)
  assert all(x.devices() == {cpu} for x in jax.tree.leaves(state.population))
  for g, group_slots in enumerate(slots):
    kernel = lambda p: np.asarray(jax.tree.leaves(p[g].params)[-1])
    changed = np.flatnonzero(np.any(kernel(before) != kernel(after), axis=tuple(
        range(1, kernel(before).ndim))))
    np.testing.assert_array_equal(changed, np.sort(group_slots))


def test_groups_sample_their_share_and_only_the_sampled_clients_change():
  config = small_config(algorithm="local", local_models="mlp_small,logreg", clients_per_round=4)
  runner = make_runner(config, "vmap")
  before = jax.device_get(runner.init(config.seed))
  cohorts, context = runner.begin_round(runner.init(config.seed))
  ids = [np.asarray(c.clients.id) for c in cohorts]
  # Round robin: even clients are mlp_small, odd ones logreg; two of each per round.
  assert [len(i) for i in ids] == [2, 2]
  assert np.all(ids[0] % 2 == 0) and np.all(ids[1] % 2 == 1)
  np.testing.assert_array_equal(np.asarray(context.clients.id), np.concatenate(ids))
  after, _ = runner.run_round(runner.init(config.seed))
  after = jax.device_get(after)
  for g, members in enumerate(runner.members):
    kernel = lambda s: jax.tree.leaves(s.population[g].params)[-1]
    changed = [int(m) for row, m in enumerate(members)
               if not np.allclose(kernel(before)[row], kernel(after)[row])]
    assert sorted(changed) == sorted(ids[g].tolist())


def test_rounds_change_exactly_the_sampled_clients():
  config = small_config(algorithm="fml", clients_per_round=2)
  runner = make_runner(config, "vmap")
  before = jax.device_get(runner.init(config.seed))
  (group,), _ = runner.begin_round(runner.init(config.seed))
  cohort = jax.device_get(group.clients.id)
  after, _ = runner.run_round(runner.init(config.seed))
  after = jax.device_get(after)
  assert len(set(cohort.tolist())) == 2
  changed = [c for c in range(config.num_clients)
             if not np.allclose(before.population[0].params["Dense_0"]["kernel"][c],
                                after.population[0].params["Dense_0"]["kernel"][c])]
  assert sorted(changed) == sorted(cohort.tolist())


def test_fedprox_with_mu_zero_equals_fedavg():
  fedavg, _ = run_rounds(small_config(algorithm="fedavg"), "vmap", 2)
  fedprox, _ = run_rounds(small_config(algorithm="fedprox", fedprox__mu=0.0), "vmap", 2)
  assert_trees_close(fedavg.server, fedprox.server, rtol=0, atol=0)
  moved, _ = run_rounds(small_config(algorithm="fedprox", fedprox__mu=1.0), "vmap", 2)
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), fedavg.server, moved.server)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_same_seed_same_result_other_seed_differs():
  config = small_config(algorithm="fml")
  a, ma = run_rounds(config, "vmap", 2)
  b, mb = run_rounds(config, "vmap", 2)
  assert_trees_close(a.server, b.server, rtol=0, atol=0)
  assert ma == mb
  c, _ = run_rounds(small_config(algorithm="fml", seed=1), "vmap", 2)
  assert not np.allclose(a.server["params"]["Dense_0"]["kernel"],
                         c.server["params"]["Dense_0"]["kernel"])


def test_fml_meme_is_forked_and_memes_are_averaged_uniformly():
  """With every client in the round, the new global model is the plain mean of the
  memes each client computes from the old global model."""
  config = small_config(algorithm="fml", clients_per_round=6)
  runner = make_runner(config, "vmap")
  state = runner.init(config.seed)
  (cohort,), _ = runner.begin_round(state)
  results = [runner.algorithm.client_update(
      state.server, jax.tree.map(lambda a: a[i], cohort.client_state),
      jax.tree.map(lambda a: a[i], cohort.clients), runner.data, 0) for i in range(6)]
  want = jax.tree.map(lambda *m: np.mean(np.stack(m), 0), *[r.upload for r in results])
  new_state, _ = runner.run_round(state)
  assert_trees_close(new_state.server["params"], want)


def test_weighted_aggregation_weights_by_example_count():
  config = small_config(algorithm="fedavg", clients_per_round=6, aggregation="weighted")
  runner = make_runner(config, "sequential")
  state = runner.init(config.seed)
  (cohort,), _ = runner.begin_round(state)
  uploads = [runner.algorithm.client_update(
      state.server, (), jax.tree.map(lambda a: a[i], cohort.clients), runner.data, 0).upload
             for i in range(6)]
  w = np.asarray(cohort.clients.train_n) / np.asarray(cohort.clients.train_n).sum()
  want = jax.tree.map(lambda *u: np.tensordot(w, np.stack(u), 1), *uploads)
  new_state, _ = runner.run_round(state)
  assert_trees_close(new_state.server["params"], want)


# --- local training: masked scan vs a plain loop over real batches -----------------------

def tiny_data(sizes, seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  # A fixed pool of 100 examples, so client 0's data never depends on the other sizes.
  x = rng.normal(size=(100, 8)).astype(np.float32)[:n]
  y = rng.integers(0, 3, 100).astype(np.int32)[:n]
  parts = np.split(np.arange(n), np.cumsum(sizes)[:-1])
  return from_client_lists(x, y, x[:10], y[:10], parts, [np.arange(3)] * len(sizes), 3)


def linear_step(optimizer):
  def step(state, x, y, mask, key):
    del key
    def loss_fn(w):
      logits = x @ w
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]
      return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1)
    loss, g = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(g, optimizer), {"train_loss": loss}
  return step


def reference_local_training(step, state, x_all, y_all, idx, n, key, epochs, batch_size):
  """A plain loop: shuffle, then the real batches (the last one short), no masking."""
  shuffle_key, step_key = jax.random.split(key)
  max_n = idx.shape[0]
  per_epoch = -(-max_n // batch_size)
  losses = []
  for e in range(epochs):
    order = np.asarray(local_training.epoch_order(jax.random.fold_in(shuffle_key, e), max_n, n))
    order = order[:n]   # the client's own examples, shuffled
    for b, start in enumerate(range(0, n, batch_size)):
      rows = idx[order[start:start + batch_size]]
      state, m = step(state, x_all[rows], y_all[rows], np.ones(len(rows), bool),
                      jax.random.fold_in(step_key, e * per_epoch + b))
      losses.append(float(m["train_loss"]))
  return state, np.mean(losses)


@pytest.mark.parametrize("n,batch_size", [(7, 3), (12, 4), (1, 5), (23, 8)])
def test_masked_scan_matches_plain_loop(n, batch_size):
  data = tiny_data([n, 30])   # client 0 is padded up to 30 slots
  config = small_config(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
  optimizer = make_optimizer(config)
  step = linear_step(optimizer)
  state = TrainState.create(jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)),
                                        jnp.float32), optimizer)
  key = jax.random.PRNGKey(3)
  got, metrics = jax.jit(lambda s: local_training.run_local_steps(
      step, s, data, data.train_rows()[0], data.train_n[0], key, 2, batch_size))(state)
  want, want_loss = reference_local_training(step, state, np.asarray(data.x_train),
                                             np.asarray(data.y_train),
                                             np.asarray(data.train_rows()[0]), n, key, 2,
                                             batch_size)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["train_loss"], want_loss, rtol=1e-5)


def test_padding_does_not_change_a_clients_result():
  """The same client padded to 12 or to 40 slots trains to the same parameters."""
  optimizer = make_optimizer(small_config(learning_rate=0.1))
  step = linear_step(optimizer)
  state = TrainState.create(jnp.zeros((8, 3)), optimizer)
  key = jax.random.PRNGKey(0)
  results = []
  for other in (5, 40):
    data = tiny_data([12, other])
    out, _ = local_training.run_local_steps(step, state, data, data.train_rows()[0],
                                            data.train_n[0], key, 3, 5)
    results.append(out)
  assert_trees_close(results[0], results[1], rtol=1e-6, atol=1e-7)
  # ... and training did something.
  assert np.abs(np.asarray(results[0].params)).sum() > 0


@pytest.mark.parametrize("sizes,batch_size", [([12, 10], 4), ([7, 8], 4), ([16, 16], 8)])
def test_unmasked_steps_when_every_client_fills_every_batch(sizes, batch_size):
  """When the smallest client fills as many batches as the longest row (data.min_train),
  steps run without the mask, vmapped over clients, and train exactly as the masked
  scan does (which the plain loop above checks)."""
  data = tiny_data(sizes)
  assert data.min_train == min(sizes)
  optimizer = make_optimizer(small_config(optimizer="sgd", learning_rate=0.1, momentum=0.9))
  step = linear_step(optimizer)
  state = TrainState.create(jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)),
                                        jnp.float32), optimizer)
  keys = jax.random.split(jax.random.PRNGKey(4), len(sizes))

  def train(min_examples):
    return jax.jit(jax.vmap(lambda idx, n, k: local_training.run_local_steps(
        step, state, data, idx, n, k, 2, batch_size, min_examples=min_examples)))(
            data.train_rows(), data.train_n, keys)
  masked, masked_metrics = train(0)
  unmasked, unmasked_metrics = train(data.min_train)
  assert_trees_close(unmasked, masked, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(unmasked_metrics["train_loss"], masked_metrics["train_loss"],
                             rtol=1e-6)
  # The unmasked program has no conditional step at all (the point of it).
  def jaxpr(min_examples):
    return str(jax.make_jaxpr(lambda s: local_training.run_local_steps(
        step, s, data, data.train_rows()[0], data.train_n[0], keys[0], 2, batch_size,
        min_examples=min_examples))(state))
  assert "cond[" in jaxpr(0) and "cond[" not in jaxpr(data.min_train)


def test_auto_strategy_on_cpu_is_vmap_only_for_few_steps_without_convolutions():
  assert jax.default_backend() == "cpu"
  images = from_client_lists(np.zeros((8, 28, 28, 1), np.uint8), np.zeros(8, np.int32),
                             np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int32),
                             [np.arange(4), np.arange(4, 8)], [np.arange(2)] * 2, 10)
  cases = [("mlp", tiny_data([6, 6]), 2, "vmap"),         # 2 epochs x 1 batch of 16
           ("cnn", images, 2, "sequential")]              # a convolution
  for model, data, epochs, expected in cases:
    config = small_config(algorithm="fml", model=model, num_clients=2, clients_per_round=2,
                          local_epochs=epochs)
    runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data, 2,
                    "uniform", "auto")
    assert runner.strategy == expected, model
  # ... and more local steps per round than CPU_VMAP_MAX_STEPS.
  config = small_config(algorithm="fml", model="mlp", num_clients=2, clients_per_round=2,
                        local_epochs=3)
  data = tiny_data([60, 40])
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data, 2,
                  "uniform", "auto")
  assert runner.local_steps_per_round() == 3 * 4 > executors.CPU_VMAP_MAX_STEPS
  assert runner.strategy == "sequential"


def test_map_in_order_keeps_order_and_bounds_the_work_in_flight():
  import threading   # pylint: disable=g-import-not-at-top
  import time   # pylint: disable=g-import-not-at-top
  running, most, lock = [0], [0], threading.Lock()
  drawn = []

  def items():
    for i in range(12):
      drawn.append(i)
      yield i

  def work(i):
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
      assert len(drawn) <= i + 1 + 2 * 3   # drawn lazily: at most 2 * workers ahead
    time.sleep(0.01 * (i % 3))
    with lock:
      running[0] -= 1
    return i * i
  assert executors.map_in_order(work, items(), 3) == [i * i for i in range(12)]
  assert 1 < most[0] <= 3
  drawn.clear()
  assert executors.map_in_order(work, range(4), 1) == [0, 1, 4, 9]


@pytest.mark.parametrize("name", ["fml", "fedavg"])
def test_concurrent_clients_equal_one_after_another_exactly(name):
  """The sequential strategy runs executors.concurrent_clients() updates at once on a
  CPU; each client's program and inputs are unchanged, so the round is bit for bit the
  same as one client after another."""
  assert executors.concurrent_clients() == executors.CPU_CONCURRENT_CLIENTS > 1
  config = small_config(algorithm=name, local_models="mlp,mlp_small" if name == "fml" else "")
  states = []
  for workers in (1, 2):
    data = load_federated_data(config)
    algorithm = build_algorithm(config, data.num_classes, data.input_shape)
    runner = Runner(algorithm, data, config.clients_per_round, config.aggregation, "sequential")
    assert runner.executor.workers == executors.CPU_CONCURRENT_CLIENTS
    runner.executor.workers = workers
    state = runner.init(config.seed)
    for _ in range(2):
      state, _ = runner.run_round(state)
    states.append(jax.device_get(state))
  chex.assert_trees_all_equal(*states)

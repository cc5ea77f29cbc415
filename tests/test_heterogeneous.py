"""Heterogeneous clients: architecture groups, tasks, schedules, FedMD, FedH2L, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_mnist, small_config
from fml_jax import losses, schedules, tasks
from fml_jax.algorithms import build_algorithm, fedh2l, fedmd
from fml_jax.data import load_federated_data
from fml_jax.rounds import Runner, apportion
from fml_jax.errors import ConfigError
from fml_jax.models import build_model, forward, init_variables

# --- tasks ---------------------------------------------------------------------------------


def test_coarse_task_probabilities_are_sums_of_fine_probabilities():
  task = tasks.parse_task("coarse_0.0.1.1.2.2.2.0.1.2", 10)
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 10)) * 3
  fine = jax.nn.softmax(logits)
  coarse = jnp.exp(tasks.task_log_probs(jax.nn.log_softmax(logits), task))
  np.testing.assert_allclose(coarse.sum(-1), 1.0, rtol=1e-6)
  label_map = np.asarray(task.label_map)
  for j in range(3):
    np.testing.assert_allclose(coarse[:, j], fine[:, label_map == j].sum(-1), rtol=1e-5)


def test_parity_task_sums_even_and_odd_digits():
  task = tasks.parse_task("parity", 10)
  assert task.num_outputs == 2 and task.label_map == (0, 1) * 5
  fine = jax.nn.softmax(jnp.arange(10.0))
  coarse = jnp.exp(tasks.task_log_probs(jnp.log(fine), task))
  np.testing.assert_allclose(coarse, [fine[0::2].sum(), fine[1::2].sum()], rtol=1e-5)


def test_subset_task_restricts_and_renormalizes():
  task = tasks.parse_task("subset_2.5.7", 10)
  assert task.num_outputs == 3 and task.label_map[2] == 0 and task.label_map[7] == 2
  assert task.label_map[0] == -1
  fine = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (10,)))
  sub = jnp.exp(tasks.task_log_probs(jnp.log(fine), task))
  picked = np.asarray(fine)[[2, 5, 7]]
  np.testing.assert_allclose(sub, picked / picked.sum(), rtol=1e-5)
  assert tasks.parse_task("subset_0-4", 10).num_outputs == 5


def test_identity_task_gives_the_plain_fml_losses():
  key = jax.random.split(jax.random.PRNGKey(2), 2)
  meme, local = jax.random.normal(key[0], (8, 10)), jax.random.normal(key[1], (8, 10))
  y, mask = jnp.arange(8) % 10, jnp.ones(8, bool)
  plain = losses.fml_losses(meme, local, y, mask, 0.3, 0.6, 2.0)
  full = losses.fml_losses(meme, local, y, mask, 0.3, 0.6, 2.0, task=tasks.parse_task("full", 10),
                           local_labels=y)
  np.testing.assert_allclose(plain, full, rtol=1e-6)


def test_task_space_kl_has_finite_gradients_and_zero_at_agreement():
  task = tasks.parse_task("subset_0-4", 10)
  meme = jax.random.normal(jax.random.PRNGKey(3), (4, 10))
  y, mask = jnp.array([0, 1, 2, 3]), jnp.ones(4, bool)
  # A local model that outputs exactly the meme's restricted log-probabilities agrees with it.
  local = tasks.task_log_probs(jax.nn.log_softmax(meme), task)
  _, loss_local = losses.fml_losses(meme, local, y, mask, 0.0, 0.0, task=task, local_labels=y)
  np.testing.assert_allclose(loss_local, 0.0, atol=1e-6)
  grads = jax.grad(lambda m: sum(losses.fml_losses(m, local + 1.0 * jnp.arange(5), y, mask, 0.5,
                                                   0.5, task=task, local_labels=y)))(meme)
  assert np.all(np.isfinite(grads)) and np.abs(grads[:, 5:]).max() > 0


@pytest.mark.parametrize("spec", ["odd", "subset_3", "subset_0-10", "coarse_0.1", "coarse_0.0.2.2"
                                  ".2.2.2.2.2.2", "subset_a"])
def test_bad_tasks_name_the_field(spec):
  with pytest.raises(ConfigError) as e:
    tasks.parse_task(spec, 10)
  assert e.value.field == "client_tasks"


# --- schedules -----------------------------------------------------------------------------


def test_official_dynamic_balance_schedule():
  alpha = schedules.to_table("official", "alpha", 0.5)
  beta = schedules.to_table("official", "beta", 0.1)
  lr = schedules.to_table("official", "lr", 1.0)
  values = lambda table: [float(schedules.value_at(table, jnp.int32(r))) for r in (0, 9, 10, 19,
                                                                                     20, 35)]
  assert values(alpha) == [0.5] * 6
  np.testing.assert_allclose(values(beta), [0.1, 0.1, 0.5, 0.5, 0.9, 0.9], rtol=1e-6)
  np.testing.assert_allclose(values(lr), [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_piecewise_schedule_inside_jit():
  table = schedules.to_table("0:0.9,3:0.5,7:0.2", "alpha", 0.5)
  got = jax.jit(jax.vmap(lambda r: schedules.value_at(table, r)))(jnp.arange(10))
  np.testing.assert_allclose(got, [0.9] * 3 + [0.5] * 4 + [0.2] * 3, rtol=1e-6)
  assert schedules.value_at(schedules.to_table("", "beta", 0.3), jnp.int32(5)) == 0.3


def test_fml_reports_and_uses_the_scheduled_values():
  config = small_config(algorithm="fml", fml__alpha_schedule="0:0.5,1:0.2", fml__lr_schedule="0:1,1:0.5")
  data = load_federated_data(config)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data,
                  config.clients_per_round, strategy="vmap")
  state, first = runner.run_round(runner.init(0))
  _, second = runner.run_round(state)
  assert float(first.metrics["alpha"]) == pytest.approx(0.5)
  assert float(second.metrics["alpha"]) == pytest.approx(0.2)
  assert float(second.metrics["lr_scale"]) == pytest.approx(0.5)


# --- groups --------------------------------------------------------------------------------


def test_apportion_is_proportional_and_exact():
  assert apportion(10, [10]) == [10]
  assert apportion(6, [4, 4, 4]) == [2, 2, 2]
  assert apportion(5, [10, 5, 5]) == [3, 1, 1]
  assert apportion(3, [1, 1, 8]) == [1, 1, 1]
  counts = apportion(7, [3, 2, 9])
  assert sum(counts) == 7 and all(1 <= c <= s for c, s in zip(counts, [3, 2, 9]))
  with pytest.raises(ConfigError):
    apportion(2, [3, 3, 3])


def test_round_robin_groups_and_catfish():
  config = small_config(algorithm="fml", local_models="mlp,mlp_small", catfish_clients="1,4",
                        catfish_model="logreg")
  algorithm = build_algorithm(config, 10, (60,))
  names = [algorithm.groups[g].model_name for g in algorithm.group_of]
  assert names == ["mlp", "logreg", "mlp", "mlp_small", "logreg", "mlp_small"]
  runner = Runner(algorithm, load_federated_data(config), 4)
  assert runner.group_sizes == [2, 2, 2] and sum(runner.cohort_sizes) == 4


def test_each_group_has_its_own_architecture_and_task_outputs():
  config = small_config(algorithm="fml", local_models="mlp,mlp_small", client_tasks="full,parity",
                        clients_per_round=6, num_clients=6)
  data = load_federated_data(config)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data, 6)
  state = runner.init(0)
  # Round-robin pairs: (mlp, full), (mlp_small, parity), ... two groups of three.
  assert runner.group_sizes == [3, 3]
  out = [p.params[max(p.params)]["kernel"].shape for p in state.population]
  assert out == [(3, 200, 10), (3, 100, 2)]


# --- FedMD ---------------------------------------------------------------------------------


def test_fedmd_party_models_match_the_official_table():
  p0 = build_model("fedmd_p0", 16, (28, 28, 1))
  variables = init_variables(p0, jax.random.PRNGKey(0), (28, 28, 1))
  kernels = [v["kernel"].shape for k, v in sorted(variables["params"].items()) if "Conv" in k]
  assert kernels == [(3, 3, 1, 128), (3, 3, 128, 256)]
  assert "batch_stats" in variables
  assert variables["params"]["Dense_0"]["kernel"].shape == (13 * 13 * 256, 16)
  assert "bias" not in variables["params"]["Dense_0"]
  p5 = init_variables(build_model("fedmd_p5", 16, (28, 28, 1)), jax.random.PRNGKey(0),
                      (28, 28, 1))
  kernels = [v["kernel"].shape for k, v in sorted(p5["params"].items()) if "Conv" in k]
  assert kernels == [(3, 3, 1, 64), (2, 2, 64, 128), (3, 3, 128, 256)]


def test_fedmd_model_trains_batch_stats_and_drops_out_only_in_training():
  model = build_model("fedmd_small_p3", 10, (28, 28, 1))
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 28, 28, 1))
  a, new_state = forward(model, params, state, x, True, jax.random.PRNGKey(2))
  b, _ = forward(model, params, state, x, True, jax.random.PRNGKey(3))
  assert not np.allclose(a, b)                       # dropout draws differ
  moved = jax.tree.map(lambda u, v: np.abs(u - v).max(), new_state, state)
  assert max(jax.tree.leaves(moved)) > 0             # running statistics updated
  c, same = forward(model, params, state, x, False, jax.random.PRNGKey(2))
  d, _ = forward(model, params, state, x, False, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(c, d)
  assert same is state


def test_stratified_subset_keeps_class_proportions():
  labels = jnp.asarray(np.repeat(np.arange(4), [50, 30, 15, 5]))
  idx = np.asarray(fedmd.stratified_subset(jax.random.PRNGKey(0), labels, 20, 4))
  assert len(set(idx.tolist())) == 20
  assert np.bincount(np.asarray(labels)[idx], minlength=4).tolist() == [10, 6, 3, 1]
  other = np.asarray(fedmd.stratified_subset(jax.random.PRNGKey(1), labels, 20, 4))
  assert not np.array_equal(idx, other)


def fedmd_config(**overrides):
  base = dict(algorithm="fedmd", local_models="mlp,mlp_small", public_size=60,
              fedmd__alignment_size=30, fedmd__public_epochs=2, fedmd__private_epochs=1,
              fedmd__digest_batch_size=16, clients_per_round=6, optimizer="adam",
              learning_rate=1e-3, weight_decay=0.0, momentum=0.0)
  return small_config(**{**base, **overrides})


def start_fedmd_round(config):
  """After transfer learning, the first round's cohorts and prepared server state."""
  data = load_federated_data(config)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data,
                  config.clients_per_round, strategy="vmap")
  state = runner.warm_start(runner.init(0))
  cohorts, context = runner.begin_round(state)
  server = runner.algorithm.prepare_round(state.server, context, data)
  return runner.algorithm, data, cohorts, context, server


def test_fedmd_consensus_is_the_mean_of_every_partys_logits():
  algorithm, data, cohorts, context, server = start_fedmd_round(fedmd_config())
  assert server["alignment_idx"].shape == (30,)
  logits = []
  for g, cohort in enumerate(cohorts):
    for i in range(cohort.clients.id.shape[0]):
      one = jax.tree.map(lambda a: a[i], cohort)
      logits.append(algorithm.client_message(server, one.client_state, one.clients, data, g))
  consensus = algorithm.exchange(server, jnp.stack(logits), context)["consensus"]
  np.testing.assert_allclose(consensus, np.mean(np.stack(logits), axis=0), rtol=1e-6)
  # And the first party's logits are its model's inference outputs on the alignment rows.
  party = jax.tree.map(lambda a: a[0], cohorts[0].client_state)
  want = algorithm.groups[0].model.apply({"params": party.params},
                                         data.normalize(data.x_public[server["alignment_idx"]]))
  np.testing.assert_allclose(logits[0], want, rtol=1e-5, atol=1e-6)


def test_fedmd_digest_moves_parties_toward_the_consensus():
  algorithm, data, cohorts, _, server = start_fedmd_round(
      fedmd_config(local_epochs=1, fedmd__digest_epochs=3, learning_rate=3e-3))
  cohort = jax.tree.map(lambda a: a[0], cohorts[0])
  before = algorithm.client_message(server, cohort.client_state, cohort.clients, data, 0)
  server = {**server, "consensus": jnp.zeros_like(before)}   # a target far from every party
  result = algorithm.client_update(server, cohort.client_state, cohort.clients, data, 0)
  # Revisit is the last phase, so compare with the digest's loss at its start.
  assert float(result.metrics["digest_loss"]) < float(jnp.mean(jnp.abs(before)))


def test_pooled_rows_hold_every_clients_data():
  data = load_federated_data(small_config())
  rows, n = fedmd.pooled_rows(data)
  assert int(n) == int(data.train_n.sum())
  assert sorted(np.asarray(rows).tolist()) == sorted(
      sum((np.asarray(r[:k]).tolist() for r, k in zip(data.train_rows(), data.train_n)), []))


# --- FedH2L --------------------------------------------------------------------------------


def test_full_topology_target_is_the_mean_of_the_others():
  posteriors = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (5, 7, 3)))
  peers = fedh2l.peer_matrix("full", 5, jax.random.PRNGKey(1))
  algorithm = object.__new__(fedh2l.FedH2L)
  targets = algorithm.exchange({"peers": peers}, posteriors, None)["targets"]
  for i in range(5):
    others = np.delete(np.asarray(posteriors), i, axis=0).mean(0)
    np.testing.assert_allclose(targets[i], others, rtol=1e-5)
    np.testing.assert_allclose(targets[i].sum(-1), 1.0, rtol=1e-5)


def test_ring_and_random_k_topologies():
  ring = np.asarray(fedh2l.peer_matrix("ring", 5, jax.random.PRNGKey(0)))
  assert np.allclose(ring[0], [0, 0.5, 0, 0, 0.5]) and np.allclose(ring[3], [0, 0, 0.5, 0, 0.5])
  two = np.asarray(fedh2l.peer_matrix("ring", 2, jax.random.PRNGKey(0)))
  assert np.allclose(two, [[0, 1], [1, 0]])
  rk = np.asarray(fedh2l.peer_matrix("random_k", 6, jax.random.PRNGKey(2), peers=3))
  assert np.all(np.diag(rk) == 0) and np.allclose(rk.sum(1), 1.0)
  assert np.all((rk > 0).sum(1) == 3)
  other = np.asarray(fedh2l.peer_matrix("random_k", 6, jax.random.PRNGKey(3), peers=3))
  assert not np.array_equal(rk > 0, other > 0)


def test_fedh2l_distillation_pulls_toward_the_peers():
  """With only the distillation term, a participant's seed-set posteriors move toward the
  mean of its peers' posteriors."""
  config = small_config(algorithm="fedh2l", local_models="mlp,mlp_small", public_size=40,
                        fedh2l__distill_weight=50.0, clients_per_round=6, local_epochs=3)
  data = load_federated_data(config)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data, 6,
                  strategy="vmap")
  algorithm = runner.algorithm
  state = runner.init(0)
  cohorts, context = runner.begin_round(state)
  server = algorithm.prepare_round(state.server, context, data)
  messages = jnp.concatenate([runner.executor.map_group(
      algorithm.client_message, server, c.client_state, c.clients, data, g)
                              for g, c in enumerate(cohorts)])
  server = algorithm.exchange(server, messages, context)
  one = jax.tree.map(lambda a: a[0], cohorts[0])
  target = server["targets"][0]
  kl = lambda p: float(jnp.sum(target * (jnp.log(target) - jnp.log(p))) / p.shape[0])
  before = algorithm.client_message(server, one.client_state, one.clients, data, 0)
  result = algorithm.client_update(server, one.client_state, one.clients, data, 0)
  after = algorithm.client_message(server, result.client_state, one.clients, data, 0)
  assert kl(after) < 0.5 * kl(before)


# --- data ----------------------------------------------------------------------------------


def test_public_slice_is_held_out_of_the_clients_data():
  config = small_config(public_size=50)
  data = load_federated_data(config)
  plain = load_federated_data(small_config())
  assert data.x_public.shape == (50, 60)
  assert int(data.train_n.sum()) == int(plain.train_n.sum()) - 50
  assert plain.x_public.shape[0] == 0


def test_subset_task_clients_hold_only_their_classes():
  config = small_config(algorithm="local", client_tasks="subset_0-4,full")
  data = load_federated_data(config)
  for c in range(0, config.num_clients, 2):
    rows = np.asarray(data.train_rows()[c, :int(data.train_n[c])])
    assert np.asarray(data.y_train)[rows].max() <= 4
    test_rows = np.asarray(data.test_rows()[c, :int(data.test_n[c])])
    assert np.asarray(data.y_test)[test_rows].max() <= 4


def test_client_max_examples_caps_every_client():
  data = load_federated_data(small_config(client_max_examples=20))
  assert int(data.train_n.max()) == 20


# --- communication -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,expected", [
    ("fml", lambda k, p: (k * p, k * p)), ("fedavg", lambda k, p: (k * p, k * p)),
    ("local", lambda k, p: (0, 0)), ("fedmr", lambda k, p: (k * p, k * p))])
def test_bytes_per_round_count_parameters(algorithm, expected):
  config = small_config(algorithm=algorithm)
  data = load_federated_data(config)
  runner = Runner(build_algorithm(config, data.num_classes, data.input_shape), data, 4)
  params = (60 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10) * 4
  got = runner.communication(runner.abstract_state(0))
  assert (got["bytes_up"], got["bytes_down"]) == expected(4, params)


def test_distillation_methods_count_logits_not_parameters():
  h2l = small_config(algorithm="fedh2l", public_size=40, fedh2l__topology="ring")
  data = load_federated_data(h2l)
  runner = Runner(build_algorithm(h2l, data.num_classes, data.input_shape), data, 4)
  # Four participants each send 40x10 float32 posteriors to two peers.
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * 2 * 1600,
                                                            "bytes_down": 4 * 2 * 1600}
  md = fedmd_config(clients_per_round=4)
  data = load_federated_data(md)
  runner = Runner(build_algorithm(md, data.num_classes, data.input_shape), data, 4)
  # Up: 30x10 logits per party; down: the consensus and 30 alignment indices per party.
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * 1200,
                                                            "bytes_down": 4 * (1200 + 120)}


def test_fedmd_run_writes_round_zero_once_and_resumes(tmp_path):
  import json
  from fml_jax import train
  config = fedmd_config(num_rounds=2, checkpoint_every=1, fedmd__report_bounds=False)
  train.run(config, str(tmp_path))
  config.num_rounds = 3
  summary = train.run(config, str(tmp_path))   # resumes after round 2
  rounds = [json.loads(line)["round"] for line in open(tmp_path / "metrics.jsonl")]
  assert rounds == [0, 1, 2, 3] and summary["resumed_after_round"] == 2
  assert not (tmp_path / "bounds.json").exists()


def test_explicit_per_client_model_list():
  config = small_config(algorithm="local",
                        local_models="mlp,mlp,logreg,mlp_small,logreg,mlp")
  algorithm = build_algorithm(config, 10, (60,))
  assert [algorithm.groups[g].model_name for g in algorithm.group_of] == [
      "mlp", "mlp", "logreg", "mlp_small", "logreg", "mlp"]


@requires_mnist
def test_public_dataset_puts_its_classes_first():
  config = small_config(dataset="mnist", partition="iid", num_clients=4, clients_per_round=4,
                        public_dataset="mnist", public_size=100, private_classes="5-9")
  data = load_federated_data(config)
  # FedMD's label space: the public set's 10 classes, then the 5 private ones as 10..14.
  assert data.num_classes == 15
  assert data.x_public.shape[0] == 100 and int(data.y_public.max()) <= 9
  assert set(np.unique(np.asarray(data.y_train)).tolist()) == {10, 11, 12, 13, 14}
  assert set(np.unique(np.asarray(data.y_test)).tolist()) == {10, 11, 12, 13, 14}


def test_population_initialized_in_place_equals_one_vmap():
  """map_in_place (batches written into one buffer, the last batch overlapping) gives
  exactly vmap's values, for sizes below, at and past a batch boundary."""
  from fml_jax.algorithms.client_models import map_in_place
  from fml_jax.optimizers import TrainState, make_optimizer
  model = build_model("mlp_small", 10, (60,))
  optimizer = make_optimizer(small_config())
  init = lambda k: TrainState.from_variables(init_variables(model, k, (60,)), optimizer)
  for n in (3, 8, 13):
    keys = jax.random.split(jax.random.PRNGKey(n), n)
    want = jax.jit(jax.vmap(init))(keys)
    got = jax.jit(lambda k: map_in_place(init, k, 4))(keys)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_personalized_evaluation_is_the_same_in_small_model_chunks(monkeypatch):
  """Chunks bounded by model bytes (here a few clients each) score every client as
  one chunk does."""
  from fml_jax import evaluation
  config = small_config(algorithm="local", num_clients=6)
  data = load_federated_data(config)
  algorithm = build_algorithm(config, data.num_classes, data.input_shape)
  _, population = algorithm.init(jax.random.PRNGKey(0), (6,))
  [models] = algorithm.personalized_models({}, population)
  whole = evaluation.evaluate_personalized(models, data)
  per_model = sum(x.nbytes for x in jax.tree.leaves(models.params)) // 6
  monkeypatch.setattr(evaluation, "MODEL_BYTES_PER_CALL", 2 * per_model)   # 2 per chunk
  chunked = evaluation.evaluate_personalized(models, data)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
  np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-5)
  assert len(whole[0]) == 6

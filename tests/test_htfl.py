"""HtFLlib's split models (feature_dim), model families, LG-FedAvg and FedProto against
plain re-statements: pooling, the losses, a client's whole local training, the
server steps, nearest-prototype prediction and the bytes per round (the registry
tests run both algorithms through every executor, store and device count)."""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax import config_checks, local_training, models
from fml_jax.algorithms.fedproto import NO_PROTOTYPE, prototype_loss, prototype_scores
from fml_jax.errors import ConfigError
from fml_jax.evaluation import evaluate_personalized
from fml_jax.rounds.types import RoundContext

from conftest import (SHARED_TFDS, client_row, make_runner, requires_mnist, sgd_with_class_sums,
                      small_config)

PLAIN_SGD = dict(momentum=0.0, weight_decay=0.0, learning_rate=0.05, local_epochs=2)


# --- split models and families -------------------------------------------------------


def numpy_adaptive_avg_pool(x, out):
  """PyTorch's AdaptiveAvgPool1d over the last axis, from its definition."""
  width = x.shape[-1]
  cols = []
  for i in range(out):
    start, end = (i * width) // out, -(-(i + 1) * width // out)
    cols.append(x[..., start:end].mean(axis=-1))
  return np.stack(cols, axis=-1)


@pytest.mark.parametrize("width,out", [(200, 512), (1024, 512), (100, 16), (7, 3), (16, 16),
                                       (84, 512)])
def test_pooling_to_feature_dim_is_adaptive_avg_pool(width, out):
  x = np.random.default_rng(0).normal(size=(3, width)).astype(np.float32)
  got = x @ np.asarray(models.adaptive_avg_pool_matrix(width, out))
  np.testing.assert_allclose(got, numpy_adaptive_avg_pool(x, out), rtol=1e-5, atol=1e-6)


def test_pooling_matches_pytorch_when_installed():
  torch = pytest.importorskip("torch", reason="PyTorch is optional (benchmarks, references)")
  x = np.random.default_rng(1).normal(size=(4, 200)).astype(np.float32)
  want = torch.nn.AdaptiveAvgPool1d(512)(torch.tensor(x)).numpy()
  np.testing.assert_allclose(x @ np.asarray(models.adaptive_avg_pool_matrix(200, 512)), want,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,shape", [("mlp", (60,)), ("logreg", (60,)),
                                        ("cnn_htfl", (28, 28, 1)), ("lenet5", (32, 32, 3)),
                                        ("resnet20_small", (28, 28, 1))])
def test_split_model_is_the_models_body_pooled_then_a_dense_head(name, shape):
  fd = 12
  split = models.build_model(name, 10, shape, feature_dim=fd)
  variables = models.init_variables(split, jax.random.PRNGKey(0), shape)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  # logreg's body is the flattened input: it has no parameters.
  assert set(params) == ({"head"} if name == "logreg" else {"base", "head"})
  assert params["head"]["kernel"].shape == (fd, 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, *shape))
  body = models.MODELS[name][0](10).clone(head=False)
  body_state = {k: v["base"] for k, v in state.items()}
  z = body.apply({"params": params.get("base", {}), **body_state}, x, train=False)
  rep = z @ np.asarray(models.adaptive_avg_pool_matrix(z.shape[-1], fd))
  got_rep, logits, _ = models.features(split, params, state, x, False, jax.random.PRNGKey(2))
  np.testing.assert_allclose(got_rep, rep, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, rep @ params["head"]["kernel"] + params["head"]["bias"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(models.apply_model(split, params, x, state), logits, rtol=1e-6,
                             atol=1e-6)


def test_every_zoo_model_class_splits_into_body_and_head():
  seen = set()
  for name, (make, needs_image) in models.MODELS.items():
    if type(make(10)) in seen:   # one model per class (the FedMD parties share one)
      continue
    seen.add(type(make(10)))
    shape = (32, 32, 3) if needs_image else (60,)
    split = models.build_model(name, 10, shape, feature_dim=16)
    rep, logits = jax.eval_shape(lambda: split.apply(
        models.init_variables(split, jax.random.PRNGKey(0), shape), jnp.zeros((2, *shape)),
        method=lambda m, x: (m.features(x), m(x))))
    assert rep.shape == (2, 16) and logits.shape == (2, 10), name
  assert len(seen) >= 10


def test_htfllibs_cnn_is_the_valid_padding_fedavg_cnn():
  for shape, flat in (((28, 28, 1), 1024), ((32, 32, 3), 1600)):
    params = jax.eval_shape(lambda: models.init_params(models.build_model("cnn_htfl", 10, shape),
                                                       jax.random.PRNGKey(0), shape))
    assert params["Dense_0"]["kernel"].shape == (flat, 512)   # HtFLlib's FedAvgCNN(dim=...)


def test_a_family_assigns_its_members_round_robin_and_unknown_names_list_families():
  from fml_jax.algorithms.client_models import local_model_names
  config = small_config(algorithm="local", local_models="htfe_cpu_vec")
  family = models.MODEL_FAMILIES["htfe_cpu_vec"]
  assert local_model_names(config, 6) == [family[i % len(family)] for i in range(6)]
  with pytest.raises(ConfigError, match="local_models.*htfe_cpu_img"):
    config_checks.validate(small_config(algorithm="local", local_models="htfe_nope"))
  with pytest.raises(ConfigError, match="feature_dim"):
    config_checks.validate(small_config(feature_dim=-1))


@pytest.mark.parametrize("algorithm", ["lgfedavg", "fedproto", "fedgh", "fedtgp", "fedkd",
                                       "fedgen"])
def test_head_and_prototype_algorithms_need_feature_dim_and_the_datasets_classes(algorithm):
  with pytest.raises(ConfigError, match="feature_dim.*512"):
    config_checks.validate(small_config(algorithm=algorithm))
  with pytest.raises(ConfigError, match="client_tasks"):
    config_checks.validate(small_config(algorithm=algorithm, feature_dim=8,
                                        client_tasks="parity"))


# --- LG-FedAvg -----------------------------------------------------------------------


def plain_sgd_ce(model, params, client, data, config):
  """A client's local epochs of plain SGD on cross-entropy, restated."""
  def step(p, xb, yb, mask, key):
    def loss(p):
      logits = models.forward(model, p, {}, xb, True, key)[0]
      logp = jax.nn.log_softmax(logits)
      return -jnp.sum(jnp.take_along_axis(logp, yb[:, None], 1)[:, 0] * mask) / jnp.maximum(
          mask.sum(), 1)
    return jax.tree.map(lambda w, g: w - config.learning_rate * g, p, jax.grad(loss)(p)), {}
  params, _ = local_training.run_local_steps(
      step, params, data, client.train_idx, client.train_n, client.key, config.local_epochs,
      config.batch_size, min_examples=data.min_train)
  return params


def plain_sgd_runner_and_a_random_head(algorithm):
  """(config, runner, initial state, a random head shaped like the server's) of one
  mlp_small group at feature_dim 8 with plain SGD."""
  config = small_config(algorithm=algorithm, local_models="mlp_small", feature_dim=8,
                        **PLAIN_SGD)
  runner = make_runner(config, "vmap")
  state = runner.init(0)
  head = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(4), x.shape),
                      state.server["head"])
  return config, runner, state, head


def head_client_and_plain_sgd(algorithm_name):
  """One client update of `algorithm_name` under a random global head, and plain SGD on
  CE from the client's body under that head, restated: (result, restated params,
  model, client, data)."""
  config, runner, state, head = plain_sgd_runner_and_a_random_head(algorithm_name)
  algorithm, data = runner.algorithm, runner.data
  (cohort,), _ = runner.begin_round(state)
  client, own = client_row(cohort.clients, 2), client_row(cohort.client_state, 2)
  result = algorithm.client_update({"head": head}, own, client, data, 0)
  model = algorithm.groups[0].model
  want = plain_sgd_ce(model, {**own.params, "head": head}, client, data, config)
  return result, want, model, client, data


def test_lgfedavg_client_trains_its_body_under_the_global_head():
  result, want, _, _, _ = head_client_and_plain_sgd("lgfedavg")
  chex.assert_trees_all_close(result.client_state.params, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(result.upload, want["head"])


def test_lgfedavg_server_averages_heads_by_weight_and_clients_predict_with_it():
  config = small_config(algorithm="lgfedavg", feature_dim=8)
  runner = make_runner(config, "vmap")
  algorithm = runner.algorithm
  state = runner.init(0)
  k = 3
  rng = np.random.default_rng(0)
  uploads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(k, *x.shape)), jnp.float32),
                         state.server["head"])
  weights = jnp.asarray([0.5, 0.2, 0.3])
  context = RoundContext(round=jnp.int32(0), clients=None, weights=weights,
                         key=jax.random.PRNGKey(0))
  server, _ = algorithm.server_update(state.server, uploads, context)
  for leaf, up in zip(jax.tree.leaves(server["head"]), jax.tree.leaves(uploads)):
    np.testing.assert_allclose(leaf, np.einsum("k,k...->...", np.asarray(weights), up),
                               rtol=1e-6, atol=1e-7)
  for group in algorithm.personalized_models(server, state.population):
    for leaf, head in zip(jax.tree.leaves(group.params["head"]),
                          jax.tree.leaves(server["head"])):
      np.testing.assert_array_equal(leaf, np.broadcast_to(head, leaf.shape))
  # The server's head starts as client 0's, every client's from the first round (HtFLlib).
  first = int(algorithm.group_of[0])
  chex.assert_trees_all_equal(state.server["head"],
                              client_row(state.population[first].params["head"], 0))
  for group in algorithm.personalized_models(state.server, state.population):
    chex.assert_trees_all_equal(client_row(group.params["head"], 1), state.server["head"])


def test_lgfedavg_sends_the_head_each_way():
  runner = make_runner(small_config(algorithm="lgfedavg", feature_dim=8), "vmap")
  c = runner.algorithm.num_classes
  head = (8 * c + c) * 4
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * head,
                                                             "bytes_down": 4 * head}


# --- FedProto ------------------------------------------------------------------------


def numpy_prototype_loss(logits, rep, labels, mask, prototypes, has, weight):
  """HtFLlib's clientproto.py restated: CE + lambda * MSELoss(proto_new, rep), where a
  row of proto_new is the global prototype of its class, or the row itself."""
  z = logits - logits.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  valid = [i for i in range(len(labels)) if mask[i]]
  ce = -sum(logp[i, labels[i]] for i in valid) / len(valid)
  target = np.array([prototypes[labels[i]] if has[labels[i]] else rep[i] for i in valid])
  mse = np.mean((target - rep[valid]) ** 2)
  return ce + weight * mse, ce, mse


@pytest.mark.parametrize("any_prototype", [True, False])
def test_prototype_loss_equals_htfllibs_restated(any_prototype):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  rep = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  prototypes = rng.normal(size=(4, 5)).astype(np.float32)
  has = np.array([True, False, True, True]) & any_prototype
  got = prototype_loss(*map(jnp.asarray, (logits, rep, labels, mask, prototypes, has)), 10.0)
  want = numpy_prototype_loss(logits, rep, labels, mask, prototypes, has, 10.0)
  np.testing.assert_allclose(np.array(got, dtype=np.float64), want, rtol=1e-5, atol=1e-6)
  # The term pulls each row toward its class prototype; rows without one are untouched.
  rep_grad = jax.grad(lambda r: prototype_loss(jnp.asarray(logits), r, jnp.asarray(labels),
                                               jnp.asarray(mask), jnp.asarray(prototypes),
                                               jnp.asarray(has), 10.0)[2])(jnp.asarray(rep))
  want_grad = np.zeros_like(rep)
  for i in np.flatnonzero(mask):
    if has[labels[i]]:
      want_grad[i] = 2 * (rep[i] - prototypes[labels[i]]) / (mask.sum() * rep.shape[1])
  np.testing.assert_allclose(rep_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_nearest_prototype_scores():
  rep = jnp.asarray([[0.0, 0.0], [2.0, 2.0], [0.9, 1.1]])
  prototypes = jnp.asarray([[0.0, 0.1], [1.0, 1.0], [2.0, 2.0]])
  has = jnp.asarray([True, True, False])
  scores = prototype_scores(rep, prototypes, has)
  assert scores.shape == (3, 4)
  # Class 2 has no prototype: the point on it goes to the nearest one that exists.
  np.testing.assert_array_equal(jnp.argmax(scores, -1), [0, 1, 1])
  np.testing.assert_allclose(scores[0, :2], [-0.005, -1.0], rtol=1e-6)
  assert scores[0, 2] == NO_PROTOTYPE
  # With no prototype at all the extra column (no class) wins: every prediction wrong.
  none = prototype_scores(rep, prototypes, jnp.zeros(3, bool))
  np.testing.assert_array_equal(jnp.argmax(none, -1), [3, 3, 3])


def prototype_client_and_plain_sgd(name, has, **overrides):
  """One client update of FedProto's loss (`name`'s, weight 3, plain SGD, one mlp_small
  group at feature_dim 8) under random server prototypes where `has` (C,), and the
  same training restated: data, client, model, start (its round-start params), result
  (the update's), params (restated), sums and counts (per class, of the restated
  training representations)."""
  config = small_config(algorithm=name, local_models="mlp_small", feature_dim=8,
                        **{f"{name}__weight": 3.0}, **overrides, **PLAIN_SGD)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  c, fd = algorithm.num_classes, 8
  server = {**state.server, "prototypes": jax.random.normal(jax.random.PRNGKey(3), (c, fd)),
            "has": jnp.asarray(has)}
  (cohort,), _ = runner.begin_round(state)
  client, own = client_row(cohort.clients, 1), client_row(cohort.client_state, 1)
  result = algorithm.client_update(server, own, client, data, 0)
  model = algorithm.groups[0].model

  def loss_and_rep(p, xb, yb, mask, key):
    rep, logits, _ = models.features(model, p, {}, xb, True, key)
    return numpy_free_loss(logits, rep, yb, mask, server, 3.0), rep

  params, sums, counts = sgd_with_class_sums(loss_and_rep, own.params, client, data, config,
                                             c, fd)
  return types.SimpleNamespace(data=data, client=client, model=model, start=own.params,
                               result=result, params=params, sums=sums, counts=counts)


def test_fedproto_client_update_equals_plain_sgd_and_uploads_its_training_prototypes():
  run = prototype_client_and_plain_sgd("fedproto", np.arange(10) % 2 == 0)
  data, client, result, sums, counts = run.data, run.client, run.result, run.sums, run.counts
  chex.assert_trees_all_close(result.client_state.params, run.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(result.upload["has"], counts > 0)
  np.testing.assert_allclose(result.upload["prototypes"], sums / np.maximum(counts, 1)[:, None],
                             rtol=1e-5, atol=1e-5)
  held = set(np.asarray(data.y_train)[np.asarray(client.train_idx)[:int(client.train_n)]].tolist())
  assert set(np.flatnonzero(result.upload["has"]).tolist()) == held


def numpy_free_loss(logits, rep, labels, mask, server, weight):
  """The same loss written without fml_jax's helpers (differentiable restatement)."""
  logp = jax.nn.log_softmax(logits)
  n = jnp.maximum(mask.sum(), 1)
  ce = -jnp.sum(jnp.take_along_axis(logp, labels[:, None], 1)[:, 0] * mask) / n
  target = jnp.where(server["has"][labels][:, None], server["prototypes"][labels],
                     jax.lax.stop_gradient(rep))
  mse = jnp.sum(jnp.square(target - rep) * mask[:, None]) / (n * rep.shape[1])
  return ce + weight * mse


def test_fedproto_server_means_this_rounds_reports_per_class():
  config = small_config(algorithm="fedproto", feature_dim=4)
  runner = make_runner(config, "vmap")
  algorithm = runner.algorithm
  rng = np.random.default_rng(0)
  k, c = 4, algorithm.num_classes
  uploads = {"prototypes": jnp.asarray(rng.normal(size=(k, c, 4)), jnp.float32),
             "has": jnp.asarray(rng.random((k, c)) < 0.6)}
  reports = jnp.asarray([True, False, True, True])
  context = RoundContext(round=jnp.int32(0), clients=None, weights=jnp.ones(k) / k,
                         key=jax.random.PRNGKey(0), reports=reports)
  old = {"prototypes": jnp.ones((c, 4)), "has": jnp.ones(c, bool)}
  server, metrics = algorithm.server_update(old, uploads, context)
  for cls in range(c):
    senders = [j for j in range(k) if reports[j] and uploads["has"][j, cls]]
    assert bool(server["has"][cls]) == bool(senders)
    if senders:
      np.testing.assert_allclose(server["prototypes"][cls],
                                 np.mean([uploads["prototypes"][j, cls] for j in senders], 0),
                                 rtol=1e-6)
  assert metrics["classes_with_prototypes"] == sum(map(bool, server["has"]))


def test_fedproto_predicts_the_nearest_global_prototype():
  config = small_config(algorithm="fedproto", local_models="mlp_small,logreg", feature_dim=8)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  c = algorithm.num_classes
  server = {"prototypes": jax.random.normal(jax.random.PRNGKey(5), (c, 8)),
            "has": jnp.arange(c) != 1}
  groups = algorithm.personalized_models(server, state.population)
  test_rows = np.asarray(data.test_rows())
  for g, (evaluated, own) in enumerate(zip(groups, state.population)):
    acc, _ = evaluate_personalized(evaluated, data)
    model = algorithm.groups[g].model
    for j, client in enumerate(evaluated.client_ids):
      rows = test_rows[client][:int(data.test_n[client])]
      x = data.normalize(data.x_test[rows])
      rep = models.features(model, client_row(own.params, j), {}, x, False,
                            jax.random.PRNGKey(0))[0]
      d = ((np.asarray(rep)[:, None] - np.asarray(server["prototypes"])[None]) ** 2).mean(-1)
      d[:, 1] = np.inf
      want = np.mean(d.argmin(1) == np.asarray(data.y_test)[rows])
      np.testing.assert_allclose(acc[j], want, rtol=1e-6)
  # Before any prototype exists every prediction is wrong.
  acc, _ = evaluate_personalized(algorithm.personalized_models(state.server, state.population)[0],
                                 data)
  np.testing.assert_array_equal(acc, 0.0)


def test_fedproto_sends_class_prototypes_each_way():
  runner = make_runner(small_config(algorithm="fedproto", feature_dim=8), "vmap")
  c = runner.algorithm.num_classes
  per_client = c * 8 * 4 + c   # (C, fd) float32 prototypes and (C,) bool "has one"
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * per_client,
                                                             "bytes_down": 4 * per_client}


# --- FedGH --------------------------------------------------------------------------


def numpy_train_head(head, prototypes, has, key, epochs, batch_size, lr):
  """HtFLlib's servergh.train_head restated: SGD on CE over the valid (prototype,
  class) pairs in batches, each pass in the order the same random scores give."""
  w, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
  k, c, fd = prototypes.shape
  reps, labels = prototypes.reshape(k * c, fd), np.tile(np.arange(c), k)
  valid = has.reshape(-1)
  for epoch_key in jax.random.split(key, epochs):
    scores = np.asarray(jax.random.uniform(epoch_key, (k * c,)))
    order = [i for i in np.argsort(np.where(valid, scores, 2.0), kind="stable") if valid[i]]
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      z = reps[rows] @ w + b
      p = np.exp(z - z.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(rows)), labels[rows]] -= 1
      w = w - lr * reps[rows].T @ p / len(rows)
      b = b - lr * p.sum(0) / len(rows)
  return w, b


@pytest.mark.parametrize("batch_size,epochs", [(3, 2), (100, 1)])
def test_fedgh_server_trains_the_head_as_htfllib(batch_size, epochs):
  from fml_jax.algorithms.fedgh import train_head
  rng = np.random.default_rng(0)
  k, c, fd = 3, 4, 5
  prototypes = rng.normal(size=(k, c, fd)).astype(np.float32)
  has = rng.random((k, c)) < 0.7
  head = {"kernel": jnp.asarray(rng.normal(size=(fd, c)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  key = jax.random.PRNGKey(7)
  got = train_head(head, jnp.asarray(prototypes), jnp.asarray(has), key, epochs, batch_size, 0.3)
  w, b = numpy_train_head(head, prototypes, has, key, epochs, batch_size, 0.3)
  np.testing.assert_allclose(got["kernel"], w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["bias"], b, rtol=1e-5, atol=1e-5)


def assert_inference_prototypes(upload, model, params, client, data):
  """`upload` holds, for each class the client holds and no other, the mean
  inference-mode representation of `params` over the client's training examples."""
  rows = np.asarray(client.train_idx)[:int(client.train_n)]
  rep = np.asarray(models.features(model, params, {}, data.normalize(data.x_train[rows]), False,
                                   jax.random.PRNGKey(0))[0])
  labels = np.asarray(data.y_train)[rows]
  for cls in range(len(upload["has"])):
    assert bool(upload["has"][cls]) == (cls in labels)
    if cls in labels:
      np.testing.assert_allclose(upload["prototypes"][cls], rep[labels == cls].mean(0),
                                 rtol=1e-4, atol=1e-5)


def test_fedgh_client_trains_under_the_global_head_and_uploads_inference_prototypes():
  result, want, model, client, data = head_client_and_plain_sgd("fedgh")
  chex.assert_trees_all_close(result.client_state.params, want, rtol=1e-5, atol=1e-6)
  # Prototypes: the trained model's inference-mode representation, averaged per class
  # over every training example of the client.
  assert_inference_prototypes(result.upload, model, want, client, data)


def test_fedgh_starts_from_client_zeros_head_and_sends_prototypes_up_and_the_head_down():
  runner = make_runner(small_config(algorithm="fedgh", feature_dim=8), "vmap")
  state = runner.init(0)
  chex.assert_trees_all_equal(state.server["head"],
                              client_row(state.population[0].params["head"], 0))
  c = runner.algorithm.num_classes
  up = c * 8 * 4 + c        # (C, fd) float32 prototypes and (C,) flags
  down = (8 * c + c) * 4    # the head
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * up,
                                                             "bytes_down": 4 * down}


# --- FedTGP -------------------------------------------------------------------------


def numpy_margin(class_means, present, threshold):
  """HtFLlib's servertgp.receive_protos restated with its loops."""
  c = len(present)
  gap = np.full(c, 1e9)
  for k1 in range(c):
    for k2 in range(c):
      if present[k1] and present[k2] and k1 > k2:
        dis = np.linalg.norm(class_means[k1] - class_means[k2])
        gap[k1], gap[k2] = min(gap[k1], dis), min(gap[k2], dis)
  smallest = gap.min()
  gap[gap > 1e8] = smallest
  return min(gap.max(), threshold)


@pytest.mark.parametrize("present,threshold", [([1, 1, 0, 1, 0], 100.0), ([1, 1, 1, 1, 1], 0.5),
                                               ([0, 0, 1, 0, 0], 100.0)])
def test_fedtgp_margin_is_htfllibs(present, threshold):
  from fml_jax.algorithms.fedtgp import margin
  rng = np.random.default_rng(1)
  means = rng.normal(size=(5, 3)).astype(np.float32)
  present = np.asarray(present, bool)
  got, _ = margin(jnp.asarray(means), jnp.asarray(present), threshold)
  np.testing.assert_allclose(got, numpy_margin(means, present, threshold), rtol=1e-5)


def plain_tgp_training(tgp, prototypes, has, key, epochs, batch_size, lr, delta):
  """HtFLlib's servertgp.update_Gen restated: per batch, the TGP's outputs, each pair's
  distance to every output by a norm, CE on -(d + delta * onehot), an SGD step; each
  pass in the order the same random scores give."""
  k, c, fd = prototypes.shape
  reps, labels = prototypes.reshape(k * c, fd), np.tile(np.arange(c), k)
  valid = has.reshape(-1)

  def loss(t, rows):
    hidden = jax.nn.relu(t["embedding"] @ t["hidden"]["kernel"] + t["hidden"]["bias"])
    centers = hidden @ t["out"]["kernel"] + t["out"]["bias"]
    total = 0.0
    for r in rows:
      d = jnp.stack([jnp.linalg.norm(reps[r] - centers[j]) for j in range(c)])
      z = -(d + delta * (jnp.arange(c) == labels[r]))
      total = total - jax.nn.log_softmax(z)[labels[r]]
    return total / len(rows)

  for epoch_key in jax.random.split(key, epochs):
    scores = np.asarray(jax.random.uniform(epoch_key, (k * c,)))
    order = [i for i in np.argsort(np.where(valid, scores, 2.0), kind="stable") if valid[i]]
    for start in range(0, len(order), batch_size):
      grads = jax.grad(loss)(tgp, order[start:start + batch_size])
      tgp = jax.tree.map(lambda p, g: p - lr * g, tgp, grads)
  return tgp


def test_fedtgp_server_trains_the_prototypes_with_the_margin_and_sends_every_class():
  from fml_jax.algorithms.fedtgp import init_tgp, tgp_prototypes
  config = small_config(algorithm="fedtgp", feature_dim=4, batch_size=3,
                        fedtgp__server_epochs=2, fedtgp__server_learning_rate=0.2)
  algorithm = make_runner(config, "vmap").algorithm
  rng = np.random.default_rng(0)
  k, c, fd = 3, algorithm.num_classes, 4
  prototypes = rng.normal(size=(k, c, fd)).astype(np.float32)
  has = rng.random((k, c)) < 0.6
  reports = np.asarray([True, False, True])
  tgp = init_tgp(jax.random.PRNGKey(2), c, fd)
  context = RoundContext(round=jnp.int32(0), clients=None, weights=jnp.ones(k) / k,
                         key=jax.random.PRNGKey(9), reports=jnp.asarray(reports))
  old = {"tgp": tgp, "prototypes": jnp.zeros((c, fd)), "has": jnp.zeros(c, bool)}
  server, metrics = algorithm.server_update(
      old, {"prototypes": jnp.asarray(prototypes), "has": jnp.asarray(has)}, context)
  used = has & reports[:, None]
  present = used.any(0)
  means = np.stack([prototypes[used[:, j], j].mean(0) if present[j] else np.zeros(fd)
                    for j in range(c)])
  delta = numpy_margin(means, present, 100.0)
  np.testing.assert_allclose(metrics["margin"], delta, rtol=1e-5)
  assert metrics["server_pairs"] == used.sum()
  want = plain_tgp_training(tgp, prototypes, used, context.key, 2, 3, 0.2, delta)
  chex.assert_trees_all_close(server["tgp"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(server["prototypes"], tgp_prototypes(want), rtol=1e-4, atol=1e-5)
  assert bool(server["has"].all())


@pytest.mark.parametrize("source", ["round_start", "trained"])
def test_fedtgp_client_trains_as_fedproto_and_uploads_inference_prototypes(source):
  run = prototype_client_and_plain_sgd("fedtgp", np.ones(10, bool),
                                       fedtgp__prototypes_from=source)
  chex.assert_trees_all_close(run.result.client_state.params, run.params, rtol=1e-5, atol=1e-6)
  # HtFLlib's quirk uploads the round-start model's prototypes; the paper the trained one's.
  source_params = run.start if source == "round_start" else run.params
  assert_inference_prototypes(run.result.upload, run.model, source_params, run.client, run.data)


def test_fedtgp_sends_class_prototypes_each_way_and_keeps_its_network_on_the_server():
  runner = make_runner(small_config(algorithm="fedtgp", feature_dim=8), "vmap")
  c = runner.algorithm.num_classes
  per_client = c * 8 * 4 + c   # (C, fd) float32 prototypes and (C,) flags, each way
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * per_client,
                                                             "bytes_down": 4 * per_client}


# --- learning on MNIST at CI size ------------------------------------------------------


@requires_mnist
def test_htfllibs_baselines_learn_on_mnist_and_fedkds_mentee_learns_beyond_the_clients(tmp_path):
  """HtFLlib's client setting at CI size (Dirichlet 0.1, plain SGD 0.01, batch 10, one
  epoch, two MLP widths split at feature_dim 64, 10 rounds): every client's model
  beats the majority class of its own test split by a wide margin, and FedKD's shared
  mentee (its global model) beats the clients' local-only models on the whole test set.

  None of LG-FedAvg, FedProto, FedTGP, FedKD's mentors or FedGen is expected to beat
  local-only's client models on the whole test set, and none did in
  experiments/RESULTS.md §8 (paired seeds, 30 rounds): LG-FedAvg and FedGen share only
  the head, and each private body is trained on its client's few classes only, so its
  features do not separate the others; FedProto's and FedTGP's global prototypes
  summarize the representations of different architectures, and their nearest-prototype
  prediction stayed below local-only; FedKD's mentors learn from the mentee only through
  the distillation terms, divided by the summed cross-entropies. FedGH did beat
  local-only there, by a margin one seed at this size cannot show, so this test asks
  only that it learns."""
  from fml_jax import train
  from fml_jax.data import load_federated_data
  base = dict(dataset="mnist", data_dir=SHARED_TFDS, partition="dirichlet", dirichlet_alpha=0.1,
              num_clients=10, clients_per_round=10, client_max_examples=100, batch_size=10,
              learning_rate=0.01, momentum=0.0, weight_decay=0.0, local_epochs=1,
              num_rounds=10, eval_every=10, checkpoint_every=0, feature_dim=64,
              local_models="mlp_small,mlp", eval_clients_on_global_test=True)
  data = load_federated_data(small_config(algorithm="local", **base))
  rows, counts = np.asarray(data.test_rows()), np.asarray(data.test_n)
  y_test = np.asarray(data.y_test)
  majority = np.mean([np.bincount(y_test[rows[k, :counts[k]]]).max() / counts[k]
                      for k in range(len(counts))])
  finals = {}
  for algorithm in ("local", "lgfedavg", "fedproto", "fedgh", "fedtgp", "fedkd", "fedgen"):
    final = train.run(small_config(algorithm=algorithm, **base), str(tmp_path / algorithm))["final"]
    assert final["local_test_acc_mean"] > majority + 0.1, (algorithm, final, majority)
    finals[algorithm] = final
  assert (finals["fedkd"]["global_test_acc"]
          > finals["local"]["client_global_test_acc_mean"] + 0.1), finals

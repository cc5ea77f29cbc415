"""FedDistill against plain re-statements: the loss (both targets), the per-class logit
upload of a client's whole local training, the server's per-class mean, and the bytes
it sends (the registry tests run it through every executor, store and device count)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fml_jax.algorithms.feddistill import distill_loss
from fml_jax.algorithms.per_class import class_sums, mean_over_reports as aggregate
from fml_jax.errors import ConfigError
from fml_jax.models import forward
from fml_jax.rounds.types import RoundContext

from conftest import client_row, make_runner, sgd_with_class_sums, small_config

CONFIG = dict(algorithm="feddistill", local_models="mlp_small", momentum=0.0,
              weight_decay=0.0, learning_rate=0.05, local_epochs=2)


def log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def numpy_loss(logits, labels, mask, global_logits, has, weight, target):
  """HtFLlib's clientfd.py, restated: CE + lambda * CE(out, T) with a float target."""
  logp = log_softmax(logits)
  n = max(mask.sum(), 1)
  ce = -sum(logp[i, labels[i]] for i in range(len(labels)) if mask[i]) / n
  if not has.any():
    return ce, ce, 0.0
  rows = []
  for i, y in enumerate(labels):
    t = global_logits[y] if has[y] else logits[i]
    if target == "softmax":
      t = np.exp(log_softmax(t[None]))[0]
    rows.append(-(t * logp[i]).sum())
  distill = sum(r for r, m in zip(rows, mask) if m) / n
  return ce + weight * distill, ce, distill


@pytest.mark.parametrize("target", ["softmax", "logits"])
@pytest.mark.parametrize("any_global", [True, False])
def test_loss_equals_htfllibs_restated(target, any_global):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 0], bool)
  global_logits = rng.normal(size=(4, 4)).astype(np.float32)
  has = np.array([True, False, True, False]) & any_global
  got = distill_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                     jnp.asarray(global_logits), jnp.asarray(has), 0.7, target)
  want = numpy_loss(logits, labels, mask, global_logits, has, 0.7, target)
  np.testing.assert_allclose(np.array(got, dtype=np.float64), want, rtol=1e-5, atol=1e-6)


def test_no_gradient_through_the_targets_and_zero_pull_toward_an_own_softmax():
  logits = jnp.array([[1.0, -2.0, 0.5]])
  labels, mask = jnp.array([1]), jnp.array([True])
  has = jnp.array([True, False, False])   # class 1 has no global logit: its own output
  grad = jax.grad(lambda z: distill_loss(z, labels, mask, jnp.zeros((3, 3)), has, 1.0)[2])(logits)
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_class_sums_and_the_servers_mean_restated():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  labels, mask = np.array([0, 2, 2, 1, 0]), np.array([1, 1, 1, 0, 1], bool)
  sums, counts = class_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), 3)
  for c in range(3):
    rows = [logits[i] for i in range(5) if labels[i] == c and mask[i]]
    np.testing.assert_allclose(sums[c], np.sum(rows, axis=0) if rows else 0, rtol=1e-6)
    assert counts[c] == len(rows)
  uploads = rng.normal(size=(3, 3, 3)).astype(np.float32)
  has = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], bool)
  reported = np.array([True, True, False])
  mean, global_has = aggregate(jnp.asarray(uploads), jnp.asarray(has), jnp.asarray(reported))
  for c in range(3):
    senders = [k for k in range(3) if has[k, c] and reported[k]]
    assert bool(global_has[c]) == bool(senders)
    if senders:   # unweighted over the clients that saw the class
      np.testing.assert_allclose(mean[c], np.mean([uploads[k, c] for k in senders], axis=0),
                                 rtol=1e-6)


def test_client_update_equals_plain_sgd_and_uploads_its_training_logits():
  config = small_config(**CONFIG)
  runner = make_runner(config, "vmap")
  algorithm, data = runner.algorithm, runner.data
  state = runner.init(0)
  c = algorithm.num_classes
  server = {"logits": jax.random.normal(jax.random.PRNGKey(3), (c, c)),
            "has": jnp.arange(c) % 2 == 0}
  (cohort,), _ = runner.begin_round(state)
  client, own = client_row(cohort.clients, 1), client_row(cohort.client_state, 1)
  result = algorithm.client_update(server, own, client, data, 0)
  model = algorithm.groups[0].model

  def loss_and_logits(p, xb, yb, mask, key):
    logits = forward(model, p, {}, xb, True, key)[0]
    return distill_loss(logits, yb, mask, server["logits"], server["has"], 1.0)[0], logits

  params, sums, counts = sgd_with_class_sums(loss_and_logits, own.params, client, data, config,
                                             c, c)
  chex.assert_trees_all_close(result.client_state.params, params, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(result.upload["has"], counts > 0)
  np.testing.assert_allclose(result.upload["logits"], sums / np.maximum(counts, 1)[:, None],
                             rtol=1e-5, atol=1e-5)
  # Every class the client holds shows up, and no other.
  held = set(np.asarray(data.y_train)[np.asarray(client.train_idx)[:int(client.train_n)]].tolist())
  assert set(np.flatnonzero(result.upload["has"]).tolist()) == held


def test_server_keeps_only_this_rounds_reports():
  config = small_config(algorithm="feddistill")
  runner = make_runner(config, "vmap")
  algorithm = runner.algorithm
  k, c = 4, algorithm.num_classes
  uploads = {"logits": jnp.ones((k, c, c)), "has": jnp.ones((k, c), bool)}
  context = RoundContext(round=jnp.int32(0), clients=None, weights=jnp.zeros(k),
                         key=jax.random.PRNGKey(0), reports=jnp.zeros(k, bool))
  old = {"logits": jnp.ones((c, c)), "has": jnp.ones(c, bool)}
  server, metrics = algorithm.server_update(old, uploads, context)
  assert not server["has"].any() and metrics["classes_with_global_logits"] == 0


def test_bytes_per_round_are_the_class_logits():
  runner = make_runner(small_config(algorithm="feddistill"), "vmap")
  c = runner.algorithm.num_classes
  per_client = c * c * 4 + c   # (C, C) float32 logits and (C,) bool "has a logit"
  assert runner.communication(runner.abstract_state(0)) == {"bytes_up": 4 * per_client,
                                                             "bytes_down": 4 * per_client}


def test_client_tasks_are_refused_with_the_field():
  from fml_jax import config_checks
  with pytest.raises(ConfigError, match="client_tasks"):
    config_checks.validate(small_config(algorithm="feddistill", client_tasks="parity"))

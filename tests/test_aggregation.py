"""The aggregation seam: the weighted mean and the server optimizers (FedOpt), each
against a plain NumPy re-statement of its step, and in whole rounds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import small_config
from fml_jax.algorithms import aggregation
from test_rounds import assert_trees_close, make_runner, run_rounds


def server(**overrides):
  return ml_collections.ConfigDict({**aggregation.SERVER_DEFAULTS, **overrides})


def numpy_server_steps(kind, x, means, lr, b1=0.9, b2=0.99, eps=1e-3, momentum=0.9):
  """The server steps written out: g = x - mean; then each optimizer's rule."""
  x = np.array(x, np.float64)
  m = np.zeros_like(x)
  v = np.zeros_like(x)
  if kind == "yogi":
    m[:] = v[:] = 1e-6   # optax's initial accumulators
  for t, mean in enumerate(means, start=1):
    g = x - mean
    if kind == "sgd":
      x = x - lr * g
    elif kind == "momentum":   # FedAvgM: v <- beta v + g; x <- x - lr v
      v = momentum * v + g
      x = x - lr * v
    elif kind in ("adam", "yogi"):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g**2 if kind == "adam" else v - (1 - b2) * np.sign(v - g**2) * g**2
      m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
      x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
    elif kind == "adagrad":
      v = v + g**2
      x = x - lr * g / np.sqrt(v + eps)
  return x


@pytest.mark.parametrize("kind,lr", [("sgd", 0.5), ("momentum", 1.0), ("adam", 0.1),
                                     ("yogi", 0.01), ("adagrad", 0.1)])
def test_server_optimizer_step_equals_its_numpy_restatement(kind, lr):
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(5,)).astype(np.float32)
  uploads = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3)]
  weights = jnp.asarray([0.2, 0.3, 0.5], jnp.float32)
  opt = aggregation.ServerOptimizer(server(optimizer=kind, learning_rate=lr))
  assert not opt.plain
  params, state = {"w": jnp.asarray(x0)}, opt.init({"w": jnp.asarray(x0)})
  for u in uploads:
    params, state, metrics = opt.step(params, state, {"w": jnp.asarray(u)}, weights)
  means = [np.tensordot(np.asarray(weights, np.float64), u, 1) for u in uploads]
  want = numpy_server_steps(kind, x0, means, lr)
  np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=2e-5, atol=2e-6)
  assert float(metrics["server_update_norm"]) > 0


def test_plain_average_is_the_mean_itself_not_x_minus_the_pseudo_gradient():
  # x - (x - mean) is not the mean in float32: 1 - (1 - 1e-8) == 0.
  x = {"w": jnp.asarray([1.0], jnp.float32)}
  uploads = {"w": jnp.asarray([[1e-8]], jnp.float32)}
  one = jnp.ones((1,), jnp.float32)
  for settings in (server(), server(optimizer="momentum", momentum=0.0)):
    opt = aggregation.ServerOptimizer(settings)
    assert opt.plain and opt.init(x) == {}
    params, extra, _ = opt.step(x, {}, uploads, one)
    assert extra == {} and float(params["w"][0]) == np.float32(1e-8)
  through_sgd = optax.apply_updates(x, jax.tree.map(lambda a, m: -(a - m), x, {"w": uploads["w"][0]}))
  assert float(through_sgd["w"][0]) == 0.0


def test_fedavgm_with_momentum_zero_equals_fedavg_bit_for_bit():
  plain, plain_metrics = run_rounds(small_config(algorithm="fedavg"), "vmap", 2)
  fedavgm, fedavgm_metrics = run_rounds(
      small_config(algorithm="fedavg", server__optimizer="momentum", server__momentum=0.0),
      "vmap", 2)
  assert_trees_close(fedavgm.server, plain.server, rtol=0, atol=0)
  assert plain_metrics == fedavgm_metrics
  assert set(plain.server) == {"params"}   # no optimizer state is kept


def test_fedadam_round_equals_optax_adam_applied_by_hand_to_the_mean_update():
  config = small_config(algorithm="fedavg", server__optimizer="adam",
                        server__learning_rate=0.05)
  runner = make_runner(config, "sequential")
  algorithm = runner.algorithm
  state = runner.init(config.seed)
  adam = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  params = jax.device_get(state.server["params"])
  opt_state = adam.init(params)
  # The clients' updates as the sequential executor computes them (one jitted client):
  # adam divides by the root of the second moment, so coordinates whose pseudo-gradient
  # is near zero would turn float-rounding differences between programs into lr-sized ones.
  client_update = jax.jit(algorithm.client_update, static_argnums=4)
  for _ in range(2):
    (cohort,), context = runner.begin_round(state)
    uploads = [client_update(state.server, (), jax.tree.map(lambda a: a[i], cohort.clients),
                             runner.data, 0).upload
               for i in range(cohort.clients.id.shape[0])]
    w = np.asarray(context.weights)
    mean = jax.tree.map(lambda *u: np.tensordot(w, np.stack(u), 1), *uploads)
    updates, opt_state = adam.update(jax.tree.map(np.subtract, params, mean), opt_state, params)
    params = optax.apply_updates(params, updates)
    state, report = runner.run_round(state)
    assert "server_update_norm" in report.metrics
  # Adam moves every coordinate by about lr (0.05) whatever its gradient's size, so where
  # the pseudo-gradient is near zero float rounding of the mean shows at lr scale: allow
  # 1e-3 of a step (a wrong moment, decay or bias correction is off by far more).
  assert_trees_close(state.server["params"], params, rtol=0, atol=5e-5)


def test_server_metrics_reach_the_report_and_downloads_are_parameters_only():
  plain_config = small_config(algorithm="fedavg", clients_per_round=6)
  runner = make_runner(plain_config, "vmap")
  state = runner.init(plain_config.seed)
  before = jax.device_get(state.server["params"])
  state, report = runner.run_round(state)
  after = jax.device_get(state.server["params"])
  norm = np.sqrt(sum(np.sum((a - b).astype(np.float64)**2) for a, b in
                     zip(jax.tree.leaves(before), jax.tree.leaves(after))))
  np.testing.assert_allclose(float(report.metrics["server_update_norm"]), norm, rtol=1e-4)
  adam = make_runner(small_config(algorithm="fedavg", clients_per_round=6,
                                  server__optimizer="adam"), "vmap")
  assert "server_opt_state" in adam.abstract_state(0).server
  assert (adam.communication(adam.abstract_state(0))
          == runner.communication(runner.abstract_state(0)))


@pytest.mark.parametrize("name", ["fml", "fedmr"])
def test_memes_and_fedmrs_first_stage_take_the_server_optimizer(name):
  config = small_config(algorithm=name, server__optimizer="yogi", server__learning_rate=0.01,
                        clients_per_round=3, fedmr__first_stage_rounds=1)
  state, metrics = run_rounds(config, "vmap", 2)
  plain, _ = run_rounds(small_config(algorithm=name, clients_per_round=3,
                                     fedmr__first_stage_rounds=1), "vmap", 2)
  assert "server_opt_state" in state.server and "server_update_norm" in metrics[0]
  params = state.server["params"] if name == "fml" else state.server["slots"]
  other = plain.server["params"] if name == "fml" else plain.server["slots"]
  assert not np.allclose(jax.tree.leaves(params)[0], jax.tree.leaves(other)[0])
  if name == "fedmr":   # round 1 (first stage) moved the optimizer; round 2 recombined
    assert int(state.server["server_opt_state"][0].count) == 1

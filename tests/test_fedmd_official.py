"""FedMD as its official code does it (diogenes0319/FedMD_clean): an optimizer per
phase, the L2 penalty on the last Dense kernel, the phases' batch sizes, and Keras'
early stopping (patience, last weights kept); each setting's older behaviour too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_runner, small_config
from fml_jax import config_checks
from fml_jax.algorithms import build_algorithm, fedmd
from fml_jax.algorithms.steps import supervised_step
from fml_jax.errors import ConfigError
from fml_jax.models import apply_model, build_model, init_variables, output_layer
from fml_jax.optimizers import TrainState

PUBLIC, ALIGNMENT = 60, 30


def party_config(**overrides):
  """Two architectures, every client in every round, no early stopping (so every
  phase takes a known number of steps), and a distinct batch size per phase."""
  base = dict(algorithm="fedmd", local_models="mlp,mlp_small", public_size=PUBLIC,
              clients_per_round=6, optimizer="adam", learning_rate=1e-3, weight_decay=0.0,
              momentum=0.0, local_epochs=1, batch_size=32, fedmd__public_epochs=2,
              fedmd__private_epochs=3, fedmd__early_stopping="off",
              fedmd__public_batch_size=16, fedmd__revisit_batch_size=8,
              fedmd__alignment_size=ALIGNMENT, fedmd__digest_batch_size=8,
              fedmd__report_bounds=False)
  return small_config(**{**base, **overrides})


def steps(n, batch):
  return -(-np.asarray(n) // batch)


def count(opt_state):
  """Adam's step count (optax.adam's state: (ScaleByAdamState, EmptyState))."""
  return np.asarray(opt_state[0].count)


def warm(config):
  runner = make_runner(config, "vmap")
  state = runner.warm_start(runner.init(0))
  train_n = [np.asarray(runner.data.train_n)[np.asarray(m)] for m in runner.members]
  return runner, state, train_n


# --- (a) optimizers per phase, (d) the phases' batch sizes -----------------------------


@pytest.mark.parametrize("batch_size,revisit,digest", [(32, 8, 8), (16, 5, 16)])
def test_per_phase_optimizers_count_their_own_steps(batch_size, revisit, digest):
  c = party_config(batch_size=batch_size, fedmd__revisit_batch_size=revisit,
                   fedmd__digest_batch_size=digest)
  runner, state, train_n = warm(c)
  private = [3 * steps(n, batch_size) for n in train_n]
  for g, population in enumerate(state.population):
    # A fresh optimizer for the private transfer: its count is the private steps alone
    # (the public steps went to the public phase's own, discarded, state).
    np.testing.assert_array_equal(count(population.opt_state), private[g])
    np.testing.assert_array_equal(count(population.digest_opt_state), 0)
  digest_steps = steps(ALIGNMENT, digest)
  for r in (1, 2):
    state, _ = runner.run_round(state)
    for g, population in enumerate(state.population):
      # The digest's state persists across rounds, apart from the revisit's, which
      # carries on from the private transfer.
      np.testing.assert_array_equal(count(population.digest_opt_state), r * digest_steps)
      np.testing.assert_array_equal(count(population.opt_state),
                                    private[g] + r * steps(train_n[g], revisit))
      assert not np.allclose(population.digest_opt_state[0].mu["Dense_0"]["kernel"],
                             population.opt_state[0].mu["Dense_0"]["kernel"])


def test_shared_optimizer_counts_every_phase():
  c = party_config(fedmd__optimizers="shared")
  runner, state, train_n = warm(c)
  public = 2 * steps(PUBLIC, 16)   # early stopping off: the whole public set trains
  before = [public + 3 * steps(n, 32) for n in train_n]
  for g, population in enumerate(state.population):
    np.testing.assert_array_equal(count(population.opt_state), before[g])
    assert population.digest_opt_state == ()
  for r in (1, 2):
    state, _ = runner.run_round(state)
    for g, population in enumerate(state.population):
      np.testing.assert_array_equal(
          count(population.opt_state),
          before[g] + r * (steps(ALIGNMENT, 8) + steps(train_n[g], 8)))


def test_public_batch_size_sets_the_public_steps():
  for batch in (16, 7):
    runner, state, train_n = warm(party_config(fedmd__optimizers="shared",
                                               fedmd__public_batch_size=batch))
    np.testing.assert_array_equal(count(state.population[0].opt_state),
                                  2 * steps(PUBLIC, batch) + 3 * steps(train_n[0], 32))


def test_auto_rule_counts_revisit_steps_with_the_revisit_batch():
  runner = make_runner(party_config(), "vmap")
  max_train = int(runner.data.max_train)
  assert runner.local_steps_per_round() == 1 * steps(max_train, 8)   # not batch_size 32


# --- (b) the L2 penalty on the last Dense kernel ---------------------------------------


def test_final_dense_is_the_highest_numbered_dense_or_the_split_models_head():
  assert output_layer({"Conv_0": 0, "Dense_2": 0, "Dense_10": 0, "BatchNorm_0": 0}) \
      == "Dense_10"
  assert output_layer({"Conv_0": 0}) is None
  for name, feature_dim, want in (("mlp", 0, "Dense_2"), ("mlp_small", 0, "Dense_1"),
                                  ("logreg", 0, "Dense_0"), ("fedmd_small_p5", 0, "Dense_0"),
                                  ("fedmd_small_p5", 8, "head"), ("mlp", 8, "head")):
    shape = (28, 28, 1) if name.startswith("fedmd") else (60,)
    params = jax.eval_shape(lambda: init_variables(build_model(name, 10, shape,
                                                               feature_dim=feature_dim),
                                                   jax.random.PRNGKey(0), shape))["params"]
    assert output_layer(params) == want


def sgd_algorithm(**overrides):
  """FedMD with plain SGD at learning rate 1: a step subtracts the gradient."""
  c = small_config(algorithm="fedmd", local_models="mlp_small", public_size=PUBLIC,
                   optimizer="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                   **overrides)
  config_checks.validate(c)
  return build_algorithm(c, 10, (60,))


def test_final_kernel_gradient_is_cross_entropy_plus_2e3_w():
  algorithm = sgd_algorithm()
  model = algorithm.groups[0].model
  params = init_variables(model, jax.random.PRNGKey(0), (60,))["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 60))
  y = jnp.asarray([0, 3, 3, 7, 9])
  step = supervised_step(model, algorithm.optimizer, regularizer=algorithm.regularizers[0])
  state = TrainState.create(params, algorithm.optimizer)
  new, _ = step(state, x, y, jnp.ones(5, bool), jax.random.PRNGKey(2))
  grads = jax.tree.map(lambda a, b: np.asarray(a - b), params, new.params)
  # By hand: h = relu(x W0 + b0), p = softmax(h W1 + b1); dCE/dW1 = h^T (p - onehot) / B.
  w0, b0 = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
  w1, b1 = np.asarray(params["Dense_1"]["kernel"]), np.asarray(params["Dense_1"]["bias"])
  h = np.maximum(np.asarray(x) @ w0 + b0, 0)
  z = h @ w1 + b1
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = (p - np.eye(10)[np.asarray(y)]) / 5
  np.testing.assert_allclose(grads["Dense_1"]["kernel"], h.T @ dz + 2e-3 * w1,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["Dense_1"]["bias"], dz.sum(0), rtol=1e-4, atol=1e-6)
  # Only the last Dense kernel is penalized.
  dh = (dz @ w1.T) * (h > 0)
  np.testing.assert_allclose(grads["Dense_0"]["kernel"], np.asarray(x).T @ dh,
                             rtol=1e-4, atol=1e-6)
  # 0 turns it off.
  assert sgd_algorithm(fedmd__final_layer_l2=0.0).regularizers == [None]


def test_digest_pays_the_penalty_too():
  """At the consensus (the party's own logits) the distillation gradient is 0 (KL here:
  jax's |x|' at 0 is 1, not TensorFlow's 0), so a digest step moves only the last
  kernel, by the penalty's gradient: W <- W - lr * 2e-3 * W."""
  algorithm = sgd_algorithm(fedmd__digest_loss="kl")
  model = algorithm.groups[0].model
  params = init_variables(model, jax.random.PRNGKey(0), (60,))["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 60))
  consensus = apply_model(model, params, x)
  step = algorithm.digest_step(model, consensus, 0)
  new, metrics = step(TrainState.create(params, algorithm.optimizer), x, jnp.arange(4),
                      jnp.ones(4, bool), jax.random.PRNGKey(2))
  assert abs(float(metrics["digest_loss"])) < 1e-6   # the distance, without the L2 term
  np.testing.assert_allclose(new.params["Dense_1"]["kernel"],
                             params["Dense_1"]["kernel"] * (1 - 2e-3), rtol=0, atol=1e-7)
  for layer, field in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "bias")):
    np.testing.assert_allclose(new.params[layer][field], params[layer][field], atol=1e-7)
  # And the same kernel moves by the distillation gradient alone without the penalty.
  plain = sgd_algorithm(fedmd__digest_loss="kl", fedmd__final_layer_l2=0.0)
  new, _ = plain.digest_step(model, consensus, 0)(
      TrainState.create(params, plain.optimizer), x, jnp.arange(4), jnp.ones(4, bool),
      jax.random.PRNGKey(2))
  np.testing.assert_allclose(new.params["Dense_1"]["kernel"], params["Dense_1"]["kernel"],
                             atol=1e-7)


# --- (c) early stopping ----------------------------------------------------------------


def fake_fit(accs, mode, patience=3, min_delta=0.001, epochs=None):
  """fit_epochs on a state that is just the number of epochs trained, whose validation
  accuracy after epoch e is accs[e - 1]: returns (the state kept, epochs run)."""
  accs = jnp.asarray(accs, jnp.float32)
  run = jax.jit(lambda: fedmd.fit_epochs(lambda s, e: s + 1, lambda s: accs[s - 1],
                                         jnp.int32(0), epochs or accs.shape[0], mode,
                                         patience, min_delta))
  kept, ran = run()
  return int(kept), int(ran)


def test_patience_stops_after_three_epochs_without_improvement_and_keeps_the_last():
  # 0.6005 is not an improvement on 0.6 by more than min_delta 0.001.
  assert fake_fit([0.5, 0.6, 0.6005, 0.6, 0.6], "patience") == (5, 5)
  assert fake_fit([0.5, 0.6, 0.6005, 0.6, 0.6, 0.9, 0.95], "patience") == (5, 5)
  # An improvement resets the wait; without restore_best_weights the last epoch is kept.
  assert fake_fit([0.5, 0.7, 0.6, 0.6, 0.75, 0.6, 0.6, 0.6, 0.9], "patience") == (8, 8)
  # The best only moves on an improvement, so small gains add up against it (Keras).
  assert fake_fit([0.5, 0.5008, 0.5016, 0.4, 0.4, 0.4, 0.4], "patience") == (6, 6)
  assert fake_fit([0.5, 0.6, 0.6, 0.6, 0.6], "patience", patience=1) == (3, 3)
  assert fake_fit([0.1, 0.2, 0.3, 0.4], "patience") == (4, 4)   # never stops


def test_patience_step_is_keras_rule():
  best, wait = jnp.float32(-jnp.inf), jnp.int32(0)
  stops = []
  for acc in [0.5, 0.6, 0.6005, 0.6, 0.6]:
    best, wait, stop = fedmd.patience_step(best, wait, jnp.float32(acc), 3, 0.001)
    stops.append((float(best), int(wait), bool(stop)))
  assert [s[1:] for s in stops] == [(0, False), (0, False), (1, False), (2, False), (3, True)]
  assert stops[-1][0] == pytest.approx(0.6)


def test_best_keeps_the_best_epoch_and_off_the_last():
  assert fake_fit([0.5, 0.7, 0.6, 0.65], "best") == (2, 4)
  assert fake_fit([0.5, 0.7, 0.7, 0.65], "best") == (2, 4)   # the first of equal bests
  assert fake_fit([0.5, 0.7, 0.6, 0.65], "off") == (4, 4)


def test_patience_under_vmap_stops_each_client_on_its_own():
  accs = jnp.asarray([[0.5, 0.6, 0.6, 0.6, 0.6, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
  fit = lambda a: fedmd.fit_epochs(lambda s, e: s + 1, lambda s: a[s - 1], jnp.int32(0), 6,
                                   "patience", 3, 0.001)
  kept, ran = jax.jit(jax.vmap(fit))(accs)
  assert kept.tolist() == [5, 6] and ran.tolist() == [5, 6]


def test_patience_stops_transfer_learning_inside_the_warm_start():
  """No epoch can beat the first by more than min_delta = 1, so with patience 1 both
  phases stop after their second epoch: the shared optimizer counts 2 + 2 epochs."""
  c = party_config(fedmd__optimizers="shared", fedmd__early_stopping="patience",
                   fedmd__min_delta=1.0, fedmd__public_patience=1,
                   fedmd__private_patience=1, fedmd__public_epochs=4,
                   fedmd__private_epochs=5)
  runner, state, train_n = warm(c)
  held_out = int(PUBLIC * fedmd.VALIDATION_FRACTION)
  for g, population in enumerate(state.population):
    np.testing.assert_array_equal(count(population.opt_state),
                                  2 * steps(PUBLIC - held_out, 16) + 2 * steps(train_n[g], 32))


def test_older_boolean_early_stopping_means_what_it_did():
  assert fedmd.early_stopping_mode(True) == "best"
  assert fedmd.early_stopping_mode(False) == "off"
  config_checks.validate(small_config(algorithm="fedmd", public_size=PUBLIC,
                                      fedmd__early_stopping=True))


def test_official_defaults():
  d = fedmd.FedMD.defaults()
  assert (d["optimizers"], d["final_layer_l2"], d["public_batch_size"],
          d["revisit_batch_size"], d["digest_batch_size"]) == ("per_phase", 1e-3, 128, 5, 256)
  c = small_config()
  assert (c.fedmd.early_stopping, c.fedmd.public_patience, c.fedmd.private_patience,
          c.fedmd.min_delta) == ("patience", 3, 10, 0.001)
  from fml_jax.configs import fedmd as fedmd_config
  official = fedmd_config.get_config()
  assert (official.batch_size, official.fedmd.public_epochs, official.fedmd.private_epochs,
          official.num_rounds) == (32, 20, 25, 20)


@pytest.mark.parametrize("overrides,field", [
    (dict(fedmd__early_stopping="sometimes"), "fedmd.early_stopping"),
    (dict(fedmd__optimizers="adam"), "fedmd.optimizers"),
    (dict(fedmd__revisit_batch_size=0), "fedmd.revisit_batch_size"),
    (dict(fedmd__public_patience=0), "fedmd.public_patience"),
    (dict(fedmd__final_layer_l2=-1e-3), "fedmd.final_layer_l2"),
    (dict(fedmd__min_delta=2.0), "fedmd.min_delta"),
])
def test_bad_values_name_their_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    config_checks.validate(small_config(algorithm="fedmd", public_size=PUBLIC, **overrides))
  assert e.value.field == field
